"""`python -m train data coco`: COCO 2017 captions and the first N images of each split, fetched by URL.

The annotations (captions_{train,val}2017.json) come from annotations_trainval2017.zip (by default the official
URL, downloaded once, resumably, into <out>/downloads/), from a local copy of that zip, or from a folder that
holds the two JSON files. The images are the first N of the train file's own `images` list (the order the
seed write-up's "first 10,000" means) and the first M of val's, each fetched from its record's `coco_url` by a
bounded pool of threads, checked to decode, optionally shrunk, and written atomically. The result is the
folder the `seed` preset reads: annotations/captions_{train,val}2017.json (the images that arrived, in
their original order, with their captions), train2017/, val2017/, plus failed.tsv (url, reason) when some
did not arrive. Running again with --resume fetches only what is missing or failed.
"""

from __future__ import annotations

import json
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..coco import AnnotationError, _field, _list
from ..folders import MARKER, write_file, write_json
from ..images import ImageLoadError
from .fetch import (
    FetchFailed,
    HttpPolicy,
    OutputFolder,
    checked_image,
    download_file,
    fetch_bytes,
    image_size_on_disk,
    is_url,
    run_pool,
    write_failures,
)

OFFICIAL_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
SPLITS = {"train": "train2017", "val": "val2017"}  # split -> image folder (and the annotation file's suffix)
IMAGE_FIELDS = (("id", int), ("file_name", str), ("coco_url", str))  # what an image record must have
CAPTION_FIELDS = (("image_id", int), ("caption", str))
OWNED = ("annotations/captions_train2017.json", "annotations/captions_val2017.json", "train2017", "val2017",
         "failed.tsv", "shards", MARKER)  # shards/: --format shards (blipcore.data.prep.shards)


@dataclass
class CaptionFile:
    """One split's caption annotations: the file's other top-level entries (info, licenses), its image records
    in their order, and each image's caption annotations."""

    header: dict[str, Any]
    images: list[dict[str, Any]]
    captions: dict[int, list[dict[str, Any]]]


@dataclass
class FetchReport:
    """What `fetch_coco` did: per split, images wanted and images on disk; the failures as (url, reason)."""

    out: Path
    wanted: dict[str, int] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    fetched: int = 0
    megabytes: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_file: Path | None = None

    def summary(self) -> str:
        """One line: '9,987 of 10,000 train and 1,000 of 1,000 val images in DIR, 13 failed: see DIR/failed.tsv'."""
        splits = " and ".join(f"{self.present[s]:,} of {self.wanted[s]:,} {s}" for s in self.wanted)
        line = f"{splits} images in {self.out} ({self.fetched:,} fetched now, {self.megabytes:,.1f} MB)"
        if self.failures:
            line += f", {len(self.failures):,} failed: see {self.failed_file}"
        return line


# --- annotations ---------------------------------------------------------------------------------------
def parse_caption_file(raw: bytes, source: str) -> CaptionFile:
    """A COCO captions file, checked: AnnotationError naming `source` and the first problem otherwise (not
    JSON, not COCO captions, an image file name that is not a plain name, an image listed twice)."""
    path = Path(source)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise AnnotationError(f"{source}: not a JSON file ({str(err)[:120]})") from None
    if not isinstance(document, dict):
        raise AnnotationError(f"{source}: top level is a {type(document).__name__}, expected COCO captions")
    try:  # the structure: what a file that is not COCO captions (say instances_train2017.json) fails
        images, annotations = _list(path, document, "images"), _list(path, document, "annotations")
        entries = [tuple(_field(path, image, f"images[{i}]", key, kind) for key, kind in IMAGE_FIELDS)
                   for i, image in enumerate(images)]
        pairs = [tuple(_field(path, annotation, f"annotations[{i}]", key, kind) for key, kind in CAPTION_FIELDS)
                 for i, annotation in enumerate(annotations)]
    except AnnotationError as err:
        raise AnnotationError(f"{err}: not COCO captions (captions_train2017.json, captions_val2017.json)") from None
    captions: dict[int, list[dict[str, Any]]] = {}
    names: set[str] = set()
    for i, (image_id, name, url) in enumerate(entries):
        if PurePosixPath(name).name != name or name.startswith(".") or "\\" in name:
            raise AnnotationError(f"{source}: images[{i}].file_name {name!r} is not a plain file name")
        if not is_url(url):
            raise AnnotationError(f"{source}: images[{i}].coco_url {url!r} is not an http(s) URL")
        if image_id in captions or name in names:
            raise AnnotationError(f"{source}: images[{i}]: image {image_id} ({name}) is listed twice")
        captions[image_id] = []
        names.add(name)
    for annotation, (image_id, _) in zip(annotations, pairs, strict=True):
        if image_id in captions:
            captions[image_id].append(annotation)
    header = {key: value for key, value in document.items() if key not in ("images", "annotations")}
    return CaptionFile(header, images, captions)


def _from_zip(archive: Path) -> dict[str, CaptionFile]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = {PurePosixPath(name).name: name for name in zf.namelist()}
            files = {}
            for split, folder in SPLITS.items():
                wanted = f"captions_{folder}.json"
                if wanted not in members:
                    held = ", ".join(sorted(n for n in members if n.endswith(".json"))[:6]) or "no JSON files"
                    raise AnnotationError(f"{archive}: holds no {wanted} (it holds {held}): not COCO 2017's "
                                          "annotations_trainval2017.zip")
                files[split] = parse_caption_file(zf.read(members[wanted]), f"{archive}:{members[wanted]}")
            return files
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise AnnotationError(f"{archive}: not a readable zip file ({err})") from None


