"""The Runs home page and pages 1-3 (Training, Alignment, Embeddings) run headless with Streamlit's
AppTest against the tiny run, and against the run folders a researcher really meets: empty, still
being written, without a checkpoint yet, unreadable. Plus the background demo launcher."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from blipcore.paths import PROJECT_ROOT
from blipcore.runs.rundir import RunDir
from dashboard import launcher, projections

REPO = PROJECT_ROOT  # the checkout the installed packages come from
DASHBOARD = REPO / "dashboard"

TIMEOUT = 60


def run_page(monkeypatch, runs_dir: Path, page: str, state: dict | None = None) -> AppTest:
    monkeypatch.setenv("BLIPLAB_RUNS_DIR", str(runs_dir))
    at = AppTest.from_file(str(DASHBOARD / page), default_timeout=TIMEOUT)
    for key, value in (state or {}).items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Every message, caption and markdown text of a page, for 'does it say X' checks."""
    kinds = ("info", "warning", "error", "success", "caption", "markdown")
    return "\n".join(str(e.value) for kind in kinds for e in getattr(at, kind))


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def copy_run(tiny_runs_dir: Path, dest_root: Path, name: str = "tiny") -> RunDir:
    """A private copy of the tiny run (without its resumable state) that a test may modify."""
    shutil.copytree(tiny_runs_dir / "tiny", dest_root / name, ignore=shutil.ignore_patterns("last", "projections"))
    return RunDir(dest_root / name)


# --- Runs (home) -------------------------------------------------------------------------------
def test_home_lists_runs_and_sets_the_selection(monkeypatch, tiny_runs_dir):
    at = run_page(monkeypatch, tiny_runs_dir, "app.py")
    table = at.dataframe[0].value
    row = table[table["run"] == "tiny"].iloc[0]
    assert row["status"] == "completed" and row["epochs"] == 2 and row["progress"] == pytest.approx(1.0)
    assert row["val_loss"] > 0 and "greedy_cider" in table.columns
    assert at.session_state["selected_runs"] == ["tiny"] and at.session_state["selected_run"] == "tiny"
    assert at.get("page_link")  # links to the pages


def test_home_with_no_runs_says_what_to_do(monkeypatch, tmp_path):
    at = run_page(monkeypatch, tmp_path, "app.py")
    assert "No runs" in texts(at)
    assert any(b.label.startswith("Train the demo run") for b in at.button)
    assert not at.dataframe


def test_home_shows_the_log_of_a_failed_demo_launch(monkeypatch, tmp_path):
    (tmp_path / launcher.LOG_FILE).write_text("Traceback (most recent call last):\nModuleNotFoundError: no 'x'\n")
    at = run_page(monkeypatch, tmp_path, "app.py")
    assert "The demo training failed" in texts(at)
    assert "ModuleNotFoundError" in at.code[0].value
    assert any(b.label.startswith("Train the demo run") for b in at.button)  # and it can be tried again


def test_home_lists_unreadable_runs_with_the_reason(monkeypatch, tiny_runs_dir, tmp_path):
    copy_run(tiny_runs_dir, tmp_path)
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "run.json").write_text(json.dumps({"format_version": 99, "status": "completed"}))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_bytes(b"\xff\xfe\x00not json at all")
    at = run_page(monkeypatch, tmp_path, "app.py")
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["future", "status"] == "unreadable" and "version 99" in table.loc["future", "note"]
    assert table.loc["garbage", "status"] == "unreadable" and "not valid JSON" in table.loc["garbage", "note"]
    assert "future" in texts(at) and "garbage" in texts(at)
    run_page(monkeypatch, tmp_path, "views/1_Training.py")  # the other pages skip them


# --- Training ----------------------------------------------------------------------------------
def chart_titles(at: AppTest) -> set[str]:
    return {a["text"] for spec in plotly_specs(at) for a in spec["layout"].get("annotations", [])}


def test_training_page_draws_one_section_per_tab(monkeypatch, tiny_runs_dir):
    at = run_page(monkeypatch, tiny_runs_dir, "views/1_Training.py")
    assert [t.label for t in at.tabs] == ["Losses", "Optimisation", "Retrieval", "Captioning and collapse"]
    assert len(at.get("plotly_chart")) == 1  # lazy tabs: only the open one is drawn
    titles = chart_titles(at)
    assert {"total loss", "ITM loss (image-text matching)"} <= titles and "learning rate" not in titles
    for tab, title in (("Optimisation", "learning rate"), ("Captioning and collapse", "CIDEr"),
                       ("Retrieval", "image→text retrieval R@K (%)")):
        at.session_state["training_section"] = tab
        at.run()
        assert not at.exception and title in chart_titles(at) and "total loss" not in chart_titles(at)
    at.sidebar.radio[0].set_value("epoch")
    at.sidebar.slider[0].set_value(0.0)
    at.run()
    assert not at.exception
    assert plotly_specs(at)[0]["layout"]["xaxis"]["title"]["text"] == "epoch"


