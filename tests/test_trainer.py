"""The trainer and the run directory it writes: completeness, exact resume, DDP equivalence, NaN
handling and overwrite protection, on a tiny model and a tiny generated dataset."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blipcore.model import losses
from blipcore.model.blip import BLIP
from blipcore.model.config import BlipConfig
from blipcore.runs.rundir import RunDir, RunError
from blipcore.training import environment, trainer
from blipcore.training.trainer import NonFiniteLossError, Trainer, build_optimizer, parameter_groups
from tests.conftest import REPO_ROOT, photos_cfg, small_cfg, tiny_config


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _ = RunDir(run_dir).load_model()
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=name)


def test_fit_writes_a_complete_run_directory(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, eval_strategies=["greedy"])
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = RunDir(tmp_path / "run")
    info = run.read_info()
    assert summary["status"] == "completed" and info["status"] == "completed" and info["error"] is None
    assert info["config"] == cfg.to_dict() and info["versions"]["torch"] == torch.__version__
    assert {"git_revision", "device", "created_at", "updated_at", "best", "train_seconds"} <= set(info)
    assert run.epochs() == [1, 2]
    meta = json.loads((run.checkpoints_dir / "epoch_002.json").read_text())
    assert meta["step"] == 16 and meta["epoch"] == 2 and len(meta["sha256"]) == 64 and "val_loss" in meta["metrics"]
    lines = run.read_metrics()
    train_lines = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(2, 17, 2))
    for key in ("loss", "itc", "lm", "lr", "temperature", "grad_norm", "samples_per_s", "epoch"):
        assert all(np.isfinite(r[key]) for r in train_lines), key
    val_lines = [r for r in lines if r["split"] == "val"]
    assert [r["epoch"] for r in val_lines] == [1, 2] and "i2t_r1" in val_lines[0] and "greedy_cider" in val_lines[0]
    emb = run.load_embeddings(2)
    assert emb["image_embeds"].shape == emb["text_embeds"].shape == (8, 32)
    assert len(emb["captions"]) == len(emb["file_paths"]) == len(emb["image_ids"]) == 8
    evaluation = run.load_eval(2)
    assert evaluation["strategies"]["greedy"]["samples"] and "cider" in evaluation["strategies"]["greedy"]["metrics"]
    assert "caption" in evaluation["reference_rows"]["most-frequent"]
    assert evaluation["retrieval"]["i2t_r10"] >= evaluation["retrieval"]["i2t_r1"]
    state = json.loads((run.last_dir / "state.json").read_text())
    assert state["step"] == 16 and (run.last_dir / state["weights"]).is_file()
    model, loaded_cfg, ckpt = run.load_model(1)
    assert ckpt.epoch == 1 and loaded_cfg.model == cfg.model and not model.training


@pytest.mark.parametrize("data", ["shapes, no workers", "shapes, captions vocabulary", "photos, 2 workers"])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(shapes_root, tmp_path, monkeypatch, data):
    # Photos with workers: every sample's random crop must not depend on which worker made it, nor on how
    # far that worker's random stream had advanced before the interruption.
    # A captions vocabulary: the resuming config has not counted its word pieces (a study's planned config
    # never has); the run's own record says how many its weights hold.
    cfg = small_cfg(shapes_root) if data.startswith("shapes") else photos_cfg(shapes_root).override(
        {"data.num_workers": 2})
    if data.endswith("captions vocabulary"):
        cfg = cfg.override({"model.vocabulary": "captions"})
    Trainer(cfg, tmp_path / "straight", progress=False).fit()

    original = Trainer._optimizer_step

    def stop_after_five(self, micro):
        result = original(self, micro)
        if self.step + 1 >= 5:  # self.step is incremented after this returns
            self.stop_requested = True
            self.started -= 1000  # as if these five steps had taken 1,000 s: the resumed run's minutes count them
        return result

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_after_five)
    summary = Trainer(cfg, tmp_path / "resumed", progress=False).fit()
    assert summary["status"] == "interrupted" and summary["step"] == 5
    assert RunDir(tmp_path / "resumed").read_info()["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    summary = Trainer(cfg, tmp_path / "resumed", resume=True, progress=False).fit()
    assert summary["status"] == "completed" and summary["step"] == 16 and summary["train_seconds"] > 1000
    (resumed,) = RunDir(tmp_path / "resumed").read_info()["resumes"]  # the code and machine that continued it
    assert resumed["step"] == 5 and resumed["git_revision"] == trainer.git_revision() and resumed["device"]["name"]

    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    counted = RunDir(tmp_path / "straight").config().model.vocab_size
    assert RunDir(tmp_path / "resumed").config().model.vocab_size == counted
    steps = [r["step"] for r in RunDir(tmp_path / "resumed").read_metrics() if r["split"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


def test_a_training_sample_is_the_same_tensor_in_any_worker(shapes_root):
    from blipcore.data import build_datasets

    train = build_datasets(photos_cfg(shapes_root), splits=("train",))["train"]
    train.set_epoch(1)
    first = train[3]["image"]
    torch.manual_seed(123)  # another process state: a worker that has already drawn other numbers
    torch.rand(1000)
    assert torch.equal(train[3]["image"], first)
    train.set_epoch(2)
    assert not torch.equal(train[3]["image"], first), "each epoch draws a new crop"


def test_best_metrics_follow_each_metrics_declared_direction(shapes_root, tmp_path):
    fitter = Trainer(small_cfg(shapes_root), tmp_path / "run", progress=False)
    fitter.run.write_info({"status": "running"})
    fitter.step = 0
    for epoch, (share, run_length, cider, loss, length) in enumerate(
        [(0.9, 8.0, 0.1, 3.0, 5.0), (0.2, 1.0, 0.3, 2.0, 9.0), (0.95, 12.0, 0.05, 4.0, 2.0)], start=1
    ):
        fitter.epoch = epoch
        fitter._update_best({"greedy_top_caption_share": share, "greedy_longest_run": run_length,
                              "greedy_cider": cider, "val_loss": loss, "greedy_mean_length": length,
                              "greedy_top_caption": "a a a"}, epoch)
    best = fitter.run.read_info()["best"]
    # the most collapsed epoch (3) is never "best": lower is better for collapse, higher for CIDEr
    assert best["greedy_top_caption_share"] == {"value": 0.2, "epoch": 2}
    assert best["greedy_longest_run"] == {"value": 1.0, "epoch": 2}
    assert best["greedy_cider"] == {"value": 0.3, "epoch": 2} and best["val_loss"] == {"value": 2.0, "epoch": 2}
    assert "greedy_mean_length" not in best and "greedy_top_caption" not in best  # no better direction


def test_a_step_budget_ending_inside_an_epoch_ends_with_its_weights_saved_and_evaluated(shapes_root, tmp_path):
    from train.cli import main

    cfg = small_cfg(shapes_root, max_steps=5, eval_strategies=["greedy"])  # 8 steps an epoch
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = RunDir(tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 5
    ckpt = run.checkpoint()
    assert ckpt.epoch == 1 and ckpt.step == 5 and ckpt.meta["epoch_progress"] == pytest.approx(5 / 8)
    assert run.load_eval(1)["step"] == 5 and run.embedding_epochs() == [1]
    val = [r for r in run.read_metrics() if r["split"] == "val"]
    assert [(r["step"], r["epoch"]) for r in val] == [(5, pytest.approx(5 / 8))]
    assert run.read_info()["best"]["greedy_cider"]["epoch"] == 1
    assert main(["eval", "--run-dir", str(run.path), "--strategies", "greedy", "--no-meteor"]) == 0

    # a larger budget resumes it: the partial epoch's checkpoint is replaced by the complete one
    summary = Trainer(cfg.override({"train.max_steps": 12}), run.path, resume=True, progress=False).fit()
    assert summary["step"] == 12 and run.epochs() == [1, 2]
    assert run.checkpoint(1).step == 8 and run.checkpoint(1).meta["epoch_progress"] == 1.0
    assert run.checkpoint(2).step == 12 and run.checkpoint(2).meta["epoch_progress"] == pytest.approx(1.5)


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(shapes_root, tmp_path, monkeypatch):
    cfg = small_cfg(shapes_root)
    calls = {"n": 0}
    original = losses.lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] == 11 else value  # step 11 is in epoch 2

    monkeypatch.setattr(losses, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the lm loss is not finite"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = RunDir(tmp_path / "run")
    info = run.read_info()
    assert info["status"] == "failed" and "lm loss is not finite" in info["error"]
    assert run.epochs() == [1]
    model, _, _ = run.load_model(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_finished_run_is_never_overwritten_silently(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, epochs=1)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    before = (tmp_path / "run" / "checkpoints" / "epoch_001.safetensors").read_bytes()
    with pytest.raises(RunError, match="already holds a completed run"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert (tmp_path / "run" / "checkpoints" / "epoch_001.safetensors").read_bytes() == before
    Trainer(cfg, tmp_path / "run", overwrite=True, progress=False).fit()
    assert RunDir(tmp_path / "run").read_info()["status"] == "completed"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a run"):
        Trainer(cfg, tmp_path / "other", progress=False).fit()
    with pytest.raises(RunError, match="nothing to resume"):
        Trainer(cfg, tmp_path / "fresh", resume=True, progress=False).fit()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, ints and floats are written the same way in TOML


def write_preset(cfg: BlipConfig, path: Path) -> Path:
    """A preset file for `python -m train fit --preset PATH` holding every field of `cfg`."""
    lines = ['base = "demo"']
    for section, fields in cfg.to_dict().items():
        if isinstance(fields, dict):
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_process_ddp_equals_single_process_on_the_same_global_batch(shapes_root, tmp_path):
    single = small_cfg(shapes_root, epochs=1, batch_size=8)
    Trainer(single, tmp_path / "single", progress=False).fit()
    preset = write_preset(single.override({"train.batch_size": 4}), tmp_path / "per_rank.toml")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "train", "fit", "--preset", str(preset), "--run-dir", str(tmp_path / "ddp"), "--no-progress"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary_lines = [line for line in out.stdout.splitlines() if line.startswith("completed:")]
    assert len(summary_lines) == 1 and "8 steps" in summary_lines[0], out.stdout  # the other rank prints none
    info = RunDir(tmp_path / "ddp").read_info()
    assert info["status"] == "completed" and info["world_size"] == 2
    assert_same_weights(final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp"), atol=2e-5)


def test_learning_rate_warms_up_then_decays_by_cosine():
    from blipcore.training.trainer import learning_rate

    lrs = [learning_rate(s, total_steps=100, base_lr=1.0, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] >= 0.1


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature():
    from blipcore import BLIP
    from blipcore.training.trainer import parameter_groups

    model = BLIP(tiny_config())
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"temp", "word_embeddings.weight", "visual_encoder.cls_token", "visual_encoder.pos_embed",
            "visual_encoder.norm.weight", "visual_encoder.patch_embed.bias"} <= no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_the_optimizer_is_fused_adamw_with_the_reference_update():
    """build_optimizer's fused AdamW (chosen where torch has the kernel: the CPU here) makes the same updates as
    torch's default per-tensor AdamW over the same parameter groups."""
    cfg = tiny_config()
    fused_model = BLIP(cfg.model)
    reference_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, cfg.train)
    reference = torch.optim.AdamW(parameter_groups(reference_model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), foreach=False)
    assert fused.defaults["fused"] and [len(g["params"]) for g in fused.param_groups] == [
        len(g["params"]) for g in reference.param_groups]
    initial = [p.detach().clone() for p in fused_model.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), reference_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for a, b in zip(fused_model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(fused_model.parameters(), initial, strict=True))


