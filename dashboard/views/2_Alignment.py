"""Alignment: the ITC similarity matrix of the fixed evaluation pairs at one epoch, how matching and
non-matching similarities separate across epochs, retrieval R@K and the learned temperature."""

from __future__ import annotations

import numpy as np
import streamlit as st

from blipcore.runs.rundir import RunDir
from dashboard import common, figures
from dashboard.figures import Line, Panel

DEFAULT_PAIRS = 32  # 32x32 cells draw fast; the slider goes up to every evaluation pair
CLICKABLE_PAIRS = 64  # above this many pairs the heatmap's click layer (N² invisible markers) is left out
HEATMAP_KEY, ROW_KEY, COL_KEY = "alignment_heatmap", "alignment_row", "alignment_col"
CLICKABLE_KEY = "alignment_clickable"
SECTION_KEY = "alignment_section"  # session-state key of the open tab


def show_pair(col, data: dict, index: int, role: str) -> None:
    """An evaluation image with its first caption, in a column."""
    thumbnail = figures.load_thumbnail(str(data["file_paths"][index]))
    if thumbnail is None:
        col.caption(f"{role} {index}: image file not found (`{data['file_paths'][index]}`)")
    else:
        col.image(thumbnail, caption=f"{role} {index}")
    col.markdown(f"“{data['captions'][index]}”")


def pick_cell(n: int) -> None:
    """Row/column inputs follow a click on a heatmap cell; both stay inside the N shown."""
    clicked = figures.clicked_customdata(st.session_state.get(HEATMAP_KEY))
    if clicked is not None and clicked != st.session_state.get("alignment_last_click"):
        st.session_state["alignment_last_click"] = clicked
        st.session_state[ROW_KEY], st.session_state[COL_KEY] = int(clicked[0]), int(clicked[1])
    st.session_state.setdefault(ROW_KEY, 0)
    st.session_state.setdefault(COL_KEY, min(1, n - 1))
    for key in (ROW_KEY, COL_KEY):
        st.session_state[key] = min(int(st.session_state[key]), n - 1)


def matrix_section(data: dict) -> None:
    total = len(data["image_embeds"])
    left, right = st.columns([3, 2], gap="large")
    with right:
        n = st.slider("Pairs shown (N)", 2, total, min(DEFAULT_PAIRS, total), help="The first N evaluation pairs; "
                      "the statistics above always use all of them") if total > 2 else total
        value = st.radio("Cell value", ["cosine similarity", "softmax over captions (ITC's view)"], horizontal=True,
                         help="softmax(sim / τ) along each row: the probability ITC gives image i's caption")
        clickable = st.toggle("Pick a cell by clicking it", key=CLICKABLE_KEY, disabled=n > CLICKABLE_PAIRS,
                              help="Lays an invisible marker on every cell for the click to land on: it makes the "
                              f"matrix slower to draw, and is offered up to {CLICKABLE_PAIRS} pairs.") \
            and n <= CLICKABLE_PAIRS
        pick_cell(n)
        row_col = st.columns(2)
        row = int(row_col[0].number_input("Image i (row)", 0, n - 1, key=ROW_KEY))
        col = int(row_col[1].number_input("Caption j (column)", 0, n - 1, key=COL_KEY))
    sim = figures.similarity_matrix(data["image_embeds"], data["text_embeds"], n)
    temperature = float(data["temperature"])
    shown, label = sim, "cosine"
    if value.startswith("softmax") and np.isfinite(temperature):
        shown, label = figures.row_softmax(sim, temperature), "p(caption | image)"
    with left:
        st.plotly_chart(figures.similarity_heatmap(shown, list(data["captions"]), (row, col), label,
                                                   clickable=clickable),
                        key=HEATMAP_KEY, on_select="rerun", selection_mode="points", width="stretch")
        st.caption("Click a cell to show its image and caption." if clickable else
                   "Hover a cell for both captions; pick one with the inputs on the right, or switch on clicking.")
    with right:
        rank = int((sim[row] > sim[row, row]).sum()) + 1
        st.markdown(f"**sim(image {row}, caption {col}) = {sim[row, col]:.3f}** · image {row}'s own caption ranks "
                    f"**#{rank}** of {n} in its row")
        pair = st.columns(2)
        show_pair(pair[0], data, row, "image")
        show_pair(pair[1], data, col, "caption of image")


