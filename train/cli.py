"""`python -m train`: train, evaluate, caption, inspect runs, generate data.

    python -m train fit --preset demo --run-dir runs/demo
    python -m train eval --run-dir runs/demo --epoch all --strategies greedy,beam,nucleus
    python -m train caption --run-dir runs/demo --strategy beam photo.jpg
    python -m train info runs/demo
    python -m train data shapes --out data/shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# --- presets -----------------------------------------------------------------------------------
def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_preset(name_or_path: str):
    """A train/configs/<name>.toml (or any TOML path): `base` preset plus [model]/[data]/[train] overrides.
    Relative data roots in a preset file are relative to the repository root."""
    from blipcore import BlipConfig

    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name_or_path!r}; presets: {', '.join(available_presets())} (or a .toml path)")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    cfg = BlipConfig.preset(table.pop("base", "demo"))
    overrides = {f"{section}.{key}": value for section, fields in table.items() for key, value in fields.items()}
    cfg = cfg.override(overrides)
    cfg.name = path.stem
    if not Path(cfg.data.root).is_absolute():
        cfg.data.root = str((REPO_ROOT / cfg.data.root).resolve())
    return cfg


def build_config(args: argparse.Namespace):
    cfg = load_preset(args.preset)
    sets = list(args.set or [])
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        sets.append(f"train.max_steps={args.max_steps}")
    if args.device is not None:
        sets.append(f"train.device={args.device}")
    if args.data_root is not None:
        sets.append(f"data.root={Path(args.data_root).resolve()}")
    return cfg.override_strings(sets) if sets else cfg


# --- subcommands -------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    from blipcore.runs import RunDir
    from blipcore.trainer import Trainer

    run_dir = Path(args.run_dir or f"runs/{Path(args.preset).stem}")
    if args.resume:
        cfg = RunDir(run_dir).config()
        sets = list(args.set or []) + [f"train.{k}={v}" for k, v in
                                        (("epochs", args.epochs), ("max_steps", args.max_steps), ("device", args.device)) if v is not None]
        cfg = cfg.override_strings(sets) if sets else cfg
    else:
        cfg = build_config(args)
    summary = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).fit()
    print(f"{summary.get('status', 'done')}: {summary.get('step')} steps, {summary.get('epoch')} epochs in "
          f"{summary.get('train_seconds')} s -> {run_dir}")
    if summary.get("status") == "interrupted":
        print(f"resume with: python -m train fit --run-dir {run_dir} --resume")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from blipcore.runs import RunDir

    run = RunDir(args.run_dir)
    info = run.read_info()
    checkpoints = run.checkpoints()
    if args.json:
        print(json.dumps({"info": info, "epochs": [c.epoch for c in checkpoints]}, indent=2))
        return 0
    cfg = info.get("config", {})
    m = cfg.get("model", {})
    print(f"run        {run.path}")
    print(f"status     {info.get('status')}" + (f"  ({info['error']})" if info.get("error") else ""))
    print(f"preset     {info.get('preset')}   created {info.get('created_at')}   updated {info.get('updated_at')}")
    print(f"device     {info.get('device', {}).get('type')} {info.get('device', {}).get('name', '')}   "
          f"git {str(info.get('git_revision'))[:10]}")
    print(f"model      ViT {m.get('image_size')}/{m.get('patch_size')} width {m.get('vision_width')} depth "
          f"{m.get('vision_depth')}; text width {m.get('text_width')} enc {m.get('text_encoder_depth')} dec "
          f"{m.get('text_decoder_depth')}; {info.get('parameters', 0):,} parameters")
    print(f"losses     itc {m.get('itc_weight')}  lm {m.get('lm_weight')}  itm {m.get('itm_weight')}")
    print(f"data       {cfg.get('data', {}).get('kind')} {cfg.get('data', {}).get('root')} ({info.get('train_items')} train items)")
    print(f"progress   {info.get('steps_done', 0)}/{info.get('total_steps')} steps, epochs {', '.join(str(c.epoch) for c in checkpoints) or 'none yet'}"
          + (f", {info['train_seconds']} s" if info.get("train_seconds") else ""))
    best = info.get("best", {})
    if best:
        print("best       " + "  ".join(f"{k}={v['value']:.4g}@{v['epoch']}" for k, v in sorted(best.items())
                                        if k in ("val_loss", "i2t_r1", "t2i_r1", "greedy_cider", "beam_cider", "greedy_bleu4")))
    last = run.read_metrics()[-1:] if run.metrics_file.exists() else []
    if last:
        print(f"last line  {json.dumps(last[0], sort_keys=True)[:200]}")
    return 0


def _epochs_to_evaluate(run, spec: str | None) -> list[int]:
    available = run.epochs()
    if not available:
        from blipcore.runs import CheckpointError

        raise CheckpointError(f"{run.path}: no checkpoint yet (one is written at the end of each epoch)")
    if spec in (None, "last"):
        return [available[-1]]
    if spec == "all":
        return available
    return [int(e) for e in spec.split(",")]


def cmd_eval(args: argparse.Namespace) -> int:
    from blipcore import metrics
    from blipcore.data import build_datasets
    from blipcore.evaluation import evaluate_model, summary_metrics
    from blipcore.runs import RunDir

    run = RunDir(args.run_dir)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    datasets = None
    for epoch in _epochs_to_evaluate(run, args.epoch):
        model, cfg, ckpt = run.load_model(epoch, device=args.device)
        if args.images:
            cfg.data.eval_images = max(cfg.data.eval_images, args.images)
        if datasets is None:  # every checkpoint of a run reads the same data: build it once
            datasets = build_datasets(cfg, splits=("train", "val"))
        result, dump = evaluate_model(model, cfg, datasets, args.device, strategies, caption_images=args.images,
                                      meteor=not args.no_meteor, progress=True)
        result.update(step=ckpt.step, label=f"epoch_{epoch:03d}")
        run.save_eval(epoch, result)
        if dump is not None:
            run.save_embeddings(epoch, dump)
        rows = {name: {**entry["metrics"], "notes": entry["notes"]} for name, entry in result.get("strategies", {}).items()}
        if "reference_row" in result:
            rows["(most frequent caption)"] = result["reference_row"]["metrics"]
        print(f"\nepoch {epoch} ({result['num_images']} images) -> {run.eval_path(epoch)}")
        print(metrics.format_metrics_table(rows))
        retrieval = result.get("retrieval")
        if retrieval:
            print("retrieval  " + "  ".join(f"{k}={v:.1f}" for k, v in retrieval.items()))
        print("summary    " + json.dumps({k: round(v, 4) for k, v in summary_metrics(result).items()}))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    import torch

    from blipcore.data import build_transform, load_image
    from blipcore.decoding import generate
    from blipcore.runs import RunDir

    run = RunDir(args.run_dir)
    model, cfg, ckpt = run.load_model(args.epoch, device=args.device)
    transform = build_transform(cfg.model.image_size, train=False)
    images, names = [], []
    for path in args.images:
        images.append(transform(load_image(path)))
        names.append(path)
    captions = generate(model, torch.stack(images).to(args.device), args.strategy)
    for name, caption in zip(names, captions):
        print(f"{name}\t{caption.text}")
    print(f"(epoch {ckpt.epoch} of {run.path}, strategy {args.strategy})", file=sys.stderr)
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from blipcore.data import generate_shapes

    generate_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_heldout=args.n_heldout,
                    image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_heldout} train/val/heldout scenes to {args.out}")
    return 0


# --- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from blipcore.decoding import STRATEGY_PRESETS

    parser = argparse.ArgumentParser(
        prog="python -m train", description="Train and inspect BLIP models from random initialisation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    strategies = ", ".join(STRATEGY_PRESETS)

    fit = sub.add_parser("fit", help="train a model into a run directory",
                         description="Train a BLIP model from random initialisation into a run directory "
                                     "(run.json, metrics.jsonl, checkpoints/, embeddings/, eval/).")
    fit.add_argument("--preset", default="demo",
                     help=f"train/configs/<name>.toml or a .toml path (presets: {', '.join(available_presets())}; default demo)")
    fit.add_argument("--run-dir", help="where the run is written (default runs/<preset>)")
    fit.add_argument("--data-root", help="dataset folder in COCO caption format (overrides the preset's data.root)")
    fit.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override any config value, e.g. --set train.batch_size=16 (repeatable)")
    fit.add_argument("--epochs", type=int, help="number of epochs")
    fit.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA if available")
    fit.add_argument("--resume", action="store_true", help="continue the run in --run-dir from checkpoints/last/")
    fit.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="captioning, collapse and retrieval metrics of checkpoints",
                        description="Evaluate checkpoints of a run with several decoding strategies and write "
                                    "eval/epoch_NNN.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr, collapse metrics, "
                                    "retrieval R@K, sample captions). SPICE is not computed (needs a download).")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--epoch", help="an epoch number, a comma list, 'last' (default) or 'all'")
    ev.add_argument("--strategies", default="greedy,beam,nucleus,repetition-penalty,no-repeat-ngram",
                    help=f"comma-separated decoding strategies (known: {strategies})")
    ev.add_argument("--images", type=int, help="number of validation images to caption (default: the run's setting)")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=cmd_eval)

    cap = sub.add_parser("caption", help="caption image files with a checkpoint")
    cap.add_argument("--run-dir", required=True)
    cap.add_argument("--epoch", type=int, help="epoch checkpoint (default: the newest)")
    cap.add_argument("--strategy", default="beam", help=f"decoding strategy (known: {strategies})")
    cap.add_argument("--device", default="cpu")
    cap.add_argument("images", nargs="+", metavar="IMAGE")
    cap.set_defaults(func=cmd_caption)

    info = sub.add_parser("info", help="summary of a run: config, status, epochs, best metrics")
    info.add_argument("run_dir", metavar="RUN_DIR")
    info.add_argument("--json", action="store_true", help="print run.json and the epochs as JSON")
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="generate datasets")
    data_sub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shapes = data_sub.add_parser("shapes", help="captioned synthetic scenes in COCO caption format",
                                 description="Write generated scenes (shapes, colours, sizes, positions, counts, "
                                             "relations) with five captions each, plus a held-out split of unseen "
                                             "colour-shape combinations, in COCO caption format.")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--n-train", type=int, default=3000)
    shapes.add_argument("--n-val", type=int, default=300)
    shapes.add_argument("--n-heldout", type=int, default=300)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(func=cmd_data_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from blipcore.data import AnnotationError, DatasetNotFoundError, ImageLoadError
    from blipcore.runs import RunError
    from blipcore.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RunError, DatasetNotFoundError, AnnotationError, ImageLoadError, NonFiniteLossError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
