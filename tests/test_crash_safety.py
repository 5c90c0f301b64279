"""Nothing lost, nothing executed: a training run killed at any moment (kill -9, mid-write too) resumes
to the weights of a run never interrupted; a write that fails part-way, a full disk or an unwritable
folder leave every earlier file intact; a damaged checkpoints/last/ stops --resume with a clear
message; an optimizer file that would run code when unpickled is refused.

The runs are tiny (64 images of 32 px, 2 epochs of 8 steps) and use one torch thread: on 2 shared
cores that is several times faster than two, and every run compared here uses the same setting."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blipcore.model.config import BlipConfig
from blipcore.runs import rundir
from blipcore.runs.rundir import CheckpointError, RunDir, RunError
from blipcore.training.trainer import Trainer
from tests.conftest import REPO_ROOT, photos_cfg, small_cfg
from train.cli import main

ITM = {"itm_weight": 0.5}  # ITM mining draws from the global RNG: resume must restore it exactly


# --- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_everywhere(one_thread):
    yield


def crash_cfg(shapes_root: Path, **train) -> BlipConfig:
    return small_cfg(shapes_root, model=ITM, **{"save_state_every": 1, **train})


@pytest.fixture(scope="module")
def reference(one_thread, shapes_root, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with: (config, run folder, final weights)."""
    cfg = crash_cfg(shapes_root)
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    Trainer(cfg, run_dir, progress=False).fit()
    return cfg, run_dir, weights_of(run_dir)


def weights_of(run_dir: Path, epoch: int | None = None) -> dict[str, torch.Tensor]:
    model, _, _ = RunDir(run_dir).load_model(epoch)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def stale_temporaries(run_dir: Path) -> list[Path]:
    return [p for p in Path(run_dir).rglob(".*.tmp") if rundir.STALE_TEMPORARY_PATTERN.fullmatch(p.name)]


