"""`fit`: train (or with --resume continue) a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from blipcore.model.config import BlipConfig, available_presets, load_preset
from train.arguments import add_device_argument, add_resume_arguments, add_run_dir_argument, given, run_reference


def add_parser(subparsers) -> argparse.ArgumentParser:
    fit = subparsers.add_parser(
        "fit", help="train a model into a run directory",
        description="Train a BLIP model from random initialisation (or from another run's weights with --init) into "
                    "a run directory (run.json, metrics.jsonl, checkpoints/, embeddings/, eval/). "
                    "Example: python -m train fit --preset demo --run-dir runs/demo")
    fit.add_argument("--preset",
                     help=f"a preset of blipcore/presets/ ({', '.join(available_presets())}; default demo, or with "
                          "--init the init run's own config) or the path of a .toml file in that format")
    fit.add_argument("--init", type=run_reference, metavar="RUN[:EPOCH]",
                     help="start from that run's checkpoint (default its newest) instead of random weights: parts "
                          "both models have are copied, the others start fresh (e.g. fine-tune a captioner with "
                          "--set model.itc_weight=0, or a filter with --set model.lm_weight=0 --set "
                          "model.itm_weight=1); a fresh optimizer, schedule and data order. E.g. --init runs/demo:3")
    add_run_dir_argument(fit, required=False,
                         help="where the run is written (default runs/<preset>; with --init alone, "
                              "runs/<init run>-init)")
    fit.add_argument("--data-root", help="dataset folder in COCO caption format (overrides the preset's data.root; "
                                         "with --resume, the run's own)")
    fit.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override any config value, e.g. --set train.batch_size=16 (repeatable)")
    fit.add_argument("--epochs", type=int, help="number of epochs (default: the preset's train.epochs)")
    fit.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (default: no limit)")
    add_device_argument(fit, "trains", indexed=False,
                        note="; when --device is not given, the preset's (or the resumed run's) train.device is "
                             "kept (auto unless set)")
    add_resume_arguments(fit, "continue the run in --run-dir from checkpoints/last/",
                         "replace a run already in --run-dir",
                         progress="no progress bar (logs still go to metrics.jsonl)")
    fit.set_defaults(func=run)
    return fit


def build_config(args: argparse.Namespace) -> BlipConfig:
    """The preset of `--preset` (without one: with --init, the init run's config, else demo) with --init,
    --epochs, --max-steps, an explicit --device, --data-root and --set applied."""
    init = getattr(args, "init", None)
    if args.preset is None and init:
        from blipcore.runs.rundir import RunDir, init_checkpoint, parse_run_spec

        init_checkpoint(init)  # a missing run or checkpoint named as such
        cfg = RunDir(parse_run_spec(init)[0]).config()
    else:
        cfg = load_preset(args.preset or "demo")
    sets = [f"train.init={init}"] if init else []
    return _apply(cfg, sets + _override_words(args))


def _override_words(args: argparse.Namespace) -> list[str]:
    """--set, --epochs, --max-steps, an explicit --device (the default auto leaves train.device as it is) and
    --data-root, as SECTION.FIELD=VALUE words."""
    sets = list(args.set or [])
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        sets.append(f"train.max_steps={args.max_steps}")
    if given(args, "device"):
        sets.append(f"train.device={args.device}")
    if args.data_root is not None:  # with --resume: the data moved (another machine, another disk)
        sets.append(f"data.root={Path(args.data_root).resolve()}")
    return sets


def _apply(cfg: BlipConfig, sets: list[str]) -> BlipConfig:
    return cfg.override_strings(sets) if sets else cfg


def _run_dir(args: argparse.Namespace) -> Path:
    from blipcore.runs.rundir import parse_run_spec

    if args.run_dir:
        return Path(args.run_dir)
    if args.init and not args.preset:
        return Path(f"runs/{parse_run_spec(args.init)[0].name}-init")
    return Path(f"runs/{Path(args.preset or 'demo').stem}")


def run(args: argparse.Namespace) -> int:
    """Train (or with --resume continue) a run; one summary line, printed by the first torchrun rank only."""
    from blipcore.runs.rundir import RunDir
    from blipcore.training.trainer import Trainer

    run_dir = _run_dir(args)
    if args.resume and args.init:
        raise ValueError("--init starts a new run from a checkpoint's weights; --resume continues one: not both")
    cfg = _apply(RunDir(run_dir).config(), _override_words(args)) if args.resume else build_config(args)
    summary = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).fit()
    if summary:  # empty on every torchrun rank but the first: one summary line per run, not one per process
        print(f"{summary.get('status', 'done')}: {summary.get('step')} steps, {summary.get('epoch')} epochs in "
              f"{summary.get('train_seconds')} s -> {run_dir}")
        if summary.get("status") == "interrupted":
            print(f"resume with: python -m train fit --run-dir {run_dir} --resume")
    return 0
