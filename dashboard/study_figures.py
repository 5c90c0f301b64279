"""The Study page's tables and figures, built by plain functions of data (study.json rows, metrics.jsonl
records, run.json configs, evaluation samples in; pandas frames and plotly figures out). Nothing here
imports Streamlit, so tests build the same tables and figures the page shows.

Runs are grouped by variant: "<stage>/<variant>" (a study's runs are `<stage>-<variant>-seed<N>`, and
their config's name is "<plan>/<stage>/<variant>"), each variant's seeds drawn as one band.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from blipcore.evaluation.metrics import metric
from blipcore.experiments.study import RECOVERY_ROLES
from dashboard.figures import _finish, run_colour

ID_COLUMNS = ("stage", "variant", "decoding", "split", "seeds", "chosen_on_dev", "epochs")
NOT_METRICS = {"step", "epoch", "time"}  # numbers of a metrics line that are positions, not measurements
IGNORED_FIELDS = ("name", "train.seed")  # config fields that always differ between runs of one study
BANDS = ("min–max", "±1 sd")


def _label(key: str) -> str:
    declared = metric(key)
    return declared.label if declared is not None else key


def _shown(key: str, value: Any) -> str:
    declared = metric(key)
    if declared is not None:
        return declared.format(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the table ----------------------------------------------------------------------------------
def study_table(rows: Sequence[Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """study.json's rows as (numbers, texts): `numbers` has the identifying columns and one column per
    metric holding the mean over seeds (sortable), named by the registry's label; `texts` has the same
    shape and shows each metric cell as "mean ± sd" in the metric's declared format ("mean" alone
    with one seed). Metric columns that no row has a number for are left out."""
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key not in ID_COLUMNS and not key.endswith("_sd") and key not in keys:
                keys.append(key)
    keys = [k for k in keys if any(_is_number(row.get(k)) for row in rows)]
    labels: dict[str, str] = {}
    for key in keys:
        label = _label(key)
        labels[key] = label if label not in labels.values() and label not in ID_COLUMNS else key
    numbers, texts = [], []
    for row in rows:
        ids = {c: (", ".join(map(str, row[c])) if isinstance(row.get(c), list) else row.get(c)) for c in ID_COLUMNS}
        numbers.append({**ids, **{labels[k]: row.get(k) if _is_number(row.get(k)) else None for k in keys}})
        shown = {}
        for key in keys:
            value, spread = row.get(key), row.get(f"{key}_sd")
            text = _shown(key, value)
            shown[labels[key]] = text + (f" ± {_shown(key, spread)}" if _is_number(spread) and _is_number(value)
                                         else "")
        texts.append({**{c: str(v) for c, v in ids.items()}, **shown})
    columns = [*ID_COLUMNS, *labels.values()]
    return pd.DataFrame(numbers, columns=columns), pd.DataFrame(texts, columns=columns)


def styled_table(numbers: pd.DataFrame, texts: pd.DataFrame):
    """`numbers` styled to show `texts` (sorting a column sorts by the numbers, the cells read mean ± sd)."""
    columns = [c for c in numbers.columns if c not in ID_COLUMNS]
    styler = numbers.style
    for index in numbers.index:
        formats = {c: (lambda _value, text=texts.at[index, c]: text) for c in columns}
        styler = styler.format(formats, subset=pd.IndexSlice[[index], columns])
    return styler


RUN_COLUMNS = {"run": "run", "source": "from", "split": "split", "epoch": "epoch", "chosen": "dev choice",
               "minutes": "minutes", "samples_per_s": "samples/s", "device": "device",
               "matmul_fp32_gflops": "fp32 matmul GFLOP/s", "git_revision": "revision",
               "differs": "settings the plan no longer gives"}


def runs_table(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """study.json's runs: one row per counted run, where its numbers come from ("run": its folder here,
    "record": its results file) and what it cost on which machine; minutes and samples/s rounded to 0.1."""
    frame = pd.DataFrame([{label: ", ".join(value) if isinstance(value := row.get(key), list) else value
                           for key, label in RUN_COLUMNS.items()} for row in runs], columns=list(RUN_COLUMNS.values()))
    return frame.round({"minutes": 1, "samples/s": 1, "fp32 matmul GFLOP/s": 0})


# --- runs and variants ----------------------------------------------------------------------------
_SEED = re.compile(r"-seed(\d+)$")


def variant_of(run_name: str, config: Mapping[str, Any] | None) -> str:
    """A study run's variant, "<stage>/<variant>": from its config's name "<plan>/<stage>/<variant>", else its
    folder name without "-seed<N>"."""
    name = str((config or {}).get("name") or "")
    parts = name.split("/")
    if len(parts) >= 3:
        return "/".join(parts[-2:])
    return _SEED.sub("", run_name.rsplit("/", 1)[-1])


def seed_of(run_name: str, config: Mapping[str, Any] | None) -> int | None:
    seed = ((config or {}).get("train") or {}).get("seed")
    if isinstance(seed, int):
        return seed
    match = _SEED.search(run_name)
    return int(match.group(1)) if match else None


def series(records: Sequence[Mapping[str, Any]], key: str, split: str, x: str = "step") -> pd.DataFrame:
    """(x, value) of `key` in the metrics lines of `split`, numbers only, sorted by x (last value per x)."""
    points = [(r[x], r[key]) for r in records
              if r.get("split") == split and _is_number(r.get(x)) and _is_number(r.get(key))]
    frame = pd.DataFrame(points, columns=[x, "value"])
    return frame.drop_duplicates(x, keep="last").sort_values(x, kind="stable").reset_index(drop=True)


def variant_bands(
    records: Mapping[str, Sequence[Mapping[str, Any]]], variants: Mapping[str, str], key: str, split: str,
    x: str = "step",
) -> dict[str, pd.DataFrame]:
    """Per variant: at every x some of its runs logged `key`, the mean, sd (0 with one run), min, max and the
    number of runs `n`. `records`: run name -> metrics lines; `variants`: run name -> variant."""
    bands: dict[str, pd.DataFrame] = {}
    for variant in dict.fromkeys(variants[name] for name in records if name in variants):
        parts = [series(lines, key, split, x).assign(run=name) for name, lines in records.items()
                 if variants.get(name) == variant]
        data = pd.concat(parts) if parts else pd.DataFrame(columns=[x, "value", "run"])
        if data.empty:
            continue
        grouped = data.groupby(x)["value"]
        frame = pd.DataFrame({"mean": grouped.mean(), "sd": grouped.std(ddof=1).fillna(0.0), "min": grouped.min(),
                              "max": grouped.max(), "n": grouped.count()}).reset_index()
        bands[variant] = frame
    return bands


def band_figure(bands: Mapping[str, pd.DataFrame], title: str, x: str = "step", band: str = BANDS[0],
                height: int = 360) -> go.Figure:
    """One colour per variant: the mean over its seeds as a line, and their spread (min–max, or mean ± 1 sd)
    as a shaded band behind it."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    fig = go.Figure()
    for index, (variant, frame) in enumerate(bands.items()):
        colour = run_colour(index)
        xs = frame[x].tolist()
        if band == BANDS[0]:
            lower, upper = frame["min"].tolist(), frame["max"].tolist()
        else:
            lower, upper = (frame["mean"] - frame["sd"]).tolist(), (frame["mean"] + frame["sd"]).tolist()
        if len(xs) and frame["n"].max() > 1:
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], mode="lines", fill="toself",
                                     fillcolor=colour, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=variant, name=f"{variant} ({band})"))
        fig.add_trace(go.Scatter(
            x=xs, y=frame["mean"].tolist(), mode="lines+markers" if len(xs) < 30 else "lines", name=variant,
            legendgroup=variant, line=dict(color=colour, width=2), marker=dict(size=5),
            customdata=np.column_stack([frame["sd"], frame["min"], frame["max"], frame["n"]]),
            hovertemplate=f"{variant}<br>{x} %{{x}}<br>mean %{{y:.4g}} ± %{{customdata[0]:.3g}}"
                          "<br>min %{customdata[1]:.4g} · max %{customdata[2]:.4g}<br>%{customdata[3]} runs"
                          "<extra></extra>",
        ))
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=title)
    return _finish(fig, height, title=dict(text=title, x=0, y=0.98, font=dict(size=14)))


