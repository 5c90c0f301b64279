"""WebDataset shards: training pairs streamed from tar files, the path past one machine's disk.

`python -m train data shards --from DIR --out DIR2` (`write_shards`, blipcore.data.prep.shards) turns a
COCO-caption-format folder into

    DIR2/train-000000.tar ...    one sample per image, `shard_size` images a shard, in the annotation file's
                                 order: <id>.<jpg|png|...> (the image file's bytes) + <id>.json
                                 ({"image_id", "file_name", "captions"})
    DIR2/annotations/captions_{train,val}.json   the image records and captions, in shard order
    DIR2/val/, DIR2/train/       the val images, and the first `train_files` train images, as files: evaluation
                                 (its fixed image set, the nearest-neighbour row) and the dashboard open images by path
    DIR2/shards.json             the manifest: the train shards in order, with their image counts

`data.kind = "webdataset"` with `data.root = DIR2` trains on it: `ShardDataset` streams the train shards (from
DIR2, or from `data.train_shards`: a brace pattern of paths or http(s) URLs, e.g. object storage; pipe: commands
only with BLIPLAB_ALLOW_PIPE_SHARDS=1) with the `webdataset` package, split without duplicates across DDP ranks
and DataLoader workers, through a seeded shuffle buffer. An epoch is one pass over the shard list: the shards are
dealt out in an order seeded by (seed, epoch), every reader (rank x worker) gets the same number of whole batches
(a reader whose shards run out reads them again; one with more stops), so every rank takes the same number of
steps. A resumed epoch restarts each reader at the first shard it had not finished: the steps, the epoch and the
shard order are exact; the items of the shards in progress are read again from their start and the shuffle
buffer starts empty, so the batches after a resume are not the ones an uninterrupted run would have drawn. A
corrupt sample or an unreadable shard is skipped with a warning and counted (`skipped`), never a crash.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset
from webdataset import shuffle
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples
from webdataset.utils import pytorch_worker_info

from ..model.config import BlipConfig, DataConfig
from .coco import DatasetNotFoundError, ImageRecord, ImageSkippedWarning, load_coco_annotations
from .folders import DataSourceError
from .images import ImageLoadError, load_image
from .transforms import draws_flip, flips, swap_left_right

MANIFEST = "shards.json"
PIPE_ALLOWED = "BLIPLAB_ALLOW_PIPE_SHARDS"  # environment variable: set to 1 to read shards through pipe: commands
_SHARD_FILE = re.compile(r"[\w.-]+\.tar")  # the shard file a path, URL or pipe: command names (the last one)


@dataclass
class Shard:
    """A train shard: where it is read from, and how many images (samples) it holds."""

    url: str
    images: int


def _share(total: int, index: int, parts: int) -> int:
    """Part `index` of `total` dealt out to `parts` as evenly as possible (the first ones get one more)."""
    return total // parts + (index < total % parts)


class ShardDataset(IterableDataset):
    """Training items streamed from WebDataset shards; see the module docstring for what an epoch is.

    `records` are the train images in shard order (evaluation reads their captions, and the first ones as files);
    an item is {image, caption, image_id, index (record index), file_path}, as CaptionDataset's. caption_mode
    "random": one item per image, its caption drawn from (seed, epoch, image); "all": one per caption. Every
    random draw (caption, crop, flip, shuffle, shard order) is seeded by the run's seed and the epoch. `flip`: the
    image flipped horizontally with probability 0.5 and the caption's left and right swapped, as CaptionDataset's.

    The trainer sets `epoch` (set_epoch) and `start_batch` (batches of this epoch already taken on each rank)
    before it iterates a DataLoader over the dataset, with `batch_size` and drop_last=True; each rank then gets
    exactly len(self) // world_size // batch_size - start_batch batches.
    """

    def __init__(self, records: Sequence[ImageRecord], shards: Sequence[Shard], transform: Any, caption_mode: str,
                 seed: int, batch_size: int, shuffle_buffer: int, flip: bool = False) -> None:
        self.records = list(records)
        self.shards = list(shards)
        self.transform = transform
        self.caption_mode = caption_mode
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.epoch = 0
        self.start_batch = 0
        self.skipped: dict[str, str] = {}  # sample or shard -> reason, in this process
        self._index = {record.image_id: i for i, record in enumerate(self.records)}
        self._items = [self._items_of(self.records[start:start + shard.images]) for start, shard in
                       zip(itertools.accumulate((s.images for s in self.shards), initial=0), self.shards, strict=False)]

    def _items_of(self, records: Sequence[ImageRecord]) -> int:
        return len(records) if self.caption_mode == "random" else sum(len(r.captions) for r in records)

    def __len__(self) -> int:
        return sum(self._items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _skip(self, what: str, reason: str) -> None:
        if what not in self.skipped:
            self.skipped[what] = reason
            warnings.warn(f"skipping {what}: {reason} ({len(self.skipped)} skipped in this reader)",
                          ImageSkippedWarning, stacklevel=3)

    def _shard_problem(self, exn: Exception) -> bool:
        """webdataset's error handler: warn, count, go on with the next sample or shard."""
        where = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "a shard"
        self._skip(str(where), f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def _raw_items(self, shards: Sequence[int]) -> Iterator[tuple[bytes, str, int, int, str]]:
        """(image bytes, caption, image id, caption number, where) of the items of these shards, in tar order."""
        urls = ({"url": self.shards[i].url} for i in shards)
        for sample in tarfile_samples(urls, handler=self._shard_problem):
            where = f"{sample.get('__url__')}#{sample.get('__key__')}"
            try:
                meta = json.loads(sample["json"])
                image_id, captions = int(meta["image_id"]), list(meta["captions"])
                data = next(value for key, value in sample.items() if not key.startswith("__") and key != "json")
            except (KeyError, ValueError, TypeError, StopIteration) as err:
                self._skip(where, f"not an image + captions sample ({type(err).__name__}: {err})")
                continue
            if image_id not in self._index or not captions:
                continue  # left out of this run (data.subset)
            if self.caption_mode == "all":
                numbers = range(len(captions))
            else:
                numbers = [random.Random(f"{self.seed}:{self.epoch}:{image_id}").randrange(len(captions))]
            for number in numbers:
                yield data, captions[number], image_id, number, where

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = pytorch_worker_info()
        readers = world * workers
        if len(self.shards) < readers:
            raise DataSourceError(f"{len(self.shards)} shard(s) cannot feed {world} rank(s) x {workers} DataLoader "
                                  "worker(s) without duplicates: write smaller shards (--shard-size) or use fewer")
        order = random.Random(f"{self.seed}:{self.epoch}:shards").sample(range(len(self.shards)), len(self.shards))
        mine = order[rank * workers + worker::readers]
        rank_batches = len(self) // world // self.batch_size
        total = _share(rank_batches, worker, workers) * self.batch_size
        done = _share(min(self.start_batch, rank_batches), worker, workers) * self.batch_size
        first, consumed = 0, 0
        while first < len(mine) and consumed + self._items[mine[first]] <= done:  # whole shards already read
            consumed += self._items[mine[first]]
            first += 1
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}:shuffle")
        left = total - done
        # From the first unfinished shard on, then all of this reader's shards again until its share is full;
        # each pass shuffled on its own, so that a pass ends before the next begins.
        for shards in itertools.chain([mine[first:]], itertools.repeat(mine)):
            produced = 0
            shuffled = shuffle(self.shuffle_buffer, initial=min(100, left), rng=rng)(self._raw_items(shards))
            for data, caption, image_id, number, where in shuffled:
                if left <= 0:
                    return
                item = self._item(data, caption, image_id, number, where)
                if item is not None:
                    produced += 1
                    left -= 1
                    yield item
            if left <= 0:
                return
            if not produced and shards is mine:
                raise DataSourceError(f"no readable training sample in {len(mine)} shard(s) such as "
                                      f"{self.shards[mine[0]].url}")

    def _item(self, data: bytes, caption: str, image_id: int, number: int, where: str) -> dict[str, Any] | None:
        source = io.BytesIO(data)
        source.name = where
        try:
            image = load_image(source)
        except ImageLoadError as err:
            self._skip(where, str(err).removeprefix(f"{where}: "))
            return None
        key = f"{self.seed}:{self.epoch}:{image_id}:{number}"
        with torch.random.fork_rng(devices=[]):  # the crop's draws seeded by (seed, epoch, item), as CaptionDataset
            torch.manual_seed(random.Random(f"{key}:augment").getrandbits(63))
            pixels = self.transform(image)
        if self.flip and draws_flip(key):  # the image and its caption together
            pixels, caption = pixels.flip(-1), swap_left_right(caption)
        index = self._index[image_id]
        return {"image": pixels, "caption": caption, "image_id": image_id, "index": index,
                "file_path": self.records[index].file_path}