def sections(run: RunDir, epochs: list[int], data: dict) -> None:
    """Lazy tabs: the page's first render draws one chart, not five."""
    common.lazy_tabs({
        "Similarity matrix": lambda: matrix_section(data),
        "Matching vs non-matching": lambda: separation_section(run, epochs, data),
        "Retrieval R@K": lambda: retrieval_section(run, len(data["image_embeds"])),
        "Temperature τ": lambda: temperature_section(run),
    }, key=SECTION_KEY)


def separation_section(run: RunDir, epochs: list[int], data: dict) -> None:
    stats, kept = [], []
    for e in epochs:
        loaded = common.guarded(common.load_embeddings, run, e, what=f"the embeddings of epoch {e}")
        if loaded is not None:
            stats.append(figures.pair_stats(figures.similarity_matrix(loaded["image_embeds"], loaded["text_embeds"])))
            kept.append(e)
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader("Across epochs")
        st.plotly_chart(figures.similarity_bands(kept, stats), width="stretch")
    with right:
        st.subheader("At this epoch")
        st.plotly_chart(figures.similarity_histogram(
            figures.similarity_matrix(data["image_embeds"], data["text_embeds"])), width="stretch")
    st.caption("Mean and 10–90 % band of the matching (diagonal) and non-matching similarities over every "
               "evaluation pair: alignment emerges when the two separate.")


def retrieval_section(run: RunDir, n: int) -> None:
    eval_epochs = run.eval_epochs()
    results = [common.guarded(common.load_eval, run, e, what=f"the evaluation of epoch {e}") for e in eval_epochs]
    pairs = [(e, r["retrieval"]) for e, r in zip(eval_epochs, results, strict=True) if r and r.get("retrieval")]
    if not pairs:
        st.info("No retrieval results yet (eval/epoch_NNN.json is written at the end of each epoch).")
        return
    st.plotly_chart(figures.retrieval_figure([p[0] for p in pairs], [p[1] for p in pairs]), width="stretch")
    st.caption(f"Chance level with {n} images: text→image R@1 ≈ {100 / n:.1f} %, R@10 ≈ {min(100, 1000 / n):.0f} %.")


def temperature_section(run: RunDir) -> None:
    frame = figures.metrics_frame(common.load_metrics(run))
    panel = (Panel("learned ITC temperature", (Line("temperature", "τ"),)),)
    if not figures.panels_with_data({run.name: frame}, panel, "step"):
        st.info("No temperature logged (this run has no ITC loss).")
        return
    st.plotly_chart(figures.metric_grid({run.name: frame}, panel, x="step"), width="stretch")
    st.caption("Lower τ = sharper softmax over captions. It is clamped to the configured range.")


st.set_page_config(page_title="Alignment · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("Alignment")
st.caption("A good matrix has a **bright diagonal**: each image is most similar to its own caption and dim against "
           "the others. Uniform colour means no alignment; a bright column means one caption matches every image.")
run = common.select_run()
epochs = run.embedding_epochs()
if not epochs:
    common.stop_with(f"`{run.name}` has no embeddings yet.", "They are written with each epoch's evaluation "
                     "(runs whose model has no ITC loss have none).")
epoch = common.select_epoch(run, epochs)
data = common.guarded(common.load_embeddings, run, epoch, what=f"the embeddings of epoch {epoch}")
if data is None:
    st.stop()
stats = figures.pair_stats(figures.similarity_matrix(data["image_embeds"], data["text_embeds"]))
cols = st.columns(4)
cols[0].metric("matching pairs: mean cosine", f"{stats['diag_mean']:.3f}")
cols[1].metric("non-matching: mean cosine", f"{stats.get('off_mean', float('nan')):.3f}")
cols[2].metric("gap", f"{stats['diag_mean'] - stats.get('off_mean', 0.0):.3f}", help="Alignment emerges as this grows")
cols[3].metric("temperature τ", f"{float(data['temperature']):.4f}")
sections(run, epochs, data)
