"""Figures and tables of the model pages (Attention, Decoding lab, Caption, Compare).

Plain functions of numbers and arrays: no Streamlit, no model. The pages call them with what
`blipcore.evaluation.explain` / `blipcore.evaluation.decoding` / the run directory produced, and tests call them with
hand-made data.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from blipcore.evaluation.explain import TokenAttention, overlay_heatmap
from blipcore.evaluation.metrics import COLLAPSE_METRIC_DOCS, metrics_in

LOOP_COLOUR = "#d62728"
# Collapse metrics drawn as bars: the numeric ones of the registry's "collapse" group, in declaration order.
COLLAPSE_BARS = tuple(m.key for m in metrics_in("collapse") if m.fmt != "s")
# Captioning scores first, then collapse metrics: the columns of a per-strategy table.
CAPTION_SCORES = tuple(m.key for m in metrics_in("captioning") if m.fmt != "s")


# --- images ----------------------------------------------------------------------------------------
def upscale(image: np.ndarray | Image.Image, size: int = 256) -> np.ndarray:
    """An image enlarged (or shrunk) so that its longer side is `size` pixels: 32x32 model inputs
    would otherwise be blurred by the browser, and heat maps look blocky on them."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    scale = size / max(pil.size)
    target = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    resized = pil.resize(target, Image.Resampling.BICUBIC)
    return np.asarray(resized.convert("RGB"))


def token_overlays(
    image: np.ndarray, attention: TokenAttention, layer: int | None = None, head: int | None = None, alpha: float = 0.5
) -> list[np.ndarray]:
    """One overlay per generated token: where the decoder looked when it chose that word."""
    return [
        overlay_heatmap(image, attention.token_map(step, layer, head), alpha=alpha)
        for step in range(len(attention.tokens))
    ]


def word_labels(tokens: Sequence[str]) -> list[str]:
    """Labels for picking a generated word, unique even when the caption repeats itself ("a", ..., "a (2)"):
    Streamlit's pills and selectboxes tell options apart by their label, so a repeated word would make
    the widget highlight the wrong one (and a collapsed caption repeats words by definition)."""
    seen: dict[str, int] = {}
    labels = []
    for token in tokens:
        seen[token] = seen.get(token, 0) + 1
        labels.append(token if seen[token] == 1 else f"{token} ({seen[token]})")
    return labels


