"""BLIP Lab dashboard: `streamlit run dashboard/app.py [-- --runs-dir DIR]`.

This script registers the pages (Runs, the training-dynamics pages 0-3 (Diagnosis first), the inference pages
4-7, the Study page 8 and the CapFilt page 9, found in views/) and renders the home page, Runs: every run in the
runs folder with its status, health (its diagnosis's worst finding, blipcore.evaluation.diagnosis), progress and best
metrics, the choice of runs the other pages open, and — with no runs yet — a button that trains the demo run in
a background process (dashboard/launcher.py) while this page shows its progress.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from blipcore.evaluation.diagnosis import Diagnosis, diagnose_run
from blipcore.evaluation.metrics import GROUPS, Metric, metric
from blipcore.runs.rundir import RunDir, RunError
from dashboard import common, figures, launcher
from dashboard import diagnosis_figures as df

# Not "pages/": Streamlit treats a folder of that name beside the main script as a v1 multipage app until
# st.navigation has run once, so a fresh server's first request for a page URL would run that page alone,
# with a plain list of file names for navigation.
PAGES_DIR = Path(__file__).parent / "views"
STATUS_COLOURS = {"running": "#17A398", "completed": "#2E6BE6", "interrupted": "#B7791F", "failed": "#C0392B",
                  "unreadable": "#C0392B"}
STALLED_AFTER_S = 600
POLL_S = 2.0


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _note(summary: common.RunSummary, run: RunDir) -> str:
    """What to know about a run at a glance: why it failed or cannot be read, how to resume, a stall."""
    if summary.error:
        return summary.error
    if summary.status == "interrupted":
        return f"resume: python -m train fit --run-dir {run.path} --resume"
    if summary.status != "running":
        return ""
    if run.trainer_running() is False:  # run.json says running, but no process holds the run's lock
        return f"its trainer is gone (killed?): resume: python -m train fit --run-dir {run.path} --resume"
    age = _age(run.metrics_file)
    if age is not None and age > STALLED_AFTER_S:
        return f"no new metrics for {age / 60:.0f} min: the trainer may be stuck"
    return ""


@st.cache_data(show_spinner=False, max_entries=256)
def _diagnosis(path: str, stamp: tuple[int, int, int]) -> Diagnosis:
    return diagnose_run(RunDir(path))


def run_diagnosis(summary: common.RunSummary) -> Diagnosis | None:
    """A readable run's diagnosis (cached until the trainer writes to it); None for an unreadable run."""
    if not summary.readable:
        return None
    run = RunDir(summary.path)
    try:
        return _diagnosis(summary.path, df.run_stamp(run))
    except RunError as err:
        return Diagnosis(summary.name, "run", summary.path, summary.status, 0, error=str(err))


def best_columns(summaries: list[common.RunSummary]) -> dict[str, Metric]:
    """The headline metrics (the registry's `headline` flag: validation loss, R@1 both ways, CIDEr per
    decoding strategy) that some run has a best value of, by group and then name."""
    found = {key: declared for s in summaries for key in s.best
             if (declared := metric(key)) is not None and declared.headline}
    return {key: found[key] for key in sorted(found, key=lambda k: (GROUPS.index(found[k].group), k))}


def runs_table(summaries: list[common.RunSummary]) -> pd.DataFrame:
    """One row per run: status, health (the worst finding of its diagnosis, or "healthy"), preset, checkpoints,
    progress, best metrics, last update, note, and its findings in one line."""
    best_keys = list(best_columns(summaries))
    rows = []
    for summary in summaries:
        run = RunDir(summary.path)
        done = launcher.last_logged_step(run) if summary.status == "running" else summary.steps_done
        total = summary.total_steps
        age = _age(run.metrics_file if run.metrics_file.exists() else run.run_json)
        row = {
            "run": summary.name,
            "status": summary.status,
            **df.health_cells(run_diagnosis(summary)),
            "preset": summary.preset,
            "epochs": len(summary.epochs),
            "progress": done / total if total else None,
            "steps": f"{done} / {total}" if total else str(done or ""),
        }
        for key in best_keys:
            best = summary.best.get(key)
            row[key] = best.get("value") if isinstance(best, dict) else None
        row["updated"] = datetime.fromtimestamp(time.time() - age) if age is not None else None
        row["note"] = _note(summary, run)
        row["diagnosis"] = row.pop("diagnosis")  # the findings line last: it is the longest
        rows.append(row)
    return pd.DataFrame(rows)


