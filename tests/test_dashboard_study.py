"""The Study page: its table, bands, config diff, scatter and side-by-side captions built from hand-made data,
and the page itself run headless (AppTest) on a tiny study (tests/test_study.py's plan, 2 variants x 2 seeds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from blipcore.runs.rundir import STUDY_TABLE
from dashboard import study_figures as sf
from tests.test_dashboard_pages import DASHBOARD, TIMEOUT, texts
from tests.test_dashboard_pages import run_page as run_any_page


def build_tiny_study(shapes_root: Path, folder: Path, seeds: tuple[int, ...] = (0,)) -> Path:
    """tests/test_study.py's tiny plan (variants fast and slow) with `seeds`, run into `folder`, test
    evaluations without METEOR (its Java start costs seconds)."""
    from blipcore.evaluation.evaluator import CheckpointEvaluator
    from blipcore.experiments.study import parse_plan, run_study
    from blipcore.training.trainer import Trainer
    from tests.test_study import tiny_plan
    from train.cli import main

    raw = tiny_plan(shapes_root)
    raw["seeds"] = list(seeds)
    plan = parse_plan(raw)

    def train(cfg, target, resume):
        return Trainer(cfg, target, resume=resume, progress=False).fit()

    def test_without_meteor(run, epoch, strategies):
        return CheckpointEvaluator(run, "test").evaluate(epoch, strategies, meteor=False, progress=False)

    run_study(plan, folder, train, main, log=lambda _: None, test=test_without_meteor)
    return folder


@pytest.fixture(scope="session")
def study_runs_dir(tmp_path_factory, shapes_root) -> Path:
    """A runs folder holding one study, `study-tiny`: variants fast and slow, seeds 0 and 1, 4 steps each."""
    runs = tmp_path_factory.mktemp("study-runs")
    build_tiny_study(shapes_root, runs / "study-tiny", seeds=(0, 1))
    return runs


def run_page(monkeypatch, runs_dir: Path, state: dict | None = None) -> AppTest:
    return run_any_page(monkeypatch, runs_dir, "views/8_Study.py", state)


# --- figure builders on hand-made data -----------------------------------------------------------
ROWS = [
    {"stage": "s", "variant": "a", "decoding": "greedy", "split": "test", "seeds": 2, "chosen_on_dev": 2,
     "epochs": [1, 2], "cider": 0.5, "cider_sd": 0.1, "top_caption_share": 0.25, "top_caption_share_sd": None,
     "meteor": None, "meteor_sd": None, "minutes": 1.5, "minutes_sd": 0.5},
    {"stage": "s", "variant": "b", "decoding": "greedy", "split": "test", "seeds": 1, "chosen_on_dev": 1,
     "epochs": [2], "cider": 0.7, "cider_sd": None, "top_caption_share": 0.5, "top_caption_share_sd": None,
     "meteor": None, "meteor_sd": None, "minutes": 1.0, "minutes_sd": None},
]


def test_the_study_table_has_sortable_means_labelled_by_the_registry_and_shows_mean_plus_minus_sd():
    numbers, texts_ = sf.study_table(ROWS)
    assert list(numbers.columns) == [*sf.ID_COLUMNS, "CIDEr", "share of the most common caption", "minutes"]
    assert "METEOR" not in numbers  # no row has a number for it
    assert numbers["CIDEr"].tolist() == [0.5, 0.7] and numbers["epochs"].tolist() == ["1, 2", "2"]
    assert texts_.at[0, "CIDEr"] == "0.500 ± 0.100" and texts_.at[1, "CIDEr"] == "0.700"
    assert texts_.at[0, "share of the most common caption"] == "25.0%"
    html = sf.styled_table(numbers, texts_).to_html()
    assert "0.500 ± 0.100" in html and "25.0%" in html


def records(values: list[float], val: list[float]) -> list[dict]:
    lines = [{"split": "train", "step": 2 * (i + 1), "loss": v} for i, v in enumerate(values)]
    return lines + [{"split": "val", "step": 2 * len(values), "epoch": 1, "val_loss": v, "time": 9.0} for v in val]


def test_variant_bands_take_mean_spread_and_range_over_seeds():
    runs = {"st/s-a-seed0": records([4.0, 2.0], [3.0]), "st/s-a-seed1": records([6.0, 4.0], [5.0]),
            "st/s-b-seed0": records([5.0, 1.0], [2.0])}
    variants = {name: sf.variant_of(name, None) for name in runs}
    assert variants == {"st/s-a-seed0": "s-a", "st/s-a-seed1": "s-a", "st/s-b-seed0": "s-b"}
    bands = sf.variant_bands(runs, variants, "loss", "train")
    a = bands["s-a"]
    assert a["step"].tolist() == [2, 4] and a["mean"].tolist() == [5.0, 3.0]
    assert a["min"].tolist() == [4.0, 2.0] and a["max"].tolist() == [6.0, 4.0] and a["n"].tolist() == [2, 2]
    assert a["sd"].tolist() == pytest.approx([2**0.5, 2**0.5])
    assert bands["s-b"]["sd"].tolist() == [0.0, 0.0]
    for band in sf.BANDS:
        fig = sf.band_figure(bands, "loss", band=band)
        fills = [t for t in fig.data if t.fill == "toself"]
        assert len(fills) == 1  # only the variant with two seeds has a band
        assert len([t for t in fig.data if t.fill != "toself"]) == 2
    upper = sf.band_figure(bands, "loss", band="±1 sd").data[0].y[:2]
    assert upper == pytest.approx((5 + 2**0.5, 3 + 2**0.5))
    assert sf.variant_bands(runs, variants, "val_loss", "val")["s-a"]["mean"].tolist() == [4.0]
    assert sf.logged_keys(runs.values(), "val") == ["val_loss"]
    with pytest.raises(ValueError):
        sf.band_figure(bands, "loss", band="quartiles")


def test_the_recovery_figure_shows_every_seed_the_means_and_the_target_level():
    from blipcore.experiments.study import Recovery, judge_recovery

    summary = judge_recovery(Recovery("cider", ("clean", "t"), ("noisy", "t"), ("boot", "t"), target=0.5), {
        "reference": {0: 0.30, 1: 0.32}, "degraded": {0: 0.20, 1: 0.22}, "treated": {0: 0.26, 1: 0.28}})
    fig = sf.recovery_figure(summary)
    seeds = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in seeds] == ["clean/t (reference)", "noisy/t (degraded)", "boot/t (treated)"]
    assert [list(t.y) for t in seeds] == [[0.30, 0.32], [0.20, 0.22], [0.26, 0.28]]
    means = [t for t in fig.data if t.showlegend is False]
    assert [t.y[0] for t in means] == pytest.approx([0.31, 0.21, 0.27])
    assert means[0].error_y.array[0] == pytest.approx(summary["reference"]["sd"])
    [target] = fig.layout.shapes  # degraded 0.21 + half the cost 0.10
    assert target.y0 == pytest.approx(0.26) and fig.layout.title.text == "met"
    # the verdict at the figure's top edge (container coordinates), clear of the legend's row above the plot
    assert fig.layout.title.y is not None and (1 - fig.layout.title.y) * fig.layout.height < 10
    assert list(fig.layout.xaxis.range) == [-0.5, 2.5]  # the outer roles' marks are not cut at the edges
    one_seed = judge_recovery(Recovery("cider", ("clean", "t"), ("noisy", "t"), ("boot", "t")), {
        "reference": {0: 0.30}, "degraded": {}, "treated": {0: 0.26}})
    assert len(sf.recovery_figure(one_seed).data) == 4 and not sf.recovery_figure(one_seed).layout.shapes


def test_the_target_figure_shows_every_seed_the_means_and_the_level():
    from blipcore.experiments.study import Target, judge_target

    level, margin = Target("cider", value=0.30), Target("cider", above="nearest-neighbour", by=0.05)
    rows = [{"run": "r/a", **judge_target(level, {0: 0.20, 1: 0.24})}, {"run": "r/b", **judge_target(level, {0: 0.4})},
            {"run": "r/a", **judge_target(margin, {0: 0.20, 1: 0.24}, {0: 0.10, 1: 0.12})}]
    fig = sf.target_figure(rows, level.describe())
    seeds = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in seeds] == ["r/a", "r/b"] and [list(t.y) for t in seeds] == [[0.20, 0.24], [0.4]]
    means = [t for t in fig.data if t.showlegend is False]
    assert [t.y[0] for t in means] == pytest.approx([0.22, 0.4]) and means[1].error_y.visible is False
    [line] = fig.layout.shapes
    assert line.y0 == pytest.approx(0.30) and list(fig.layout.xaxis.range) == [-0.5, 1.5]
    # a margin over a reference row: each seed's number minus its own row's, against the margin to reach
    fig = sf.target_figure(rows, margin.describe())
    assert [list(t.y) for t in fig.data if t.showlegend is not False] == [pytest.approx([0.10, 0.12])]
    assert fig.layout.shapes[0].y0 == pytest.approx(0.05) and "minus nearest-neighbour" in fig.layout.yaxis.title.text


def test_variant_and_seed_come_from_the_config_name():
    config = {"name": "plan/recipes/fast-lr", "train": {"seed": 3}}
    assert sf.variant_of("study-x/recipes-fast-lr-seed3", config) == "recipes/fast-lr"
    assert sf.seed_of("study-x/recipes-fast-lr-seed3", config) == 3
    assert sf.seed_of("study-x/recipes-fast-seed7", {}) == 7


def test_config_diff_keeps_only_the_fields_that_differ_between_variants():
    def config(lr: float, seed: int, smoothing: float = 0.0) -> dict:
        return {"name": f"p/s/{lr}", "model": {"width": 64}, "train": {"lr": lr, "seed": seed,
                                                                         "label_smoothing": smoothing}}

    configs = {"r1": config(1e-3, 0), "r2": config(1e-3, 1), "r3": config(1e-4, 0), "r4": config(1e-4, 1, 0.1)}
    variants = {"r1": "fast", "r2": "fast", "r3": "slow", "r4": "slow"}
    diff = sf.config_diff(configs, variants)
    assert list(diff.columns) == ["fast", "slow"]
    assert list(diff.index) == ["train.label_smoothing", "train.lr"]  # not the name, the seed or the width
    assert diff.at["train.lr", "fast"] == "0.001" and diff.at["train.lr", "slow"] == "0.0001"
    assert diff.at["train.label_smoothing", "slow"] == "0.0 / 0.1"  # its seeds disagree
    assert sf.config_diff({"r1": config(1e-3, 0), "r2": config(1e-3, 1)}, {"r1": "a", "r2": "b"}).empty
    assert sf.flatten({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": 1, "d": [1, 2]}


def test_the_scatter_has_one_point_per_run_coloured_by_variant():
    finals = {name: sf.final_val(lines) for name, lines in {
        "r1": records([1.0], [3.0]), "r2": records([1.0], [2.0]), "r3": records([1.0], [1.0]), "r4": records([], [])
    }.items()}
    assert finals["r1"] == {"val_loss": 3.0} and finals["r4"] == {}
    for name in ("r1", "r2", "r3"):
        finals[name]["greedy_cider"] = {"r1": 0.1, "r2": 0.2, "r3": 0.3}[name]
    points = sf.run_points(finals, {"r1": "a", "r2": "a", "r3": "b"}, {"r1": 0, "r2": 1, "r3": 0})
    assert len(points) == 3 and sf.numeric_keys(points) == ["greedy_cider", "val_loss"]
    fig = sf.scatter_figure(points, "val_loss", "greedy_cider")
    assert [t.name for t in fig.data] == ["a", "b"] and [len(t.x) for t in fig.data] == [2, 1]
    assert fig.data[0].marker.color != fig.data[1].marker.color
    assert fig.layout.xaxis.title.text == "validation total loss" and fig.layout.yaxis.title.text == "greedy CIDEr"
    assert not sf.scatter_figure(pd.DataFrame(), "x", "y").data


def test_captions_side_by_side_match_images_across_variants():
    def sample(image: int, caption: str) -> dict:
        return {"image_id": image, "file_path": f"img{image}.png", "caption": caption, "references": [f"ref {image}"]}

    rows = sf.captions_side_by_side({"a": [sample(1, "x"), sample(2, "y"), sample(3, "z")],
                                     "b": [sample(3, "zz"), sample(1, "xx")]})
    assert [r["image_id"] for r in rows] == [1, 3]  # image 2: only variant a captioned it
    assert rows[0]["captions"] == {"a": "x", "b": "xx"} and rows[0]["references"] == ["ref 1"]
    assert len(sf.captions_side_by_side({"a": [sample(1, "x"), sample(2, "y")]}, limit=1)) == 1
    assert sf.captions_side_by_side({}) == []


# --- the page --------------------------------------------------------------------------------------
TABS = ["Table", "Curves by variant", "Config differences", "Metric against metric", "Captions side by side"]


def test_study_page_shows_the_table_first_and_each_section_in_its_tab(monkeypatch, study_runs_dir):
    at = run_page(monkeypatch, study_runs_dir)
    assert [t.label for t in at.tabs] == TABS
    assert at.sidebar.selectbox[0].value == "study-tiny"
    table = at.dataframe[0].value
    assert {"CIDEr", "share of the most common caption"} <= set(table.columns)
    assert set(table["variant"]) == {"fast", "slow"} and set(table["seeds"]) == {2}
    assert at.get("download_button") and "4 runs (4 completed)" in texts(at)
    runs = at.dataframe[1].value  # every run counted, from its folder, with its minutes and machine
    assert list(runs["run"]) == [f"recipes-{v}-seed{s}" for v in ("fast", "slow") for s in (0, 1)]
    assert set(runs["from"]) == {"run"} and (runs["minutes"] >= 0).all() and runs["device"].notna().all()
    # the plan's recovery question: its table and its figure, the only chart before a tab is opened (lazy tabs)
    assert "Recovery in CIDEr" in texts(at) and "recipes/slow (degraded)" in texts(at)
    # and its targets: every variant judged, the chosen target drawn (the only charts before a tab is opened)
    recovery, target = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    assert {t["name"] for t in recovery["data"] if t.get("showlegend", True)} == {
        "recipes/fast (reference)", "recipes/slow (degraded)", "recipes/fast (treated)"}
    assert "| recipes/fast | 2 |" in texts(at) and at.selectbox(key="study_target").value == "CIDEr ≥ 0.000"
    assert {t["name"] for t in target["data"] if t.get("showlegend", True)} == {"recipes/fast", "recipes/slow"}

    at = run_page(monkeypatch, study_runs_dir, {"study_section": "Curves by variant"})
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    assert len(specs) == 2  # the training loss and a validation metric
    for spec in specs:
        names = {t.get("name") for t in spec["data"] if t.get("fill") != "toself"}
        assert names == {"recipes/fast", "recipes/slow"}
        assert any(t.get("fill") == "toself" for t in spec["data"])  # two seeds: a band per variant

    at = run_page(monkeypatch, study_runs_dir, {"study_section": "Config differences"})
    diff = at.dataframe[0].value
    assert "train.lr" in diff.index and list(diff.columns) == ["recipes/fast", "recipes/slow"]
    assert "train.seed" not in diff.index and "train.batch_size" not in diff.index

    at = run_page(monkeypatch, study_runs_dir, {"study_section": "Metric against metric"})
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert sorted(len(t["x"]) for t in spec["data"]) == [2, 2]  # one point per run, one trace per variant

    at = run_page(monkeypatch, study_runs_dir, {"study_section": "Captions side by side"})
    assert len(at.table) == 4  # four images, each a table of the variants' captions
    assert list(at.table[0].value.index) == ["recipes/fast", "recipes/slow"]
    assert len(at.get("image")) == 4 and "References" in texts(at)  # the thumbnails were found


def test_a_study_with_two_recovery_questions_shows_each_with_its_figure(monkeypatch, study_runs_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(study_runs_dir, runs)
    table = json.loads((runs / "study-tiny" / STUDY_TABLE).read_text())
    first = table["recovery"]
    table["recoveries"] = [{**first, "protocol": "captioner and filter: noisy/tuned"},
                           {**first, "protocol": "captioner: finetuned/captioner, filter: finetuned/filter"}]
    (runs / "study-tiny" / STUDY_TABLE).write_text(json.dumps(table))
    at = run_page(monkeypatch, runs)
    shown = texts(at)
    assert "Recovery: captioner and filter: noisy/tuned" in shown
    assert "Recovery: captioner: finetuned/captioner, filter: finetuned/filter" in shown
    assert "| captioner: finetuned/captioner, filter: finetuned/filter |" in shown  # one table, a row each
    assert len(at.get("plotly_chart")) == 3  # a recovery figure each, and the chosen target's


def test_study_page_without_a_finished_run_says_so(monkeypatch, study_runs_dir, tmp_path):
    study = tmp_path / "study-new"
    study.mkdir()
    (study / STUDY_TABLE).write_text(json.dumps({"name": "new", "preset": "demo", "seeds": [0], "rows": []}))
    at = run_page(monkeypatch, tmp_path)
    assert "has no run yet" in texts(at)
    # a run still without an evaluation: the table says so, the other tabs do not fail
    shutil.copytree(study_runs_dir / "study-tiny" / "recipes-fast-seed0", study / "recipes-fast-seed0",
                    ignore=shutil.ignore_patterns("eval", "checkpoints", "embeddings"))
    (study / "recipes-fast-seed0" / "metrics.jsonl").write_text("")
    for tab in TABS:
        at = run_page(monkeypatch, tmp_path, {"study_section": tab})
        assert at.info, tab


def test_study_page_shows_a_table_of_recorded_runs_whose_folders_are_elsewhere(monkeypatch, study_runs_dir, tmp_path):
    study = tmp_path / "study-tiny"
    study.mkdir()
    table = json.loads((study_runs_dir / "study-tiny" / STUDY_TABLE).read_text())
    table["runs"] = [{**run, "source": "record"} for run in table["runs"]]
    (study / STUDY_TABLE).write_text(json.dumps(table))
    at = run_page(monkeypatch, tmp_path)
    assert "No run folder of this study is here" in texts(at) and not at.tabs
    assert set(at.dataframe[0].value["variant"]) == {"fast", "slow"}
    assert set(at.dataframe[1].value["from"]) == {"record"}


def test_a_study_page_url_names_its_study(monkeypatch, study_runs_dir, tmp_path):
    shutil.copytree(study_runs_dir / "study-tiny", tmp_path / "study-tiny")
    (tmp_path / "study-new").mkdir()  # sorted first, so the page would open it without the URL
    (tmp_path / "study-new" / STUDY_TABLE).write_text(json.dumps({"name": "new", "preset": "demo", "seeds": [0],
                                                                   "rows": []}))
    monkeypatch.setenv("BLIPLAB_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(DASHBOARD / "views/8_Study.py"), default_timeout=TIMEOUT)
    at.query_params["study"] = "study-tiny"
    at.run()
    assert not at.exception and at.sidebar.selectbox[0].value == "study-tiny"
    assert at.session_state["selected_study"] == "study-tiny"
    assert set(at.dataframe[0].value["variant"]) == {"fast", "slow"}
    at.sidebar.selectbox[0].set_value("study-new").run()
    assert at.query_params["study"] == "study-new" and "has no run yet" in texts(at)


def test_study_page_with_no_study_says_how_to_make_one(monkeypatch, tmp_path):
    at = run_page(monkeypatch, tmp_path)
    assert "No study" in texts(at) and "python -m train study" in texts(at)
