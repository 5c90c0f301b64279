"""Hostile run folders, as the dashboard and `python -m train` read them through RunDir: damaged or
mismatched checkpoints, escaping run names, symlinks, and metrics / run.json / embeddings / eval files
that are truncated, not UTF-8, not what they claim, or pickles. Each gives the documented
skip-the-line behaviour or a RunError / CheckpointError naming the file — never another exception,
never code executed. No training here: runs are built with RunDir's own writers."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blipcore.model.blip import BLIP
from blipcore.runs.rundir import FORMAT_VERSION, CheckpointError, RunDir, RunError, list_runs, resolve_run_dir
from tests.conftest import tiny_config

HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = tiny_config()
    return cfg, BLIP(cfg)


@pytest.fixture
def run(tmp_path, tiny_model) -> RunDir:
    """A run folder with run.json, two epoch checkpoints, embeddings and an evaluation of epoch 1."""
    cfg, model = tiny_model
    run = RunDir(tmp_path / "run")
    run.write_info({"name": "run", "status": "completed", "config": cfg.to_dict()})
    for epoch in (1, 2):
        run.save_checkpoint(model, cfg, epoch=epoch, step=8 * epoch, metrics={"val_loss": 1.0 / epoch})
    run.save_embeddings(1, {"image_embeds": np.ones((4, 8), np.float32), "image_ids": np.arange(4),
                            "captions": np.array(["a red circle", "two squares", "x", "y"])})
    run.save_eval(1, {"strategies": {}})
    return run


# --- checkpoints -------------------------------------------------------------------------------
def truncate(run: RunDir) -> None:
    weights, _ = run.checkpoint_paths(1)
    weights.write_bytes(weights.read_bytes()[:-4096])


def flip_a_byte(run: RunDir) -> None:
    weights, _ = run.checkpoint_paths(1)
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x01
    weights.write_bytes(bytes(data))


def edit_sidecar(run: RunDir, **fields) -> None:
    _, sidecar = run.checkpoint_paths(1)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **fields}))


def garbage_with_matching_sha(run: RunDir) -> None:
    import hashlib

    weights, _ = run.checkpoint_paths(1)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\xff" * 100)
    edit_sidecar(run, sha256=hashlib.sha256(weights.read_bytes()).hexdigest())


def larger_model_config(run: RunDir) -> None:
    cfg = tiny_config(vision_width=128, text_width=128)
    edit_sidecar(run, config=cfg.to_dict())


def missing_weights(run: RunDir) -> None:
    run.checkpoint_paths(1)[0].unlink()


def sidecar_not_json(run: RunDir) -> None:
    run.checkpoint_paths(1)[1].write_bytes(b'{"epoch": 1, "sha256": "ab')


def sidecar_not_utf8(run: RunDir) -> None:
    run.checkpoint_paths(1)[1].write_bytes(b'{"epoch": "\xff\xfe"}')


@pytest.mark.parametrize(
    ("damage", "problem", "listed"),
    [
        (truncate, "sha256 does not match", True),
        (flip_a_byte, "sha256 does not match", True),
        (garbage_with_matching_sha, "not a readable safetensors file", True),
        (larger_model_config, "made for a different model configuration", True),
        (lambda run: edit_sidecar(run, sha256=None), "no valid sha256 recorded", True),
        (lambda run: edit_sidecar(run, config=[1, 2]), "config should be a JSON object", True),
        (lambda run: edit_sidecar(run, config={"model": {"vision_heads": 0}}), "config is not usable", True),
        (missing_weights, "weights file is missing", False),
        (sidecar_not_json, "checkpoint sidecar is not valid JSON", False),
        (sidecar_not_utf8, "checkpoint sidecar is not valid JSON", False),
        (lambda run: edit_sidecar(run, step="eight"), "step should be a number", False),
        (lambda run: run.checkpoint_paths(1)[1].write_text("[1, 2]"), "should be a JSON object", False),
    ],
)
def test_a_damaged_checkpoint_is_a_clear_checkpoint_error(run, damage, problem, listed):
    damage(run)
    assert run.epochs() == ([1, 2] if listed else [2])  # a sidecar without usable weights is not listed
    with pytest.raises(CheckpointError, match=problem) as caught:
        run.load_model(1)
    assert "epoch_001." in str(caught.value)  # the message names the file
    model, _, ckpt = run.load_model()  # the other checkpoint is untouched and still the newest
    assert ckpt.epoch == 2 and not model.training


def test_a_sidecar_config_asking_for_a_huge_model_is_refused_before_memory_is_spent(run, monkeypatch):
    # ~200 billion parameters: built for real, this would take the machine down instead of raising
    edit_sidecar(run, config=tiny_config(vision_width=16384, vision_depth=64, text_width=16384).to_dict())
    devices = []
    build = BLIP.__init__

    def recording_build(model, cfg):
        devices.append(torch.get_default_device().type)
        build(model, cfg)

    monkeypatch.setattr(BLIP, "__init__", recording_build)
    with pytest.raises(CheckpointError, match="epoch_001.safetensors: made for a different model configuration"):
        run.load_model(1)
    assert devices == ["meta"]  # only the shape skeleton was built
    devices.clear()
    assert run.load_model(2)[2].epoch == 2 and devices == ["meta", "cpu"]


def test_weights_without_a_sidecar_are_not_a_checkpoint(run):
    run.checkpoint_paths(2)[1].unlink()  # as after a crash between the weights and the sidecar
    assert run.epochs() == [1]
    assert run.load_model()[2].epoch == 1
    with pytest.raises(CheckpointError, match=r"epoch_002\.json: checkpoint sidecar is missing"):
        run.load_model(2)
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 7; available: 1"):
        run.load_model(7)



def test_a_folder_without_checkpoints_says_why(tmp_path, run):
    """A missing folder, a folder that is not a run and a run before its first epoch each get their own reason."""
    for path, reason in [(tmp_path / "absent", "no such run folder"), (tmp_path, r"not a run folder \(no run.json\)")]:
        with pytest.raises(CheckpointError, match=reason):
            RunDir(path).load_model()
    for epoch in run.epochs():
        run.checkpoint_paths(epoch)[1].unlink()
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        run.load_model()

# --- names and listing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../x", "a/b", "", ".", "..", "/abs", "x\x00y", "x\n", ".hidden", "a\\b", " x", "a" * 129, "..."]
)
def test_run_names_that_could_escape_or_hide_are_refused(tmp_path, name):
    with pytest.raises(RunError, match="run name"):
        resolve_run_dir(tmp_path, name)


@pytest.mark.parametrize("name", ["demo", "run-2024.06_07", "A" * 128])
def test_ordinary_run_names_stay_inside_the_runs_folder(tmp_path, name):
    assert resolve_run_dir(tmp_path, name).path == tmp_path / name


def test_list_runs_ignores_symlinks_files_and_folders_that_are_not_runs(run, tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "real").mkdir()
    (runs_dir / "real" / "run.json").write_bytes(run.run_json.read_bytes())
    (runs_dir / "linked").symlink_to(run.path, target_is_directory=True)
    (runs_dir / "file-run").write_text("{}")
    (runs_dir / "file-link").symlink_to(run.run_json)
    (runs_dir / "empty").mkdir()
    (runs_dir / "json-folder" / "run.json").mkdir(parents=True)
    assert [r.name for r in list_runs(runs_dir)] == ["real"]
    assert list_runs(tmp_path / "nowhere") == [] and list_runs(run.run_json) == []


# --- metrics.jsonl -----------------------------------------------------------------------------
def test_metrics_keep_every_whole_object_line_and_skip_the_rest(run):
    good = [{"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "val", "loss": None},
            {"step": 3, "loss": float("nan")}, {"step": 4, "note": "ünïcode ✓"}]
    lines = [json.dumps(good[0]).encode(), b"", b"[1, 2, 3]", b"42", b'"a string"', b"null", b"true",
             json.dumps(good[1]).encode() + b"\r", b"\xff\xfe\x00 not utf-8", b'{"step": 2.5, "lo\xe9": 1}',
             b"{" * 50_000 + b"}" * 50_000, b"[" * 100_000, b'{"big": ' + b"9" * 5000 + b"}",
             json.dumps(good[2]).encode(), b'{"huge": "' + b"x" * 5_000_000 + b'"', json.dumps(good[3]).encode(),
             b'{"step": 5, "partial": "last li']
    run.metrics_file.write_bytes(b"\n".join(lines))
    records = run.read_metrics()
    assert all(isinstance(r, dict) for r in records)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["note"] == "ünïcode ✓"


def test_metrics_that_are_missing_or_a_folder_read_as_none_yet(run):
    assert run.read_metrics() == []
    run.metrics_file.mkdir()
    assert run.read_metrics() == []


def test_truncating_metrics_on_resume_survives_hostile_steps(run):
    lines = [{"step": 1}, {"step": "abc"}, {"step": None}, {"step": [3]}, {"step": True}, {"step": 2.0},
             {"no_step": 1}, {"step": 9}]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "trunc')
    run.truncate_metrics(after_step=5)
    assert run.read_metrics() == [{"step": 1}, {"step": 2.0}]


@HOSTILE
@given(data=st.binary(max_size=2048))
def test_any_bytes_as_metrics_never_raise_and_give_only_dicts(run, data):
    run.metrics_file.write_bytes(data)
    assert all(isinstance(r, dict) for r in run.read_metrics())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
metric_lines = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                         st.text(max_size=64).map(str.encode))


@HOSTILE
@given(lines=st.lists(metric_lines, max_size=20), cut=st.integers(min_value=0, max_value=64))
def test_any_lines_as_metrics_give_exactly_the_whole_object_lines(run, lines, cut):
    data = b"\n".join(lines)
    data = data[: len(data) - cut] if cut else data  # a writer interrupted mid-line
    run.metrics_file.write_bytes(data)
    records = run.read_metrics()
    assert all(isinstance(r, dict) for r in records)
    assert len(records) <= len(lines)
    run.truncate_metrics(after_step=10)  # what a resume does to the same file
    assert all(isinstance(r["step"], (int, float)) and r["step"] <= 10 for r in run.read_metrics())


# --- run.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (json.dumps({"format_version": 99, "config": {}}).encode(), "format version 99"),
        (json.dumps({"config": {}}).encode(), "format version None"),
        (json.dumps({"format_version": "1"}).encode(), "format version '1'"),
        (b'{"format_version": 1, "name": "\xff\xfe"}', "not valid JSON"),
        (b"[1, 2, 3]", "should be a JSON object, found list"),
        (b'"just a string"', "should be a JSON object, found str"),
        (b"", "not valid JSON"),
        (b'{"format_version": 1, "sta', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"format_version": ' + b"1" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_a_hostile_run_json_is_a_clear_run_error(run, content, problem):
    run.run_json.write_bytes(content)
    for read in (run.read_info, run.config):
        with pytest.raises(RunError, match=problem) as caught:
            read()
        assert str(run.run_json) in str(caught.value)


@pytest.mark.parametrize(
    "config",
    [None, [1], "demo", {"model": [1]}, {"model": {"vision_heads": 0}}, {"model": {"vision_width": "wide"}},
     {"train": {"epochs": 1, "bogus": 2}}, {"lab": {}}, {"model": {"image_size": {"a": 1}}},
     {"model": {"image_size": 64.5}}, {"model": {"momentum_encoder": "yes"}}, {"train": {"lr": -1}},
     {"train": {"eval_strategies": "greedy"}}, {"train": {"betas": [0.9]}}, {"data": {"eval_images": -1}}],
)
def test_a_run_json_with_an_unusable_config_is_a_clear_run_error(run, config):
    run.run_json.write_text(json.dumps({"format_version": FORMAT_VERSION, "config": config}))
    assert run.read_info()["config"] == config
    with pytest.raises(RunError, match="config"):
        run.config()


def test_a_run_json_that_is_a_folder_is_a_clear_run_error(tmp_path):
    (tmp_path / "run" / "run.json").mkdir(parents=True)
    with pytest.raises(RunError, match="cannot read the run description"):
        RunDir(tmp_path / "run").read_info()


@HOSTILE
@given(data=st.binary(max_size=1024))
def test_any_bytes_as_run_json_give_only_run_errors(run, data):
    run.run_json.write_bytes(data)
    with pytest.raises(RunError):
        run.read_info()


@HOSTILE
@given(config=json_values, version=st.sampled_from([FORMAT_VERSION, 0, None, "1"]))
def test_any_json_as_run_json_gives_a_config_or_a_run_error(run, config, version):
    run.run_json.write_text(json.dumps({"format_version": version, "config": config}))
    try:
        run.config()
    except RunError:
        pass


# --- embeddings --------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_embeddings_that_are_truncated_damaged_or_not_npz_are_clear_run_errors(run):
    path = run.embeddings_path(1)
    assert set(run.load_embeddings(1)) == {"image_embeds", "image_ids", "captions"}
    good = path.read_bytes()
    npy = io.BytesIO()
    np.save(npy, np.ones(3))
    first = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    name_len, extra_len = int.from_bytes(good[26:28], "little"), int.from_bytes(good[28:30], "little")
    flipped = bytearray(good)
    flipped[first.header_offset + 30 + name_len + extra_len + first.compress_size // 2] ^= 0xFF  # compressed data
    for damaged in [good[: len(good) // 2], good[:40], bytes(flipped), b"", b"not an archive at all",
                    npy.getvalue(), zip_bytes({"notes.txt": b"hello"}), zip_bytes({"x.npy": b"\x93NUMPY garbage"})]:
        path.write_bytes(damaged)
        with pytest.raises(RunError, match="cannot be read") as caught:
            run.load_embeddings(1)
        assert str(path) in str(caught.value)
    with pytest.raises(RunError, match="no embeddings for epoch 3"):
        run.load_embeddings(3)


def test_an_embeddings_file_with_an_object_array_is_refused_and_never_unpickled(run, tmp_path):
    marker = tmp_path / "code-was-executed"
    data = npz_bytes(image_embeds=np.ones((2, 2)), captions=np.array([Payload(marker), "x"], dtype=object))
    run.embeddings_path(1).write_bytes(data)
    with pytest.raises(RunError, match="allow_pickle"):
        run.load_embeddings(1)
    assert not marker.exists()
    with np.load(io.BytesIO(data), allow_pickle=True) as unsafe:  # the payload is live
        unsafe["captions"]
    assert marker.exists()


@HOSTILE
@given(data=st.binary(max_size=512), as_zip=st.booleans())
def test_any_bytes_as_embeddings_give_only_run_errors(run, data, as_zip):
    run.embeddings_path(1).write_bytes(b"PK\x03\x04" + data if as_zip else data)
    with pytest.raises(RunError):
        run.load_embeddings(1)


# --- evaluation files and sidecars -------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage", b"[]", b'{"strategies": ', b"\xff" * 10])
def test_a_garbage_eval_file_is_a_clear_run_error(run, content):
    run.eval_path(1).write_bytes(content)
    with pytest.raises(RunError, match="evaluation of epoch 1") as caught:
        run.load_eval(1)
    assert str(run.eval_path(1)) in str(caught.value)
    assert run.eval_epochs() == [1]


@HOSTILE
@given(data=st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_sidecar_are_skipped_or_a_checkpoint_error(run, data):
    run.checkpoint_paths(1)[1].write_bytes(data)
    assert run.epochs()[-1] == 2
    try:
        run.checkpoint(1)
    except CheckpointError:
        pass


def test_pickle_is_never_needed_to_read_a_run(run, monkeypatch):
    """Reading every file of a run works with pickle unusable: nothing in a run directory is unpickled."""

    def no_pickle(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    run.read_info(), run.config(), run.read_metrics(), run.load_eval(1), run.load_embeddings(1)
    run.load_model(1)
