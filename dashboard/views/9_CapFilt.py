"""CapFilt: one `python -m train capfilt` output folder — who captioned and who filtered, what was kept; the
filter's scores of kept and dropped captions (and of planted and genuine ones when the data had planted noise);
each scorer's ROC curve at finding the planted captions; what another threshold would keep; the images with
their original and synthetic captions, scored; and this filter beside another output's (another protocol's
filter of the same seed: the noisy-data model against BLIP's fine-tuned on a clean subset)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from blipcore.evaluation.metrics import format_share
from blipcore.experiments.capfilt import CapfiltError, find_capfilt_folders, load_capfilt
from blipcore.io import mtime_of
from blipcore.paths import PROJECT_ROOT
from dashboard import capfilt_figures as cf
from dashboard import common, figures

SECTION_KEY = "capfilt_section"  # session-state key of the open tab
PATH_KEY = "capfilt_path"  # the sidebar's typed folder
IMAGES_PER_PAGE = 4
MAKE_ONE = ("Make one: `python -m train capfilt --captioner RUN --filter RUN --data DIR --out DIR2` (a study's "
            "capfilt stage writes it to `<study>/data/<name>/`), or type its folder in the sidebar.")


def search_roots() -> list[Path]:
    """Where CapFilt folders are looked for: the runs folder (studies keep theirs in `<study>/data/`), then the
    project's data/ folder."""
    return [common.runs_dir().resolve(), PROJECT_ROOT / "data"]