def show_runs_table(summaries: list[common.RunSummary]) -> None:
    table = runs_table(summaries)
    best = best_columns(summaries)
    metric_columns = {
        key: st.column_config.NumberColumn(key, help=f"{m.label}: the best over the epochs ({m.better} is better)")
        for key, m in best.items()
    }
    styled = table.style.map(lambda v: f"color: {STATUS_COLOURS.get(v, 'inherit')}; font-weight: 600",
                             subset=["status"])
    styled = styled.map(df.health_colour, subset=["health"])
    styled = styled.format({key: m.format for key, m in best.items()}, na_rep="")
    st.dataframe(
        styled, hide_index=True, width="stretch", placeholder="–",
        column_config={
            "status": st.column_config.TextColumn("status", width=95),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "epochs": st.column_config.NumberColumn("epochs", help="epochs with a checkpoint"),
            "updated": st.column_config.DatetimeColumn("updated", format="distance"),
            "note": st.column_config.TextColumn("note", width="large"),
            "health": st.column_config.TextColumn(
                "health", width=80, help="The worst finding of the run's diagnosis (info < warning < error), or "
                "healthy; the Diagnosis page shows each finding's evidence and remedy"),
            "diagnosis": st.column_config.TextColumn("diagnosis", width="large",
                                                     help="Every finding: name, severity, when it started"),
            **metric_columns,
        },
    )
    for summary in summaries:
        if summary.status == "failed":
            st.error(f"**{summary.name}** failed: {summary.error or 'no error recorded'}")
        elif not summary.readable:
            st.warning(f"**{summary.name}** cannot be read: {summary.error}")


# --- the demo launcher -------------------------------------------------------------------------
def demo_offer(root: Path, summaries: list[common.RunSummary]) -> str | None:
    """The button label for training the demo: with no runs, or to resume an unfinished demo run."""
    if not summaries:
        return "Train the demo run (about 5 minutes on 2 CPU cores)"
    demo = next((s for s in summaries if s.name == launcher.DEMO_NAME), None)
    if demo is not None and demo.status in ("interrupted", "failed"):
        return "Resume the demo run in the background" if "--resume" in launcher.demo_command(root) else \
            "Train the demo run again in the background"
    return None


def demo_panel(root: Path, offer: str | None) -> None:
    """Start / watch / stop the background demo training; refreshes itself every 2 s while it runs."""
    job = launcher.current_job(root)

    @st.fragment(run_every=POLL_S if job else None)
    def panel() -> None:
        current = launcher.current_job(root)
        if current is None and job is not None:  # it finished since the last refresh: redraw the whole page
            st.rerun()
        if current is not None:
            done, total = launcher.progress(RunDir(root / launcher.DEMO_NAME))
            elapsed = time.time() - current.started
            label = f"Training `{launcher.DEMO_NAME}` in the background (pid {current.pid}): step {done}" + (
                f" of {total}" if total else " (loading data…)") + f", {elapsed / 60:.1f} min"
            st.progress(min(1.0, done / total) if total else 0.0, text=label)
            left, right = st.columns([1, 4])
            if left.button("Stop training", help="Saves resumable state; resume it later from here"):
                launcher.stop_demo(current)
            right.caption("Epoch checkpoints appear in the table as they are written; the other pages can "
                          "open the run after its first epoch.")
            show_log(root, expanded=False)
            return
        outcome = last_outcome(root)
        if outcome is not None:
            kind, message = outcome
            getattr(st, kind)(message)
            show_log(root, expanded=kind == "error")  # a failure shows its log's tail at once
        if offer and st.button(offer, type="primary"):
            launcher.start_demo(root)
            st.rerun()

    panel()


def show_log(root: Path, expanded: bool) -> None:
    with st.expander("Training log", expanded=expanded):
        st.code(launcher.log_tail(root) or "(no output yet)", language=None)


def last_outcome(root: Path) -> tuple[str, str] | None:
    """(message kind, text) when the last background demo training ended without completing."""
    if not (root / launcher.LOG_FILE).is_file():
        return None
    status = launcher.run_status(RunDir(root / launcher.DEMO_NAME))
    if status in ("completed", "running"):
        return None
    if status == "interrupted":
        return "info", "The demo training was stopped; it resumes where it stopped."
    return "error", f"The demo training failed (run status: {status or 'no run.json written'}). The end of its log:"


