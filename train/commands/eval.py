"""`eval`: captioning, collapse and retrieval metrics of a run's checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train.arguments import add_device_argument, add_epoch_argument, add_run_dir_argument, resolve_device

DEFAULT_STRATEGIES = "greedy,beam,nucleus,repetition-penalty,no-repeat-ngram"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from blipcore.evaluation.decoding import STRATEGY_PRESETS

    ev = subparsers.add_parser(
        "eval", help="captioning, collapse and retrieval metrics of checkpoints",
        description="Evaluate checkpoints of a run with several decoding strategies and write eval/epoch_NNN.json "
                    "(BLEU-1..4, METEOR, ROUGE-L, CIDEr, collapse metrics, retrieval R@K, sample captions). SPICE "
                    "is not computed (needs a download). "
                    "Example: python -m train eval --run-dir runs/demo --epoch all --strategies greedy,beam")
    add_run_dir_argument(ev, help="the run whose checkpoints are evaluated, e.g. runs/demo")
    add_epoch_argument(ev, many=True)
    ev.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                    help=f"comma-separated decoding strategies (default {DEFAULT_STRATEGIES}; known: "
                         f"{', '.join(STRATEGY_PRESETS)})")
    ev.add_argument("--split", default="val",
                    help="val (default): the split training evaluates on, written to eval/epoch_NNN.json; test: "
                         "the held-out split of data.test_annotations (e.g. Flickr8k's official 1,000 test images), "
                         "every image and all its references, written to eval/epoch_NNN.test.json; with "
                         "--annotations, the name of that evaluation (eval/epoch_NNN.<name>.json, e.g. coco-mini)")
    ev.add_argument("--annotations", metavar="FILE",
                    help="evaluate on another dataset: its COCO-caption file (relative to --data-root), every "
                         "image and all its references, e.g. --data-root ../shared/data/coco-mini --annotations "
                         "annotations/captions_val.json --split coco-mini")
    ev.add_argument("--data-root", metavar="DIR", help="with --annotations: the folder it and --image-folder are in")
    ev.add_argument("--image-folder", default="images", metavar="FOLDER",
                    help="with --annotations: its images, relative to --data-root (default images)")
    ev.add_argument("--images", type=int,
                    help="number of images to caption (default: the run's setting on val, all of test)")
    ev.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")
    add_device_argument(ev, "decodes")
    ev.add_argument("--captions-out", type=Path, metavar="DIR",
                    help="also write every caption of each strategy and of the nearest-neighbour row to DIR, one "
                         "COCO results file each (epoch_NNN.<split>.<name>.json), to score them on another "
                         "machine with `python -m train score` (e.g. from a GPU machine without Java)")
    ev.set_defaults(func=run)
    return ev


def epochs_to_evaluate(run, spec: int | list[int] | str | None) -> list[int]:
    """The epochs an --epoch value names: last (or None) the newest, all every one, else the numbers given."""
    available = run.epochs()
    if not available:
        raise run.no_checkpoint_error()
    if spec in (None, "last"):
        return [available[-1]]
    if spec == "all":
        return available
    return [int(e) for e in (spec if isinstance(spec, list) else str(spec).split(","))]


def _other_data(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """With --annotations, (annotation file, image folder) of another dataset; checked to exist."""
    if not args.annotations:
        if args.split not in ("val", "test") or args.data_root:
            raise ValueError("--data-root and a --split other than val or test go with --annotations FILE "
                             "(evaluate on another dataset)")
        return None
    root = Path(args.data_root or ".")
    other = (root / args.annotations, root / args.image_folder)
    for path, what in ((other[0], "--annotations"), (other[1], "--image-folder")):
        if not path.exists():
            raise ValueError(f"{what} {path}: no such {'file' if what == '--annotations' else 'folder'}")
    return other


def run(args: argparse.Namespace) -> int:
    from blipcore.evaluation.evaluator import CheckpointEvaluator
    from blipcore.runs.rundir import RunDir

    run_dir = RunDir(args.run_dir)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    evaluator = CheckpointEvaluator(run_dir, args.split, resolve_device(args.device), other_data=_other_data(args))
    for epoch in epochs_to_evaluate(run_dir, args.epoch):
        result = evaluator.evaluate(epoch, strategies, args.images, meteor=not args.no_meteor,
                                    captions_dir=args.captions_out)
        _print_result(args, run_dir, epoch, result)
    return 0


def _print_result(args: argparse.Namespace, run_dir, epoch: int, result: dict) -> None:
    from blipcore.evaluation import metrics
    from blipcore.evaluation.evaluator import summary_metrics

    rows = {name: {**entry["metrics"], "notes": entry["notes"]} for name, entry in result.get("strategies", {}).items()}
    for name, reference in result.get("reference_rows", {}).items():  # what learning nothing / retrieval score
        rows[f"({name})"] = {**reference["metrics"], "notes": reference.get("notes", [])}
    print(f"\nepoch {epoch}, {args.split} ({result['num_images']} images) -> {run_dir.eval_path(epoch, args.split)}")
    print(metrics.format_metrics_table(rows))
    retrieval = result.get("retrieval")
    if retrieval:
        print("retrieval  " + "  ".join(f"{k}={v:.1f}" for k, v in retrieval.items()))
    matching = result.get("matching")
    if matching:
        print("matching   " + "  ".join(f"{k}={v:.3f}" for k, v in matching.items()))
    print("summary    " + json.dumps({k: round(v, 4) for k, v in summary_metrics(result).items()}))
    print("seconds    " + "  ".join(f"{k}={v:.1f}" for k, v in result["seconds"].items()))
    if args.captions_out:
        print(f"captions   -> {args.captions_out}/epoch_{epoch:03d}.{args.split}.<strategy>.json")