# --- configs -------------------------------------------------------------------------------------
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"section.field": value}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return "(unset)" if value is None else str(value)


def config_diff(configs: Mapping[str, Mapping[str, Any]], variants: Mapping[str, str],
                ignore: Sequence[str] = IGNORED_FIELDS) -> pd.DataFrame:
    """The config fields whose values differ between variants: one row per field ("section.field"), one
    column per variant. `configs`: run name -> run.json config; a variant whose seeds disagree on a field
    shows their values joined by " / ". Fields in `ignore` (the name, the seed) are left out."""
    by_variant: dict[str, dict[str, list[str]]] = {}
    for run, config in configs.items():
        values = by_variant.setdefault(variants.get(run, run), {})
        for field, value in flatten(config).items():
            shown = values.setdefault(field, [])
            if _cell(value) not in shown:
                shown.append(_cell(value))
    fields = sorted({f for values in by_variant.values() for f in values} - set(ignore))
    table = {variant: {f: " / ".join(values.get(f, ["(absent)"])) for f in fields}
             for variant, values in by_variant.items()}
    frame = pd.DataFrame(table, index=pd.Index(fields, name="field"), columns=list(by_variant))
    differs = frame.nunique(axis=1) > 1 if len(frame.columns) > 1 else frame.apply(
        lambda row: any(" / " in v for v in row), axis=1)
    return frame[differs] if len(frame) else frame


