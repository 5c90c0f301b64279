"""Getting public datasets onto disk: HTTP with retries, resumable downloads, checked images, output folders.

The machinery shared by `python -m train data coco` (`blipcore.data.prep.coco2017`), `data flickr8k`
(`blipcore.data.prep.flickr8k`), `data shards` (`blipcore.data.prep.shards`) and `data resize`
(`blipcore.data.prep.resized`). Standard library only: img2dataset, the field's downloader, pins pandas<3 and
webdataset<0.3, which conflict with this project's pins.

An output folder is this project's when it holds `bliplab-data.json` (what made it, with which settings;
`blipcore.data.folders`, with the atomic file writes and `DataSourceError`).
Every file goes in atomically (temporary name, fsync, rename) and only after its image decoded, so a file
under its final name is always complete: a crash loses the files in flight, and a run with --resume fetches
only what is missing or failed.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ..folders import MARKER, DataSourceError, write_file, write_json
from ..images import load_image

DOWNLOADS = "downloads"  # archives fetched by URL, kept across --overwrite (they do not change)
MAX_IMAGE_BYTES = 50 << 20  # a response larger than this is not a photo
JPEG_QUALITY = 90
USER_AGENT = "bliplab-data/1 (python urllib)"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
Item = TypeVar("Item")
_NO_MORE = object()


class FetchFailed(Exception):
    """One item (a URL, an image in an archive) could not be fetched or used; `reason` is its line in failed.tsv.
    `transient` failures (timeouts, dropped connections, HTTP 5xx) are worth retrying."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class HttpPolicy:
    """How hard to try a URL: `timeout` seconds per connect or read, `retries` more attempts after the first
    for transient failures (timeouts, dropped connections, HTTP 5xx / 429), waiting `backoff` seconds before
    the first retry and twice as long before each next one."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.retries >= 0 and self.backoff >= 0):
            raise ValueError(f"timeout must be > 0 s, retries and backoff >= 0; got {self.timeout}, {self.retries}, "
                             f"{self.backoff}")


def is_url(text: str) -> bool:
    return urllib.parse.urlsplit(text).scheme in ("http", "https")


# --- HTTP ----------------------------------------------------------------------------------------------
def _open(url: str, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """urlopen with our User-Agent; every failure becomes a FetchFailed, transient or not."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, checked by callers
    except urllib.error.HTTPError as err:
        err.close()
        raise FetchFailed(f"HTTP {err.code} {err.reason}", transient=err.code in _RETRY_STATUS) from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise FetchFailed(f"timed out after {timeout:g} s", transient=True) from None
        raise FetchFailed(f"cannot connect ({reason})", transient=True) from None
    except TimeoutError:
        raise FetchFailed(f"timed out after {timeout:g} s", transient=True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        raise FetchFailed(f"connection failed ({type(err).__name__}: {err})", transient=True) from None


def _read_chunks(response: http.client.HTTPResponse, timeout: float) -> Iterable[bytes]:
    """The body in 1 MiB chunks; a dropped connection or a stalled read becomes a transient FetchFailed."""
    try:
        while chunk := response.read(1 << 20):
            yield chunk
    except TimeoutError:
        raise FetchFailed(f"timed out after {timeout:g} s while reading", transient=True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        raise FetchFailed(f"connection dropped ({type(err).__name__})", transient=True) from None


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def with_retries(attempt: Callable[[], Any], policy: HttpPolicy, stop: threading.Event | None = None) -> Any:
    """`attempt()`, repeated with exponential backoff while it raises a transient FetchFailed; the last failure
    is re-raised, with the number of attempts. A set `stop` event ends the waiting (the failure is raised)."""
    for number in range(policy.retries + 1):
        try:
            return attempt()
        except FetchFailed as failure:
            last = failure
            if not failure.transient or number == policy.retries:
                break
        delay = policy.backoff * 2**number
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            break
    if number:
        last.reason += f" ({number + 1} attempts)"
    raise last


def fetch_bytes(url: str, policy: HttpPolicy, stop: threading.Event | None = None,
                max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The body of `url`, with retries. FetchFailed for an HTTP error, a timeout, a body shorter than its
    Content-Length (truncated), a body over `max_bytes`, or a text/HTML page where an image was expected."""

    def attempt() -> bytes:
        with _open(url, policy.timeout) as response:
            kind = response.headers.get_content_type()
            if kind.startswith("text/"):
                raise FetchFailed(f"the server sent {kind}, not an image", transient=False)
            expected = _content_length(response)
            body = bytearray()
            for chunk in _read_chunks(response, policy.timeout):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"larger than {max_bytes >> 20} MB: not a photo", transient=False)
            if expected is not None and len(body) < expected:
                raise FetchFailed(f"truncated: {len(body):,} of {expected:,} bytes", transient=True)
            return bytes(body)

    return with_retries(attempt, policy, stop)


def download_file(url: str, dest: Path, policy: HttpPolicy, progress: bool = True) -> Path:
    """Download `url` to `dest` once, resumably: bytes arrive in `dest`.part, which a later call continues
    with an HTTP Range request (from the start again if the server ignores ranges); `dest` appears, by
    rename, only when complete. An existing `dest` is returned as it is. DataSourceError when the download
    cannot complete (the .part stays for the next try) or cannot be written."""
    from tqdm.auto import tqdm

    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataSourceError(f"{dest.parent}: cannot be created ({err.strerror or err})") from None
    bar = tqdm(desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, leave=False)

    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        try:
            response = _open(url, policy.timeout, {"Range": f"bytes={have}-"} if have else None)
        except FetchFailed as failure:
            if have and failure.reason.startswith("HTTP 416"):  # the range starts at or past the end: start over
                part.unlink()
                raise FetchFailed(f"{failure.reason} for bytes {have:,}-", transient=True) from None
            raise
        with response:
            resumed = response.status == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink()
                raise FetchFailed(f"the server sent another range than bytes {have:,}-", transient=True)
            have = have if resumed else 0  # 200: the server ignores ranges and sends it all
            length = _content_length(response)
            total = have + length if length is not None else None
            bar.reset(total=total)
            bar.update(have)
            try:
                with open(part, "ab" if resumed else "wb") as f:
                    for chunk in _read_chunks(response, policy.timeout):
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:
                raise DataSourceError(f"{part}: cannot be written ({err.strerror or err}); the bytes downloaded "
                                      "so far are kept: free some space and run the same command again") from None
            size = part.stat().st_size
            if total is not None and size < total:
                raise FetchFailed(f"truncated: {size:,} of {total:,} bytes", transient=True)

    try:
        with_retries(attempt, policy)
    except FetchFailed as failure:
        kept = f"; {part.stat().st_size:,} bytes kept in {part}, which the next run continues" if part.exists() else ""
        raise DataSourceError(f"{url}: download failed: {failure.reason}{kept}") from None
    finally:
        bar.close()
    os.replace(part, dest)
    return dest


# --- images ----------------------------------------------------------------------------------------------
def checked_image(data: bytes, name: str, image_size: int | None) -> bytes:
    """`data` if it decodes as an image (ImageLoadError naming `name` if not). With `image_size`, an image
    whose shorter side is longer is resized (Lanczos, aspect kept) so that side is `image_size` pixels, and
    re-encoded as JPEG; smaller images are never enlarged."""
    source = io.BytesIO(data)
    source.name = name  # how load_image's errors refer to it
    image = load_image(source)
    if image_size is None or min(image.size) <= image_size:
        return data
    scale = image_size / min(image.size)
    size = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def image_size_on_disk(path: Path) -> tuple[int, int]:
    """(width, height) from a file's header, without decoding it (files here were decoded before writing)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Image.UnidentifiedImageError, ValueError) as err:
        raise DataSourceError(f"{path}: unreadable ({err}); delete it and run again with --resume") from None


def write_failures(out: Path, rows: list[tuple[str, str]], header: tuple[str, str]) -> Path | None:
    """failed.tsv (`header`, then a row a failure, tabs and newlines in reasons made spaces); with no failures,
    a failed.tsv left by an earlier run is removed and None returned."""
    path = out / "failed.tsv"
    if not rows:
        path.unlink(missing_ok=True)
        return None
    lines = ["\t".join(header)] + ["\t".join(" ".join(str(cell).split()) for cell in row) for row in rows]
    write_file(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


# --- many items at once ----------------------------------------------------------------------------------
@dataclass
class PoolResult:
    """What `run_pool` did: items done, bytes they wrote, and (label, reason) for each item that failed."""

    done: int = 0
    written: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def run_pool(items: Sequence[Item], job: Callable[[Item, threading.Event], int], label: Callable[[Item], str],
             workers: int, progress: bool, desc: str = "images") -> PoolResult:
    """`job(item, stop)` for every item on at most `workers` threads (at most 2 x `workers` queued: a million
    items are not a million futures), with a progress bar of items, MB written and failures. `job` returns the
    bytes it wrote, or raises FetchFailed for an item that cannot be used (recorded under `label(item)`). Any
    other error (a failed write: DataSourceError) or a Ctrl-C sets `stop`, which jobs check, and is raised once
    the running jobs have ended; queued ones are not started."""
    from tqdm.auto import tqdm

    result = PoolResult()
    stop = threading.Event()
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    queue = iter(items)
    pending: dict[Future, Item] = {}

    def refill(pool: ThreadPoolExecutor) -> None:
        while len(pending) < 2 * workers and not stop.is_set():
            item = next(queue, _NO_MORE)
            if item is _NO_MORE:
                return
            pending[pool.submit(job, item, stop)] = item

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=desc) as pool:
            try:
                refill(pool)
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        item = pending.pop(future)
                        try:
                            result.written += future.result()
                            result.done += 1
                        except FetchFailed as failure:
                            result.failures.append((label(item), failure.reason))
                        bar.update(1)
                        bar.set_postfix_str(f"{result.written / 1e6:,.1f} MB, {len(result.failures)} failed",
                                            refresh=False)
                    refill(pool)
            except BaseException:
                stop.set()  # running jobs end at their next check; queued ones return at once
                raise
    finally:
        bar.close()
    return result


# --- the output folder -------------------------------------------------------------------------------------
@dataclass
class OutputFolder:
    """--out of a `data` command, checked before anything is written.

    `owned`: the paths (relative to the folder; glob patterns allowed) the command writes, the only ones
    --overwrite deletes.
    A folder that is absent or empty is a fresh start. One that holds this command's earlier output (its
    MARKER) continues with `resume` (same `settings` required: they change the files) or starts again with
    `overwrite`; refused with neither. A folder holding anything else is refused unless `overwrite` (which
    deletes only `owned` paths: the rest stays).
    """

    path: Path
    command: str
    settings: dict[str, Any]
    owned: tuple[str, ...]
    resume: bool = False
    overwrite: bool = False
    label: str = ""  # the command as the user typed it, in messages (default "data <command>")
    resume_does: str = "fetch only what is missing or failed"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.created = False
        self.resuming = self._check()

    def _earlier(self) -> dict[str, Any] | None:
        try:
            marker = json.loads((self.path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and marker.get("command") == self.command else None

    def _check(self) -> bool:
        """Whether this run continues an earlier one; DataSourceError when the folder may not be used."""
        out, command = self.path, f"`{self.label or 'data ' + self.command}`"
        if out.exists() and not out.is_dir():
            raise DataSourceError(f"--out {out} is a file, not a folder")
        contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if not [name for name in contents if name != DOWNLOADS]:  # nothing yet (--resume too: nothing to skip)
            return False
        earlier = self._earlier()
        if earlier is None:
            if self.overwrite:
                return False
            shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
            raise DataSourceError(f"--out {out} already holds something else ({shown}), not the output of {command}: "
                                  "choose another --out, or --overwrite to write there (it deletes only what this "
                                  f"command writes: {', '.join(self.owned)})")
        if self.overwrite:
            return False
        if not self.resume:
            raise DataSourceError(f"--out {out} already holds the output of an earlier {command}: --resume to "
                                  f"{self.resume_does}, or --overwrite to start again")
        before = earlier.get("settings", {})
        changed = [f"{key} {before.get(key)}, now {value}" for key, value in self.settings.items()
                   if before.get(key) != value]
        if changed:
            raise DataSourceError(f"{out} was written with other settings ({'; '.join(changed)}): resume with the "
                                  "same, or --overwrite to start again")
        return True

    def start(self, details: dict[str, Any]) -> None:
        """Claim the folder: --overwrite deletes the owned paths, a resume removes the temporary files a crash
        left, and the marker is written (with `details`: where the data came from)."""
        if self.overwrite:
            for target in self._owned_paths():
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        folders = {self.path} | {path.parent for path in self._owned_paths()} | {
            path for path in self._owned_paths() if path.is_dir()}
        for folder in folders:
            for leftover in folder.glob(".*.tmp"):  # atomic_write_bytes' temporary files, from a killed run
                leftover.unlink(missing_ok=True)
        write_json(self.path / MARKER, {"command": self.command, "settings": self.settings, **details,
                                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _owned_paths(self) -> list[Path]:
        """The owned paths that exist (an owned name may be a glob pattern, e.g. train-*.tar)."""
        return [path for name in self.owned for path in sorted(self.path.glob(name))]

    def prepare_downloads(self) -> Path:
        """The downloads/ folder (created, with --out itself, if need be)."""
        if not self.path.exists():
            self.created = True
        folder = self.path / DOWNLOADS
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataSourceError(f"{folder}: cannot be created ({err.strerror or err})") from None
        return folder

    def discard_if_unused(self) -> None:
        """After an error before `start`: remove the folders this run created, if nothing was kept in them."""
        if not self.created:
            return
        for folder in (self.path / DOWNLOADS, self.path):
            try:
                folder.rmdir()
            except OSError:  # not empty (a partial download to continue) or already gone
                return
