"""The trainer lock: one trainer writes a run folder at a time (RunDir.lock_for_training)."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .files import RunError, now


class TrainerLock:
    """The lock a trainer holds on its run folder while it trains (see RunDir.lock_for_training).

    fcntl record locks (lockf) belong to a process: they are not inherited by fork (DataLoader workers)
    and vanish when the process ends. Within one process they do not exclude each other, so the paths
    this process holds are also kept in `_held`."""

    _held: set[Path] = set()

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: Path) -> TrainerLock:
        key = path.resolve()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunError(
                f"{path.parent}: cannot write the run folder ({err.strerror or err}); fix permissions or free space"
            ) from None
        try:
            if key in cls._held:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunError(
                f"{path.parent} is being trained right now by another trainer "
                f"({holder or 'a process that is starting'}); "
                "wait for it to finish, or stop it (Ctrl-C or kill -TERM saves resumable state), then --resume"
            ) from None
        cls._held.add(key)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {now()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        return cls(key, fd)

    @classmethod
    def is_held(cls, path: Path) -> bool:
        """Whether some process holds the lock at `path` now (False when there is no lock file, or it cannot
        be opened for the test, e.g. in a read-only folder)."""
        if path.resolve() in cls._held:
            return True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the lock just taken
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the fcntl lock
            self._fd = None
            self._held.discard(self.path)