def assert_consistent(run_dir: Path) -> dict:
    """What must hold at every instant: run.json parses, every listed checkpoint loads with a verified
    sha256, state.json names files that exist with the sha256 it records. Returns state.json."""
    run = RunDir(run_dir)
    run.read_info()
    run.read_metrics()
    for ckpt in run.checkpoints():
        _, _, loaded = run.load_model(ckpt.epoch)
        assert loaded.meta["sha256"] == rundir.sha256_file(ckpt.weights)
    state = json.loads((run.last_dir / "state.json").read_text())
    for key in ("weights", "optimizer"):
        assert rundir.sha256_file(run.last_dir / state[key]) == state[f"{key}_sha256"], key
    return state


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every complete file a reader may use: epoch checkpoints and what state.json names."""
    run = RunDir(run_dir)
    files = [p for c in run.checkpoints() for p in (c.weights, c.sidecar)]
    state_file = run.last_dir / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        files += [state_file, run.last_dir / state["weights"], run.last_dir / state["optimizer"]]
    return {str(p.relative_to(run.path)): rundir.sha256_file(p) for p in files}


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in RunDir(run_dir).read_metrics() if r.get("split") == "train"]


def val_epochs(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in RunDir(run_dir).read_metrics() if r.get("split") == "val"]


def write_preset(folder: Path, cfg: BlipConfig) -> Path:
    """A preset TOML (base = "demo") holding the fields where `cfg` differs from the demo preset."""
    demo, wanted = BlipConfig.preset("demo").to_dict(), cfg.to_dict()
    lines = ['base = "demo"']
    for section in ("model", "data", "train"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in wanted[section].items() if demo[section].get(k) != v]
    path = folder / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- kill -9 -----------------------------------------------------------------------------------
def state_step(run_dir: Path) -> int:
    try:
        return json.loads((Path(run_dir) / "checkpoints/last/state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def kill_at(proc: subprocess.Popen, run_dir: Path, delay: float, mid_write: bool) -> str | None:
    """SIGKILL `proc` `delay` s after it saved a state newer than the one it started from; with `mid_write`,
    at the first new temporary file seen after that (a checkpoint being written). Returns how the kill
    landed ("mid-write", "between writes"), or None when the run finished first."""
    watched = [run_dir / "checkpoints", run_dir / "checkpoints/last"]

    def temporaries() -> set[str]:
        return {n for d in watched if d.is_dir() for n in os.listdir(d) if n.endswith(".tmp")}

    def finished() -> bool:
        assert time.monotonic() < deadline, "the training process made no progress for 3 minutes"
        return proc.poll() is not None

    start_step, seen, deadline = state_step(run_dir), temporaries(), time.monotonic() + 180
    while state_step(run_dir) <= start_step:
        if finished():
            return None
        time.sleep(0.005)
    time.sleep(delay)
    while mid_write and not temporaries() - seen:
        if finished():
            return None
        time.sleep(0.0005)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return "mid-write" if mid_write else "between writes"


def test_kill_9_at_random_moments_then_resume_ends_with_the_uninterrupted_weights(shapes_root, tmp_path):
    preset = write_preset(tmp_path, crash_cfg(shapes_root, save_state_every=0))
    fit = [sys.executable, "-m", "train", "fit", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 - closed in finally

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([*fit, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    procs = [start("--preset", str(preset), "--set", "train.save_state_every=1", "--run-dir", str(straight))]
    try:
        procs.append(start("--preset", str(preset), "--set", "train.save_state_every=1", "--run-dir", str(killed)))
        rng = random.Random(20240607)
        landed = []
        for mid_write in (False, True, True):
            how = kill_at(procs[-1], killed, delay=rng.uniform(0.0, 0.8), mid_write=mid_write)
            if how is None:
                break
            landed.append((how, len(stale_temporaries(killed))))
            assert_consistent(killed)
            procs.append(start("--run-dir", str(killed), "--resume"))
        assert procs[-1].wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()
        assert procs[0].wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()

    # (how each kill landed, temporaries it left): at least one was caught writing a checkpoint
    assert len(landed) >= 2 and any(how == "mid-write" and left for how, left in landed), landed
    assert RunDir(killed).read_info()["status"] == "completed"
    assert_consistent(killed)
    assert_equal_weights(weights_of(straight), weights_of(killed))
    assert_equal_weights(weights_of(straight, 1), weights_of(killed, 1))
    assert train_steps(killed) == train_steps(straight) == list(range(2, 17, 2))
    assert val_epochs(killed) == val_epochs(straight) == [1, 2]
    assert stale_temporaries(killed) == []  # the resumes removed what the kills left


# --- signals to the process group, and a second trainer ---------------------------------------
def start_trainer(*args: str, log: Path) -> subprocess.Popen:
    """`python -m train fit ARGS` in a process group of its own, stderr to `log`."""
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "train", "fit", "--no-progress", *args], cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)


def wait_for_a_logged_step(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not train_steps(run_dir):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step logged in 3 minutes"
        time.sleep(0.05)


def test_sigterm_to_the_process_group_with_workers_running_saves_and_ends_interrupted(shapes_root, tmp_path):
    # what `timeout`, `docker stop`, Kubernetes and Slurm do: the signal reaches the DataLoader workers too
    preset = write_preset(tmp_path, photos_cfg(shapes_root, epochs=40).override({"data.num_workers": 2}))
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = start_trainer("--preset", str(preset), "--run-dir", str(run_dir), log=log)
    try:
        wait_for_a_logged_step(proc, run_dir, log)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    info = RunDir(run_dir).read_info()
    assert info["status"] == "interrupted" and info["error"] is None
    assert assert_consistent(run_dir)["step"] == info["steps_done"] > 0
    assert "interrupted:" in stdout and "--resume" in stdout


def test_one_trainer_per_run_folder_and_a_killed_one_frees_it_at_once(shapes_root, tmp_path, capsys):
    preset = write_preset(tmp_path, crash_cfg(shapes_root, epochs=40))
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    first = start_trainer("--preset", str(preset), "--run-dir", str(run_dir), log=log)
    try:
        wait_for_a_logged_step(first, run_dir, log)
        for args in (["--preset", str(preset), "--run-dir", str(run_dir)],  # what a user retries first
                     ["--run-dir", str(run_dir), "--resume"],  # what the old message advised
                     ["--preset", str(preset), "--run-dir", str(run_dir), "--overwrite"]):
            assert main(["fit", "--no-progress", *args]) == 2  # this process is a second trainer
            err = capsys.readouterr().err
            assert f"being trained right now by another trainer (pid {first.pid} " in err, err
        assert first.poll() is None and RunDir(run_dir).read_info()["status"] == "running"
        assert RunDir(run_dir).trainer_running() is True
        steps = train_steps(run_dir)
        assert steps == sorted(set(steps)), "only one process writes the metrics"
        first.kill()  # kill -9: no chance to release anything
        first.wait()
        assert RunDir(run_dir).read_info()["status"] == "running" and RunDir(run_dir).trainer_running() is False
        step = state_step(run_dir)
        resumed = start_trainer("--run-dir", str(run_dir), "--resume", "--max-steps", str(step + 2), log=log)
        stdout, _ = resumed.communicate(timeout=180)
        assert resumed.returncode == 0, log.read_text()[-3000:]
        assert f"completed: {step + 2} steps" in stdout
    finally:
        for proc in (first, *([resumed] if "resumed" in locals() else [])):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- a crash in the middle of an atomic write, deterministically -------------------------------
class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


@pytest.mark.parametrize(
    ("target", "occurrence", "state_step_after", "epochs_after"),
    [
        ("model-step", 1, None, []),  # before the first save: --resume starts again from step 0
        ("state.json", 11, 10, [1]),  # new weights + optimizer files written, state.json not
        ("epoch_001.json", 1, 7, []),  # epoch weights written, sidecar not: not a checkpoint yet
        ("epoch_002.safetensors", 1, 15, [1]),
    ],
)
def test_a_crash_inside_an_atomic_write_keeps_the_previous_state_and_resumes_exactly(
    reference, shapes_root, tmp_path, monkeypatch, target, occurrence, state_step_after, epochs_after
):
    cfg, _, expected = reference
    run_dir = tmp_path / "run"
    real_replace, calls, before = os.replace, {"n": 0}, {}

    def crashing_replace(src, dst, *args, **kwargs):
        if Path(dst).name.startswith(target) and Path(dst).parent.is_relative_to(run_dir):
            calls["n"] += 1
            if calls["n"] == occurrence:
                before.update(snapshot(run_dir))
                raise Crash(f"killed while replacing {dst}")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(Crash):
        Trainer(cfg, run_dir, progress=False).fit()
    monkeypatch.setattr(os, "replace", real_replace)

    run = RunDir(run_dir)
    assert run.read_info()["status"] == "failed"
    assert run.epochs() == epochs_after
    assert snapshot(run_dir) == before  # every complete file as it was before the crashed write
    assert stale_temporaries(run_dir) == []
    if state_step_after is None:
        assert not (run.last_dir / "state.json").exists()
    else:
        assert assert_consistent(run_dir)["step"] == state_step_after

    summary = Trainer(cfg, run_dir, resume=True, progress=False).fit()
    assert summary["status"] == "completed" and summary["step"] == 16
    assert_equal_weights(expected, weights_of(run_dir))
    assert train_steps(run_dir) == list(range(2, 17, 2)) and val_epochs(run_dir) == [1, 2]


def test_rewriting_an_epoch_checkpoint_never_leaves_a_sidecar_vouching_for_other_weights(tmp_path, monkeypatch):
    from blipcore.model.blip import BLIP
    from tests.conftest import tiny_config

    cfg, run = tiny_config(), RunDir(tmp_path / "run")
    run.save_checkpoint(BLIP(cfg), cfg, epoch=1, step=8, metrics={})
    real_replace = os.replace

    def crash_on_sidecar(src, dst, *args, **kwargs):
        if Path(dst).name == "epoch_001.json":
            raise Crash("killed before the new sidecar")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_sidecar)
    torch.manual_seed(1)
    with pytest.raises(Crash):
        run.save_checkpoint(BLIP(cfg), cfg, epoch=1, step=8, metrics={})  # other weights, same epoch
    assert run.checkpoints() == []  # weights replaced, the old sidecar gone: not a checkpoint
    with pytest.raises(CheckpointError, match=r"epoch_001\.json: checkpoint sidecar is missing"):
        run.load_model(1)


def test_stale_temporaries_left_by_a_kill_are_ignored_then_removed_on_resume(reference, tmp_path):
    cfg, source, expected = reference
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    run = RunDir(run_dir)
    state = json.loads((run.last_dir / "state.json").read_text())
    half = (run.last_dir / state["weights"]).read_bytes()[:1000]
    stale = [
        run.last_dir / f".{state['weights']}.a1b2c3d4.tmp",
        run.checkpoints_dir / ".epoch_003.safetensors.x_y_z_12.tmp",
        run.checkpoints_dir / ".epoch_003.json.qwertyui.tmp",
        run.path / ".run.json.zzzzzzzz.tmp",
        run.eval_dir / ".epoch_003.json.00000000.tmp",
    ]
    for path in stale:
        path.write_bytes(half)
    kept = [run.path / "notes.tmp", run.checkpoints_dir / ".keep", run.path / ".run.json.short.tmp"]
    for path in kept:
        path.write_text("not ours")
    assert sorted(stale_temporaries(run_dir)) == sorted(stale)
    assert run.epochs() == [1, 2] and assert_consistent(run_dir)

    summary = Trainer(cfg, run_dir, resume=True, progress=False).fit()  # completed: nothing left to train
    assert summary["status"] == "completed"
    assert stale_temporaries(run_dir) == [] and all(p.exists() for p in kept)
    assert_equal_weights(expected, weights_of(run_dir))


def test_a_fresh_start_killed_while_writing_run_json_can_start_again(reference, tmp_path):
    cfg, _, _ = reference
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".run.json.k9k9k9k9.tmp").write_text('{"format_ver')
    with pytest.raises(RunError, match="nothing to resume"):
        Trainer(cfg, run_dir, resume=True, progress=False).fit()
    (run_dir / "mine.txt").write_text("a user's file")
    with pytest.raises(RunError, match="non-empty folder that is not a run"):
        Trainer(cfg.override({"train.max_steps": 1}), run_dir, progress=False).fit()
    (run_dir / "mine.txt").unlink()
    assert Trainer(cfg.override({"train.max_steps": 1}), run_dir, progress=False).fit()["step"] == 1
    assert stale_temporaries(run_dir) == []


# --- disk full, unwritable folders -------------------------------------------------------------
def no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stays_full", [False, True])
def test_disk_full_fails_clearly_and_keeps_earlier_checkpoints(shapes_root, tmp_path, monkeypatch, capsys, stays_full):
    cfg = crash_cfg(shapes_root, batch_size=16)  # 4 steps an epoch
    preset, run_dir = write_preset(tmp_path, cfg), tmp_path / "run"
    real_fsync, before, full = os.fsync, {}, {"now": False}

    def fsync(fd: int) -> None:  # the disk fills up while the epoch-2 checkpoint is written
        if full["now"] and stays_full:
            no_space(fd)
        if "epoch_002.safetensors" in os.readlink(f"/proc/self/fd/{fd}") and not full["now"]:
            full["now"] = True
            before.update(snapshot(run_dir))
            no_space(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["fit", "--preset", str(preset), "--run-dir", str(run_dir), "--no-progress"])
    monkeypatch.setattr(os, "fsync", real_fsync)

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "epoch_002.safetensors: cannot be written (No space left on device)" in err
    run = RunDir(run_dir)
    info = run.read_info()
    if stays_full:
        assert info["status"] == "running"  # run.json could not be written either; it still parses
    else:
        assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert run.epochs() == [1] and snapshot(run_dir) == before and assert_consistent(run_dir)["step"] == 7
    assert stale_temporaries(run_dir) == []

    assert main(["fit", "--run-dir", str(run_dir), "--resume", "--no-progress"]) == 0  # space again
    assert run.read_info()["status"] == "completed" and run.epochs() == [1, 2]


@pytest.mark.parametrize("where", ["file.txt/run", "file.txt"])
def test_an_unwritable_run_folder_fails_before_training(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file.txt").write_text("a regular file")

    def no_training(self):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "_build", no_training)
    assert main(["fit", "--preset", "demo", "--run-dir", str(tmp_path / where), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / where) in err
    assert "cannot write the run folder (Not a directory)" in err or "is not a folder" in err
    assert (tmp_path / "file.txt").read_text() == "a regular file"


# --- damaged or hostile checkpoints/last -------------------------------------------------------
@pytest.fixture
def resumable(reference, tmp_path) -> Path:
    """A copy of the reference run, to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    return run_dir


