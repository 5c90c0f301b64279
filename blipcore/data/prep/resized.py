"""`python -m train data resize`: a compact copy of a COCO-caption-format dataset folder, every image shrunk.

Why: training decodes every image again every epoch. The CPU preset trains at 96 px from Flickr8k's 224 px
JPEGs; a copy at 128 px is a pre-resized image cache (3x fewer pixels to decode, and room left for the random
crop), and small enough to travel. Measured on Flickr8k (134 MB, of which 15 MB annotations and manifest):
--size 128 gives 70 MB (67 MiB), with --quality 85 60 MB (58 MiB, inside a 64 MiB transfer), --size 96 50 MB.

What: every file under --from is mirrored into OUT under the same relative path and file name, so the
annotation files' `file_name`s resolve there unchanged. Links to folders are followed (the derived datasets of
`data noise` and `capfilt` link their image folders: blipcore.data.derived), links to files copied as files.

- An image file (by extension: IMAGE_SUFFIXES, any case) is decoded as training decodes it
  (`blipcore.data.images.load_image`: EXIF orientation applied, every mode made RGB, transparency on white).
  When its shorter side is longer than `size` it is shrunk with Lanczos resampling, aspect kept, so that side
  is `size` pixels, and written in the format its extension names, whatever the source's bytes were: JPEG
  (at `quality`, optimized) for .jpg / .jpeg, WebP (at `quality`) for .webp, PNG, BMP.
- An image whose shorter side is `size` or less is copied byte for byte: never enlarged, never re-encoded
  (which would only lose quality). A copy keeps its EXIF orientation, which load_image applies, so training
  sees the same pixels either way.
- An image file that cannot be decoded (or re-encoded) is copied unchanged and reported, never fatal: training
  skips it with a warning, as it would in the source.
- Every other file (annotations, README, noise.jsonl, ...) is copied unchanged.

Not copied: the source's own marker (`bliplab-data.json`: OUT gets its own, through `OutputFolder`, recording
--from, --size and --quality), the source's `downloads/` folder (the archives a `data` command fetched:
full-size images, the opposite of compact) and the temporary files a killed writer left.

Every file is written atomically (temporary name, fsync, rename), so an interrupted run leaves only complete
files and `resume` writes only the missing ones; files already there are classified again (resized, copied,
undecodable) for the summary without being rewritten. The files go through a small thread pool
(`fetch.run_pool`): decoding and encoding release the GIL, and most of a file's time is the wait for fsync.
"""

from __future__ import annotations

import filecmp
import glob
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ...io import STALE_TEMPORARY_PATTERN
from ..folders import MARKER, DataSourceError, write_file
from ..images import ImageLoadError, load_image
from .fetch import DOWNLOADS, JPEG_QUALITY, FetchFailed, OutputFolder, run_pool

COMMAND = "resize"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # any case; other files are copied unchanged
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
MIN_SIZE = 16  # the smallest image the models take (data.shapes_image_size has the same floor)
MAX_QUALITY = 95  # above it JPEG files grow with no visible gain (Pillow's own advice)
DEFAULT_QUALITY = JPEG_QUALITY
DEFAULT_WORKERS = 8  # threads: more than the cores, since a file mostly waits on the disk (fsync)
SHOWN_FAILURES = 3  # the undecodable files named in the summary line

# What became of a file
RESIZED = "resized"  # an image shrunk and re-encoded
KEPT = "kept"  # an image already small enough, copied as it is
UNDECODABLE = "undecodable"  # an image file that would not decode (or encode), copied as it is
COPIED = "copied"  # any other file, copied as it is


@dataclass(frozen=True)
class SourceFile:
    """A file to mirror: where it lies (a link followed), its path in both folders, its size in bytes."""

    path: Path
    relative: Path
    size: int

    @property
    def is_image(self) -> bool:
        return self.relative.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Mirrored:
    """What became of a SourceFile: its `outcome`, the size of OUT's copy, whether this run wrote it (False:
    an earlier run had, and --resume kept it) and, for an undecodable image, why."""

    outcome: str
    size: int
    written: bool
    reason: str = ""


