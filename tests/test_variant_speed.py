"""benchmarks/variant_speed.py: every variant of a plan stepped in turn in one process, each one's samples/s a ratio of
the reference's, and the study's table showing that ratio with where it was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blipcore import BlipConfig
from blipcore.experiments.study import (
    STEP_SPEED_FILE,
    RunResult,
    load_plan,
    planned_config,
    read_step_speed,
    records_report,
)
from blipcore.experiments.study.records import record_path, save_record
from blipcore.runs.rundir import RunError
from tests.conftest import REPO_ROOT, small_cfg
from tests.test_benchmarks import load_script

SCRIPT = REPO_ROOT / "benchmarks" / "variant_speed.py"


def write_plan(folder: Path, shapes_root: Path) -> Path:
    """A plan on the tiny model: its reference, a variant twice as deep in both towers, and an MAE stage."""
    demo, tiny = BlipConfig.preset("demo").to_dict(), small_cfg(shapes_root).to_dict()
    settings = {f"{section}.{key}": value for section in ("model", "data", "train")
                for key, value in tiny[section].items() if demo[section][key] != value}
    lines = ['name = "speed"', 'preset = "demo"', "seeds = [0]", 'reference = "screening/reference"', "[set]",
             *(f"{json.dumps(key)} = {json.dumps(value)}" for key, value in settings.items()),
             "[[stage]]", 'name = "screening"', "[stage.variants]", "reference = {}",
             'deeper = { "model.vision_depth" = 2, "model.text_encoder_depth" = 2, "model.text_decoder_depth" = 2 }',
             "[[stage]]", 'name = "image-pretraining"', "[stage.variants]",
             'mae = { "model.mae" = true, "model.itc_weight" = 0.0, "model.lm_weight" = 0.0 }']
    path = folder / "speed.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_each_variant_is_timed_against_the_reference_and_the_table_shows_it(shapes_root, tmp_path, capsys):
    plan_path, results = write_plan(tmp_path, shapes_root), tmp_path / "results"
    script = load_script("variant_speed", SCRIPT)
    args = [str(plan_path), "--only", "screening", "--steps", "2", "--warmup", "1", "--no-progress",
            "--out", str(results / STEP_SPEED_FILE)]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    measured = json.loads((results / STEP_SPEED_FILE).read_text())
    variants = measured["variants"]
    assert list(variants) == ["screening/reference", "screening/deeper"]  # --only: the MAE stage left out
    reference, deeper = variants["screening/reference"], variants["screening/deeper"]
    assert reference["samples_per_s_ratio"] == 1.0 and len(reference["step_s_all"]) == 2
    rounds = [r / d * deeper["batch_size"] / reference["batch_size"]
              for r, d in zip(reference["step_s_all"], deeper["step_s_all"], strict=True)]
    assert deeper["samples_per_s_ratio"] == pytest.approx(sum(rounds) / 2)  # the median of two rounds' ratios
    assert deeper["ratio_range"] == pytest.approx([min(rounds), max(rounds)])
    assert deeper["samples_per_s"] == pytest.approx(deeper["batch_size"] / deeper["step_s"])
    assert deeper["gflops"] > reference["gflops"] > 0  # twice the blocks: more FLOPs a step
    assert measured["command"].startswith("python benchmarks/variant_speed.py ") and measured["machine"]["cpu"]
    assert "screening/deeper" in printed and "× reference" in printed

    # the study's table reads it from the results folder: a column and the line that says where it comes from
    plan = load_plan(plan_path)
    assert read_step_speed(results) == measured and read_step_speed(tmp_path / "none") is None
    evaluation = {"strategies": {"greedy": {"metrics": {"cider": 0.5}}}, "retrieval": {"i2t_r1": 10.0}}
    for variant in ("reference", "deeper"):
        record = RunResult(epoch=1, split="test", chosen="greedy", evaluation=evaluation, train_seconds=60.0,
                           samples_per_s=None, machine={}, config=planned_config(
                               plan, tmp_path, plan.stages[0], variant, 0).to_dict())
        save_record(record_path(results, "screening", variant, 0), record.record("screening", variant, 0))
    page = records_report(plan, results, "python -m train study speed.toml --report page.md")
    header = next(line for line in page.splitlines() if line.startswith("| stage |")).split(" | ")
    deeper_row = next(line for line in page.splitlines() if line.startswith("| screening | deeper | greedy |"))
    assert header[-1] == "samples/s × reference |"
    assert deeper_row.split(" | ")[-1] == f"{deeper['samples_per_s_ratio']:.2f} |"
    assert f"by `{measured['command']}` on {measured['machine']['cpu']}, {measured['date']}." in page


def test_a_speed_file_that_is_not_one_is_one_error(tmp_path):
    (tmp_path / STEP_SPEED_FILE).write_text('{"variants": []}')
    with pytest.raises(RunError, match="not a step-speed measurement"):
        read_step_speed(tmp_path)


def test_every_variant_of_a_plan_and_an_unknown_one(shapes_root, tmp_path):
    script = load_script("variant_speed", SCRIPT)
    configs = script.variant_configs(write_plan(tmp_path, shapes_root), [], None)
    assert list(configs) == ["screening/reference", "screening/deeper", "image-pretraining/mae"]
    assert configs["image-pretraining/mae"].model.mae and configs["screening/deeper"].model.vision_depth == 2
    with pytest.raises(SystemExit, match="no training variant matches --only nothing"):
        script.variant_configs(tmp_path / "speed.toml", ["nothing"], None)
    with pytest.raises(SystemExit, match="no such plan file"):  # one line, no traceback
        script.main([str(tmp_path / "missing.toml")])


def test_a_stage_on_an_earlier_stages_dataset_is_timed_on_the_plans(shapes_root, tmp_path):
    script = load_script("variant_speed", SCRIPT)
    plan = write_plan(tmp_path, shapes_root)
    plan.write_text(plan.read_text() + "\n".join([
        "[[stage]]", 'name = "noisy-data"', 'command = ["data", "noise", "--from", "{data_root}", "--out", '
        '"{study}/data/noisy", "--fraction", "0.3"]', 'produces = "{study}/data/noisy"',
        "[[stage]]", 'name = "noisy"', 'data = "noisy-data"', "[stage.variants]", "tuned = {}"]) + "\n")
    configs = script.variant_configs(plan, ["noisy"], None)
    assert configs["noisy/tuned"].data.root == str(shapes_root)  # not the study's data/noisy, which is not made
