"""Captions written on one machine, scored on another: `eval --captions-out` and `python -m train score`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blipcore.evaluation import metrics as M
from blipcore.evaluation.scoring import read_results, score_results
from blipcore.runs.rundir import RunDir
from tests.conftest import PHOTOS, REPO_ROOT
from train.cli import main

COCO_MINI = PHOTOS  # real COCO photos and captions in the repository
COCO_MINI_VAL = COCO_MINI / "annotations/captions_val.json"


def test_captions_written_by_eval_score_as_the_evaluation_scored_them(tiny_runs_dir, tmp_path, capsys):
    """Every caption of each strategy and of the nearest-neighbour row goes to a COCO results file; scored with
    `train score`, each file gives the numbers the evaluation itself wrote (the same captions, the same metrics)."""
    run_dir, captions = tmp_path / "tiny", tmp_path / "captions"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir)
    assert main(["eval", "--run-dir", str(run_dir), "--epoch", "2", "--strategies", "greedy,beam", "--no-meteor",
                 "--data-root", str(COCO_MINI), "--annotations", "annotations/captions_val.json",
                 "--split", "coco-mini", "--captions-out", str(captions)]) == 0
    result = RunDir(run_dir).load_eval(2, split="coco-mini")
    image_ids = [image["id"] for image in json.loads(COCO_MINI_VAL.read_text())["images"]]
    rows = {**result["strategies"], **result["reference_rows"]}
    names = ["greedy", "beam", "nearest-neighbour"]
    files = [captions / f"epoch_002.coco-mini.{name}.json" for name in names]
    assert sorted(captions.iterdir()) == sorted(files)  # the most frequent caption is one sentence: no file
    for name, path in zip(names, files, strict=True):
        entries = json.loads(path.read_text())
        assert [e["image_id"] for e in entries] == image_ids  # every image, in the annotations' order
        assert [e["caption"] for e in entries[: len(rows[name]["samples"])]] == [
            s["caption"] for s in rows[name]["samples"]]

    shapes_train = Path(RunDir(run_dir).config().data.root) / "annotations/captions_train.json"
    out = tmp_path / "scores.json"
    capsys.readouterr()
    assert main(["score", *map(str, files), "--annotations", str(COCO_MINI_VAL), "--train-annotations",
                 str(shapes_train), "--no-meteor", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scored = json.loads(out.read_text())["results"]
    for name in names:
        key = f"epoch_002.coco-mini.{name}"
        assert key in printed
        for metric in ("bleu4", "rouge_l", "cider", "top_caption_share", "mean_length", "memorised_share"):
            assert scored[key]["metrics"][metric] == pytest.approx(rows[name]["metrics"][metric], abs=1e-9), metric
    assert scored[f"epoch_002.coco-mini.{names[0]}"]["metrics"].get("meteor") is None  # --no-meteor


def _references() -> dict[int, list[str]]:
    return {1: ["a dog runs on the grass", "a brown dog running"], 2: ["a man rides a bike", "a cyclist on a road"]}


@pytest.mark.parametrize(("content", "message"), [
    ({"1": "a dog"}, "holds a dict"),
    ([{"image_id": 1, "caption": "a dog"}], "1 of the annotations' 2 images have no caption"),
    ([{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": "a cat"}], "captioned twice"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}, {"image_id": 3, "caption": "c"}],
     "image 3 (entry 2) is not in the annotations"),
    ([{"image_id": "1", "caption": "a dog"}], "entry 0 is not"),
    ([{"image_id": True, "caption": "a dog"}], "entry 0 is not"),
])
def test_results_files_that_do_not_caption_every_image_once_are_refused(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=re.escape(message)):
        read_results(path, _references())


def test_score_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                       "annotations": [{"image_id": 1, "caption": "a dog on grass"}]}))
    assert main(["score", str(tmp_path / "missing.json"), "--annotations", str(annotations), "--no-meteor"]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert main(["score", str(broken), "--annotations", str(annotations), "--no-meteor"]) == 2
    assert "not a JSON file" in capsys.readouterr().err
    assert main(["score", str(broken), "--annotations", str(tmp_path / "nope.json"), "--no-meteor"]) == 2
    assert "nope.json: file not found" in capsys.readouterr().err


def test_a_perfect_captioner_scores_above_a_collapsed_one(tmp_path):
    """Scores read the captions: each image's own first reference beats one caption given to every image."""
    references = _references()
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in references],
        "annotations": [{"image_id": i, "caption": c} for i, cs in references.items() for c in cs]}))
    good, collapsed = tmp_path / "good.json", tmp_path / "collapsed.json"
    good.write_text(json.dumps([{"image_id": i, "caption": cs[0]} for i, cs in references.items()]))
    collapsed.write_text(json.dumps([{"image_id": i, "caption": "a dog runs on the grass"} for i in references]))
    scored = score_results([good, collapsed], annotations, meteor=False)
    assert scored["good"]["metrics"]["cider"] > scored["collapsed"]["metrics"]["cider"]
    assert scored["collapsed"]["metrics"]["top_caption_share"] == 1.0 == 2 * scored["good"]["metrics"][
        "top_caption_share"]
    assert "memorised_share" not in scored["good"]["metrics"]  # no training captions given
    assert M.is_number(scored["good"]["metrics"]["bleu4"])