@dataclass
class ResizeReport:
    """What `resize_dataset` did; the counts cover every file of OUT, written now or by an earlier run."""

    out: Path
    size: int
    resized: int = 0
    kept: int = 0
    copied: int = 0
    kept_from_earlier: int = 0  # files already in OUT (--resume): classified, not written again
    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why), sorted
    bytes_before: int = 0  # the source's files that were mirrored
    bytes_after: int = 0  # OUT's copies of them (the marker aside)

    def summary(self) -> str:
        parts = [f"{self.resized:,} images resized to {self.size} px"]
        if self.kept:
            parts.append(f"{self.kept:,} already {self.size} px or smaller copied as they are")
        parts.append(f"{self.copied:,} other files copied")
        sizes = f"{self.bytes_before / 1e6:,.1f} MB -> {self.bytes_after / 1e6:,.1f} MB"
        line = f"{', '.join(parts)} ({sizes}) -> {self.out}"
        if self.kept_from_earlier:
            line += f" ({self.kept_from_earlier:,} of the files already there from the earlier run)"
        if self.undecodable:
            shown = ", ".join(f"{name} ({why})" for name, why in self.undecodable[:SHOWN_FAILURES])
            more = ", ..." if len(self.undecodable) > SHOWN_FAILURES else ""
            line += (f"; {len(self.undecodable):,} image files could not be resized and were copied unchanged "
                     f"(training skips them): {shown}{more}")
        return f"{line}; train on it with --data-root {self.out}"


# --- checks and the listing ----------------------------------------------------------------------------------
def check_settings(size: int, quality: int) -> None:
    """ValueError naming the option when --size or --quality is out of range."""
    if size < MIN_SIZE:
        raise ValueError(f"--size must be at least {MIN_SIZE} pixels (the smallest image the models take), "
                         f"got {size}")
    if not 1 <= quality <= MAX_QUALITY:
        raise ValueError(f"--quality must be in [1, {MAX_QUALITY}] (JPEG and WebP quality), got {quality}")


def check_apart(source: Path, out: Path) -> None:
    """DataSourceError when --out is --from, lies inside it (the copy would copy itself) or holds it."""
    here, there = source.resolve(), out.resolve()
    if here == there:
        raise DataSourceError("--out must be another folder than --from")
    if there.is_relative_to(here):
        raise DataSourceError(f"--out {out} lies inside --from {source}: the copy would copy itself; choose a "
                              "folder outside it")
    if here.is_relative_to(there):
        raise DataSourceError(f"--from {source} lies inside --out {out}: choose an --out outside it")


def _skipped(relative: Path) -> bool:
    """Entries of the source that are not mirrored: its marker and downloads/ (top level), stale temporaries."""
    top = len(relative.parts) == 1
    return (top and relative.name in (MARKER, DOWNLOADS)) or bool(STALE_TEMPORARY_PATTERN.fullmatch(relative.name))


def _walk(folder: Path, relative: Path, ancestors: frozenset[str]) -> Iterator[SourceFile]:
    for path in sorted(folder.iterdir()):
        inside = relative / path.name
        if _skipped(inside):
            continue
        if path.is_dir():  # a link to a folder too
            real = os.path.realpath(path)
            if real in ancestors:
                raise DataSourceError(f"{path}: a link to a folder that holds it (a loop): remove it, or copy "
                                      "another folder")
            yield from _walk(path, inside, ancestors | {real})
        elif path.is_file():
            yield SourceFile(path, inside, path.stat().st_size)
        elif path.is_symlink():
            raise DataSourceError(f"{path}: a broken link (to {os.readlink(path)}): restore what it points to, "
                                  "or remove it")
        else:
            raise DataSourceError(f"{path}: not a regular file or folder")


def source_files(source: Path) -> list[SourceFile]:
    """Every file under `source` to mirror, in sorted path order, links followed (see the module docstring);
    DataSourceError for a broken link, a link loop, or a folder that cannot be read."""
    try:
        return list(_walk(source, Path(), frozenset({os.path.realpath(source)})))
    except OSError as err:
        raise DataSourceError(f"--from {source}: cannot be read ({err})") from None


