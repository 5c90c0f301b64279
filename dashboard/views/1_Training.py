"""Training: loss terms, optimiser state and per-epoch validation metrics of one or several runs,
overlaid, with TensorBoard-style smoothing; refreshes itself while a run is still training."""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd
import streamlit as st

from blipcore.evaluation.metrics import REFERENCE_ROWS, metrics_in
from blipcore.runs.rundir import RunDir
from dashboard import common, figures, launcher
from dashboard.figures import Line, Panel

REFRESH_S = 5.0
SECTION_KEY = "training_section"  # session-state key of the open tab

# Every panel comes from the metric registry (blipcore.evaluation.metrics): its groups, keys and labels.
LOSS_PANELS = tuple(
    Panel(m.label, (Line(m.key, "train"), Line(f"val_{m.key}", "validation", smooth=False, dash="dot")))
    for m in metrics_in("loss")
)
OPTIMISER_PANELS = tuple(Panel(m.label, (Line(m.key, m.label),)) for m in metrics_in("optimisation"))
RETRIEVAL_PANELS = tuple(
    Panel(f"{direction} retrieval R@K (%)", tuple(Line(m.key, f"R@{k}", smooth=False, dash=figures.DASHES[i])
                                                 for i, (k, m) in enumerate(by_k.items())))
    for direction, by_k in figures.recall_metrics().items()
) + (Panel("match ROC AUC (0.5 = chance)", tuple(Line(m.key, m.label.removesuffix(" match AUC"), smooth=False,
                                                      dash=figures.DASHES[i])
                                                 for i, m in enumerate(metrics_in("matching")))),)
# The captioning and collapse metrics that val lines hold per decoding strategy (`<strategy>_<key>`) and that
# have a better direction (the mean length has none): one panel each.
CAPTION_METRICS = tuple(m for group in ("captioning", "collapse") for m in metrics_in(group)
                        if m.summary and m.better is not None)


def caption_panels(frames: dict[str, pd.DataFrame]) -> tuple[Panel, ...]:
    """One panel per captioning metric, one dash per decoding strategy found in the val lines, and the
    reference rows (most frequent caption, nearest neighbour) as grey yardsticks: a strategy drawn below
    them has learned less than "nothing" or than retrieval."""
    pattern = re.compile(r"^(.+)_(" + "|".join(m.key for m in CAPTION_METRICS) + r")$")
    found = {m.group(1) for f in frames.values() for c in f.columns if (m := pattern.match(c))}
    strategies = sorted(found - set(REFERENCE_ROWS))
    references = [row for row in REFERENCE_ROWS if row in found]
    dashes = figures.DASHES
    return tuple(
        Panel(metric.label, (
            *(Line(f"{s}_{metric.key}", s, smooth=False, dash=dashes[i % len(dashes)])
              for i, s in enumerate(strategies)),
            *(Line(f"{row}_{metric.key}", row, smooth=False, dash=dashes[(i + 1) % len(dashes)], reference=True)
              for i, row in enumerate(references)),
        ))
        for metric in CAPTION_METRICS
    )


def run_header(runs: list[RunDir]) -> None:
    """Status of each run; a progress bar for those still training."""
    summaries = {s.name: s for s in common.run_summaries()}
    for run in runs:
        summary = summaries.get(run.name)
        if summary is None:
            continue
        if summary.status == "running":
            done, total = launcher.progress(run)
            st.progress(min(1.0, done / total) if total else 0.0,
                        text=f"`{run.name}` is training: step {done}" + (f" of {total}" if total else ""))
        elif summary.status == "failed":
            st.error(f"`{run.name}` failed: {summary.error}")


def charts(runs: list[RunDir], x: str, smoothing: float) -> None:
    run_header(runs)
    frames = {run.name: figures.metrics_frame(common.load_metrics(run)) for run in runs}
    frames = {name: frame for name, frame in frames.items() if not frame.empty}
    if not frames:
        st.info("No metrics logged yet: the trainer writes a line every `train.log_every` steps. "
                "This page refreshes while the run is training.")
        return
    sections = (
        ("Losses", LOSS_PANELS, "Solid: training (EMA-smoothed, raw curve faint behind); dotted markers: validation "
         "at the end of each epoch. A validation curve rising while training falls is overfitting."),
        ("Optimisation", OPTIMISER_PANELS, "Temperature τ is learned: it sharpens the ITC softmax as alignment "
         "improves. Gradient-norm spikes often come just before a loss blow-up."),
        ("Retrieval", RETRIEVAL_PANELS, "Validation, per epoch: can the ITC embeddings find an image's caption "
         "among all captions of the evaluation set (and back)? Chance R@1 is 100/N %. Match AUC: can ITC's "
         "similarity and ITM's match score tell an image's own caption from another image's (CapFilt's filter "
         "task)? 0.5 is chance."),
        ("Captioning and collapse", caption_panels(frames), "Validation, per epoch, one dash per decoding "
         "strategy. Collapse: repetition rate and the most-common-caption share go up, distinct-1 goes down."),
    )
    def grid(panels: tuple[Panel, ...], note: str) -> Callable[[], None]:
        def draw() -> None:
            st.caption(note)
            st.plotly_chart(figures.metric_grid(frames, panels, x=x, smoothing=smoothing), width="stretch")
        return draw

    # Lazy tabs: the page draws one grid, not four.
    common.lazy_tabs({title: grid(panels, note) for title, panels, note in sections
                      if figures.panels_with_data(frames, panels, x)}, key=SECTION_KEY)


st.set_page_config(page_title="Training · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("Training")
runs = common.select_runs()
if not runs:
    common.stop_with("Pick at least one run in the sidebar.")
x_axis = st.sidebar.radio("x-axis", ["step", "epoch"], horizontal=True)
smoothing = st.sidebar.slider("Smoothing (EMA weight)", 0.0, 0.99, 0.6, 0.01,
                              help="As in TensorBoard: 0 shows the raw logged points")
running = any(s.status == "running" for s in common.run_summaries() if s.name in {r.name for r in runs})
st.fragment(charts, run_every=REFRESH_S if running else None)(runs, x_axis, smoothing)