# --- scatter -------------------------------------------------------------------------------------
def logged_keys(runs: Iterable[Sequence[Mapping[str, Any]]], split: str) -> list[str]:
    """The keys that some metrics line of `split` holds a number for (positions left out), sorted."""
    return sorted({k for records in runs for r in records if r.get("split") == split
                   for k, v in r.items() if k not in NOT_METRICS and _is_number(v)})


def final_val(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The numbers of a run's last validation line (positions like step / epoch / time left out)."""
    for record in reversed(records):
        if record.get("split") == "val":
            return {k: float(v) for k, v in record.items() if k not in NOT_METRICS and _is_number(v)}
    return {}


def run_points(finals: Mapping[str, Mapping[str, float]], variants: Mapping[str, str],
               seeds: Mapping[str, int | None] | None = None) -> pd.DataFrame:
    """One row per run with a final validation line: run, variant, seed, and its numbers."""
    rows = [{"run": run, "variant": variants.get(run, run), "seed": (seeds or {}).get(run), **values}
            for run, values in finals.items() if values]
    return pd.DataFrame(rows)


def numeric_keys(points: pd.DataFrame) -> list[str]:
    """The metric columns of `points` that some run has a number for: declared ones first, in name order."""
    keys = [c for c in points.columns if c not in ("run", "variant", "seed") and points[c].notna().any()]
    return sorted(keys, key=lambda k: (metric(k) is None, k))


def scatter_figure(points: pd.DataFrame, x: str, y: str, height: int = 440) -> go.Figure:
    """One point per run, x against y, coloured by variant (hover names the run)."""
    fig = go.Figure()
    if not points.empty and x in points and y in points:
        for index, (variant, group) in enumerate(points.groupby("variant", sort=False)):
            data = group.dropna(subset=[x, y])
            if data.empty:
                continue
            fig.add_trace(go.Scatter(
                x=data[x].tolist(), y=data[y].tolist(), mode="markers", name=str(variant),
                marker=dict(color=run_colour(index), size=11, line=dict(color="white", width=1)),
                text=data["run"].tolist(),
                hovertemplate=f"%{{text}}<br>{_label(x)} %{{x:.4g}}<br>{_label(y)} %{{y:.4g}}<extra></extra>",
            ))
    fig.update_xaxes(title_text=_label(x))
    fig.update_yaxes(title_text=_label(y))
    return _finish(fig, height)


# --- the plan's recovery question ----------------------------------------------------------------
def recovery_figure(summary: Mapping[str, Any], height: int = 380) -> go.Figure:
    """blipcore.experiments.study's recovery summary drawn: each role's runs as dots (one per seed) and their mean ± sd,
    with the level the treated runs must reach (degraded + target x cost) as a dashed line."""
    key = str(summary.get("metric", ""))
    fig = go.Figure()
    drawn = 0
    for index, role in enumerate(RECOVERY_ROLES):
        entry = summary.get(role) or {}
        name = f"{entry.get('run', role)} ({role})"
        by_seed = {seed: v for seed, v in (entry.get("values") or {}).items() if _is_number(v)}
        if not by_seed:
            continue
        fig.add_trace(go.Scatter(
            x=[name] * len(by_seed), y=list(by_seed.values()), mode="markers", name=name, legendgroup=role,
            marker=dict(color=run_colour(index), size=9, opacity=0.6), text=[f"seed {seed}" for seed in by_seed],
            hovertemplate=f"%{{text}}<br>{_label(key)} %{{y:.4g}}<extra></extra>",
        ))
        sd = entry.get("sd")
        fig.add_trace(go.Scatter(
            x=[name], y=[entry.get("mean")], mode="markers", showlegend=False, legendgroup=role,
            marker=dict(color=run_colour(index), size=18, symbol="line-ew-open", line=dict(width=3)),
            error_y=dict(type="data", array=[sd], visible=_is_number(sd)),
            hovertemplate=f"mean {_label(key)} %{{y:.4g}}<extra></extra>",
        ))
        drawn += 1
    degraded, cost, target = (summary.get("degraded") or {}).get("mean"), summary.get("cost"), summary.get("target")
    if _is_number(degraded) and _is_number(cost) and _is_number(target) and cost > 0:
        declared = metric(key)
        sign = -1.0 if declared is not None and declared.better == "lower" else 1.0
        fig.add_hline(y=degraded + sign * target * cost, line=dict(color="#666", dash="dash"),
                      annotation_text=f"target: win back {100 * target:.0f}% of the cost",
                      annotation_position="top left")
    fig.update_xaxes(range=[-0.5, max(drawn, 1) - 0.5])  # half a category of room beside the outer roles' marks
    fig.update_yaxes(title_text=_label(key))
    return _finish(fig, height, title=dict(text=str(summary.get("verdict", "")), x=0, y=0.98, font=dict(size=14)))


# --- the plan's targets --------------------------------------------------------------------------
def target_figure(rows: Sequence[Mapping[str, Any]], target: str, height: int = 380) -> go.Figure:
    """blipcore.experiments.study's target rows for one target drawn: each variant's runs as dots (one per seed) and
    their mean ± sd, the level as a dashed line. A margin over a reference row is drawn as the margin, seed by seed
    (the run's number minus its own reference row's), against the margin it must reach."""
    picked = [row for row in rows if row.get("target") == target]
    fig = go.Figure()
    for index, row in enumerate(picked):
        values = {seed: v for seed, v in (row.get("values") or {}).items() if _is_number(v)}
        if row.get("above"):
            margins = row.get("margins") or {}
            values = {seed: margins[seed] for seed in values if _is_number(margins.get(seed))}
        if not values:
            continue
        run = str(row.get("run"))
        fig.add_trace(go.Scatter(
            x=[run] * len(values), y=list(values.values()), mode="markers", name=run, legendgroup=run,
            marker=dict(color=run_colour(index), size=9, opacity=0.6), text=[f"seed {seed}" for seed in values],
            hovertemplate="%{text}<br>%{y:.4g}<extra></extra>",
        ))
        sd = float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else None
        fig.add_trace(go.Scatter(
            x=[run], y=[float(np.mean(list(values.values())))], mode="markers", showlegend=False, legendgroup=run,
            marker=dict(color=run_colour(index), size=18, symbol="line-ew-open", line=dict(width=3)),
            error_y=dict(type="data", array=[sd], visible=sd is not None),
            hovertemplate=f"mean %{{y:.4g}}<br>{row.get('verdict', '')}<extra></extra>",
        ))
    if picked:
        first = picked[0]
        margin = bool(first.get("above"))
        level = first.get("by") if margin else first.get("level")
        if _is_number(level):
            fig.add_hline(y=level, line=dict(color="#666", dash="dash"),
                          annotation_text=f"target: {target}", annotation_position="top left")
        key = str(first.get("metric", ""))
        fig.update_yaxes(title_text=f"{_label(key)} minus {first['above']}" if margin else _label(key))
    fig.update_xaxes(range=[-0.5, max(len(fig.data) // 2, 1) - 0.5])
    return _finish(fig, height)


# --- captions side by side -----------------------------------------------------------------------
def captions_side_by_side(samples: Mapping[str, Sequence[Mapping[str, Any]]], limit: int | None = None
                          ) -> list[dict[str, Any]]:
    """The images that every variant captioned, in the first variant's order: {"image_id", "file_path",
    "references", "captions": {variant: caption}}. `samples`: variant -> an evaluation's samples.
    Images are matched by image_id (file_path when there is none)."""
    def ident(sample: Mapping[str, Any]) -> Any:
        return sample.get("image_id", sample.get("file_path"))

    indexed = {variant: {ident(s): s for s in found} for variant, found in samples.items()}
    if not indexed:
        return []
    first = next(iter(samples.values()))
    rows = []
    for sample in first:
        key = ident(sample)
        if all(key in by_id for by_id in indexed.values()):
            rows.append({"image_id": sample.get("image_id"), "file_path": sample.get("file_path", ""),
                         "references": list(sample.get("references") or []),
                         "captions": {v: str(by_id[key].get("caption") or "") for v, by_id in indexed.items()}})
            if limit is not None and len(rows) >= limit:
                break
    return rows
