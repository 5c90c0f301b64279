"""The CapFilt page's tables and figures, built by plain functions of data (a `python -m train capfilt` folder's
capfilt.jsonl records and capfilt.json summary in; pandas frames and plotly figures out). Nothing here imports
Streamlit, so tests build the same tables and figures the page shows.

A record is one caption scored by the filter: an image's original caption (with its planted flag when the data
had planted noise) or a synthetic one the captioner wrote, its ITM match probability and ITC cosine similarity
(either may be null), and whether it was kept. A caption is kept when its score reaches the cut-off, so a
threshold t here keeps the captions with score >= t, as `python -m train capfilt` does. For finding planted
captions the suspicion score is the negated filter score: a low match score marks a likely planted caption.
A clean caption (origin "clean": the data's human-annotated subset, kept as it is) has no score.

Two CapFilt outputs of one seed (the noisy-data model as filter, and BLIP's filter fine-tuned on the clean subset)
compare side by side: their detection tables, score histograms and ROC curves (the comparison_* builders).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from blipcore.evaluation.matching import roc_auc, roc_curve
from blipcore.experiments.capfilt import SCORED_ORIGINS, SCORERS
from dashboard.figures import REFERENCE_COLOUR, _finish

COLUMNS = ("image_id", "file_name", "origin", "index", "text", "planted", "itm", "itc", "kept")
SCORER_LABELS = {"itm": "ITM match probability", "itc": "ITC cosine similarity"}
SCORER_COLOURS = {"itm": "#2E6BE6", "itc": "#E4572E"}
# The groups a histogram can split the captions into, and their colours.
GROUPINGS = {
    "decision": ("kept", "dropped"),
    "origin": ("original", "synthetic"),
    "planted": ("planted", "genuine"),
}
GROUP_COLOURS = {"kept": "#17A398", "dropped": "#C0392B", "original": "#2E6BE6", "synthetic": "#8E44AD",
                 "planted": "#E4572E", "genuine": "#17A398"}


def scorer_label(scorer: str) -> str:
    return SCORER_LABELS.get(scorer, scorer)


def init_note(summary: Mapping[str, Any], role: str) -> str:
    """What the page says after the captioner or the filter (`role`) when its run started from another run's
    weights (capfilt.json's "<role>_init"): " (fine-tuned from `run`)", with the parts that started fresh; "" for a
    run trained from random weights, or a summary made before capfilt.json kept it."""
    init = summary.get(f"{role}_init")
    if not isinstance(init, Mapping) or not init.get("run"):
        return ""
    fresh = init.get("new") if isinstance(init.get("new"), Mapping) else {}
    return f" (fine-tuned from `{Path(str(init['run'])).name}`" + (
        f"; started fresh: {', '.join(map(str, fresh))})" if fresh else ")")


# --- the records -----------------------------------------------------------------------------------
def records_frame(records: Iterable[Any]) -> pd.DataFrame:
    """capfilt.jsonl's lines as a frame with the columns COLUMNS: `itm` / `itc` float (NaN when null), `planted`
    a nullable boolean (NA for synthetic captions and data without planted noise), `kept` a plain boolean.
    A missing field is read as null; ValueError names a line that is not a JSON object."""
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            raise ValueError(f"capfilt.jsonl line {number} is not a JSON object ({type(record).__name__})")
        rows.append({column: record.get(column) for column in COLUMNS})
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for scorer in SCORERS:
        frame[scorer] = pd.to_numeric(frame[scorer], errors="coerce").astype(float)
    frame["planted"] = pd.array([v if isinstance(v, bool) else None for v in frame["planted"]], dtype="boolean")
    frame["kept"] = np.array([v is True for v in frame["kept"]], dtype=bool)
    frame["index"] = pd.to_numeric(frame["index"], errors="coerce")
    frame["image_id"] = [v if isinstance(v, (int, float, str)) or v is None else str(v) for v in frame["image_id"]]
    frame["origin"] = frame["origin"].fillna("?").astype(str)
    frame["text"] = frame["text"].fillna("").astype(str)
    frame["file_name"] = frame["file_name"].fillna("").astype(str)
    return frame


def scored(frame: pd.DataFrame, scorer: str) -> pd.DataFrame:
    """The original and synthetic captions that have a `scorer` score."""
    return frame[frame["origin"].isin(SCORED_ORIGINS) & frame[scorer].notna()]


def available_scorers(frame: pd.DataFrame, summary: Mapping[str, Any] | None = None) -> list[str]:
    """The scorers some caption has a score of: the deciding one (summary["score"]) first."""
    found = [s for s in SCORERS if not scored(frame, s).empty]
    chosen = (summary or {}).get("score")
    return sorted(found, key=lambda s: s != chosen)


def flagged_originals(frame: pd.DataFrame) -> pd.DataFrame:
    """The original captions with a planted flag (empty when the data had no planted noise)."""
    return frame[(frame["origin"] == "original") & frame["planted"].notna()]


def has_planted(frame: pd.DataFrame) -> bool:
    return not flagged_originals(frame).empty


def score_range(frame: pd.DataFrame, scorer: str) -> tuple[float, float]:
    """The range a threshold on `scorer` moves over: [0, 1] for the ITM probability; the observed scores'
    range (widened to whole hundredths) for ITC and anything else, [-1, 1] without scores."""
    if scorer == "itm":
        return 0.0, 1.0
    values = scored(frame, scorer)[scorer]
    if values.empty:
        return -1.0, 1.0
    low, high = math.floor(values.min() * 100) / 100, math.ceil(values.max() * 100) / 100
    return (low, high) if high > low else (low, low + 0.01)


# --- histograms ------------------------------------------------------------------------------------
def histogram_groups(frame: pd.DataFrame, scorer: str, by: str = "decision") -> dict[str, np.ndarray]:
    """The `scorer` scores of each group of `by` (GROUPINGS): "decision" kept / dropped and "origin" original /
    synthetic over every scored caption; "planted" planted / genuine over the flagged originals ({} without
    flags). Every group is present, possibly empty."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {tuple(GROUPINGS)}, got {by!r}")
    if by == "planted":
        rows = flagged_originals(frame)
        rows = rows[rows[scorer].notna()]
        if rows.empty:
            return {}
        planted = rows["planted"].to_numpy(dtype=bool)
        masks = (planted, ~planted)
    else:
        rows = scored(frame, scorer)
        first = rows["kept"].to_numpy(dtype=bool) if by == "decision" else (rows["origin"] == "original").to_numpy()
        masks = (first, ~first)
    values = rows[scorer].to_numpy(dtype=float)
    return {group: values[mask] for group, mask in zip(GROUPINGS[by], masks, strict=True)}