def tile_maps(maps: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, h, w) maps laid out as one (rows*(h+gap)-gap, cols*(w+gap)-gap) mosaic, NaN in the
    gaps: a grid of panels drawn as a single heat map (one plotly trace instead of rows*cols subplots,
    which is what makes a big grid slow to draw in the browser)."""
    rows, cols, height, width = maps.shape
    mosaic = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap), np.nan)
    for r in range(rows):
        for c in range(cols):
            top, left = r * (height + gap), c * (width + gap)
            mosaic[top:top + height, left:left + width] = maps[r, c]
    return mosaic


def attention_grid_figure(maps: np.ndarray, shared_scale: bool = True, title: str | None = None) -> go.Figure:
    """A layers x heads grid of small heat maps, e.g. the [CLS] query's attention over the patches
    (`cls_attention_maps`: (layers, heads, grid, grid)), drawn as one tiled heat map; hover names the
    layer, head and patch of each cell.

    shared_scale: one colour scale for every panel, so a head that looks everywhere reads as flat;
    otherwise each panel is divided by its own maximum to show its shape.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 4:
        raise ValueError(f"expected maps of shape (layers, heads, grid, grid), got {maps.shape}")
    layers, heads, height, width = maps.shape
    if not shared_scale:
        peaks = maps.max(axis=(2, 3), keepdims=True)
        maps = np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)
    # (layer, head, patch row, patch column) of every mosaic cell, for the hover text
    index = np.stack(np.meshgrid(np.arange(layers), np.arange(heads), np.arange(height), np.arange(width),
                                 indexing="ij"), axis=-1).astype(np.float64)
    customdata = np.stack([tile_maps(index[..., k]) for k in range(4)], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=tile_maps(maps), customdata=customdata, coloraxis="coloraxis", hoverongaps=False,
        hovertemplate="layer %{customdata[0]}, head %{customdata[1]}<br>patch row %{customdata[2]}, "
        "column %{customdata[3]}: %{z:.3f}<extra></extra>",
    ))
    # Panel labels: heads along the top, layers down the right, centred on their panels.
    for head in range(heads):
        fig.add_annotation(x=head * (width + 1) + (width - 1) / 2, y=1.0, yref="paper", yanchor="bottom",
                           text=f"head {head}", showarrow=False)
    for layer in range(layers):
        fig.add_annotation(x=1.0, xref="paper", xanchor="left", y=layer * (height + 1) + (height - 1) / 2,
                           text=f"layer {layer}", textangle=90, showarrow=False)
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    panel = min(180, 900 // heads)  # about square panels in a wide page
    fig.update_layout(
        title=title, coloraxis={"colorscale": "Viridis", "colorbar": {"title": "weight" if shared_scale else "÷ max"}},
        height=60 + panel * layers, margin={"l": 10, "r": 40, "t": 60 if title else 30, "b": 10},
        plot_bgcolor="white",
    )
    return fig


# --- per-step decoding evidence --------------------------------------------------------------------
def loop_start(tokens: Sequence[Hashable]) -> int | None:
    """Index of the first token that repeats an earlier token of the same caption (the point where a
    collapsing decoder starts to loop), or None when every token is new."""
    seen: set[Hashable] = set()
    for index, token in enumerate(tokens):
        if token in seen:
            return index
        seen.add(token)
    return None


@dataclass(frozen=True)
class StepSeries:
    """One decoded caption, step by step: the token labels (a final "[SEP]" when it ended by itself),
    the log-probability of each chosen token, the entropy at each step, and where its loop starts."""

    labels: Sequence[str]
    logprobs: Sequence[float]
    entropies: Sequence[float]
    loop_at: int | None

    def __post_init__(self) -> None:
        if not len(self.logprobs) == len(self.entropies) == len(self.labels):
            raise ValueError(f"{len(self.labels)} labels, {len(self.logprobs)} log-probabilities, "
                             f"{len(self.entropies)} entropies")


PROB_COLOUR, ENTROPY_COLOUR = "#1f77b4", "#F2A541"


def step_figure(series: Mapping[str, StepSeries], columns: int = 2) -> go.Figure:
    """One panel per caption (e.g. per decoding strategy), all in one figure: the probability of the
    chosen token (exp log p, left axis) and the entropy of the decoder's distribution (right axis) at
    each step, tokens on the x axis. The first token that repeats an earlier one — where a collapsing
    decoder's loop starts — is shaded and its probability point red.

    One figure with a panel per caption draws several times faster in the browser than a figure per
    caption. The x axes are numeric with the tokens as tick labels: a category axis would merge the
    repeated tokens of a collapsed caption ("a a a") into one.
    """
    if not series:
        raise ValueError("no caption to draw")
    names = list(series)
    cols = max(1, min(columns, len(names)))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, specs=[[{"secondary_y": True}] * cols] * rows,
                        horizontal_spacing=0.12, vertical_spacing=min(0.3, 150 / (330 * rows)))
    for index, name in enumerate(names):
        data, row, col = series[name], index // cols + 1, index % cols + 1
        steps = list(range(len(data.labels)))
        probs = np.exp(np.asarray(data.logprobs, dtype=np.float64))
        colours = [LOOP_COLOUR if step == data.loop_at else PROB_COLOUR for step in steps]
        for values, label, colour, fmt, secondary in (
            (probs, "p(token)", PROB_COLOUR, ".3f", False),
            (np.asarray(data.entropies, dtype=np.float64), "entropy (nats)", ENTROPY_COLOUR, ".2f", True),
        ):
            fig.add_trace(go.Scatter(
                x=steps, y=values, mode="lines+markers", name=label, legendgroup=label, showlegend=index == 0,
                marker={"color": colours if not secondary else colour, "size": 7 if not secondary else 5},
                line={"color": colour, "dash": "dot" if secondary else "solid"}, customdata=list(data.labels),
                hovertemplate=f"step %{{x}} '%{{customdata}}': %{{y:{fmt}}}<extra>{name}: {label}</extra>",
            ), row=row, col=col, secondary_y=secondary)
        fig.update_yaxes(title_text="p(token)", range=[0, 1.05], row=row, col=col, secondary_y=False)
        fig.update_yaxes(title_text="entropy", rangemode="tozero", showgrid=False, row=row, col=col, secondary_y=True)
        fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=list(data.labels), tickangle=-45, row=row, col=col)
        if data.loop_at is not None:
            fig.add_vrect(x0=data.loop_at - 0.5, x1=data.loop_at + 0.5, fillcolor=LOOP_COLOUR, opacity=0.15,
                          line_width=0, row=row, col=col)
            fig.add_annotation(x=data.loop_at, y=1.05, text=f"first repeat: '{data.labels[data.loop_at]}'",
                               showarrow=False, yanchor="bottom", font={"color": LOOP_COLOUR, "size": 11},
                               row=row, col=col)
    fig.update_layout(
        height=330 * rows, margin={"l": 10, "r": 10, "t": 60, "b": 10}, hovermode="closest",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1 + 40 / (330 * rows), "x": 0},
    )
    return fig


