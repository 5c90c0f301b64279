"""Training-data throughput: the decoded-image cache (data.loader = "cache") and, optionally, WebDataset shards,
against the same images read from a COCO-caption folder.

Every loader is the trainer's own: the folder's is blipcore.data.build_datasets + the trainer's collate function
in a DataLoader with the trainer's number of workers (the preset's data.num_workers, at most the CPU count); the
shards' the same over data.kind = "webdataset"; the cache's is blipcore.data.image_cache.CacheLoader, in this
process, augmenting on --device. Same preset, batch size and items (one random order). Rounds alternate between
them, so background load hits all alike; the result is samples/s per round and the median ratios (cache / folder,
shards / folder). Building the cache, when it is not there yet, is timed apart and not part of a round (Flickr8k's
6,000 training images take 373 MB at the flickr8k-cpu preset's 96 px, 2 GB at the flickr8k preset's 224 px).

    python benchmarks/loader_throughput.py --folder ../shared/data/flickr8k --preset flickr8k-cpu
    python -m train data shards --from ../shared/data/flickr8k --out /tmp/flickr8k-shards
    python benchmarks/loader_throughput.py --folder ../shared/data/flickr8k --shards /tmp/flickr8k-shards

Without the shared data (blipcore.paths.SHARED_DATA_DIR), the repository's 64 training photos give a quick run:

    python benchmarks/loader_throughput.py --folder tests/fixtures/coco-cc-by --preset coco-mini \
        --batch-size 8 --batches 6 --cache-dir /tmp/cc-by-cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from blipcore.data import CaptionCollator, build_datasets
from blipcore.data.image_cache import CacheLoader
from blipcore.model.config import BlipConfig, load_preset


def folder_loader(cfg: BlipConfig, workers: int) -> DataLoader:
    """The folder's (or the shards') training batches in a DataLoader, as the trainer makes them."""
    train = build_datasets(cfg, splits=("train",))["train"]
    if not isinstance(train, IterableDataset):
        train.set_epoch(0)
    return DataLoader(train, batch_size=cfg.train.batch_size, shuffle=not isinstance(train, IterableDataset),
                      num_workers=workers, collate_fn=CaptionCollator(cfg.model.max_text_len), drop_last=True)


def samples_per_s(batches: Iterable[dict[str, Any] | None], count: int) -> float:
    """Samples/s over `count` batches, after the first (worker start-up) is excluded."""
    iterator = iter(batches)
    next(iterator)
    samples, start = 0, time.perf_counter()
    for _ in range(count):
        batch = next(iterator, None)
        if batch is None:
            break
        samples += len(batch["images"])
    return samples / (time.perf_counter() - start)


def cache_batches(loader: CacheLoader, seed: int) -> Iterator[dict[str, Any] | None]:
    """The cache loader's batches of one random order of the training items."""
    order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))
    return loader.batches(order.tolist())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True,
                        help="a COCO-caption-format dataset folder, e.g. ../shared/data/flickr8k, or the "
                             "repository's tests/fixtures/coco-cc-by (64 training photos: --batch-size 8)")
    parser.add_argument("--shards", help="the same data as written by `python -m train data shards` (optional)")
    parser.add_argument("--cache-dir", help="where the image cache is read, or built first (default: the preset's "
                                            "data.cache_dir, else the user's cache folder)")
    parser.add_argument("--preset", default="flickr8k", help="preset for image size, augmentation, batch size, "
                                                             "captions and workers (default flickr8k)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int,
                        help="DataLoader workers of the folder and the shards (default: the trainer's, the preset's "
                             "data.num_workers at most the CPU count)")
    parser.add_argument("--device", default="cpu", help="where the cache loader augments (cpu or cuda)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base = load_preset(args.preset).override({"train.batch_size": args.batch_size})
    workers = args.workers if args.workers is not None else min(base.data.num_workers, len(os.sched_getaffinity(0)))
    folder = base.override({"data.kind": "coco", "data.root": str(Path(args.folder).resolve()),
                            **({"data.cache_dir": str(Path(args.cache_dir).resolve())} if args.cache_dir else {})})
    started = time.perf_counter()
    train = build_datasets(folder, splits=("train",))["train"]
    train.set_epoch(0)
    cache = CacheLoader.from_config(folder, train, torch.device(args.device), progress=not args.json)
    opened = time.perf_counter() - started  # building the cache, when it was not there
    loaders = {"folder": lambda seed: folder_loader(folder, workers), "cache": lambda seed: cache_batches(cache, seed)}
    if args.shards:
        shards = base.override({"data.kind": "webdataset", "data.root": str(Path(args.shards).resolve())})
        loaders["shards"] = lambda seed: folder_loader(shards, workers)
    rounds = [{name: samples_per_s(make(seed), args.batches) for name, make in loaders.items()}
              for seed in range(args.rounds)]
    ratios = {f"{name}/folder": statistics.median(r[name] / r["folder"] for r in rounds)
              for name in loaders if name != "folder"}
    result = {"preset": args.preset, "batch_size": args.batch_size, "workers": workers, "device": args.device,
              "cache": str(cache.cache.path), "cache_open_s": round(opened, 1), "rounds": rounds,
              "median_ratios": ratios}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.preset}, batch {args.batch_size}, folder with {workers} worker(s), cache on {args.device}: "
          f"{cache.cache.path} (opened or built in {opened:.1f} s)")
    others = [name for name in loaders if name != "folder"]
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: " + "   ".join(f"{name} {r[name]:7.1f} samples/s" for name in loaders) + "   "
              + "   ".join(f"{name}/folder {r[name] / r['folder']:.2f}" for name in others))
    print("median " + "   ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
