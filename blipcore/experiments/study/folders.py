"""Where a plan's runs and datasets go: run folders, the placeholders of commands and settings ({study},
{data_root}, {seed}, {run:...}) filled in, a command stage's output folder, and the config the plan gives a run."""

from __future__ import annotations

import re
from pathlib import Path

from ...model.config import BlipConfig
from .plan import RUN_REFERENCE, Plan, PlanError, Stage

# A command stage's output is complete when it holds this marker, written after its command succeeded.
COMPLETE_MARKER = ".complete"


def run_dir(study: Path, stage: str, variant: str, seed: int) -> Path:
    return study / f"{stage}-{variant}-seed{seed}"


def planned_config(plan: Plan, study: Path, stage: Stage, variant: str, seed: int) -> BlipConfig:
    """The config the plan gives one run: the preset, the plan's settings, the variant's (placeholders filled),
    its seed, and the dataset of the command stage it trains on."""
    base = plan.base_config()
    values = {"study": str(study), "data_root": base.data.root, "seed": str(seed)}
    filled = {key: fill(value, values, plan, study) if isinstance(value, str) else value
              for key, value in stage.variants[variant].items()}
    cfg = base.override({**filled, "train.seed": seed})
    if stage.data is not None:
        cfg = cfg.override({"data.root": str(stage_output(stage_named(plan, stage.data), plan, study, seed))})
    cfg.name = f"{plan.name}/{stage.name}/{variant}"
    return cfg


def stage_named(plan: Plan, name: str) -> Stage:
    """The plan's stage called `name` (parse_plan has checked that a stage names only stages the plan has)."""
    return next(stage for stage in plan.stages if stage.name == name)


def command_values(stage: Stage, plan: Plan, study: Path, seed: int | None) -> dict[str, str]:
    """A command stage's placeholders: {seed} only for one that runs per seed (then `seed` is its seed)."""
    values = {"study": str(study), "data_root": plan.base_config().data.root}
    return {**values, "seed": str(seed)} if stage.per_seed else values


def stage_output(stage: Stage, plan: Plan, study: Path, seed: int | None = None) -> Path:
    """The folder a command stage makes (for `seed`, when it runs per seed)."""
    return Path(fill(stage.produces or "", command_values(stage, plan, study, seed), plan, study))


def fill(text: str, values: dict[str, str], plan: Plan, study: Path) -> str:
    """`text` with its placeholders filled: those of `values` ({study}, {data_root}, {seed}) and {run:...}, a run
    folder of `study`; PlanError names an unknown placeholder, or a run without a seed where `values` has none."""
    def replace(match: re.Match) -> str:
        key = match.group(1)
        reference = RUN_REFERENCE.fullmatch(match.group(0))
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