# --- from a config -----------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise DatasetNotFoundError(f"shard manifest not found: looked for {path}. Write the shards with:\n  python -m "
                                   f"train data shards --from <a COCO-caption-format folder> --out {root}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        [(str(s["name"]), int(s["images"])) for s in manifest["train"]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataSourceError(f"{path}: not a shard manifest ({type(err).__name__}: {err})") from None
    return manifest


def shard_urls(data: DataConfig, names: Sequence[str]) -> list[str]:
    """Where each manifest shard is read from: beside shards.json, or the entry of data.train_shards (a brace
    pattern of paths, http(s) URLs or pipe: commands) that names the same shard file.

    pipe: entries run a shell command, and a config is also read from run.json files: they are refused unless
    BLIPLAB_ALLOW_PIPE_SHARDS=1 is set, so that nothing in a run folder is ever executed by default."""
    root = Path(data.root)
    if not data.train_shards:
        return [str(root / name) for name in names]
    urls = expand_urls(data.train_shards)
    if any(url.startswith("pipe:") for url in urls) and os.environ.get(PIPE_ALLOWED) != "1":
        raise ValueError(f"data.train_shards {data.train_shards!r} runs a shell command (pipe:); set "
                         f"{PIPE_ALLOWED}=1 to allow it, or read the shards over https")
    given = {found[-1]: url for url in urls if (found := _SHARD_FILE.findall(url))}
    missing = [name for name in names if name not in given]
    if missing:
        raise DatasetNotFoundError(f"data.train_shards {data.train_shards!r} has no {missing[0]} "
                                   f"({len(missing)} of the {len(names)} shards in {root / MANIFEST} missing)")
    return [given[name] for name in names]


def build_shard_dataset(cfg: BlipConfig, transform: Any) -> ShardDataset:
    """The train split of data.root (written by `data shards`) as a ShardDataset, with the image transform
    `transform` and the flip if data.augment has one; data.subset > 0 keeps the first N images (whole shards, and the
    first images of the last one)."""
    data, root = cfg.data, Path(cfg.data.root)
    manifest = read_manifest(root)
    records = load_coco_annotations(root / "annotations/captions_train.json", root / "train", data.subset)
    names = [shard["name"] for shard in manifest["train"]["shards"]]
    urls = shard_urls(data, names)
    shards, left = [], len(records)
    for url, shard in zip(urls, manifest["train"]["shards"], strict=True):
        if left <= 0:
            break
        shards.append(Shard(url, min(shard["images"], left)))
        left -= shard["images"]
    return ShardDataset(records, shards, transform, data.caption_mode, cfg.train.seed, cfg.train.batch_size,
                        data.shuffle_buffer, flip=flips(data.augment))

