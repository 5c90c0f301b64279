"""Studies: a tiny two-stage plan (make a dataset, train two variants x two seeds on it) runs end to end,
skips what is done when run again, and writes one table; bad plans are refused before anything runs."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from blipcore.evaluation.evaluator import CheckpointEvaluator
from blipcore.evaluation.metrics import metric
from blipcore.experiments.study import (
    TABLE_METRICS,
    PlanError,
    Recovery,
    StudyStopped,
    Target,
    judge_recovery,
    judge_target,
    load_plan,
    parse_plan,
    planned_config,
    read_records,
    recovery_markdown,
    run_study,
    selection,
    targets_markdown,
    write_table,
)
from blipcore.model.config import BlipConfig
from blipcore.runs.rundir import RunDir
from blipcore.training.trainer import Trainer
from tests.conftest import REPO_ROOT, SHAPES_PARAMS, small_cfg
from train.cli import main


def tiny_plan(shapes_root: Path) -> dict:
    """A plan whose runs are small_cfg's tiny model, trained 4 steps, on a dataset its first stage makes."""
    demo, tiny = BlipConfig.preset("demo").to_dict(), small_cfg(shapes_root, epochs=1, max_steps=4,
                                                                eval_strategies=["greedy"]).to_dict()
    overrides = {f"{section}.{key}": value for section in ("model", "data", "train")
                 for key, value in tiny[section].items() if demo[section][key] != value and key != "root"}
    make_data = ["data", "shapes", "--out", "{study}/shapes", "--image-size", str(SHAPES_PARAMS["image_size"]),
                 *(f"--{k.replace('_', '-')}={v}" for k, v in SHAPES_PARAMS.items() if k.startswith("n_"))]
    overrides["data.test_annotations"] = "annotations/captions_heldout.json"  # the held-out scenes as a test split
    return {
        "name": "tiny", "preset": "demo", "seeds": [0, 1], "set": overrides,
        "stage": [
            {"name": "make-data", "command": make_data, "produces": "{study}/shapes"},
            {"name": "recipes", "data": "make-data",
             "variants": {"fast": {"train.lr": 1e-3}, "slow": {"train.lr": 1e-4}}},
        ],
        # the same run in two roles only to exercise the table: a real plan names three variants
        "recovery": {"metric": "cider", "reference": "recipes/fast", "degraded": "recipes/slow",
                     "treated": "recipes/fast"},
        "target": [{"metric": "cider", "value": 0.0}, {"metric": "cider", "above": "most-frequent", "by": 0.0}],
    }


def run_recorded(plan, study: Path, **options) -> tuple[dict, list[str]]:
    """run_study with the tests' trainer (no progress bars) and test evaluation (no METEOR: its Java start costs
    seconds per row); returns the table and the names of the runs it trained, in order."""
    trained = []

    def train(cfg, folder, resume):
        trained.append(folder.name)
        return Trainer(cfg, folder, resume=resume, progress=False).fit()

    def test_without_meteor(run, epoch, strategies):
        return CheckpointEvaluator(run, "test").evaluate(epoch, strategies, meteor=False, progress=False)

    table = run_study(plan, study, train, main, **{"log": lambda _: None, "test": test_without_meteor, **options})
    return table, trained


