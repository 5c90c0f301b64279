"""Studies: a plan of stages run into one folder of ordinary run directories, and one table of the results.

A plan is a TOML file:

    name = "recipes"
    preset = "flickr8k-cpu"             # every run starts from this preset ...
    seeds = [0, 1, 2]
    [set]                               # ... with these fields set (like --set on the command line)
    "train.max_steps" = 3000

    [[stage]]                           # a training stage: variants x seeds
    name = "ablation"
    [stage.variants]
    original = { "train.lr" = 5e-5, "train.batch_size" = 8 }
    tuned = {}

    [[stage]]                           # a command stage: `python -m train ARGS`, which makes a dataset
    name = "noisy"
    command = ["data", "noise", "--from", "{data_root}", "--out", "{study}/data/noisy", "--fraction", "0.3"]
    produces = "{study}/data/noisy"

    [[stage]]                           # trains on the dataset that stage "noisy" produced
    name = "on-noise"
    data = "noisy"
    [stage.variants]
    tuned = {}

Each run is `<study>/<stage>-<variant>-seed<seed>`, an ordinary run directory: the Runs, Training and
Compare pages list it, and `python -m train fit --run-dir ... --resume` continues it. Running the
plan again skips what is complete and resumes what is not, so a study spreads over sessions. A command
stage is done when its `produces` folder holds a `.complete` marker, which this module writes after
the command succeeded.

The protocol: each run's checkpoint is the epoch whose validation (dev) evaluation reached the highest
CIDEr with any strategy; when the data has a test split (data.test_annotations), that checkpoint is
evaluated on all of it with every strategy (eval/epoch_NNN.test.json) and the table reports the test
numbers, else the dev ones. The table (study.json / study.csv / study.md): one row per (stage, variant,
decoding strategy or reference row), the mean and the spread (sample standard deviation) over seeds,
how many seeds' dev choice the strategy was, and the minutes each run took.

Placeholders in commands: {study} (the study folder), {data_root} (the preset's data folder after `set`),
{run:<stage>/<variant>/<seed>} (a run folder of an earlier stage). A variant's settings may name a run of an
earlier training stage too, {run:<stage>/<variant>} meaning the one of the same seed: that is how a stage
starts from another's weights (decoder pretraining, then the full recipe):

    [[stage]]
    name = "pretraining"
    [stage.variants]
    text-lm = { "model.text_only" = true, "model.itc_weight" = 0.0, "train.max_steps" = 300 }

    [[stage]]
    name = "recipes"
    [stage.variants]
    decoder-pretrained = { "train.init" = "{run:pretraining/text-lm}", "train.max_steps" = 600 }

Selecting a run (--only) selects the runs its settings name.

A plan may ask one question of its table: how much of what one variant lost against another does a third win
back (CapFilt: of the CIDEr that noisy captions cost, how much does retraining on the bootstrapped data
recover?). Each run counts with its reported number (its dev-chosen checkpoint and decoding strategy):

    [recovery]
    metric = "cider"
    reference = "clean/tuned"          # stage/variant: the undamaged run
    degraded = "noisy/tuned"           # the damaged one
    treated = "bootstrapped/tuned"     # the repair
    target = 0.5                       # share of the cost it must win back ...
    # ... judged only where the cost exceeds two standard deviations over seeds (of reference and degraded)
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as M
from .config import BlipConfig, load_preset
from .data.derived import CAPFILT_SUMMARY
from .runs import STUDY_PLAN, STUDY_TABLE, RunDir, RunError, atomic_write_bytes, atomic_write_json, read_json

# The table's columns, from the registry: what evaluations log per strategy, R@1 both ways, and how well ITC
# and ITM tell an image's own caption from another image's.
TABLE_METRICS = tuple(m.key for group in ("captioning", "collapse") for m in M.metrics_in(group) if m.summary)
RETRIEVAL_METRICS = (*(m.key for m in M.metrics_in("retrieval") if m.headline),
                     *(m.key for m in M.metrics_in("matching")))
COMPLETE_MARKER = ".complete"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class PlanError(ValueError):
    """A study plan that cannot be run: what is wrong and where."""


@dataclass
class Stage:
    name: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # training stage: name -> overrides
    data: str | None = None  # train on the dataset this earlier command stage produced
    command: list[str] | None = None  # command stage: `python -m train` arguments
    produces: str | None = None  # command stage: the folder it makes

    @property
    def trains(self) -> bool:
        return self.command is None


@dataclass
class Recovery:
    """How much of what `degraded` lost against `reference` in `metric` the `treated` variant wins back."""
    metric: str
    reference: tuple[str, str]  # (stage, variant)
    degraded: tuple[str, str]
    treated: tuple[str, str]
    target: float = 0.5  # share of the cost to win back, judged where the cost exceeds 2 sd over seeds


RECOVERY_ROLES = ("reference", "degraded", "treated")


@dataclass
class Plan:
    name: str
    preset: str
    seeds: list[int]
    overrides: dict[str, Any]
    stages: list[Stage]
    recovery: Recovery | None = None

    def base_config(self) -> BlipConfig:
        return load_preset(self.preset).override(self.overrides)


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan; PlanError names the file and the problem."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{path}: not valid TOML ({err})") from None
    return parse_plan(table, str(path))


def parse_plan(table: dict[str, Any], source: str = "plan") -> Plan:
    def fail(message: str) -> PlanError:
        return PlanError(f"{source}: {message}")

    unknown = sorted(set(table) - {"name", "preset", "seeds", "set", "stage", "recovery"})
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (known: name, preset, seeds, set, stage, recovery)")
    seeds = table.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise fail(f"seeds must be a non-empty list of whole numbers >= 0, got {seeds!r}")
    stages, produced = [], set()
    for index, raw in enumerate(table.get("stage", [])):
        stage = _parse_stage(raw, index, produced, fail)
        if stage.name in {s.name for s in stages}:
            raise fail(f"two stages are named {stage.name!r}")
        stages.append(stage)
        if not stage.trains:
            produced.add(stage.name)
    if not any(stage.trains for stage in stages):
        raise fail("no training stage ([[stage]] with [stage.variants])")
    plan = Plan(str(table.get("name", Path(source).stem)), str(table.get("preset", "demo")), seeds,
                dict(table.get("set", {})), stages)
    try:
        base = plan.base_config()
    except ValueError as err:
        raise fail(f"preset / set: {err}") from None
    for index, stage in enumerate(stages):
        earlier = {(s.name, v) for s in stages[:index] if s.trains for v in s.variants}
        for variant, overrides in stage.variants.items():
            try:
                base.override(overrides)
            except ValueError as err:
                raise fail(f"variant {variant!r} of stage {stage.name!r}: {err}") from None
            for ref_stage, ref_variant, _ in _run_references(overrides):
                if (ref_stage, ref_variant) not in earlier:
                    raise fail(f"variant {variant!r} of stage {stage.name!r} names run {ref_stage}/{ref_variant}, "
                               "which is not a variant of an earlier training stage")
    if "recovery" in table:
        plan.recovery = _parse_recovery(table["recovery"], stages, fail)
    return plan


_RUN_REFERENCE = re.compile(r"\{run:([^{}/]+)/([^{}/]+)(?:/(\d+))?\}")


def _run_references(overrides: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """The runs a variant's settings name: (stage, variant, seed, or None for the run's own seed)."""
    return [(stage, variant, int(seed) if seed else None)
            for value in overrides.values() if isinstance(value, str)
            for stage, variant, seed in _RUN_REFERENCE.findall(value)]


def _parse_stage(raw: Any, index: int, produced: set[str], fail: Callable[[str], PlanError]) -> Stage:
    if not isinstance(raw, dict):
        raise fail(f"stage {index + 1} must be a table")
    name = raw.get("name", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail(f"stage {index + 1}: name {name!r}: letters, digits, '_' and '-'")
    unknown = sorted(set(raw) - {"name", "variants", "data", "command", "produces"})
    if unknown:
        raise fail(f"stage {name!r}: unknown key(s) {', '.join(unknown)}")
    if "command" in raw:
        command, produces = raw["command"], raw.get("produces")
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise fail(f"stage {name!r}: command must be a list of `python -m train` arguments")
        if not isinstance(produces, str) or "variants" in raw:
            raise fail(f"stage {name!r}: a command stage names the folder it `produces` and has no variants")
        return Stage(name, command=command, produces=produces)
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise fail(f"stage {name!r}: a training stage needs [stage.variants] (name = {{ overrides }})")
    for variant, overrides in variants.items():
        if not _NAME.fullmatch(variant) or not isinstance(overrides, dict):
            raise fail(f"stage {name!r}: variant {variant!r} must be a name with a table of overrides")
    data = raw.get("data")
    if data is not None and data not in produced:
        raise fail(f"stage {name!r}: data = {data!r} is not an earlier command stage")
    return Stage(name, variants=dict(variants), data=data)


def _parse_recovery(raw: Any, stages: list[Stage], fail: Callable[[str], PlanError]) -> Recovery:
    if not isinstance(raw, dict):
        raise fail("[recovery] must be a table")
    unknown = sorted(set(raw) - {"metric", *RECOVERY_ROLES, "target"})
    if unknown:
        raise fail(f"[recovery]: unknown key(s) {', '.join(unknown)} (known: metric, {', '.join(RECOVERY_ROLES)}, "
                   "target)")
    key = raw.get("metric", "cider")
    declared = M.metric(key) if isinstance(key, str) else None
    if key not in TABLE_METRICS or declared is None or declared.better is None:
        raise fail(f"[recovery]: metric {key!r} is not a table metric with a better direction "
                   f"(one of {', '.join(k for k in TABLE_METRICS if M.metric(k).better)})")
    runs = {f"{s.name}/{v}" for s in stages if s.trains for v in s.variants}
    named = []
    for role in RECOVERY_ROLES:
        value = raw.get(role)
        if not isinstance(value, str) or value not in runs:
            raise fail(f"[recovery]: {role} = {value!r} is not a stage/variant of the plan ({', '.join(sorted(runs))})")
        named.append(tuple(value.split("/")))
    target = raw.get("target", 0.5)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise fail(f"[recovery]: target is the share of the cost to win back, in (0, 1]; got {target!r}")
    return Recovery(key, *named, target=float(target))


# --- running ------------------------------------------------------------------------------------
TrainFn = Callable[[BlipConfig, Path, bool], dict[str, Any]]  # (config, run folder, resume) -> summary
CommandFn = Callable[[list[str]], int]  # `python -m train` arguments -> exit code
TestFn = Callable[[RunDir, int, list[str]], dict[str, Any]]  # (run, epoch, strategies) -> its test evaluation


def evaluate_on_test(run: RunDir, epoch: int, strategies: list[str]) -> dict[str, Any]:
    """The default TestFn: every image of the test split, METEOR included (blipcore.evaluation)."""
    from .evaluation import CheckpointEvaluator

    return CheckpointEvaluator(run, "test").evaluate(epoch, strategies, meteor=True, progress=False)


def dev_choice(run: RunDir) -> tuple[int, str] | None:
    """(epoch, strategy) of the run's highest validation CIDEr over its epoch evaluations; None before one."""
    best: tuple[float, int, str] | None = None
    for epoch in run.eval_epochs():
        for name, entry in run.load_eval(epoch).get("strategies", {}).items():
            cider = entry.get("metrics", {}).get("cider")
            if M.is_number(cider) and (best is None or cider > best[0]):
                best = (cider, epoch, name)
    return None if best is None else (best[1], best[2])