@st.cache_data(show_spinner=False, ttl=30)
def _found(roots: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for root in roots:  # each root's folders together, the runs folder's first
        found += [str(p) for p in find_capfilt_folders(root) if str(p) not in found]
    return found


def shown_path(folder: str, roots: list[Path]) -> str:
    """A folder named relative to the search root it is under."""
    for root in roots:
        try:
            return f"{root.name}/{Path(folder).relative_to(root)}"
        except ValueError:
            continue
    return folder


def select_folder() -> Path:
    """Sidebar: a found CapFilt folder, or the one typed below the list (which wins)."""
    roots = search_roots()
    found = _found(tuple(map(str, roots)))
    typed = st.sidebar.text_input("…or a folder path", key=PATH_KEY,
                                  help="Any `python -m train capfilt` output folder (--out); overrides the list.")
    if typed.strip():
        return Path(typed.strip()).expanduser()
    if not found:
        common.stop_with(f"No CapFilt output under `{roots[0]}` or `{roots[1]}` yet.", MAKE_ONE)
    current = st.session_state.get("selected_capfilt")
    index = found.index(current) if current in found else 0
    chosen = st.sidebar.selectbox("CapFilt output", found, index=index, key="capfilt_select",
                                  format_func=lambda f: shown_path(f, roots))
    if chosen not in found:
        chosen = found[index]
    st.session_state["selected_capfilt"] = chosen
    return Path(chosen)


@st.cache_data(show_spinner="Reading the CapFilt record…", max_entries=8)
def _load(folder: str, mtimes: tuple[float, float]) -> tuple[dict[str, Any], pd.DataFrame, str]:
    result = load_capfilt(folder)
    return result.summary, cf.records_frame(result.records), str(result.images_root)


def load(folder: Path) -> tuple[dict[str, Any], pd.DataFrame, Path]:
    """(summary, records frame, image folder), cached until capfilt.json or capfilt.jsonl changes; a missing or
    damaged folder stops the page with a message."""
    try:
        summary, frame, images_root = _load(str(folder), (mtime_of(folder / "capfilt.json"),
                                                          mtime_of(folder / "capfilt.jsonl")))
    except (CapfiltError, ValueError, TypeError, OSError) as err:  # TypeError: e.g. a number as images_root
        common.stop_with(f"Cannot show `{folder}`: {err}", MAKE_ONE)
    if frame.empty:
        common.stop_with(f"`{folder}` has no caption in its capfilt.jsonl.", MAKE_ONE)
    return summary, frame, Path(images_root)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def kept_metric(column: Any, label: str, kept: Any, total: Any, help: str | None = None) -> None:
    """A count as the metric's value, with its share of the total in small type beneath it ("7,092 of 30,000"
    as the value would be cut off in a quarter of the page)."""
    share = f"{kept / total:.0%} of " if isinstance(kept, int) and isinstance(total, int) and total > 0 else "of "
    column.metric(label, _count(kept), delta=share + _count(total), delta_color="off", delta_arrow="off", help=help)


def decision_rule(summary: dict[str, Any]) -> str:
    cut = summary.get("cutoff")
    rule = f"`{summary.get('score', '?')}` ≥ {cut:.4g}" if isinstance(cut, (int, float)) else "?"
    if isinstance(summary.get("keep_fraction"), (int, float)):
        return f"{rule} (the top {summary['keep_fraction']:.0%} of all scores)"
    if isinstance(summary.get("threshold"), (int, float)):
        return f"{rule} (the threshold)"
    return f"{rule} (the default threshold)"


def summary_section(folder: Path, summary: dict[str, Any]) -> None:
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
    scorers = summary.get("scorers")
    st.caption(f"`{folder}` · captioner `{summary.get('captioner', '?')}`{cf.init_note(summary, 'captioner')} · "
               f"filter `{summary.get('filter', '?')}`{cf.init_note(summary, 'filter')} "
               f"(scorers: {', '.join(map(str, scorers)) if isinstance(scorers, list) and scorers else '?'}) · "
               f"{summary.get('synthetic_per_image', '?')} synthetic caption(s) per image by "
               f"`{summary.get('decoding', '?')}` decoding · kept: {decision_rule(summary)}")
    if isinstance(counts.get("clean"), int) and counts["clean"]:
        st.caption(f"The data's clean subset, {_count(counts['clean'])} captions of "
                   f"{_count(counts.get('clean_images'))} images, was kept as it is: not captioned, not scored, "
                   "as BLIP keeps COCO's human-annotated captions.")
    cols = st.columns(4)
    kept_metric(cols[0], "images kept", counts.get("images_kept"), counts.get("images"),
                help="images with at least one kept caption")
    kept_metric(cols[1], "original captions kept", counts.get("kept_original"), counts.get("original"))
    kept_metric(cols[2], "synthetic captions kept", counts.get("kept_synthetic"), counts.get("synthetic"))
    cols[3].metric("unreadable images", _count(counts.get("unreadable")), help="left out, with their captions")
    detection = cf.detection_table(summary)
    if not detection.empty:
        planted = summary.get("planted") or {}
        st.markdown(f"**Finding the planted noise**: {_count(planted.get('planted'))} of "
                    f"{_count(planted.get('captions'))} original captions were planted (replaced by another image's "
                    "caption).")
        st.dataframe(detection, hide_index=True, key="capfilt_detection", column_config={
            "ROC AUC": st.column_config.NumberColumn(format="%.3f", help="the probability that a planted caption "
                                                     "scores below a genuine one (0.5: chance)"),
            "precision": st.column_config.NumberColumn(format="percent", help="planted share of the dropped"),
            "recall": st.column_config.NumberColumn(format="percent", help="share of the planted dropped"),
        })
        st.caption("The deciding scorer at its own cut-off; the other at the same number of originals dropped, "
                   "the lowest it scored, so their precision and recall compare at equal cost.")


def pick_scorer(scorers: list[str], key: str) -> str:
    if len(scorers) == 1:
        return scorers[0]
    return st.radio("Scorer", scorers, horizontal=True, format_func=cf.scorer_label, key=key)


def scores_section(summary: dict[str, Any], frame: pd.DataFrame, scorers: list[str]) -> None:
    scorer = pick_scorer(scorers, "capfilt_scores_scorer")
    cutoff = summary.get("cutoff") if scorer == summary.get("score") else None
    left, right = st.columns(2)
    left.markdown("**Kept and dropped captions**")
    left.plotly_chart(cf.score_histogram(frame, scorer, "decision", cutoff=cutoff), key="capfilt_hist_decision")
    right.markdown("**Original and synthetic captions**")
    right.plotly_chart(cf.score_histogram(frame, scorer, "origin", cutoff=cutoff), key="capfilt_hist_origin")
    if cf.has_planted(frame):
        st.markdown("**Planted and genuine original captions**")
        st.plotly_chart(cf.score_histogram(frame, scorer, "planted", cutoff=cutoff), key="capfilt_hist_planted")
        st.caption("A filter that finds the planted captions scores them low: the less the two overlap, the more "
                   "planted noise one cut-off can drop without dropping genuine captions.")
    st.caption(f"Counts of captions per bin. The dashed line is the cut-off `{summary.get('score')}` was filtered "
               "with" + ("." if cutoff is not None else "; this scorer did not decide, so it has none here."))


def roc_section(summary: dict[str, Any], frame: pd.DataFrame, scorers: list[str]) -> None:
    if not cf.has_planted(frame):
        st.info("No ROC curves: the data this CapFilt run read had no planted noise (no `noise.jsonl`), so which "
                "original captions are wrong is unknown. Plant some with `python -m train data noise` and run "
                "CapFilt on that dataset.")
        return
    curves = [curve for s in scorers if (curve := cf.planted_roc(frame, s)) is not None]
    if not curves:
        st.info("No ROC curve: the flagged originals are all planted or all genuine.")
        return
    st.plotly_chart(cf.roc_figure(curves), key="capfilt_roc")
    st.caption("Dropping every original caption scored at or below a cut-off, swept from the lowest score up: the "
               "share of the planted captions dropped against the share of the genuine ones dropped. AUC: the "
               "probability that a planted caption scores below a genuine one; the diagonal is chance.")


def threshold_section(summary: dict[str, Any], frame: pd.DataFrame, scorers: list[str], folder: Path) -> None:
    scorer = pick_scorer(scorers, "capfilt_threshold_scorer")
    low, high = cf.score_range(frame, scorer)
    cut = summary.get("cutoff")
    start = cut if scorer == summary.get("score") and isinstance(cut, (int, float)) else (
        0.5 if scorer == "itm" else (low + high) / 2)
    start = round(min(high, max(low, float(start))), 3)
    threshold = st.slider(f"Threshold: keep the captions with {cf.scorer_label(scorer)} ≥", min_value=low,
                          max_value=high, value=start, step=0.01 if scorer == "itm" else 0.001, format="%.3f",
                          key=f"capfilt_threshold_{scorer}_{folder}")
    row = cf.threshold_table(frame, scorer, threshold).to_dict("records")[0]
    cols = st.columns(4)
    kept_metric(cols[0], "pairs kept", row["pairs kept"], row["originals"] + row["synthetic"])
    kept_metric(cols[1], "originals kept", row["originals kept"], row["originals"])
    kept_metric(cols[2], "synthetic kept", row["synthetic kept"], row["synthetic"])
    if "planted" in row:
        surviving, share_of_kept, genuine = (format_share(row[key], "–") for key in (
            "planted surviving", "planted share of kept originals", "genuine kept"))
        kept_metric(cols[3], "planted surviving", row["planted kept"], row["planted"],
                    help=f"{surviving} of the planted captions are kept; they are {share_of_kept} of the kept "
                         f"originals; {genuine} of the genuine originals are kept")
        st.caption(f"At this threshold the kept originals are {share_of_kept} planted noise; {surviving} of the "
                   f"planted captions survive and {genuine} of the genuine ones.")
    else:
        cols[3].metric("planted surviving", "–", help="the data had no planted noise")
    cutoff = cut if scorer == summary.get("score") else None
    st.plotly_chart(cf.score_histogram(frame, scorer, "planted" if cf.has_planted(frame) else "decision",
                                       cutoff=cutoff, threshold=threshold), key="capfilt_threshold_hist")
    st.markdown("**Threshold sweep**")
    sweep = cf.threshold_table(frame, scorer, cf.threshold_grid(frame, scorer))
    shares = [c for c in ("planted share of kept originals", "planted surviving", "genuine kept") if c in sweep]
    st.dataframe(sweep, hide_index=True, key="capfilt_sweep", column_config={
        "threshold": st.column_config.NumberColumn(format="%.3f"),
        **{c: st.column_config.NumberColumn(format="percent") for c in shares},
    })
    st.caption("Each row: what keeping the captions scored at or above that threshold would keep (the filter "
               "keeps exactly these; `python -m train capfilt --threshold T` writes the dataset).")


def compare_section(folder: Path, summary: dict[str, Any], frame: pd.DataFrame) -> None:
    """This filter beside another CapFilt output's (the same seed of another protocol, first in the list): the
    detection table, the planted and genuine scores of each, and their ROC curves."""
    roots = search_roots()
    others = cf.comparison_order(str(folder), _found(tuple(map(str, roots))))
    if not others:
        st.info("No other CapFilt output to compare with. A study with two protocols (`studies/capfilt.toml`) "
                "writes one a protocol and seed into its `data/`.")
        return
    other = st.selectbox("Compare with", others, key="capfilt_compare_with",
                         format_func=lambda f: shown_path(f, roots),
                         help="Another CapFilt output, those of the same study and seed first.")
    try:
        other_summary, other_frame, _ = _load(other, (mtime_of(Path(other) / "capfilt.json"),
                                                      mtime_of(Path(other) / "capfilt.jsonl")))
    except (CapfiltError, ValueError, TypeError, OSError) as err:
        st.warning(f"Cannot read `{other}`: {err}")
        return
    labels = (shown_path(str(folder), roots), shown_path(other, roots))
    frames = {labels[0]: frame, labels[1]: other_frame}
    table = cf.comparison_table({labels[0]: summary, labels[1]: other_summary})
    if not table.empty:
        st.dataframe(table, hide_index=True, key="capfilt_compare_table", column_config={
            "ROC AUC": st.column_config.NumberColumn(format="%.3f"),
            **{c: st.column_config.NumberColumn(format="percent") for c in (
                "precision", "recall", "originals kept", "images kept", "synthetic kept")},
        })
    common_scorers = [s for s in cf.available_scorers(frame, summary) if s in cf.available_scorers(other_frame)]
    if not common_scorers or not (cf.has_planted(frame) and cf.has_planted(other_frame)):
        st.info("No histograms or ROC curves to compare: both outputs need planted noise and a scorer in common.")
        return
    scorer = pick_scorer(common_scorers, "capfilt_compare_scorer")
    st.plotly_chart(cf.comparison_histograms(frames, scorer), key="capfilt_compare_hist")
    st.caption("Each filter's scores of the planted and the genuine original captions, as the share of each group "
               "in a bin: the less the two overlap, the better a cut-off separates the planted noise.")
    curves = {label: [c for s in common_scorers if (c := cf.planted_roc(f, s)) is not None]
              for label, f in frames.items()}
    st.plotly_chart(cf.comparison_roc(curves), key="capfilt_compare_roc")
    st.caption("Each filter's ROC curves at finding the planted captions: colour the scorer, dash the filter.")


def images_section(frame: pd.DataFrame, images_root: Path, folder: Path) -> None:
    controls = st.columns([2, 1, 3])
    which = controls[0].selectbox("Show", list(cf.IMAGE_FILTERS), key="capfilt_image_filter")
    ids = cf.image_ids(frame, which)
    if not ids:
        st.info(f"No image {which}.")
        return
    pages = math.ceil(len(ids) / IMAGES_PER_PAGE)
    page = int(controls[1].number_input(f"Page (of {pages})", 1, pages, 1, key=f"capfilt_page_{folder}_{which}"))
    controls[2].caption(f"{len(ids):,} images; images `{images_root}`")
    by_image = {image: rows for image, rows in frame.groupby("image_id", sort=False)}
    for image in ids[(page - 1) * IMAGES_PER_PAGE: page * IMAGES_PER_PAGE]:
        rows = by_image[image]
        file_name = str(rows["file_name"].iloc[0])
        with st.container(border=True):
            picture, captions = st.columns([1, 4])
            thumbnail = figures.load_thumbnail(str(images_root / file_name), 160)
            if thumbnail is not None:
                picture.image(thumbnail, caption=f"{file_name} (image {image})", width=160)
            else:
                picture.caption(f"(image not found: {images_root / file_name})")
            captions.table(cf.caption_table(rows))


st.set_page_config(page_title="CapFilt · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("CapFilt")
folder = select_folder()
summary, frame, images_root = load(folder)
summary_section(folder, summary)
scorers = cf.available_scorers(frame, summary)
if not scorers:
    common.stop_with(f"No caption in `{folder}` has a score.", MAKE_ONE)
# Lazy tabs: the page's first render builds the histograms only.
common.lazy_tabs({
    "Scores": lambda: scores_section(summary, frame, scorers),
    "Planted noise (ROC)": lambda: roc_section(summary, frame, scorers),
    "Threshold": lambda: threshold_section(summary, frame, scorers, folder),
    "Images": lambda: images_section(frame, images_root, folder),
    "Compare filters": lambda: compare_section(folder, summary, frame),
}, key=SECTION_KEY)