def test_a_two_stage_plan_runs_skips_what_is_done_and_writes_one_table(shapes_root, tmp_path):
    plan, study = parse_plan(tiny_plan(shapes_root)), tmp_path / "study-tiny"
    log = []
    table, trained = run_recorded(plan, study, log=log.append)
    # the dev-chosen checkpoint of every run, evaluated on the whole test split (the shapes' held-out scenes)
    for name in trained:
        test = RunDir(study / name).load_eval(1, split="test")
        assert test["num_images"] == SHAPES_PARAMS["n_heldout"] and "greedy" in test["strategies"]
    assert sorted(trained) == ["recipes-fast-seed0", "recipes-fast-seed1", "recipes-slow-seed0", "recipes-slow-seed1"]
    assert (study / "shapes" / ".complete").is_file()
    rows = {(r["variant"], r["decoding"]): r for r in table["rows"]}
    assert set(rows) == {(v, d) for v in ("fast", "slow") for d in ("greedy", "most-frequent", "nearest-neighbour")}
    greedy = rows[("fast", "greedy")]
    assert greedy["seeds"] == 2 and greedy["cider"] is not None and greedy["cider_sd"] is not None
    assert rows[("fast", "most-frequent")]["top_caption_share"] == 1.0
    assert greedy["split"] == "test" and greedy["chosen_on_dev"] == 2 and greedy["epochs"] == [1]
    assert (study / "study.csv").read_text().startswith("stage,variant,decoding,split,seeds,chosen_on_dev,epochs,")
    assert "| recipes | fast | greedy | test | 2 (2) |" in (study / "study.md").read_text()
    # the plan's recovery question, from each run's dev-chosen strategy on the test split
    recovery = table["recovery"]
    for role, variant in (("reference", "fast"), ("degraded", "slow")):
        assert recovery[role]["values"] == {
            str(seed): RunDir(study / f"recipes-{variant}-seed{seed}").load_eval(1, split="test")
            ["strategies"]["greedy"]["metrics"]["cider"] for seed in (0, 1)}
    assert recovery["cost"] == pytest.approx(recovery["reference"]["mean"] - recovery["degraded"]["mean"])
    assert "Recovery in CIDEr" in (study / "study.md").read_text()
    # every variant judged against the plan's targets on the same numbers, its margin over a reference row too
    targets = {(row["run"], row["target"]): row for row in table["targets"]}
    assert set(targets) == {(f"recipes/{v}", t) for v in ("fast", "slow")
                            for t in ("CIDEr ≥ 0.000", "CIDEr above most-frequent, by > 2 sd")}
    level = targets["recipes/slow", "CIDEr ≥ 0.000"]
    assert level["values"] == recovery["degraded"]["values"] and level["verdict"] == "met"
    margin = targets["recipes/slow", "CIDEr above most-frequent, by > 2 sd"]
    most_frequent = [RunDir(study / f"recipes-slow-seed{seed}").load_eval(1, split="test")["reference_rows"]
                     ["most-frequent"]["metrics"]["cider"] for seed in (0, 1)]
    assert margin["margin"] == pytest.approx(level["mean"] - statistics.fmean(most_frequent))
    assert "| recipes/slow | 2 |" in (study / "study.md").read_text()
    from blipcore.runs.rundir import list_runs

    listed = [run.name for run in list_runs(tmp_path)]  # study runs are runs: the dashboard lists them
    assert listed == [f"study-tiny/recipes-{v}-seed{s}" for v in ("fast", "slow") for s in (0, 1)]

    # again: nothing to train; a test evaluation that never got written (stopped in it) is made; a run that went
    # missing is trained again, the rest skipped
    log.clear()
    RunDir(study / "recipes-fast-seed0").eval_path(1, "test").unlink()
    _, trained = run_recorded(plan, study, log=log.append)
    assert trained == [] and "recipes-fast-seed0: completed, skipped" in log
    assert RunDir(study / "recipes-fast-seed0").eval_path(1, "test").is_file()
    shutil.rmtree(study / "recipes-slow-seed1")
    assert run_recorded(plan, study)[1] == ["recipes-slow-seed1"]

    # a results folder records each completed run; a record made with other settings is not counted
    results = tmp_path / "results"
    assert run_recorded(plan, study, results=results)[1] == []
    assert sorted(path.name for path in results.iterdir()) == sorted(f"{name}.json" for name in trained_names(plan))
    assert set(read_records(plan, study, results)) == {("recipes", v, s) for v in ("fast", "slow") for s in (0, 1)}
    # a record keeps the run's history: every validation evaluation in step order, and the training log
    record = json.loads((results / "recipes-fast-seed0.json").read_text())
    run = RunDir(study / "recipes-fast-seed0")
    evaluations = record["history"]["evaluations"]
    assert [e["step"] for e in evaluations] == [4] and evaluations[0]["label"] == "epoch_001"
    assert evaluations[0]["losses"] == run.load_eval(1)["losses"]
    assert evaluations[0]["strategies"]["greedy"]["metrics"]["cider"] == \
        run.load_eval(1)["strategies"]["greedy"]["metrics"]["cider"]
    assert "itc_match_auc" in evaluations[0]["matching"] and "i2t_r1" in evaluations[0]["retrieval"]
    train_lines = [line for line in run.read_metrics() if line["split"] == "train"]
    assert [line["step"] for line in record["history"]["train"]] == [line["step"] for line in train_lines]
    assert all(0 <= line["data_wait_share"] <= 1 for line in record["history"]["train"])
    assert read_records(plan, study, results)["recipes", "fast", 0].history == record["history"]
    changed = tiny_plan(shapes_root)
    changed["set"]["train.warmup_steps"] = 3
    log.clear()
    assert read_records(parse_plan(changed), study, results, log.append) == {}
    assert len(log) == 4 and all("recorded with other settings than the plan's (train.warmup_steps)" in line
                                 for line in log)
    # the run folders still count under the changed plan (the folder is the truth), flagged, and are not recorded
    other_results = tmp_path / "other-results"
    table = write_table(parse_plan(changed), study, other_results)
    assert [run["differs"] for run in table["runs"]] == [["train.warmup_steps"]] * 4 and not other_results.exists()
    assert "| train.warmup_steps |" in (study / "study.md").read_text()


def trained_names(plan) -> list[str]:
    return [f"{stage.name}-{variant}-seed{seed}" for stage in plan.stages if stage.trains
            for variant in stage.variants for seed in plan.seeds]


def test_a_run_that_does_not_complete_stops_the_study_and_stays_out_of_its_table(shapes_root, tmp_path):
    plan, study = parse_plan(tiny_plan(shapes_root)), tmp_path / "study-tiny"
    trained = []

    def stopped_train(cfg, folder, resume):
        trained.append(folder.name)
        trainer = Trainer(cfg, folder, resume=resume, progress=False)
        trainer.stop_requested = True  # as if Ctrl-C or SIGTERM came before its first step
        return trainer.fit()

    with pytest.raises(StudyStopped, match="recipes-fast-seed0 is interrupted.*run the same command again"):
        run_study(plan, study, stopped_train, main, log=lambda _: None)
    assert trained == ["recipes-fast-seed0"]  # the plan's later runs wait for it
    assert not RunDir(study / "recipes-fast-seed0").eval_path(1, "test").exists()
    assert json.loads((study / "study.json").read_text())["rows"] == []
    # the same call resumes it, then goes on
    table, trained = run_recorded(plan, study, only=["recipes/fast"], seeds=[0])
    assert trained == ["recipes-fast-seed0"] and {(r["variant"], r["seeds"]) for r in table["rows"]} == {("fast", 1)}
    assert RunDir(study / "recipes-fast-seed0").read_info()["status"] == "completed"


