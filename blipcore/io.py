"""Files written safely, and their hashes: the one place the project writes a file that a reader may be reading.

Every file is replaced atomically: written to a temporary name in the same folder, flushed, fsynced, then renamed
over the old one (and the folder fsynced), so a reader (the dashboard, a resuming trainer) sees the old file or the
new one, never half of one, and a crash loses at most the file being written. The data layer and the run directory
both write through here; neither knows the other. `is_number` checks the numbers read back from such files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# What atomic_write_bytes leaves behind when its process is killed mid-write: ".<name>.<8 random chars>.tmp"
STALE_TEMPORARY_PATTERN = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


class FileError(Exception):
    """A file that cannot be written or read; the message names it and says what to do."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: Path, error: type[FileError] = FileError) -> Iterator[None]:
    """Turn an OSError while writing `path` (disk full, read-only or missing folder) into `error`, a FileError
    (the run directory's own: RunError) that names the file and says how to go on."""
    try:
        yield
    except OSError as err:
        raise error(
            f"{path}: cannot be written ({err.strerror or err}); the files written before it are intact. "
            "Free disk space or fix the folder's permissions, then resume the run"
        ) from err


def atomic_write_bytes(path: str | Path, data: bytes, error: type[FileError] = FileError) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never half of one.
    A failed write raises `error` (a FileError; the run directory's: RunError) and leaves the old file as it was."""
    path = Path(path)
    with writing(path, error):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, value: Any, error: type[FileError] = FileError) -> None:
    """`value` as indented JSON with sorted keys (see `jsonable`), written as atomic_write_bytes writes."""
    atomic_write_bytes(path, (json.dumps(jsonable(value), indent=2, sort_keys=True) + "\n").encode(), error)


def jsonable(value: Any) -> Any:
    """Tensors, numpy scalars and non-finite floats made JSON-safe (NaN/inf become null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_number(value: Any) -> bool:
    """A finite real number (not a bool): what a metric value or a logged step read from a file must be to be
    used."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mtime_of(path: Path) -> float:
    """`path`'s modification time in seconds (0 when it cannot be read): part of a cache key, so that a cached
    reading of a file is dropped when the file changes."""
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return 0.0
