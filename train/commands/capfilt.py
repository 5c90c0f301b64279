"""`capfilt`: BLIP's CapFilt: caption the training images, filter every caption, write the bootstrapped data."""

from __future__ import annotations

import argparse

from train.arguments import add_device_argument, add_resume_arguments, count, interrupted, positive_int, run_reference


def add_parser(subparsers) -> argparse.ArgumentParser:
    from blipcore.evaluation.decoding import STRATEGY_PRESETS

    capfilt = subparsers.add_parser(
        "capfilt", help="CapFilt: caption the training images, filter every caption, write the bootstrapped data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "BLIP's CapFilt. The captioner writes --synthetic captions per training image of --data (nucleus\n"
            "sampling by default, BLIP's choice); the filter scores every original and synthetic caption with\n"
            "its ITM head's match probability and its ITC similarity; the captions at or above the cut-off\n"
            "(--threshold on the ITM probability, default 0.5, or the top --keep-fraction by --score) form the\n"
            "training captions of OUT, a derived dataset (images linked, val/test annotations copied). A clean\n"
            "subset of --data (`data noise --clean-images`, the human-annotated share) is neither captioned nor\n"
            "filtered: its captions are kept as they are, as BLIP keeps COCO's.\n"
            "OUT/capfilt.jsonl: one line per caption (origin, planted flag when --data has noise.jsonl, ITM\n"
            "probability, ITC similarity, kept); OUT/capfilt.json: settings, counts, and each scorer's ROC AUC,\n"
            "precision and recall at finding the planted captions. The dashboard's CapFilt page shows both.\n\n"
            "example:  python -m train capfilt --captioner runs/noisy --filter runs/noisy:3 \\\n"
            "              --data data/flickr8k-noisy --out data/flickr8k-boot --synthetic 1"
        ),
    )
    capfilt.add_argument("--captioner", required=True, type=run_reference, metavar="RUN[:EPOCH]",
                         help="the run whose decoder writes the synthetic captions (default: its newest checkpoint; "
                              "unused with --synthetic 0, so any run, e.g. the filter's), e.g. runs/noisy:3")
    capfilt.add_argument("--filter", required=True, type=run_reference, metavar="RUN[:EPOCH]",
                         help="the run whose ITM head (and ITC) scores the captions; may be the captioner's run")
    capfilt.add_argument("--data", required=True, metavar="DIR", help="the COCO-caption-format dataset to bootstrap")
    capfilt.add_argument("--out", required=True, metavar="DIR2", help="the bootstrapped dataset's folder")
    capfilt.add_argument("--synthetic", type=count, default=1, metavar="K",
                         help="synthetic captions per image (default 1; 0 = filter the originals only)")
    capfilt.add_argument("--decoding", default="nucleus",
                         help=f"the captioner's strategy: {', '.join(STRATEGY_PRESETS)} (default nucleus)")
    capfilt.add_argument("--score", default="auto", choices=("auto", "itm", "itc"),
                         help="what decides kept or dropped (default auto: itm when the filter has an ITM head)")
    keep = capfilt.add_mutually_exclusive_group()
    keep.add_argument("--threshold", type=float, help="keep captions with ITM match probability >= this, in [0, 1] "
                                                      "(default 0.5)")
    keep.add_argument("--keep-fraction", type=float, metavar="F", help="keep this share of all captions, the "
                                                                        "highest-scored, in (0, 1]")
    capfilt.add_argument("--train-annotations", metavar="FILE",
                         help="the training captions, relative to DIR (default: the filter run's data config)")
    capfilt.add_argument("--train-images", metavar="FOLDER",
                         help="their image folder, relative to DIR (default: the filter run's data config)")
    capfilt.add_argument("--batch-size", type=positive_int, default=32, help="images a batch (default 32)")
    capfilt.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    add_device_argument(capfilt, "captions and scores", indexed=False)
    add_resume_arguments(capfilt, "continue a stopped run in OUT (same settings)",
                         "start again in an OUT that holds something")
    capfilt.set_defaults(func=run)
    return capfilt


def run(args: argparse.Namespace) -> int:
    """Caption and filter a dataset's training images into a bootstrapped dataset."""
    from blipcore.experiments.capfilt import CapfiltSettings, run_capfilt

    settings = CapfiltSettings(synthetic_per_image=args.synthetic, decoding=args.decoding, score=args.score,
                               threshold=args.threshold, keep_fraction=args.keep_fraction,
                               batch_size=args.batch_size, seed=args.seed)
    try:
        report = run_capfilt(args.captioner, args.filter, args.data, args.out, settings,
                             train_annotations=args.train_annotations, train_images=args.train_images,
                             device=args.device, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.no_progress)
    except KeyboardInterrupt:
        return interrupted(args, "the batches scored so far are kept")
    print(report.text())
    print(f"train on it with:  --data-root {report.out}")
    return 0
