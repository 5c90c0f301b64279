"""The decoded-image cache (data.loader = "cache"): a folder dataset's training images decoded once into one
memory-mapped uint8 file, its captions tokenised once, and the loader that batches them.

Each image is stored at SCALE (1.5) times the model's image size on its shorter side (never enlarged), aspect
kept: the shorter side, because a random resized crop of 50-100 % of the area spans as little as ~0.6 of that
side, so at 1.5x its pixels still cover the model's pixels about once; a longer side held to MAX_ASPECT times
the shorter. Portrait images are stored transposed, so every slot is landscape and the padding is only what the
aspect ratios differ by; each image's original size, stored size and orientation are recorded. The crop box is
drawn on the original size, as the per-image transform draws it, and mapped to the stored pixels
(blipcore.data.batch_augment).

One `<split>-<side>px-<key>.npy` (np.lib.format.open_memmap) plus a `.json` manifest per split, in
data.cache_dir (default: the user's cache folder, DEFAULT_CACHE_DIR: shared data may be read-only, and one copy
serves every run). The key hashes the stored side and the images (their paths under data.root and their sizes in
bytes), so another size, subset or dataset gets another file. The `.npy` is written under a temporary name and
renamed, and the manifest, written after it, is what marks it complete: an interrupted build is never read as a
cache, and is built again; builders take a lock, so a second process waits for the first and reads its file.
Caption token ids (every caption and its left/right-swapped form, for flipped items) are cached beside it in
`tokens-<max_len>-<key>.npz`.

`CacheLoader` yields the trainer's batches (the keys of CaptionCollator's) for the sampler's indices: the same
items, captions, flips and augmentation draws as the folder loader, without DataLoader workers. On CUDA the
whole file is copied into device memory when it takes at most half of the free memory (else each batch's images
are gathered on the host and copied over); augmentation runs there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..io import FileError, atomic_write_bytes, atomic_write_json, writing
from ..model.config import BlipConfig
from ..model.tokenizer import BERT_VOCAB_SHA256, tokenize_captions
from ..paths import project_path
from .batch_augment import BatchAugment, Draws
from .coco import CaptionDataset, ImageRecord, ImageSkippedWarning
from .datasets import build_datasets
from .images import ImageLoadError, load_image
from .transforms import swap_left_right

FORMAT = 1  # of the files below; a new layout gets a new number, so an old file is never misread
SCALE = 1.5  # stored shorter side / model.image_size
MAX_ASPECT = 2.0  # stored longer side / stored shorter side, at most
BUILD_WORKERS = min(8, os.cpu_count() or 1)  # threads that decode images when training builds the cache
# The user's cache folder ($XDG_CACHE_HOME or ~/.cache), where data.cache_dir = "" puts the files
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bliplab" / "images"
_EXIF_ORIENTATION = 0x0112  # orientations 5-8 turn the picture by 90 degrees


def stored_side(image_size: int) -> int:
    """The cached images' shorter side for a model of `image_size` pixels."""
    return round(SCALE * image_size)


def cache_dir(cfg: BlipConfig) -> Path:
    """data.cache_dir (relative to the project checkout, as data.root), or DEFAULT_CACHE_DIR when it is empty."""
    return project_path(cfg.data.cache_dir) if cfg.data.cache_dir else DEFAULT_CACHE_DIR


def stored_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) of an image stored with its shorter side at `side` (never enlarged, the longer side held to
    MAX_ASPECT times `side`), aspect kept."""
    scale = min(1.0, side / min(height, width), side * MAX_ASPECT / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class ImageCache:
    """An opened cache. `images`: [N, H, W, 3] uint8 (memory-mapped, copy-on-write: never written back), slot i
    holding record i at [:h, :w] (transposed: [:w, :h]); `sizes`: [N, 5] int (original height, width, stored
    height, width, transposed 0/1); `failed`: record index -> why it could not be decoded (its slot is empty)."""

    path: Path
    images: np.ndarray
    sizes: np.ndarray
    failed: dict[int, str]


# --- the key and the files ---------------------------------------------------------------------------------
def image_key(records: Sequence[ImageRecord], root: Path, side: int) -> str:
    """What the cached pixels depend on: the stored side and every image's path (under the data root) and size."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "side": side}).encode())
    for record in records:
        try:
            size = os.stat(record.file_path).st_size
        except OSError:
            size = -1
        digest.update(f"\n{os.path.relpath(record.file_path, root)}\t{size}".encode())
    return digest.hexdigest()