def test_the_study_command_says_how_to_resume_a_stopped_study(tmp_path, monkeypatch, capsys):
    import blipcore.experiments.study

    def stop(*args, **kwargs):
        raise StudyStopped("runs/study-x/a-v-seed0 is interrupted, so the study stopped there")

    monkeypatch.setattr(blipcore.experiments.study, "run_study", stop)
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text('name = "x"\npreset = "demo"\n[[stage]]\nname = "a"\n[stage.variants]\nv = {}\n')
    assert main(["study", str(plan_file), "--out", str(tmp_path / "study-x")]) == 130
    assert "stopped: runs/study-x/a-v-seed0 is interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown key"),
        ({"seeds": []}, "seeds must be"),
        ({"stage": [{"name": "a", "data": "nowhere", "variants": {"x": {}}}]}, "not an earlier command stage"),
        ({"stage": [{"name": "a", "variants": {"x": {"train.lr": -1.0}}}]}, "variant 'x' of stage 'a'"),
        ({"stage": [{"name": "a", "command": ["data"]}]}, "produces"),
        ({"stage": [{"name": "make", "command": ["data"], "produces": "x"}]}, "no training stage"),
        ({"stage": [{"name": "make", "command": ["data"], "produces": "x", "resume": "--resume"}]},
         "resume must be a list of arguments"),
        ({"stage": [{"name": "a", "variants": {"x": {}}, "resume": ["--resume"]}]},
         "resume belongs to a command stage"),
        ({"stage": [{"name": "a", "variants": {"x": {}}}, {"name": "c", "command": ["capfilt", "{run:a/x}"],
                                                           "produces": "out"}]},
         "stage 'c': its command uses {seed} or names a run without its seed.*`produces` must hold {seed}"),
        ({"stage": [{"name": "c", "command": ["capfilt", "{run:a/x/0}"], "produces": "out"},
                    {"name": "a", "variants": {"x": {}}}]},
         "command stage 'c' names run a/x, which is not a variant of an earlier training stage"),
        ({"recovery": {"metric": "cider", "reference": "recipes/fast", "degraded": "recipes/nowhere",
                       "treated": "recipes/fast"}}, "degraded = 'recipes/nowhere' is not a stage/variant"),
        ({"recovery": [{"reference": "recipes/fast", "degraded": "recipes/slow", "treated": "recipes/fast"},
                       {"reference": "recipes/fast", "degraded": "recipes/slow", "treated": "none/x"}]},
         "treated = 'none/x' is not a stage/variant"),
        ({"recovery": "recipes/fast"}, r"\[recovery\] must be a table, or \[\[recovery\]\] tables"),
        ({"recovery": {"reference": ["recipes/fast"], "degraded": "recipes/slow", "treated": "recipes/fast"}},
         "reference = \\['recipes/fast'\\] is not a stage/variant"),
        ({"recovery": {"metric": "mean_length", "reference": "recipes/fast", "degraded": "recipes/slow",
                       "treated": "recipes/fast"}}, "not a table metric with a better direction"),
        ({"recovery": {"reference": "recipes/fast", "degraded": "recipes/slow", "treated": "recipes/fast",
                       "target": 1.5}}, r"target .* in \(0, 1\]"),
        ({"target": {"metric": "cider", "value": 0.3}}, r"targets are \[\[target\]\] tables"),
        ({"target": [{"metric": "cider", "value": 0.3, "colour": "red"}]}, r"\[\[target\]\] 1: unknown key"),
        ({"target": [{"metric": "mean_length", "value": 10}]}, "not a table metric with a better direction"),
        ({"target": [{"metric": "cider"}]}, "either a value .* or above"),
        ({"target": [{"metric": "cider", "value": 0.3, "above": "most-frequent"}]}, "not both"),
        ({"target": [{"metric": "cider", "value": "high"}]}, "value must be a number"),
        ({"target": [{"metric": "cider", "value": 0.3, "by": 0.1}]}, "by is a margin over a reference row"),
        ({"target": [{"metric": "cider", "above": "chance"}]}, "'chance' is neither a reference row"),
        ({"target": [{"metric": "cider", "above": "recipes/nowhere"}]}, "is neither a reference row .* nor a stage"),
        ({"target": [{"metric": "cider", "not_below": "recipes/nowhere"}]}, "not_below = 'recipes/nowhere' is not"),
        ({"target": [{"metric": "cider", "not_below": "recipes/fast", "by": 0.1}]}, "not_below takes no value"),
        ({"reference": "recipes/nowhere"}, "reference = 'recipes/nowhere' is not a stage/variant"),
        ({"target": [{"metric": "cider", "above": "nearest-neighbour", "by": -0.1}]}, "by is how much better"),
        ({"target": [{"metric": "i2t_r1", "above": "nearest-neighbour"}]}, "a reference row has no i2t_r1"),
    ],
)
def test_a_bad_plan_is_refused_with_what_is_wrong(shapes_root, change, message):
    with pytest.raises(PlanError, match=message):
        parse_plan({**tiny_plan(shapes_root), **change})


