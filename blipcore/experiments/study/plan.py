"""A study's plan: the TOML format (see the package's docstring) read into Stage / Target / Recovery / Plan, and
every check that refuses a plan before anything runs (PlanError)."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...evaluation import metrics as M
from ...model.config import BlipConfig, load_preset

# The table's columns, from the registry: what evaluations log per strategy, R@1 both ways, and how well ITC
# and ITM tell an image's own caption from another image's.
TABLE_METRICS = tuple(m.key for group in ("captioning", "collapse") for m in M.metrics_in(group) if m.summary)
RETRIEVAL_METRICS = (*(m.key for m in M.metrics_in("retrieval") if m.headline),
                     *(m.key for m in M.metrics_in("matching")))
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
        margin = f"{declared.label} {declared.format(self.by)} above" if self.by else f"{declared.label} above"
        if self.other_variant is not None:
            return f"{margin} {self.above}, by > 2 sd, its worst seed above their best"
        return f"{margin} {self.above}, by > 2 sd"


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
    # [recovery], or [[recovery]] to ask the question of several protocols (CapFilt's: one per captioner and filter)
    recoveries: list[Recovery] = field(default_factory=list)
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
        for ref_stage, ref_variant, _ in (run for arg in stage.command or [] for run in command_runs(arg)):
            if (ref_stage, ref_variant) not in earlier:
                raise fail(f"command stage {stage.name!r} names run {ref_stage}/{ref_variant}, which is not a variant "
                           "of an earlier training stage")
        for variant, overrides in stage.variants.items():
            try:
                base.override(overrides)
            except ValueError as err:
                raise fail(f"variant {variant!r} of stage {stage.name!r}: {err}") from None
            for ref_stage, ref_variant, _ in run_references(overrides):
                if (ref_stage, ref_variant) not in earlier:
                    raise fail(f"variant {variant!r} of stage {stage.name!r} names run {ref_stage}/{ref_variant}, "
                               "which is not a variant of an earlier training stage")
    raw_recoveries = table.get("recovery", [])
    raw_recoveries = [raw_recoveries] if isinstance(raw_recoveries, dict) else raw_recoveries
    if not isinstance(raw_recoveries, list):
        raise fail("[recovery] must be a table, or [[recovery]] tables")
    plan.recoveries = [_parse_recovery(raw, stages, fail) for raw in raw_recoveries]
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


RUN_REFERENCE = re.compile(r"\{run:([^{}/]+)/([^{}/]+)(?:/(\d+))?\}")


def command_runs(text: str) -> list[tuple[str, str, int | None]]:
    """The runs a text names: (stage, variant, seed, or None for the seed of the run or command it is part of)."""
    return [(stage, variant, int(seed) if seed else None) for stage, variant, seed in RUN_REFERENCE.findall(text)]


def run_references(overrides: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """The runs a variant's settings name (see command_runs)."""
    return [run for value in overrides.values() if isinstance(value, str) for run in command_runs(value)]


CAPFILT_ROLES = ("--captioner", "--filter")  # the arguments of a `capfilt` command that name its two models


def capfilt_protocol(plan: Plan, stage_name: str) -> str | None:
    """Which captioner and filter made a CapFilt dataset, in the plan's words ("captioner and filter: noisy/tuned",
    "captioner: finetuned/captioner, filter: finetuned/filter"): of a `capfilt` command stage, or of the one a
    training stage trains on; None for any other stage."""
    stage = next(s for s in plan.stages if s.name == stage_name)
    if stage.trains:
        return None if stage.data is None else capfilt_protocol(plan, stage.data)
    args = stage.command or []
    if not args or args[0] != "capfilt":
        return None
    named = []
    for role in CAPFILT_ROLES:
        value = args[args.index(role) + 1] if role in args[:-1] else "?"
        runs = command_runs(value)
        named.append("/".join(runs[0][:2]) if runs else value)
    captioner, filter_run = named
    if captioner == filter_run:
        return f"captioner and filter: {captioner}"
    return f"captioner: {captioner}, filter: {filter_run}"


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
        if not stage.per_seed and any("{seed}" in arg or any(seed is None for *_, seed in command_runs(arg))
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
