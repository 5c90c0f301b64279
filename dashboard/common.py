"""What every dashboard page shares: the runs folder, run and epoch selection, cached loading of run
artifacts and models, and errors shown as messages that say what to do (never a traceback).

Loading goes through Streamlit caches keyed by the file's modification time, so a page re-reads a
file only when the trainer has replaced it; models are cached as resources (one per checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from blipcore.io import mtime_of
from blipcore.paths import DEFAULT_RUNS_DIR
from blipcore.runs.rundir import STUDY_TABLE, CheckpointError, RunDir, RunError, is_study, list_runs, read_json

MAX_UPLOAD_PIXELS = 40_000_000  # refuse uploads above this many pixels with a message


def runs_dir() -> Path:
    """`streamlit run dashboard/app.py -- --runs-dir DIR`, else $BLIPLAB_RUNS_DIR, else runs/."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir")
    known, _ = parser.parse_known_args(sys.argv[1:])
    return Path(known.runs_dir or os.environ.get("BLIPLAB_RUNS_DIR") or DEFAULT_RUNS_DIR).expanduser()


# --- run summaries -----------------------------------------------------------------------------
@dataclass
class RunSummary:
    name: str
    path: str
    status: str
    preset: str
    epochs: list[int]
    steps_done: int
    total_steps: int | None
    best: dict[str, Any]
    error: str | None  # why the run cannot be read, or the error it failed with
    readable: bool


@st.cache_data(show_spinner=False, max_entries=256)
def _summary(path: str, mtime: float, checkpoints_mtime: float) -> RunSummary:
    run = RunDir(path)
    try:
        info = run.read_info()
    except RunError as err:
        return RunSummary(run.name, path, "unreadable", "?", [], 0, None, {}, str(err), False)
    return RunSummary(
        run.name, path, str(info.get("status", "?")), str(info.get("preset", "?")), run.epochs(),
        int(info.get("steps_done") or 0), info.get("total_steps"), info.get("best") or {}, info.get("error"), True,
    )


def run_summaries(root: Path | None = None) -> list[RunSummary]:
    """Every run under the runs folder; unreadable ones are listed with the reason, not dropped."""
    root = root or runs_dir()
    return [_summary(str(r.path), mtime_of(r.run_json), mtime_of(r.checkpoints_dir)) for r in list_runs(root)]


# --- run artifacts (cached by file modification time) ------------------------------------------
@st.cache_data(show_spinner=False, max_entries=64)
def _metrics(path: str, mtime: float) -> list[dict[str, Any]]:
    return RunDir(path).read_metrics()


def load_metrics(run: RunDir) -> list[dict[str, Any]]:
    """metrics.jsonl lines (a partial last line of a run still training is skipped)."""
    return _metrics(str(run.path), mtime_of(run.metrics_file))


@st.cache_data(show_spinner=False, max_entries=64)
def _eval(path: str, epoch: int, split: str, mtime: float) -> dict[str, Any]:
    return RunDir(path).load_eval(epoch, split)


def load_eval(run: RunDir, epoch: int, split: str = "val") -> dict[str, Any]:
    """An evaluation (eval/epoch_NNN.json, or eval/epoch_NNN.<split>.json for another split), cached."""
    return _eval(str(run.path), epoch, split, mtime_of(run.eval_path(epoch, split)))


@st.cache_data(show_spinner=False, max_entries=64)
def _embeddings(path: str, epoch: int, mtime: float) -> dict[str, Any]:
    return RunDir(path).load_embeddings(epoch)


def load_embeddings(run: RunDir, epoch: int) -> dict[str, Any]:
    return _embeddings(str(run.path), epoch, mtime_of(run.embeddings_path(epoch)))


@st.cache_resource(show_spinner="Loading checkpoint…", max_entries=8)
def _model(path: str, epoch: int, mtime: float):
    model, cfg, ckpt = RunDir(path).load_model(epoch, device="cpu")
    return model, cfg, ckpt


def load_model(run: RunDir, epoch: int):
    """(BLIP in eval mode, BlipConfig, Checkpoint) of an epoch, verified against its sha256, cached."""
    weights, _ = run.checkpoint_paths(epoch)
    return _model(str(run.path), epoch, mtime_of(weights))


@st.cache_data(show_spinner=False, max_entries=256)
def _info(path: str, mtime: float) -> dict[str, Any]:
    return RunDir(path).read_info()


def load_info(run: RunDir) -> dict[str, Any]:
    """run.json (status, config, ...), cached."""
    return _info(str(run.path), mtime_of(run.run_json))


# --- studies -----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=32)
def _study_table(path: str, mtime: float) -> dict[str, Any]:
    return read_json(Path(path) / STUDY_TABLE, "the study table")


def load_study_table(folder: Path) -> dict[str, Any]:
    """A study folder's study.json ({"name", "preset", "seeds", "rows"}), cached."""
    return _study_table(str(folder), mtime_of(folder / STUDY_TABLE))


def study_folders(root: Path | None = None) -> list[Path]:
    """The study folders of the runs folder (those holding a study.json), by name; symlinks not followed."""
    root = root or runs_dir()
    if not root.is_dir():
        return []
    return [f for f in sorted(root.iterdir()) if f.is_dir() and not f.is_symlink() and is_study(f)]