def score_histogram(frame: pd.DataFrame, scorer: str, by: str = "decision", cutoff: float | None = None,
                    threshold: float | None = None, bins: int = 40, height: int = 330) -> go.Figure:
    """Overlaid histograms (counts) of the `scorer` scores of each group of `by` (see histogram_groups), on
    shared bins so the groups compare; the cut-off the filter applied drawn as a dashed vertical line, and a
    threshold being tried as a dotted one. Binned here (np.histogram), so the page sends `bins` counts a group
    rather than every score (a Flickr8k CapFilt has 36,000)."""
    groups = histogram_groups(frame, scorer, by)
    values = np.concatenate(list(groups.values())) if groups else np.array([])
    fig = go.Figure()
    if len(values):
        low, high = float(values.min()), float(values.max())
        edges = np.linspace(low, high, bins + 1) if high > low else np.array([low, low + 0.01])
        centres, size = ((edges[:-1] + edges[1:]) / 2).tolist(), float(edges[1] - edges[0])
        ranges = np.column_stack([edges[:-1], edges[1:]]).tolist()
        for group, scores in groups.items():
            counts, _ = np.histogram(scores, bins=edges)
            fig.add_trace(go.Bar(
                x=centres, y=counts.tolist(), width=size, name=f"{group} ({len(scores):,})", legendgroup=group,
                opacity=0.65, marker=dict(color=GROUP_COLOURS[group], line=dict(width=0)), customdata=ranges,
                hovertemplate=f"{group}<br>{scorer} %{{customdata[0]:.3f}} to %{{customdata[1]:.3f}}<br>"
                              "%{y} captions<extra></extra>",
            ))
    if cutoff is not None:
        fig.add_vline(x=cutoff, line=dict(color="#222222", dash="dash", width=2),
                      annotation_text=f"cut-off {cutoff:.3g}", annotation_position="top left")
    if threshold is not None:
        fig.add_vline(x=threshold, line=dict(color=REFERENCE_COLOUR, dash="dot", width=2),
                      annotation_text=f"threshold {threshold:.3g}", annotation_position="top right")
    fig.update_layout(barmode="overlay", bargap=0)
    fig.update_xaxes(title_text=scorer_label(scorer))
    fig.update_yaxes(title_text="captions")
    return _finish(fig, height)