def test_the_gpu_script_writes_test_captions_that_score_here(shapes_root, tmp_path):
    """studies/gpu_flickr8k.sh end to end on a CPU, at a tiny size: train, choose the epoch on dev, write the test
    captions; `train score` then reads what came back. (The GPU run in docs/results.md is this script on an H200.)"""
    data = tmp_path / "flickr8k-like"
    (data / "annotations").mkdir(parents=True)
    (data / "images").symlink_to(shapes_root / "images")
    train = json.loads((shapes_root / "annotations/captions_train.json").read_text())
    val = json.loads((shapes_root / "annotations/captions_val.json").read_text())
    half = len(val["images"]) // 2
    for name, images in (("dev", val["images"][:half]), ("test", val["images"][half:])):
        ids = {image["id"] for image in images}
        split = {"images": images, "annotations": [a for a in val["annotations"] if a["image_id"] in ids]}
        (data / f"annotations/captions_official_{name}.json").write_text(json.dumps(split))
    (data / "annotations/captions_official_train.json").write_text(json.dumps(train))
    run, out = tmp_path / "run", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "DATA": str(data), "RUN": str(run),
           "OUT": str(out), "TRAIN_SECONDS": "300", "WORKERS": "0"}
    tiny = ["--max-steps", "2", "--set", "train.batch_size=8", "--set", "train.warmup_steps=1",
            "--set", "data.eval_images=8", "--set", "train.eval_caption_images=4"]
    tiny += [arg for key, value in (("image_size", 32), ("vision_depth", 1), ("text_encoder_depth", 1),
                                    ("text_decoder_depth", 1), ("vision_width", 64), ("text_width", 64),
                                    ("vision_heads", 2), ("text_heads", 2), ("embed_dim", 32))
             for arg in ("--set", f"model.{key}={value}")]
    done = subprocess.run(["bash", str(REPO_ROOT / "studies/gpu_flickr8k.sh"), *tiny], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dev choice: epoch 1" in done.stdout
    names = ["greedy", "beam", "nearest-neighbour"]
    files = [out / f"epoch_001.test.{name}.json" for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in files), "epoch_001.test.json", "run.json", "metrics.jsonl"])
    evaluation = json.loads((out / "epoch_001.test.json").read_text())
    assert evaluation["num_images"] == len(val["images"]) - half
    scored = score_results(files, data / "annotations/captions_official_test.json",
                           data / "annotations/captions_official_train.json", meteor=False)
    rows = {**evaluation["strategies"], **evaluation["reference_rows"]}
    for name in names:
        assert scored[f"epoch_001.test.{name}"]["metrics"]["cider"] == pytest.approx(rows[name]["metrics"]["cider"])