def select_study(key: str = "study", label: str = "Study") -> Path:
    """Sidebar study picker (the choice persists as `selected_study` and shows in the URL as `?study=`)."""
    studies = study_folders()
    if not studies:
        stop_with(f"No study in `{runs_dir()}` yet.",
                  "Run a plan: `python -m train study PLAN.toml --out runs/study-NAME` (docs/studies.md); "
                  "its folder appears here as soon as the study starts.")
    names = [f.name for f in studies]
    return studies[names.index(pick_one(label, names, key, "study"))]


# --- selection widgets -------------------------------------------------------------------------
def stop_with(message: str, hint: str | None = None, kind: str = "info") -> None:
    """Show a message that says what to do, then stop this page's script run."""
    getattr(st, kind)(message + (f"\n\n{hint}" if hint else ""))
    st.stop()


def readable_runs() -> list[RunSummary]:
    summaries = run_summaries()
    if not summaries:
        stop_with(
            f"No runs in `{runs_dir()}` yet.",
            "Train the demo from the **Runs** page (button), or run `make demo` / "
            "`python -m train fit --preset demo --run-dir runs/demo`, or point the dashboard elsewhere with "
            "`streamlit run dashboard/app.py -- --runs-dir DIR`.",
        )
    return [s for s in summaries if s.readable]


def pick_one(label: str, names: list[str], key: str, url_key: str) -> str:
    """A sidebar selectbox over `names` whose choice is kept in session state (`selected_<url_key>`, so the
    next page opens on it) and in the page's URL (`?<url_key>=NAME`: a bookmark or a shared link opens on it).

    The widget's own value wins while it lives (the user just chose); on a page's first run the URL's name
    comes first, then the name carried from the last page, then the first name. A name that is not (or no
    longer) in `names` is passed over."""
    widget_key = f"{key}_select"
    carried = st.session_state.get(f"selected_{url_key}")
    requested = None if widget_key in st.session_state else st.query_params.get(url_key)
    current = requested if requested in names else carried
    index = names.index(current) if current in names else 0
    name = st.sidebar.selectbox(label, names, index=index, key=widget_key)
    if name not in names:  # a widget value left over from a run that has since disappeared
        name = names[index]
    st.session_state[f"selected_{url_key}"] = name
    st.query_params[url_key] = name
    return name


def select_run(key: str = "run", label: str = "Run", require_epochs: bool = True) -> RunDir:
    """Sidebar run picker shared across pages (the choice persists as `selected_run` and shows in the URL as
    `?run=`, so a page's address names its run)."""
    runs = [s for s in readable_runs() if s.epochs or not require_epochs]
    if not runs:
        stop_with("No run has a checkpoint yet.", "Checkpoints are written at the end of each epoch; wait for the "
                  "first epoch to finish (the Training page shows progress).")
    names = [s.name for s in runs]
    return RunDir(runs[names.index(pick_one(label, names, key, "run"))].path)


def select_runs(key: str = "runs", label: str = "Runs") -> list[RunDir]:
    """Sidebar multi-run picker (several runs overlaid or compared). It opens on the runs carried from the last
    page, else on the page URL's `?run=` (a link to this page; the single-run pages then open on it too), else on
    the first run."""
    runs = readable_runs()
    names = [s.name for s in runs]
    default = [n for n in st.session_state.get("selected_runs", []) if n in names]
    if not default and (linked := st.query_params.get("run")) in names:
        default = [linked]
        st.session_state.setdefault("selected_run", linked)
    chosen = st.sidebar.multiselect(label, names, default=default or names[:1], key=f"{key}_multiselect")
    st.session_state["selected_runs"] = chosen
    return [RunDir(runs[names.index(n)].path) for n in chosen]


def select_epoch(run: RunDir, available: list[int] | None = None, key: str = "epoch", label: str = "Epoch") -> int:
    """Epoch slider/select over the epochs that have the artifact the page needs."""
    epochs = available if available is not None else run.epochs()
    if not epochs:
        stop_with(f"`{run.name}` has no epoch with this data yet.", "It is written at the end of each epoch.")
    if len(epochs) == 1:
        st.sidebar.caption(f"{label}: {epochs[0]} (the only one so far)")
        return epochs[0]
    return st.sidebar.select_slider(label, options=epochs, value=epochs[-1], key=f"{key}_{run.name}")


def lazy_tabs(sections: Mapping[str, Callable[[], None]], key: str) -> None:
    """Tabs whose content runs only while open: switching tabs reruns the script (or fragment) and
    only the chosen section is computed, built and sent, so a page's first render draws one section
    instead of all of them. The open tab's label is kept in st.session_state[key]."""
    tabs = st.tabs(list(sections), key=key, on_change="rerun")
    for tab, section in zip(tabs, sections.values(), strict=True):
        if tab.open:
            with tab:
                section()


def guarded(fn, *args: Any, what: str = "this", **kwargs: Any) -> Any:
    """Call fn, turning run/checkpoint errors into a message (the rest of the page still renders)."""
    try:
        return fn(*args, **kwargs)
    except (RunError, CheckpointError, OSError, ValueError) as err:
        st.warning(f"Cannot show {what}: {err}")
        return None
