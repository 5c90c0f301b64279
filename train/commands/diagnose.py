"""`diagnose`: what went wrong in runs or study records, in words, with the evidence."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.arguments import add_run_dir_argument


def add_parser(subparsers) -> argparse.ArgumentParser:
    from blipcore.evaluation.metrics import SEVERITIES

    diagnose = subparsers.add_parser(
        "diagnose", help="what went wrong in a run, in words, with the evidence",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Diagnose runs or study records (docs/diagnosis.md): token-repeat and caption collapse, captions no\n"
            "better than a reference row, alignment or ITM near chance, memorisation, over-confidence,\n"
            "optimisation faults and a starved step, each with when it started, its evidence, the dashboard\n"
            "page that shows it and the remedy the run's own evaluation or the committed records measured.\n"
            "The levels are declared, with their reasons, in blipcore/evaluation/metrics.py (THRESHOLDS).\n\n"
            "stdout: one block per run, a line per finding in order of onset (--json: a list of objects).\n"
            "exit status: 0 no finding reaches --fail-on; 1 one does; 2 a folder that is not a run or\n"
            "cannot be read, or a file that is not a study record.\n\n"
            "example:  python -m train diagnose --run-dir runs/demo --fail-on warning"
        ),
    )
    source = diagnose.add_mutually_exclusive_group(required=True)
    add_run_dir_argument(source, required=False, help="a run folder (one holding run.json)")
    source.add_argument("--runs-dir", metavar="DIR",
                        help="every run of a folder, the runs of its study folders included")
    source.add_argument("--record", nargs="+", type=Path, metavar="FILE",
                        help="study records (studies/results/<plan>/<run>.json): their history, or their reported "
                             "evaluation")
    diagnose.add_argument("--json", action="store_true", help="print the diagnoses as JSON")
    diagnose.add_argument("--fail-on", choices=SEVERITIES, default="error", metavar="SEVERITY",
                          help=f"exit 1 when a finding is at least this severe ({', '.join(SEVERITIES)}; "
                               "default error)")
    diagnose.set_defaults(func=run)
    return diagnose


def _diagnoses(args: argparse.Namespace) -> list:
    from blipcore.evaluation.diagnosis import committed_records, diagnose_record, diagnose_run, diagnose_runs
    from blipcore.runs.rundir import RunDir, RunError, list_runs

    records = committed_records()
    if args.run_dir:
        run_dir = RunDir(args.run_dir)
        if not run_dir.exists() and Path(args.run_dir).is_dir() and list_runs(args.run_dir):
            raise RunError(f"{args.run_dir}: not a run folder but a folder of runs; diagnose them with --runs-dir")
        return [diagnose_run(run_dir, records)]
    if args.runs_dir:
        if not Path(args.runs_dir).is_dir():
            raise RunError(f"{args.runs_dir}: no such folder")
        found = diagnose_runs(args.runs_dir, records)
        if not found:
            raise RunError(f"{args.runs_dir}: holds no run folder (one with a run.json), nor a study folder of them")
        return found
    return [diagnose_record(path, records) for path in args.record]


def run(args: argparse.Namespace) -> int:
    """What went wrong in runs or study records: one block per run, a line per finding in order of onset; exit 1
    when a finding reaches --fail-on, 2 when a folder is not a run or cannot be read."""
    found = _diagnoses(args)
    if args.json:
        print(json.dumps([diagnosis.to_dict() for diagnosis in found], indent=2))
    else:
        print("\n\n".join(diagnosis.text() for diagnosis in found))
    unreadable = [diagnosis for diagnosis in found if diagnosis.error]
    for diagnosis in unreadable:
        print(f"error: {diagnosis.error}", file=sys.stderr)
    if unreadable:
        return 2
    return 1 if any(diagnosis.reaches(args.fail_on) for diagnosis in found) else 0
