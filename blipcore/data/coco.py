"""COCO caption format: annotation JSON + image folder -> a torch Dataset and a collate function.

The one on-disk format. `images` [{id, file_name, ...}] and `annotations` [{image_id, caption}].
Annotation files are validated at load and refused with an `AnnotationError` that names the file
and the problem; image files are not checked at load (stat-ing 100k files is slow), a missing or
broken image is skipped when it is read, with one warning per file.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model.config import CAPTION_MODES
from ..model.tokenizer import tokenize_captions
from .images import ImageLoadError, load_image
from .transforms import draws_flip, swap_left_right

logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A caption annotation file that cannot be used; the message names the file and the problem."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not where the config says; the message says where it looked and what to put there."""


class ImageSkippedWarning(UserWarning):
    """An image that could not be read was left out of its batch."""


@dataclass
class ImageRecord:
    """One image and all its reference captions. `info`: the image entry's other fields (e.g. shapes' `objects`)."""

    image_id: int
    file_path: str
    captions: list[str]
    info: dict[str, Any] = field(default_factory=dict)


# --- annotation loading -------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise AnnotationError(f"{path}: empty file")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if exc.pos >= len(raw.rstrip()) - 1 else ""
        where = f"line {exc.lineno}, column {exc.colno}"
        raise AnnotationError(f"{path}: invalid JSON at {where}: {exc.msg}{hint}") from None


