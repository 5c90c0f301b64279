"""A dataset folder this project writes: its marker file, the error for a source or folder that cannot be used,
and the atomic writes of its files.

Shared by what reads data (a shard stream that runs dry, a derived dataset) and by the offline preparation in
`blipcore.data.prep`, which imports it from here: the reading side never imports the preparation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import FileError, atomic_write_bytes

MARKER = "bliplab-data.json"  # in every folder a `data` command writes: which command, with which settings


class DataSourceError(ValueError):
    """A dataset source or output folder that cannot be used (a failed download, an archive that is not what
    it should be, an --out that holds something else, a full disk); the message says what to do next."""


def write_file(path: Path, data: bytes) -> None:
    """atomic_write_bytes, with a failed write (disk full, read-only folder) as a DataSourceError that says
    how to go on."""
    try:
        atomic_write_bytes(path, data)
    except FileError as err:
        cause = err.__cause__
        why = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(err)
        raise DataSourceError(f"{path}: cannot be written ({why}); stopped. Every file written before it is "
                              "complete and kept: free some space (or fix the folder), then run the same command "
                              "with --resume") from None


def write_json(path: Path, value: Any) -> None:
    write_file(path, json.dumps(value, ensure_ascii=False).encode("utf-8"))
