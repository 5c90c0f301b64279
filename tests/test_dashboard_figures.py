"""The dashboard's figure builders (dashboard/figures.py) and embedding projections
(dashboard/projections.py) on small hand-made data: no Streamlit, no trained model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from blipcore.runs.rundir import RunDir, RunError
from dashboard import figures, projections
from dashboard.figures import Line, Panel


# --- smoothing and training curves -------------------------------------------------------------
def test_ema_matches_tensorboard_debiased_average():
    assert figures.ema([1.0, 2.0], 0.5) == pytest.approx([1.0, 5.0 / 3.0])  # (0.25 + 1) / (1 - 0.25)
    assert figures.ema([3.0, 1.0, 4.0], 0.0) == pytest.approx([3.0, 1.0, 4.0])
    smoothed = figures.ema([1.0, None, float("nan"), 2.0], 0.5)  # gaps stay gaps and do not move the average
    assert math.isnan(smoothed[1]) and math.isnan(smoothed[2])
    assert smoothed[[0, 3]] == pytest.approx([1.0, 5.0 / 3.0])
    with pytest.raises(ValueError):
        figures.ema([1.0], 1.0)


def records(run_itm: bool) -> list[dict]:
    """metrics.jsonl-like lines: 4 train lines, one val line; `itm` only when run_itm, one None lr."""
    lines = []
    for step in (1, 2, 3, 4):
        line = {"step": step, "epoch": step / 4, "split": "train", "loss": 10.0 - step, "itc": 3.0, "lm": 5.0,
                "lr": None if step == 2 else 1e-3, "temperature": 0.07}
        if run_itm:
            line["itm"] = 0.7
        lines.append(line)
    lines.append({"step": 4, "epoch": 1, "split": "val", "val_loss": 6.5, "i2t_r1": 25.0, "greedy_cider": 0.3})
    return lines


def test_metric_grid_overlays_runs_and_skips_missing_series():
    frames = {"a": figures.metrics_frame(records(True)), "b": figures.metrics_frame(records(False))}
    panels = (Panel("loss", (Line("loss", "train"), Line("val_loss", "val", smooth=False))),
              Panel("ITM", (Line("itm", "train"),)), Panel("nothing", (Line("absent", "x"),)),
              Panel("lr", (Line("lr", "lr"),)))
    fig = figures.metric_grid(frames, panels, x="step", smoothing=0.5)
    assert isinstance(fig, go.Figure)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["loss", "ITM", "lr"]  # the panel nobody logged is dropped
    names = [t.name for t in fig.data]
    assert names.count("b") == 2  # run b has no ITM: only its lr panel (raw + smoothed)
    smoothed = [t for t in fig.data if t.name == "a · train" and t.opacity is None]
    assert list(smoothed[0].y) == pytest.approx(figures.ema([9.0, 8.0, 7.0, 6.0], 0.5))
    raw = [t for t in fig.data if t.name == "a · train" and t.opacity == 0.25]
    assert list(raw[0].y) == [9.0, 8.0, 7.0, 6.0]
    val = [t for t in fig.data if t.name == "a · val"][0]
    assert list(val.x) == [4] and list(val.y) == [6.5] and val.mode == "lines+markers"
    lr = [t for t in fig.data if t.name == "a" and t.xaxis == "x3" and t.opacity == 0.25][0]  # third panel
    assert list(lr.x) == [1, 3, 4]  # the None lr is dropped, not plotted as 0
    colours = {t.line.color for t in fig.data if t.name.startswith("a")}
    assert colours == {figures.run_colour(0)}


def test_metric_grid_by_epoch_without_smoothing():
    frames = {"a": figures.metrics_frame(records(True))}
    fig = figures.metric_grid(frames, (Panel("loss", (Line("loss", "train"),)),), x="epoch", smoothing=0.0)
    assert len(fig.data) == 1 and list(fig.data[0].x) == [0.25, 0.5, 0.75, 1.0]
    assert list(fig.data[0].y) == [9.0, 8.0, 7.0, 6.0]


def test_reference_rows_are_drawn_as_grey_steps_beside_the_strategies():
    frames = {"a": figures.metrics_frame([
        {"step": s, "epoch": s / 2, "split": "val", "greedy_cider": c, "most-frequent_cider": 0.1,
         "nearest-neighbour_cider": nn} for s, c, nn in ((2, 0.05, 0.2), (4, 0.3, 0.25))
    ])}
    panel = (Panel("CIDEr", (Line("greedy_cider", "greedy", smooth=False),
                             Line("most-frequent_cider", "most-frequent", smooth=False, reference=True),
                             Line("nearest-neighbour_cider", "nearest-neighbour", smooth=False, reference=True))),)
    fig = figures.metric_grid(frames, panel, x="step")
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"a · greedy", "a · most-frequent", "a · nearest-neighbour"}
    for name in ("a · most-frequent", "a · nearest-neighbour"):
        assert by_name[name].line.color == figures.REFERENCE_COLOUR and by_name[name].line.shape == "hv"
    assert list(by_name["a · most-frequent"].y) == [0.1, 0.1]
    assert by_name["a · greedy"].line.color != figures.REFERENCE_COLOUR


# --- alignment ---------------------------------------------------------------------------------
def test_similarity_heatmap_shows_the_matrix_and_marks_the_selected_cell():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    sim = figures.similarity_matrix(images, texts)
    assert sim == pytest.approx(images @ texts.T)
    assert figures.similarity_matrix(images, texts, 2).shape == (2, 2)
    fig = figures.similarity_heatmap(sim, ["a cat", "a dog", "a bird"], selected=(2, 1))
    heatmap = fig.data[0]
    assert heatmap.type == "heatmap" and np.asarray(heatmap.z) == pytest.approx(sim)
    assert list(heatmap.y) == ["0: a cat", "1: a dog", "2: a bird"]
    assert "caption" in heatmap.hovertemplate and "%{z" in heatmap.hovertemplate
    marker = fig.data[1]
    assert (marker.x[0], marker.y[0]) == ("1: a dog", "2: a bird")

    clickable = figures.similarity_heatmap(sim, ["a cat", "a dog", "a bird"], clickable=True)
    cells = clickable.data[1]  # one invisible marker per cell, for Streamlit's point selection
    assert len(cells.x) == 9 and (cells.x[5], cells.y[5]) == ("2: a bird", "1: a dog")
    assert list(cells.customdata[5]) == pytest.approx([1, 2, sim[1, 2]])
    assert cells.marker.opacity == 0 and clickable.data[0].hoverinfo == "skip"


def test_clicked_customdata_reads_streamlit_selection_events():
    event = {"selection": {"points": [{"curve_number": 0, "x": 1.0}, {"customdata": {"0": 3, "1": 4}}]}}
    assert figures.clicked_customdata(event) == [3, 4]
    assert figures.clicked_customdata({"selection": {"points": [{"customdata": 7}]}}) == [7]
    assert figures.clicked_customdata({"selection": {"points": [{"customdata": [1, 2, 0.5]}]}}) == [1, 2, 0.5]
    assert figures.clicked_customdata(None) is None and figures.clicked_customdata({"selection": {}}) is None


def test_row_softmax_and_pair_stats():
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    probs = figures.row_softmax(sim, 0.1)
    assert probs.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert probs[0, 0] == pytest.approx(1 / (1 + math.exp(-8)))
    stats = figures.pair_stats(sim)
    assert stats["diag_mean"] == pytest.approx(0.85) and stats["off_mean"] == pytest.approx(0.15)
    assert stats["diag_p10"] == pytest.approx(0.81) and stats["diag_p90"] == pytest.approx(0.89)


def test_similarity_bands_histogram_and_retrieval_figures():
    stats = [figures.pair_stats(np.eye(3) * s + 0.1) for s in (0.1, 0.5)]
    bands = figures.similarity_bands([1, 2], stats)
    means = [t for t in bands.data if t.mode == "lines+markers"]
    assert [t.name.split()[0] for t in means] == ["matching", "non-matching"]
    assert list(means[0].y) == pytest.approx([0.2, 0.6]) and list(means[1].y) == pytest.approx([0.1, 0.1])
    hist = figures.similarity_histogram(np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert sorted(len(t.x) for t in hist.data) == [2, 2]
    retrieval = figures.retrieval_figure([1, 2], [{"i2t_r1": 10.0, "t2i_r1": 5.0}, {"i2t_r1": 20.0, "t2i_r1": None}])
    by_name = {t.name: t for t in retrieval.data}
    assert set(by_name) == {"image→text R@1", "text→image R@1"}
    assert list(by_name["image→text R@1"].y) == [10.0, 20.0] and list(by_name["text→image R@1"].x) == [1]


# --- embeddings --------------------------------------------------------------------------------
def _layers(chart) -> list[dict]:
    """The chart's layers with their rows (Altair keeps each layer's data in the spec's datasets)."""
    spec = chart.to_dict()
    return [{**layer, "rows": spec["datasets"][layer.get("data", spec.get("data"))["name"]]} for layer in spec["layer"]]


