"""`python -m train data shards`: a COCO-caption-format folder written as WebDataset shards, the folder that
`blipcore.data.shards` streams training pairs from (its docstring describes the layout).

Every shard is written atomically (temporary name, fsync, rename), so a shard under its final name is complete
and --resume writes only the missing ones; unreadable image files are left out and listed in failed.tsv.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..coco import DatasetNotFoundError, ImageRecord, load_coco_annotations
from ..folders import MARKER, DataSourceError, write_file, write_json
from ..shards import MANIFEST
from .fetch import OutputFolder, run_pool, write_failures

SHARD_NAME = "train-{:06d}.tar"
TRAIN_FILES = 1000  # train images also written as files: evaluation's nearest-neighbour row reads the first 1,000
OWNED = ("train-*.tar", "annotations/captions_train.json", "annotations/captions_val.json", "train", "val",
         MANIFEST, "failed.tsv", MARKER)
# The folder layouts `data shards --from` recognises: (train annotations, val annotations, train images, val images)
LAYOUTS = (("annotations/captions_train2017.json", "annotations/captions_val2017.json", "train2017", "val2017"),
           ("annotations/captions_train.json", "annotations/captions_val.json", "images", "images"))


@dataclass
class ShardReport:
    """What `write_shards` did."""

    out: Path
    shards: int = 0
    train_images: int = 0
    val_images: int = 0
    written: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_file: Path | None = None

    def summary(self) -> str:
        line = (f"{self.train_images:,} train images in {self.shards:,} shards and {self.val_images:,} val images "
                f"in {self.out} ({self.written:,} shards written now)")
        if self.failures:
            line += f"; {len(self.failures):,} images left out: see {self.failed_file}"
        return line


def _layout(source: Path) -> tuple[str, str, str, str]:
    for layout in LAYOUTS:
        if (source / layout[0]).is_file():
            return layout
    looked = " or ".join(layout[0] for layout in LAYOUTS)
    raise DatasetNotFoundError(f"--from {source}: no {looked} there: not a COCO-caption-format folder")


def _image_record(record: ImageRecord, file_name: str) -> dict[str, Any]:
    return {"id": record.image_id, "file_name": file_name, **record.info}


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> int:
    """Write a tar of (name, bytes) atomically (temporary name, fsync, rename); its size. DataSourceError when it
    cannot be written (the shards before it are complete)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o444, 0  # the same bytes for the same samples
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise DataSourceError(f"{path}: cannot be written ({err.strerror or err}); stopped. The shards written before "
                              "it are complete and kept: free some space, then run the same command with --resume"
                              ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _shard_members(records: Sequence[ImageRecord], failures: list[tuple[str, str]],
                   lock: threading.Lock) -> list[tuple[str, bytes]]:
    """The tar members of these records: image bytes + JSON, per image; unreadable files are left out."""
    members = []
    for record in records:
        path = Path(record.file_path)
        try:
            data = path.read_bytes()
        except OSError as err:
            with lock:
                failures.append((str(path), f"cannot read ({err.strerror or err})"))
            continue
        suffix = path.suffix.lower().lstrip(".") or "jpg"
        meta = {"image_id": record.image_id, "file_name": path.name, "captions": record.captions}
        members += [(f"{record.image_id}.{suffix}", data), (f"{record.image_id}.json", json.dumps(meta).encode())]
    return members


def _ids_in(path: Path) -> list[int]:
    """The image ids of a shard's samples, in order, from its member names (headers only)."""
    try:
        with tarfile.open(path) as tar:
            return [int(name.split(".")[0]) for name in tar.getnames() if name.endswith(".json")]
    except (tarfile.TarError, OSError, ValueError) as err:
        raise DataSourceError(f"{path}: unreadable shard ({err}); delete it and run again with --resume") from None


def _copy_files(records: Sequence[ImageRecord], folder: Path, failures: list[tuple[str, str]]) -> list[ImageRecord]:
    """Copy the records' image files into `folder` (those there already are complete); the records copied."""
    copied = []
    for record in records:
        dest = folder / Path(record.file_path).name
        if not dest.is_file():
            try:
                data = Path(record.file_path).read_bytes()
            except OSError as err:
                failures.append((record.file_path, f"cannot read ({err.strerror or err})"))
                continue
            write_file(dest, data)
        copied.append(record)
    return copied


def write_shards(source: str | Path, out: str | Path, shard_size: int = 1000, train_files: int = TRAIN_FILES,
                 workers: int = 4, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> ShardReport:
    """Write the train split of the COCO-caption-format folder `source` as WebDataset shards into `out`, with
    the val split and the first `train_files` train images as files (the layout: blipcore.data.shards). Shards that
    exist are complete (atomic): --resume writes only the missing ones. Unreadable image files are left out
    and listed in failed.tsv."""
    if shard_size < 1 or train_files < 0 or workers < 1:
        raise ValueError(f"--shard-size and --workers must be >= 1 and --train-files >= 0, got {shard_size}, "
                         f"{workers} and {train_files}")
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError("--out must be another folder than --from")
    train_annotations, val_annotations, train_images, val_images = _layout(source)
    train = load_coco_annotations(source / train_annotations, source / train_images)
    val = load_coco_annotations(source / val_annotations, source / val_images)
    # A shard holds a fixed slice of the train images: resuming is right only for the same images and shard size
    ids = hashlib.sha1(" ".join(str(r.image_id) for r in train).encode()).hexdigest()[:16]
    settings = {"shard_size": shard_size, "train_images": f"{len(train)} ({ids})"}
    folder = OutputFolder(out, "shards", settings, OWNED, resume=resume, overwrite=overwrite)
    folder.start({"from": str(source)})
    (out / "train").mkdir(exist_ok=True)  # the train files (possibly none): build_datasets looks for the folder

    report = ShardReport(out)
    failures: list[tuple[str, str]] = []
    lock = threading.Lock()
    plan = [(out / SHARD_NAME.format(i), train[start:start + shard_size])
            for i, start in enumerate(range(0, len(train), shard_size))]
    todo = [(path, records) for path, records in plan if not path.is_file()]
    result = run_pool(todo, lambda job, stop: _write_tar(job[0], _shard_members(job[1], failures, lock)),
                      lambda job: job[0].name, workers, progress, desc="shards")
    report.written = result.done

    by_id = {record.image_id: record for record in train}
    shards, kept = [], []
    for path, _ in plan:
        ids = _ids_in(path)
        shards.append({"name": path.name, "images": len(ids)})
        kept += [by_id[image_id] for image_id in ids]
    files = _copy_files(kept[:train_files], out / "train", failures)
    val = _copy_files(val, out / "val", failures)
    for split, records in (("train", kept), ("val", val)):
        write_json(out / "annotations" / f"captions_{split}.json", {
            "info": {"description": f"{split} split of {source}, written by `python -m train data shards`"},
            "images": [_image_record(r, Path(r.file_path).name) for r in records],
            "annotations": [{"image_id": r.image_id, "caption": c} for r in records for c in r.captions]})
    write_json(out / MANIFEST, {"format": 1, "from": str(source), "shard_size": shard_size, "train_files": len(files),
                                "train": {"shards": shards, "images": len(kept),
                                          "captions": sum(len(r.captions) for r in kept)},
                                "val": {"images": len(val)}})
    report.shards, report.train_images, report.val_images = len(shards), len(kept), len(val)
    report.failures = sorted(failures)
    report.failed_file = write_failures(out, report.failures, ("file", "reason"))
    return report