def test_a_stopped_command_stage_continues_with_its_resume_arguments_or_says_what_to_do(shapes_root, tmp_path):
    from blipcore.experiments.study.running import _run_command
    from blipcore.runs.rundir import RunError

    made = {"name": "made", "command": ["data", "noise", "--out", "{study}/data/x"], "produces": "{study}/data/x"}
    calls = []

    def command(args: list[str]) -> int:  # makes its folder, as a stopped command would have begun to
        calls.append(args)
        (tmp_path / "data" / "x").mkdir(parents=True, exist_ok=True)
        return 0

    base = {key: value for key, value in tiny_plan(shapes_root).items() if key != "recovery"}
    plan = parse_plan({**base, "stage": [{**made, "resume": ["--resume"]},
                                         {"name": "t", "data": "made", "variants": {"v": {}}}]})
    _run_command(plan.stages[0], plan, tmp_path, command, log=lambda _: None)
    assert calls == [["data", "noise", "--out", f"{tmp_path}/data/x"]]  # a fresh start: no resume arguments
    (tmp_path / "data" / "x" / ".complete").unlink()  # stopped before it finished
    _run_command(plan.stages[0], plan, tmp_path, command, log=lambda _: None)
    assert calls[-1] == ["data", "noise", "--out", f"{tmp_path}/data/x", "--resume"]
    _run_command(plan.stages[0], plan, tmp_path, command, log=lambda _: None)
    assert len(calls) == 2  # complete: skipped
    (tmp_path / "data" / "x" / ".complete").unlink()
    without = parse_plan({**base, "stage": [made, {"name": "t", "data": "made", "variants": {"v": {}}}]})
    with pytest.raises(RunError, match=r"data/x is unfinished .*`resume = \[...\]`"):
        _run_command(without.stages[0], without, tmp_path, command, log=lambda _: None)
    assert len(calls) == 2


RECOVERY_ROLES_RUNS = (("clean", "tuned"), ("noisy", "tuned"), ("bootstrapped", "tuned"))
RECOVERY = Recovery("cider", *RECOVERY_ROLES_RUNS, target=0.5)


@pytest.mark.parametrize(
    ("values", "share", "verdict"),
    [
        # cost 0.10 against 2 sd of 0.02: decided; won back 0.06 of it
        ({"reference": {0: 0.30, 1: 0.32}, "degraded": {0: 0.20, 1: 0.22}, "treated": {0: 0.26, 1: 0.28}}, 0.6, "met"),
        ({"reference": {0: 0.30, 1: 0.32}, "degraded": {0: 0.20, 1: 0.22}, "treated": {0: 0.22, 1: 0.24}}, 0.2,
         "missed"),
        # the seeds spread more than the cost: no verdict, whatever the share
        ({"reference": {0: 0.30, 1: 0.40}, "degraded": {0: 0.25, 1: 0.29}, "treated": {0: 0.35, 1: 0.35}}, None,
         "within two standard deviations"),
        ({"reference": {0: 0.30}, "degraded": {0: 0.20}, "treated": {0: 0.29}}, 0.9, "needs 2 or more seeds"),
        ({"reference": {0: 0.20}, "degraded": {0: 0.25}, "treated": {0: 0.29}}, None, "no cost"),
        ({"reference": {0: 0.30}, "degraded": {}, "treated": {0: 0.29}}, None, "not yet"),
    ],
)
def test_recovery_is_judged_only_where_the_cost_exceeds_two_sd_over_seeds(values, share, verdict):
    summary = judge_recovery(RECOVERY, values)
    assert verdict in summary["verdict"]
    if share is not None:
        assert summary["share"] == pytest.approx(share)
    if values["degraded"]:
        assert summary["cost"] == pytest.approx(statistics.fmean(values["reference"].values())
                                                - statistics.fmean(values["degraded"].values()))
    table = recovery_markdown(summary)
    assert "clean/tuned (reference)" in table and summary["verdict"] in table


def test_recovery_questions_of_several_protocols_share_one_table():
    values = {"reference": {0: 0.30, 1: 0.32}, "degraded": {0: 0.20, 1: 0.22}, "treated": {0: 0.26, 1: 0.28}}
    today = {"protocol": "captioner and filter: noisy/tuned", **judge_recovery(RECOVERY, values)}
    blip = {"protocol": "captioner: tuned/captioner, filter: tuned/filter",
            **judge_recovery(Recovery("cider", ("clean", "tuned"), ("noisy-blip", "tuned"), ("boot-blip", "tuned")),
                             {**values, "degraded": {}})}
    rows = [line for line in recovery_markdown([today, blip]).splitlines() if line.startswith("| ")]
    # a column names the variant every row shares, else each cell names its own
    assert rows[0].startswith("| protocol | clean/tuned (reference) | degraded | treated | cost |") and len(rows) == 3
    assert rows[1].startswith("| captioner and filter: noisy/tuned | 0.310 ± 0.014 (2 seeds) | noisy/tuned: 0.210")
    assert "| noisy-blip/tuned: - |" in rows[2] and rows[2].endswith("| not yet: every role needs an evaluated run |")
    assert "protocol" not in recovery_markdown({**today, "protocol": None})  # no CapFilt: no protocol column