# --- one file ------------------------------------------------------------------------------------------------
def shrunk_size(width: int, height: int, size: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side `size` and the aspect kept, or None when that side is `size` or less
    (never enlarged)."""
    shorter = min(width, height)
    if shorter <= size:
        return None
    return max(size, round(width * size / shorter)), max(size, round(height * size / shorter))


def encode(image: Image.Image, suffix: str, quality: int) -> bytes:
    """`image` in the format the file extension `suffix` names (see _FORMATS), JPEG and WebP at `quality`."""
    kind = _FORMATS[suffix.lower()]
    options = {"JPEG": {"quality": quality, "optimize": True}, "WEBP": {"quality": quality}}.get(kind, {})
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def _resized_bytes(file: SourceFile, size: int, quality: int) -> bytes | None:
    """The shrunk image's bytes, or None when it is small enough already; ImageLoadError when it does not
    decode or encode."""
    try:
        image = load_image(file.path)
        shape = shrunk_size(image.width, image.height, size)
        return None if shape is None else encode(image.resize(shape, Image.Resampling.LANCZOS), file.relative.suffix,
                                                 quality)
    except ImageLoadError as err:
        raise ImageLoadError(str(err).removeprefix(f"{file.path}: ")) from None
    except (OSError, ValueError) as err:  # the encoder refused it (e.g. wider than WebP's 16,383 px)
        raise ImageLoadError(f"cannot be encoded ({err})") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataSourceError(f"{path}: cannot be read ({err.strerror or err})") from None


def _earlier_outcome(file: SourceFile, target: Path) -> Mirrored:
    """What an earlier run made of `file` (its copy `target` is there): an image identical to its source was
    copied (too small, or undecodable: decoding tells which), any other image was resized."""
    size = target.stat().st_size
    if not file.is_image:
        return Mirrored(COPIED, size, written=False)
    if size != file.size or not filecmp.cmp(file.path, target, shallow=False):
        return Mirrored(RESIZED, size, written=False)
    try:
        load_image(file.path)
    except ImageLoadError as err:
        return Mirrored(UNDECODABLE, size, written=False, reason=str(err).removeprefix(f"{file.path}: "))
    return Mirrored(KEPT, size, written=False)


def mirror_file(file: SourceFile, target: Path, size: int, quality: int, resume: bool) -> Mirrored:
    """Write `file`'s copy to `target` (atomically; with `resume`, one already there is kept)."""
    if resume and target.is_file():
        return _earlier_outcome(file, target)
    outcome, reason, data = COPIED, "", None
    if file.is_image:
        try:
            data = _resized_bytes(file, size, quality)
            outcome = KEPT if data is None else RESIZED
        except ImageLoadError as err:
            outcome, reason = UNDECODABLE, str(err)
    if data is None:
        data = _read(file.path)
    write_file(target, data)
    return Mirrored(outcome, len(data), written=True, reason=reason)


# --- the folder ----------------------------------------------------------------------------------------------
def _remove_leftovers(out: Path, files: list[SourceFile]) -> None:
    """The temporary files a killed run left in OUT's subfolders (OutputFolder.start cleans the top ones)."""
    for folder in sorted({(out / file.relative).parent for file in files}):
        if folder.is_dir():
            for path in folder.iterdir():
                if STALE_TEMPORARY_PATTERN.fullmatch(path.name):
                    path.unlink(missing_ok=True)


def resize_dataset(source: str | Path, out: str | Path, size: int, quality: int = DEFAULT_QUALITY,
                   workers: int = DEFAULT_WORKERS, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> ResizeReport:
    """Write the copy of `source` with every image shrunk to `size` px on its shorter side into `out` (see the
    module docstring). Everything is checked before anything is written: the settings, the source folder and its
    listing, `out` against `source`, and an `out` that holds something else (refused unless `overwrite`, which
    deletes only the entries this writes) or an earlier run's output (continued with `resume`, same settings)."""
    check_settings(size, quality)
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataSourceError(f"--from {source}: no such folder")
    check_apart(source, out)
    files = source_files(source)
    if not files:
        raise DataSourceError(f"--from {source}: no files to copy")
    owned = (*sorted({glob.escape(file.relative.parts[0]) for file in files}), MARKER)
    settings = {"from": str(source.resolve()), "size": size, "quality": quality}
    folder = OutputFolder(out, COMMAND, settings, owned, resume=resume, overwrite=overwrite,
                          resume_does="write only the files that are missing")
    folder.start({"files": len(files)})
    if folder.resuming:
        _remove_leftovers(out, files)

    done: dict[Path, Mirrored] = {}
    lock = threading.Lock()

    def job(file: SourceFile, stop: threading.Event) -> int:
        if stop.is_set():  # Ctrl-C or a failed write: the queued files are left for --resume
            return 0
        result = mirror_file(file, out / file.relative, size, quality, folder.resuming)
        with lock:
            done[file.relative] = result
        if result.outcome == UNDECODABLE:  # counted among the progress bar's failures
            raise FetchFailed(result.reason, transient=False)
        return result.size if result.written else 0

    run_pool(files, job, label=lambda file: file.relative.as_posix(), workers=workers, progress=progress,
             desc="files")
    report = ResizeReport(out, size, bytes_before=sum(file.size for file in files))
    for relative, result in sorted(done.items()):
        report.bytes_after += result.size
        report.kept_from_earlier += not result.written
        if result.outcome == RESIZED:
            report.resized += 1
        elif result.outcome == KEPT:
            report.kept += 1
        elif result.outcome == COPIED:
            report.copied += 1
        else:
            report.undecodable.append((relative.as_posix(), result.reason))
    return report