def edit_state(run_dir: Path, **fields) -> None:
    path = run_dir / "checkpoints/last/state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def resume_cli(run_dir: Path, capsys) -> str:
    assert main(["fit", "--run-dir", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_corrupted_last_state_stops_resume_with_a_clear_message(resumable, capsys):
    last = resumable / "checkpoints/last"
    state = json.loads((last / "state.json").read_text())
    weights_file = last / state["weights"]
    good = weights_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(flipped))
    err = resume_cli(resumable, capsys)
    assert state["weights"] in err and "sha256 does not match" in err

    weights_file.unlink()
    assert "weights file is missing" in resume_cli(resumable, capsys)

    weights_file.write_bytes(good)
    optimizer_file = last / state["optimizer"]
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-100])
    err = resume_cli(resumable, capsys)
    assert state["optimizer"] in err and "sha256 does not match state.json" in err


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weights_sha256": None}, "no valid sha256 recorded"),
        ({"optimizer_sha256": "0" * 64}, "sha256 does not match state.json"),
        ({"weights": "../../run.json"}, "damaged"),
        ({"step": "seven"}, "damaged"),
        ({"batch_in_epoch": None}, "damaged"),
    ],
)
def test_a_damaged_state_json_stops_resume_with_a_clear_message(resumable, capsys, fields, message):
    edit_state(resumable, **fields)
    err = resume_cli(resumable, capsys)
    assert "state.json" in err or "checkpoints/last" in err
    assert message in err


