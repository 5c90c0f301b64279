"""Training-data throughput: WebDataset shards against the same images as a COCO-caption folder.

Both loaders are the trainer's own (blipcore.data.build_datasets + the trainer's collate function), with
the same preset, batch size and DataLoader workers; rounds alternate between the two, so background load
hits both alike, and the result is samples/s per round and their ratio (shards / folder).

    python -m train data shards --from ../shared/data/flickr8k --out /tmp/flickr8k-shards
    python benchmarks/loader_throughput.py --folder ../shared/data/flickr8k --shards /tmp/flickr8k-shards

Without the shared data (blipcore.paths.SHARED_DATA_DIR), the repository's 64 training photos give a quick run:

    python -m train data shards --from tests/fixtures/coco-cc-by --out /tmp/cc-by-shards
    python benchmarks/loader_throughput.py --folder tests/fixtures/coco-cc-by --shards /tmp/cc-by-shards \
        --preset coco-mini --batch-size 8 --batches 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from blipcore.data import CaptionCollator, build_datasets
from blipcore.model.config import BlipConfig, load_preset


def loader(cfg: BlipConfig, workers: int) -> DataLoader:
    train = build_datasets(cfg, splits=("train",))["train"]
    if not isinstance(train, IterableDataset):
        train.set_epoch(0)
    return DataLoader(train, batch_size=cfg.train.batch_size, shuffle=not isinstance(train, IterableDataset),
                      num_workers=workers, collate_fn=CaptionCollator(cfg.model.max_text_len), drop_last=True)


def samples_per_s(data: DataLoader, batches: int) -> float:
    """Samples/s over `batches` batches, after the first (worker start-up) is excluded."""
    iterator = iter(data)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator, None)
        if batch is None:
            break
        count += len(batch["images"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True,
                        help="a COCO-caption-format dataset folder, e.g. ../shared/data/flickr8k, or the "
                             "repository's tests/fixtures/coco-cc-by (64 training photos: --batch-size 8)")
    parser.add_argument("--shards", required=True, help="the same data as written by `python -m train data shards`")
    parser.add_argument("--preset", default="flickr8k", help="preset for image size, batch size and captions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    base = load_preset(args.preset).override({"train.batch_size": args.batch_size, "data.num_workers": args.workers})
    folder = base.override({"data.kind": "coco", "data.root": str(Path(args.folder).resolve())})
    shards = base.override({"data.kind": "webdataset", "data.root": str(Path(args.shards).resolve())})
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: samples_per_s(loader(cfg, args.workers), args.batches)
                       for name, cfg in (("folder", folder), ("shards", shards))})
    ratios = [r["shards"] / r["folder"] for r in rounds]
    result = {"preset": args.preset, "batch_size": args.batch_size, "workers": args.workers, "rounds": rounds,
              "ratio_median": statistics.median(ratios)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: folder {r['folder']:7.1f} samples/s   shards {r['shards']:7.1f} samples/s   "
              f"shards/folder {r['shards'] / r['folder']:.2f}")
    print(f"median shards/folder {result['ratio_median']:.2f}")


if __name__ == "__main__":
    main()