def test_embedding_chart_links_pairs_shows_thumbnails_on_hover_and_marks_the_selection():
    rng = np.random.default_rng(0)
    image_xy, text_xy = rng.normal(size=(5, 2)), rng.normal(size=(5, 2)) * 3
    captions, names = [f"caption {i}" for i in range(5)], [f"{i}.png" for i in range(5)]
    pictures = [figures.thumbnail_uri(Image.new("RGB", (4, 4), (i * 50, 0, 0))) for i in range(5)]
    chart = figures.embedding_chart(image_xy, text_xy, captions, names, pictures, links=True, selected=3)
    link, dots, selected_line, selected_ring = _layers(chart)
    assert link["mark"]["type"] == "line" and link["encoding"]["detail"]["field"] == "pair"  # a line per pair
    rows = dots["rows"]
    assert len(rows) == 10 and [r["modality"] for r in rows] == ["image"] * 5 + ["text"] * 5
    assert (rows[2]["x"], rows[7]["y"]) == (image_xy[2, 0], text_xy[2, 1])
    assert rows[7]["caption"] == "caption 2" and rows[7]["thumbnail"] == pictures[2]  # a caption shows its image
    tooltip = {t["title"]: t["field"] for t in dots["encoding"]["tooltip"]}
    assert tooltip["title"] == "caption" and tooltip["image"] == "thumbnail"  # vega-tooltip draws "image" as <img>
    colour = dots["encoding"]["color"]["scale"]
    assert dict(zip(colour["domain"], colour["range"], strict=True)) == figures.MODALITY_COLOURS
    assert [r["pair"] for r in selected_line["rows"]] == [3, 3]
    spec = chart.to_dict()
    picks = [p for p in spec["params"] if p["name"] == figures.PICK_PARAM]
    assert picks and picks[0]["select"]["fields"] == ["pair"]
    x_domain, y_domain = (dots["encoding"][a]["scale"]["domain"] for a in ("x", "y"))
    assert x_domain[1] - x_domain[0] == pytest.approx(y_domain[1] - y_domain[0])  # one scale for both axes
    unlinked = _layers(figures.embedding_chart(image_xy, text_xy, captions, names, links=False))
    assert [layer["mark"]["type"] for layer in unlinked] == ["point"]
    assert all(r["thumbnail"] is None for r in unlinked[0]["rows"])