# --- strategy metrics ------------------------------------------------------------------------------
def strategy_metrics_frame(metrics: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """{strategy: {metric: value}} -> one row per strategy; captioning scores (when present), then
    the collapse metrics in COLLAPSE_METRIC_DOCS order, then anything else."""
    frame = pd.DataFrame.from_dict({name: dict(values) for name, values in metrics.items()}, orient="index")
    order = [c for c in (*CAPTION_SCORES, *COLLAPSE_METRIC_DOCS) if c in frame.columns]
    rest = [c for c in frame.columns if c not in order and c != "notes"]
    frame = frame[order + rest]
    frame.index.name = "strategy"
    return frame


def checkpoint_metrics_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Checkpoint sidecar metrics ({run, epoch, metric: value} rows) as one table indexed by run and epoch:
    validation losses, then retrieval in reading order (image→text R@1, R@5, R@10, text→image, rsum),
    then the per-strategy captioning columns."""
    table = pd.DataFrame(list(rows)).set_index(["run", "epoch"])
    retrieval = [m.key for m in metrics_in("retrieval")]  # i2t R@1/5/10, t2i R@1/5/10, rsum
    first = sorted(c for c in table.columns if c.startswith("val_")) + [c for c in retrieval if c in table.columns]
    return table[first + sorted(c for c in table.columns if c not in first)]


def drop_empty_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The frame without its all-null columns, and their names (to say they were not computed)."""
    empty = [c for c in frame.columns if frame[c].isna().all()]
    return frame.drop(columns=empty), empty


def collapse_bar_figure(metrics: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """One small bar chart per numeric collapse metric, a bar per strategy."""
    shown = [m for m in COLLAPSE_BARS if any(isinstance(v.get(m), (int, float)) for v in metrics.values())]
    if not shown:
        raise ValueError("no numeric collapse metric to draw")
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=shown, vertical_spacing=0.14, horizontal_spacing=0.07)
    names = list(metrics)
    formats = {m.key: m.fmt for m in metrics_in("collapse")}  # Python format specs that d3-format reads alike
    for i, metric in enumerate(shown):
        values = [metrics[n].get(metric) for n in names]
        fig.add_trace(
            go.Bar(
                x=names, y=[v if isinstance(v, (int, float)) else None for v in values], name=metric,
                marker={"color": [f"hsl({round(360 * k / max(1, len(names)))}, 55%, 50%)" for k in range(len(names))]},
                hovertemplate=f"%{{x}}: %{{y:{formats[metric]}}}<extra>{COLLAPSE_METRIC_DOCS[metric]}</extra>",
            ),
            row=i // cols + 1, col=i % cols + 1,
        )
    fig.update_layout(showlegend=False, height=230 * rows, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


# --- embedding movement between epochs -------------------------------------------------------------
def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(axis=1)


def embedding_drift(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-item cosine distance between two epochs' embeddings of the evaluation set (embeddings/
    epoch_NNN.npz), items matched by image id: {"image": (n,), "text": (n,)} (text = first caption)."""
    ids_a, ids_b = np.asarray(before["image_ids"]), np.asarray(after["image_ids"])
    common, index_a, index_b = np.intersect1d(ids_a, ids_b, return_indices=True)
    if len(common) == 0:
        raise ValueError("the two epochs' embeddings share no image id")
    return {
        kind: _cosine_distance(np.asarray(before[key])[index_a], np.asarray(after[key])[index_b])
        for kind, key in (("image", "image_embeds"), ("text", "text_embeds"))
    }


def drift_figure(rows: pd.DataFrame) -> go.Figure:
    """Mean cosine distance moved between consecutive epochs; rows: run, step (e.g. "1→2"), kind, mean."""
    fig = go.Figure()
    for (run, kind), part in rows.groupby(["run", "kind"], sort=False):
        fig.add_trace(go.Scatter(
            x=part["step"], y=part["mean"], mode="lines+markers", name=f"{run} · {kind}",
            line={"dash": "solid" if kind == "image" else "dot"},
            hovertemplate="%{x}: %{y:.4f}<extra>%{fullData.name}</extra>",
        ))
    fig.update_layout(
        xaxis_title="epochs", yaxis_title="mean cosine distance", height=320, legend={"orientation": "h", "y": -0.25},
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
    )
    return fig


def drift_histogram(distances: Mapping[str, np.ndarray], title: str | None = None) -> go.Figure:
    """Per-item distribution of the cosine distance moved, one overlaid histogram per kind."""
    fig = go.Figure([go.Histogram(x=values, name=kind, opacity=0.6, nbinsx=30) for kind, values in distances.items()])
    fig.update_layout(
        barmode="overlay", title=title, xaxis_title="cosine distance", yaxis_title="items", height=300,
        margin={"l": 10, "r": 10, "t": 40 if title else 20, "b": 10},
    )
    return fig
