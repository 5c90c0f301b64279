"""Embeddings: images and their captions in one 2-D layout (UMAP or PCA) at a chosen epoch, each image
joined to its caption, with layouts aligned across epochs so the slider shows how the space organises.
Click a point (or pick a pair) to see its image, caption and the captions nearest to it."""

from __future__ import annotations

import numpy as np
import streamlit as st

from blipcore.runs.rundir import RunDir, RunError
from dashboard import common, figures, projections

PLOT_KEY = "embedding_plot"
PAIR_KEY = "embedding_pair"


@st.cache_data(show_spinner=False, max_entries=128)
def _layout(path: str, epoch: int, method: str, mtime: float) -> np.ndarray:
    """projections.layout (disk cache) behind a memory cache keyed by the embeddings file's mtime."""
    return projections.layout(RunDir(path), epoch, method)


def layout(run: RunDir, epoch: int, method: str) -> np.ndarray:
    return _layout(str(run.path), epoch, method, run.embeddings_path(epoch).stat().st_mtime_ns / 1e9)


@st.cache_data(show_spinner=False, max_entries=16)
def thumbnails(paths: tuple[str, ...], size: int = 80) -> list[str | None]:
    """The evaluation images as small data: URIs for the chart's hover (None where a file is unreadable)."""
    return [figures.thumbnail_uri(image) if (image := figures.load_thumbnail(path, size)) is not None else None
            for path in paths]


def umap_button(run: RunDir, missing: list[int]) -> None:
    """Compute (and cache on disk) the UMAP layouts of the epochs that lack one, with a progress bar."""
    label = f"Compute UMAP for all epochs ({len(missing)} to go: ~15 s once, then 5-15 s each)"
    if not st.button(label, type="primary"):
        return
    bar = st.progress(0.0, text="Loading UMAP (numba compiles on first use)…")
    for done, epoch in enumerate(missing):
        try:
            projections.layout(run, epoch, "umap")
        except RunError as err:
            st.warning(f"Epoch {epoch}: {err}")
        bar.progress((done + 1) / len(missing), text=f"UMAP of epoch {epoch} done ({done + 1}/{len(missing)})")
    st.session_state[f"projection_{run.name}"] = "UMAP"  # once cached, UMAP is the view
    st.rerun()


def inspector(data: dict, pair: int, epoch: int) -> None:
    """The selected pair's image and caption, and which captions the image is closest to at this epoch."""
    thumbnail = figures.load_thumbnail(str(data["file_paths"][pair]))
    if thumbnail is not None:
        st.image(thumbnail, caption=f"image {pair}")
    else:
        st.caption(f"image file not found: `{data['file_paths'][pair]}`")
    st.markdown(f"**caption:** “{data['captions'][pair]}”")
    sims = figures.similarity_matrix(data["image_embeds"], data["text_embeds"])[pair]
    st.markdown(f"**nearest captions at epoch {epoch}** (cosine):")
    for j in np.argsort(-sims)[:3]:
        mark = " ✓" if j == pair else ""
        st.markdown(f"- {sims[j]:.3f} · {data['captions'][j]}{mark}")


st.set_page_config(page_title="Embeddings · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("Embeddings")
run = common.select_run()
epochs = run.embedding_epochs()
if not epochs:
    common.stop_with(f"`{run.name}` has no embeddings yet.", "They are written with each epoch's evaluation "
                     "(runs whose model has no ITC loss have none).")
umap_done = projections.cached_epochs(run, "umap")
missing = [e for e in epochs if e not in umap_done]
if missing:
    umap_button(run, missing)
st.session_state.setdefault(f"projection_{run.name}", "PCA" if missing else "UMAP")  # UMAP once it is cached
method_label = st.sidebar.radio(
    "Projection", ["UMAP", "PCA"], key=f"projection_{run.name}", horizontal=True,
    help="UMAP shows neighbourhoods (computed on request, then cached next to the run); PCA is instant and linear.")
method = "umap" if method_label == "UMAP" else "pca"
epoch = common.select_epoch(run, epochs)
links = st.sidebar.toggle("Link each image to its caption", value=True)
align = st.sidebar.toggle("Align epochs (Procrustes)", value=True,
                          help="Rotate/reflect/scale each epoch's layout onto the last epoch's, so the slider "
                               "compares like with like. Off: each epoch exactly as its own fit left it.")
if method == "umap" and epoch in missing:
    common.stop_with(f"No UMAP layout of epoch {epoch} yet.", "Press the button above (or choose PCA).")

data = common.guarded(common.load_embeddings, run, epoch, what=f"the embeddings of epoch {epoch}")
coords = common.guarded(layout, run, epoch, method, what=f"the {method_label} layout of epoch {epoch}")
if data is None or coords is None:
    st.stop()
available = [e for e in epochs if method == "pca" or e in umap_done]
reference = available[-1]
if align and reference != epoch:
    ref_data = common.guarded(common.load_embeddings, run, reference, what=f"the embeddings of epoch {reference}")
    if ref_data is not None and np.array_equal(ref_data["image_ids"], data["image_ids"]):
        coords = projections.procrustes_align(coords, layout(run, reference, method))
    else:
        st.caption(f"Not aligned: epoch {reference} embedded other images than epoch {epoch}.")
image_xy, text_xy = projections.split_layout(coords)
n = len(image_xy)

clicked = figures.picked_pair(st.session_state.get(PLOT_KEY))
if clicked is not None and clicked != st.session_state.get("embedding_last_click") and clicked < n:
    st.session_state[PAIR_KEY] = clicked  # a click selects the pair; the box below can still change it
    st.session_state["embedding_last_click"] = clicked
if st.session_state.get(PAIR_KEY, 0) >= n:
    st.session_state[PAIR_KEY] = 0

plot_col, side = st.columns([3, 1], gap="large")
with side:
    pair = st.selectbox("Pair", range(n), key=PAIR_KEY,
                        format_func=lambda i: f"{i}: {figures.shorten(str(data['captions'][i]), 40)}",
                        help="Or click a point in the plot")
    inspector(data, pair, epoch)
with plot_col:
    chart = figures.embedding_chart(image_xy, text_xy, list(data["captions"]),
                                    [str(p).rsplit("/", 1)[-1] for p in data["file_paths"]],
                                    thumbnails(tuple(str(p) for p in data["file_paths"])), links=links, selected=pair)
    st.altair_chart(chart, key=PLOT_KEY, on_select="rerun", selection_mode=figures.PICK_PARAM, width="content")
    st.caption(
        f"{method_label} of {n} images (circles) and their first captions (diamonds), epoch {epoch}"
        + (f", aligned to epoch {reference}" if align and reference != epoch else "")
        + ". Hover a point for its caption and image, click it to pick its pair; scroll to zoom, drag to pan. "
        "Short links = image and caption embedded close together. Two separate clouds are the usual "
        "'modality gap' of contrastive models; what matters is whether matching pairs are nearer each other "
        "than to the rest."
    )
