"""A dataset derived from another COCO-caption-format folder: its training captions rewritten, everything
else referenced, never copied.

`data noise` (planted noise) and `capfilt` (the bootstrapped data) both write one: the derived folder holds
its own copy of the folder that holds the training annotation file (usually `annotations/`: the rewritten
training file, the source's other files there copied as they are) and a symbolic link to each of the
source's other entries (its image folders, README, ...), so a preset's
data paths read it exactly as they read the source, and a 1 GB image folder costs nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .coco import AnnotationError, load_coco_annotations
from .folders import MARKER, DataSourceError, write_json

# What a derived folder records about itself (the one declaration of these names): never linked into a
# folder derived from it, whose captions they would no longer describe.
NOISE_RECORD = "noise.jsonl"  # data noise: one line per training caption, planted or not, with its original
CAPFILT_RECORD = "capfilt.jsonl"  # capfilt: one line per caption scored, original or synthetic, kept or dropped
CAPFILT_SUMMARY = "capfilt.json"  # capfilt: settings, counts, and the filter's precision / recall / AUC
CAPFILT_SCORES = "capfilt-scores"  # capfilt: the scores of each batch of images, kept to resume
RECORDS = (MARKER, NOISE_RECORD, CAPFILT_RECORD, CAPFILT_SUMMARY, CAPFILT_SCORES)


def _own_entry(train_annotations: str) -> str:
    """The top-level entry of the source the derived folder writes itself: the training file's folder (or
    the file, when it lies at the top)."""
    return Path(train_annotations).parts[0]


def read_caption_file(source: Path, train_annotations: str) -> dict[str, Any]:
    """The training annotation file of `source` as its JSON document, checked to be COCO captions
    (AnnotationError / DataSourceError naming the file otherwise)."""
    path = source / train_annotations
    if not source.is_dir():
        raise DataSourceError(f"--from {source}: no such folder")
    if not path.is_file():
        raise DataSourceError(f"{path}: no such annotation file (the training captions; choose it with "
                              "--train-annotations)")
    load_coco_annotations(path, source)  # validates: images, annotations, ids, captions
    document = json.loads(path.read_text(encoding="utf-8"))
    for i, annotation in enumerate(document["annotations"]):
        if not isinstance(annotation.get("caption"), str):
            raise AnnotationError(f"{path}: annotations[{i}] has no caption text")
    return document


def source_entries(source: Path, train_annotations: str) -> list[str]:
    """The names in `source` a derived folder links to: everything but its RECORDS and the entry that holds
    the training annotation file (that one is copied: a link would write through into the source)."""
    return sorted(p.name for p in source.iterdir() if p.name not in (_own_entry(train_annotations), *RECORDS))


def write_derived_dataset(source: Path, out: Path, train_annotations: str, document: dict[str, Any]) -> None:
    """Make `out` the dataset `source` with its training annotation file replaced by `document`: links to
    the source's entries, copies of its other annotation files, the new training file (written atomically)."""
    source = source.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in source_entries(source, train_annotations):
        link = out / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(link.readlink()) == source / name:
                continue
            raise DataSourceError(f"{link} already exists and is not a link to {source / name}")
        link.symlink_to(source / name, target_is_directory=(source / name).is_dir())
    own = source / _own_entry(train_annotations)
    for path in sorted(own.rglob("*")) if own.is_dir() else []:
        relative = path.relative_to(source)
        if path.is_file() and relative != Path(train_annotations):
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / relative)
    write_json(out / train_annotations, document)