# --- finding the planted captions ----------------------------------------------------------------------
@dataclass(frozen=True)
class Roc:
    """A scorer's ROC curve at finding the planted originals, flagging every caption whose score is at most
    `score[i]` (the first point, nothing flagged, has score -inf)."""

    scorer: str
    fpr: np.ndarray  # share of the genuine originals dropped
    tpr: np.ndarray  # share of the planted originals dropped
    score: np.ndarray
    auc: float
    planted: int
    genuine: int


def planted_roc(frame: pd.DataFrame, scorer: str) -> Roc | None:
    """blipcore.evaluation.matching.roc_curve / roc_auc of the suspicion score (the negated `scorer` score) over the
    flagged originals; None without flags, scores or both classes."""
    rows = flagged_originals(frame)
    rows = rows[rows[scorer].notna()]
    planted = rows["planted"].to_numpy(dtype=bool)
    suspicion = -rows[scorer].to_numpy(dtype=float)
    auc = roc_auc(suspicion, planted)
    if auc is None:
        return None
    fpr, tpr, thresholds = roc_curve(suspicion, planted)
    return Roc(scorer, fpr, tpr, -thresholds, auc, int(planted.sum()), int((~planted).sum()))


def roc_figure(curves: Sequence[Roc], height: int = 420) -> go.Figure:
    """One ROC curve per scorer (its AUC in the legend) over the chance diagonal."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance (AUC 0.500)",
                             line=dict(color=REFERENCE_COLOUR, dash="dash", width=1), hoverinfo="skip"))
    for curve in curves:
        cut = np.where(np.isfinite(curve.score), curve.score, np.nan)  # -inf (nothing dropped) is not JSON
        fig.add_trace(go.Scatter(
            x=curve.fpr.tolist(), y=curve.tpr.tolist(), mode="lines", line_shape="hv", customdata=cut.tolist(),
            name=f"{curve.scorer.upper()} (AUC {curve.auc:.3f})",
            line=dict(color=SCORER_COLOURS.get(curve.scorer), width=2),
            hovertemplate=f"drop {curve.scorer} ≤ %{{customdata:.4f}}<br>planted dropped %{{y:.1%}} of "
                          f"{curve.planted:,}<br>genuine dropped %{{x:.1%}} of {curve.genuine:,}<extra></extra>",
        ))
    fig.update_xaxes(title_text="genuine originals dropped (false positive rate)", range=[0, 1])
    fig.update_yaxes(title_text="planted originals dropped (true positive rate)", range=[0, 1.02])
    return _finish(fig, height)


def detection_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """capfilt.json's planted-noise report, one row per scorer: ROC AUC, precision and recall of the dropped
    originals at finding the planted ones, how many were dropped, and whether the scorer decided. Empty
    without planted noise."""
    planted = summary.get("planted")
    reports = planted.get("scorers") if isinstance(planted, Mapping) else None
    columns = ["scorer", "decided", "ROC AUC", "precision", "recall", "originals dropped"]
    if not isinstance(reports, Mapping):
        return pd.DataFrame(columns=columns)
    rows = []
    for scorer, report in reports.items():
        report = report if isinstance(report, Mapping) else {}
        rows.append({"scorer": scorer, "decided": scorer == summary.get("score"), "ROC AUC": report.get("auc"),
                     "precision": report.get("precision"), "recall": report.get("recall"),
                     "originals dropped": report.get("dropped")})
    return pd.DataFrame(rows, columns=columns)


# --- thresholds ------------------------------------------------------------------------------------
PLANTED_COLUMNS = ("planted kept", "planted", "planted share of kept originals", "planted surviving",
                   "genuine kept")


def threshold_table(frame: pd.DataFrame, scorer: str, thresholds: float | Iterable[float]) -> pd.DataFrame:
    """What keeping the captions with `scorer` score >= each threshold keeps, one row per threshold: pairs kept
    (originals and synthetic), originals kept of all originals, synthetic kept of all synthetic; with planted
    flags also the planted originals kept of all planted, the share of the kept (flagged) originals that are
    planted, the share of the planted that survive and the share of the genuine originals kept (NaN where a
    share has nothing to divide; the planted columns are absent without flags)."""
    values = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    rows_ = scored(frame, scorer)
    scores = rows_[scorer].to_numpy(dtype=float)
    original = (rows_["origin"] == "original").to_numpy()
    flagged = original & rows_["planted"].notna().to_numpy()
    planted = flagged & rows_["planted"].fillna(False).to_numpy(dtype=bool)
    genuine = flagged & ~planted
    rows = []
    for threshold in values:
        kept = scores >= threshold
        row: dict[str, Any] = {
            "threshold": threshold, "pairs kept": int(kept.sum()),
            "originals kept": int((kept & original).sum()), "originals": int(original.sum()),
            "synthetic kept": int((kept & ~original).sum()), "synthetic": int((~original).sum()),
        }
        if flagged.any():
            planted_kept, kept_flagged = int((kept & planted).sum()), int((kept & flagged).sum())
            row.update({
                "planted kept": planted_kept, "planted": int(planted.sum()),
                "planted share of kept originals": _fraction(planted_kept, kept_flagged),
                "planted surviving": _fraction(planted_kept, int(planted.sum())),
                "genuine kept": _fraction(int((kept & genuine).sum()), int(genuine.sum())),
            })
        rows.append(row)
    return pd.DataFrame(rows)


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def threshold_grid(frame: pd.DataFrame, scorer: str, steps: int = 11) -> np.ndarray:
    """`steps` evenly spaced thresholds over score_range (0, 0.1, ..., 1 for ITM)."""
    low, high = score_range(frame, scorer)
    return np.round(np.linspace(low, high, steps), 6)


# --- browsing images -------------------------------------------------------------------------------
IMAGE_FILTERS: dict[str, Callable[[pd.DataFrame], bool]] = {
    "all images": lambda rows: True,
    "with a planted caption": lambda rows: bool(rows["planted"].fillna(False).any()),
    "with a dropped original": lambda rows: bool(((rows["origin"] == "original") & ~rows["kept"]).any()),
    "with a kept synthetic caption": lambda rows: bool(((rows["origin"] == "synthetic") & rows["kept"]).any()),
    "unreadable": lambda rows: bool((rows["origin"] == "unreadable").any()),
    "in the clean subset": lambda rows: bool((rows["origin"] == "clean").any()),
}


def image_ids(frame: pd.DataFrame, which: str = "all images") -> list[Any]:
    """The images (in record order) whose captions pass the IMAGE_FILTERS entry `which`."""
    test = IMAGE_FILTERS[which]
    return [image for image, rows in frame.groupby("image_id", sort=False) if test(rows)]


def _number(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def caption_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One image's captions as shown: originals first (in their file order), then synthetic ones, with both
    scores, kept / dropped and planted / genuine (blank when unknown), indexed by "original 3" / "synthetic 0"."""
    order = {"original": 0, "clean": 0, "synthetic": 1}
    rows = rows.assign(_order=rows["origin"].map(order).fillna(2)).sort_values(["_order", "index"], kind="stable")
    planted = {True: "planted", False: "genuine"}
    table = pd.DataFrame({
        "caption": [text or "(empty caption)" for text in rows["text"]],
        "itm": [_number(v) for v in rows["itm"]],
        "itc": [_number(v) for v in rows["itc"]],
        "kept": ["kept" if kept else "dropped" for kept in rows["kept"]],
        "planted": ["" if pd.isna(flag) else planted[bool(flag)] for flag in rows["planted"]],
    }, index=[f"{origin} {'' if pd.isna(index) else int(index)}".strip()
              for origin, index in zip(rows["origin"], rows["index"], strict=True)])
    return table


