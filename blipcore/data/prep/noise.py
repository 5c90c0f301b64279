"""`python -m train data noise`: plant known noise in a dataset's training captions, so that a filter (CapFilt)
can be scored exactly.

Web alt-text is often unrelated to its image; the planted noise imitates that: a given fraction of the
training captions is replaced by captions of other, randomly chosen images. The output is a derived dataset
(blipcore.data.derived: annotations rewritten, images linked, not copied) with `noise.jsonl`, one line per
training caption in the order of the annotation file:

    {"index": 0, "id": 17, "image_id": 1000268201, "caption": "<its text now>", "original": "<its text before>",
     "planted": true, "from_image_id": 2513260012}

`from_image_id` is the image whose caption replaced the original (null when not planted). Everything that
scores a filter reads the planted flags from here. The choice is seeded: the same source, fraction and seed
give the same file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...model.config import DataConfig
from ..derived import NOISE_RECORD, read_caption_file, source_entries, write_derived_dataset
from ..folders import MARKER, DataSourceError, write_file
from .fetch import OutputFolder

DEFAULT_TRAIN_ANNOTATIONS = DataConfig().train_annotations


@dataclass
class NoiseReport:
    out: Path
    captions: int
    planted: int

    def summary(self) -> str:
        return (f"{self.planted:,} of {self.captions:,} training captions replaced by other images' captions "
                f"({self.planted / max(1, self.captions):.1%}) -> {self.out} (record: {self.out / NOISE_RECORD})")


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"--fraction must be in [0, 1): the share of training captions to replace, got {fraction}")


def planted_captions(annotations: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """The noise.jsonl lines for `annotations` (COCO caption entries): round(fraction x N) of them, chosen
    with `seed`, take the caption of a random annotation of another image."""
    check_fraction(fraction)
    rng = random.Random(seed)
    count = round(fraction * len(annotations))
    if count and len({a["image_id"] for a in annotations}) < 2:
        raise ValueError("planting noise needs captions of at least two images")
    chosen = set(rng.sample(range(len(annotations)), count))
    lines = []
    for index, annotation in enumerate(annotations):
        donor = None
        if index in chosen:
            while donor is None or annotations[donor]["image_id"] == annotation["image_id"]:
                donor = rng.randrange(len(annotations))
        lines.append({
            "index": index, "id": annotation.get("id"), "image_id": annotation["image_id"],
            "caption": annotation["caption"] if donor is None else annotations[donor]["caption"],
            "original": annotation["caption"], "planted": donor is not None,
            "from_image_id": None if donor is None else annotations[donor]["image_id"],
        })
    return lines


def plant_noise(source: str | Path, out: str | Path, fraction: float, seed: int = 0,
                train_annotations: str = DEFAULT_TRAIN_ANNOTATIONS, overwrite: bool = False) -> NoiseReport:
    """Write the dataset `source` with planted noise in its training captions into `out` (see the module
    docstring). Everything is checked before anything is written: the fraction, the annotation file, an
    `out` that holds something else (refused unless `overwrite`, which deletes only what this writes)."""
    check_fraction(fraction)
    source, out = Path(source), Path(out)
    document = read_caption_file(source, train_annotations)
    if out.resolve() == source.resolve():
        raise DataSourceError("--out must be another folder than --from")
    lines = planted_captions(document["annotations"], fraction, seed)
    owned = (Path(train_annotations).parts[0], NOISE_RECORD, MARKER, *source_entries(source, train_annotations))
    settings = {"from": str(source.resolve()), "fraction": fraction, "seed": seed,
                "train_annotations": train_annotations}
    # Planting is quick and deterministic: the same settings again rewrite the same files (resume=True)
    folder = OutputFolder(out, "noise", settings, owned, resume=True, overwrite=overwrite)
    folder.start({})
    noisy = {**document, "annotations": [{**annotation, "caption": line["caption"]}
                                         for annotation, line in zip(document["annotations"], lines, strict=True)]}
    write_derived_dataset(source, out, train_annotations, noisy)
    write_file(out / NOISE_RECORD, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
    return NoiseReport(out, len(lines), sum(line["planted"] for line in lines))


def read_noise_record(folder: Path) -> list[dict[str, Any]] | None:
    """The lines of `folder`/noise.jsonl, or None when the folder has none (its captions are not planted)."""
    path = folder / NOISE_RECORD
    if not path.is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as err:
        raise DataSourceError(f"{path}: not a noise record ({err})") from None
