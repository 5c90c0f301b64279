"""`score`: score COCO results files (captions written elsewhere) against a caption file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    score = subparsers.add_parser(
        "score", help="score COCO results files (captions written elsewhere) against a caption file",
        description="Score captions written elsewhere (`python -m train eval --captions-out`, or any captioner's "
                    "COCO results file: a JSON list of {\"image_id\", \"caption\"}) against every reference "
                    "caption of a COCO caption file: BLEU-1..4, METEOR, ROUGE-L and CIDEr on PTB-tokenised text "
                    "(Java), the collapse metrics and, with --train-annotations, memorisation. Every image of "
                    "the annotations must have exactly one caption. Example: python -m train score "
                    "captions/*.json --annotations data/flickr8k/annotations/captions_official_test.json",
    )
    score.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json",
                       help="COCO results files, one row each in the table")
    score.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                       help="the references: a COCO caption file, e.g. "
                            "../shared/data/flickr8k/annotations/captions_official_test.json")
    score.add_argument("--train-annotations", type=Path, metavar="FILE",
                       help="the training captions, for the share of captions found verbatim among them")
    score.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes ~10 s to start)")
    score.add_argument("--out", type=Path, metavar="FILE", help="also write the scores as JSON")
    score.set_defaults(func=run)
    return score


def run(args: argparse.Namespace) -> int:
    from blipcore.evaluation import metrics
    from blipcore.evaluation.scoring import score_results
    from blipcore.io import atomic_write_json

    scored = score_results(args.results, args.annotations, args.train_annotations, meteor=not args.no_meteor)
    print(metrics.format_metrics_table({name: {**row["metrics"], "notes": row["notes"]}
                                        for name, row in scored.items()}))
    if args.out:
        atomic_write_json(args.out, {"annotations": str(args.annotations), "results": scored})
        print(f"-> {args.out}")
    return 0
