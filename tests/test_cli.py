"""`python -m train`: help texts, presets, clear errors, and the fit / info / eval / caption subcommands."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import blipcore.training.trainer
from blipcore.runs.rundir import RunDir
from tests.conftest import PHOTOS, REPO_ROOT, small_cfg
from train.cli import available_presets, load_preset, main


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


SUBCOMMANDS = [["fit"], ["eval"], ["score"], ["caption"], ["info"], ["diagnose"], ["capfilt"], ["study"], ["export"],
               ["data"],
               *[["data", name] for name in ("shapes", "coco", "flickr8k", "shards", "noise", "resize", "cache")]]


def test_python_m_train_has_help():
    out = run_cli("--help")  # `python -m train` itself, in a process of its own; its subcommands in this one
    assert out.returncode == 0 and "usage:" in out.stdout


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(capsys, words):
    with pytest.raises(SystemExit) as ended:
        main([*words, "--help"])
    text = capsys.readouterr().out
    assert ended.value.code == 0 and "usage:" in text
    expected = {"fit": "--resume", "eval": "SPICE", "study": "--results", "info": "--run-dir"}
    assert expected.get(" ".join(words), "usage:") in text


def test_presets_load_and_relative_roots_resolve_to_the_repository():
    assert {"demo", "seed", "coco-mini", "flickr8k"} <= set(available_presets())
    seed = load_preset("seed")
    assert seed.model.image_size == 224 and seed.train.batch_size == 8 and seed.data.subset == 10000
    for name in ("seed", "flickr8k", "coco-mini"):  # inside the repository (git-ignored data/), never ../shared
        assert load_preset(name).data.root == str(REPO_ROOT / "data" / name.replace("seed", "coco2017"))
    assert load_preset("coco-mini").data.kind == "coco"


def test_missing_dataset_stops_at_once_saying_where_it_looked(tmp_path, capsys):
    code = main(["fit", "--preset", "seed", "--run-dir", str(tmp_path / "run"),
                 "--data-root", str(tmp_path / "nococo")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "nococo") in err and "train2017" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("preset", "command"), [
    ("seed", "\n  python -m train data coco --out data/coco2017 --first 10000 --val-first 1000\n"),
    ("flickr8k", "\n  python -m train data flickr8k --images Flickr8k_Dataset.zip --text Flickr8k_text.zip "
                 "--out data/flickr8k\n"),
    ("coco-mini", "a test fixture that has no public download: pass --data-root"),
])
def test_missing_dataset_names_the_command_that_fetches_it(tmp_path, monkeypatch, capsys, preset, command):
    if (REPO_ROOT / "data" / ("coco2017" if preset == "seed" else preset)).exists():
        pytest.skip(f"this checkout has the {preset} data")
    monkeypatch.chdir(REPO_ROOT)  # the command shows the folder relative to the current one
    assert main(["fit", "--preset", preset, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert command in err and "Traceback" not in err


def test_data_root_applies_on_resume_and_info_shows_the_resume(shapes_root, tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(shapes_root, before)  # generated scenes are a COCO-caption-format folder like any other
    cfg = small_cfg(shapes_root, max_steps=2).override({"data.kind": "coco", "data.root": str(before)})
    blipcore.training.trainer.Trainer(cfg, tmp_path / "run", progress=False).fit()
    before.rename(after)  # the data moved
    assert main(["fit", "--run-dir", str(tmp_path / "run"), "--resume", "--max-steps", "3", "--no-progress",
                 "--data-root", str(after)]) == 0
    info = RunDir(tmp_path / "run").read_info()
    assert info["config"]["data"]["root"] == str(after) and info["steps_done"] == 3
    assert main(["info", "--run-dir", str(tmp_path / "run")]) == 0
    assert f"resumed    at step 2 on {info['resumes'][0]['at']}" in capsys.readouterr().out


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


def test_info_eval_and_caption_on_a_trained_run(tiny_runs_dir, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir)  # eval writes into the run: work on a copy

    assert main(["info", "--run-dir", str(run_dir)]) == 0  # info and eval in this process, caption in its own
    info = capsys.readouterr().out
    assert "completed" in info and "epochs 1, 2" in info

    assert main(["eval", "--run-dir", str(run_dir), "--epoch", "all", "--strategies", "greedy,beam,repetition-penalty",
                 "--images", "6", "--no-meteor"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1" in out and "epoch 2" in out and "beam" in out
    result = RunDir(run_dir).load_eval(2)
    assert set(result["strategies"]) == {"greedy", "beam", "repetition-penalty"}
    for entry in result["strategies"].values():
        expected = {"bleu4", "cider", "rouge_l", "repetition_rate", "distinct_1", "top_caption_share"}
        assert expected <= set(entry["metrics"])
        assert len(entry["samples"]) == 6 and entry["samples"][0]["references"]
    assert "retrieval" in result and set(result["reference_rows"]) == {"most-frequent", "nearest-neighbour"}

    image = next((run_dir / "checkpoints").parent.glob("embeddings/*.npz"))  # any file: not an image
    target = min((PHOTOS / "images").glob("*.jpg"))  # a real photo
    out = run_cli("caption", "--run-dir", str(run_dir), "--strategy", "greedy", str(target))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target) + "\t")
    bad = run_cli("caption", "--run-dir", str(run_dir), str(image))  # a file given by name is tried: unreadable
    assert bad.returncode == 3 and "error:" in bad.stderr and "not an image" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""


def test_info_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["info", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "Traceback" not in err


def test_info_json(tiny_runs_dir, capsys):
    assert main(["info", "--run-dir", str(tiny_runs_dir / "tiny"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == [1, 2]


def test_info_shows_the_best_value_of_each_headline_metric(tiny_runs_dir, capsys):
    assert main(["info", "--run-dir", str(tiny_runs_dir / "tiny")]) == 0
    best_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("best "))
    best = RunDir(tiny_runs_dir / "tiny").read_info()["best"]
    shown = dict(item.split("=", 1) for item in best_line.split()[1:])
    assert {"val_loss", "i2t_r1", "t2i_r1", "greedy_cider"} <= set(shown)
    assert set(shown) <= set(best) and not {"greedy_bleu4", "itm_i2t_r1", "val_itc"} & set(shown)
    assert shown["greedy_cider"] == f"{best['greedy_cider']['value']:.3f}@{best['greedy_cider']['epoch']}"


class _Trainer:
    """Stands in for blipcore.training.trainer.Trainer: fit() returns the summary a torchrun rank gets."""

    summary: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        pass

    def fit(self) -> dict:
        return self.summary


@pytest.mark.parametrize(("summary", "lines"), [
    ({}, []),  # every torchrun rank but the first
    ({"status": "completed", "step": 8, "epoch": 2, "train_seconds": 1.5}, ["completed: 8 steps, 2 epochs in 1.5 s"]),
    ({"status": "interrupted", "step": 3, "epoch": 0, "train_seconds": 0.5},
     ["interrupted: 3 steps, 0 epochs in 0.5 s", "resume with: python -m train fit"]),
])
def test_fit_prints_its_summary_once_per_run_not_once_per_rank(tmp_path, monkeypatch, capsys, summary, lines):
    monkeypatch.setattr(blipcore.training.trainer, "Trainer", type("Trainer", (_Trainer,), {"summary": summary}))
    assert main(["fit", "--preset", "demo", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(lines) and all(line.startswith(start) for line, start in zip(out, lines, strict=True))


# --- caption: files and folders ------------------------------------------------------------------
def _photo_folder(folder: Path, corrupt: bool) -> Path:
    """Two good images (PNG, JPEG), a text file a folder listing ignores, and with `corrupt`, a broken .jpg."""
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "a_red.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "c_blue.JPG")
    (folder / "notes.txt").write_text("not an image, and not taken from a folder")
    if corrupt:
        (folder / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    return folder


def _caption(tiny_runs_dir: Path, *args: str) -> int:
    return main(["caption", "--run-dir", str(tiny_runs_dir / "tiny"), "--strategy", "greedy", *args])


def _table(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines())


def test_caption_a_folder_captions_every_readable_image_and_reports_the_others(tiny_runs_dir, tmp_path, capsys):
    folder = _photo_folder(tmp_path / "photos", corrupt=True)
    assert _caption(tiny_runs_dir, "--batch-size", "2", str(folder)) == 3
    out, err = capsys.readouterr()
    table = _table(out)
    assert list(table) == [str(folder / "a_red.png"), str(folder / "c_blue.JPG")]  # sorted; notes.txt not taken
    assert all(caption.strip() for caption in table.values())
    assert f"error: {folder / 'b_broken.jpg'}: truncated image" in err and "notes.txt" not in err
    assert "2 captioned, 1 unreadable" in err and "Traceback" not in err


def test_caption_all_good_exits_0_and_writes_jsonl_and_csv(tiny_runs_dir, tmp_path, capsys):
    folder = _photo_folder(tmp_path / "photos", corrupt=False)
    single = tmp_path / "single.png"
    Image.new("RGB", (20, 20), (0, 150, 0)).save(single)
    assert _caption(tiny_runs_dir, str(single), str(folder), "--out", str(tmp_path / "out.jsonl")) == 0
    table = _table(capsys.readouterr().out)
    assert list(table) == [str(single), str(folder / "a_red.png"), str(folder / "c_blue.JPG")]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [{"file": file, "caption": caption} for file, caption in table.items()]

    (folder / "b_broken.jpg").write_bytes(b"GIF89a, then nothing")
    assert _caption(tiny_runs_dir, str(folder), "--out", str(tmp_path / "out.csv")) == 3
    with (tmp_path / "out.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [str(folder / n) for n in ("a_red.png", "b_broken.jpg", "c_blue.JPG")]
    assert rows[0]["caption"] and not rows[0]["error"] and rows[1]["error"] and not rows[1]["caption"]
    assert rows[2]["caption"] == table[str(folder / "c_blue.JPG")]


def test_caption_recursive_takes_subfolders_only_when_asked(tiny_runs_dir, tmp_path, capsys):
    folder = tmp_path / "top"
    _photo_folder(folder / "sub", corrupt=False)
    assert _caption(tiny_runs_dir, str(folder)) == 2
    assert "no images in" in capsys.readouterr().err
    assert _caption(tiny_runs_dir, "--recursive", str(folder)) == 0
    assert len(_table(capsys.readouterr().out)) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "captions.txt"], "unknown format '.txt'; use .jsonl or .csv"),
    (["missing.png"], "missing.png: no such file or folder"),
])
def test_caption_bad_arguments_exit_2_before_any_work(tiny_runs_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    folder = _photo_folder(tmp_path / "photos", corrupt=False)
    assert _caption(tiny_runs_dir, str(folder), *args) == 2
    out, err = capsys.readouterr()
    assert message in err and out == "" and not (tmp_path / "captions.txt").exists()


def test_eval_on_the_test_split_reports_every_image_beside_the_val_evaluation(shapes_root, tmp_path):
    from blipcore.training.trainer import Trainer
    from tests.conftest import SHAPES_PARAMS, small_cfg

    cfg = small_cfg(shapes_root, epochs=1, eval_strategies=["greedy"]).override(
        {"data.test_annotations": "annotations/captions_heldout.json"})  # the shapes' held-out split as a test set
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    run = RunDir(tmp_path / "run")
    val_before = run.eval_path(1).read_bytes()
    assert main(["eval", "--run-dir", str(run.path), "--split", "test", "--strategies", "greedy", "--no-meteor"]) == 0
    test = run.load_eval(1, split="test")
    assert test["split"] == "test" and test["num_images"] == SHAPES_PARAMS["n_heldout"]
    assert len(test["strategies"]["greedy"]["samples"]) == SHAPES_PARAMS["n_heldout"]
    assert run.eval_path(1).read_bytes() == val_before and run.eval_epochs() == [1]


def test_eval_on_a_test_split_the_run_does_not_have_is_a_clear_error(tiny_runs_dir, capsys):
    assert main(["eval", "--run-dir", str(tiny_runs_dir / "tiny"), "--split", "test"]) == 2
    assert "no test split" in capsys.readouterr().err


def test_a_study_without_progress_bars_runs_its_command_stages_without_them_where_they_have_any():
    from train.commands.study import command_stage_words as _command_stage_words

    capfilt = ["capfilt", "--captioner", "r", "--filter", "r", "--data", "d", "--out", "o"]
    noise = ["data", "noise", "--from", "d", "--out", "o", "--fraction", "0.3"]  # seconds: no progress bar
    assert _command_stage_words(capfilt, progress=False) == [*capfilt, "--no-progress"]
    assert _command_stage_words(capfilt, progress=True) == capfilt
    assert _command_stage_words(noise, progress=False) == noise
    assert _command_stage_words([*capfilt, "--no-progress"], progress=False) == [*capfilt, "--no-progress"]


# --- one consistent command line -----------------------------------------------------------------
def parse(*words: str):
    from train.cli import build_parser

    return build_parser().parse_args(list(words))


def refused(capsys, *words: str) -> str:
    """The one-line argparse error of a command line that is refused: exit status 2, no traceback."""
    with pytest.raises(SystemExit) as ended:
        parse(*words)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


COMPUTING = {
    "fit": ["fit"],
    "eval": ["eval", "--run-dir", "r"],
    "caption": ["caption", "--run-dir", "r", "photo.jpg"],
    "capfilt": ["capfilt", "--captioner", "r", "--filter", "r", "--data", "d", "--out", "o"],
    "study": ["study", "plan.toml"],
}


@pytest.mark.parametrize("command", COMPUTING)
def test_device_defaults_to_auto_in_every_computing_subcommand(capsys, command):
    args = parse(*COMPUTING[command])
    assert args.device == "auto" and not getattr(args, "device_given", False)
    assert parse(*COMPUTING[command], "--device", "cpu").device == "cpu"
    assert "--device" in refused(capsys, *COMPUTING[command], "--device", "tpu")


def test_eval_and_caption_take_one_gpu_of_several():
    assert parse(*COMPUTING["eval"], "--device", "cuda:1").device == "cuda:1"
    assert parse(*COMPUTING["caption"], "--device", "cuda:0").device == "cuda:0"


def test_fit_device_overrides_the_preset_only_when_given():
    from train.commands.fit import build_config

    kept = build_config(parse("fit", "--preset", "demo", "--set", "train.device=cpu"))
    assert kept.train.device == "cpu"  # the default auto does not override the preset's train.device
    given = build_config(parse("fit", "--preset", "demo", "--set", "train.device=cpu", "--device", "auto"))
    assert given.train.device == "auto"


def test_a_studys_device_reaches_its_runs_only_when_given_and_records_still_count(tmp_path, monkeypatch):
    import blipcore.experiments.study as study
    from blipcore import BlipConfig

    seen = {}

    def record_plan(plan, out, train, command, **options):
        seen["device"] = plan.base_config().train.device
        raise study.StudyStopped("stopped before training")

    monkeypatch.setattr(study, "run_study", record_plan)
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text('name = "x"\npreset = "demo"\n[[stage]]\nname = "a"\n[stage.variants]\nv = {}\n')
    assert main(["study", str(plan_file), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 130
    assert seen["device"] == "cpu"
    assert main(["study", str(plan_file), "--out", str(tmp_path / "s")]) == 130
    assert seen["device"] == "auto"  # the preset's, untouched
    from blipcore.experiments.study import config_differences

    planned = BlipConfig.preset("demo").to_dict()
    elsewhere = BlipConfig.preset("demo").override({"train.device": "cpu"}).to_dict()
    assert config_differences(elsewhere, planned) == []  # where a run trained is not how


def test_resolve_device_auto_is_a_concrete_device():
    import torch

    from train.arguments import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize(("value", "eval_epoch", "caption_epoch"), [
    (None, "last", "last"), ("last", "last", "last"), ("LAST", "last", "last"), ("3", 3, 3), ("0", 0, 0),
    ("all", "all", None), ("1,3", [1, 3], None),
])
def test_run_dir_and_epoch(capsys, value, eval_epoch, caption_epoch):
    epoch = [] if value is None else ["--epoch", value]
    args = parse("eval", "--run-dir", "runs/demo", *epoch)
    assert args.run_dir == "runs/demo" and args.epoch == eval_epoch
    if caption_epoch is None:  # caption uses one checkpoint
        assert "one checkpoint" in refused(capsys, "caption", "--run-dir", "runs/demo", *epoch, "x.jpg")
    else:
        assert parse("caption", "--run-dir", "runs/demo", *epoch, "x.jpg").epoch == caption_epoch


@pytest.mark.parametrize("bad", ["x", "-1", "1,x", "", "first"])
def test_a_bad_epoch_is_a_one_line_error(capsys, bad):
    line = refused(capsys, "eval", "--run-dir", "runs/demo", "--epoch", bad)
    assert "--epoch" in line and "N,M, last or all" in line


def test_epochs_to_evaluate_reads_every_epoch_spelling(tiny_runs_dir):
    from train.commands.eval import epochs_to_evaluate

    run = RunDir(tiny_runs_dir / "tiny")
    assert [epochs_to_evaluate(run, spec) for spec in ("last", "all", 1, [2, 1])] == [[2], [1, 2], [1], [2, 1]]


@pytest.mark.parametrize(("spec", "read"), [
    ("runs/a", ("runs/a", None)), ("runs/a:3", ("runs/a", 3)), ("runs/a:last", ("runs/a", None)),
])
def test_run_references_are_run_colon_epoch_everywhere(spec, read):
    from blipcore.runs.rundir import parse_run_spec

    args = [parse("fit", "--init", spec).init]
    capfilt = parse("capfilt", "--captioner", spec, "--filter", spec, "--data", "d", "--out", "o")
    args += [capfilt.captioner, capfilt.filter]
    assert all(parse_run_spec(arg) == (Path(read[0]), read[1]) for arg in args)


@pytest.mark.parametrize("words", [["fit", "--init"], ["capfilt", "--data", "d", "--out", "o", "--filter", "r",
                                                        "--captioner"]])
def test_an_empty_run_reference_is_a_one_line_error(capsys, words):
    assert "RUN[:EPOCH]" in refused(capsys, *words, "")


@pytest.mark.parametrize("words", [["fit"], COMPUTING["capfilt"], ["data", "shards", "--from", "d", "--out", "o"]])
def test_resume_and_overwrite_are_mutually_exclusive(capsys, words):
    assert parse(*words, "--resume").resume and parse(*words, "--overwrite").overwrite
    assert "not allowed with argument" in refused(capsys, *words, "--resume", "--overwrite")


def test_info_positional_run_still_works_with_a_deprecation_line(tiny_runs_dir, capsys):
    run = str(tiny_runs_dir / "tiny")
    assert main(["info", run]) == 0
    out, err = capsys.readouterr()
    assert "completed" in out
    assert err.splitlines() == [f"deprecated: `info {run}` -> use `info --run-dir {run}` "
                                "(the old spelling goes in the next release)"]
    assert main(["info", "--run-dir", run]) == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize(("words", "message"), [
    ([], "info needs the run: --run-dir RUN"),
    (["--run-dir", "a", "b"], "info takes one run"),
])
def test_info_without_one_run_is_a_one_line_error(capsys, words, message):
    assert main(["info", *words]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
