"""`python -m train data flickr8k`: the two zips of the Flickr8k distribution -> the COCO-caption-format folder
the flickr8k preset reads (the layout of ../shared/data/flickr8k).

The zips as distributed (each may be given as a local path or an http(s) URL, downloaded once into
<out>/downloads/): Flickr8k_Dataset.zip holds Flicker8k_Dataset/<name>.jpg (the folder's name is misspelt so;
any folder is accepted); Flickr8k_text.zip holds Flickr8k.token.txt (lines `<name>.jpg#<0-4><TAB><caption>`)
and Flickr_8k.{train,dev,test}Images.txt (one file name a line), among files that are ignored.

The folder written:
    images/<name>.jpg                          every captioned image that decodes (optionally shrunk)
    annotations/captions_train.json, _val.json  a hash split: val when int(sha1("flickr8k:<name>"), 16) % 10 == 0
    annotations/captions_official_{train,dev,test}.json   the official split that published results use
Image records: id (the Flickr photo id that starts the name), file_name, width, height, aspect_preserved,
flickr8k_official_split (train / dev / test / none), source; annotation ids 1..N over the images in name order.
The two splits cross (official test images sit in both hash files): never mix them.

The real token file names one image no zip holds ("2258277193_586949ec62.jpg.1"): names without an image are
skipped and reported, not an error.
"""

from __future__ import annotations

import hashlib
import re
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..folders import MARKER, DataSourceError, write_file, write_json
from ..images import ImageLoadError
from .fetch import (
    FetchFailed,
    HttpPolicy,
    OutputFolder,
    checked_image,
    download_file,
    image_size_on_disk,
    is_url,
    run_pool,
    write_failures,
)

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
HASH_SPLITS = ("train", "val")
OWNED = ("images", *(f"annotations/captions_{s}.json" for s in HASH_SPLITS),
         *(f"annotations/captions_official_{s}.json" for s in SPLIT_FILES), "failed.tsv", MARKER)
_TOKEN_LINE = re.compile(r"(?P<name>[^\t#]+)#(?P<number>\d+)\t(?P<caption>.*\S.*)")
_FLICKR_NAME = re.compile(r"(?P<id>\d+)_\w+\.jpg")


@dataclass
class Flickr8kText:
    """What Flickr8k_text.zip says: each named image's captions in caption-number order, and the official split
    of each image listed in a split file."""

    captions: dict[str, list[str]]
    official: dict[str, str]


@dataclass
class ConvertReport:
    """What `convert_flickr8k` did; `notes` are things worth knowing that are not failures."""

    out: Path
    images: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    converted: int = 0
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_file: Path | None = None

    def summary(self) -> str:
        """One line: images, captions, both splits, failures."""
        official = " / ".join(f"{self.splits.get(f'official_{s}', 0):,} {s}" for s in SPLIT_FILES)
        line = (f"{self.images:,} images with {self.captions:,} captions in {self.out} ({self.converted:,} converted "
                f"now): hash split {self.splits.get('train', 0):,} train / {self.splits.get('val', 0):,} val, "
                f"official split {official}")
        if self.failures:
            line += f"; {len(self.failures):,} failed: see {self.failed_file}"
        return line


def hash_split(file_name: str) -> str:
    """The hash split of ../shared/data/flickr8k: "val" for about one image in ten, fixed by its name."""
    return "val" if int(hashlib.sha1(f"flickr8k:{file_name}".encode()).hexdigest(), 16) % 10 == 0 else "train"


# --- reading the zips --------------------------------------------------------------------------------------
def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
        raise DataSourceError(f"{path}: not a readable zip file ({err})") from None