def live_run(tiny_runs_dir: Path, root: Path) -> RunDir:
    """A run still being written: status running, a partial last line in metrics.jsonl."""
    run = copy_run(tiny_runs_dir, root, "live")
    run.update_info(status="running", steps_done=8)
    with open(run.metrics_file, "ab") as f:
        f.write(b'{"step": 17, "split": "tra')
    return run


def test_pages_render_a_run_still_being_written(monkeypatch, tiny_runs_dir, tmp_path):
    live_run(tiny_runs_dir, tmp_path)
    home = run_page(monkeypatch, tmp_path, "app.py")
    row = home.dataframe[0].value.iloc[0]
    assert row["status"] == "running" and row["steps"] == "16 / 16"  # steps from metrics.jsonl, not run.json
    training = run_page(monkeypatch, tmp_path, "views/1_Training.py")
    assert training.get("plotly_chart") and any("is training" in p.proto.text for p in training.get("progress"))


def test_run_without_checkpoints_renders_with_a_clear_message(monkeypatch, tiny_runs_dir, tmp_path):
    run = copy_run(tiny_runs_dir, tmp_path, "young")
    for folder in ("checkpoints", "embeddings", "eval"):
        shutil.rmtree(run.path / folder)
    run.update_info(status="running")
    assert run_page(monkeypatch, tmp_path, "views/1_Training.py").get("plotly_chart")  # metrics are there
    for page in ("views/2_Alignment.py", "views/3_Embeddings.py"):
        assert "No run has a checkpoint yet" in texts(run_page(monkeypatch, tmp_path, page))


def test_a_page_url_names_its_run(monkeypatch, tiny_runs_dir, tmp_path):
    for name in ("first", "second"):
        copy_run(tiny_runs_dir, tmp_path, name)
    monkeypatch.setenv("BLIPLAB_RUNS_DIR", str(tmp_path))
    bookmarked = AppTest.from_file(str(DASHBOARD / "views/2_Alignment.py"), default_timeout=TIMEOUT)
    bookmarked.query_params["run"] = "second"
    bookmarked.session_state["selected_run"] = "first"  # the URL's run comes before the one carried over
    bookmarked.run()
    assert bookmarked.sidebar.selectbox[0].value == "second" and bookmarked.session_state["selected_run"] == "second"
    bookmarked.sidebar.selectbox[0].set_value("first").run()  # a choice in the sidebar wins over the URL...
    assert bookmarked.session_state["selected_run"] == "first"
    assert bookmarked.query_params["run"] == "first"  # ...and the URL follows it
    carried = run_page(monkeypatch, tmp_path, "views/3_Embeddings.py", {"selected_run": "second"})
    assert carried.sidebar.selectbox[0].value == "second" and carried.query_params["run"] == "second"
    unknown = AppTest.from_file(str(DASHBOARD / "views/3_Embeddings.py"), default_timeout=TIMEOUT)
    unknown.query_params["run"] = "deleted"
    unknown.run()
    assert not unknown.exception and unknown.sidebar.selectbox[0].value == "first"
    overlaid = AppTest.from_file(str(DASHBOARD / "views/1_Training.py"), default_timeout=TIMEOUT)
    overlaid.query_params["run"] = "second"  # the multi-run picker opens on a link's run too...
    overlaid.run()
    assert overlaid.sidebar.multiselect[0].value == ["second"] and overlaid.session_state["selected_run"] == "second"
    carried_many = run_page(monkeypatch, tmp_path, "views/1_Training.py",
                            {"selected_runs": ["second", "first"], "selected_run": "first"})
    assert carried_many.sidebar.multiselect[0].value == ["second", "first"]  # ...unless runs are carried over,
    assert carried_many.session_state["selected_run"] == "first"  # and it leaves the single-run pages' choice alone


# --- Alignment ---------------------------------------------------------------------------------
def test_alignment_page_shows_the_similarity_matrix(monkeypatch, tiny_runs_dir):
    at = run_page(monkeypatch, tiny_runs_dir, "views/2_Alignment.py")
    assert [t.label for t in at.tabs] == ["Similarity matrix", "Matching vs non-matching", "Retrieval R@K",
                                          "Temperature τ"]
    assert [trace["type"] for spec in plotly_specs(at) for trace in spec["data"]][0] == "heatmap"
    assert len(plotly_specs(at)) == 1  # lazy tabs: the other sections are not drawn yet
    assert "bright diagonal" in texts(at)
    assert len(at.get("image")) == 2  # the chosen row's and column's images
    at.number_input[1].set_value(3)
    at.radio[0].set_value("softmax over captions (ITC's view)")
    at.run()
    assert not at.exception and "caption 3" in texts(at)


@pytest.mark.parametrize("tab, trace_types", [("Matching vs non-matching", {"histogram", "scatter"}),
                                              ("Retrieval R@K", {"scatter"}), ("Temperature τ", {"scatter"})])
def test_alignment_tabs_draw_their_section(monkeypatch, tiny_runs_dir, tab, trace_types):
    at = run_page(monkeypatch, tiny_runs_dir, "views/2_Alignment.py", state={"alignment_section": tab})
    assert {trace["type"] for spec in plotly_specs(at) for trace in spec["data"]} == trace_types


