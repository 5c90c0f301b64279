"""Running a plan: which runs a call selects, the command stages they need, each run trained or resumed into its
folder (or skipped, complete or recorded), its test evaluation made, and the table written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...io import atomic_write_bytes
from ...model.config import BlipConfig
from ...runs.rundir import STUDY_PLAN, RunDir, RunError
from .folders import COMPLETE_MARKER, command_values, fill, planned_config, run_dir, stage_named, stage_output
from .plan import Plan, PlanError, Stage, command_runs, run_references
from .records import TestFn, evaluate_on_test, read_records, reported_evaluation
from .report import write_table


class StudyStopped(Exception):
    """A run of the study did not complete (stopped by a signal, or its budget cut short): the study stopped
    after it, with its table written; running the same command again resumes it."""


TrainFn = Callable[[BlipConfig, Path, bool], dict[str, Any]]  # (config, run folder, resume) -> summary
CommandFn = Callable[[list[str]], int]  # `python -m train` arguments -> exit code


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
                       for ref_stage, ref_variant, ref_seed in run_references(overrides[name, variant])}
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
    needed = {(stage.data, seed if stage_named(plan, stage.data).per_seed else None)
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
                     for ref_stage, ref_variant, ref_seed in run_references(overrides[name, variant])}
            data = stage_named(plan, stage.data) if stage.data is not None else None
            if data is not None and not (stage_output(data, plan, study, seed) / COMPLETE_MARKER).is_file():
                needs |= {(ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
                          for arg in data.command or [] for ref_stage, ref_variant, ref_seed in command_runs(arg)}
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


def _run_command(stage: Stage, plan: Plan, study: Path, command: CommandFn, log: Callable[[str], None],
                 seed: int | None = None) -> None:
    output = stage_output(stage, plan, study, seed)
    if (output / COMPLETE_MARKER).is_file():
        log(f"{stage.name}: {output} is complete, skipped")
        return
    values = command_values(stage, plan, study, seed)
    args = [fill(arg, values, plan, study) for arg in stage.command or []]
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


def save_plan_copy(plan_path: Path, study: Path) -> None:
    """Keep the plan beside its runs (study/plan.toml), so the folder says how it was made."""
    atomic_write_bytes(study / STUDY_PLAN, Path(plan_path).read_bytes())