def test_recovery_of_a_lower_is_better_metric_counts_a_fall_as_the_gain():
    lower = next(key for key in TABLE_METRICS if metric(key).better == "lower")
    summary = judge_recovery(Recovery(lower, *RECOVERY_ROLES_RUNS), {
        "reference": {0: 0.1, 1: 0.1}, "degraded": {0: 0.5, 1: 0.5}, "treated": {0: 0.2, 1: 0.2}})
    assert summary["cost"] == pytest.approx(0.4) and summary["share"] == pytest.approx(0.75)
    assert summary["verdict"] == "met"


@pytest.mark.parametrize(
    ("target", "values", "references", "verdict"),
    [
        (Target("cider", value=0.30), {0: 0.32, 1: 0.29}, None, "met"),  # the mean is judged: 0.305
        (Target("cider", value=0.30), {0: 0.29, 1: 0.30}, None, "missed"),
        (Target("top_caption_share", value=0.10), {0: 0.08}, None, "met"),  # lower is better: at most
        (Target("top_caption_share", value=0.10), {0: 0.12}, None, "missed"),
        (Target("cider", value=0.30), {}, None, "no value"),
        # a margin over a reference row: at least `by`, and beyond two sd over seeds of the variant and of the row
        (Target("cider", above="nearest-neighbour", by=0.05), {0: 0.20, 1: 0.22}, {0: 0.10, 1: 0.10}, "met"),
        (Target("cider", above="nearest-neighbour", by=0.05), {0: 0.14, 1: 0.15}, {0: 0.10, 1: 0.10}, "missed"),
        (Target("cider", above="nearest-neighbour", by=0.05), {0: 0.15, 1: 0.25}, {0: 0.10, 1: 0.10},
         "missed: the margin is within two standard deviations"),
        (Target("cider", above="nearest-neighbour", by=0.05), {0: 0.20}, {0: 0.10}, "not decided"),
        (Target("top_caption_share", above="nearest-neighbour", by=0.05), {0: 0.02, 1: 0.03}, {0: 0.10, 1: 0.11},
         "met"),
        (Target("cider", above="nearest-neighbour", by=0.05), {0: 0.20}, {}, "no value"),
    ],
)
def test_a_target_is_judged_on_the_mean_and_a_margin_only_beyond_two_sd(target, values, references, verdict):
    summary = judge_target(target, values, references)
    assert summary["verdict"].startswith(verdict)
    if summary["margin"] is not None:
        sign = 1 if metric(target.metric).better == "higher" else -1
        assert summary["margin"] == pytest.approx(sign * (statistics.fmean(values.values())
                                                          - statistics.fmean(references.values())))
    table = targets_markdown([{"run": "recipes/tuned", **summary}])
    assert f"| recipes/tuned | {len(values)} |" in table and target.describe() in table
    assert summary["verdict"].split(":")[0] in table


@pytest.mark.parametrize(
    ("target", "values", "others", "verdict"),
    [
        # above another variant: a margin beyond two pooled sd, and the worst seed above the other's best
        (Target("itc_match_auc", above="screening/reference"), {0: 0.85, 1: 0.86, 2: 0.87},
         {0: 0.80, 1: 0.79, 2: 0.81}, "met"),
        (Target("itc_match_auc", above="screening/reference"), {0: 0.80, 1: 0.86, 2: 0.90},
         {0: 0.80, 1: 0.79, 2: 0.81}, "missed: the margin is within two standard deviations"),
        # mean 0.05 above, spread small, but one seed no better than the other's best (0.81)
        (Target("itc_match_auc", above="screening/reference"), {0: 0.84, 1: 0.845, 2: 0.81, 3: 0.845},
         {0: 0.795, 1: 0.80, 2: 0.81, 3: 0.795}, "missed: its worst seed"),
        (Target("itc_match_auc", above="screening/reference", by=0.1), {0: 0.85, 1: 0.86}, {0: 0.80, 1: 0.79},
         "missed"),
        (Target("itc_match_auc", above="screening/reference"), {0: 0.85}, {0: 0.80}, "not decided"),
        (Target("itc_match_auc", above="screening/reference"), {0: 0.75}, {0: 0.80}, "missed"),
        (Target("top_caption_share", above="screening/reference"), {0: 0.02, 1: 0.03}, {0: 0.10, 1: 0.11}, "met"),
        (Target("itc_match_auc", above="screening/reference"), {}, {0: 0.80}, "no value"),
        # not below another variant: met unless worse by more than two pooled sd
        (Target("cider", not_below="screening/reference"), {0: 0.20, 1: 0.21}, {0: 0.205, 1: 0.20}, "met"),
        (Target("cider", not_below="screening/reference"), {0: 0.19, 1: 0.20}, {0: 0.205, 1: 0.20}, "met: within"),
        (Target("cider", not_below="screening/reference"), {0: 0.15, 1: 0.151}, {0: 0.205, 1: 0.20}, "missed"),
        (Target("cider", not_below="screening/reference"), {0: 0.15}, {0: 0.20}, "not decided"),
        (Target("cider", not_below="screening/reference"), {0: 0.21}, {0: 0.20}, "met"),
    ],
)
def test_a_variant_is_judged_against_another_by_pooled_sd_and_its_worst_seed(target, values, others, verdict):
    from blipcore.experiments.study import judge_against_variant, pooled_sd

    summary = judge_against_variant(target, values, others)
    assert summary["verdict"].startswith(verdict)
    if values and others:
        sign = 1 if metric(target.metric).better == "higher" else -1
        assert summary["margin"] == pytest.approx(sign * (statistics.fmean(values.values())
                                                          - statistics.fmean(others.values())))
        spread = pooled_sd(list(values.values()), list(others.values()))
        assert summary["two_sd"] == (None if spread is None else pytest.approx(2 * spread))
    table = targets_markdown([{"run": "screening/conv-stem", **summary}])
    assert f"| screening/conv-stem | {len(values)} |" in table and target.describe() in table


