"""`python -m train data noise`: plant known noise in a dataset's training captions, so that a filter (CapFilt)
can be scored exactly.

Web alt-text is often unrelated to its image; the planted noise imitates that: a given fraction of the
training captions is replaced by captions of other, randomly chosen images. The output is a derived dataset
(blipcore.data.derived: annotations rewritten, images linked, not copied) with `noise.jsonl`, one line per
training caption in the order of the annotation file:

    {"index": 0, "id": 17, "image_id": 1000268201, "caption": "<its text now>", "original": "<its text before>",
     "planted": true, "from_image_id": 2513260012, "clean": false}

`from_image_id` is the image whose caption replaced the original (null when not planted). Everything that
scores a filter reads the planted flags from here. The choice is seeded: the same source, fraction and seed
give the same file.

A clean subset (`clean_images` N > 0) plays the part of BLIP's human-annotated data (COCO beside the web pairs):
N training images, drawn with the seed, whose captions the noise never touches, neither replacing them nor
lending them to another image ("clean": true on their lines). The planted captions, still `fraction` of all
the training captions, all fall among the other images' captions. The subset's own annotation file,
CLEAN_ANNOTATIONS beside the training file, holds those images and their captions: a captioner and a filter
are fine-tuned on it (studies/capfilt.toml), and CapFilt keeps its captions as they are.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...model.config import DataConfig
from ..derived import NOISE_RECORD, read_caption_file, source_entries, write_derived_dataset
from ..folders import MARKER, DataSourceError, write_file, write_json
from .fetch import OutputFolder

DEFAULT_TRAIN_ANNOTATIONS = DataConfig().train_annotations
# The clean subset's annotation file, written beside the training file (one declaration: a plan's fine-tuning
# variants point data.train_annotations at clean_annotations(<training file>))
CLEAN_ANNOTATIONS = "captions_clean.json"


def clean_annotations(train_annotations: str) -> str:
    """Where `data noise --clean-images` writes the clean subset's annotation file: CLEAN_ANNOTATIONS in the
    training file's folder (annotations/captions_official_train.json -> annotations/captions_clean.json)."""
    return str(Path(train_annotations).parent / CLEAN_ANNOTATIONS)


@dataclass
class NoiseReport:
    out: Path
    captions: int
    planted: int
    clean_images: int = 0
    clean_captions: int = 0
    clean_file: str | None = None  # the clean subset's annotation file, relative to `out`

    def summary(self) -> str:
        text = (f"{self.planted:,} of {self.captions:,} training captions replaced by other images' captions "
                f"({self.planted / max(1, self.captions):.1%}) -> {self.out} (record: {self.out / NOISE_RECORD})")
        if self.clean_file:
            text += (f"\nclean subset: {self.clean_images:,} images, their {self.clean_captions:,} captions untouched "
                     f"-> {self.out / self.clean_file}")
        return text


def check_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise ValueError(f"--fraction must be in [0, 1): the share of training captions to replace, got {fraction}")


def clean_subset(annotations: list[dict[str, Any]], clean_images: int, seed: int) -> set[Any]:
    """The ids of `clean_images` images of `annotations`, drawn with `seed` (a generator of their own: the
    planted captions of a dataset without a clean subset are the same as before the option existed)."""
    images = list(dict.fromkeys(a["image_id"] for a in annotations))  # in file order
    if clean_images < 0 or (clean_images and clean_images >= len(images)):
        raise ValueError(f"--clean-images must be in [0, {len(images)}): the training images whose captions stay "
                         f"clean, got {clean_images}")
    return set(random.Random(f"{seed}:clean").sample(images, clean_images))