def _members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The files of a zip, without folders and macOS metadata (__MACOSX/, ._name)."""
    return [info for info in zf.infolist() if not info.is_dir() and not info.filename.startswith("__MACOSX/")
            and not PurePosixPath(info.filename).name.startswith("._")]


def _text(zf: zipfile.ZipFile, path: Path, wanted: str) -> tuple[str, str]:
    """(text, where) of the file named `wanted` anywhere in the zip; DataSourceError naming what it holds."""
    found = [info.filename for info in _members(zf) if PurePosixPath(info.filename).name == wanted]
    if not found:
        held = ", ".join(sorted(PurePosixPath(i.filename).name for i in _members(zf))[:8]) or "nothing"
        raise DataSourceError(f"{path}: holds no {wanted} (it holds {held}): not Flickr8k_text.zip")
    where = f"{path}:{found[0]}"
    try:
        return zf.read(found[0]).decode("utf-8-sig"), where
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataSourceError(f"{where}: cannot be read from the zip ({err})") from None


def parse_tokens(text: str, where: str) -> dict[str, list[str]]:
    """Flickr8k.token.txt -> {image name: captions in caption-number order}; DataSourceError naming the line
    for a malformed line or a caption number given twice. Blank lines are ignored."""
    numbered: dict[str, dict[int, tuple[str, int]]] = {}
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line.strip("\r\n "))
        if match is None:
            raise DataSourceError(f"{where} line {line_number}: expected '<name>.jpg#<0-4><TAB><caption>', "
                                  f"got {line[:100]!r}")
        name, number = match["name"].strip(), int(match["number"])
        captions = numbered.setdefault(name, {})
        if number in captions:
            raise DataSourceError(f"{where} line {line_number}: caption #{number} of {name} is listed twice "
                                  f"(first on line {captions[number][1]})")
        captions[number] = (" ".join(match["caption"].split()), line_number)
    if not numbered:
        raise DataSourceError(f"{where}: no captions in it")
    return {name: [captions[n][0] for n in sorted(captions)] for name, captions in numbered.items()}


def read_text_zip(path: Path) -> Flickr8kText:
    """The captions and the official split of Flickr8k_text.zip; DataSourceError for a missing or malformed file
    or an image listed twice in the split files."""
    with _open_zip(path) as zf:
        captions = parse_tokens(*_text(zf, path, TOKEN_FILE))
        official: dict[str, str] = {}
        listed: dict[str, str] = {}  # name -> where it was first listed
        for split, file_name in SPLIT_FILES.items():
            text, where = _text(zf, path, file_name)
            for line_number, line in enumerate(text.splitlines(), 1):
                name = line.strip()
                if not name:
                    continue
                if name in listed:
                    raise DataSourceError(f"{where} line {line_number}: {name} is listed twice "
                                          f"(first in {listed[name]})")
                listed[name] = f"{file_name} line {line_number}"
                official[name] = split
    return Flickr8kText(captions, official)


def image_members(zf: zipfile.ZipFile, path: Path) -> dict[str, str]:
    """{file name: member} of the .jpg files of Flickr8k_Dataset.zip, whatever folder holds them
    (Flicker8k_Dataset/ as distributed); DataSourceError when there are none or a name occurs twice."""
    found: dict[str, str] = {}
    for info in _members(zf):
        name = PurePosixPath(info.filename).name
        if not name.lower().endswith(".jpg"):
            continue
        if name in found:
            raise DataSourceError(f"{path}: holds {name} twice ({found[name]} and {info.filename})")
        found[name] = info.filename
    if not found:
        raise DataSourceError(f"{path}: holds no .jpg images (expected Flicker8k_Dataset/<name>.jpg): "
                              "not Flickr8k_Dataset.zip")
    return found


def _local_zip(source: str, folder: OutputFolder, policy: HttpPolicy, progress: bool) -> Path:
    """The path of a zip given as a path or an http(s) URL (downloaded once into --out/downloads/; a download
    that is not a zip is deleted, so that the next run fetches it again)."""
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataSourceError(f"{source}: no such file (give the zip's path or an http(s) URL)")
        return path
    name = PurePosixPath(source.split("?")[0]).name or "download.zip"
    path = download_file(source, folder.prepare_downloads() / name, policy, progress)
    if not zipfile.is_zipfile(path):
        path.unlink()
        raise DataSourceError(f"{source} did not give a zip file (deleted: the next run downloads it again)")
    return path


# --- converting --------------------------------------------------------------------------------------------
@dataclass
class _Image:
    name: str
    member: str
    image_id: int


def _plan(text: Flickr8kText, members: dict[str, str], images_zip: Path, report: ConvertReport) -> list[_Image]:
    """The images to write (captioned and in the zip), in name order; notes the names skipped."""
    missing = sorted(name for name in text.captions if name not in members)
    if len(missing) == len(text.captions):
        raise DataSourceError(f"none of the {len(text.captions):,} images named in {TOKEN_FILE} is in {images_zip}: "
                              "are the two zips from the same Flickr8k distribution?")
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        report.notes.append(f"{len(missing):,} image name(s) in {TOKEN_FILE} with no image in {images_zip.name}, "
                            f"their captions skipped: {shown}")
    uncaptioned = len(set(members) - set(text.captions))
    if uncaptioned:
        report.notes.append(f"{uncaptioned:,} image(s) of {images_zip.name} have no caption in {TOKEN_FILE}: left out")
    images, ids = [], {}
    for name in sorted(set(members) & set(text.captions)):
        match = _FLICKR_NAME.fullmatch(name)
        if match is None:
            raise DataSourceError(f"{images_zip}: {members[name]}: a Flickr8k image name is "
                                  "<Flickr photo id>_<key>.jpg")
        image_id = int(match["id"])
        if image_id in ids:
            raise DataSourceError(f"{images_zip}: {ids[image_id]} and {name} have the same Flickr photo id {image_id}")
        ids[image_id] = name
        images.append(_Image(name, members[name], image_id))
    for name, split in sorted(text.official.items()):
        if name not in members or name not in text.captions:
            why = f"not in {images_zip.name}" if name not in members else f"no caption in {TOKEN_FILE}"
            report.failures.append((name, f"listed in {SPLIT_FILES[split]} but {why}"))
    return images


def _convert_one(image: _Image, zf: zipfile.ZipFile, out: Path, image_size: int | None, stop: threading.Event) -> int:
    """Check (decode) and write one image; the bytes written."""
    if stop.is_set():
        raise FetchFailed("not converted: the run stopped", transient=True)
    try:
        data = checked_image(zf.read(image.member), image.member, image_size)
    except ImageLoadError as err:
        raise FetchFailed(str(err).removeprefix(f"{image.member}: "), transient=False) from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise FetchFailed(f"cannot be read from the zip ({err})", transient=False) from None
    write_file(out / "images" / image.name, data)
    return len(data)


def _documents(images: list[_Image], text: Flickr8kText, out: Path, source: str) -> dict[str, dict[str, Any]]:
    """The five annotation files (key: hash split or official_<split>) for the images on disk."""
    info = {"description": f"Flickr8k (Hodosh et al. 2013), converted by `python -m train data flickr8k` from {source}",
            "version": "1.0", "year": 2013}
    documents = {key: {"info": dict(info), "licenses": [], "images": [], "annotations": []}
                 for key in (*HASH_SPLITS, *(f"official_{s}" for s in SPLIT_FILES))}
    next_id = 1
    for image in images:
        path = out / "images" / image.name
        if not path.is_file():
            continue
        width, height = image_size_on_disk(path)
        official = text.official.get(image.name, "none")
        record = {"id": image.image_id, "file_name": image.name, "width": width, "height": height,
                  "aspect_preserved": True, "flickr8k_official_split": official, "source": f"{source}:{image.member}"}
        captions = [{"id": next_id + k, "image_id": image.image_id, "caption": caption}
                    for k, caption in enumerate(text.captions[image.name])]
        next_id += len(captions)
        for key in (hash_split(image.name), f"official_{official}"):
            if key in documents:
                documents[key]["images"].append(record)
                documents[key]["annotations"] += captions
    return documents


def convert_flickr8k(
    images: str,
    text: str,
    out: str | Path,
    image_size: int | None = None,
    workers: int = 4,
    policy: HttpPolicy | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert Flickr8k_Dataset.zip (`images`) and Flickr8k_text.zip (`text`), paths or URLs, into `out` (see
    the module docstring). Everything is read and checked before anything is written into `out` (apart from
    zips being downloaded there): a missing token or split file, a malformed line, an image listed twice is a
    DataSourceError and leaves no trace. An image that does not decode is a failure (failed.tsv), not an error."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if image_size is not None and image_size < 16:
        raise ValueError(f"--image-size must be >= 16 pixels, got {image_size}")
    policy = policy or HttpPolicy()
    out = Path(out)
    folder = OutputFolder(out, "flickr8k", {"image_size": image_size}, OWNED, resume=resume, overwrite=overwrite)
    report = ConvertReport(out)
    try:
        images_zip = _local_zip(images, folder, policy, progress)
        captions = read_text_zip(_local_zip(text, folder, policy, progress))
        zf = _open_zip(images_zip)
    except BaseException:
        folder.discard_if_unused()
        raise
    with zf:
        try:
            plan = _plan(captions, image_members(zf, images_zip), images_zip, report)
        except BaseException:
            folder.discard_if_unused()
            raise
        folder.start({"images": images, "text": text})
        todo = [image for image in plan if not (out / "images" / image.name).is_file()]  # earlier ones are complete
        result = run_pool(todo, lambda image, stop: _convert_one(image, zf, out, image_size, stop),
                          lambda image: image.name, workers, progress)
    report.converted = result.done
    report.failures = sorted(report.failures + result.failures)
    documents = _documents(plan, captions, out, images_zip.name)
    for key, document in documents.items():
        report.splits[key] = len(document["images"])
        write_json(out / "annotations" / f"captions_{key}.json", document)
    report.images = sum(report.splits[key] for key in HASH_SPLITS)
    report.captions = sum(len(documents[key]["annotations"]) for key in HASH_SPLITS)
    report.failed_file = write_failures(out, report.failures, ("image", "reason"))
    return report