def _field(path: Path, entry: Any, where: str, key: str, kind: type) -> Any:
    """entry[key], checked to be of type `kind` (an int is never a bool)."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is {type(entry).__name__}, expected an object")
    if key not in entry:
        raise AnnotationError(f"{path}: {where}: key {key!r} missing")
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AnnotationError(f"{path}: {where}.{key} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _list(path: Path, document: dict[str, Any], key: str) -> list[Any]:
    if key not in document:
        raise AnnotationError(f"{path}: key {key!r} missing")
    if not isinstance(document[key], list):
        raise AnnotationError(f"{path}: {key!r} is {type(document[key]).__name__}, expected a list")
    return document[key]


def load_coco_annotations(
    ann_path: str | Path, image_dir: str | Path, subset: int = 0
) -> list[ImageRecord]:
    """Image records in the order of the file's `images` list; `subset` > 0 keeps the first N usable images.

    Captions are whitespace-normalised; empty ones are dropped, and so are images left without any
    (logged with their count). Raises `AnnotationError` for a missing, unreadable or malformed file.
    """
    path, image_dir = Path(ann_path), Path(image_dir)
    document = _read_json(path)
    if not isinstance(document, dict):
        raise AnnotationError(f"{path}: top level is a {type(document).__name__}, expected an object with 'images'")
    images, annotations = _list(path, document, "images"), _list(path, document, "annotations")

    captions: dict[int, list[str]] = {}
    entries: list[tuple[int, str, dict[str, Any]]] = []
    for i, image in enumerate(images):
        image_id = _field(path, image, f"images[{i}]", "id", int)
        file_name = _field(path, image, f"images[{i}]", "file_name", str)
        if image_id in captions:
            raise AnnotationError(f"{path}: images[{i}]: duplicate image id {image_id}")
        captions[image_id] = []
        entries.append((image_id, file_name, {k: v for k, v in image.items() if k not in ("id", "file_name")}))

    orphans = 0
    for i, annotation in enumerate(annotations):
        image_id = _field(path, annotation, f"annotations[{i}]", "image_id", int)
        caption = " ".join(_field(path, annotation, f"annotations[{i}]", "caption", str).split())
        if image_id not in captions:
            orphans += 1
        elif caption:
            captions[image_id].append(caption)
    if orphans:
        logger.warning("%s: %d caption(s) refer to image ids not in 'images'; ignored", path, orphans)

    records = [
        ImageRecord(image_id, str(image_dir / file_name), captions[image_id], info)
        for image_id, file_name, info in entries
        if captions[image_id]
    ]
    if len(records) < len(entries):
        logger.warning("%s: %d image(s) have no non-empty caption; dropped", path, len(entries) - len(records))
    return records[:subset] if subset > 0 else records


# --- dataset ------------------------------------------------------------------------------------------


class CaptionDataset(Dataset):
    """Images with captions. "random": one item per image, caption chosen from (seed, epoch, index);
    "all": one item per (image, caption) pair.

    `flip`: flip each item's image horizontally with probability 0.5 (data.augment's "flip" step), its
    caption's left and right swapped with it (`swap_left_right`), before the collator tokenizes it.

    Every random draw of an item (its caption, its augmentation, its flip) is a function of (seed, epoch, item)
    alone, never of a process's random stream: the same item is the same tensor in the main process or
    in any DataLoader worker, so a run resumed in the middle of an epoch sees exactly the data it would
    have seen uninterrupted, whatever `num_workers` is.

    An item is {image, caption, image_id, index (record index), file_path}, or None when the image
    cannot be read: the collator drops it, and `skipped` (file -> reason, this process only) counts it.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Any,
        caption_mode: str = "random",
        seed: int = 0,
        flip: bool = False,
    ) -> None:
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode {caption_mode!r}: expected one of {', '.join(CAPTION_MODES)}")
        self.records = list(records)
        self.transform = transform
        self.caption_mode = caption_mode
        self.seed = seed
        self.flip = flip
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        # "all": item i is caption i - starts[r] of the record r with starts[r] <= i < starts[r + 1]
        self._starts = np.cumsum([0] + [len(record.captions) for record in self.records])

    def set_epoch(self, epoch: int) -> None:
        """Choose the "random" captions for this epoch (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) if self.caption_mode == "random" else int(self._starts[-1])

    def _locate(self, item: int) -> tuple[int, int]:
        """(record index, caption index) of an item."""
        if self.caption_mode == "all":
            index = int(np.searchsorted(self._starts, item, side="right")) - 1
            return index, item - int(self._starts[index])
        choice = random.Random(f"{self.seed}:{self.epoch}:{item}").randrange(len(self.records[item].captions))
        return item, choice

    def augment_seed(self, item: int) -> int:
        """The seed of an item's transform draws (its crop, its jitter): a function of (seed, epoch, item) alone."""
        return random.Random(f"{self.seed}:{self.epoch}:{item}:augment").getrandbits(63)

    def flipped(self, item: int) -> bool:
        """Whether an item is flipped: its image mirrored and its caption's sides swapped (`flip` sets only)."""
        return self.flip and draws_flip(f"{self.seed}:{self.epoch}:{item}")

    def _augment(self, image: Any, item: int) -> torch.Tensor:
        """The transform, its random draws (crop) seeded by (seed, epoch, item); the process's RNG is left alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.augment_seed(item))
            return self.transform(image)

    def __getitem__(self, item: int) -> dict[str, Any] | None:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for a dataset of {len(self)}")
        index, caption = self._locate(item)
        record = self.records[index]
        try:
            image = load_image(record.file_path)
        except ImageLoadError as exc:
            if record.file_path not in self.skipped:
                self.skipped[record.file_path] = str(exc)
                warnings.warn(f"skipping image: {exc}", ImageSkippedWarning, stacklevel=2)
            return None
        pixels, text = self._augment(image, item), record.captions[caption]
        if self.flipped(item):  # the image and its caption together
            pixels, text = pixels.flip(-1), swap_left_right(text)
        return {
            "image": pixels,
            "caption": text,
            "image_id": record.image_id,
            "index": index,
            "file_path": record.file_path,
        }


class CaptionCollator:
    """collate_fn: drops unreadable (None) items, stacks images, tokenizes captions; None if nothing is left."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        captions = [item["caption"] for item in kept]
        tokens = tokenize_captions(captions, self.max_len)
        return {
            "images": torch.stack([item["image"] for item in kept]),
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "image_ids": torch.tensor([item["image_id"] for item in kept], dtype=torch.long),
            "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
            "captions": captions,
            "file_paths": [item["file_path"] for item in kept],
            "num_skipped": len(items) - len(kept),
        }
