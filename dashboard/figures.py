"""Every dashboard figure, built by a plain function of data (numbers, numpy arrays, pandas frames in;
a plotly Figure out; an Altair chart for the embedding map, whose tooltips can show images). Nothing here
imports Streamlit, so tests build the same figures the pages show.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from blipcore.evaluation.metrics import RECALL_KS, Metric, metrics_in
from blipcore.paths import project_path

RUN_COLOURS = ("#2E6BE6", "#E4572E", "#17A398", "#8E44AD", "#F2A541", "#5D6D7E", "#C0392B", "#27AE60")
MODALITY_COLOURS = {"image": "#E4572E", "text": "#2E6BE6"}
REFERENCE_COLOUR = "#7f7f7f"  # the reference rows' yardsticks, whatever run they belong to
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
TEMPLATE = "plotly_white"
PANEL_HEIGHT = 240  # pixels of one subplot
PANEL_GAP = 80  # pixels between subplot rows: room for the x-axis title and the next row's title
MARGIN = dict(l=10, r=10, t=70, b=10)


def run_colour(index: int) -> str:
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def _finish(fig: go.Figure, height: int, **layout: Any) -> go.Figure:
    """The house style: white template, tight margins, a horizontal legend above the plot (clear of
    subplot titles: its offset is in pixels, converted to the paper fraction of this height)."""
    area = max(1, height - MARGIN["t"] - MARGIN["b"])
    fig.update_layout({
        "template": TEMPLATE, "height": height, "margin": MARGIN, "hovermode": "closest",
        "legend": dict(orientation="h", yanchor="bottom", y=1 + 28 / area, xanchor="left", x=0), **layout,
    })
    return fig


# --- training curves ---------------------------------------------------------------------------
def ema(values: Iterable[float | None], weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average (weight 0 = raw values).

    Missing or non-finite points stay NaN and do not move the average, so a curve with gaps
    (an ITM-less run, a logged None) is smoothed over the points it has.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last, count = [], 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(math.nan)
            continue
        last = last * weight + (1.0 - weight) * value
        count += 1
        out.append(last / (1.0 - weight**count))
    return np.asarray(out, dtype=float)


@dataclass(frozen=True)
class Line:
    """One metric drawn in a panel. `smooth`: a dense training series (EMA with a faint raw line behind);
    otherwise a sparse per-epoch series drawn with markers."""

    key: str
    label: str
    smooth: bool = True
    dash: str = "solid"
    reference: bool = False  # a yardstick (a reference row): thin, grey, steps between evaluations


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[Line, ...]


def metrics_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """metrics.jsonl records as a frame; None becomes NaN, train and val lines share it (split column)."""
    frame = pd.DataFrame.from_records(list(records))
    if frame.empty:
        return frame
    numeric = [c for c in frame.columns if c != "split"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    return frame.sort_values("step", kind="stable") if "step" in frame else frame


def _series(frame: pd.DataFrame, x: str, key: str) -> pd.DataFrame:
    if key not in frame or x not in frame:
        return frame.iloc[0:0]
    return frame[[x, key]].dropna()


def panels_with_data(frames: Mapping[str, pd.DataFrame], panels: Sequence[Panel], x: str) -> list[Panel]:
    """The panels (and lines) that at least one run has a number for; the rest would be empty boxes."""
    kept = []
    for panel in panels:
        lines = tuple(line for line in panel.lines if any(len(_series(f, x, line.key)) for f in frames.values()))
        if lines:
            kept.append(Panel(panel.title, lines))
    return kept


def metric_grid(
    frames: Mapping[str, pd.DataFrame], panels: Sequence[Panel], x: str = "step", smoothing: float = 0.0,
    columns: int = 2,
) -> go.Figure:
    """A grid of panels, one colour per run, one dash per line of a panel (runs overlaid)."""
    panels = panels_with_data(frames, panels, x)
    cols = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    height = PANEL_HEIGHT * rows + PANEL_GAP * (rows - 1) + MARGIN["t"] + MARGIN["b"]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.title for p in panels], horizontal_spacing=0.08,
                        vertical_spacing=PANEL_GAP / (height - MARGIN["t"] - MARGIN["b"]) if rows > 1 else 0.0)
    shown: set[str] = set()
    for index, panel in enumerate(panels):
        row, col = index // cols + 1, index % cols + 1
        for run_index, (run, frame) in enumerate(frames.items()):
            colour = run_colour(run_index)
            for line in panel.lines:
                data = _series(frame, x, line.key)
                if data.empty:
                    continue
                name = run if len(panel.lines) == 1 else f"{run} · {line.label}"
                legend = name not in shown
                shown.add(name)
                shared = dict(x=data[x].to_numpy(), legendgroup=name, name=name, hovertemplate=f"{run}<br>{line.label}"
                              f"<br>{x} %{{x}}<br>%{{y:.4g}}<extra></extra>")
                raw = data[line.key].to_numpy()
                smoothed = line.smooth and smoothing > 0
                if smoothed:  # the raw curve stays visible behind the smoothed one, as in TensorBoard
                    fig.add_trace(go.Scatter(y=raw, mode="lines", opacity=0.25, showlegend=False,
                                             line=dict(color=colour, width=1, dash=line.dash), **shared), row, col)
                if line.reference:
                    fig.add_trace(go.Scatter(y=raw, mode="lines", showlegend=legend, line_shape="hv", opacity=0.7,
                                             line=dict(color=REFERENCE_COLOUR, width=1.5, dash=line.dash), **shared),
                                  row, col)
                    continue
                fig.add_trace(go.Scatter(
                    y=ema(raw, smoothing) if smoothed else raw, mode="lines" if line.smooth else "lines+markers",
                    showlegend=legend, line=dict(color=colour, width=2, dash=line.dash), marker=dict(size=6), **shared,
                ), row, col)
        fig.update_xaxes(title_text=x, row=row, col=col, title_font_size=11)
    return _finish(fig, height)


# --- Alignment ---------------------------------------------------------------------------------
def similarity_matrix(image_embeds: np.ndarray, text_embeds: np.ndarray, n: int | None = None) -> np.ndarray:
    """The ITC similarity of the first n pairs: row i = image i, column j = caption of image j."""
    n = len(image_embeds) if n is None else n
    return np.asarray(image_embeds[:n], dtype=np.float64) @ np.asarray(text_embeds[:n], dtype=np.float64).T


def row_softmax(sim: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(sim / τ) over each row: the image-to-text probabilities the ITC loss trains."""
    logits = sim / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def similarity_heatmap(
    sim: np.ndarray, captions: Sequence[str], selected: tuple[int, int] | None = None, value_label: str = "cosine",
    clickable: bool = False,
) -> go.Figure:
    """Heatmap of sim (rows: images, columns: their captions); hover names both captions and the value.

    Axis categories are "index: caption", so hover shows the captions without an N×N text array.
    Plotly heatmaps emit no selection events, so `clickable` lays an invisible marker on every cell
    (customdata = [row, column]) that Streamlit's point selection reports; it costs O(N²) labels,
    so callers enable it for small N only.
    """
    n = sim.shape[0]
    labels = np.array([f"{i}: {shorten(str(c), 60)}" for i, c in enumerate(captions[:n])])
    hover = "image %{y}<br>caption %{x}<br>" + value_label + " %{z:.3f}<extra></extra>"
    fig = go.Figure(go.Heatmap(z=sim, x=labels, y=labels, colorscale="Viridis", hovertemplate=hover,
                               colorbar=dict(title=value_label, thickness=12), hoverinfo="skip" if clickable else None))
    if clickable:
        rows, cols = np.divmod(np.arange(n * n), n)
        fig.add_trace(go.Scatter(
            x=labels[cols], y=labels[rows], mode="markers", showlegend=False, name="cells",
            customdata=np.column_stack([rows, cols, sim.ravel()]),
            hovertemplate=hover.replace("%{z", "%{customdata[2]"),
            marker=dict(symbol="square", size=max(4, 400 // max(n, 1)), opacity=0),
        ))
    if selected is not None:
        row, col = selected
        fig.add_trace(go.Scatter(x=[labels[col]], y=[labels[row]], mode="markers", hoverinfo="skip", showlegend=False,
                                 name="selected", marker=dict(symbol="square-open", size=14, color="#FF3B30",
                                                              line=dict(width=3))))
    fig.update_xaxes(showticklabels=False, showgrid=False, title_text="caption j (of image j)", constrain="domain")
    fig.update_yaxes(showticklabels=False, showgrid=False, title_text="image i", autorange="reversed",
                     scaleanchor="x", constrain="domain")
    return _finish(fig, 540)


def clicked_customdata(event: Mapping[str, Any] | None) -> list | None:
    """The customdata of the first clicked point carrying one, from a Streamlit plotly selection event
    (customdata arrives as a list, a scalar, or a dict keyed "0", "1", …)."""
    for point in ((event or {}).get("selection") or {}).get("points") or []:
        value = point.get("customdata")
        if isinstance(value, dict):
            value = [value[k] for k in sorted(value, key=int)]
        if value is not None:
            return value if isinstance(value, list) else [value]
    return None


def pair_stats(sim: np.ndarray) -> dict[str, float]:
    """Mean and 10th/90th percentiles of the matching (diagonal) and non-matching (off-diagonal) similarities."""
    n = sim.shape[0]
    diagonal = np.diag(sim)
    off = sim[~np.eye(n, dtype=bool)]
    stats = {}
    for name, values in (("diag", diagonal), ("off", off)):
        if values.size:
            stats.update({f"{name}_mean": float(values.mean()), f"{name}_p10": float(np.percentile(values, 10)),
                          f"{name}_p90": float(np.percentile(values, 90))})
    return stats


def similarity_bands(epochs: Sequence[int], stats: Sequence[Mapping[str, float]]) -> go.Figure:
    """Matching vs non-matching similarity per epoch: a line of means in a 10–90 % band each.
    Alignment emerges when the two bands separate."""
    fig = go.Figure()
    groups = (("diag", "matching pairs (diagonal)", "#17A398"), ("off", "non-matching (off-diagonal)", "#5D6D7E"))
    for name, label, colour in groups:
        if not all(f"{name}_mean" in s for s in stats):
            continue
        x = list(epochs)
        upper, lower = [s[f"{name}_p90"] for s in stats], [s[f"{name}_p10"] for s in stats]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], mode="lines", fill="toself", fillcolor=colour,
                                 opacity=0.18, line=dict(width=0), hoverinfo="skip", showlegend=False,
                                 legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=[s[f"{name}_mean"] for s in stats], mode="lines+markers", name=label,
                                 legendgroup=name, line=dict(color=colour, width=2),
                                 hovertemplate="epoch %{x}<br>mean %{y:.3f}<extra>" + label + "</extra>"))
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(title_text="cosine similarity")
    return _finish(fig, 330)