def test_state_json_that_is_not_json_stops_resume(resumable, capsys):
    (resumable / "checkpoints/last/state.json").write_bytes(b'{"step": 16, "wei')
    assert "resumable state is not valid JSON" in resume_cli(resumable, capsys)


class Payload:
    """Unpickling this creates `marker`: what a booby-trapped optimizer file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_an_optimizer_file_that_would_run_code_is_refused(resumable, tmp_path, capsys, container):
    proof = tmp_path / "the-payload-is-live"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()  # unpickled by an ordinary loader, it runs

    marker = tmp_path / "code-was-executed"
    trap = {"optimizer": Payload(marker), "torch_rng": torch.get_rng_state()}
    if container == "torch.save":
        data = rundir.encode_torch_state(trap)
    else:
        data = pickle.dumps(trap)
    last = resumable / "checkpoints/last"
    state = json.loads((last / "state.json").read_text())
    (last / state["optimizer"]).write_bytes(data)
    edit_state(resumable, optimizer_sha256=rundir.sha256_bytes(data))  # the sha check passes

    err = resume_cli(resumable, capsys)
    assert state["optimizer"] in err and "cannot be read" in err
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        rundir.load_torch_state(last / state["optimizer"])
    assert not marker.exists()


def test_a_second_resume_of_a_failed_resume_still_works(resumable, reference):
    """A resume refused for a damaged file changes nothing: once the file is back, it resumes."""
    last = resumable / "checkpoints/last"
    state = json.loads((last / "state.json").read_text())
    good = (last / state["optimizer"]).read_bytes()
    (last / state["optimizer"]).write_bytes(good[:10])
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        Trainer(reference[0], resumable, resume=True, progress=False).fit()
    (last / state["optimizer"]).write_bytes(good)
    assert Trainer(reference[0], resumable, resume=True, progress=False).fit()["status"] == "completed"
    assert re.fullmatch(r"model-step00000016-[0-9a-f]{12}\.safetensors", state["weights"])
