"""benchmarks/device_calls.py rehearsed: every GPU call run on the CPU at a tiny size as a GPU runs it (two
training steps a run, one seed), and what they leave is what the speed report, the study's records and
`python -m train score` read. Also: the study a call trains, a job stopped at the call's budget, the GPU preset."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from blipcore import BlipConfig
from blipcore.experiments.study import load_plan
from blipcore.experiments.study.folders import planned_config
from blipcore.experiments.study.records import record_path
from blipcore.model.config import available_presets
from blipcore.model.flops import training_step_flops, unpadded_training_flops
from tests.conftest import REPO_ROOT
from tests.test_benchmarks import load_script

SCRIPT = REPO_ROOT / "benchmarks" / "device_calls.py"


@pytest.fixture(scope="module")
def calls() -> ModuleType:
    return load_script("device_calls", SCRIPT)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rehearsal")
    done = subprocess.run([sys.executable, str(SCRIPT), "rehearse", "--out", str(out), "--seeds", "0"],
                          capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def members(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


@pytest.mark.slow
def test_each_call_leaves_three_files(rehearsal: Path) -> None:
    files = sorted(path.name for path in rehearsal.iterdir() if path.is_file())
    calls = ("speed", "preset", "study")
    assert files == sorted(f"{call}.{kind}" for call in calls for kind in ("json", "log", "tar.gz"))


@pytest.mark.slow
def test_the_speed_call_reports_each_part(rehearsal: Path) -> None:
    report = json.loads((rehearsal / "speed.json").read_text())
    assert {job["job"]: job.get("exit_status") for job in report["jobs"]} == {"trainer": 0, "vit-b16": 0}
    # the trainer's real step, end to end from the image cache, at two batches; FLOPs of the unpadded captions
    end_to_end = report["end_to_end"]["trainer"]  # bench_vs_hf_blip.py's report, its trainer part
    rows = list(end_to_end["runs"].values())
    assert [row["batch_size"] for row in rows] == [4, 8] and end_to_end["steps"] == 2
    for row in rows:
        assert (row["loader"], row["steps_done"], row["exit_status"]) == ("cache", 2, 0)
        assert row["samples_per_s"] > 0
        assert row["steps_per_s"] == pytest.approx(row["samples_per_s"] / row["batch_size"])
        assert row["hardware_ratio"] > 0 and "spec_ratio" not in row
    # the head-to-head: ours against HF, the matmul reference, no spec peak on a CPU
    head = report["head_to_head"]
    assert head["machine"]["spec_peak"] is None and head["settings"]["parts"] == ["training"]
    full = head["presets"]["tiny"]["training"]["full_length"]
    assert full["ratio"] == pytest.approx(full["hf_lm"]["step_s"] / full["ours_lm"]["step_s"])


@pytest.mark.slow
def test_the_preset_call_trains_tests_and_times_the_gpu_preset(rehearsal: Path) -> None:
    report = json.loads((rehearsal / "preset.json").read_text())
    assert {job["job"]: job.get("exit_status") for job in report["jobs"]} == {"gpu-preset": 0, "gpu-preset-test": 0}
    gpu = report["gpu_preset"]
    assert gpu["fit_exit_status"] == 0 and gpu["test"]["epoch"] == 1 and gpu["test"]["exit_status"] == 0
    assert gpu["speed"]["samples_per_s"] > 0 and gpu["matmul_gflops"] > 0
    files = members(rehearsal / "preset.tar.gz")
    assert {"runs/gpu-preset/run.json", "runs/gpu-preset/metrics.jsonl", "runs/gpu-preset/eval/epoch_001.test.json",
            "captions/gpu-preset.epoch_001.test.greedy.json"} <= set(files)
    assert not any("checkpoints" in name for name in files)


@pytest.mark.slow
def test_the_study_call_writes_records_and_captions_that_score_here(
        rehearsal: Path, calls: ModuleType, tmp_path: Path) -> None:
    report = json.loads((rehearsal / "study.json").read_text())
    assert report["exit_status"] == 0 and report["choice"] == calls.choose_study() and report["seeds"] == [0]
    runs = [variant.replace("/", "-") + "-seed0" for variant in report["choice"]["only"]]
    with tarfile.open(rehearsal / "study.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    assert sorted(path.stem for path in (tmp_path / "records").glob("*.json")) == sorted(runs)
    for run in runs:
        record = json.loads((tmp_path / "records" / f"{run}.json").read_text())
        assert record["split"] == "test" and record["config"]["data"]["loader"] == "cache"
    captions = sorted((tmp_path / "captions").glob("*.json"))
    assert {path.name.split(".")[0] for path in captions} == set(runs)
    assert all(".epoch_001.test." in path.name for path in captions)
    rows = {row["variant"] for row in report["rows"]}
    assert {variant.split("/")[1] for variant in report["choice"]["only"]} <= rows
    # `python -m train score` reads them against the test split's captions
    annotations = rehearsal / "work/photos/annotations/captions_test.json"
    done = subprocess.run([sys.executable, "-m", "train", "score", *map(str, captions), "--annotations",
                           str(annotations), "--no-meteor", "--out", str(tmp_path / "scores.json")],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())["results"]
    assert set(scores) == {path.stem for path in captions}
    assert all(entry["metrics"]["cider"] >= 0 for entry in scores.values())


def test_the_study_is_the_small_data_winner_where_its_records_name_one(calls: ModuleType, tmp_path: Path) -> None:
    plan = load_plan(REPO_ROOT / "studies/small-data.toml")
    results = tmp_path / "results"
    assert calls.choose_study(results)["only"] == ["recipes/tuned", "recipes/no-label-smoothing"]  # no records
    template = json.loads((REPO_ROOT / "studies/results/recipes/recipes-tuned-seed0.json").read_text())
    # sigmoid above the reference on the ITC match AUC at every seed, its captions as good
    for variant, aucs in (("reference", (0.78, 0.79, 0.785)), ("sigmoid", (0.85, 0.86, 0.855))):
        stage = next(stage for stage in plan.stages if variant in stage.variants)
        for seed, auc in enumerate(aucs):
            record = dict(template, stage=stage.name, variant=variant, seed=seed,
                          config=planned_config(plan, tmp_path, stage, variant, seed).to_dict())
            record["evaluation"] = dict(template["evaluation"], matching={"itc_match_auc": auc})
            path = record_path(results / plan.name, stage.name, variant, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    choice = calls.choose_study(results)
    assert choice["plan"] == "studies/small-data.toml" and choice["only"] == ["screening/sigmoid", plan.reference]


def test_a_job_is_stopped_where_the_budget_ends(calls: ModuleType, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "GRACE", 1.0)
    setup = calls.Setup(device="cpu", data=tmp_path, work=tmp_path, trainer=(), trainer_set=(), trainer_steps=1,
                        gpu_preset="", gpu_set=(), bench=(), study={}, minimum={"later": 30.0})
    call = calls.Call("speed", tmp_path, budget=3.0, setup=setup)
    started = time.monotonic()
    status, _ = call.run("sleep", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert status != 0 and time.monotonic() - started < 10
    assert not call.worth("later")  # too little left for a job that needs 30 s: recorded as skipped
    assert [job["job"] for job in call.jobs] == ["sleep", "later"] and "skipped" in call.jobs[1]


def test_the_gpu_preset_loads_and_states_its_learning_rate_rule() -> None:
    assert "flickr8k-gpu" in available_presets()
    gpu, base = BlipConfig.preset("flickr8k-gpu"), BlipConfig.preset("flickr8k")
    assert gpu.model == base.override({"model.image_size": 128}).model  # the same model at 128 px
    assert gpu.train.batch_size == 256 and gpu.data.loader == "cache"
    scale = gpu.train.batch_size / base.train.batch_size  # square-root scaling, warm-up in samples kept
    assert gpu.train.lr == pytest.approx(base.train.lr * scale**0.5)
    assert gpu.train.warmup_steps == base.train.warmup_steps / scale
    text = (REPO_ROOT / "blipcore/presets/flickr8k-gpu.toml").read_text()
    assert "sqrt(batch_size / 64)" in text
    # its step's FLOPs: 4 times flickr8k's at 128 px; counted on the unpadded captions, padding counts for nothing
    assert training_step_flops(gpu, 256, 40) == 4 * training_step_flops(base.override({"model.image_size": 128}),
                                                                        64, 40)
    assert unpadded_training_flops(gpu, [40] * 256) == training_step_flops(gpu, 256, 40)
    assert unpadded_training_flops(gpu, [12, 20]) == training_step_flops(gpu, 1, 12) + training_step_flops(gpu, 1, 20)
    assert unpadded_training_flops(gpu, [12, 20]) < training_step_flops(gpu, 2, 20)