def test_pooled_sd_is_the_two_groups_sample_spread_around_their_own_means():
    from blipcore.experiments.study import pooled_sd

    assert pooled_sd([1.0, 3.0], [10.0, 12.0]) == pytest.approx(statistics.stdev([1.0, 3.0]))
    assert pooled_sd([1.0, 2.0, 3.0], [5.0, 9.0]) == pytest.approx(((2 * 1.0 + 1 * 8.0) / 3) ** 0.5)
    assert pooled_sd([1.0], [2.0, 3.0]) is None


def test_a_records_history_gives_when_its_validation_numbers_were_best():
    from blipcore.experiments.study import history_steps

    def evaluation(step, val_itc, i2t, t2i, ciders):
        return {"step": step, "losses": {"val_itc": val_itc}, "retrieval": {"i2t_r1": i2t, "t2i_r1": t2i},
                "strategies": {name: {"metrics": {"cider": c}} for name, c in ciders.items()}}

    history = {"evaluations": [evaluation(100, 3.6, 1.0, 1.0, {"greedy": 0.10, "beam": 0.12}),
                               evaluation(200, 3.5, 1.5, 1.0, {"greedy": 0.15, "beam": 0.11}),
                               evaluation(300, 3.9, 2.0, 1.5, {"greedy": 0.13, "beam": 0.14})]}
    # the validation loss turned up at step 300 while the ranking still improved: over-confidence
    assert history_steps(history) == {"evaluations": 3, "val_itc_min_step": 200, "dev_r1_max_step": 300,
                                      "dev_cider_max_step": 200}
    assert history_steps({}) == {"evaluations": None, "val_itc_min_step": None, "dev_r1_max_step": None,
                                 "dev_cider_max_step": None}


def test_a_runs_cost_counts_its_steps_and_the_runs_it_started_from(tmp_path):
    from blipcore.experiments.study import COST_TEXT_LEN, RunResult, total_pflops
    from blipcore.experiments.study.report import _compute_ratios
    from blipcore.model.flops import training_step_flops

    plan = parse_plan({"name": "cost", "preset": "flickr8k-cpu", "seeds": [0], "reference": "main/reference",
                       "stage": [{"name": "pre", "variants": {"text": {"model.text_only": True,
                                                                        "model.itc_weight": 0.0,
                                                                        "train.max_steps": 300}}},
                                 {"name": "main", "variants": {"reference": {},
                                                               "chained": {"train.init": "{run:pre/text}",
                                                                           "train.max_steps": 1500}}}]})

    def result(stage, variant, steps_logged=None):
        cfg = planned_config(plan, tmp_path, next(s for s in plan.stages if s.name == stage), variant, 0)
        cfg.model.vocab_size = 6646
        history = {"train": [{"step": steps_logged}]} if steps_logged else {}
        return RunResult(1, "test", "beam", {}, 60.0, 50.0, {}, cfg.to_dict(), history=history), cfg

    reported, flops = {}, {}
    for stage, variant, logged in (("pre", "text", None), ("main", "reference", 1800), ("main", "chained", None)):
        found, cfg = result(stage, variant, logged)
        reported[stage, variant] = {0: found}
        flops[variant] = training_step_flops(cfg, 64, COST_TEXT_LEN)
    assert total_pflops(plan, reported, "main", "reference", 0) == pytest.approx(1800 * flops["reference"] / 1e15)
    chained = (1500 * flops["chained"] + 300 * flops["text"]) / 1e15  # its steps and its pretraining's
    assert total_pflops(plan, reported, "main", "chained", 0) == pytest.approx(chained)
    ratios = _compute_ratios(plan, reported)
    assert ratios["main", "reference", 0] == pytest.approx(1.0)
    assert ratios["main", "chained", 0] == pytest.approx(chained / (1800 * flops["reference"] / 1e15))


def test_the_report_is_the_table_of_the_records_alone_and_names_its_command(tmp_path, capsys):
    results = REPO_ROOT / "studies" / "results" / "recipes"
    out = tmp_path / "recipes.md"
    assert main(["study", str(REPO_ROOT / "studies" / "recipes.toml"), "--results", str(results),
                 "--report", str(out)]) == 0
    page = out.read_text()
    assert f"--report {out}" in page and "| recipes | tuned | beam | test | 3 (3) |" in page
    assert "| record |" in page and page.count("| run |") == 1  # only records count: "run" heads a column alone
    assert main(["study", str(REPO_ROOT / "studies" / "recipes.toml"), "--report", str(out)]) == 2
    assert "--report makes the table of the records in --results DIR" in capsys.readouterr().err


RECORDED_PLANS = sorted(p.name for p in (REPO_ROOT / "studies" / "results").iterdir()
                        if (REPO_ROOT / "studies" / f"{p.name}.toml").is_file())


