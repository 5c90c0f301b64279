"""`python -m train`: train, evaluate, caption, inspect runs, generate data.

    python -m train fit --preset demo --run-dir runs/demo
    python -m train eval --run-dir runs/demo --epoch all --strategies greedy,beam,nucleus
    python -m train caption --run-dir runs/demo --strategy beam photo.jpg
    python -m train caption --run-dir runs/demo photos/ --out captions.csv
    python -m train info runs/demo
    python -m train data shapes --out data/shapes
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blipcore.config import BlipConfig, available_presets, load_preset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # what `caption` takes from a folder
CAPTION_OUT_FORMATS = (".jsonl", ".csv")


def build_config(args: argparse.Namespace) -> BlipConfig:
    """The preset of `--preset` with --epochs, --max-steps, --device, --data-root and --set applied."""
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
    """Train (or with --resume continue) a run; one summary line, printed by the first torchrun rank only."""
    from blipcore.runs import RunDir
    from blipcore.trainer import Trainer

    run_dir = Path(args.run_dir or f"runs/{Path(args.preset).stem}")
    if args.resume:
        cfg = RunDir(run_dir).config()
        given = (("epochs", args.epochs), ("max_steps", args.max_steps), ("device", args.device))
        sets = list(args.set or []) + [f"train.{k}={v}" for k, v in given if v is not None]
        cfg = cfg.override_strings(sets) if sets else cfg
    else:
        cfg = build_config(args)
    summary = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress).fit()
    if summary:  # empty on every torchrun rank but the first: one summary line per run, not one per process
        print(f"{summary.get('status', 'done')}: {summary.get('step')} steps, {summary.get('epoch')} epochs in "
              f"{summary.get('train_seconds')} s -> {run_dir}")
        if summary.get("status") == "interrupted":
            print(f"resume with: python -m train fit --run-dir {run_dir} --resume")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """A run's config, status, progress, best headline metrics and last logged line."""
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
    data = cfg.get("data", {})
    print(f"data       {data.get('kind')} {data.get('root')} ({info.get('train_items')} train items)")
    epochs = ", ".join(str(c.epoch) for c in checkpoints) or "none yet"
    print(f"progress   {info.get('steps_done', 0)}/{info.get('total_steps')} steps, epochs {epochs}"
          + (f", {info['train_seconds']} s" if info.get("train_seconds") else ""))
    best = _headline_best(info.get("best", {}))
    if best:
        print(f"best       {best}")
    last = run.read_metrics()[-1:] if run.metrics_file.exists() else []
    if last:
        print(f"last line  {json.dumps(last[0], sort_keys=True)[:200]}")
    return 0


def _headline_best(best: dict[str, Any]) -> str:
    """run.json's best values of the headline metrics (the registry's `headline` flag), as `key=value@epoch`."""
    from blipcore.metrics import metric

    shown = []
    for key, entry in sorted(best.items()):
        declared = metric(key)
        if declared is not None and declared.headline and isinstance(entry, dict):
            shown.append(f"{key}={declared.format(entry.get('value'))}@{entry.get('epoch')}")
    return "  ".join(shown)


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
        rows = {name: {**entry["metrics"], "notes": entry["notes"]}
                for name, entry in result.get("strategies", {}).items()}
        if "reference_row" in result:
            reference = result["reference_row"]
            rows["(most frequent caption)"] = {**reference["metrics"], "notes": reference.get("notes", [])}
        print(f"\nepoch {epoch} ({result['num_images']} images) -> {run.eval_path(epoch)}")
        print(metrics.format_metrics_table(rows))
        retrieval = result.get("retrieval")
        if retrieval:
            print("retrieval  " + "  ".join(f"{k}={v:.1f}" for k, v in retrieval.items()))
        print("summary    " + json.dumps({k: round(v, 4) for k, v in summary_metrics(result).items()}))
    return 0


@dataclass
class CaptionResult:
    """One file given to `caption`: its caption, or why it could not be read (then caption is None)."""

    file: str
    caption: str | None = None
    error: str | None = None