def _paths(folder: Path, split: str, side: int, key: str) -> tuple[Path, Path]:
    stem = f"{split}-{side}px-{key[:16]}"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def _open(npy: Path, manifest: Path, key: str) -> ImageCache | None:
    """The cache at `npy`, or None where it is missing, incomplete (no manifest yet) or not the one of `key`."""
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        images = np.load(npy, mmap_mode="c")
        sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(-1, 5)
        failed = {int(i): str(why) for i, why in meta["failed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable, or not what FORMAT writes
        return None
    if images.dtype != np.uint8 or list(images.shape) != meta["shape"] or len(sizes) != images.shape[0]:
        return None
    return ImageCache(npy, images, sizes, failed)


@contextlib.contextmanager
def _build_lock(path: Path, progress: bool) -> Iterator[None]:
    """An exclusive lock on `path` (flock: released when the process ends, however it ends)."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                tqdm.write(f"waiting for another process that is building {path.name[1:-5]}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_image_cache(records: Sequence[ImageRecord], root: Path, side: int, folder: Path, split: str = "train",
                     workers: int = BUILD_WORKERS, progress: bool = True) -> tuple[ImageCache, bool]:
    """The image cache of `records` (paths under `root`) at shorter side `side` in `folder`, built first where it
    is missing or incomplete; and whether it was built now. Raises FileError where it cannot be written."""
    key = image_key(records, root, side)
    npy, manifest = _paths(folder, split, side, key)
    cache = _open(npy, manifest, key)
    if cache is not None:
        return cache, False
    with _build_lock(folder / f".{npy.stem}.lock", progress):
        cache = _open(npy, manifest, key)  # built by the process this one waited for
        if cache is not None:
            return cache, False
        for stale in folder.glob(f".{npy.name}.*.tmp"):  # an interrupted build's; no one else builds it now
            stale.unlink(missing_ok=True)
        _build(records, side, npy, manifest, key, workers, progress)
    cache = _open(npy, manifest, key)
    if cache is None:
        raise FileError(f"{npy}: written but cannot be read back; delete it and its .json, then try again")
    return cache, True


# --- building --------------------------------------------------------------------------------------------
def _upright_size(path: str) -> tuple[int, int] | None:
    """(height, width) of the picture as load_image decodes it (EXIF rotation applied), from its header; None
    where it cannot be read (the decoding says why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - any header PIL cannot read: the image fails to decode too, and is recorded
        return None
    return (width, height) if turned else (height, width)


def _slot_shape(headers: Sequence[tuple[int, int] | None], side: int) -> tuple[int, int]:
    """(H, W) of a slot: the largest stored shorter and longer sides (each image stored landscape)."""
    sizes = [stored_size(*size, side) for size in headers if size is not None]
    if not sizes:
        return side, side
    return max(min(size) for size in sizes), max(max(size) for size in sizes)


def _store(images: np.ndarray, i: int, path: str, side: int) -> tuple[list[int], str | None]:
    """Decode image `i`, shrink it into slot i of `images`; its sizes row, and why it failed (None if it did not)."""
    try:
        picture = load_image(path)
    except ImageLoadError as err:
        return [0, 0, 0, 0, 0], str(err)
    width0, height0 = picture.size
    height, width = stored_size(height0, width0, side)
    slot_h, slot_w = images.shape[1:3]
    transposed = height > width
    short, long = (width, height) if transposed else (height, width)
    fit = min(1.0, slot_h / short, slot_w / long)  # a header that misled the slot's shape: shrink to fit
    if fit < 1.0:
        height, width = max(1, int(height * fit)), max(1, int(width * fit))
    if (width, height) != picture.size:
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture)
    if transposed:
        images[i, :width, :height] = pixels.transpose(1, 0, 2)
    else:
        images[i, :height, :width] = pixels
    return [height0, width0, height, width, int(transposed)], None


def _decode_all(tmp: str, shape: tuple[int, ...], paths: Sequence[str], side: int, pool: ThreadPoolExecutor,
                progress: bool) -> list[tuple[list[int], str | None]]:
    """Every image decoded into slot i of a new array file `tmp` of `shape`, flushed to disk; the rows of _store."""
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    rows = list(tqdm(pool.map(lambda i: _store(images, i, paths[i], side), range(len(paths))), total=len(paths),
                     disable=not progress, desc=f"caching images at {side} px", unit="img"))
    images.flush()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return rows


def _build(records: Sequence[ImageRecord], side: int, npy: Path, manifest: Path, key: str, workers: int,
           progress: bool) -> None:
    """Write the cache: the slots' shape from the headers, every image decoded into a temporary file that is
    renamed to `npy` when complete, then the manifest."""
    paths = [record.file_path for record in records]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        headers = list(tqdm(pool.map(_upright_size, paths), total=len(paths), disable=not progress,
                            desc="image sizes", unit="img", leave=False))
        shape = (len(paths), *_slot_shape(headers, side), 3)
        with writing(npy):
            fd, tmp = tempfile.mkstemp(prefix=f".{npy.name}.", suffix=".tmp", dir=npy.parent)
            os.close(fd)
            try:
                rows = _decode_all(tmp, shape, paths, side, pool, progress)
                os.replace(tmp, npy)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    failed = {str(i): why for i, (_, why) in enumerate(rows) if why is not None}
    atomic_write_json(manifest, {
        "format": FORMAT, "key": key, "side": side, "shape": list(shape), "images": len(paths),
        "sizes": [row for row, _ in rows], "failed": failed,
    })


# --- caption tokens --------------------------------------------------------------------------------------
@dataclass
class CaptionTokens:
    """Every caption's token ids ([CLS] ... [SEP], as tokenize_captions gives them; [n, max_len] int32, zero
    padded) and lengths, in the order of the records' captions; `swapped_*` the same for swap_left_right of
    each caption (what a flipped item reads)."""

    ids: np.ndarray
    lengths: np.ndarray
    swapped_ids: np.ndarray
    swapped_lengths: np.ndarray


def _tokenize(captions: Sequence[str], max_len: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(captions), max_len), dtype=np.int32)
    lengths = np.zeros(len(captions), dtype=np.int32)
    chunk = 4096
    for start in tqdm(range(0, len(captions), chunk), disable=not progress or len(captions) <= chunk,
                      desc="tokenising captions", leave=False):
        tokens = tokenize_captions(list(captions[start:start + chunk]), max_len)
        part = tokens["input_ids"].numpy()
        ids[start:start + len(part), :part.shape[1]] = part
        lengths[start:start + len(part)] = tokens["attention_mask"].sum(1).numpy()
    return ids, lengths


def caption_tokens(records: Sequence[ImageRecord], max_len: int, folder: Path,
                   progress: bool = True) -> CaptionTokens:
    """The records' caption tokens, read from `folder` or tokenised and written there."""
    captions = [caption for record in records for caption in record.captions]
    key = hashlib.sha256(json.dumps([FORMAT, max_len, BERT_VOCAB_SHA256, captions]).encode()).hexdigest()
    path = folder / f"tokens-{max_len}-{key[:16]}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile), np.load(path) as saved:
        return CaptionTokens(*(saved[name] for name in ("ids", "lengths", "swapped_ids", "swapped_lengths")))
    ids, lengths = _tokenize(captions, max_len, progress)
    swapped_ids, swapped_lengths = ids.copy(), lengths.copy()
    changed = [i for i, caption in enumerate(captions) if swap_left_right(caption) != caption]
    if changed:
        swapped_ids[changed], swapped_lengths[changed] = _tokenize(
            [swap_left_right(captions[i]) for i in changed], max_len, progress)
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids, lengths=lengths, swapped_ids=swapped_ids, swapped_lengths=swapped_lengths)
    atomic_write_bytes(path, buffer.getvalue())
    return CaptionTokens(ids, lengths, swapped_ids, swapped_lengths)