@pytest.mark.parametrize("name", RECORDED_PLANS)
def test_the_generated_results_pages_are_current(name, monkeypatch):
    """docs/results/<plan>.md is the study's table of its committed records, made by the command it names."""
    from blipcore.experiments.study import records_report

    monkeypatch.chdir(REPO_ROOT)  # the command names its paths relative to the checkout
    command = (f"python -m train study studies/{name}.toml --results studies/results/{name} "
               f"--report docs/results/{name}.md")
    plan = load_plan(Path("studies") / f"{name}.toml")
    expected = records_report(plan, Path("studies/results") / name, command)
    assert (Path("docs/results") / f"{name}.md").read_text() == expected, f"regenerate it with: {command}"


@pytest.mark.parametrize("name", ["recipes", "capfilt"])
def test_the_shipped_plans_load(name):
    plan = load_plan(Path(__file__).parents[1] / "studies" / f"{name}.toml")
    assert plan.name == name and plan.seeds == [0, 1, 2] and plan.preset == "flickr8k-cpu"
    if name == "capfilt":
        today = plan.recoveries[0]  # the first protocol's; BLIP's is tested in tests/test_capfilt.py
        assert (today.reference, today.degraded, today.treated) == RECOVERY_ROLES_RUNS
    else:  # the plan's targets; the decoder-pretrained recipe brings its pretraining run along
        assert {target.describe() for target in plan.targets} >= {
            "BLEU-4 ≥ 0.120", "CIDEr ≥ 0.300", "CIDEr 0.050 above nearest-neighbour, by > 2 sd"}
        assert ("pretraining", "text-lm", 2) in selection(plan, ["recipes/decoder-pretrained"], [2])


def test_the_decoder_pretrained_recipe_spends_the_preset_budget_with_its_pretraining():
    plan = load_plan(Path(__file__).parents[1] / "studies" / "recipes.toml")
    stages = {stage.name: stage for stage in plan.stages}
    budget = plan.base_config().train.max_steps
    pretraining = stages["pretraining"].variants["text-lm"]["train.max_steps"]
    assert pretraining + stages["recipes"].variants["decoder-pretrained"]["train.max_steps"] == budget
    assert stages["recipes"].variants["tuned"] == {}  # the tuned recipe is the preset itself