def test_picked_pair_reads_streamlit_selection_events():
    assert figures.picked_pair({"selection": {figures.PICK_PARAM: [{"pair": 4}]}}) == 4
    assert figures.picked_pair({"selection": {figures.PICK_PARAM: [{"pair": 2.0}]}}) == 2
    for event in (None, {}, {"selection": {}}, {"selection": {figures.PICK_PARAM: [{"pair": "x"}]}},
                  {"selection": {figures.PICK_PARAM: [{"pair": True}, 5]}}):
        assert figures.picked_pair(event) is None


def test_thumbnail_uri_is_a_webp_data_uri():
    import base64
    import io

    uri = figures.thumbnail_uri(Image.new("RGBA", (16, 8), (0, 255, 0, 255)))
    assert uri.startswith("data:image/webp;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.format == "WEBP" and decoded.size == (16, 8)
    assert np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - [0, 255, 0]).max() <= 8  # lossy, but green


def test_load_thumbnail_scales_crisply_and_tolerates_missing_files(tmp_path):
    Image.new("RGB", (32, 16), (255, 0, 0)).save(tmp_path / "a.png")
    thumb = figures.load_thumbnail(str(tmp_path / "a.png"), size=128)
    assert thumb.size == (128, 64) and thumb.getpixel((5, 5)) == (255, 0, 0)
    assert figures.load_thumbnail(str(tmp_path / "missing.png")) is None


