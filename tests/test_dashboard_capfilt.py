"""The CapFilt page: its histograms, ROC curves, threshold table, caption tables and the comparison of two
filters built from hand-made capfilt.jsonl records, and the page itself run headless (AppTest) on hand-made
`python -m train capfilt` folders (capfilt.json, capfilt.jsonl and a few tiny PNG images; no model), damaged ones
included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from blipcore import paths
from blipcore.evaluation.matching import roc_auc
from blipcore.experiments.capfilt import scorer_report
from dashboard import capfilt_figures as cf
from tests.test_dashboard_pages import plotly_specs, texts
from tests.test_dashboard_pages import run_page as run_any_page

# (image, origin, index, planted, itm, itc): 4 images with 2 originals and 1 synthetic caption each; 3 of the 8
# originals planted. The filter kept ITM >= 0.5: 5 originals (1 planted) and 2 synthetic captions.
CAPTIONS = [
    (1, "original", 0, False, 0.90, 0.40), (1, "original", 1, True, 0.20, 0.05), (1, "synthetic", 0, None, 0.70, 0.30),
    (2, "original", 2, False, 0.80, 0.35), (2, "original", 3, True, 0.60, 0.10), (2, "synthetic", 0, None, 0.30, 0.15),
    (3, "original", 4, False, 0.40, 0.20), (3, "original", 5, False, 0.95, 0.45), (3, "synthetic", 0, None, 0.55, 0.25),
    (4, "original", 6, True, 0.10, 0.02), (4, "original", 7, False, 0.75, 0.38), (4, "synthetic", 0, None, 0.05, 0.01),
]
CUTOFF = 0.5
ITM_AUC = 14 / 15  # planted (0.2, 0.6, 0.1) below genuine (0.9, 0.8, 0.4, 0.95, 0.75): all pairs but 0.6 > 0.4


def make_records(planted: bool = True) -> list[dict]:
    """CAPTIONS as capfilt.jsonl lines (kept: ITM >= CUTOFF), and image 5 unreadable (capfilt writes no scores)."""
    lines = [{"image_id": image, "file_name": f"img{image}.png", "origin": origin, "index": index,
              "text": f"{origin} caption {index} of image {image}", "planted": flag if planted else None,
              "itm": itm, "itc": itc, "kept": itm >= CUTOFF}
             for image, origin, index, flag, itm, itc in CAPTIONS]
    return lines + [{"image_id": 5, "file_name": "img5.png", "origin": "unreadable",
                     "text": "img5.png: cannot identify image file", "kept": False}]


def better_records() -> list[dict]:
    """make_records as a better filter scores them (BLIP's, fine-tuned on clean captions): every planted original
    below every genuine one by ITM (AUC 1), the kept flags of the same cut-off."""
    lines = make_records()
    for line in lines:
        if line.get("planted"):
            line.update(itm=line["itm"] / 10, kept=line["itm"] / 10 >= CUTOFF)
    return lines


def make_capfilt_folder(out: Path, images: Path, planted: bool = True, lines: list[dict] | None = None) -> Path:
    """A `python -m train capfilt` output folder for make_records (or `lines`), its images (1-4; image 5 is
    missing) in `images`: the summary's planted report comes from blipcore.experiments.capfilt.scorer_report, as
    the command's does."""
    images.mkdir(parents=True, exist_ok=True)
    for image, colour in zip(range(1, 5), ("red", "green", "blue", "yellow"), strict=True):
        Image.new("RGB", (16, 12), colour).save(images / f"img{image}.png")
    lines = lines or make_records(planted)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capfilt.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = {
        "captioner": "runs/noisy:3", "filter": "runs/noisy:4", "score": "itm", "scorers": ["itm", "itc"],
        "threshold": CUTOFF, "keep_fraction": None, "cutoff": CUTOFF, "synthetic_per_image": 1,
        "decoding": "nucleus", "images_root": str(images.resolve()),
        "counts": {"images": 5, "images_kept": 4, "unreadable": 1, "original": 8, "synthetic": 4,
                   "kept_original": 5, "kept_synthetic": 2},
        "planted": planted_report(lines),
    }
    (out / "capfilt.json").write_text(json.dumps(summary))
    return out


def planted_report(lines: list[dict]) -> dict | None:
    """capfilt.json's "planted" entry for `lines`, by blipcore.experiments.capfilt.scorer_report as the command
    writes it."""
    scored = [line for line in lines if line["origin"] != "unreadable"]
    return scorer_report(scored, ["itm", "itc"], "itm", [line["kept"] for line in scored])


@pytest.fixture
def frame():
    return cf.records_frame(make_records())


# --- figure builders on hand-made records ------------------------------------------------------------
def test_records_frame_reads_nulls_and_missing_fields(frame):
    assert list(frame.columns) == list(cf.COLUMNS) and len(frame) == 13
    unreadable = frame[frame["origin"] == "unreadable"].iloc[0]
    assert math.isnan(unreadable["itm"]) and unreadable["planted"] is pd.NA and not unreadable["kept"]
    assert frame["planted"].sum() == 3 and frame["planted"].isna().sum() == 5  # 4 synthetic + the unreadable
    assert cf.has_planted(frame) and not cf.has_planted(cf.records_frame(make_records(planted=False)))
    assert cf.available_scorers(frame, {"score": "itc"}) == ["itc", "itm"]
    odd = cf.records_frame([{"image_id": {"x": 1}, "index": "first", "origin": None, "itm": "high", "kept": "yes"}])
    assert odd.loc[0, "origin"] == "?" and math.isnan(odd.loc[0, "itm"]) and not odd.loc[0, "kept"]
    assert list(cf.caption_table(odd).index) == ["?"] and cf.image_ids(odd) == ["{'x': 1}"]
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        cf.records_frame([make_records()[0], [1, 2]])


def test_histograms_count_each_group_and_draw_the_cutoff(frame):
    groups = {by: {g: len(v) for g, v in cf.histogram_groups(frame, "itm", by).items()} for by in cf.GROUPINGS}
    assert groups == {"decision": {"kept": 7, "dropped": 5}, "origin": {"original": 8, "synthetic": 4},
                      "planted": {"planted": 3, "genuine": 5}}
    assert sorted(cf.histogram_groups(frame, "itm", "planted")["planted"]) == [0.1, 0.2, 0.6]
    fig = cf.score_histogram(frame, "itm", "decision", cutoff=CUTOFF, threshold=0.7)
    assert {t.legendgroup: sum(t.y) for t in fig.data} == {"kept": 7, "dropped": 5}
    assert fig.data[0].x == fig.data[1].x and len(fig.data[0].x) == 40  # shared bins
    scores = cf.histogram_groups(frame, "itm", "decision")  # numpy's counts on the same 40 bins: the reference
    edges = np.linspace(min(map(min, scores.values())), max(map(max, scores.values())), 41)
    assert [list(t.y) for t in fig.data] == [np.histogram(scores[t.legendgroup], edges)[0].tolist() for t in fig.data]
    assert [s.x0 for s in fig.layout.shapes] == [CUTOFF, 0.7]
    assert fig.layout.xaxis.title.text == "ITM match probability"
    assert not cf.score_histogram(frame, "itm", "decision").layout.shapes
    assert cf.histogram_groups(cf.records_frame(make_records(planted=False)), "itm", "planted") == {}
    with pytest.raises(ValueError):
        cf.histogram_groups(frame, "itm", "colour")


def test_roc_curves_match_blipcore_metrics_and_name_their_auc(frame):
    itm, itc = cf.planted_roc(frame, "itm"), cf.planted_roc(frame, "itc")
    originals = [c for c in CAPTIONS if c[1] == "original"]
    expected = roc_auc([-c[4] for c in originals], [c[3] for c in originals])
    assert itm.auc == pytest.approx(expected) == pytest.approx(ITM_AUC)
    assert itc.auc == pytest.approx(1.0) and (itm.planted, itm.genuine) == (3, 5)
    assert (itm.fpr[0], itm.tpr[0], itm.fpr[-1], itm.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert itm.score[0] == -np.inf and itm.score[1] == pytest.approx(0.1)  # the lowest score is dropped first
    assert np.all(np.diff(itm.fpr) >= 0) and np.all(np.diff(itm.tpr) >= 0)
    fig = cf.roc_figure([itm, itc])
    assert [t.name for t in fig.data] == ["chance (AUC 0.500)", "ITM (AUC 0.933)", "ITC (AUC 1.000)"]
    assert list(fig.data[0].x) == [0, 1] and list(fig.data[0].y) == [0, 1]
    assert fig.to_json()  # -inf is not JSON: the first point's score is drawn as null
    assert cf.planted_roc(cf.records_frame(make_records(planted=False)), "itm") is None


def test_threshold_table_counts_what_each_threshold_keeps(frame):
    table = cf.threshold_table(frame, "itm", [0.0, CUTOFF, 0.7, 1.0]).set_index("threshold")
    at_cut = table.loc[CUTOFF]
    assert (at_cut["pairs kept"], at_cut["originals kept"], at_cut["originals"]) == (7, 5, 8)
    assert (at_cut["synthetic kept"], at_cut["synthetic"], at_cut["planted kept"], at_cut["planted"]) == (2, 4, 1, 3)
    assert at_cut["planted share of kept originals"] == pytest.approx(1 / 5)
    assert at_cut["planted surviving"] == pytest.approx(1 / 3) and at_cut["genuine kept"] == pytest.approx(4 / 5)
    assert table.loc[0.7, ["pairs kept", "originals kept", "planted kept"]].tolist() == [5, 4, 0]
    assert table.loc[0.0, "pairs kept"] == 12 and table.loc[0.0, "planted share of kept originals"] == 3 / 8
    assert table.loc[1.0, "pairs kept"] == 0 and math.isnan(table.loc[1.0, "planted share of kept originals"])
    # the filter's own decision: the cut-off reproduces the kept flags
    assert at_cut["pairs kept"] == int(frame["kept"].sum())
    plain = cf.threshold_table(cf.records_frame(make_records(planted=False)), "itc", 0.2)
    assert plain["pairs kept"].tolist() == [7] and not set(cf.PLANTED_COLUMNS) & set(plain.columns)
    assert cf.threshold_grid(frame, "itm").tolist() == pytest.approx([i / 10 for i in range(11)])
    assert cf.score_range(frame, "itc") == (0.01, 0.45)


def test_detection_table_and_caption_tables(frame):
    table = cf.detection_table({"score": "itm", "planted": planted_report(make_records())}).set_index("scorer")
    assert table.loc["itm", "ROC AUC"] == pytest.approx(ITM_AUC) and table.loc["itm", "decided"]
    assert table.loc["itm", "precision"] == pytest.approx(2 / 3) and table.loc["itm", "originals dropped"] == 3
    assert not table.loc["itc", "decided"] and table.loc["itc", "recall"] == pytest.approx(1.0)
    assert cf.detection_table({"planted": None}).empty
    rows = frame[frame["image_id"] == 1].iloc[::-1]  # any order: originals first, by index
    shown = cf.caption_table(rows)
    assert list(shown.index) == ["original 0", "original 1", "synthetic 0"]
    assert shown["itm"].tolist() == ["0.900", "0.200", "0.700"]
    assert shown["kept"].tolist() == ["kept", "dropped", "kept"]
    assert shown["planted"].tolist() == ["genuine", "planted", ""]
    assert cf.caption_table(frame[frame["image_id"] == 5])["itm"].tolist() == ["–"]
    assert cf.image_ids(frame) == [1, 2, 3, 4, 5]
    assert cf.image_ids(frame, "with a planted caption") == [1, 2, 4]
    assert cf.image_ids(frame, "with a dropped original") == [1, 3, 4]
    assert cf.image_ids(frame, "unreadable") == [5]


def test_the_summary_names_the_run_a_fine_tuned_filter_started_from():
    summary = {"filter_init": {"run": "/study/noisy-tuned-seed0", "new": {}, "dropped": {"text_decoder": 40}},
               "captioner_init": {"run": "/study/noisy-tuned-seed0", "new": {"itm_head": 2}}}
    assert cf.init_note(summary, "filter") == " (fine-tuned from `noisy-tuned-seed0`)"
    assert cf.init_note(summary, "captioner") == " (fine-tuned from `noisy-tuned-seed0`; started fresh: itm_head)"
    assert cf.init_note({"filter_init": None}, "filter") == cf.init_note({}, "filter") == ""


def test_two_filters_compare_side_by_side(frame):
    better = cf.records_frame(better_records())
    frames = {"noisy model": frame, "fine-tuned": better}
    # the other CapFilt folders, likeliest first: beside it and of its seed, beside it, elsewhere
    found = ["/s/data/boot-seed0", "/s/data/boot-seed1", "/s/data/blip-seed1", "/s/data/blip-seed0", "/t/blip-seed0"]
    assert cf.comparison_order("/s/data/boot-seed0", found) == [
        "/s/data/blip-seed0", "/s/data/blip-seed1", "/s/data/boot-seed1", "/t/blip-seed0"]
    summaries = {"noisy model": {"score": "itm", "planted": planted_report(make_records()),
                                 "counts": {"original": 8, "kept_original": 5, "images": 5, "images_kept": 4,
                                            "synthetic": 4, "kept_synthetic": 2}},
                 "fine-tuned": {"score": "itm", "planted": planted_report(better_records())}}
    table = cf.comparison_table(summaries).set_index(["filter", "scorer"])
    assert table.loc[("noisy model", "itm"), "ROC AUC"] == pytest.approx(ITM_AUC)
    assert table.loc[("fine-tuned", "itm"), "ROC AUC"] == pytest.approx(1.0)
    assert table.loc[("noisy model", "itm"), ["originals kept", "images kept", "synthetic kept"]].tolist() == [
        5 / 8, 4 / 5, 2 / 4]
    assert math.isnan(table.loc[("fine-tuned", "itm"), "images kept"])  # no counts: no share
    # one panel a filter, planted and genuine as shares of each group on the same bins
    fig = cf.comparison_histograms(frames, "itm")
    assert [a.text for a in fig.layout.annotations] == ["noisy model", "fine-tuned"]
    assert [t.legendgroup for t in fig.data] == ["planted", "genuine"] * 2
    assert all(sum(t.y) == pytest.approx(1.0) for t in fig.data) and len({tuple(t.x) for t in fig.data}) == 1
    assert [sum(t.customdata) for t in fig.data] == [3, 5, 3, 5]
    assert [t.xaxis for t in fig.data] == ["x", "x", "x2", "x2"]
    curves = {label: [cf.planted_roc(f, s) for s in ("itm", "itc")] for label, f in frames.items()}
    roc = cf.comparison_roc(curves)
    assert [t.name for t in roc.data] == ["chance (AUC 0.500)", "noisy model · ITM (AUC 0.933)",
                                          "noisy model · ITC (AUC 1.000)", "fine-tuned · ITM (AUC 1.000)",
                                          "fine-tuned · ITC (AUC 1.000)"]
    assert [t.line.dash for t in roc.data[1:]] == ["solid", "solid", "dash", "dash"]
    assert roc.data[1].line.color == roc.data[3].line.color == cf.SCORER_COLOURS["itm"]


# --- the page --------------------------------------------------------------------------------------
TABS = ["Scores", "Planted noise (ROC)", "Threshold", "Images", "Compare filters"]


def run_page(monkeypatch, runs_dir: Path, state: dict | None = None) -> AppTest:
    return run_any_page(monkeypatch, runs_dir, "views/9_CapFilt.py", state)


def metrics(at: AppTest) -> dict[str, str]:
    """Each metric's value, with its small line beneath (the share of the total) in brackets."""
    return {m.label: f"{m.value} ({m.delta})" if m.delta else m.value for m in at.metric}


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """A runs folder with a study whose capfilt stage wrote `<study>/data/boot`."""
    make_capfilt_folder(tmp_path / "runs" / "study-boot" / "data" / "boot", tmp_path / "images")
    return tmp_path / "runs"


def test_capfilt_page_shows_the_summary_and_the_histograms(monkeypatch, runs_dir):
    at = run_page(monkeypatch, runs_dir)
    assert [t.label for t in at.tabs] == TABS
    assert at.sidebar.selectbox[0].value == str(runs_dir / "study-boot" / "data" / "boot")
    shown = metrics(at)
    assert shown["images kept"] == "4 (80% of 5)" and shown["original captions kept"] == "5 (62% of 8)"
    assert shown["synthetic captions kept"] == "2 (50% of 4)" and shown["unreadable images"] == "1"
    assert "runs/noisy:3" in texts(at) and "3 of 8" in texts(at)
    detection = at.dataframe[0].value.set_index("scorer")
    assert detection.loc["itm", "ROC AUC"] == pytest.approx(ITM_AUC)
    specs = plotly_specs(at)
    assert len(specs) == 3  # kept / dropped, original / synthetic, planted / genuine
    assert [sum(t["y"]) for t in specs[0]["data"]] == [7, 5]  # captions counted per group
    assert [sum(t["y"]) for t in specs[2]["data"]] == [3, 5]
    assert specs[0]["layout"]["shapes"][0]["x0"] == CUTOFF


def test_capfilt_page_roc_threshold_and_images(monkeypatch, runs_dir):
    at = run_page(monkeypatch, runs_dir, {"capfilt_section": "Planted noise (ROC)"})
    names = [t["name"] for t in plotly_specs(at)[0]["data"]]
    assert names == ["chance (AUC 0.500)", "ITM (AUC 0.933)", "ITC (AUC 1.000)"]

    at = run_page(monkeypatch, runs_dir, {"capfilt_section": "Threshold"})
    assert at.slider[0].value == pytest.approx(CUTOFF)
    assert metrics(at)["pairs kept"] == "7 (58% of 12)" and metrics(at)["planted surviving"] == "1 (33% of 3)"
    at.slider[0].set_value(0.7).run()
    assert not at.exception
    assert metrics(at)["pairs kept"] == "5 (42% of 12)" and metrics(at)["originals kept"] == "4 (50% of 8)"
    assert metrics(at)["planted surviving"] == "0 (0% of 3)"
    sweep = at.dataframe[-1].value
    assert len(sweep) == 11 and sweep["pairs kept"].iloc[0] == 12 and sweep["pairs kept"].iloc[-1] == 0
    at.radio[0].set_value("itc").run()  # the ITC slider moves over the observed cosine similarities
    assert not at.exception and (at.slider[0].min, at.slider[0].max) == (0.01, 0.45)

    at = run_page(monkeypatch, runs_dir, {"capfilt_section": "Images"})
    assert len(at.table) == 4 and len(at.get("image")) == 4  # the first page: images 1-4, thumbnails found
    assert list(at.table[0].value.index) == ["original 0", "original 1", "synthetic 0"]
    at.number_input[0].set_value(2).run()
    assert len(at.table) == 1 and "image not found" in texts(at)  # image 5: unreadable, its file missing
    at.selectbox(key="capfilt_image_filter").set_value("with a planted caption").run()
    assert len(at.table) == 3


def test_capfilt_page_compares_two_filters_of_one_seed(monkeypatch, runs_dir, tmp_path):
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)  # not the checkout's data/, which may hold outputs
    data = runs_dir / "study-boot" / "data"
    make_capfilt_folder(data / "blip-boot", tmp_path / "images", lines=better_records())
    at = run_page(monkeypatch, runs_dir, {"capfilt_section": "Compare filters", "selected_capfilt": str(data / "boot")})
    assert at.selectbox(key="capfilt_compare_with").value == str(data / "blip-boot")
    table = at.dataframe[-1].value  # after the summary's detection table
    assert table["filter"].tolist() == ["runs/study-boot/data/boot"] * 2 + ["runs/study-boot/data/blip-boot"] * 2
    assert table["ROC AUC"].tolist() == pytest.approx([ITM_AUC, 1.0, 1.0, 1.0])
    histograms, roc = plotly_specs(at)
    assert len(histograms["data"]) == 4 and len(roc["data"]) == 5
    make_capfilt_folder(tmp_path / "solo" / "boot", tmp_path / "images")
    at = run_page(monkeypatch, tmp_path / "solo", {"capfilt_section": "Compare filters"})
    assert "No other CapFilt output" in texts(at)  # one folder: nothing to compare with


def test_capfilt_page_without_planted_noise_says_why_there_is_no_roc(monkeypatch, tmp_path):
    make_capfilt_folder(tmp_path / "runs" / "boot", tmp_path / "images", planted=False)
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_section": "Planted noise (ROC)"})
    assert "No ROC curves" in texts(at) and "noise.jsonl" in texts(at) and not at.get("plotly_chart")
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_section": "Threshold"})
    assert metrics(at)["pairs kept"] == "7 (58% of 12)" and metrics(at)["planted surviving"] == "–"


def test_capfilt_page_reads_a_typed_folder_and_says_what_is_wrong_with_a_damaged_one(monkeypatch, tmp_path):
    good = make_capfilt_folder(tmp_path / "elsewhere" / "boot", tmp_path / "images")
    (tmp_path / "runs").mkdir()
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(good)})
    assert metrics(at)["original captions kept"] == "5 (62% of 8)"

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "capfilt.json").write_text("{not json")
    (damaged / "capfilt.jsonl").write_text("")
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert "Cannot show" in texts(at) and "not valid JSON" in texts(at) and not at.metric

    (damaged / "capfilt.json").write_text(json.dumps({"score": "itm"}))
    (damaged / "capfilt.jsonl").write_text('{"image_id": 1, "origin": "original"}\n[1, 2]\n')
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert "line 2 is not a JSON object" in texts(at)

    (damaged / "capfilt.jsonl").unlink()
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert "unreadable CapFilt record" in texts(at)

    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(tmp_path / "nowhere")})
    assert "no capfilt.json" in texts(at)

    (damaged / "capfilt.json").write_text(json.dumps({"images_root": 5, "scorers": 3, "counts": [], "planted": 1}))
    (damaged / "capfilt.jsonl").write_text("\n".join(json.dumps(line) for line in make_records()))
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert "Cannot show" in texts(at)  # a number as the image folder

    (damaged / "capfilt.json").write_text(json.dumps({"scorers": 3, "counts": [], "planted": 1}))
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert metrics(at)["original captions kept"] == "? (of ?)" and at.get("plotly_chart")  # the records still show
    for tab in TABS[1:]:
        run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged), "capfilt_section": tab})

    (damaged / "capfilt.jsonl").write_text(json.dumps({"image_id": 1, "origin": "unreadable", "kept": False}) + "\n")
    at = run_page(monkeypatch, tmp_path / "runs", {"capfilt_path": str(damaged)})
    assert "has a score" in texts(at)  # a summary without counts, and no caption scored: still a message


def test_capfilt_page_with_no_output_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)  # not the checkout's data/, which may hold outputs
    at = run_page(monkeypatch, tmp_path)
    assert "No CapFilt output" in texts(at) and "python -m train capfilt" in texts(at)
