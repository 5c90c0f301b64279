"""Captions written elsewhere, scored here: COCO results files against a COCO caption file.

A machine without Java (a GPU machine, say) writes a checkpoint's captions with
`python -m train eval --captions-out DIR`, one file per decoding strategy and reference row, in the COCO
results format (a list of {"image_id", "caption"}); `python -m train score` scores them with the metrics
every evaluation here uses: BLEU, METEOR, ROUGE-L and CIDEr on PTB-tokenised text (both in Java), the
collapse metrics and, against the training captions, memorisation. Any other captioner's COCO results file
scores the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.coco import AnnotationError, ImageRecord, load_coco_annotations
from .captioning import reference_row_scores
from .collapse import normalised_captions


def coco_results(records: Sequence[ImageRecord], captions: Sequence[str]) -> list[dict[str, Any]]:
    """The COCO results format of one caption per image: [{"image_id", "caption"}, ...] in record order."""
    return [{"image_id": r.image_id, "caption": c} for r, c in zip(records, captions, strict=True)]


def read_results(path: Path, references: dict[int, list[str]]) -> dict[int, str]:
    """image id -> caption of a COCO results file, checked against `references` (image id -> its captions):
    one caption for every referenced image, none for an image the references lack. ValueError otherwise."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a COCO results file is a list of {{\"image_id\", \"caption\"}}, "
                         f"this one holds a {type(entries).__name__}")
    captions: dict[int, str] = {}
    for i, entry in enumerate(entries):
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
            raise ValueError(f"{path}: entry {i} is not {{\"image_id\": int, \"caption\": str}}: {entry!r:.80}")
        if image_id in captions:
            raise ValueError(f"{path}: image {image_id} is captioned twice (entries {list(captions).index(image_id)} "
                             f"and {i})")
        if image_id not in references:
            raise ValueError(f"{path}: image {image_id} (entry {i}) is not in the annotations")
        captions[image_id] = caption
    missing = [i for i in references if i not in captions]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the annotations' {len(references)} images have no caption "
                         f"(first: image {missing[0]}); every image is scored, none left out")
    return captions


def score_results(
    paths: Sequence[Path], annotations: Path, train_annotations: Path | None = None, meteor: bool = True,
) -> dict[str, dict[str, Any]]:
    """Each results file's {"file", "metrics", "notes"}, keyed by its file name less ".json", against every
    reference caption of `annotations`; memorisation against `train_annotations` when given."""
    try:
        records = load_coco_annotations(annotations, ".")
        train = load_coco_annotations(train_annotations, ".") if train_annotations else None
    except AnnotationError as exc:
        raise ValueError(str(exc)) from None
    references = {r.image_id: r.captions for r in records}
    known = normalised_captions(c for r in train for c in r.captions) if train is not None else None
    scored = {}
    for path in paths:
        name = Path(path).name.removesuffix(".json")
        if name in scored:
            raise ValueError(f"{path}: two results files named {name}")
        predictions = read_results(Path(path), references)
        scored[name] = {"file": str(path), **reference_row_scores(predictions, references, known, meteor=meteor)}
    return scored