def _open_caches(cfg: BlipConfig, dataset: CaptionDataset, workers: int,
                 progress: bool) -> tuple[ImageCache, bool, CaptionTokens]:
    """The image cache (and whether it was built now) and caption tokens of cfg's training set `dataset`."""
    folder = cache_dir(cfg)
    cache, built = open_image_cache(dataset.records, Path(cfg.data.root), stored_side(cfg.model.image_size), folder,
                                    workers=workers, progress=progress)
    return cache, built, caption_tokens(dataset.records, cfg.model.max_text_len, folder, progress=progress)


def build_cache(cfg: BlipConfig, workers: int = BUILD_WORKERS, progress: bool = True) -> str:
    """The image cache and caption tokens of cfg's training split, built where missing (`python -m train data
    cache`); what was done, in one line."""
    started = time.perf_counter()
    cache, built, _ = _open_caches(cfg, build_datasets(cfg, splits=("train",))["train"], workers, progress)
    side, megabytes = stored_side(cfg.model.image_size), cache.path.stat().st_size / 1e6
    failed = f", {len(cache.failed):,} could not be decoded (training skips them)" if cache.failed else ""
    took = f" in {time.perf_counter() - started:.0f} s" if built else ""
    return (f"{'cached' if built else 'already cached:'} {len(cache.sizes):,} images at {side} px ({SCALE:g} x "
            f"{cfg.model.image_size}) in {cache.path} ({megabytes:,.0f} MB{failed}){took}")