def test_a_click_on_a_heatmap_cell_selects_its_row_and_column(monkeypatch, tiny_runs_dir):
    click = {"selection": {"points": [{"customdata": [5.0, 2.0, 0.1]}], "point_indices": [42], "box": [], "lasso": []}}
    at = run_page(monkeypatch, tiny_runs_dir, "views/2_Alignment.py")
    assert [t.get("name") for t in plotly_specs(at)[0]["data"]] == [None, "selected"]  # no click layer by default
    at.toggle(key="alignment_clickable").set_value(True).run()
    assert "cells" in [t.get("name") for t in plotly_specs(at)[0]["data"]]
    at.session_state["alignment_heatmap"] = click
    at.run()
    assert [n.value for n in at.number_input] == [5, 2]
    assert "sim(image 5, caption 2)" in texts(at)


def test_alignment_page_with_an_epoch_missing_its_embeddings(monkeypatch, tiny_runs_dir, tmp_path):
    run = copy_run(tiny_runs_dir, tmp_path)
    run.embeddings_path(2).unlink()
    at = run_page(monkeypatch, tmp_path, "views/2_Alignment.py")
    assert "Epoch: 1 (the only one so far)" in "\n".join(c.value for c in at.sidebar.caption)


# --- Embeddings --------------------------------------------------------------------------------
def test_embeddings_page_defaults_to_pca_and_caches_it(monkeypatch, tiny_runs_dir, tmp_path):
    run = copy_run(tiny_runs_dir, tmp_path)
    at = run_page(monkeypatch, tmp_path, "views/3_Embeddings.py")
    assert at.sidebar.radio[0].value == "PCA"
    assert any(b.label.startswith("Compute UMAP for all epochs") for b in at.button)
    (chart,) = at.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["line", "point", "line", "point"]
    frames = {d.name: dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in chart.proto.datasets}
    points = frames[spec["layer"][1]["data"]["name"]]
    assert len(points) == 16 and points["thumbnail"].str.startswith("data:image/webp;base64,").all()  # 8 pairs
    assert set(frames[spec["layer"][2]["data"]["name"]]["pair"]) == {0}  # the selected pair drawn on top
    assert (run.path / "projections" / "pca_epoch_002.npz").is_file()
    at.selectbox[0].set_value(3)
    at.run()
    assert not at.exception and [caption for image in at.get("image") for caption in image.captions] == ["image 3"]


def test_embeddings_page_a_click_on_a_point_picks_its_pair(monkeypatch, tiny_runs_dir, tmp_path):
    copy_run(tiny_runs_dir, tmp_path)
    at = run_page(monkeypatch, tmp_path, "views/3_Embeddings.py")
    at.session_state["embedding_plot"] = {"selection": {"pick": [{"pair": 5}]}}  # what the chart sends on a click
    at.run()
    assert not at.exception and at.session_state["embedding_pair"] == 5
    assert [caption for image in at.get("image") for caption in image.captions] == ["image 5"]


def test_embeddings_page_uses_cached_umap_by_default(monkeypatch, tiny_runs_dir, tmp_path):
    run = copy_run(tiny_runs_dir, tmp_path)
    monkeypatch.setitem(projections.PROJECTORS, "umap", projections.pca_2d)  # stands in for the slow fit
    for epoch in run.embedding_epochs():
        projections.layout(run, epoch, "umap")
    at = run_page(monkeypatch, tmp_path, "views/3_Embeddings.py")
    assert at.sidebar.radio[0].value == "UMAP" and not at.button
    assert any("UMAP of 8 images" in c.value for c in at.caption)


# --- the demo launcher -------------------------------------------------------------------------
def test_launcher_starts_one_background_job_and_reads_progress(tmp_path, tiny_runs_dir):
    command = [sys.executable, "-c", "import time; print('training…', flush=True); time.sleep(30)"]
    job = launcher.start_demo(tmp_path, command=command)
    try:
        assert launcher.current_job(tmp_path).pid == job.pid
        assert launcher.start_demo(tmp_path, command=command).pid == job.pid  # no second trainer
        deadline = time.time() + 10
        while "training…" not in launcher.log_tail(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        assert "training…" in launcher.log_tail(tmp_path)
    finally:
        launcher.stop_demo(job)
    deadline = time.time() + 10
    while launcher.current_job(tmp_path) is not None and time.time() < deadline:
        time.sleep(0.1)
    assert launcher.current_job(tmp_path) is None

    run = live_run(tiny_runs_dir, tmp_path)
    assert launcher.progress(run) == (16, 16)  # the partial last line is skipped
    assert launcher.progress(RunDir(tmp_path / "nothing")) == (0, None)


def test_demo_command_trains_or_resumes(tmp_path, tiny_runs_dir):
    fresh = launcher.demo_command(tmp_path)
    assert fresh[1:4] == ["-m", "train", "fit"] and "--preset" in fresh and "--resume" not in fresh
    shutil.copytree(tiny_runs_dir / "tiny", tmp_path / "demo")
    RunDir(tmp_path / "demo").update_info(status="interrupted")
    assert launcher.demo_command(tmp_path)[-1] == "--resume"
