"""The errors of a run folder and the readers every module of blipcore.runs shares: a JSON object read with an
error naming the file, the lines of a metrics file, and the timestamp written into run files."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import FileError


class RunError(FileError):
    """A run directory is missing, unreadable, from another format version, cannot be written, or would be
    overwritten."""


class CheckpointError(RunError):
    """A checkpoint is missing, truncated, corrupted, or made for another model configuration."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, raising RunError that names the file and the problem."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: {what} is missing") from None
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a 5,000-digit number, [[[[...]]]] nesting
        raise RunError(f"{path}: {what} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    except OSError as err:
        raise RunError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: {what} should be a JSON object, found {type(value).__name__}")
    return value


def iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON-object lines of a metrics file; a missing file has none, an unreadable one is a RunError."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return
    except OSError as err:
        raise RunError(f"{path}: cannot read the metrics ({err.strerror or err})") from None
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            continue  # a partial last line of a run still being written, or a damaged line
        if isinstance(record, dict):
            yield record


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
