"""`info`: a run's config, status, progress, best headline metrics and last logged line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from train.arguments import add_run_dir_argument, deprecated


def add_parser(subparsers) -> argparse.ArgumentParser:
    info = subparsers.add_parser(
        "info", help="summary of a run: config, status, epochs, best metrics",
        description="Print a run's config, status, progress, best headline metrics and last logged line. "
                    "Example: python -m train info --run-dir runs/demo")
    add_run_dir_argument(info, required=False, help="the run to summarise (a folder holding run.json), e.g. runs/demo")
    info.add_argument("old_run_dir", nargs="?", metavar="RUN_DIR",
                      help="deprecated: the run as a positional argument; use --run-dir RUN")
    info.add_argument("--json", action="store_true", help="print run.json and the epochs as JSON")
    info.set_defaults(func=run)
    return info


def run_folder(args: argparse.Namespace) -> str:
    """--run-dir, or the deprecated positional RUN_DIR (with its deprecation line); ValueError without either."""
    if args.old_run_dir is not None:
        if args.run_dir is not None:
            raise ValueError("info takes one run: give --run-dir RUN, not also a positional RUN_DIR")
        deprecated(f"`info {args.old_run_dir}`", f"`info --run-dir {args.old_run_dir}`")
        return args.old_run_dir
    if args.run_dir is None:
        raise ValueError("info needs the run: --run-dir RUN, e.g. --run-dir runs/demo")
    return args.run_dir


def run(args: argparse.Namespace) -> int:
    """A run's config, status, progress, best headline metrics and last logged line."""
    from blipcore.runs.rundir import RunDir

    run_dir = RunDir(run_folder(args))
    info = run_dir.read_info()
    checkpoints = run_dir.checkpoints()
    if args.json:
        print(json.dumps({"info": info, "epochs": [c.epoch for c in checkpoints]}, indent=2))
        return 0
    _print_summary(run_dir, info, [c.epoch for c in checkpoints])
    return 0


def _print_summary(run_dir, info: dict[str, Any], epochs_done: list[int]) -> None:
    cfg = info.get("config", {})
    m = cfg.get("model", {})
    print(f"run        {run_dir.path}")
    print(f"status     {info.get('status')}" + (f"  ({info['error']})" if info.get("error") else ""))
    print(f"preset     {info.get('preset')}   created {info.get('created_at')}   updated {info.get('updated_at')}")
    print(f"device     {info.get('device', {}).get('type')} {info.get('device', {}).get('name', '')}   "
          f"git {str(info.get('git_revision'))[:10]}")
    for resumed in info.get("resumes", []):  # the code and machine that continued it
        print(f"resumed    at step {resumed.get('step')} on {resumed.get('at')}: "
              f"{resumed.get('device', {}).get('cpu_model') or resumed.get('device', {}).get('name')}   "
              f"git {str(resumed.get('git_revision'))[:10]}")
    print(f"model      ViT {m.get('image_size')}/{m.get('patch_size')} width {m.get('vision_width')} depth "
          f"{m.get('vision_depth')}; text width {m.get('text_width')} enc {m.get('text_encoder_depth')} dec "
          f"{m.get('text_decoder_depth')}; {info.get('parameters', 0):,} parameters")
    print(f"losses     itc {m.get('itc_weight')}  lm {m.get('lm_weight')}  itm {m.get('itm_weight')}")
    data = cfg.get("data", {})
    print(f"data       {data.get('kind')} {data.get('root')} ({info.get('train_items')} train items)")
    epochs = ", ".join(str(e) for e in epochs_done) or "none yet"
    print(f"progress   {info.get('steps_done', 0)}/{info.get('total_steps')} steps, epochs {epochs}"
          + (f", {info['train_seconds']} s" if info.get("train_seconds") else ""))
    best = headline_best(info.get("best", {}))
    if best:
        print(f"best       {best}")
    last = run_dir.read_metrics()[-1:] if run_dir.metrics_file.exists() else []
    if last:
        print(f"last line  {json.dumps(last[0], sort_keys=True)[:200]}")


def headline_best(best: dict[str, Any]) -> str:
    """run.json's best values of the headline metrics (the registry's `headline` flag), as `key=value@epoch`."""
    from blipcore.evaluation.metrics import metric

    shown = []
    for key, entry in sorted(best.items()):
        declared = metric(key)
        if declared is not None and declared.headline and isinstance(entry, dict):
            shown.append(f"{key}={declared.format(entry.get('value'))}@{entry.get('epoch')}")
    return "  ".join(shown)
