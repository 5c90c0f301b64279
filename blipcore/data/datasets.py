"""The datasets of a config: `build_datasets(cfg)`, the one way training, evaluation and the dashboard get data,
and `fetch_hint`, the command that makes a missing dataset.

It sits above the readers it chooses between (COCO-caption-format folders: `coco`; WebDataset shards: `shards`,
imported on use; generated scenes: `shapes`), so that the arrows between them point one way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.config import BlipConfig, DataConfig
from .coco import CaptionDataset, DatasetNotFoundError, load_coco_annotations
from .folders import MARKER
from .shapes import generate_shapes, shapes_ready
from .transforms import build_transform, flips

if TYPE_CHECKING:
    from .shards import ShardDataset

logger = logging.getLogger(__name__)


def _shown(root: str) -> str:
    """A path as the user should type it: relative to the current folder when it lies inside it."""
    path = Path(root)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fetch_hint(data: DataConfig) -> str | None:
    """What to do when the dataset of `data` is missing, from `data.source`: the exact command that fetches
    it into data.root (with --resume when an unfinished one is there), or None for a source with no command."""
    root = _shown(data.root)
    resume = " --resume" if (Path(data.root) / MARKER).is_file() else ""
    if data.source == "coco2017":
        train, val = (f"{n:,}" if n else "all" for n in (data.subset, data.val_subset))
        return (f"Fetch it (COCO 2017 captions with the first {train} train2017 and {val} val2017 images, by URL) "
                f"with:\n  python -m train data coco --out {root} --first {data.subset} --val-first {data.val_subset}"
                f"{resume}\nor pass --data-root DIR")
    if data.source == "flickr8k":
        return ("Build it from the two zips of the Flickr8k distribution (research use only; each a path or a URL) "
                "with:\n  python -m train data flickr8k --images Flickr8k_Dataset.zip --text Flickr8k_text.zip "
                f"--out {root}{resume}\nor pass --data-root DIR")
    if data.source == "test-fixture":
        return ("This preset reads a test fixture that has no public download: pass --data-root DIR to a copy of it "
                "(this project's tests ship a small CC BY one: tests/fixtures/coco-cc-by)")
    return None


def _require(path: Path, what: str, hint: str) -> None:
    if not path.exists():
        raise DatasetNotFoundError(f"{what} not found: looked for {path}. {hint}")


def build_datasets(
    cfg: BlipConfig, splits: Sequence[str] = ("train", "val")
) -> dict[str, CaptionDataset | ShardDataset]:
    """Datasets for the requested splits ("train", "val", and for shapes "heldout").

    Shapes are generated into data.root first if that folder is not a complete generation with these
    parameters. Train uses the augmentation set data.augment (for shapes, without its crop) and
    data.caption_mode; val and heldout use the eval transform and one fixed caption per image (caption_mode
    "random", epoch 0: do not call set_epoch on them), with every reference caption in `dataset.records`. For
    data.kind "webdataset" the train split is a ShardDataset (an IterableDataset streamed from the shards) and
    val the files written beside them.
    """
    data = cfg.data
    root = Path(data.root)
    if data.kind == "shapes":
        params = {
            "n_train": data.shapes_n_train,
            "n_val": data.shapes_n_val,
            "n_heldout": data.shapes_n_heldout,
            "image_size": data.shapes_image_size,
            "seed": data.shapes_seed,
        }
        if not shapes_ready(root, params):
            logger.info("generating synthetic shapes into %s", root)
            generate_shapes(root, **params)
        hint = "It should have been generated there; check that data.root is writable."
    elif data.kind == "coco":
        hint = fetch_hint(data) or (
            f"Put a COCO-caption-format dataset there ({data.train_annotations}, {data.val_annotations}, "
            f"{data.train_images}/ and {data.val_images}/ under {root}) or pass --data-root PATH "
            "(--set data.root=PATH)."
        )
        _require(root, "dataset root", hint)
    elif data.kind == "webdataset":
        hint = ("Write the shards there with:\n  python -m train data shards --from <a COCO-caption-format folder> "
                f"--out {root}\nor pass --data-root PATH")
        _require(root, "shard folder", hint)
    else:
        raise ValueError(f"data.kind {data.kind!r}: expected 'shapes', 'coco' or 'webdataset'")

    sources = {
        "train": (data.train_annotations, data.train_images, data.subset),
        "val": (data.val_annotations, data.val_images, data.val_subset),
    }
    if data.kind == "webdataset":  # the files `data shards` writes beside the shards (blipcore.data.prep.shards)
        sources = {"train": ("annotations/captions_train.json", "train", data.subset),
                   "val": ("annotations/captions_val.json", "val", data.val_subset)}
    if data.kind == "shapes":
        sources["heldout"] = ("annotations/captions_heldout.json", data.val_images, data.val_subset)
    if data.test_annotations:
        sources["test"] = (data.test_annotations, data.test_images, 0)
    datasets = {}
    for split in splits:
        if split not in sources:
            raise ValueError(f"split {split!r} does not exist for data.kind {data.kind!r} (have: {', '.join(sources)})")
        annotations, images, subset = sources[split]
        _require(root / annotations, f"{split} annotations", hint)
        _require(root / images, f"{split} image folder", hint)
        train = split == "train"
        # Shapes captions say where things are: a random crop would move or cut objects and make them wrong.
        transform = build_transform(cfg.model.image_size, train=train, augment=data.augment,
                                    crop=data.kind != "shapes")
        if train and data.kind == "webdataset":  # streamed from the shards
            from .shards import build_shard_dataset  # imported on use: webdataset only for data.kind "webdataset"

            datasets[split] = build_shard_dataset(cfg, transform)
            continue
        records = load_coco_annotations(root / annotations, root / images, subset)
        mode = data.caption_mode if train else "random"
        datasets[split] = CaptionDataset(records, transform, caption_mode=mode, seed=cfg.train.seed,
                                         flip=train and flips(data.augment))
    return datasets
