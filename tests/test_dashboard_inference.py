"""The dashboard's model pages (4 Attention, 5 Decoding lab, 6 Caption, 7 Compare): their figure
builders on hand-made data, upload validation on real bytes, and each page run headless (AppTest)
against the tiny run."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from blipcore.data import ImageLoadError
from blipcore.evaluation.decoding import decoding_config
from blipcore.evaluation.explain import TokenAttention
from blipcore.paths import PROJECT_ROOT
from blipcore.runs.rundir import RunDir
from dashboard import explain_figures as figs
from dashboard import inference as inf
from dashboard.common import MAX_UPLOAD_PIXELS

REPO = PROJECT_ROOT  # the checkout the installed packages come from
PAGES = REPO / "dashboard" / "views"


# --- image bytes -----------------------------------------------------------------------------------
def image_bytes(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: enough to be refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --- figure builders -------------------------------------------------------------------------------
def test_loop_start_is_the_first_repeat():
    assert figs.loop_start([]) is None
    assert figs.loop_start([7, 8, 9]) is None
    assert figs.loop_start([1, 2, 3, 2, 1]) == 3
    assert figs.loop_start(["a", "a", "a"]) == 1


def test_step_figure_marks_the_loop_start_and_keeps_repeated_tokens():
    labels = ["a", "red", "a", "a", "[SEP]"]
    probs, entropies = [0.9, 0.5, 0.8, 0.95, 0.3], [1.0, 2.0, 0.5, 0.2, 3.0]
    healthy = figs.StepSeries(["a", "dog"], [-0.1, -0.2], [1.0, 1.0], None)
    fig = figs.step_figure({"greedy": figs.StepSeries(labels, np.log(probs), entropies, figs.loop_start(labels)),
                            "nucleus": healthy, "beam": healthy})
    prob, entropy = fig.data[:2]  # the first panel: greedy
    np.testing.assert_allclose(prob.y, probs)
    assert list(entropy.y) == entropies and entropy.yaxis == "y2"  # entropy on the panel's right axis
    assert list(fig.layout.xaxis.ticktext) == labels  # the three "a" stay three ticks
    assert list(fig.layout.xaxis2.ticktext) == ["a", "dog"]  # the second panel: nucleus
    assert len(fig.data) == 6 and [t.showlegend for t in fig.data] == [True, True, False, False, False, False]
    assert [(shade.x0, shade.x1, shade.xref) for shade in fig.layout.shapes] == [(1.5, 2.5, "x")]  # greedy only
    texts = [a.text for a in fig.layout.annotations]
    assert texts[:3] == ["greedy", "nucleus", "beam"] and texts.count("first repeat: 'a'") == 1
    assert [c == figs.LOOP_COLOUR for c in prob.marker.color] == [False, False, True, False, False]
    assert fig.layout.height == 2 * 330  # three panels in two columns: two rows


def test_step_figure_without_loop_has_no_mark():
    fig = figs.step_figure({"greedy": figs.StepSeries(["a", "dog"], [-0.1, -0.2], [1.0, 1.0], None)})
    assert not fig.layout.shapes
    with pytest.raises(ValueError, match="labels"):
        figs.StepSeries(["a"], [-0.1, -0.2], [1.0], None)
    with pytest.raises(ValueError, match="no caption"):
        figs.step_figure({})


def test_attention_grid_is_one_tiled_heatmap_with_a_panel_per_layer_and_head():
    maps = np.random.default_rng(0).random((3, 4, 2, 2))
    fig = figs.attention_grid_figure(maps)
    (trace,) = fig.data
    z = np.asarray(trace.z, dtype=float)
    assert trace.type == "heatmap" and z.shape == (3 * 3 - 1, 4 * 3 - 1)  # 2x2 panels, 1-cell gaps
    np.testing.assert_allclose(z[3:5, 6:8], maps[1, 2])  # layer 1, head 2
    assert np.isnan(z[2]).all() and np.isnan(z[:, 2]).all()  # the gaps
    assert list(np.asarray(trace.customdata)[3, 7]) == [1, 2, 0, 1]  # hover: layer, head, patch row, column
    titles = {a.text for a in fig.layout.annotations}
    assert {"layer 0", "layer 2", "head 0", "head 3"} <= titles
    scaled = np.asarray(figs.attention_grid_figure(maps, shared_scale=False).data[0].z, dtype=float)
    assert all(np.isclose(np.nanmax(scaled[r * 3:r * 3 + 2, c * 3:c * 3 + 2]), 1.0) for r in range(3) for c in range(4))
    with pytest.raises(ValueError, match="layers, heads"):
        figs.attention_grid_figure(maps[0])


def test_token_overlays_one_per_token():
    maps = np.zeros((2, 1, 1, 2, 2))
    maps[0, ..., 0, 0], maps[1, ..., 1, 1] = 1.0, 1.0
    attention = TokenAttention(["a", "dog"], maps, np.zeros((2, 1, 1)))
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    first, second = figs.token_overlays(image, attention, alpha=1.0)
    assert first.shape == (8, 8, 3) and not np.array_equal(first, second)
    assert figs.upscale(image, 32).shape == (32, 32, 3)


def test_word_labels_tell_repeated_words_apart():
    assert figs.word_labels(["a", "red", "a", "a", "red", "cube"]) == ["a", "red", "a (2)", "a (3)", "red (2)", "cube"]
    assert figs.word_labels([]) == []


def test_checkpoint_table_orders_losses_then_retrieval_by_k():
    rows = [{"run": "a", "epoch": 1, "t2i_r10": 3.0, "i2t_r10": 2.0, "greedy_cider": 0.1, "i2t_r5": 1.0,
             "val_lm": 2.0, "rsum": 9.0, "i2t_r1": 0.5, "val_itc": 1.0}]
    table = figs.checkpoint_metrics_frame(rows)
    assert list(table.columns) == [
        "val_itc", "val_lm", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r10", "rsum", "greedy_cider"]
    assert table.loc[("a", 1), "i2t_r5"] == 1.0
    kept, empty = figs.drop_empty_columns(pd.DataFrame({"x": [1.0, None], "meteor": [None, None]}))
    assert list(kept.columns) == ["x"] and empty == ["meteor"]


def test_strategy_tables_and_bars():
    metrics = {
        "greedy": {"repetition_rate": 0.9, "distinct_1": 0.05, "top_caption": "a a a", "bleu4": 0.01, "notes": ["x"]},
        "nucleus": {"repetition_rate": 0.2, "distinct_1": 0.40, "top_caption": "a red cube", "bleu4": 0.05},
    }
    frame = figs.strategy_metrics_frame(metrics)
    assert list(frame.index) == ["greedy", "nucleus"]
    assert list(frame.columns) == ["bleu4", "repetition_rate", "distinct_1", "top_caption"]
    fig = figs.collapse_bar_figure(metrics)
    assert [list(trace.x) for trace in fig.data] == [["greedy", "nucleus"]] * 2
    assert [a.text for a in fig.layout.annotations] == ["repetition_rate", "distinct_1"]


def test_embedding_drift_matches_items_by_id():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    before = {"image_ids": np.array([1, 2, 3, 4]), "image_embeds": image, "text_embeds": text}
    order = [2, 0, 3, 1]  # the same items, shuffled, the last one flipped
    after = {"image_ids": before["image_ids"][order], "image_embeds": image[order].copy(), "text_embeds": text[order]}
    after["image_embeds"][2] *= -1  # item id 4
    moved = figs.embedding_drift(before, after)
    np.testing.assert_allclose(moved["image"], [0, 0, 0, 2], atol=1e-9)
    np.testing.assert_allclose(moved["text"], 0, atol=1e-9)
    with pytest.raises(ValueError, match="no image id"):
        figs.embedding_drift(before, {**after, "image_ids": np.array([9, 8, 7, 6])})


# --- uploads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_read_upload_accepts_common_formats(fmt):
    picked = inf.read_upload(f"photo.{fmt.lower()}", image_bytes(fmt))
    assert picked.image.mode == "RGB" and picked.image.size == (40, 30)
    assert picked.note is None and len(picked.key) == 64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(2000), "not an image"),
        (image_bytes("PNG")[:60], "truncated|corrupt"),
        (png_header(7000, 7000), f"too large.*limit {MAX_UPLOAD_PIXELS:,}"),  # over our limit, under PIL's
        (png_header(100_000, 100_000), "too large"),
    ],
)
def test_read_upload_refuses_bad_files_by_name(data, message):
    with pytest.raises(ImageLoadError, match=message) as caught:
        inf.read_upload("holiday.png", data)
    assert str(caught.value).startswith("holiday.png: ")


def test_read_upload_takes_the_first_frame_of_an_animation():
    picked = inf.read_upload("cat.gif", animated_gif())
    assert "first frame" in picked.note
    assert picked.image.getpixel((5, 5)) == (255, 0, 0)


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_runs_dir):
    run = RunDir(tiny_runs_dir / "tiny")
    return [inf.Loaded.of(run, *_drop_config(run.load_model(epoch))) for epoch in run.epochs()]


def _drop_config(loaded):
    model, _, ckpt = loaded
    return model, ckpt


def test_caption_uploads_captions_good_files_and_names_bad_ones(tiny_checkpoints):
    files = [
        ("a.png", image_bytes("PNG")), ("notes.png", b"not an image at all"), ("b.webp", image_bytes("WEBP")),
        ("empty.jpg", b""), ("huge.png", png_header(7000, 7000)), ("cat.gif", animated_gif()),
    ]
    results = inf.caption_uploads(files, tiny_checkpoints, decoding_config("greedy", max_length=5))
    assert [r.name for r in results] == [name for name, _ in files]
    errors = {r.name: r.error for r in results if r.error}
    assert set(errors) == {"notes.png", "empty.jpg", "huge.png"}
    assert "not an image" in errors["notes.png"] and "too large" in errors["huge.png"]
    good = [r for r in results if not r.error]
    for result in good:
        assert [(run, epoch) for run, epoch, _ in result.captions] == [("tiny", 1), ("tiny", 2)]
        assert all(isinstance(text, str) for _, _, text in result.captions)
        assert max(result.thumbnail.size) <= inf.THUMBNAIL
    assert "first frame" in good[-1].note


# --- the pages, headless ---------------------------------------------------------------------------
@pytest.fixture
def page(monkeypatch, tiny_runs_dir):
    """Run a page of dashboard/views against the tiny run; it must not raise."""
    def run(name: str, runs_dir: Path = tiny_runs_dir) -> AppTest:
        monkeypatch.setenv("BLIPLAB_RUNS_DIR", str(runs_dir))
        app = AppTest.from_file(str(PAGES / name), default_timeout=60)
        return checked(app.run())
    return run


def checked(app: AppTest) -> AppTest:
    assert not app.exception, [e.value for e in app.exception]
    return app


def test_attention_page(page):
    app = page("4_Attention.py")
    assert [h.value for h in app.header] == [
        "ViT attention rollout", "[CLS] attention per layer and head", "Where the decoder looked for each word",
        "Grad-CAM of the image-text matching score",
    ]
    assert "The caption is empty" not in str([i.value for i in app.info])
    assert len(app.get("plotly_chart")) == 1  # the layers x heads grid
    pills = app.button_group[0]
    labels = [option.content for option in pills.proto.options]
    assert len(set(labels)) == len(labels), labels  # a repeated word still gets a pill of its own
    images_before = len(app.get("image"))
    checked(app.button_group[0].set_value(1).run())  # pick the second word
    assert len(app.get("image")) == images_before
    app.session_state["attention_every_word"] = True  # the lazy expander opened: a map per word
    checked(app.run())
    assert len(app.get("image")) == images_before + 1  # one more image list: the strip of every word
    assert not any("#0" in image.captions for image in app.get("image"))  # the gallery is lazy too
    app.session_state["attention_image_tiny_gallery"] = True  # opened: the thumbnails around the image
    checked(app.run())
    gallery = [image for image in app.get("image") if "#0" in image.captions]
    assert len(gallery) == 1 and gallery[0].captions[:3] == ["#0", "#1", "#2"]
    checked(app.radio(key="attention_fusion").set_value("max").run())
    checked(app.text_input[0].set_value("two orange squares").run())
    assert not app.warning


def test_attention_page_upload_bad_file_is_a_message(page):
    app = page("4_Attention.py")
    checked(app.radio(key="attention_source").set_value("Upload").run())
    checked(app.sidebar.get("file_uploader")[0].set_value(("x.png", b"garbage", "image/png")).run())
    assert "not an image" in app.error[0].value


def test_decoding_lab_page(page):
    app = page("5_Decoding_lab.py")
    assert [t.label for t in app.tabs] == [
        "Captions side by side", "Step by step: probability and entropy", "Collapse on a validation subset",
        "Stored evaluation",
    ]
    strategies = ["greedy", "beam", "top-k", "nucleus", "repetition-penalty", "no-repeat-ngram"]
    captions = [d.value for d in app.dataframe if "first repeat" in d.value]
    assert len(captions) == 2 and all(list(c["strategy"]) == strategies for c in captions)  # two images
    assert not app.get("plotly_chart")  # lazy tabs: the step chart is drawn when its tab opens
    app.session_state["decoding_section"] = "Step by step: probability and entropy"
    (steps,) = checked(app.run()).get("plotly_chart")
    spec = json.loads(steps.proto.spec)
    assert [a["text"] for a in spec["layout"]["annotations"]][:6] == strategies  # one panel per strategy
    app.session_state["decoding_section"] = "Collapse on a validation subset"
    checked(app.run())
    checked(app.number_input(key="decoding_greedy_max_length").set_value(4).run())
    checked(app.slider(key="decoding_subset_tiny").set_value(4).run())
    checked(app.button(key="decoding_compute").click().run())
    assert len(app.get("plotly_chart")) == 1  # the collapse bars
    (table,) = [d.value for d in app.dataframe if list(d.value.index) == strategies and "distinct_2" in d.value]
    assert table.loc["greedy", "mean_length"] <= 4 and "bleu4" not in table  # computed here, not the stored one
    app.session_state["decoding_section"] = "Stored evaluation"
    checked(app.run())
    (stored,) = app.dataframe
    assert {"(most-frequent)", "(nearest-neighbour)"} <= set(stored.value.index) and "bleu4" in stored.value


def test_caption_page_sample_and_every_epoch(page):
    app = page("6_Caption.py")
    (table,) = app.table
    assert list(table.value.index.get_level_values("epoch")) == [2]
    checked(app.sidebar.checkbox(key="caption_every_epoch").check().run())
    checked(app.get("file_uploader")[0].set_value([
        ("photo.jpg", image_bytes("JPEG"), "image/jpeg"), ("broken.png", b"\x89PNG broken", "image/png"),
    ]).run())
    assert "broken.png" in app.error[0].value and "the others are captioned" in app.error[0].value
    assert [list(t.value.index.get_level_values("epoch")) for t in app.table] == [[1, 2], [1, 2]]


def test_compare_page(page):
    app = page("7_Compare.py")
    assert [t.label for t in app.tabs] == ["Metrics", "Captions of random validation images",
                                           "How far the embeddings moved"]
    assert [list(d.value.index.names) for d in app.dataframe] == [["run", "epoch", "strategy"], ["run", "epoch"]]
    evaluated, checkpoints = (d.value for d in app.dataframe)
    assert "meteor" not in evaluated.columns and "METEOR" in " ".join(c.value for c in app.caption)  # null: said
    assert list(checkpoints.columns[:3]) == ["val_itc", "val_itm", "val_lm"]
    retrieval = [c for c in checkpoints.columns if c[:4] in ("i2t_", "t2i_")]
    assert retrieval == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    assert not app.table and not app.get("plotly_chart")  # lazy tabs: the other sections are not built

    app.session_state["compare_section"] = "Captions of random validation images"
    checked(app.run())
    assert len(app.table) == 3 and not app.dataframe  # three images, a caption per checkpoint each
    assert [list(t.value.index) for t in app.table] == [["tiny · epoch 1", "tiny · epoch 2"]] * 3
    seed = app.session_state["compare_seed"]
    checked(app.button(key="compare_reshuffle").click().run())
    assert app.session_state["compare_seed"] != seed

    app.session_state["compare_section"] = "How far the embeddings moved"
    checked(app.run())
    assert len(app.get("plotly_chart")) == 1
    checked(app.checkbox(key="compare_histogram").check().run())
    assert len(app.get("plotly_chart")) == 2


def test_pages_say_what_to_do_with_a_broken_checkpoint(page, tiny_runs_dir, tmp_path):
    shutil.copytree(tiny_runs_dir / "tiny", tmp_path / "tiny")
    weights = tmp_path / "tiny" / "checkpoints" / "epoch_002.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name in ("4_Attention.py", "5_Decoding_lab.py"):
        app = page(name, runs_dir=tmp_path)
        assert "sha256 does not match" in app.warning[0].value
