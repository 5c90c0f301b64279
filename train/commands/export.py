"""`export`: runs written as TensorBoard logs, so TensorBoard overlays them, shows their embeddings in its projector
and compares a study's variants in its HParams view (blipcore.experiments.tensorboard)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from train.arguments import add_run_dir_argument, timeout


def add_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser(
        "export", help="write runs as TensorBoard logs: scalars, captions, ITC matrices, projector, hparams",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Export runs to TensorBoard (docs/dashboard.md#tensorboard), one folder a run in DIR\n"
            "(DIR/<run>, DIR/<study>/<run>), so that `tensorboard --logdir DIR` overlays them:\n"
            "  - every number of metrics.jsonl under the metric registry's labels: train/ and validation/\n"
            "    beside each other, a validation loss on its training loss's chart;\n"
            "  - each evaluation's captioning, collapse, retrieval and matching metrics per decoding strategy;\n"
            "  - a few dev images' captions per strategy and evaluation (Text), the ITC similarity matrix per\n"
            "    epoch (Images);\n"
            "  - each epoch's image and text embeddings in TensorBoard's projector (PCA, UMAP, t-SNE), with\n"
            "    captions and thumbnails;\n"
            "  - the run's config as hyperparameters (HParams compares a study's variants).\n"
            "Exporting again writes only what is new (DIR/<run>/bliplab-export.json records what is there);\n"
            "what a run is still writing is left for the next export.\n\n"
            "--follow exports a run in progress every --interval seconds and stops by itself once run.json no\n"
            "longer says the run is running (or its trainer has gone), after a last export; Ctrl-C stops it\n"
            "sooner (exit status 130), keeping everything exported so far.\n\n"
            "exit status: 0 exported; 2 a folder that is not a run (or, with --runs-dir, holds none), or a run\n"
            "that cannot be exported; 130 interrupted.\n\n"
            "examples:\n"
            "  python -m train export --run-dir runs/demo --tensorboard runs/tensorboard\n"
            "  python -m train export --runs-dir runs/study-recipes --tensorboard runs/tensorboard --follow\n"
            "  tensorboard --logdir runs/tensorboard"
        ),
    )
    source = export.add_mutually_exclusive_group(required=True)
    add_run_dir_argument(source, required=False, help="the run to export (a folder holding run.json)")
    source.add_argument("--runs-dir", metavar="DIR",
                        help="every run of a runs folder (the runs of its study folders included) or of a study "
                             "folder, e.g. runs/study-recipes")
    export.add_argument("--tensorboard", required=True, type=Path, metavar="DIR",
                        help="the TensorBoard log folder to write into, e.g. runs/tensorboard (not a run folder)")
    export.add_argument("--follow", action="store_true",
                        help="keep exporting while the run (with --runs-dir: any of them) is running; stops when "
                             "none is, or on Ctrl-C")
    export.add_argument("--interval", type=timeout, default=5.0, metavar="S",
                        help="with --follow, seconds between two exports (default 5)")
    export.add_argument("--no-progress", action="store_true", help="no progress bars")
    export.set_defaults(func=run)
    return export


def runs_finder(args: argparse.Namespace) -> Callable[[], list]:
    """What to export, checked now (RunError, one line at the command line, when it is not a run or a folder of
    runs), as a function that finds the runs again on each pass of --follow."""
    from blipcore.runs.rundir import RunDir, RunError, list_runs

    if args.run_dir:
        run_dir = RunDir(args.run_dir)
        if not run_dir.exists():
            if Path(args.run_dir).is_dir() and list_runs(args.run_dir):
                raise RunError(f"{args.run_dir}: not a run folder but a folder of runs; export them with --runs-dir")
            what = "not a run folder (no run.json there)" if Path(args.run_dir).is_dir() else "no such run folder"
            raise RunError(f"{args.run_dir}: {what}")
        return lambda: [run_dir]
    if not Path(args.runs_dir).is_dir():
        raise RunError(f"{args.runs_dir}: no such folder")
    if not list_runs(args.runs_dir):
        hint = "; for one run use --run-dir" if RunDir(args.runs_dir).exists() else ""
        raise RunError(f"{args.runs_dir}: holds no run folder (one with a run.json), nor a study folder of them{hint}")
    return lambda: list_runs(args.runs_dir)


def run(args: argparse.Namespace) -> int:
    """Export the runs, print a line per run and what it wrote, and how to open them."""
    from blipcore.experiments.tensorboard import export_runs

    find = runs_finder(args)
    try:
        errors = export_runs(find, args.tensorboard, follow=args.follow, interval=args.interval,
                             progress=not args.no_progress, warn=lambda line: print(f"error: {line}", file=sys.stderr))
    except KeyboardInterrupt:
        print(f"interrupted: what was exported is kept in {args.tensorboard}; the same command continues it",
              file=sys.stderr)
        return 130
    print(f"open with:  tensorboard --logdir {args.tensorboard}")
    return 2 if errors else 0