# --- two filters side by side --------------------------------------------------------------------------
SEED_SUFFIX = re.compile(r"seed(\d+)$")
FILTER_DASHES = ("solid", "dash", "dot", "dashdot")  # the ROC curves of the first, second, ... filter


def comparison_order(folder: str, found: Sequence[str]) -> list[str]:
    """The CapFilt folders to compare `folder` with, likeliest first: those beside it (a study's data/ holds
    each protocol's output of each seed) of the same seed (a name ending in seed<N>), then the others beside
    it, then the rest, each group by path; `folder` itself left out."""
    here = Path(folder)
    seed = SEED_SUFFIX.search(here.name)

    def distance(other: str) -> tuple[bool, bool, str]:
        there = Path(other)
        same_seed = seed is not None and (match := SEED_SUFFIX.search(there.name)) is not None and \
            match.group(1) == seed.group(1)
        return there.parent != here.parent, not same_seed, other

    return sorted((other for other in found if other != folder), key=distance)


# The shares comparison_table gives of what a CapFilt output kept: column -> (kept count, of count) in its counts
KEPT_SHARES = {"originals kept": ("kept_original", "original"), "images kept": ("images_kept", "images"),
               "synthetic kept": ("kept_synthetic", "synthetic")}


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """The filters of several CapFilt outputs (label -> capfilt.json), one row per (filter, scorer): the
    detection_table's ROC AUC, precision and recall at finding the planted captions, and the shares of the
    scored originals, the images and the synthetic captions kept (NaN where a count is missing)."""
    rows = []
    for label, summary in summaries.items():
        counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}
        shares = {name: _count_share(counts, part, whole) for name, (part, whole) in KEPT_SHARES.items()}
        rows += [{"filter": label, **row, **shares} for row in detection_table(summary).to_dict("records")]
    return pd.DataFrame(rows, columns=["filter", *detection_table({}).columns, *KEPT_SHARES])