def similarity_histogram(sim: np.ndarray) -> go.Figure:
    """Densities of the diagonal and off-diagonal similarities at one epoch (overlap = no alignment)."""
    n = sim.shape[0]
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=sim[~np.eye(n, dtype=bool)], name="non-matching", histnorm="probability density",
                               marker_color="#5D6D7E", opacity=0.6, nbinsx=40))
    fig.add_trace(go.Histogram(x=np.diag(sim), name="matching", histnorm="probability density",
                               marker_color="#17A398", opacity=0.7, nbinsx=40))
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="cosine similarity")
    fig.update_yaxes(title_text="density")
    return _finish(fig, 330)


def recall_metrics() -> dict[str, dict[int, Metric]]:
    """The registry's R@K metrics by retrieval direction: {"image→text": {1: <i2t_r1>, 5: ..., 10: ...},
    "text→image": {...}}, directions and K in declaration order."""
    directions: dict[str, dict[int, Metric]] = {}
    for declared in metrics_in("retrieval"):
        for k in RECALL_KS:
            if declared.key.endswith(f"_r{k}") and declared.label.endswith(f" R@{k}"):
                directions.setdefault(declared.label.removesuffix(f" R@{k}"), {})[k] = declared
    return directions


def retrieval_figure(epochs: Sequence[int], retrieval: Sequence[Mapping[str, float]]) -> go.Figure:
    """R@1/5/10 per epoch, image→text solid and text→image dashed (percent)."""
    fig = go.Figure()
    directions = recall_metrics()
    for k_index, k in enumerate(RECALL_KS):
        colour = run_colour(k_index)
        for dash, by_k in zip(DASHES, directions.values(), strict=False):
            key = by_k[k].key
            points = [(e, r[key]) for e, r in zip(epochs, retrieval, strict=True) if r.get(key) is not None]
            if points:
                fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                         name=by_k[k].label, line=dict(color=colour, dash=dash, width=2)))
    fig.update_xaxes(title_text="epoch", dtick=1)
    fig.update_yaxes(title_text="recall (%)", range=[0, 102])
    return _finish(fig, 330)