def _from_folder(folder: Path) -> dict[str, CaptionFile]:
    files = {}
    for split, images in SPLITS.items():
        path = folder / f"captions_{images}.json"
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise AnnotationError(f"{path}: cannot read ({err.strerror or err}); --annotations takes "
                                  "annotations_trainval2017.zip or the folder of its captions_*2017.json") from None
        files[split] = parse_caption_file(raw, str(path))
    return files


def read_annotations(source: str, folder: OutputFolder, policy: HttpPolicy, progress: bool) -> dict[str, CaptionFile]:
    """The train and val caption files of `source`: a URL of annotations_trainval2017.zip (downloaded once into
    --out/downloads/, resumably), that zip on disk, or a folder (or either JSON file in it) holding
    captions_train2017.json and captions_val2017.json. A downloaded file that is not that zip is deleted."""
    if is_url(source):
        name = PurePosixPath(source.split("?")[0]).name or "annotations.zip"
        archive = download_file(source, folder.prepare_downloads() / name, policy, progress)
        try:
            return _from_zip(archive)
        except AnnotationError as err:
            archive.unlink(missing_ok=True)  # the next run downloads it afresh
            raise AnnotationError(f"{err}; {source} gave this file, deleted") from None
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise AnnotationError(f"--annotations {source}: no such file, folder or http(s) URL")
    if zipfile.is_zipfile(path):
        return _from_zip(path)
    if path.suffix == ".json":
        return _from_folder(path.parent)
    raise AnnotationError(f"--annotations {source}: neither a zip file nor a captions_*2017.json")


# --- fetching ----------------------------------------------------------------------------------------------
@dataclass
class _Task:
    url: str
    dest: Path


def _fetch_one(task: _Task, policy: HttpPolicy, image_size: int | None, stop: threading.Event) -> int:
    """Fetch, check and write one image; the bytes written. FetchFailed (with the reason) when it cannot be
    used; DataSourceError when it cannot be written (that stops the whole run)."""
    if stop.is_set():
        raise FetchFailed("not tried: the run stopped", transient=True)
    data = fetch_bytes(task.url, policy, stop)
    try:
        data = checked_image(data, task.url, image_size)
    except ImageLoadError as err:
        raise FetchFailed(str(err).removeprefix(f"{task.url}: "), transient=False) from None
    write_file(task.dest, data)
    return len(data)


def _split_document(caption_file: CaptionFile, records: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """The caption file written for the records whose image is on disk: the original entries in the original
    order, width and height those of the file (a shrunk image keeps its original ones as orig_width/height)."""
    images, annotations = [], []
    for record in records:
        path = folder / record["file_name"]
        if not path.is_file():
            continue
        width, height = image_size_on_disk(path)
        entry = dict(record)
        if (width, height) != (record.get("width"), record.get("height")):
            entry.update(orig_width=record.get("width"), orig_height=record.get("height"))
        entry.update(width=width, height=height)
        images.append(entry)
        annotations += caption_file.captions[record["id"]]
    return {**caption_file.header, "images": images, "annotations": annotations}


def fetch_coco(
    out: str | Path,
    first: int = 10000,
    val_first: int = 1000,
    annotations: str = OFFICIAL_ANNOTATIONS_URL,
    image_size: int | None = None,
    workers: int = 16,
    policy: HttpPolicy | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FetchReport:
    """Fetch the first `first` train2017 and `val_first` val2017 images (0: all) with their captions into `out`
    (see the module docstring). Returns the report; the dataset is usable even when some images failed.

    Raises AnnotationError for unusable annotations and DataSourceError for an --out that may not be used, a
    download that cannot complete or a file that cannot be written (every file written before is kept: run
    again with `resume`). Nothing is written into `out` before the annotations have been read and checked,
    except the annotations zip being downloaded."""
    if first < 0 or val_first < 0:
        raise ValueError(f"--first and --val-first must be >= 0 (0: all), got {first} and {val_first}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if image_size is not None and image_size < 16:
        raise ValueError(f"--image-size must be >= 16 pixels, got {image_size}")
    policy = policy or HttpPolicy()
    out = Path(out)
    folder = OutputFolder(out, "coco", {"image_size": image_size}, OWNED, resume=resume, overwrite=overwrite)
    try:
        files = read_annotations(annotations, folder, policy, progress)
    except BaseException:
        folder.discard_if_unused()
        raise
    selected = {split: files[split].images[:count or None] for split, count in (("train", first), ("val", val_first))}
    folder.start({"annotations": annotations, "first": first, "val_first": val_first})

    report = FetchReport(out, wanted={split: len(records) for split, records in selected.items()})
    tasks = [_Task(record["coco_url"], out / SPLITS[split] / record["file_name"])
             for split, records in selected.items() for record in records]
    tasks = [task for task in tasks if not task.dest.is_file()]  # written earlier: complete (atomic) and checked
    result = run_pool(tasks, lambda task, stop: _fetch_one(task, policy, image_size, stop), lambda task: task.url,
                      workers, progress)
    report.fetched, report.megabytes, report.failures = result.done, result.written / 1e6, sorted(result.failures)

    for split, records in selected.items():
        document = _split_document(files[split], records, out / SPLITS[split])
        report.present[split] = len(document["images"])
        write_json(out / "annotations" / f"captions_{SPLITS[split]}.json", document)
    report.failed_file = write_failures(out, report.failures, ("url", "reason"))
    return report