def test_gradient_accumulation_counts_optimizer_steps(shapes_root, tmp_path):
    summary = Trainer(small_cfg(shapes_root, epochs=1, batch_size=4, grad_accum_steps=2), tmp_path / "run",
                      progress=False).fit()
    assert summary["step"] == 8  # 64 images / batch 4 = 16 batches = 8 optimizer steps
    assert RunDir(tmp_path / "run").read_info()["steps_per_epoch"] == 8


def test_precision_auto_follows_the_bf16_speedup_measured_on_this_machine(monkeypatch):
    from blipcore import speed

    cpu = torch.device("cpu")
    monkeypatch.setattr(speed, "bf16_speedup", lambda device_type="cpu": 4.0)  # AMX-class: bf16 wins
    assert speed.autocast_dtype(cpu, "auto") == torch.bfloat16 and speed.autocast_dtype(cpu, "fp32") is None
    monkeypatch.setattr(speed, "bf16_speedup", lambda device_type="cpu": 0.01)  # emulated bf16: 100x slower
    assert speed.autocast_dtype(cpu, "auto") is None and speed.autocast_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        speed.autocast_dtype(cpu, "fp16")
    monkeypatch.undo()
    monkeypatch.delenv(speed.BF16_ENV)
    assert speed.bf16_speedup.__wrapped__() > 0  # the probe itself (the cached one reads the tests' setting)
    monkeypatch.setenv(speed.BF16_ENV, "1")
    assert speed.bf16_speedup.__wrapped__() >= speed.BF16_MIN_SPEEDUP