def test_a_plan_file_that_is_not_toml_names_itself(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text("name = [unclosed")
    with pytest.raises(PlanError, match="plan.toml: not valid TOML"):
        load_plan(path)


def test_the_study_command_runs_a_plan_file_and_prints_its_table(shapes_root, tmp_path, capsys):
    plan = tiny_plan(shapes_root)
    plan["seeds"] = [0]
    plan["stage"][1]["variants"] = {"fast": {"train.lr": 1e-3}}
    del plan["set"]["data.test_annotations"]  # no test split: the table reports the dev evaluation

    def toml_value(value) -> str:
        return json.dumps(list(value) if isinstance(value, tuple) else value)

    lines = [f'name = "{plan["name"]}"', f'preset = "{plan["preset"]}"', "seeds = [0]", "[set]"]
    lines += [f'"{key}" = {toml_value(value)}' for key, value in plan["set"].items()]
    lines += ["[[stage]]", 'name = "make-data"', f"command = {json.dumps(plan['stage'][0]['command'])}",
              'produces = "{study}/shapes"', "[[stage]]", 'name = "recipes"', 'data = "make-data"',
              "[stage.variants]", 'fast = { "train.lr" = 1e-3 }']
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["study", str(path), "--out", str(tmp_path / "study-tiny"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| recipes | fast | greedy | val | 1 (1) |" in out and "study.json" in out
    assert (tmp_path / "study-tiny" / "plan.toml").read_text() == path.read_text()
    assert main(["study", str(tmp_path / "missing.toml")]) == 2


def test_only_and_seeds_pick_the_runs_a_session_trains(shapes_root, tmp_path, capsys):
    from blipcore.experiments.study import selection

    plan = parse_plan(tiny_plan(shapes_root))
    assert selection(plan) == {("recipes", v, s) for v in ("fast", "slow") for s in (0, 1)}
    assert selection(plan, ["recipes/slow"], [1]) == {("recipes", "slow", 1)}
    assert selection(plan, ["recipes"], [0]) == {("recipes", "fast", 0), ("recipes", "slow", 0)}
    with pytest.raises(PlanError, match="matches no training run"):
        selection(plan, ["recipes/medium"])
    with pytest.raises(PlanError, match=r"seed\(s\) \[7\]"):
        selection(plan, seeds=[7])
    table, trained = run_recorded(plan, tmp_path / "study-tiny", only=["recipes/fast"], seeds=[1])
    assert trained == ["recipes-fast-seed1"]
    assert {(r["variant"], r["seeds"]) for r in table["rows"]} == {("fast", 1)}
    # the CLI refuses an --only the plan lacks before writing anything
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text('name = "x"\npreset = "demo"\n[[stage]]\nname = "a"\n[stage.variants]\nv = {}\n')
    assert main(["study", str(plan_file), "--out", str(tmp_path / "nope"), "--only", "b"]) == 2
    assert "matches no training run" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_a_stage_starts_from_the_weights_of_an_earlier_stages_run_of_the_same_seed(shapes_root, tmp_path):
    """Decoder pretraining as a plan: a text-only language model first, then the full recipe from its weights
    ({run:<stage>/<variant>} = that stage's run of the same seed); --only the second selects the first too."""
    from blipcore.experiments.study import selection

    table = tiny_plan(shapes_root)
    table["seeds"] = [0, 1]
    table["stage"][1:] = [
        {"name": "pretraining", "data": "make-data",
         "variants": {"text-lm": {"model.text_only": True, "model.itc_weight": 0.0, "train.max_steps": 2}}},
        {"name": "recipes", "data": "make-data",
         "variants": {"pretrained": {"train.init": "{run:pretraining/text-lm}", "train.max_steps": 2}}},
    ]
    del table["recovery"]  # it names the variants replaced here
    plan = parse_plan(table)
    assert selection(plan, ["recipes"], [1]) == {("pretraining", "text-lm", 1), ("recipes", "pretrained", 1)}
    study = tmp_path / "study-tiny"
    _, trained = run_recorded(plan, study, only=["recipes"], seeds=[1])
    assert trained == ["pretraining-text-lm-seed1", "recipes-pretrained-seed1"]
    info = RunDir(study / "recipes-pretrained-seed1").read_info()
    assert info["config"]["train"]["init"] == str(study / "pretraining-text-lm-seed1")
    assert info["init"]["loaded_tensors"] > 0 and "text_encoder" in info["init"]["new"]  # ITC's tower is new
    pretrained = RunDir(study / "pretraining-text-lm-seed1")
    assert pretrained.config().model.text_only and set(pretrained.load_eval(1)["losses"]) == {"val_loss", "val_lm"}

    table["stage"][2]["variants"]["pretrained"]["train.init"] = "{run:recipes/pretrained}"  # itself: not earlier
    with pytest.raises(PlanError, match="names run recipes/pretrained, which is not a variant of an earlier"):
        parse_plan(table)


def test_a_records_settings_are_compared_without_where_its_files_were_or_what_the_run_counted_itself():
    from blipcore.experiments.study import config_differences

    planned = BlipConfig.preset("flickr8k-cpu").override({"data.root": "/here"}).to_dict()
    run = BlipConfig.from_dict(planned).override({"data.root": "/elsewhere", "model.vocab_size": 6646}).to_dict()
    assert config_differences(run, planned) == []  # a "captions" vocabulary's size is counted when the run starts
    full = {**run, "model": {**run["model"], "vocabulary": "full", "vocab_size": 30600}}
    assert config_differences(full, planned) == ["model.vocab_size", "model.vocabulary"]
    assert config_differences({**run, "train": {**run["train"], "lr": 1.0}}, planned) == ["train.lr"]


def test_a_field_a_record_predates_counts_at_its_default():
    from blipcore.experiments.study import config_differences

    planned = BlipConfig.preset("flickr8k-cpu").to_dict()
    older = json.loads(json.dumps(planned))
    del older["model"]["patch_embed"], older["data"]["augment"]  # recorded before these options existed
    assert config_differences(older, planned) == []
    assert config_differences(older, BlipConfig.from_dict(planned).override(
        {"model.patch_embed": "conv-stem"}).to_dict()) == ["model.patch_embed"]


def test_a_history_is_thinned_to_its_line_budget_keeping_the_last_line(tmp_path):
    from blipcore.experiments.study import HISTORY_TRAIN_LINES, run_history

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for step in range(1, 2 * HISTORY_TRAIN_LINES + 6):
        run.append_metrics({"step": step, "split": "train", "loss": 1.0 / step, "note": "not a number"})
    run.save_step_eval(7, {"losses": {"val_loss": 2.0}, "strategies": {"greedy": {"metrics": {"cider": 0.1}}}})
    history = run_history(run)
    steps = [line["step"] for line in history["train"]]
    assert len(steps) <= HISTORY_TRAIN_LINES + 1 and steps[0] == 1 and steps[-1] == 2 * HISTORY_TRAIN_LINES + 5
    assert set(history["train"][0]) == {"step", "loss"}
    assert history["evaluations"] == [{"step": 7, "label": None, "num_images": None, "losses": {"val_loss": 2.0},
                                       "retrieval": {}, "matching": {}, "reference_rows": {},
                                       "strategies": {"greedy": {"metrics": {"cider": 0.1}}}}]


@pytest.mark.parametrize("name", ["recipes", "capfilt"])
def test_every_committed_record_still_counts_under_its_plan(name):
    plan = load_plan(REPO_ROOT / "studies" / f"{name}.toml")
    results = REPO_ROOT / "studies" / "results" / name
    log = []
    counted = read_records(plan, Path("/nonexistent-study"), results, log.append)
    committed = [p for p in results.iterdir() if re.fullmatch(r".+-seed\d+\.json", p.name)]  # not CapFilt summaries
    assert log == [] and len(counted) == len(committed) > 0


def test_the_runs_table_names_every_revision_of_the_code_that_trained_a_run():
    from blipcore.experiments.study import code_revisions

    started, resumed = "b7054b0748752fe9017edf83d4e32781a9680ed9", "eec98c1" + "0" * 33
    assert code_revisions({"git_revision": started}) == "b7054b0"  # a record made before resumes were recorded
    assert code_revisions({"git_revision": started, "resumed_revisions": [started, resumed, resumed]}) == \
        "b7054b0+eec98c1"
    assert code_revisions({"git_revision": None, "resumed_revisions": [None]}) == ""
