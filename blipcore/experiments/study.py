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
plan again skips what is complete and resumes what is not, so a long study can be run a few runs at a time. A command
stage is done when its `produces` folder holds a `.complete` marker, which this module writes after
the command succeeded.

The protocol: each run's checkpoint is the epoch whose validation (dev) evaluation reached the highest
CIDEr with any strategy; when the data has a test split (data.test_annotations), that checkpoint is
evaluated on all of it with every strategy (eval/epoch_NNN.test.json) and the table reports the test
numbers, else the dev ones. The table (study.json / study.csv / study.md): one row per (stage, variant,
decoding strategy or reference row), the mean and the spread (sample standard deviation) over seeds,
how many seeds' dev choice the strategy was, and the minutes each run took.

Placeholders in commands: {study} (the study folder), {data_root} (the preset's data folder after `set`),
{run:<stage>/<variant>/<seed>} (a run folder of an earlier stage). A command stage whose `produces` holds {seed}
runs once per seed, and each seed's runs of the stages trained on it use that seed's output; its command may use
{seed} and name runs without a seed, {run:<stage>/<variant>} meaning the one of the same seed. That is how every
seed of a CapFilt plan is the whole loop (its own noisy model captions and filters for its own retraining):

    [[stage]]
    name = "bootstrapped-data"
    command = ["capfilt", "--captioner", "{run:noisy/tuned}", "--filter", "{run:noisy/tuned}", "--data",
               "{study}/data/noisy", "--out", "{study}/data/bootstrapped-seed{seed}", "--seed", "{seed}"]
    produces = "{study}/data/bootstrapped-seed{seed}"
 A variant's settings may name a run of an
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

Selecting a run (--only) selects the runs its settings name, and the runs a command stage it trains on names
(CapFilt's captioner), while that stage's output is not there yet.

A study stops at a run that did not complete (Ctrl-C, SIGTERM, a step budget cut short): the table leaves it
out, and the same command resumes it. Its later runs may build on it, so they wait.

Run folders are big and often do not outlive a machine; the numbers do. With a results folder (`--results DIR`)
every completed run's reported numbers (its dev-chosen checkpoint's evaluation, metrics only: no captions, no
weights) and every CapFilt stage's summary are kept there as small JSON files, one a run, meant to be committed.
The table counts a recorded run whose folder is gone, and the study does not train it again, unless a stage still
to run needs its folder (a captioner), or the plan now gives it other settings (the record is then ignored,
with a message). A run folder that is there always wins over its record.

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

And it may state targets, levels every training variant is judged against on the same reported numbers (mean over
seeds): a metric's level (at least, or at most for a lower-is-better metric), or a margin over a reference row,
met only where the margin also exceeds two standard deviations over seeds (of the variant and of the row):

    [[target]]
    metric = "cider"
    value = 0.30                       # CIDEr at least 0.30
    [[target]]
    metric = "cider"
    above = "nearest-neighbour"        # CIDEr at least 0.05 better than the nearest-neighbour row, and by more
    by = 0.05                          # than two sd over seeds
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.derived import CAPFILT_SUMMARY
from ..evaluation import metrics as M
from ..io import atomic_write_bytes, atomic_write_json
from ..model.config import BlipConfig, load_preset
from ..model.flops import training_step_flops
from ..runs.rundir import STUDY_PLAN, STUDY_TABLE, RunDir, RunError, read_json

# The table's columns, from the registry: what evaluations log per strategy, R@1 both ways, and how well ITC
# and ITM tell an image's own caption from another image's.
TABLE_METRICS = tuple(m.key for group in ("captioning", "collapse") for m in M.metrics_in(group) if m.summary)
RETRIEVAL_METRICS = (*(m.key for m in M.metrics_in("retrieval") if m.headline),
                     *(m.key for m in M.metrics_in("matching")))
COMPLETE_MARKER = ".complete"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class PlanError(ValueError):
    """A study plan that cannot be run: what is wrong and where."""


class StudyStopped(Exception):
    """A run of the study did not complete (stopped by a signal, or its budget cut short): the study stopped
    after it, with its table written; running the same command again resumes it."""


@dataclass
class Stage:
    name: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # training stage: name -> overrides
    data: str | None = None  # train on the dataset this earlier command stage produced
    command: list[str] | None = None  # command stage: `python -m train` arguments
    produces: str | None = None  # command stage: the folder it makes
    resume: list[str] | None = None  # command stage: arguments added when a stopped run left `produces` unfinished

    @property
    def trains(self) -> bool:
        return self.command is None

    @property
    def per_seed(self) -> bool:
        """A command stage that runs once per seed (its `produces` holds {seed})."""
        return "{seed}" in (self.produces or "")


@dataclass
class Target:
    """A level the plan's variants should reach, judged on each run's reported number (its dev-chosen checkpoint
    and decoding strategy), mean over seeds. One of:
    - `value`: `metric` at least `value` (at most, for a lower-is-better metric);
    - `above` a reference row (metrics.REFERENCE_ROWS): better than the row by at least `by`, and by more than two
      standard deviations over seeds (of the variant and of the row);
    - `above` another variant ("stage/variant"): better by at least `by` and by more than two pooled standard
      deviations over seeds, and its worst seed better than the other's best (a remedy that "helped");
    - `not_below` another variant: not worse than it by more than two pooled standard deviations."""
    metric: str
    value: float | None = None
    above: str | None = None  # a reference row, or a "stage/variant" of the plan
    by: float = 0.0
    not_below: str | None = None  # a "stage/variant" of the plan

    @property
    def other_variant(self) -> str | None:
        """The "stage/variant" this target compares with, if any."""
        if self.not_below is not None:
            return self.not_below
        return self.above if self.above is not None and "/" in self.above else None

    def describe(self) -> str:
        declared = M.metric(self.metric)
        if self.not_below is not None:
            return f"{declared.label} not below {self.not_below} (by > 2 sd)"
        if self.above is None:
            return f"{declared.label} {'≥' if declared.better == 'higher' else '≤'} {declared.format(self.value)}"
        if self.other_variant is not None:
            return f"{declared.label} {declared.format(self.by)} better than {self.above}, by > 2 sd, every seed"
        return f"{declared.label} {declared.format(self.by)} better than {self.above}, by > 2 sd"


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
    targets: list[Target] = field(default_factory=list)
    reference: str | None = None  # "stage/variant" whose cost the table gives the others' as a ratio of

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

    known = ("name", "preset", "seeds", "set", "stage", "recovery", "target", "reference")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
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
        for ref_stage, ref_variant, _ in (run for arg in stage.command or [] for run in _command_runs(arg)):
            if (ref_stage, ref_variant) not in earlier:
                raise fail(f"command stage {stage.name!r} names run {ref_stage}/{ref_variant}, which is not a variant "
                           "of an earlier training stage")
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
    raw_targets = table.get("target", [])
    if not isinstance(raw_targets, list):
        raise fail("targets are [[target]] tables")
    variants = {f"{s.name}/{v}" for s in stages if s.trains for v in s.variants}
    plan.targets = [_parse_target(raw, index, variants, fail) for index, raw in enumerate(raw_targets)]
    if "reference" in table:
        if table["reference"] not in variants:
            raise fail(f"reference = {table['reference']!r} is not a stage/variant of the plan "
                       f"({', '.join(sorted(variants))})")
        plan.reference = table["reference"]
    return plan


_RUN_REFERENCE = re.compile(r"\{run:([^{}/]+)/([^{}/]+)(?:/(\d+))?\}")


def _command_runs(text: str) -> list[tuple[str, str, int | None]]:
    """The runs a text names: (stage, variant, seed, or None for the seed of the run or command it is part of)."""
    return [(stage, variant, int(seed) if seed else None) for stage, variant, seed in _RUN_REFERENCE.findall(text)]


def _run_references(overrides: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """The runs a variant's settings name (see _command_runs)."""
    return [run for value in overrides.values() if isinstance(value, str) for run in _command_runs(value)]


def _parse_stage(raw: Any, index: int, produced: set[str], fail: Callable[[str], PlanError]) -> Stage:
    if not isinstance(raw, dict):
        raise fail(f"stage {index + 1} must be a table")
    name = raw.get("name", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail(f"stage {index + 1}: name {name!r}: letters, digits, '_' and '-'")
    unknown = sorted(set(raw) - {"name", "variants", "data", "command", "produces", "resume"})
    if unknown:
        raise fail(f"stage {name!r}: unknown key(s) {', '.join(unknown)}")
    if "command" in raw:
        command, produces = raw["command"], raw.get("produces")
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise fail(f"stage {name!r}: command must be a list of `python -m train` arguments")
        if not isinstance(produces, str) or "variants" in raw:
            raise fail(f"stage {name!r}: a command stage names the folder it `produces` and has no variants")
        resume = raw.get("resume")
        if resume is not None and not (isinstance(resume, list) and all(isinstance(a, str) for a in resume)):
            raise fail(f"stage {name!r}: resume must be a list of arguments (e.g. [\"--resume\"])")
        stage = Stage(name, command=command, produces=produces, resume=resume)
        if not stage.per_seed and any("{seed}" in arg or any(seed is None for *_, seed in _command_runs(arg))
                                      for arg in command):
            raise fail(f"stage {name!r}: its command uses {{seed}} or names a run without its seed, so it runs once "
                       "per seed: its `produces` must hold {seed} too")
        return stage
    if "resume" in raw:
        raise fail(f"stage {name!r}: resume belongs to a command stage (a training run resumes by itself)")
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
    key = _judged_metric(raw.get("metric", "cider"), "[recovery]", fail)
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


def _judged_metric(key: Any, where: str, fail: Callable[[str], PlanError]) -> str:
    """`key` when it is a metric of the table with a better direction, else the PlanError saying which are."""
    judged = [k for k in (*TABLE_METRICS, *RETRIEVAL_METRICS) if M.metric(k).better]
    if not isinstance(key, str) or key not in judged:
        raise fail(f"{where}: metric {key!r} is not a table metric with a better direction "
                   f"(one of {', '.join(judged)})")
    return key


def _parse_target(raw: Any, index: int, variants: set[str], fail: Callable[[str], PlanError]) -> Target:
    where = f"[[target]] {index + 1}"
    if not isinstance(raw, dict):
        raise fail(f"{where} must be a table")
    unknown = sorted(set(raw) - {"metric", "value", "above", "by", "not_below"})
    if unknown:
        raise fail(f"{where}: unknown key(s) {', '.join(unknown)} (known: metric, value, above, by, not_below)")
    key = _judged_metric(raw.get("metric"), where, fail)
    if "not_below" in raw:
        if set(raw) - {"metric", "not_below"}:
            raise fail(f"{where}: not_below takes no value, above or by")
        if raw["not_below"] not in variants:
            raise fail(f"{where}: not_below = {raw['not_below']!r} is not a stage/variant of the plan "
                       f"({', '.join(sorted(variants))})")
        return Target(key, not_below=raw["not_below"])

    def number(name: str) -> float:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{where}: {name} must be a number, got {value!r}")
        return float(value)

    if ("value" in raw) == ("above" in raw):
        raise fail(f"{where}: give either a value (a level of {key}) or above (a reference row to beat), not both")
    if "value" in raw:
        if "by" in raw:
            raise fail(f"{where}: by is a margin over a reference row (above = ...), not a level's")
        return Target(key, value=number("value"))
    if raw["above"] not in M.REFERENCE_ROWS and raw["above"] not in variants:
        raise fail(f"{where}: above = {raw['above']!r} is neither a reference row ({', '.join(M.REFERENCE_ROWS)}) "
                   f"nor a stage/variant of the plan ({', '.join(sorted(variants))})")
    if raw["above"] in M.REFERENCE_ROWS and key not in TABLE_METRICS:
        raise fail(f"{where}: a reference row has no {key} (a captioning or collapse metric is judged above a row)")
    by = number("by") if "by" in raw else 0.0
    if by < 0:
        raise fail(f"{where}: by is how much better than the row, >= 0; got {by!r}")
    return Target(key, above=raw["above"], by=by)


# --- running ------------------------------------------------------------------------------------
TrainFn = Callable[[BlipConfig, Path, bool], dict[str, Any]]  # (config, run folder, resume) -> summary
CommandFn = Callable[[list[str]], int]  # `python -m train` arguments -> exit code
TestFn = Callable[[RunDir, int, list[str]], dict[str, Any]]  # (run, epoch, strategies) -> its test evaluation


def evaluate_on_test(run: RunDir, epoch: int, strategies: list[str]) -> dict[str, Any]:
    """The default TestFn: every image of the test split, METEOR included (blipcore.evaluation.evaluator)."""
    from ..evaluation.evaluator import CheckpointEvaluator

    return CheckpointEvaluator(run, "test").evaluate(epoch, strategies, meteor=True, progress=False)


def dev_choice(run: RunDir) -> tuple[int, str] | None:
    """(epoch, strategy) of the run's highest validation CIDEr over its epoch evaluations; None before one. An
    image-only run (model.mae, image pretraining) writes no caption: its last epoch, strategy ""."""
    if run.config().model.mae:
        epochs = run.eval_epochs()
        return (epochs[-1], "") if epochs else None
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
    evaluation is missing and `test` is None. An image-only run reports its validation evaluation (its losses):
    it has no caption or retrieval for a test evaluation to measure."""
    choice = dev_choice(run)
    if choice is None:
        return None
    epoch, strategy = choice
    if not run.config().data.test_annotations or run.config().model.mae:
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
              only: Sequence[str] = (), seeds: Sequence[int] | None = None,
              results: Path | None = None) -> dict[str, Any]:
    """Run the stages of `plan` into `study` (skipping what is complete or recorded in `results`, resuming what
    is not), evaluate each run's dev-chosen checkpoint on the test split when there is one, then write and return
    the table (of every run in the folder and in `results`). `only` and `seeds` restrict which runs train in this
    call (see `selection`), so a long plan can be run a few runs at a time; the command stages they need, and the runs
    those name, still run. A run that ends without completing stops the study (StudyStopped, after the table).
    `train` trains one run (blipcore.training.trainer.Trainer in the CLI); `command` runs `python -m train ARGS`
    (the CLI passes its own main, so blipcore never imports train)."""
    selected = selection(plan, only, seeds)
    study.mkdir(parents=True, exist_ok=True)
    write_table(plan, study, results, log)  # from the start: the folder is a study, its finished runs in the table
    recorded = set(read_records(plan, study, results)) if results is not None else set()
    must = _runs_to_train(plan, study, selected, recorded)
    needed = {(stage.data, seed if _stage(plan, stage.data).per_seed else None)
              for stage in plan.stages if stage.data is not None
              for name, _, seed in must if name == stage.name}
    for stage in plan.stages:
        if not stage.trains:
            for seed in sorted(seed for name, seed in needed if name == stage.name and seed is not None):
                _run_command(stage, plan, study, command, log, seed)
            if (stage.name, None) in needed:
                _run_command(stage, plan, study, command, log)
            continue
        for variant in stage.variants:
            for seed in plan.seeds:
                run = (stage.name, variant, seed)
                target = run_dir(study, *run)
                status = _status(target)
                if run in must:
                    log(f"{target.name}: {'resuming' if status else 'training'}")
                    train(planned_config(plan, study, stage, variant, seed), target, status is not None)
                    status = _status(target)
                    if status != "completed":
                        write_table(plan, study, results)
                        raise StudyStopped(f"{target} is {status}, so the study stopped there (its later runs may "
                                           "build on it); run the same command again to resume it")
                elif run not in selected:
                    continue
                elif status != "completed":
                    log(f"{target.name}: recorded in {results}, skipped")
                    continue
                else:
                    log(f"{target.name}: completed, skipped")
                reported_evaluation(RunDir(target), test)  # the test evaluation, once (also of a run stopped in it)
    return write_table(plan, study, results)


def planned_config(plan: Plan, study: Path, stage: Stage, variant: str, seed: int) -> BlipConfig:
    """The config the plan gives one run: the preset, the plan's settings, the variant's (placeholders filled),
    its seed, and the dataset of the command stage it trains on."""
    base = plan.base_config()
    values = {"study": str(study), "data_root": base.data.root, "seed": str(seed)}
    filled = {key: _fill(value, values, plan, study) if isinstance(value, str) else value
              for key, value in stage.variants[variant].items()}
    cfg = base.override({**filled, "train.seed": seed})
    if stage.data is not None:
        cfg = cfg.override({"data.root": str(_produces(_stage(plan, stage.data), plan, study, seed))})
    cfg.name = f"{plan.name}/{stage.name}/{variant}"
    return cfg


def _stage(plan: Plan, name: str) -> Stage:
    return next(stage for stage in plan.stages if stage.name == name)


def _runs_to_train(plan: Plan, study: Path, selected: set[tuple[str, str, int]],
                   recorded: set[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    """The selected runs that neither completed in `study` nor are recorded, and the runs whose folders those
    need: the runs their settings start from (train.init) and the runs named by the command stage they train on
    while its output is not there (CapFilt's captioner). A needed run trains even when a record holds its numbers:
    the record has no weights."""
    overrides = {(s.name, v): o for s in plan.stages if s.trains for v, o in s.variants.items()}

    def completed(run: tuple[str, str, int]) -> bool:
        return _status(run_dir(study, *run)) == "completed"

    must = {run for run in selected if run not in recorded and not completed(run)}
    for stage in reversed(plan.stages):  # runs name only earlier stages' runs: walk back once
        for name, variant, seed in [run for run in must if run[0] == stage.name]:
            needs = {(ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
                     for ref_stage, ref_variant, ref_seed in _run_references(overrides[name, variant])}
            data = _stage(plan, stage.data) if stage.data is not None else None
            if data is not None and not (_produces(data, plan, study, seed) / COMPLETE_MARKER).is_file():
                needs |= {(ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
                          for arg in data.command or [] for ref_stage, ref_variant, ref_seed in _command_runs(arg)}
            must |= {run for run in needs if not completed(run)}
    return must


def _status(folder: Path) -> str | None:
    run = RunDir(folder)
    if not run.exists():
        return None
    try:
        return str(run.read_info().get("status"))
    except RunError:
        return None


def _command_values(stage: Stage, plan: Plan, study: Path, seed: int | None) -> dict[str, str]:
    """A command stage's placeholders: {seed} only for one that runs per seed (then `seed` is its seed)."""
    values = {"study": str(study), "data_root": plan.base_config().data.root}
    return {**values, "seed": str(seed)} if stage.per_seed else values


def _produces(stage: Stage, plan: Plan, study: Path, seed: int | None = None) -> Path:
    """The folder a command stage makes (for `seed`, when it runs per seed)."""
    return Path(_fill(stage.produces or "", _command_values(stage, plan, study, seed), plan, study))


def _run_command(stage: Stage, plan: Plan, study: Path, command: CommandFn, log: Callable[[str], None],
                 seed: int | None = None) -> None:
    output = _produces(stage, plan, study, seed)
    if (output / COMPLETE_MARKER).is_file():
        log(f"{stage.name}: {output} is complete, skipped")
        return
    values = _command_values(stage, plan, study, seed)
    args = [_fill(arg, values, plan, study) for arg in stage.command or []]
    if output.exists():  # a stopped command left it unfinished
        if stage.resume is None:
            raise RunError(f"stage {stage.name!r}: {output} is unfinished (its command was stopped): give the stage "
                           "`resume = [...]`, the arguments that continue it, or remove the folder to start again")
        args += stage.resume
    log(f"{stage.name}: python -m train {' '.join(args)}")
    code = command(args)
    if code != 0:
        raise RunError(f"stage {stage.name!r}: `python -m train {' '.join(args)}` exited with {code}")
    if not output.is_dir():
        raise RunError(f"stage {stage.name!r}: the command succeeded but did not make {output}")
    atomic_write_bytes(output / COMPLETE_MARKER, b"")


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


# --- what a run counts with: its folder, or its record ------------------------------------------------------
# Config fields that say where a run's files are, not how it trained: a record made on another machine matches.
LOCATION_FIELDS = ("name", "data.root", "train.init")


@dataclass
class RunResult:
    """What the table counts for one run: its reported evaluation (see `reported_evaluation`), numbers only, and
    what the run cost. Made from a completed run folder, or read back from its record in a results folder."""
    epoch: int
    split: str
    chosen: str  # the dev-chosen decoding strategy
    evaluation: dict[str, Any]  # num_images, losses, retrieval, matching, strategies / reference_rows -> metrics
    train_seconds: float | None
    samples_per_s: float | None  # the median of its training lines
    machine: dict[str, Any]  # device (CPU model, fp32 matmul GFLOP/s), revisions (start, resumes), when it ended
    config: dict[str, Any]
    # What happened on the way there (see `run_history`): every validation evaluation's numbers and the training
    # log, thinned. Empty for records written before records kept it.
    history: dict[str, Any] = field(default_factory=dict)
    source: str = "run"  # "run" (its folder) or "record" (its results file)
    differs: list[str] = field(default_factory=list)  # config fields its folder's run has that the plan no longer gives

    RECORD_FIELDS = ("epoch", "split", "chosen", "evaluation", "train_seconds", "samples_per_s", "machine", "config")

    def record(self, stage: str, variant: str, seed: int) -> dict[str, Any]:
        record = {"stage": stage, "variant": variant, "seed": seed,
                  **{key: getattr(self, key) for key in self.RECORD_FIELDS}}
        return {**record, "history": self.history} if self.history else record

    @classmethod
    def from_record(cls, record: dict[str, Any], path: Path) -> RunResult:
        missing = [key for key in cls.RECORD_FIELDS if key not in record]
        if missing:
            raise RunError(f"{path}: not a study result record (no {', '.join(missing)})")
        history = record.get("history", {})
        if not isinstance(history, dict):
            raise RunError(f"{path}: its history should be an object, found {type(history).__name__}")
        return cls(**{key: record[key] for key in cls.RECORD_FIELDS}, history=history, source="record")


def numbers_only(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers, without its sample captions and texts like the most common caption (which quote
    the dataset): what a record keeps."""
    def metrics_of(key: str) -> dict[str, Any]:
        return {name: {"metrics": {k: v for k, v in entry.get("metrics", {}).items() if M.is_number(v)}}
                for name, entry in evaluation.get(key, {}).items()}

    return {"num_images": evaluation.get("num_images"), "losses": evaluation.get("losses", {}),
            "retrieval": evaluation.get("retrieval", {}), "matching": evaluation.get("matching", {}),
            "strategies": metrics_of("strategies"), "reference_rows": metrics_of("reference_rows")}


# The training log a record keeps: at most this many lines (every k-th, and the last), of these numbers.
HISTORY_TRAIN_LINES = 200
HISTORY_TRAIN_KEYS = ("step", "epoch", "loss", "itc", "lm", "itm", "mae", "lr", "temperature", "grad_norm",
                      "samples_per_s", "data_wait_share")


def run_history(run: RunDir) -> dict[str, Any]:
    """What a record keeps of how a run got to its result: `evaluations`, every validation evaluation training made
    (step, label, and the numbers `numbers_only` keeps: losses, each strategy's and reference row's metrics,
    retrieval, matching), in step order; `train`, the training log's numbers, thinned to HISTORY_TRAIN_LINES lines.
    Training curves, collapse over steps and a run's diagnosis can be drawn again from it on any machine."""
    evaluations = [{"step": result.get("step"), "label": result.get("label"), **numbers_only(result)}
                   for result in run.validation_evaluations()]
    lines = [{key: line[key] for key in HISTORY_TRAIN_KEYS if M.is_number(line.get(key))}
             for line in run.read_metrics() if line.get("split") == "train"]
    stride = max(1, math.ceil(len(lines) / HISTORY_TRAIN_LINES))
    kept = lines[::stride] + ([lines[-1]] if lines and (len(lines) - 1) % stride else [])
    return {"evaluations": evaluations, "train": kept}


def completed_result(run: RunDir) -> RunResult | None:
    """A completed run's RunResult; None while it is not completed (a stopped or running run is not a result) or
    has no reported evaluation yet."""
    info = run.read_info()
    if info.get("status") != "completed" or (reported := reported_evaluation(run)) is None:
        return None
    epoch, split, chosen, evaluation = reported
    speeds = [line["samples_per_s"] for line in run.read_metrics()
              if line.get("split") == "train" and M.is_number(line.get("samples_per_s"))]
    machine = {"device": info.get("device"), "git_revision": info.get("git_revision"),
               "resumed_revisions": [resumed.get("git_revision") for resumed in info.get("resumes", [])],
               "finished_at": info.get("finished_at")}
    return RunResult(epoch, split, chosen, numbers_only(evaluation), info.get("train_seconds"),
                     statistics.median(speeds) if speeds else None, machine, info.get("config", {}),
                     history=run_history(run))


def record_path(results: Path, stage: str, variant: str, seed: int) -> Path:
    return results / f"{run_dir(Path(), stage, variant, seed).name}.json"


def config_differences(recorded: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """The "section.field" names whose values differ between a run's config and the one its plan gives, apart
    from LOCATION_FIELDS and what a run fills in when it starts (the size of a "captions" vocabulary). A field
    one side lacks counts at its default: a run recorded before an option existed trained as the option's
    default does (every new option is off by default)."""
    def flat(cfg: dict[str, Any]) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, fields in cfg.items() if isinstance(fields, dict)
                for key, value in fields.items()}

    defaults = flat(BlipConfig().to_dict())
    a, b = {**defaults, **flat(recorded)}, {**defaults, **flat(planned)}
    counted = {"model.vocab_size"} if a.get("model.vocabulary") == b.get("model.vocabulary") == "captions" else set()
    return sorted(key for key in set(a) | set(b)
                  if key not in LOCATION_FIELDS and key not in counted and a.get(key) != b.get(key))


def read_records(plan: Plan, study: Path, results: Path,
                 log: Callable[[str], None] | None = None) -> dict[tuple[str, str, int], RunResult]:
    """The plan's runs recorded in `results` with the settings the plan gives them now; `log` says which records
    it leaves out because their settings differ."""
    found = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            for seed in plan.seeds:
                path = record_path(results, stage.name, variant, seed)
                if not path.is_file():
                    continue
                result = RunResult.from_record(read_json(path, "study result record"), path)
                planned = planned_config(plan, study, stage, variant, seed).to_dict()
                if differences := config_differences(result.config, planned):
                    if log is not None:
                        log(f"{path}: recorded with other settings than the plan's ({', '.join(differences[:4])}"
                            f"{', ...' if len(differences) > 4 else ''}), not counted")
                    continue
                found[stage.name, variant, seed] = result
    return found


def _save_record(path: Path, record: dict[str, Any]) -> None:
    """Write a record unless it already holds exactly this (no churn in a committed folder)."""
    if path.is_file() and read_json(path, "study result record") == json.loads(json.dumps(record)):
        return
    atomic_write_json(path, record)


# --- the table ----------------------------------------------------------------------------------
# {(stage, variant): {seed: its RunResult}}
Reported = dict[tuple[str, str], dict[int, RunResult]]


def reported_runs(plan: Plan, study: Path, results: Path | None = None,
                  log: Callable[[str], None] | None = None) -> Reported:
    """Each training variant's runs that count in the table: completed runs in `study` with a reported
    evaluation (the folder is the truth, even when the plan now gives the run other settings: `differs` says
    which), and, for the others, their records in `results` (see `read_records`)."""
    records = read_records(plan, study, results, log) if results is not None else {}
    reported: Reported = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = reported.setdefault((stage.name, variant), {})
            for seed in plan.seeds:
                run = RunDir(run_dir(study, stage.name, variant, seed))
                result = completed_result(run) if run.exists() else None
                if result is not None:
                    result.differs = config_differences(
                        result.config, planned_config(plan, study, stage, variant, seed).to_dict())
                else:
                    result = records.get((stage.name, variant, seed))
                if result is not None:
                    found[seed] = result
    return reported


def study_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """One row per (stage, variant, strategy or reference row): mean and spread over the seeds' runs."""
    rows = []
    ratios = _compute_ratios(plan, reported)
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = reported.get((stage.name, variant), {})
            by_row: dict[str, list[dict[str, Any]]] = {}
            for seed, result in found.items():
                evaluation = result.evaluation
                entries = {**evaluation.get("strategies", {}), **evaluation.get("reference_rows", {})}
                for name, entry in entries.items():
                    values = {**entry.get("metrics", {}), **evaluation.get("retrieval", {}),
                              **evaluation.get("matching", {}), "epoch": result.epoch,
                              "minutes": (result.train_seconds or 0) / 60, "chosen": name == result.chosen,
                              "gflops": step_gflops(result.config), "compute_ratio": ratios.get((stage.name, variant,
                                                                                                seed))}
                    by_row.setdefault(name, []).append(values)
            for name, values in by_row.items():
                row: dict[str, Any] = {"stage": stage.name, "variant": variant, "decoding": name,
                                       "split": "/".join(sorted({result.split for result in found.values()})),
                                       "seeds": len(values), "chosen_on_dev": sum(v["chosen"] for v in values),
                                       "epochs": sorted({v["epoch"] for v in values})}
                for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, "minutes", "gflops", "compute_ratio"):
                    numbers = [v[key] for v in values if M.is_number(v.get(key))]
                    row[key] = statistics.fmean(numbers) if numbers else None
                    row[f"{key}_sd"] = statistics.stdev(numbers) if len(numbers) > 1 else None
                rows.append(row)
    return rows


def _compute_ratios(plan: Plan, reported: Reported) -> dict[tuple[str, str, int], float]:
    """Each run's PFLOPs in all as a ratio of the plan's reference variant's (mean over its seeds)."""
    if plan.reference is None:
        return {}
    stage, variant = plan.reference.split("/", 1)
    references = [v for seed in reported.get((stage, variant), {})
                  if (v := total_pflops(plan, reported, stage, variant, seed)) is not None]
    if not references:
        return {}
    reference = statistics.fmean(references)
    return {(s, v, seed): total / reference for (s, v), seeds in reported.items() for seed in seeds
            if (total := total_pflops(plan, reported, s, v, seed)) is not None}


# Word pieces of a caption with [CLS] and [SEP] at which the table counts a step's FLOPs: Flickr8k's captions average
# about 14; the ratios between variants hardly move with it.
COST_TEXT_LEN = 16


def step_gflops(config: dict[str, Any]) -> float | None:
    """GFLOPs of one training step of a run's config (blipcore.model.flops at COST_TEXT_LEN); None for a config that no
    longer loads."""
    try:
        cfg = BlipConfig.from_dict(config)
    except ValueError:
        return None
    return training_step_flops(cfg, cfg.train.batch_size * cfg.train.grad_accum_steps, COST_TEXT_LEN) / 1e9


def run_steps(result: RunResult) -> int | None:
    """The optimiser steps a run took: its training log's last step, else its step budget (train.max_steps)."""
    lines = result.history.get("train", [])
    if lines and isinstance(lines[-1].get("step"), int):
        return lines[-1]["step"]
    steps = result.config.get("train", {}).get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def total_pflops(plan: Plan, reported: Reported, stage: str, variant: str, seed: int) -> float | None:
    """PFLOPs a run cost in all: its steps x its step's FLOPs, plus those of the runs it started from (train.init to
    an earlier stage's run, e.g. an image-only or text-only pretraining); None where any part is unknown."""
    result = reported.get((stage, variant), {}).get(seed)
    steps, gflops = (run_steps(result), step_gflops(result.config)) if result is not None else (None, None)
    if steps is None or gflops is None:
        return None
    total = steps * gflops / 1e6
    overrides = next(s for s in plan.stages if s.name == stage).variants[variant]
    for ref_stage, ref_variant, ref_seed in _run_references(overrides):
        earlier = total_pflops(plan, reported, ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
        if earlier is None:
            return None
        total += earlier
    return total


# What the runs table reads from a record's history: key -> label (each the step of a best validation number)
HISTORY_LABELS = {"evaluations": "evaluations", "val_itc_min_step": "val ITC loss lowest at",
                  "dev_r1_max_step": "dev R@1 best at", "dev_cider_max_step": "dev CIDEr best at"}


def history_steps(history: dict[str, Any]) -> dict[str, Any]:
    """From a record's history: how many validation evaluations it made and the step of the lowest validation ITC
    loss, of the best dev R@1 (image-to-text plus text-to-image) and of the best dev CIDEr of any strategy. A
    validation loss at its lowest well before dev R@1 at its best is over-confidence; both early, memorisation."""
    evaluations = [e for e in history.get("evaluations", []) if isinstance(e.get("step"), int)]

    def step_of_best(value: Callable[[dict[str, Any]], Any], lowest: bool = False) -> int | None:
        scored = [(v, e["step"]) for e in evaluations if M.is_number(v := value(e))]
        if not scored:
            return None
        return (min(scored, key=lambda p: p[0]) if lowest else max(scored, key=lambda p: p[0]))[1]

    def r1(e: dict[str, Any]) -> float | None:
        found = [e.get("retrieval", {}).get(key) for key in ("i2t_r1", "t2i_r1")]
        return sum(found) if all(M.is_number(v) for v in found) else None

    def cider(e: dict[str, Any]) -> float | None:
        found = [entry.get("metrics", {}).get("cider") for entry in e.get("strategies", {}).values()]
        return max((v for v in found if M.is_number(v)), default=None)

    return {"evaluations": len(evaluations) or None,
            "val_itc_min_step": step_of_best(lambda e: e.get("losses", {}).get("val_itc"), lowest=True),
            "dev_r1_max_step": step_of_best(r1), "dev_cider_max_step": step_of_best(cider)}


def run_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """One row per counted run: where its numbers come from, what it reported, what it cost on which machine (the
    minutes, the CPU model and its measured fp32 matmul rate, the FLOPs of a step and of the whole run) and, from
    its history, when its validation numbers were at their best."""
    rows = []
    for (stage, variant), seeds in reported.items():
        for seed, result in sorted(seeds.items()):
            device = result.machine.get("device") or {}
            rows.append({"run": run_dir(Path(), stage, variant, seed).name, "source": result.source,
                         "split": result.split, "epoch": result.epoch, "chosen": result.chosen,
                         "minutes": None if result.train_seconds is None else result.train_seconds / 60,
                         "samples_per_s": result.samples_per_s,
                         "device": device.get("cpu_model") or device.get("name"),
                         "matmul_fp32_gflops": device.get("matmul_fp32_gflops"),
                         "git_revision": code_revisions(result.machine), "differs": result.differs,
                         "gflops": step_gflops(result.config),
                         "pflops": total_pflops(plan, reported, stage, variant, seed),
                         **history_steps(result.history)})
    return rows


def code_revisions(machine: dict[str, Any]) -> str:
    """The short revisions of the code that trained a run: the one it started with, then each other one a resume
    continued it with ("b7054b0+eec98c1")."""
    revisions: list[str] = []
    for revision in [machine.get("git_revision"), *machine.get("resumed_revisions", [])]:
        if revision and revision[:7] not in revisions:
            revisions.append(revision[:7])
    return "+".join(revisions)


def runs_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The counted runs as a Markdown table (empty without any)."""
    if not rows:
        return ""
    headers = ["run", "from", "reported", "minutes", "samples/s", "device", "fp32 matmul GFLOP/s", "revision",
               "GFLOP a step", "PFLOP in all", *HISTORY_LABELS.values(), "settings the plan no longer gives"]
    body = [[row["run"], row["source"], f"{row['split']} epoch {row['epoch']}" + (f", {row['chosen']}" if row["chosen"]
                                                                                    else ""),
             _number(row["minutes"], 1), _number(row["samples_per_s"], 1), row["device"],
             _number(row["matmul_fp32_gflops"], 0), row["git_revision"] or None, _number(row["gflops"], 1),
             _number(row["pflops"], 2), *(row[key] for key in HISTORY_LABELS), ", ".join(row["differs"]) or None]
            for row in rows]
    return markdown(headers, body, "Runs: where each number comes from (run = its folder here, record = its results "
                                   "file), what it cost, and when its validation numbers were at their best (steps; "
                                   "- where the record keeps no history)")


def filter_rows(plan: Plan, study: Path, results: Path | None = None) -> list[dict[str, Any]]:
    """One row per (CapFilt command stage, scorer) whose output exists here, or whose summary `results` holds:
    how well the filter found the planted captions (ROC AUC, precision, recall) and what it kept
    (blipcore.experiments.capfilt's capfilt.json). A summary found here is recorded in `results`."""
    rows = []
    for stage in (s for s in plan.stages if not s.trains):
        for seed in plan.seeds if stage.per_seed else [None]:
            summary = _capfilt_summary(stage, plan, study, seed, results)
            if summary is None:
                continue
            counts, planted = summary.get("counts", {}), summary.get("planted") or {}
            for scorer in summary.get("scorers", []):
                detection = (planted.get("scorers") or {}).get(scorer) or {}
                rows.append({"stage": stage.name, "seed": seed, "scorer": scorer,
                             "decided": scorer == summary.get("score"), "auc": detection.get("auc"),
                             "precision": detection.get("precision"), "recall": detection.get("recall"),
                             "dropped_original": detection.get("dropped"), "planted": planted.get("planted"),
                             "original": counts.get("original"), "kept_original": counts.get("kept_original"),
                             "synthetic": counts.get("synthetic"), "kept_synthetic": counts.get("kept_synthetic")})
    return rows


def _capfilt_summary(stage: Stage, plan: Plan, study: Path, seed: int | None,
                     results: Path | None) -> dict[str, Any] | None:
    """A command stage's CapFilt summary: from its output here (then recorded in `results`), else from its record
    in `results`; None when neither is there (or the stage is not CapFilt)."""
    found = _produces(stage, plan, study, seed) / CAPFILT_SUMMARY
    name = stage.name if seed is None else f"{stage.name}-seed{seed}"
    recorded = None if results is None else results / f"{name}.{CAPFILT_SUMMARY}"
    if found.is_file():
        summary = read_json(found, "CapFilt summary")
        if recorded is not None:
            _save_record(recorded, summary)
        return summary
    if recorded is not None and recorded.is_file():
        return read_json(recorded, "recorded CapFilt summary")
    return None


def reported_value(result: RunResult, key: str, row: str | None = None) -> float | None:
    """A run's reported number `key`: of its dev-chosen decoding strategy (or of reference row `row`), else of its
    retrieval or matching evaluation; None when it has none."""
    evaluation = result.evaluation
    if row is not None:  # a reference row has captioning and collapse metrics only
        value = evaluation.get("reference_rows", {}).get(row, {}).get("metrics", {}).get(key)
        return float(value) if M.is_number(value) else None
    entry = evaluation.get("strategies", {}).get(result.chosen, {})
    for found in (entry.get("metrics", {}), evaluation.get("retrieval", {}), evaluation.get("matching", {})):
        if M.is_number(found.get(key)):
            return float(found[key])
    return None


def recovery_summary(plan: Plan, reported: Reported) -> dict[str, Any] | None:
    """The plan's [recovery] question answered from its runs' reported numbers (each run's metric at its
    dev-chosen strategy); None when the plan asks none."""
    recovery = plan.recovery
    if recovery is None:
        return None
    values = {}
    for role in RECOVERY_ROLES:
        values[role] = {}
        for seed, result in reported.get(getattr(recovery, role), {}).items():
            if (value := reported_value(result, recovery.metric)) is not None:
                values[role][seed] = value
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
    row = [*(role(name) for name in RECOVERY_ROLES), declared.format(summary["cost"]),
           declared.format(summary["won_back"]), share, f"{100 * summary['target']:.0f}%", summary["verdict"]]
    return markdown([*heads, "cost", "won back", "share won back", "target", "verdict"], [row],
                    f"Recovery in {declared.label}: each run's dev-chosen checkpoint and decoding, mean ± sd over "
                    "seeds")


def target_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """Every training variant with a counted run judged against each of the plan's targets (`judge_target`)."""
    rows = []
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            results = {seed: r for seed, r in reported.get((stage.name, variant), {}).items() if r.chosen}
            if not results:  # none yet, or an image-only run (no captions, no retrieval): nothing to judge
                continue
            for target in plan.targets:
                if target.other_variant == f"{stage.name}/{variant}":
                    continue  # a variant is not judged against itself
                values = {seed: v for seed, result in results.items()
                          if (v := reported_value(result, target.metric)) is not None}
                if target.other_variant is not None:
                    other = reported.get(tuple(target.other_variant.split("/", 1)), {})
                    references = {seed: v for seed, result in other.items()
                                  if (v := reported_value(result, target.metric)) is not None}
                    judged = judge_against_variant(target, values, references)
                else:
                    references = {} if target.above is None else {
                        seed: v for seed, result in results.items()
                        if (v := reported_value(result, target.metric, target.above)) is not None}
                    judged = judge_target(target, values, references)
                rows.append({"run": f"{stage.name}/{variant}", **judged})
    return rows


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The pooled sample standard deviation of two groups of seeds; None unless each has 2 or more."""
    if len(a) < 2 or len(b) < 2:
        return None
    squares = (len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)
    return math.sqrt(squares / (len(a) + len(b) - 2))


def judge_against_variant(target: Target, values: dict[int, float], others: dict[int, float]) -> dict[str, Any]:
    """One variant against another variant of the plan (`target.above` or `target.not_below`), on each side's
    seeds (they need not be the same seeds). "above": met when the mean is better by at least `by` and by more than
    two pooled standard deviations, and the worst seed beats the other's best. "not_below": met unless the mean is
    worse by more than two pooled standard deviations. One seed on either side cannot show a spread: "not decided",
    unless the margin already decides it (an "above" margin under `by`; a "not_below" margin of 0 or more)."""
    summary = _target_summary(target, values)
    if not values or not others:
        summary["verdict"] = f"no value: {'its runs' if not values else target.other_variant} reported no number"
        return summary
    sign = 1.0 if M.metric(target.metric).better == "higher" else -1.0
    summary["reference_mean"] = statistics.fmean(others.values())
    summary["margin"] = margin = sign * (summary["mean"] - summary["reference_mean"])
    spread = pooled_sd(list(values.values()), list(others.values()))
    summary["two_sd"] = None if spread is None else 2 * spread
    if target.not_below is not None:
        if margin >= 0:
            summary["verdict"] = "met"
        elif spread is None:
            summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds on each side"
        else:
            summary["verdict"] = "missed: worse by more than two standard deviations" if -margin > 2 * spread \
                else "met: within two standard deviations"
        return summary
    worst, best_other = min(sign * v for v in values.values()), max(sign * v for v in others.values())
    if margin < target.by or margin <= 0:
        summary["verdict"] = "missed"
    elif spread is None:
        summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds on each side"
    elif margin <= 2 * spread:
        summary["verdict"] = "missed: the margin is within two standard deviations over seeds"
    elif worst <= best_other:
        summary["verdict"] = "missed: its worst seed does not beat the other's best"
    else:
        summary["verdict"] = "met"
    return summary


def _target_summary(target: Target, values: dict[int, float]) -> dict[str, Any]:
    """What every judged target row holds before its verdict: the target, the seeds' values, mean and sd."""
    return {"target": target.describe(), "metric": target.metric, "level": target.value, "above": target.above,
            "by": target.by if target.above else None, "not_below": target.not_below,
            "values": {str(seed): v for seed, v in values.items()}, "seeds": len(values),
            "mean": statistics.fmean(values.values()) if values else None,
            "sd": statistics.stdev(values.values()) if len(values) > 1 else None,
            "reference_mean": None, "margin": None, "margins": None, "two_sd": None}


def judge_target(target: Target, values: dict[int, float], references: dict[int, float] | None = None
                 ) -> dict[str, Any]:
    """One variant against one target. `values`: each seed's reported number; `references`: each seed's number of
    the target's reference row (for `above`). The verdict is "met" or "missed", or "not decided" where the
    margin over a reference row needs a spread that one seed cannot give; a missing number is "no value"."""
    summary = _target_summary(target, values)
    if not values:
        summary["verdict"] = "no value: its runs did not report this number"
        return summary
    sign = 1.0 if M.metric(target.metric).better == "higher" else -1.0
    if target.above is None:
        summary["verdict"] = "met" if sign * (summary["mean"] - target.value) >= 0 else "missed"
        return summary
    references = references or {}
    if not references:
        summary["verdict"] = f"no value: its runs did not report the {target.above} row"
        return summary
    reference_sd = statistics.stdev(references.values()) if len(references) > 1 else None
    summary["reference_mean"] = statistics.fmean(references.values())
    summary["margins"] = {str(seed): sign * (v - references[seed]) for seed, v in values.items() if seed in references}
    summary["margin"] = margin = sign * (summary["mean"] - summary["reference_mean"])
    if margin < target.by:
        summary["verdict"] = "missed"
    elif summary["sd"] is None or reference_sd is None:
        summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds"
    else:
        summary["two_sd"] = 2 * max(summary["sd"], reference_sd)
        summary["verdict"] = ("met" if margin > summary["two_sd"]
                              else "missed: the margin is within two standard deviations over seeds")
    return summary


def targets_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The targets as a Markdown table, one row per variant and a column per target (empty without targets)."""
    if not rows:
        return ""
    targets = list(dict.fromkeys(row["target"] for row in rows))
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        declared = M.metric(row["metric"])
        compared = row["above"] is not None or row.get("not_below") is not None
        shown = row["margin"] if compared else row["mean"]
        value = "-" if shown is None else ("+" if compared and shown >= 0 else "") + declared.format(shown)
        if row["sd"] is not None and not compared:
            value += f" ± {declared.format(row['sd'])}"
        if row["two_sd"] is not None:
            value += f" (2 sd {declared.format(row['two_sd'])})"
        cells.setdefault(row["run"], {})[row["target"]] = f"{value}: {row['verdict'].split(':')[0]}"
    seeds = {row["run"]: row["seeds"] for row in rows}
    body = [[run, seeds[run], *(found.get(t) for t in targets)] for run, found in cells.items()]
    return markdown(["variant", "seeds", *targets], body,
                    "Targets: each variant's reported numbers (dev-chosen checkpoint and decoding), mean ± sd over "
                    "seeds; a margin over a reference row or another variant counts only beyond two sd over seeds")


def write_table(plan: Plan, study: Path, results: Path | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """study.json, study.csv and study.md in `study`, from its completed runs and the records in `results` (which
    gets a record of every completed run here); returns the JSON content."""
    reported = reported_runs(plan, study, results, log)
    if results is not None:
        for (stage, variant), seeds in reported.items():
            for seed, result in seeds.items():
                if result.source == "run" and not result.differs:  # a record holds what the plan asks for
                    _save_record(record_path(results, stage, variant, seed), result.record(stage, variant, seed))
    table = study_table(plan, study, reported, results)
    atomic_write_json(study / STUDY_TABLE, table)
    columns = ["stage", "variant", "decoding", "split", "seeds", "chosen_on_dev", "epochs"] + [
        k for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, *(key for key, _, _ in COST_COLUMNS))
        for k in (key, f"{key}_sd")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table["rows"])
    atomic_write_bytes(study / "study.csv", buffer.getvalue().encode())
    atomic_write_bytes(study / "study.md", table_markdown(table).encode())
    return table


def study_table(plan: Plan, study: Path, reported: Reported, results: Path | None) -> dict[str, Any]:
    """Everything the study's table says (study.json): variant rows, runs, filters, recovery and targets."""
    return {"name": plan.name, "preset": plan.preset, "seeds": plan.seeds, "rows": study_rows(plan, reported),
            "runs": run_rows(plan, reported), "filters": filter_rows(plan, study, results),
            "recovery": recovery_summary(plan, reported), "targets": target_rows(plan, reported)}


def table_markdown(table: dict[str, Any]) -> str:
    """study.md: the variants table, then the filters, recovery, targets and runs sections a study has."""
    if not table["rows"]:
        return "No run of this study is complete or recorded yet.\n"
    return (markdown_table(table["rows"]) + filters_markdown(table["filters"]) + recovery_markdown(table["recovery"])
            + targets_markdown(table["targets"]) + runs_markdown(table["runs"]))


def records_report(plan: Plan, results: Path, command: str) -> str:
    """The study's table from its committed records in `results` alone (no run folder counts, nothing is written
    there): the Markdown page that docs/results/<plan>.md holds, headed by the `command` that regenerates it."""
    with tempfile.TemporaryDirectory() as nowhere:  # an empty study folder: only records count
        study = Path(nowhere)
        table = study_table(plan, study, reported_runs(plan, study, results), results)
    return (f"# Study `{plan.name}`: the table of its records\n\nGenerated from the records in `{results}` by\n\n"
            f"    {command}\n\nDo not edit: change the plan or add records, then run the command again.\n\n"
            + table_markdown(table))


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """The one Markdown table writer of the study's report: a title line (optional), the header and the rows, each
    cell as given (None as "-"); a blank line before the title or table, so that sections follow one another."""
    lines = ["", title, ""] if title else [""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: Any, digits: int) -> str:
    return "-" if not M.is_number(value) else f"{value:.{digits}f}"


# Columns of the variants table beyond the metrics: (key, label, digits)
COST_COLUMNS = (("minutes", "minutes", 1), ("gflops", "GFLOP a step", 1), ("compute_ratio", "compute × reference", 2))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The study as a Markdown table: mean ± sd over seeds, in each metric's declared format, and what it cost."""
    def cell(row: dict[str, Any], key: str, show: Callable[[Any], str]) -> str:
        value, spread = row.get(key), row.get(f"{key}_sd")
        return show(value) + (f" ± {show(spread)}" if M.is_number(spread) and not math.isnan(spread) else "")

    keys = [*TABLE_METRICS, *RETRIEVAL_METRICS]
    headers = ["stage", "variant", "decoding", "split", "seeds (chosen on dev)", *(M.metric(k).label for k in keys),
               *(label for _, label, _ in COST_COLUMNS)]
    body = [[row["stage"], row["variant"], row["decoding"], row["split"], f"{row['seeds']} ({row['chosen_on_dev']})",
             *(cell(row, key, M.metric(key).format) for key in keys),
             *(cell(row, key, lambda v, d=digits: _number(v, d)) for key, _, digits in COST_COLUMNS)]
            for row in rows]
    return markdown(headers, body).lstrip("\n")


def filters_markdown(filters: Sequence[dict[str, Any]]) -> str:
    """The CapFilt filters as a Markdown table (empty when the study has none)."""
    if not filters:
        return ""

    def share(value: Any) -> str:
        return "-" if not M.is_number(value) else f"{100 * value:.1f}%"

    headers = ["stage", "seed", "scorer", "decided", "ROC AUC", "precision", "recall", "originals kept",
               "synthetic kept"]
    body = [[row["stage"], "all" if row["seed"] is None else row["seed"], row["scorer"],
             "yes" if row["decided"] else "no", _number(row["auc"], 3), share(row["precision"]),
             share(row["recall"]), f"{row['kept_original']} of {row['original']}",
             f"{row['kept_synthetic']} of {row['synthetic']}"] for row in filters]
    return markdown(headers, body, "CapFilt filters: finding the planted captions among the originals (low score = "
                                   "planted)")


def save_plan_copy(plan_path: Path, study: Path) -> None:
    """Keep the plan beside its runs (study/plan.toml), so the folder says how it was made."""
    atomic_write_bytes(study / STUDY_PLAN, Path(plan_path).read_bytes())