def _count_share(counts: Mapping[str, Any], part: str, whole: str) -> float:
    found, total = counts.get(part), counts.get(whole)
    return _fraction(found, total) if isinstance(found, int) and isinstance(total, int) else math.nan


def comparison_histograms(frames: Mapping[str, pd.DataFrame], scorer: str, bins: int = 40,
                          height_each: int = 230) -> go.Figure:
    """The `scorer` scores of the planted and the genuine originals of each filter (label -> records frame), a
    panel a filter, on shared bins and one x axis, each group as the share of its captions in a bin (the two
    outputs score different numbers of captions): the less the two groups overlap, the better that filter
    separates the planted noise. A filter without planted flags or scores gets an empty panel."""
    groups = {label: histogram_groups(frame, scorer, "planted") for label, frame in frames.items()}
    values = np.concatenate([v for found in groups.values() for v in found.values()] or [np.array([])])
    fig = make_subplots(rows=max(1, len(frames)), cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=list(frames) or None)
    if len(values):
        low, high = float(values.min()), float(values.max())
        edges = np.linspace(low, high, bins + 1) if high > low else np.array([low, low + 0.01])
        centres, size = ((edges[:-1] + edges[1:]) / 2).tolist(), float(edges[1] - edges[0])
        for row, (label, found) in enumerate(groups.items(), start=1):
            for group, scores in found.items():
                counts, _ = np.histogram(scores, bins=edges)
                fig.add_trace(go.Bar(
                    x=centres, y=(counts / max(1, len(scores))).tolist(), width=size, customdata=counts.tolist(),
                    name=f"{group} ({len(scores):,})", legendgroup=group, showlegend=row == 1 or len(groups) == 1,
                    opacity=0.65, marker=dict(color=GROUP_COLOURS[group], line=dict(width=0)),
                    hovertemplate=f"{label}: {group}<br>{scorer} %{{x:.3f}}<br>%{{y:.1%}} of the {group} "
                                  "(%{customdata:,})<extra></extra>",
                ), row=row, col=1)
            fig.update_yaxes(title_text="share", tickformat=".0%", row=row, col=1)
    fig.update_layout(barmode="overlay", bargap=0)
    fig.update_xaxes(title_text=scorer_label(scorer), row=max(1, len(frames)), col=1)
    return _finish(fig, 80 + height_each * max(1, len(frames)))


def comparison_roc(curves: Mapping[str, Sequence[Roc]], height: int = 460) -> go.Figure:
    """Each filter's ROC curves at finding the planted originals (label -> its planted_roc curves), over the
    chance diagonal: the colour is the scorer, the dash the filter, the AUC in the legend."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance (AUC 0.500)",
                             line=dict(color=REFERENCE_COLOUR, dash="dash", width=1), hoverinfo="skip"))
    for index, (label, found) in enumerate(curves.items()):
        for curve in found:
            fig.add_trace(go.Scatter(
                x=curve.fpr.tolist(), y=curve.tpr.tolist(), mode="lines", line_shape="hv",
                name=f"{label} · {curve.scorer.upper()} (AUC {curve.auc:.3f})",
                line=dict(color=SCORER_COLOURS.get(curve.scorer), width=2,
                          dash=FILTER_DASHES[index % len(FILTER_DASHES)]),
                hovertemplate=f"{label} · {curve.scorer}<br>planted dropped %{{y:.1%}} of {curve.planted:,}<br>"
                              f"genuine dropped %{{x:.1%}} of {curve.genuine:,}<extra></extra>",
            ))
    fig.update_xaxes(title_text="genuine originals dropped (false positive rate)", range=[0, 1])
    fig.update_yaxes(title_text="planted originals dropped (true positive rate)", range=[0, 1.02])
    return _finish(fig, height, legend=dict(orientation="v", yanchor="bottom", y=0.02, xanchor="right", x=0.99))