# --- choosing runs -----------------------------------------------------------------------------
def choose_runs(summaries: list[common.RunSummary]) -> None:
    """Set session_state selected_run / selected_runs, which every page's run picker starts from."""
    names = [s.name for s in summaries if s.readable]
    if not names:
        return
    default = [n for n in st.session_state.get("selected_runs", []) if n in names] or names[:1]
    chosen = st.multiselect("Open runs", names, default=default,
                            help="The first is the run single-run pages open; the Training page overlays all.")
    st.session_state["selected_runs"] = chosen
    if chosen:
        st.session_state["selected_run"] = chosen[0]
    cols = st.columns(4)
    for col, page in zip(cols, ("0_Diagnosis.py", "1_Training.py", "2_Alignment.py", "3_Embeddings.py"), strict=True):
        if (PAGES_DIR / page).is_file():
            col.page_link(str(PAGES_DIR / page), label=f"Open {page[2:-3]} →")


def latest_captions(run: RunDir, count: int = 6) -> None:
    """The newest evaluation's captions of a few images: whether the decoder says something or has
    collapsed into one frequent phrase is visible at a glance."""
    epochs = run.eval_epochs()
    result = common.guarded(common.load_eval, run, epochs[-1], what="the latest evaluation") if epochs else None
    strategies = (result or {}).get("strategies") or {}
    if not strategies:
        return
    name = "greedy" if "greedy" in strategies else next(iter(strategies))
    entry = strategies[name]
    samples = entry.get("samples", [])[:count]
    if not samples:
        return
    metrics = entry.get("metrics", {})

    def shown(key: str) -> str:
        declared = metric(key)
        return f"{declared.label} {declared.format(metrics.get(key))}"

    st.subheader(f"Latest captions: `{run.name}`, epoch {epochs[-1]}, {name} decoding")
    st.caption(f"{shown('cider')} · {shown('top_caption_share')} · {shown('repetition_rate')} — the Caption and "
               "Decoding pages go further.")
    for col, sample in zip(st.columns(len(samples)), samples, strict=True):
        thumbnail = figures.load_thumbnail(sample.get("file_path", ""), 128)
        if thumbnail is not None:
            col.image(thumbnail)
        col.markdown(f"**{sample.get('caption') or '(empty caption)'}**")
        references = sample.get("references") or []
        if references:
            col.caption(f"reference: {references[0]}")


def home() -> None:
    root = common.runs_dir()
    st.title("BLIP Lab")
    st.caption(f"Runs in `{root.resolve()}` — why small vision-language models trained from scratch succeed or fail.")
    summaries = common.run_summaries(root)
    offer = demo_offer(root, summaries)
    if not summaries:
        st.info(
            f"**No runs in `{root}` yet.** Train the demo run with the button below (it runs in the background; "
            "this page follows its progress), or from a terminal: `make demo` or "
            "`python -m train fit --preset demo --run-dir runs/demo`. To look at runs elsewhere: "
            "`streamlit run dashboard/app.py -- --runs-dir DIR`."
        )
    demo_panel(root, offer)
    if not summaries:
        return
    running = any(s.status == "running" for s in summaries)

    @st.fragment(run_every=POLL_S if running else None)
    def table() -> None:
        current = common.run_summaries(root)
        show_runs_table(current)
        if running and not any(s.status == "running" for s in current):
            st.rerun()  # the last run finished: redraw the page once, which also stops this polling

    table()
    choose_runs(summaries)
    selected = next((s for s in summaries if s.name == st.session_state.get("selected_run") and s.readable), None)
    if selected is not None:
        latest_captions(RunDir(selected.path))


def _page_order(path: Path) -> int:
    match = re.match(r"(\d+)_", path.name)
    return int(match.group(1)) if match else 10**6


def navigation() -> None:
    """Runs first, then pages 0-3 (diagnosis and training dynamics), 4-7 (inference) and 8+ (studies) from views/."""
    files = sorted(PAGES_DIR.glob("[0-9]*_*.py"), key=_page_order)
    sections = {
        "": [st.Page(home, title="Runs", icon=":material/folder_open:", default=True)],
        "Training dynamics": [st.Page(str(p)) for p in files if _page_order(p) <= 3],
        "Inference": [st.Page(str(p)) for p in files if 3 < _page_order(p) <= 7],
        "Studies": [st.Page(str(p)) for p in files if _page_order(p) > 7],
    }
    st.navigation({name: pages for name, pages in sections.items() if pages}).run()


st.set_page_config(page_title="BLIP Lab", layout="wide")
navigation()
