"""`study`: run a study plan (stages of variants x seeds) into a folder of runs, and its table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from train.arguments import add_device_argument, given, int_list


def add_parser(subparsers) -> argparse.ArgumentParser:
    study = subparsers.add_parser(
        "study", help="run a study plan: stages of variants x seeds, one table",
        description="Run a study plan (TOML; see docs/studies.md) into a folder of "
                    "ordinary run directories, one per stage x variant x seed, then write study.json, study.csv "
                    "and study.md: one row per variant and decoding strategy (and reference row), mean and "
                    "spread over seeds. Running it again skips completed runs and resumes interrupted ones, so "
                    "a long study can be run a few runs at a time; Ctrl-C stops the current run resumably, and the "
                    "study with it. Example: python -m train study studies/recipes.toml --only recipes/tuned",
    )
    study.add_argument("plan", metavar="PLAN.toml", help="the study plan, e.g. studies/recipes.toml")
    study.add_argument("--out", help="the study folder (default runs/study-<plan name>)")
    study.add_argument("--data-root", help="the dataset folder (overrides the plan's data.root, e.g. "
                       "../shared/data/flickr8k)")
    study.add_argument("--only", action="append", default=[], metavar="STAGE[/VARIANT]",
                       help="train only these runs, and the runs they start from, this time (repeatable; the "
                            "table still shows every run in the folder): run a long plan a few runs at a time")
    study.add_argument("--seeds", type=int_list, default=None,
                       metavar="0,1", help="train only these of the plan's seeds this time (default: all of them)")
    study.add_argument("--results", type=Path, metavar="DIR",
                       help="keep each completed run's reported numbers (metrics only: no captions, no weights) "
                            "and each CapFilt summary in DIR, one small JSON file a run, and count them in the "
                            "table when the run's folder is gone: commit DIR to spread a study over machines "
                            "(a recorded run is not trained again)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(study, "of every run trains", indexed=False,
                        note="; when --device is not given, the plan's train.device is kept (auto unless set)")
    study.add_argument("--report", type=Path, metavar="FILE",
                       help="train nothing: write the table of the records in --results (alone: no run folder "
                            "counts) to FILE as Markdown, headed by the command that regenerates it; the project's "
                            "docs/results/<plan>.md pages are made this way")
    study.set_defaults(func=run)
    return study


def run(args: argparse.Namespace) -> int:
    """Run a study plan into its folder (skipping what is done, resuming what is not) and print its table."""
    from blipcore.experiments.study import StudyStopped, load_plan, run_study, save_plan_copy, selection
    from blipcore.training.trainer import Trainer

    plan = load_plan(args.plan)
    if args.report is not None:
        return _write_study_report(plan, args)
    if args.data_root:
        plan.overrides["data.root"] = str(Path(args.data_root).resolve())
    if given(args, "device"):
        plan.overrides["train.device"] = args.device
    selection(plan, args.only, args.seeds)  # a bad --only or --seeds is refused before anything is written
    out = Path(args.out or f"runs/study-{plan.name}")
    save_plan_copy(Path(args.plan), out)

    def train(cfg, folder: Path, resume: bool) -> dict:
        return Trainer(cfg, folder, resume=resume, progress=not args.no_progress).fit()

    def command(words: list[str]) -> int:
        from train.cli import main

        return main(command_stage_words(words, progress=not args.no_progress))

    try:
        table = run_study(plan, out, train, command, log=lambda line: print(f"[study] {line}", file=sys.stderr),
                          only=args.only, seeds=args.seeds, results=args.results)
    except StudyStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    print((out / "study.md").read_text(), end="")
    print(f"{len(table['rows'])} rows -> {out / 'study.json'}, {out / 'study.csv'}, {out / 'study.md'}"
          + (f"; results recorded in {args.results}" if args.results else ""))
    return 0


def _write_study_report(plan: Any, args: argparse.Namespace) -> int:
    """`study PLAN --results DIR --report FILE`: the table of the records alone, written to FILE; trains nothing."""
    from blipcore.experiments.study import records_report
    from blipcore.io import atomic_write_bytes

    if args.results is None or not args.results.is_dir():
        print(f"error: --report makes the table of the records in --results DIR; "
              f"{'give --results' if args.results is None else f'{args.results} is not a folder'}", file=sys.stderr)
        return 2
    command = f"python -m train study {args.plan} --results {args.results} --report {args.report}"
    atomic_write_bytes(args.report, records_report(plan, args.results, command).encode())
    print(f"{args.report}: the table of {plan.name}'s records in {args.results}")
    return 0


def command_stage_words(words: list[str], progress: bool) -> list[str]:
    """A study's command stage as it runs: with --no-progress when the study has it and the command takes it (a
    progress bar redrawn in a log file is thousands of lines of noise)."""
    from train.cli import build_parser

    if progress or "--no-progress" in words:
        return words
    takes_it = hasattr(build_parser().parse_args(words), "no_progress")
    return [*words, "--no-progress"] if takes_it else words