def planted_captions(annotations: list[dict[str, Any]], fraction: float, seed: int,
                     clean_images: int = 0) -> list[dict[str, Any]]:
    """The noise.jsonl lines for `annotations` (COCO caption entries): round(fraction x N) of them, chosen
    with `seed`, take the caption of a random annotation of another image. With `clean_images`, that many
    images (clean_subset) are left out of both draws: their captions are neither replaced nor given to another image."""
    check_fraction(fraction)
    clean = clean_subset(annotations, clean_images, seed)
    pool = [i for i, annotation in enumerate(annotations) if annotation["image_id"] not in clean]
    rng = random.Random(seed)
    count = round(fraction * len(annotations))
    if count > len(pool):
        raise ValueError(f"--fraction {fraction} plants {count:,} captions, more than the {len(pool):,} outside the "
                         f"{clean_images:,} clean images")
    if count and len({annotations[i]["image_id"] for i in pool}) < 2:
        raise ValueError("planting noise needs captions of at least two images outside the clean subset")
    chosen = set(rng.sample(pool, count))
    lines = []
    for index, annotation in enumerate(annotations):
        donor = None
        if index in chosen:
            while donor is None or annotations[donor]["image_id"] == annotation["image_id"]:
                donor = pool[rng.randrange(len(pool))]
        lines.append({
            "index": index, "id": annotation.get("id"), "image_id": annotation["image_id"],
            "caption": annotation["caption"] if donor is None else annotations[donor]["caption"],
            "original": annotation["caption"], "planted": donor is not None,
            "from_image_id": None if donor is None else annotations[donor]["image_id"],
            "clean": annotation["image_id"] in clean,
        })
    return lines


def plant_noise(source: str | Path, out: str | Path, fraction: float, seed: int = 0,
                train_annotations: str = DEFAULT_TRAIN_ANNOTATIONS, overwrite: bool = False,
                clean_images: int = 0) -> NoiseReport:
    """Write the dataset `source` with planted noise in its training captions into `out` (see the module
    docstring), and with `clean_images` the clean subset's annotation file. Everything is checked before
    anything is written: the fraction, the clean subset, the annotation file, an `out` that holds something
    else (refused unless `overwrite`, which deletes only what this writes)."""
    check_fraction(fraction)
    source, out = Path(source), Path(out)
    document = read_caption_file(source, train_annotations)
    if out.resolve() == source.resolve():
        raise DataSourceError("--out must be another folder than --from")
    lines = planted_captions(document["annotations"], fraction, seed, clean_images)
    owned = (Path(train_annotations).parts[0], NOISE_RECORD, MARKER, *source_entries(source, train_annotations))
    settings = {"from": str(source.resolve()), "fraction": fraction, "seed": seed,
                "train_annotations": train_annotations,
                **({"clean_images": clean_images} if clean_images else {})}  # a folder made before stays valid
    # Planting is quick and deterministic: the same settings again rewrite the same files (resume=True)
    folder = OutputFolder(out, "noise", settings, owned, resume=True, overwrite=overwrite)
    folder.start({})
    noisy = {**document, "annotations": [{**annotation, "caption": line["caption"]}
                                         for annotation, line in zip(document["annotations"], lines, strict=True)]}
    write_derived_dataset(source, out, train_annotations, noisy)
    clean_file = clean_annotations(train_annotations) if clean_images else None
    clean = [annotation for annotation, line in zip(document["annotations"], lines, strict=True) if line["clean"]]
    if clean_file is not None:
        ids = {annotation["image_id"] for annotation in clean}
        write_json(out / clean_file, {**document, "images": [i for i in document["images"] if i["id"] in ids],
                                      "annotations": clean})
    write_file(out / NOISE_RECORD, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
    return NoiseReport(out, len(lines), sum(line["planted"] for line in lines), clean_images, len(clean), clean_file)


def read_noise_record(folder: Path) -> list[dict[str, Any]] | None:
    """The lines of `folder`/noise.jsonl, or None when the folder has none (its captions are not planted)."""
    path = folder / NOISE_RECORD
    if not path.is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as err:
        raise DataSourceError(f"{path}: not a noise record ({err})") from None