# --- the loader ------------------------------------------------------------------------------------------
def _on_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The cache as a tensor on `device` where it fits in half of its free memory (copied in slices), else the
    memory-mapped file as a host tensor."""
    host = torch.from_numpy(images)
    if device.type == "cpu" or images.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return host
    resident = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(images), 256):
        resident[start:start + 256].copy_(host[start:start + 256])
    return resident


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's CPU operations on one thread, as in a DataLoader worker: the loader's are small (one crop, one
    batch of small images), and threads that wait for each other at each of them cost more than they share,
    many times more on a busy machine. The training step's thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CacheLoader:
    """The training batches of a folder dataset (CaptionDataset) from its image cache, augmented on `device`.

    Reads the dataset's seed, epoch (set_epoch), caption mode, flip and transform, so an item is the folder
    loader's item: the same caption, flip and augmentation draws."""

    def __init__(self, dataset: CaptionDataset, cache: ImageCache, tokens: CaptionTokens, batch_size: int,
                 device: torch.device) -> None:
        self.dataset, self.cache, self.tokens = dataset, cache, tokens
        self.batch_size, self.device = batch_size, device
        self.augment = BatchAugment(dataset.transform)
        self.images = _on_device(cache.images, device)
        self.resident = self.images.device.type == device.type
        self.first_caption = np.cumsum([0] + [len(record.captions) for record in dataset.records])
        self.warned: set[int] = set()

    @classmethod
    def from_config(cls, cfg: BlipConfig, dataset: CaptionDataset, device: torch.device,
                    progress: bool = True) -> CacheLoader:
        """The loader of cfg's training set `dataset`: its image cache and tokens opened, or built where missing."""
        cache, _, tokens = _open_caches(cfg, dataset, BUILD_WORKERS, progress)
        return cls(dataset, cache, tokens, cfg.train.batch_size, device)

    def batches(self, indices: Iterable[int]) -> Iterator[dict[str, Any] | None]:
        """Batches of batch_size consecutive `indices` (a sampler's), the last one dropped if incomplete."""
        iterator = iter(indices)
        while len(items := list(itertools.islice(iterator, self.batch_size))) == self.batch_size:
            yield self.batch(items)

    def _draw(self, items: Sequence[int]) -> list[tuple[int, int, int, Draws, bool]]:
        """(item, record, caption, augmentation draws, flip) of each readable item, under the item's seed."""
        dataset, rows = self.dataset, []
        with torch.random.fork_rng(devices=[]):
            for item in items:
                index, caption = dataset._locate(item)
                if index in self.cache.failed:
                    if index not in self.warned:
                        self.warned.add(index)
                        warnings.warn(f"skipping image: {self.cache.failed[index]}", ImageSkippedWarning,
                                      stacklevel=3)
                    continue
                torch.random.default_generator.manual_seed(dataset.augment_seed(item))
                height, width = self.cache.sizes[index, :2].tolist()
                rows.append((item, index, caption, self.augment.draws(height, width), dataset.flipped(item)))
        return rows

    def windows(self, indices: Sequence[int], draws: Sequence[Draws]) -> tuple[np.ndarray, np.ndarray]:
        """Each crop box (drawn on the original picture) in its slot's pixels: [B, 4] (first row, end row, first
        column, end column), rounded to the stored pixels and at least one wide; and whether the slot is
        transposed (then its rows run along the picture's width)."""
        sizes = self.cache.sizes[list(indices)]
        boxes = np.asarray([draw.box for draw in draws], dtype=np.float64)  # top, left, height, width
        scale = sizes[:, 2:4] / sizes[:, 0:2]  # stored / original, down and across
        starts = np.floor(boxes[:, 0:2] * scale + 0.5).astype(np.int64)
        ends = np.maximum(np.floor((boxes[:, 0:2] + boxes[:, 2:4]) * scale + 0.5).astype(np.int64), starts + 1)
        down, across = np.stack([starts[:, 0], ends[:, 0]], 1), np.stack([starts[:, 1], ends[:, 1]], 1)
        transposed = sizes[:, 4] > 0
        turned = transposed[:, None]
        return np.concatenate([np.where(turned, across, down), np.where(turned, down, across)], 1), transposed

    def batch(self, items: Sequence[int]) -> dict[str, Any] | None:
        """The collated batch of dataset items `items` (CaptionCollator's keys), None if none could be read. On
        a GPU every tensor the step reads is on it."""
        with _one_thread():
            return self._batch(items)

    def _batch(self, items: Sequence[int]) -> dict[str, Any] | None:
        rows = self._draw(items)
        if not rows:
            return None
        _, indices, captions, draws, flips = (list(column) for column in zip(*rows, strict=True))
        windows, transposed = self.windows(indices, draws)
        if self.resident:
            images, slots = self.images, indices
        else:  # CUDA without room for the whole file: this batch's images gathered on the host and copied over
            images = self._to_device(torch.from_numpy(self.cache.images[indices]))
            slots = list(range(len(indices)))
        tokens = self._tokens(indices, captions, flips)
        return {
            "images": self.augment(images, slots, windows, transposed, draws, flips),
            "input_ids": self._to_device(tokens[0]),
            "attention_mask": self._to_device(tokens[1]),
            "image_ids": self._to_device(torch.tensor([self.dataset.records[i].image_id for i in indices])),
            "indices": torch.tensor(indices, dtype=torch.long),
            "captions": [self._caption(i, c, flip) for i, c, flip in zip(indices, captions, flips, strict=True)],
            "file_paths": [self.dataset.records[i].file_path for i in indices],
            "num_skipped": len(items) - len(rows),
        }

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the loader's device; from pinned memory to a GPU, so that the copy waits for nothing queued there."""
        return tensor if self.device.type == "cpu" else tensor.pin_memory().to(self.device, non_blocking=True)

    def _caption(self, index: int, caption: int, flip: bool) -> str:
        text = self.dataset.records[index].captions[caption]
        return swap_left_right(text) if flip else text

    def _tokens(self, indices: Sequence[int], captions: Sequence[int], flips: Sequence[bool],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask as CaptionCollator's tokenizer gives them: padded to the longest."""
        rows = self.first_caption[list(indices)] + np.asarray(captions)
        flipped = np.asarray(flips)[:, None]
        ids = np.where(flipped, self.tokens.swapped_ids[rows], self.tokens.ids[rows])
        lengths = np.where(flipped[:, 0], self.tokens.swapped_lengths[rows], self.tokens.lengths[rows])
        longest = int(lengths.max())
        mask = np.arange(longest)[None, :] < lengths[:, None]
        return torch.from_numpy(ids[:, :longest].astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
