"""`python -m train`: help texts, presets, clear errors, and the info / eval / caption subcommands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from blipcore.runs import RunDir
from tests.conftest import REPO_ROOT, SHARED
from train.cli import available_presets, load_preset, main


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_every_subcommand_has_help():
    for args in ([], ["fit"], ["eval"], ["caption"], ["info"], ["data"], ["data", "shapes"]):
        out = run_cli(*args, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, args
    assert "--resume" in run_cli("fit", "--help").stdout
    assert "SPICE" in run_cli("eval", "--help").stdout


def test_presets_load_and_relative_roots_resolve_to_the_repository():
    assert {"demo", "seed", "coco-mini", "flickr8k"} <= set(available_presets())
    seed = load_preset("seed")
    assert seed.model.image_size == 224 and seed.train.batch_size == 8 and seed.data.subset == 10000
    coco_mini = load_preset("coco-mini")
    assert coco_mini.data.kind == "coco" and coco_mini.data.root == str((REPO_ROOT.parent / "shared/data/coco-mini").resolve())


def test_missing_dataset_stops_at_once_saying_where_it_looked(tmp_path, capsys):
    code = main(["fit", "--preset", "seed", "--run-dir", str(tmp_path / "run"), "--data-root", str(tmp_path / "nococo")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "nococo") in err and "train2017" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["fit", "--run-dir", str(tmp_path / "r"), "--set", "train.batchsize=3"]) == 2
    assert "unknown field 'train.batchsize'" in capsys.readouterr().err


@pytest.mark.parametrize(("assignment", "message"), [
    ("model.vision_heads=0", "model.vision_heads must be >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.eval_strategies=greedy,bogus", "unknown decoding strategies ['bogus']"),
])
def test_bad_values_stop_before_anything_is_written(tmp_path, capsys, assignment, message):
    assert main(["fit", "--preset", "demo", "--run-dir", str(tmp_path / "r"), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_info_eval_and_caption_on_a_trained_run(tiny_runs_dir, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir)  # eval writes into the run: work on a copy

    info = run_cli("info", str(run_dir))
    assert info.returncode == 0, info.stderr
    assert "completed" in info.stdout and "epochs 1, 2" in info.stdout

    out = run_cli("eval", "--run-dir", str(run_dir), "--epoch", "all", "--strategies", "greedy,beam,repetition-penalty",
                  "--images", "6", "--no-meteor")
    assert out.returncode == 0, out.stderr
    assert "epoch 1" in out.stdout and "epoch 2" in out.stdout and "beam" in out.stdout
    result = RunDir(run_dir).load_eval(2)
    assert set(result["strategies"]) == {"greedy", "beam", "repetition-penalty"}
    for entry in result["strategies"].values():
        assert {"bleu4", "cider", "rouge_l", "repetition_rate", "distinct_1", "top_caption_share"} <= set(entry["metrics"])
        assert len(entry["samples"]) == 6 and entry["samples"][0]["references"]
    assert "retrieval" in result and "reference_row" in result

    image = next((run_dir / "checkpoints").parent.glob("embeddings/*.npz"))  # any file: not an image
    photo = SHARED / "data/coco-mini/images/000000000139.jpg"
    target = photo if photo.exists() else None
    if target is None:
        pytest.skip("../shared/data/coco-mini is not here")
    out = run_cli("caption", "--run-dir", str(run_dir), "--strategy", "greedy", str(target))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target) + "\t")
    bad = run_cli("caption", "--run-dir", str(run_dir), str(image))
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_info_on_a_folder_that_is_not_a_run(tmp_path):
    out = run_cli("info", str(tmp_path))
    assert out.returncode == 2 and "run.json" in out.stderr and "Traceback" not in out.stderr


def test_info_json(tiny_runs_dir):
    out = run_cli("info", str(tiny_runs_dir / "tiny"), "--json")
    assert json.loads(out.stdout)["epochs"] == [1, 2]
