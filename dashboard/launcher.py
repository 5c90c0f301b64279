"""Train the demo run in a background process that outlives the page that started it.

The dashboard never trains inside its own script run: the Runs page starts `python -m train fit`
in a process group of its own, remembers its pid in `<runs>/.demo-train.pid`, and sends its output to
`<runs>/.demo-train.log`. Every page reload (or another browser tab) finds the same process through
that file, so a second click cannot start a second trainer. Progress is read from the run directory
itself: run.json's total_steps and the last step logged in metrics.jsonl.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blipcore.io import atomic_write_bytes
from blipcore.paths import PROJECT_ROOT
from blipcore.runs.rundir import RunDir, RunError

PID_FILE = ".demo-train.pid"
LOCK_FILE = ".demo-train.lock"
LOG_FILE = ".demo-train.log"
DEMO_NAME = "demo"
TAIL_BYTES = 16384


@dataclass
class DemoJob:
    pid: int
    command: list[str]
    started: float
    log: Path
    start_ticks: int | None = None  # the process's start time in /proc (tells a reused pid apart)


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started. Unlike its command line, it does not
    change at exec, so it identifies our child even in the instant between fork and exec."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def demo_command(root: Path) -> list[str]:
    """Train runs/demo from scratch, or resume it when an unfinished demo left resumable state."""
    run = RunDir(root / DEMO_NAME)
    # absolute: the trainer runs in PROJECT_ROOT, the runs folder is relative to the dashboard's own folder
    command = [sys.executable, "-m", "train", "fit", "--run-dir", str(run.path.absolute()), "--no-progress"]
    if (run.last_dir / "state.json").is_file() and run_status(run) != "completed":
        return command + ["--resume"]
    return command + ["--preset", "demo"] + (["--overwrite"] if run.path.exists() else [])


def run_status(run: RunDir) -> str | None:
    try:
        return str(run.read_info().get("status"))
    except RunError:
        return None


def _alive(job: DemoJob) -> bool:
    """Whether the job's process is alive (not a zombie, not a reused pid); reaps our own finished child."""
    pid = job.pid
    try:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass  # started by an earlier dashboard process: not ours to reap
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return state != "Z" and (job.start_ticks is None or _start_ticks(pid) == job.start_ticks)


def current_job(root: Path) -> DemoJob | None:
    """The background demo training recorded in the pid file, if it is still running."""
    try:
        record = json.loads((root / PID_FILE).read_text())
        job = DemoJob(int(record["pid"]), list(record["command"]), float(record["started"]), Path(record["log"]),
                      record.get("start_ticks"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return job if _alive(job) else None


def start_demo(root: Path, command: list[str] | None = None) -> DemoJob:
    """Start the demo training (or return the one already running). `command` replaces the trainer in tests.

    The check and the start happen under an exclusive lock, so two browser tabs clicking at once
    still start one trainer.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = current_job(root)
        if running is not None:
            return running
        command = command or demo_command(root)
        log = root / LOG_FILE
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        job = DemoJob(process.pid, command, time.time(), log, _start_ticks(process.pid))
        record = {"pid": job.pid, "command": command, "started": job.started, "log": str(log),
                  "start_ticks": job.start_ticks}
        atomic_write_bytes(root / PID_FILE, json.dumps(record).encode())
        return job


def stop_demo(job: DemoJob) -> None:
    """SIGTERM: the trainer finishes its step, saves resumable state and exits (resume continues it)."""
    try:
        os.killpg(job.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _tail(path: Path) -> bytes:
    """The last TAIL_BYTES of a file (b"" when it cannot be read): polling never reads a whole log."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            return f.read()
    except OSError:
        return b""


def last_logged_step(run: RunDir) -> int:
    """The step of the last complete line of metrics.jsonl (0 before the first one)."""
    for line in reversed(_tail(run.metrics_file).split(b"\n")):
        try:
            return int(json.loads(line.decode("utf-8"))["step"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue  # a partial last line, a first line cut by the seek
    return 0


def progress(run: RunDir) -> tuple[int, int | None]:
    """(steps done, total steps or None while run.json is not written yet)."""
    try:
        total = run.read_info().get("total_steps")
    except RunError:
        total = None
    return last_logged_step(run), int(total) if total else None


def log_tail(root: Path, lines: int = 25) -> str:
    """The last lines of the background training's output (what to show when it failed)."""
    text = _tail(root / LOG_FILE).decode("utf-8", errors="replace")
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])