def test_runs_record_the_revision_of_the_code_the_process_imported(monkeypatch):
    """A checkout moved under a long study process must not stamp its later runs with code they never ran."""
    imported = trainer.git_revision()
    assert imported == environment._checkout_revision()  # nothing moved yet
    fake = subprocess.CompletedProcess(["git"], 0, stdout="f" * 40 + "\n", stderr="")
    monkeypatch.setattr(environment.subprocess, "run", lambda *args, **kwargs: fake)  # the checkout moves on
    assert environment._checkout_revision() == "f" * 40
    info = trainer.environment_info(torch.device("cpu"))
    assert trainer.git_revision() == imported and info["git_revision"] == imported


def test_the_benchmarks_stopwatch_times_the_call_it_is_given():
    import time

    from blipcore import speed

    calls = []
    seconds = speed.seconds_of(lambda: (calls.append(1), time.sleep(0.05)), torch.device("cpu"))
    assert calls == [1] and 0.05 <= seconds < 1.0


def test_bf16_autocast_trains_on_a_cpu_and_says_so_in_run_json(shapes_root, tmp_path):
    summary = Trainer(small_cfg(shapes_root, epochs=1, precision="bf16"), tmp_path / "run", progress=False).fit()
    run = RunDir(tmp_path / "run")
    assert summary["status"] == "completed" and run.read_info()["autocast"] == "bf16"
    assert all(np.isfinite(r["loss"]) for r in run.read_metrics() if r["split"] == "train")
    model, _, _ = run.load_model(1)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_cuda_without_a_gpu_is_a_clear_error(shapes_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA device"):
        Trainer(small_cfg(shapes_root, device="cuda"), tmp_path / "run", progress=False).fit()


def test_evaluation_every_n_steps_makes_early_collapse_visible(shapes_root, tmp_path):
    Trainer(small_cfg(shapes_root, epochs=1, eval_every_steps=3, eval_strategies=["greedy"]), tmp_path / "run",
            progress=False).fit()
    run = RunDir(tmp_path / "run")
    val_steps = [r["step"] for r in run.read_metrics() if r["split"] == "val"]
    assert val_steps == [3, 6, 8]  # every 3 steps inside the epoch, then the epoch end
    step_eval = json.loads((run.eval_dir / "step_00000003.json").read_text())
    assert step_eval["step"] == 3 and "greedy" in step_eval["strategies"]
    assert "top_caption_share" in step_eval["strategies"]["greedy"]["metrics"]


def test_run_json_names_the_machine_a_runs_minutes_are_read_against(tiny_runs_dir):
    from blipcore.runs.rundir import RunDir
    from blipcore.speed import cpu_model, matmul_gflops

    device = RunDir(tiny_runs_dir / "tiny").read_info()["device"]
    assert device["cpu_model"] == cpu_model() and device["cpu_model"]
    assert device["matmul_fp32_gflops"] == round(matmul_gflops("cpu"), 1) > 0  # measured once per process
    assert RunDir(tiny_runs_dir / "tiny").read_info()["data_workers"] == 0


def test_measuring_the_machine_leaves_the_random_stream_alone():
    from blipcore.speed import matmul_gflops

    matmul_gflops.cache_clear()
    torch.manual_seed(0)
    matmul_gflops("cpu", size=64)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