def _images_to_caption(paths: list[str], recursive: bool) -> list[Path]:
    """The files to caption, in order and each once: a file as given (whatever its extension: it is tried),
    a folder's files with an image extension, sorted (with `recursive`, those of its subfolders too).
    ValueError for a path that is neither a file nor a folder, or when no image is found at all."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            children = path.rglob("*") if recursive else path.iterdir()
            found += sorted(c for c in children if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{arg}: no such file or folder")
    if not found:
        raise ValueError(f"no images in {', '.join(paths)} (a folder gives its files named "
                         f"{' '.join('*' + e for e in IMAGE_EXTENSIONS)}"
                         f"{', subfolders included' if recursive else '; --recursive to search subfolders'})")
    return list(dict.fromkeys(found))


def _caption_file_format(out: str | None) -> str | None:
    """The format (a CAPTION_OUT_FORMATS extension) of `--out`, checked before any work; ValueError otherwise."""
    if out is None:
        return None
    suffix = Path(out).suffix.lower()
    if suffix not in CAPTION_OUT_FORMATS:
        raise ValueError(f"--out {out}: unknown format {suffix or '(no extension)'!r}; "
                         f"use {' or '.join(CAPTION_OUT_FORMATS)}")
    return suffix


def _caption_files_bytes(results: list[CaptionResult], suffix: str) -> bytes:
    """The results as .jsonl (one object a file: file + caption, or file + error) or .csv (file, caption, error)."""
    if suffix == ".jsonl":
        lines = (json.dumps({k: v for k, v in asdict(r).items() if v is not None}, ensure_ascii=False) for r in results)
        return "".join(line + "\n" for line in lines).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "caption", "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in results)
    return buffer.getvalue().encode()


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption every readable image of the files and folders given; exit 3 when some could not be read."""
    import torch
    from tqdm.auto import tqdm

    from blipcore.data import ImageLoadError, build_transform, load_image
    from blipcore.decoding import generate
    from blipcore.runs import RunDir, atomic_write_bytes

    out_format = _caption_file_format(args.out)
    files = _images_to_caption(args.images, args.recursive)
    run = RunDir(args.run_dir)
    model, cfg, ckpt = run.load_model(args.epoch, device=args.device)
    transform = build_transform(cfg.model.image_size, train=False)

    results = [CaptionResult(str(path)) for path in files]
    batches = [results[i:i + args.batch_size] for i in range(0, len(results), args.batch_size)]
    for batch in tqdm(batches, desc="caption", unit="batch", disable=len(batches) < 2, file=sys.stderr):
        readable, images = [], []
        for result in batch:
            try:
                images.append(transform(load_image(result.file)))
                readable.append(result)
            except ImageLoadError as err:  # reported, and the others are still captioned
                result.error = str(err).removeprefix(f"{result.file}: ")
                tqdm.write(f"error: {result.file}: {result.error}", file=sys.stderr)
        if images:
            captions = generate(model, torch.stack(images).to(args.device), args.strategy)
            for result, caption in zip(readable, captions, strict=True):
                result.caption = caption.text

    for result in results:
        if result.caption is not None:
            print(f"{result.file}\t{result.caption}")
    if out_format is not None:
        atomic_write_bytes(args.out, _caption_files_bytes(results, out_format))
    failed = sum(result.error is not None for result in results)
    print(f"(epoch {ckpt.epoch} of {run.path}, strategy {args.strategy}: {len(results) - failed} captioned, "
          f"{failed} unreadable{f'; results in {args.out}' if args.out else ''})", file=sys.stderr)
    return 3 if failed else 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from blipcore.data import generate_shapes

    generate_shapes(args.out, n_train=args.n_train, n_val=args.n_val, n_heldout=args.n_heldout,
                    image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.n_train}/{args.n_val}/{args.n_heldout} train/val/heldout scenes to {args.out}")
    return 0


def _program_name() -> str:
    """How the user called us, for usage lines: `python -m train` or the `bliplab` console command."""
    name = Path(sys.argv[0]).name
    return "python -m train" if name in ("__main__.py", "") else name


# --- parser ------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from blipcore.decoding import STRATEGY_PRESETS

    parser = argparse.ArgumentParser(
        prog=_program_name(), description="Train and inspect BLIP models from random initialisation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    strategies = ", ".join(STRATEGY_PRESETS)

    fit = sub.add_parser("fit", help="train a model into a run directory",
                         description="Train a BLIP model from random initialisation into a run directory "
                                     "(run.json, metrics.jsonl, checkpoints/, embeddings/, eval/).")
    fit.add_argument("--preset", default="demo",
                     help=f"a preset of blipcore/presets/ ({', '.join(available_presets())}; default demo) "
                          "or the path of a .toml file in that format")
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

    cap = sub.add_parser(
        "caption", help="caption image files and folders with a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Caption images with a checkpoint of a run. Each PATH is an image file (tried whatever its\n"
            f"extension) or a folder, which gives its files named {' '.join('*' + e for e in IMAGE_EXTENSIONS)}\n"
            "(any case), sorted; subfolders only with --recursive.\n\n"
            "Every readable image is captioned; an unreadable one (corrupt, truncated, not an image) is\n"
            "reported on stderr with the reason and the others are still captioned.\n\n"
            "stdout: one line per captioned image, FILE<TAB>CAPTION (no header line).\n"
            "--out FILE.jsonl: one JSON object per image, {\"file\", \"caption\"} or {\"file\", \"error\"}.\n"
            "--out FILE.csv: columns file, caption, error (one of the last two empty).\n\n"
            "exit status: 0 every image captioned; 3 some unreadable (the others captioned);\n"
            "2 bad arguments: a PATH that is neither file nor folder, no images found at all, an --out\n"
            "extension other than .jsonl or .csv, no such run or checkpoint."
        ),
    )
    cap.add_argument("--run-dir", required=True, help="the run whose checkpoint captions")
    cap.add_argument("--epoch", type=int, help="epoch checkpoint (default: the newest)")
    cap.add_argument("--strategy", default="beam", choices=list(STRATEGY_PRESETS), metavar="STRATEGY",
                     help=f"decoding strategy (default beam; known: {strategies})")
    cap.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    cap.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                     help="images captioned at once (default 16); a progress bar shows when there are several batches")
    cap.add_argument("--recursive", action="store_true", help="also take images from the subfolders of a folder")
    cap.add_argument("--out", metavar="FILE", help="also write the results to FILE.jsonl or FILE.csv (atomically)")
    cap.add_argument("images", nargs="+", metavar="PATH", help="image files and folders of images")
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