# --- projections -------------------------------------------------------------------------------
def test_pca_is_deterministic_and_sign_fixed():
    x = np.random.default_rng(1).normal(size=(20, 6)) * [5, 3, 1, 1, 1, 1]
    first = projections.pca_2d(x)
    assert first.shape == (20, 2)
    assert projections.pca_2d(x) == pytest.approx(first)
    assert projections.pca_2d(-x) == pytest.approx(-first)  # signs follow the data, not the SVD's whim
    assert np.var(first[:, 0]) > np.var(first[:, 1])  # components in order of variance
    assert projections.pca_2d(np.ones((4, 3))).shape == (4, 2)  # degenerate input still gives 2 columns


def test_procrustes_recovers_a_rotated_reflected_scaled_shifted_layout():
    reference = np.random.default_rng(2).normal(size=(30, 2))
    angle = 1.1
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = 3.0 * (reference @ rotation) + [5.0, -2.0]
    assert projections.procrustes_align(moved, reference) == pytest.approx(reference, abs=1e-9)
    mirrored = reference * [-1, 1] * 0.5
    assert projections.procrustes_align(mirrored, reference) == pytest.approx(reference, abs=1e-9)


def embedding_run(path: Path, epochs: int = 2, n: int = 6, seed: int = 0) -> RunDir:
    run = RunDir(path)
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        run.save_embeddings(epoch, {
            "image_embeds": rng.normal(size=(n, 8)).astype(np.float32),
            "text_embeds": rng.normal(size=(n, 8)).astype(np.float32),
            "image_ids": np.arange(n), "captions": np.array([f"c{i}" for i in range(n)]),
            "file_paths": np.array([f"{i}.png" for i in range(n)]),
        })
    return run


def test_layout_is_cached_on_disk_reused_and_invalidated(tmp_path, monkeypatch):
    run = embedding_run(tmp_path / "run")
    calls = []
    monkeypatch.setitem(projections.PROJECTORS, "pca", lambda x: calls.append(len(x)) or projections.pca_2d(x))
    first = projections.layout(run, 1, "pca")
    cache = run.projection_path("pca", 1)
    assert first.shape == (12, 2) and cache.is_file() and calls == [12]
    assert cache.parent == run.projections_dir and not list(cache.parent.glob("*.tmp"))
    written = cache.stat().st_mtime_ns
    again = projections.layout(run, 1, "pca")
    assert calls == [12] and again == pytest.approx(first) and cache.stat().st_mtime_ns == written  # reused
    assert projections.cached_epochs(run, "pca") == [1] and projections.cached_epochs(run, "umap") == []
    image, text = projections.split_layout(first)
    assert image.shape == text.shape == (6, 2)

    embedding_run(tmp_path / "run", epochs=1, seed=7)  # epoch 1 re-evaluated: new embeddings
    assert projections.cached_layout(run, 1, "pca") is None
    projections.layout(run, 1, "pca")
    assert calls == [12, 12]
    cache.write_bytes(b"garbage")  # a damaged cache is recomputed, not fatal
    projections.layout(run, 1, "pca")
    assert calls == [12, 12, 12]


def test_layout_without_a_writable_runs_folder(tmp_path, monkeypatch, caplog):
    """A run folder where the cache cannot be written (read-only, full; tests run as root, so the write is
    made to fail otherwise) still gets its layout, equal to the cached one's, and a warning in the log."""
    expected = projections.layout(embedding_run(tmp_path / "writable", epochs=1), 1, "pca")  # computed and cached

    blocked = embedding_run(tmp_path / "blocked", epochs=1)
    blocked.projections_dir.write_text("a file where the cache folder should be")  # so its mkdir fails
    with caplog.at_level("WARNING", logger=projections.logger.name):
        layout = projections.layout(blocked, 1, "pca")
    np.testing.assert_array_equal(layout, expected)
    assert blocked.projections_dir.is_file() and "cannot cache the pca layout" in caplog.text
    assert projections.cached_layout(blocked, 1, "pca") is None and projections.cached_epochs(blocked, "pca") == []

    refused = embedding_run(tmp_path / "refused", epochs=1)

    def refuse(self, method, epoch, arrays):
        raise RunError(f"{self.projection_path(method, epoch)}: cannot be written (Read-only file system)")

    monkeypatch.setattr(RunDir, "save_projection", refuse)
    np.testing.assert_array_equal(projections.layout(refused, 1, "pca"), expected)
    assert not refused.projection_path("pca", 1).exists()


def test_layout_errors_name_the_problem(tmp_path):
    run = embedding_run(tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="unknown projection"):
        projections.layout(run, 1, "tsne")
    with pytest.raises(Exception, match="no embeddings for epoch 5"):
        projections.layout(run, 5, "pca")