# --- Embeddings --------------------------------------------------------------------------------
PICK_PARAM = "pick"  # the embedding chart's click selection, as Streamlit reports it


def embedding_chart(
    image_xy: np.ndarray, text_xy: np.ndarray, captions: Sequence[str], names: Sequence[str],
    thumbnails: Sequence[str | None] | None = None, links: bool = True, selected: int | None = None,
    size: int = 620,
) -> alt.LayerChart:
    """Images and their captions in one 2-D layout, coloured by modality; a thin line joins each image
    to its caption (short lines = aligned pairs).

    Vega-Lite rather than plotly because its tooltip can show a picture: hovering a point shows the
    caption, the image's thumbnail (`thumbnails`: data: URIs, see `thumbnail_uri`) and the file name.
    A click selects the pair (the `PICK_PARAM` selection, field "pair"); the wheel zooms and a drag pans.
    Both axes share one scale, so distances read the same horizontally and vertically.
    """
    n = len(image_xy)
    pictures = list(thumbnails) if thumbnails is not None else [None] * n
    points = pd.DataFrame({
        "pair": np.tile(np.arange(n), 2),
        "modality": ["image"] * n + ["text"] * n,
        "x": np.concatenate([image_xy[:, 0], text_xy[:, 0]]),
        "y": np.concatenate([image_xy[:, 1], text_xy[:, 1]]),
        "caption": [shorten(str(c), 90) for c in captions] * 2,
        "file": list(names) * 2,
        "thumbnail": pictures * 2,
    })
    # One domain for both axes (the larger span, centred on each), so the layout is not stretched.
    centre = (points[["x", "y"]].max() + points[["x", "y"]].min()) / 2
    half = max(float((points[["x", "y"]].max() - points[["x", "y"]].min()).max()) / 2, 1e-6) * 1.05
    x, y = ((alt.X if name == "x" else alt.Y)(
        f"{name}:Q", scale=alt.Scale(domain=[centre[name] - half, centre[name] + half], nice=False),
        axis=alt.Axis(title=None, labels=False, ticks=False, grid=False, domain=False),
    ) for name in ("x", "y"))
    base = alt.Chart(points).encode(x=x, y=y)
    modality = dict(domain=list(MODALITY_COLOURS), range=list(MODALITY_COLOURS.values()))
    dots = base.mark_point(filled=True, size=70, opacity=0.85, stroke="white", strokeWidth=0.5).encode(
        color=alt.Color("modality:N", scale=alt.Scale(**modality), legend=alt.Legend(orient="top", title=None)),
        shape=alt.Shape("modality:N", scale=alt.Scale(domain=list(MODALITY_COLOURS), range=["circle", "diamond"]),
                        legend=None),
        tooltip=[alt.Tooltip("caption:N", title="title"), alt.Tooltip("thumbnail:N", title="image"),
                 alt.Tooltip("modality:N", title="point"), alt.Tooltip("pair:Q", title="pair"),
                 alt.Tooltip("file:N", title="file")],
    ).add_params(alt.selection_point(name=PICK_PARAM, fields=["pair"], on="click"),
                 alt.selection_interval(bind="scales"))
    layers = []
    if links:
        layers.append(base.mark_line(color="#787878", opacity=0.35, strokeWidth=1).encode(detail="pair:N"))
    layers.append(dots)
    if selected is not None and 0 <= selected < n:
        chosen = alt.Chart(points[points["pair"] == selected]).encode(x=x, y=y)
        layers += [chosen.mark_line(color="#111111", strokeWidth=2),
                   chosen.mark_point(shape="circle", size=260, color="#111111", strokeWidth=2, filled=False)]
    return alt.layer(*layers).properties(width=size, height=size)