def reported_evaluation(run: RunDir, test: TestFn | None = None) -> tuple[int, str, str, dict[str, Any]] | None:
    """(epoch, split, dev-chosen strategy, evaluation) that the table reports for a run: the test evaluation of
    its dev-chosen epoch when its data has a test split (made with `test` when missing and `test` is given),
    else that epoch's validation evaluation. None before the run's first evaluation, or while its test
    evaluation is missing and `test` is None."""
    choice = dev_choice(run)
    if choice is None:
        return None
    epoch, strategy = choice
    if not run.config().data.test_annotations:
        return epoch, "val", strategy, run.load_eval(epoch)
    if run.eval_path(epoch, "test").is_file():
        return epoch, "test", strategy, run.load_eval(epoch, "test")
    if test is None:
        return None
    return epoch, "test", strategy, test(run, epoch, list(run.load_eval(epoch).get("strategies", {})))


def run_dir(study: Path, stage: str, variant: str, seed: int) -> Path:
    return study / f"{stage}-{variant}-seed{seed}"


def selection(plan: Plan, only: Sequence[str] = (), seeds: Sequence[int] | None = None) -> set[tuple[str, str, int]]:
    """The (stage, variant, seed) runs that `only` ("STAGE" or "STAGE/VARIANT"; empty = all) and `seeds`
    (None = the plan's) select; PlanError names a stage, variant or seed the plan does not have."""
    chosen_seeds = list(plan.seeds if seeds is None else seeds)
    if unknown := sorted(set(chosen_seeds) - set(plan.seeds)):
        raise PlanError(f"seed(s) {unknown} are not in the plan's seeds {plan.seeds}")
    runs = {(stage.name, variant, seed) for stage in plan.stages if stage.trains
            for variant in stage.variants for seed in chosen_seeds}
    if not only:
        return runs
    picked: set[tuple[str, str, int]] = set()
    for pattern in only:
        stage_name, _, variant = pattern.partition("/")
        matched = {run for run in runs if run[0] == stage_name and variant in ("", run[1])}
        if not matched:
            names = ", ".join(f"{s.name}/{v}" for s in plan.stages if s.trains for v in s.variants)
            raise PlanError(f"--only {pattern!r} matches no training run of the plan (stage/variant: {names})")
        picked |= matched
    overrides = {(s.name, v): o for s in plan.stages if s.trains for v, o in s.variants.items()}
    for stage in reversed(plan.stages):  # a run's settings name only earlier stages' runs: walk back once
        for name, variant, seed in [run for run in picked if run[0] == stage.name]:
            picked |= {(ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
                       for ref_stage, ref_variant, ref_seed in _run_references(overrides[name, variant])}
    return picked


def run_study(plan: Plan, study: Path, train: TrainFn, command: CommandFn,
              log: Callable[[str], None] = print, test: TestFn = evaluate_on_test,
              only: Sequence[str] = (), seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Run the stages of `plan` into `study` (skipping what is complete, resuming what is not), evaluate
    each run's dev-chosen checkpoint on the test split when there is one, then write and return the table
    (of every run in the folder). `only` and `seeds` restrict which runs train in this call (see
    `selection`), so a long plan can be spread over sessions; the command stages they need still run.
    `train` trains one run (blipcore.trainer.Trainer in the CLI); `command` runs `python -m train ARGS` (the
    CLI passes its own main, so blipcore never imports train)."""
    selected = selection(plan, only, seeds)
    needed = {stage.data for stage in plan.stages if any(run[0] == stage.name for run in selected)}
    study.mkdir(parents=True, exist_ok=True)
    write_table(plan, study)  # from the start: the folder is a study, its finished runs already in the table
    produced: dict[str, Path] = {}
    base = plan.base_config()
    for stage in plan.stages:
        if not stage.trains:
            if stage.name in needed:
                produced[stage.name] = _run_command(stage, plan, study, base, command, log)
            continue
        for variant, overrides in stage.variants.items():
            for seed in plan.seeds:
                if (stage.name, variant, seed) not in selected:
                    continue
                values = {"study": str(study), "data_root": base.data.root, "seed": str(seed)}
                filled = {key: _fill(value, values, plan, study) if isinstance(value, str) else value
                          for key, value in overrides.items()}
                cfg = base.override({**filled, "train.seed": seed})
                if stage.data is not None:
                    cfg = cfg.override({"data.root": str(produced[stage.data])})
                cfg.name = f"{plan.name}/{stage.name}/{variant}"
                target = run_dir(study, stage.name, variant, seed)
                status = _status(target)
                if status == "completed":
                    log(f"{target.name}: completed, skipped")
                else:
                    log(f"{target.name}: {'resuming' if status else 'training'}")
                    train(cfg, target, status is not None)
                reported_evaluation(RunDir(target), test)  # the test evaluation, once
    return write_table(plan, study)


def _status(folder: Path) -> str | None:
    run = RunDir(folder)
    if not run.exists():
        return None
    try:
        return str(run.read_info().get("status"))
    except RunError:
        return None


def _run_command(stage: Stage, plan: Plan, study: Path, base: BlipConfig, command: CommandFn,
                 log: Callable[[str], None]) -> Path:
    values = {"study": str(study), "data_root": base.data.root}
    output = Path(_fill(stage.produces or "", values, plan, study))
    if (output / COMPLETE_MARKER).is_file():
        log(f"{stage.name}: {output} is complete, skipped")
        return output
    args = [_fill(arg, values, plan, study) for arg in stage.command or []]
    log(f"{stage.name}: python -m train {' '.join(args)}")
    code = command(args)
    if code != 0:
        raise RunError(f"stage {stage.name!r}: `python -m train {' '.join(args)}` exited with {code}")
    if not output.is_dir():
        raise RunError(f"stage {stage.name!r}: the command succeeded but did not make {output}")
    atomic_write_bytes(output / COMPLETE_MARKER, b"")
    return output


def _fill(text: str, values: dict[str, str], plan: Plan, study: Path) -> str:
    def replace(match: re.Match) -> str:
        key = match.group(1)
        reference = _RUN_REFERENCE.fullmatch(match.group(0))
        if reference:
            stage, variant, seed = reference.groups()
            if not seed and "seed" not in values:
                raise PlanError(f"{{{key}}} names no seed: {{run:<stage>/<variant>/<seed>}} in a command")
            return str(run_dir(study, stage, variant, int(seed or values["seed"])))
        if key not in values:
            known = ", ".join([*values, "run:<stage>/<variant>/<seed>"])
            raise PlanError(f"unknown placeholder {{{key}}} (known: {known})")
        return values[key]

    return re.sub(r"\{([^{}]+)\}", replace, text)


# --- the table ----------------------------------------------------------------------------------
# {(stage, variant): {seed: (run, epoch, split, dev-chosen strategy, evaluation)}}
Reported = dict[tuple[str, str], dict[int, tuple[RunDir, int, str, str, dict[str, Any]]]]


def reported_runs(plan: Plan, study: Path) -> Reported:
    """Each training variant's runs that have a reported evaluation (see `reported_evaluation`), read once for
    the whole table."""
    reported: Reported = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = reported.setdefault((stage.name, variant), {})
            for seed in plan.seeds:
                run = RunDir(run_dir(study, stage.name, variant, seed))
                if run.exists() and (evaluation := reported_evaluation(run)) is not None:
                    found[seed] = (run, *evaluation)
    return reported


def study_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """One row per (stage, variant, strategy or reference row): mean and spread over the seeds' runs."""
    rows = []
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = list(reported.get((stage.name, variant), {}).values())
            by_row: dict[str, list[dict[str, Any]]] = {}
            splits = {split for _, _, split, _, _ in found}
            for run, epoch, _, chosen, result in found:
                entries = {**result.get("strategies", {}), **result.get("reference_rows", {})}
                for name, entry in entries.items():
                    values = {**entry.get("metrics", {}), **result.get("retrieval", {}), **result.get("matching", {}),
                              "epoch": epoch, "minutes": (run.read_info().get("train_seconds") or 0) / 60,
                              "chosen": name == chosen}
                    by_row.setdefault(name, []).append(values)
            for name, values in by_row.items():
                row: dict[str, Any] = {"stage": stage.name, "variant": variant, "decoding": name,
                                       "split": "/".join(sorted(splits)), "seeds": len(values),
                                       "chosen_on_dev": sum(v["chosen"] for v in values),
                                       "epochs": sorted({v["epoch"] for v in values})}
                for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, "minutes"):
                    numbers = [v[key] for v in values if M.is_number(v.get(key))]
                    row[key] = statistics.fmean(numbers) if numbers else None
                    row[f"{key}_sd"] = statistics.stdev(numbers) if len(numbers) > 1 else None
                rows.append(row)
    return rows


def filter_rows(plan: Plan, study: Path) -> list[dict[str, Any]]:
    """One row per (CapFilt command stage, scorer) whose output exists: how well the filter found the planted
    captions (ROC AUC, precision, recall) and what it kept (blipcore.capfilt's capfilt.json)."""
    values = {"study": str(study), "data_root": plan.base_config().data.root}
    rows = []
    for stage in (s for s in plan.stages if not s.trains):
        summary_path = Path(_fill(stage.produces or "", values, plan, study)) / CAPFILT_SUMMARY
        if not summary_path.is_file():
            continue
        summary = read_json(summary_path, "CapFilt summary")
        counts, planted = summary.get("counts", {}), summary.get("planted") or {}
        for scorer in summary.get("scorers", []):
            detection = (planted.get("scorers") or {}).get(scorer) or {}
            rows.append({"stage": stage.name, "scorer": scorer, "decided": scorer == summary.get("score"),
                         "auc": detection.get("auc"), "precision": detection.get("precision"),
                         "recall": detection.get("recall"), "dropped_original": detection.get("dropped"),
                         "planted": planted.get("planted"), "original": counts.get("original"),
                         "kept_original": counts.get("kept_original"), "synthetic": counts.get("synthetic"),
                         "kept_synthetic": counts.get("kept_synthetic")})
    return rows


def recovery_summary(plan: Plan, reported: Reported) -> dict[str, Any] | None:
    """The plan's [recovery] question answered from its runs' reported numbers (each run's metric at its
    dev-chosen strategy); None when the plan asks none."""
    recovery = plan.recovery
    if recovery is None:
        return None
    values = {}
    for role in RECOVERY_ROLES:
        values[role] = {}
        for seed, (_, _, _, chosen, result) in reported.get(getattr(recovery, role), {}).items():
            value = result.get("strategies", {}).get(chosen, {}).get("metrics", {}).get(recovery.metric)
            if M.is_number(value):
                values[role][seed] = float(value)
    return judge_recovery(recovery, values)


def judge_recovery(recovery: Recovery, values: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Each role's per-seed values ({role: {seed: value}}), mean and sd; the cost (reference - degraded, in the
    metric's better direction), what the treated variant won back, their ratio, and a verdict: "met" or
    "missed" only where the cost exceeds two standard deviations over seeds of the reference and the degraded
    runs (the larger of the two), else why it is not decided."""
    summary: dict[str, Any] = {"metric": recovery.metric, "target": recovery.target}
    for role in RECOVERY_ROLES:
        found = values.get(role, {})
        summary[role] = {"run": "/".join(getattr(recovery, role)),
                         "values": {str(seed): v for seed, v in found.items()},
                         "mean": statistics.fmean(found.values()) if found else None,
                         "sd": statistics.stdev(found.values()) if len(found) > 1 else None}
    summary.update(cost=None, won_back=None, share=None, two_sd=None)
    means = [summary[role]["mean"] for role in RECOVERY_ROLES]
    if any(mean is None for mean in means):
        summary["verdict"] = "not yet: every role needs an evaluated run"
        return summary
    sign = 1.0 if M.metric(recovery.metric).better == "higher" else -1.0
    reference, degraded, treated = means
    cost, won_back = sign * (reference - degraded), sign * (treated - degraded)
    summary.update(cost=cost, won_back=won_back, share=won_back / cost if cost > 0 else None)
    spreads = [summary[role]["sd"] for role in ("reference", "degraded")]
    if cost <= 0:
        summary["verdict"] = "no cost: the degraded runs are not worse than the reference"
    elif any(sd is None for sd in spreads):
        summary["verdict"] = "not decided: the spread needs 2 or more seeds of the reference and the degraded runs"
    else:
        summary["two_sd"] = 2 * max(spreads)
        if cost <= summary["two_sd"]:
            summary["verdict"] = "not decided: the cost is within two standard deviations over seeds"
        else:
            summary["verdict"] = "met" if summary["share"] >= recovery.target else "missed"
    return summary


def recovery_markdown(summary: dict[str, Any] | None) -> str:
    """The recovery question as a short Markdown table (empty without one)."""
    if not summary:
        return ""
    declared = M.metric(summary["metric"])

    def role(name: str) -> str:
        entry = summary[name]
        spread = f" ± {declared.format(entry['sd'])}" if entry["sd"] is not None else ""
        seeds = len(entry["values"])
        return f"{declared.format(entry['mean'])}{spread} ({seeds} seed{'' if seeds == 1 else 's'})"

    share = "-" if summary["share"] is None else f"{100 * summary['share']:.0f}%"
    heads = [f"{summary[name]['run']} ({name})" for name in RECOVERY_ROLES]
    return "\n".join([
        "", f"Recovery in {declared.label}: each run's dev-chosen checkpoint and decoding, mean ± sd over seeds", "",
        "| " + " | ".join([*heads, "cost", "won back", "share won back", "target", "verdict"]) + " |",
        "|" + "---|" * 8,
        "| " + " | ".join([*(role(name) for name in RECOVERY_ROLES), declared.format(summary["cost"]),
                           declared.format(summary["won_back"]), share, f"{100 * summary['target']:.0f}%",
                           summary["verdict"]]) + " |",
    ]) + "\n"


def write_table(plan: Plan, study: Path) -> dict[str, Any]:
    """study.json, study.csv and study.md in `study`; returns the JSON content."""
    reported = reported_runs(plan, study)
    rows = study_rows(plan, reported)
    filters = filter_rows(plan, study)
    recovery = recovery_summary(plan, reported)
    table = {"name": plan.name, "preset": plan.preset, "seeds": plan.seeds, "rows": rows, "filters": filters,
             "recovery": recovery}
    atomic_write_json(study / STUDY_TABLE, table)
    columns = ["stage", "variant", "decoding", "split", "seeds", "chosen_on_dev", "epochs"] + [
        k for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, "minutes") for k in (key, f"{key}_sd")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(study / "study.csv", buffer.getvalue().encode())
    markdown = markdown_table(rows) + filters_markdown(filters) + recovery_markdown(recovery)
    atomic_write_bytes(study / "study.md", markdown.encode())
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The study as a Markdown table: mean ± sd over seeds, in each metric's declared format."""
    keys = [*TABLE_METRICS, *RETRIEVAL_METRICS, "minutes"]
    labels = [M.metric(k).label if M.metric(k) else k for k in keys]
    lines = ["| stage | variant | decoding | split | seeds (chosen on dev) | " + " | ".join(labels) + " |",
             "|" + "---|" * (5 + len(keys))]
    for row in rows:
        cells = []
        for key in keys:
            declared = M.metric(key)
            show = declared.format if declared else (lambda v: "-" if v is None else f"{v:.1f}")
            value, spread = row.get(key), row.get(f"{key}_sd")
            shown_spread = spread is not None and not math.isnan(spread)
            cells.append(show(value) + (f" ± {show(spread)}" if shown_spread else ""))
        head = (f"| {row['stage']} | {row['variant']} | {row['decoding']} | {row['split']} | "
                f"{row['seeds']} ({row['chosen_on_dev']}) | ")
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def filters_markdown(filters: Sequence[dict[str, Any]]) -> str:
    """The CapFilt filters as a Markdown table (empty when the study has none)."""
    if not filters:
        return ""

    def share(value: Any) -> str:
        return "-" if not M.is_number(value) else f"{100 * value:.1f}%"

    lines = ["", "CapFilt filters: finding the planted captions among the originals (low score = planted)", "",
             "| stage | scorer | decided | ROC AUC | precision | recall | originals kept | synthetic kept |",
             "|---|---|---|---|---|---|---|---|"]
    for row in filters:
        auc = "-" if not M.is_number(row["auc"]) else f"{row['auc']:.3f}"
        lines.append(f"| {row['stage']} | {row['scorer']} | {'yes' if row['decided'] else 'no'} | {auc} | "
                     f"{share(row['precision'])} | {share(row['recall'])} | {row['kept_original']} of "
                     f"{row['original']} | {row['kept_synthetic']} of {row['synthetic']} |")
    return "\n".join(lines) + "\n"


def save_plan_copy(plan_path: Path, study: Path) -> None:
    """Keep the plan beside its runs (study/plan.toml), so the folder says how it was made."""
    atomic_write_bytes(study / STUDY_PLAN, Path(plan_path).read_bytes())