def picked_pair(event: Mapping[str, Any] | None) -> int | None:
    """The pair a click on the embedding chart selected, from Streamlit's selection event (or None)."""
    for point in ((event or {}).get("selection") or {}).get(PICK_PARAM) or []:
        if isinstance(point, Mapping) and _is_whole_number(point.get("pair")):
            return int(point["pair"])
    return None


def _is_whole_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def thumbnail_uri(image: Image.Image) -> str:
    """A small image as a data: URI, which the embedding chart's tooltip shows. WebP: an 80-pixel photo
    takes ~2 KB (PNG ~10 KB), and the chart carries one for each of the evaluation set's images."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="WEBP", quality=80)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- images ------------------------------------------------------------------------------------
def load_thumbnail(path: str, size: int = 192) -> Image.Image | None:
    """The evaluation image at `path` (relative paths: from the repository root) scaled to `size` pixels
    with nearest-neighbour resampling, so tiny training images stay crisp; None when unreadable.

    PIL directly, not blipcore.data.load_image: importing blipcore.data pulls in the tokenizer stack
    (2.5 s), too slow for a page's first render, and these are the run's own dataset files. PIL's
    decompression-bomb limit still refuses absurd sizes.
    """
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = project_path(candidate)
    try:
        with Image.open(candidate) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
