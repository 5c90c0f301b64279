"""CapFilt on the shapes data: planted noise (`data noise`, with a clean subset too), a run started from another's
weights (`fit --init`), and `capfilt` itself: every caption accounted for, scored against the planted record,
resumable, its output a dataset that trains; bad input refused before anything is written. Both protocols of
studies/capfilt.toml: its plan checked, and rehearsed end to end at a tiny size."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from blipcore.data import build_datasets
from blipcore.data.derived import CAPFILT_RECORD, CAPFILT_SCORES, CAPFILT_SUMMARY, NOISE_RECORD
from blipcore.data.prep.noise import clean_annotations, plant_noise
from blipcore.evaluation.metrics import roc_auc
from blipcore.experiments.capfilt import CapfiltSettings, load_capfilt, run_capfilt
from blipcore.runs.rundir import RunDir, parse_run_spec
from blipcore.training.trainer import Trainer
from tests.conftest import REPO_ROOT, small_cfg
from train.cli import main

TRAIN = "annotations/captions_train.json"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_coco(cfg, root: Path):
    """A shapes config reading `root` as a COCO-caption folder (a derived dataset is not regenerated)."""
    return cfg.override({"data.kind": "coco", "data.root": str(root), "data.train_annotations": TRAIN,
                         "data.val_annotations": "annotations/captions_val.json"})


@pytest.fixture(scope="module")
def noisy_root(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "shapes-noisy"
    plant_noise(shapes_root, out, fraction=0.3, seed=0)
    return out


# --- data noise --------------------------------------------------------------------------------------------
def test_noise_replaces_the_fraction_with_other_images_captions_and_records_every_caption(shapes_root, noisy_root):
    source = json.loads((shapes_root / TRAIN).read_text())
    noisy = json.loads((noisy_root / TRAIN).read_text())
    lines = read_jsonl(noisy_root / NOISE_RECORD)
    assert len(lines) == len(source["annotations"]) == len(noisy["annotations"])
    assert sum(line["planted"] for line in lines) == round(0.3 * len(lines))
    captions_of: dict[int, set[str]] = {}
    for annotation in source["annotations"]:
        captions_of.setdefault(annotation["image_id"], set()).add(annotation["caption"])
    for line, before, after in zip(lines, source["annotations"], noisy["annotations"], strict=True):
        assert line["original"] == before["caption"] and line["caption"] == after["caption"]
        assert after["image_id"] == before["image_id"] == line["image_id"]
        if line["planted"]:  # another image's caption
            assert line["from_image_id"] != line["image_id"] and after["caption"] in captions_of[line["from_image_id"]]
        else:
            assert after["caption"] == before["caption"] and line["from_image_id"] is None
    # images are linked, not copied; the other splits are unchanged; the source is untouched
    assert (noisy_root / "images").is_symlink() and (noisy_root / "images").resolve() == (shapes_root / "images")
    for split in ("val", "heldout"):
        name = f"annotations/captions_{split}.json"
        assert (noisy_root / name).read_bytes() == (shapes_root / name).read_bytes()
    assert json.loads((shapes_root / TRAIN).read_text()) == source


def test_noise_is_seeded_and_its_dataset_trains(shapes_root, noisy_root, tmp_path):
    again = tmp_path / "again"
    plant_noise(shapes_root, again, fraction=0.3, seed=0)
    assert (again / NOISE_RECORD).read_bytes() == (noisy_root / NOISE_RECORD).read_bytes()
    other = tmp_path / "other"
    plant_noise(shapes_root, other, fraction=0.3, seed=1)
    assert (other / NOISE_RECORD).read_bytes() != (noisy_root / NOISE_RECORD).read_bytes()
    cfg = as_coco(small_cfg(shapes_root, max_steps=2, epochs=1), noisy_root)
    datasets = build_datasets(cfg, splits=("train",))
    trained_captions = {c for record in datasets["train"].records for c in record.captions}
    planted = {line["caption"] for line in read_jsonl(noisy_root / NOISE_RECORD) if line["planted"]}
    assert planted <= trained_captions
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["status"] == "completed" and summary["step"] == 2


def test_noise_without_a_clean_subset_draws_as_before_the_option(shapes_root, noisy_root):
    """The planted captions of a dataset without a clean subset: the first `count` of random.Random(seed)'s sample
    of every caption, as before --clean-images existed (the committed records' noisy data is made again the same)."""
    lines = read_jsonl(noisy_root / NOISE_RECORD)
    expected = set(random.Random(0).sample(range(len(lines)), round(0.3 * len(lines))))
    assert {line["index"] for line in lines if line["planted"]} == expected
    assert not any(line["clean"] for line in lines) and not (noisy_root / clean_annotations(TRAIN)).exists()


def test_noise_keeps_a_clean_subset_untouched_and_writes_its_annotation_file(shapes_root, tmp_path, capsys):
    out = tmp_path / "noisy-clean"
    assert main(["data", "noise", "--from", str(shapes_root), "--out", str(out), "--fraction", "0.3",
                 "--clean-images", "16"]) == 0
    assert f"data.train_annotations={clean_annotations(TRAIN)}" in capsys.readouterr().out
    source = json.loads((shapes_root / TRAIN).read_text())
    lines = read_jsonl(out / NOISE_RECORD)
    clean = {line["image_id"] for line in lines if line["clean"]}
    assert len(clean) == 16 and all(line["clean"] == (line["image_id"] in clean) for line in lines)
    # the noise never touches a clean image's captions, nor lends them: the same share of all the captions is
    # planted, every one among the other images'
    assert sum(line["planted"] for line in lines) == round(0.3 * len(lines))
    for line in lines:
        if line["image_id"] in clean:
            assert not line["planted"] and line["caption"] == line["original"]
        if line["planted"]:
            assert line["from_image_id"] not in clean
    # the clean subset's own file: exactly its images and their untouched captions, as the source has them
    subset = json.loads((out / clean_annotations(TRAIN)).read_text())
    assert {image["id"] for image in subset["images"]} == clean
    assert subset["annotations"] == [a for a in source["annotations"] if a["image_id"] in clean]
    assert clean_annotations(TRAIN) == "annotations/captions_clean.json"
    # refused before anything is written: a subset of every image, more planted captions than the rest hold
    for args, message in ((["--clean-images", "64"], "--clean-images must be in [0, 64)"),
                          (["--clean-images", "60", "--fraction", "0.3"], "more than the 20 outside")):
        assert main(["data", "noise", "--from", str(shapes_root), "--out", str(tmp_path / "no"),
                     "--fraction", "0.3", *args]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "no").exists()


@pytest.mark.parametrize("fraction", ["1.0", "-0.1", "1.5"])
def test_noise_refuses_a_fraction_outside_0_1_before_writing(shapes_root, tmp_path, capsys, fraction):
    out = tmp_path / "out"
    assert main(["data", "noise", "--from", str(shapes_root), "--out", str(out), "--fraction", fraction]) == 2
    assert "--fraction must be in [0, 1)" in capsys.readouterr().err and not out.exists()


def test_noise_refuses_an_out_folder_holding_something_else(shapes_root, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["data", "noise", "--from", str(shapes_root), "--out", str(out), "--fraction", "0.3"]) == 2
    assert "already holds something else" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# --- fit --init ----------------------------------------------------------------------------------------------
def test_fit_init_starts_from_the_checkpoints_weights_and_drops_what_the_new_model_lacks(tiny_runs_dir, tmp_path):
    source = tiny_runs_dir / "tiny"  # ITC + LM + ITM
    out = tmp_path / "captioner"
    # LM only, a learning rate too small to move a weight: the result is the init checkpoint's decoder
    code = main(["fit", "--init", f"{source}:1", "--run-dir", str(out), "--max-steps", "1", "--no-progress",
                 "--set", "model.itc_weight=0", "--set", "model.itm_weight=0", "--set", "train.lr=1e-12",
                 "--set", "train.weight_decay=0", "--set", "train.warmup_steps=0"])
    assert code == 0
    info = RunDir(out).read_info()
    assert info["init"]["run"] == str(source) and info["init"]["epoch"] == 1
    assert {"itm_head", "text_encoder", "vision_proj", "text_proj"} <= set(info["init"]["dropped"])
    assert info["init"]["new"] == {} and info["config"]["train"]["init"] == f"{source}:1"
    assert info["config"]["data"] == RunDir(source).config().to_dict()["data"]  # no --preset: the init run's config
    before, _, _ = RunDir(source).load_model(1)
    after, _, _ = RunDir(out).load_model()
    assert not hasattr(after, "itm_head") and not hasattr(after, "text_encoder")
    for name, tensor in after.state_dict().items():
        torch.testing.assert_close(tensor, before.state_dict()[name], atol=1e-6, rtol=0)


def test_fit_init_refuses_another_architecture_a_missing_run_and_resume(tiny_runs_dir, tmp_path, capsys):
    source = tiny_runs_dir / "tiny"
    assert main(["fit", "--init", str(source), "--run-dir", str(tmp_path / "a"), "--set", "model.image_size=64",
                 "--no-progress"]) == 2
    assert "another architecture" in capsys.readouterr().err
    assert main(["fit", "--init", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "not a run folder" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["fit", "--init", str(source), "--resume", "--run-dir", str(tmp_path / "c")]) == 2
    assert "not both" in capsys.readouterr().err


def test_run_specs_name_a_folder_and_an_optional_epoch():
    assert parse_run_spec("runs/a:3") == (Path("runs/a"), 3)
    assert parse_run_spec("runs/a") == (Path("runs/a"), None)
    assert parse_run_spec("runs/odd:name") == (Path("runs/odd:name"), None)


# --- capfilt -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capfilt_out(tiny_runs_dir, noisy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("capfilt") / "boot"
    run = str(tiny_runs_dir / "tiny")
    settings = CapfiltSettings(synthetic_per_image=2, keep_fraction=0.6, batch_size=16)
    run_capfilt(run, run, noisy_root, out, settings, progress=False)
    return out


def test_capfilt_accounts_for_every_caption_and_scores_the_filter_against_the_planted_record(
        noisy_root, capfilt_out):
    noise = read_jsonl(noisy_root / NOISE_RECORD)
    result = load_capfilt(capfilt_out)
    records, summary = result.records, result.summary
    originals = [r for r in records if r["origin"] == "original"]
    synthetic = [r for r in records if r["origin"] == "synthetic"]
    images = {r["image_id"] for r in originals}
    assert sorted(r["index"] for r in originals) == list(range(len(noise)))  # every training caption, once
    assert len(synthetic) == 2 * len(images) and all(r["planted"] is None for r in synthetic)
    for record in originals:
        assert record["planted"] == noise[record["index"]]["planted"]
        assert record["text"] == " ".join(noise[record["index"]]["caption"].split())
    for record in records:
        assert 0 <= record["itm"] <= 1 and -1 <= record["itc"] <= 1
    kept = [r for r in records if r["kept"]]
    assert all(r["itm"] >= summary["cutoff"] for r in kept)
    assert all(r["itm"] < summary["cutoff"] for r in records if not r["kept"])
    assert len(kept) >= 0.6 * len(records) and summary["score"] == "itm" and summary["scorers"] == ["itm", "itc"]
    counts = summary["counts"]
    assert (counts["original"], counts["synthetic"]) == (len(originals), len(synthetic))
    assert counts["kept_original"] + counts["kept_synthetic"] == len(kept)
    # AUC against noise.jsonl, for each scorer: low score = planted
    planted = [r["planted"] for r in originals]
    for scorer in ("itm", "itc"):
        expected = roc_auc([-r[scorer] for r in originals], planted)
        assert summary["planted"]["scorers"][scorer]["auc"] == pytest.approx(expected)
    assert summary["planted"]["planted"] == sum(planted)
    # the bootstrapped training file holds exactly the kept captions
    boot = json.loads((capfilt_out / TRAIN).read_text())
    assert sorted(a["caption"] for a in boot["annotations"]) == sorted(r["text"] for r in kept)
    assert {i["id"] for i in boot["images"]} == {r["image_id"] for r in kept}
    assert not (capfilt_out / NOISE_RECORD).exists()  # the noisy data's record does not describe these captions


def test_capfilt_output_trains(shapes_root, capfilt_out, tmp_path):
    cfg = as_coco(small_cfg(shapes_root, max_steps=2, epochs=1), capfilt_out)
    assert Trainer(cfg, tmp_path / "run", progress=False).fit()["status"] == "completed"


def test_capfilt_resumes_with_the_same_captions(tiny_runs_dir, noisy_root, capfilt_out, tmp_path):
    run = str(tiny_runs_dir / "tiny")
    settings = CapfiltSettings(synthetic_per_image=2, keep_fraction=0.6, batch_size=16)
    out = tmp_path / "boot"
    run_capfilt(run, run, noisy_root, out, settings, progress=False)
    batches = sorted((out / CAPFILT_SCORES).iterdir())
    assert len(batches) == 4  # 64 images, 16 a batch
    batches[-1].unlink()  # as if stopped during the last batch
    (out / CAPFILT_SUMMARY).unlink()
    with pytest.raises(ValueError, match="--resume"):
        run_capfilt(run, run, noisy_root, out, settings, progress=False)
    run_capfilt(run, run, noisy_root, out, settings, resume=True, progress=False)
    assert (out / CAPFILT_RECORD).read_text() == (capfilt_out / CAPFILT_RECORD).read_text()


def test_capfilt_cli_and_its_refusals(tiny_runs_dir, noisy_root, shapes_root, tmp_path, capsys):
    run = str(tiny_runs_dir / "tiny")
    args = ["capfilt", "--captioner", run, "--filter", run, "--data", str(noisy_root), "--no-progress"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--threshold", "1.5"]) == 2
    assert "--threshold must be in [0, 1]" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--out", str(out), "--score", "itc", "--threshold", "0.5"]) == 2
    assert "--keep-fraction" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--out", str(out), "--synthetic", "2", "--decoding", "beam"]) == 2
    assert "same caption every time" in capsys.readouterr().err and not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(busy)]) == 2
    assert "already holds something else" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a filter with neither ITM nor ITC, a captioner without a decoder: named, nothing written
    lm_only, no_decoder = tmp_path / "lm-only", tmp_path / "no-decoder"
    for folder, model in ((lm_only, {"itc_weight": 0.0, "itm_weight": 0.0}), (no_decoder, {"lm_weight": 0.0})):
        cfg = small_cfg(shapes_root, model=model, max_steps=1, epochs=1)
        Trainer(cfg, folder, progress=False).fit()
    assert main([*args[:3], "--filter", str(lm_only), *args[5:], "--out", str(out)]) == 2
    assert "neither an ITM head" in capsys.readouterr().err and not out.exists()
    assert main(["capfilt", "--captioner", str(no_decoder), *args[3:], "--out", str(out)]) == 2
    assert "has no decoder" in capsys.readouterr().err and not out.exists()
    # ... unless it writes no caption: --synthetic 0 scores the originals only, with a filter trained ITM + ITC only
    scored_only = tmp_path / "scored-by-a-filter-without-decoder"
    assert main(["capfilt", "--captioner", str(no_decoder), "--filter", str(no_decoder), *args[5:], "--out",
                 str(scored_only), "--synthetic", "0", "--keep-fraction", "0.5"]) == 0
    assert json.loads((scored_only / CAPFILT_SUMMARY).read_text())["counts"]["kept_synthetic"] == 0
    # the command itself, originals only: the ITM threshold 0.5 by default, which keeps nothing from this tiny
    # run's ITM head (at chance, p(match) ~ 1/3 for every pair): refused with the scores' range, and --resume
    # re-cuts the scores kept in OUT
    assert main([*args, "--out", str(out), "--synthetic", "0"]) == 2
    assert "kept no caption: every ITM score is below the cut-off 0.500" in capsys.readouterr().err
    assert not (out / CAPFILT_SUMMARY).exists()
    assert main([*args, "--out", str(out), "--synthetic", "0", "--keep-fraction", "0.5", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "planted captions found by itm: ROC AUC" in printed and "train on it with" in printed
    summary = json.loads((out / CAPFILT_SUMMARY).read_text())
    assert summary["keep_fraction"] == 0.5 and summary["counts"]["synthetic"] == 0
    assert summary["counts"]["kept_original"] >= summary["counts"]["original"] / 2


# --- the loop as a study plan ---------------------------------------------------------------------------------
def test_the_plan_follows_blip_beside_todays_protocol(tmp_path):
    """studies/capfilt.toml's BLIP stages: the noise of today's protocol with a clean subset, a filter (ITC + ITM)
    and a captioner (LM) fine-tuned from the noisy-data model of their seed on the clean subset alone, CapFilt
    with those two as today's with the noisy-data model, a retraining at the clean and noisy runs' budget; a
    recovery question each; one command a seed trains BLIP's loop and nothing of today's."""
    from blipcore.experiments.study import load_plan, planned_config, selection
    from blipcore.experiments.study.plan import capfilt_protocol
    from blipcore.experiments.study.running import _runs_to_train

    plan = load_plan(REPO_ROOT / "studies" / "capfilt.toml")
    stages = {stage.name: stage for stage in plan.stages}

    def option(stage: str, name: str) -> str:
        args = stages[stage].command
        return args[args.index(name) + 1]

    for name in ("--from", "--fraction", "--seed", "--train-annotations"):
        assert option("blip-noisy-data", name) == option("noisy-data", name)
    assert option("blip-noisy-data", "--clean-images") == "1000"
    assert "--clean-images" not in stages["noisy-data"].command
    train_file = option("blip-noisy-data", "--train-annotations")
    budget = planned_config(plan, tmp_path, stages["clean"], "tuned", 1).train.max_steps
    for variant, losses in (("filter", {"itc", "itm"}), ("captioner", {"lm"})):
        cfg = planned_config(plan, tmp_path, stages["blip-finetuned"], variant, 1)
        assert cfg.train.init == str(tmp_path / "blip-noisy-tuned-seed1")
        assert cfg.data.root == str(tmp_path / "data" / "noisy-clean")
        assert cfg.data.train_annotations == clean_annotations(train_file)
        assert {loss for loss in ("itc", "lm", "itm") if getattr(cfg.model, f"{loss}_weight") > 0} == losses
        assert cfg.train.max_steps <= budget / 3
    assert capfilt_protocol(plan, "bootstrapped") == "captioner and filter: noisy/tuned"
    assert capfilt_protocol(plan, "blip-bootstrapped") == (
        "captioner: blip-finetuned/captioner, filter: blip-finetuned/filter")
    assert option("blip-bootstrapped-data", "--data") == option("blip-noisy-data", "--out")
    assert option("blip-bootstrapped-data", "--train-annotations") == train_file  # not the filter's clean subset
    for name in ("--synthetic", "--threshold"):
        assert option("blip-bootstrapped-data", name) == option("bootstrapped-data", name)
    boot = planned_config(plan, tmp_path, stages["blip-bootstrapped"], "tuned", 1)
    assert not boot.train.init and boot.train.max_steps == budget
    assert [(r.reference, r.degraded, r.treated) for r in plan.recoveries] == [
        (("clean", "tuned"), ("noisy", "tuned"), ("bootstrapped", "tuned")),
        (("clean", "tuned"), ("blip-noisy", "tuned"), ("blip-bootstrapped", "tuned"))]
    assert _runs_to_train(plan, tmp_path, selection(plan, ["blip-bootstrapped"], [2]), set()) == {
        ("blip-noisy", "tuned", 2), ("blip-finetuned", "filter", 2), ("blip-finetuned", "captioner", 2),
        ("blip-bootstrapped", "tuned", 2)}


def test_the_filters_table_puts_the_protocols_side_by_side_with_their_spread_over_seeds():
    from blipcore.experiments.study.report import filters_markdown

    def row(protocol: str, seed: int, auc: float, clean: int) -> dict:
        return {"protocol": protocol, "stage": protocol.split()[0], "seed": seed, "scorer": "itm", "decided": True,
                "auc": auc, "precision": 0.5, "recall": 0.25, "original": 100, "kept_original": 70, "images": 20,
                "images_kept": 19, "synthetic": 20 - clean // 5, "kept_synthetic": 10, "clean": clean,
                "clean_images": clean // 5}

    rows = [row("today", 0, 0.75, 0), row("today", 1, 0.77, 0), row("blip", 0, 0.90, 25), row("blip", 1, 0.94, 25)]
    lines = filters_markdown(rows).splitlines()
    assert "| today | today | 0 | itm | yes | 0.750 | 50.0% | 25.0% | 70.0% (70 of 100) | 95.0% (19 of 20) | " \
           "50.0% (10 of 20) | - |" in lines
    assert "| blip | blip | 1 | itm | yes | 0.940 | 50.0% | 25.0% | 70.0% (70 of 100) | 95.0% (19 of 20) | " \
           "66.7% (10 of 15) | 25 captions of 5 images |" in lines
    assert lines[lines.index("CapFilt filters over seeds: mean ± sd") + 4:] == [
        "| today | today | itm | 2 | 0.760 ± 0.014 | 50.0% ± 0.0% | 25.0% ± 0.0% |",
        "| blip | blip | itm | 2 | 0.920 ± 0.028 | 50.0% ± 0.0% | 25.0% ± 0.0% |"]


def test_the_capfilt_loop_runs_as_a_study_plan(shapes_root, tmp_path):
    """studies/capfilt.toml's stages on the shapes data, both protocols on one noisy dataset with a clean subset:
    plant noise, train on clean and on noisy captions; CapFilt the noisy data with the noisy-data model, and with
    a captioner and a filter fine-tuned from it on the clean subset (BLIP's); train on each bootstrapped dataset;
    one table with each protocol's filter rows and recovery row."""
    from blipcore.evaluation.evaluator import CheckpointEvaluator
    from blipcore.experiments.study import parse_plan, run_study
    from tests.test_study import tiny_plan

    raw = tiny_plan(shapes_root)
    raw["seeds"] = [0]
    raw["set"]["model.itm_weight"] = 0.5
    raw["set"]["data.kind"] = "coco"  # a derived folder is read as COCO captions, never regenerated
    make_data = raw["stage"][0]
    study = tmp_path / "study-capfilt"
    noisy_run = "{run:noisy/tuned}"  # the noisy run of the stage's seed: each seed is the whole loop
    finetune = {"train.init": noisy_run, "data.train_annotations": clean_annotations(TRAIN), "train.max_steps": 2}
    raw["stage"] = [
        make_data,
        {"name": "noisy-data", "command": ["data", "noise", "--from", "{study}/shapes", "--out", "{study}/data/noisy",
                                           "--fraction", "0.3", "--clean-images", "16"],
         "produces": "{study}/data/noisy"},
        {"name": "clean", "data": "make-data", "variants": {"tuned": {}}},
        {"name": "noisy", "data": "noisy-data", "variants": {"tuned": {}}},
        {"name": "boot-data", "command": ["capfilt", "--captioner", noisy_run, "--filter", noisy_run, "--data",
                                          "{study}/data/noisy", "--out", "{study}/data/boot-seed{seed}",
                                          "--keep-fraction", "0.7", "--seed", "{seed}", "--no-progress"],
         "produces": "{study}/data/boot-seed{seed}"},
        {"name": "bootstrapped", "data": "boot-data", "variants": {"tuned": {}}},
        {"name": "finetuned", "data": "noisy-data", "variants": {
            "filter": {**finetune, "model.lm_weight": 0.0},
            "captioner": {**finetune, "model.itc_weight": 0.0, "model.itm_weight": 0.0}}},
        {"name": "blip-data", "command": ["capfilt", "--captioner", "{run:finetuned/captioner}", "--filter",
                                          "{run:finetuned/filter}", "--data", "{study}/data/noisy",
                                          "--train-annotations", TRAIN, "--out", "{study}/data/blip-seed{seed}",
                                          "--keep-fraction", "0.7", "--seed", "{seed}", "--no-progress"],
         "produces": "{study}/data/blip-seed{seed}"},
        {"name": "blip", "data": "blip-data", "variants": {"tuned": {}}},
    ]
    raw["recovery"] = [{"metric": "cider", "reference": "clean/tuned", "degraded": "noisy/tuned",
                        "treated": treated} for treated in ("bootstrapped/tuned", "blip/tuned")]
    plan = parse_plan(raw)

    trained = []

    def train(cfg, folder, resume):
        trained.append(folder.name)
        return Trainer(cfg, folder, resume=resume, progress=False).fit()

    def test_without_meteor(run, epoch, strategies):
        return CheckpointEvaluator(run, "test").evaluate(epoch, strategies, meteor=False, progress=False)

    table = run_study(plan, study, train, main, log=lambda _: None, test=test_without_meteor)
    assert {row["stage"] for row in table["rows"]} == {"clean", "noisy", "bootstrapped", "finetuned", "blip"}
    boot = RunDir(study / "bootstrapped-tuned-seed0").config()
    assert boot.data.root == str(study / "data" / "boot-seed0")
    today, blip = "captioner and filter: noisy/tuned", "captioner: finetuned/captioner, filter: finetuned/filter"
    assert [(f["protocol"], f["stage"], f["seed"], f["scorer"], f["decided"]) for f in table["filters"]] == [
        (today, "boot-data", 0, "itm", True), (today, "boot-data", 0, "itc", False),
        (blip, "blip-data", 0, "itm", True), (blip, "blip-data", 0, "itc", False)]
    summary = load_capfilt(study / "data" / "boot-seed0").summary
    assert table["filters"][0]["auc"] == summary["planted"]["scorers"]["itm"]["auc"]
    # the filter, fine-tuned without LM, counts with its last epoch's ranking and matching: a row, and a record
    filter_row = next(row for row in table["rows"] if (row["stage"], row["variant"]) == ("finetuned", "filter"))
    assert filter_row["decoding"] == "-" and filter_row["chosen_on_dev"] == 1 and filter_row["itm_match_auc"]
    # BLIP's CapFilt: the clean subset's captions kept as they are, neither captioned nor scored; the filter's
    # ITM head is the noisy-data model's (explicit: nothing of it started fresh), its decoder dropped
    result = load_capfilt(study / "data" / "blip-seed0")
    counts, noise = result.summary["counts"], read_jsonl(study / "data" / "noisy" / NOISE_RECORD)
    clean = [line for line in noise if line["clean"]]
    assert (counts["clean"], counts["clean_images"], counts["synthetic"]) == (len(clean), 16, 64 - 16)
    assert result.summary["planted"]["captions"] == counts["original"] == len(noise) - len(clean)
    assert sorted(r["index"] for r in result.records if r["origin"] == "clean") == [c["index"] for c in clean]
    assert all(r["kept"] and r["itm"] is None and r["itc"] is None for r in result.records if r["origin"] == "clean")
    kept = json.loads((study / "data" / "blip-seed0" / TRAIN).read_text())["annotations"]
    assert {c["caption"] for c in clean} <= {a["caption"] for a in kept}
    started = result.summary["filter_init"]
    assert started["run"] == str(study / "noisy-tuned-seed0") and started["new"] == {}
    assert "text_decoder" in started["dropped"] and "itm_head" in result.summary["captioner_init"]["dropped"]
    # a recovery row each, named by its protocol
    assert [r["protocol"] for r in table["recoveries"]] == [today, blip] and table["recovery"] == table["recoveries"][0]
    page = (study / "study.md").read_text()
    assert "| protocol | clean/tuned (reference) | noisy/tuned (degraded) | treated |" in page
    assert f"| {today} | " in page and f"| {blip} | " in page and "| blip/tuned: " in page
    recovery = table["recovery"]  # one seed: each role's number, and no verdict without a spread
    cider = {stage: RunDir(study / f"{stage}-tuned-seed0").load_eval(1, split="test")["strategies"]["greedy"]
             ["metrics"]["cider"] for stage in ("clean", "noisy", "bootstrapped")}
    assert [recovery[role]["values"] for role in ("reference", "degraded", "treated")] == [
        {"0": cider["clean"]}, {"0": cider["noisy"]}, {"0": cider["bootstrapped"]}]
    assert recovery["verdict"] != "met" and recovery["verdict"] != "missed"

    # with a results folder, every completed run and the CapFilt stage leave their numbers there, no captions
    results = tmp_path / "results"
    trained.clear()
    assert run_study(plan, study, train, main, log=lambda _: None, results=results) == {**table, "runs": ANY}
    assert trained == [] and sorted(path.name for path in results.iterdir()) == [
        "blip-data-seed0.capfilt.json", "blip-tuned-seed0.json", "boot-data-seed0.capfilt.json",
        "bootstrapped-tuned-seed0.json", "clean-tuned-seed0.json", "finetuned-captioner-seed0.json",
        "finetuned-filter-seed0.json", "noisy-tuned-seed0.json"]
    recorded = "".join(path.read_text() for path in results.iterdir())
    dataset = json.loads((study / "shapes" / "annotations" / "captions_heldout.json").read_text())
    evaluation = RunDir(study / "clean-tuned-seed0").load_eval(1, split="test")
    samples = [sample for key in ("strategies", "reference_rows") for entry in evaluation[key].values()
               for sample in entry.get("samples", [])]
    quoted = {a["caption"] for a in dataset["annotations"]} | {sample["caption"] for sample in samples} | {
        text for sample in samples for text in sample["references"]}
    assert len(quoted) > 10 and not any(json.dumps(text) in recorded for text in quoted)

    # the run folders and the made datasets go (a new machine; shapes/ stays, as Flickr8k would): the table is the
    # same, from the records, and nothing trains again
    for folder in [*study.glob("*-seed0"), study / "data"]:
        shutil.rmtree(folder)
    again = run_study(plan, study, train, main, log=lambda _: None, results=results)
    assert trained == [] and {run["source"] for run in again["runs"]} == {"record"}
    assert [again[key] for key in ("rows", "filters", "recoveries")] == [table[key] for key in (
        "rows", "filters", "recoveries")]
    # ... unless a stage to run needs a folder: the bootstrapped run's record gone, CapFilt needs its captioner
    (results / "bootstrapped-tuned-seed0.json").unlink()
    run_study(plan, study, train, main, log=lambda _: None, test=test_without_meteor, results=results,
              only=["bootstrapped"])
    assert trained == ["noisy-tuned-seed0", "bootstrapped-tuned-seed0"]
    assert (results / "bootstrapped-tuned-seed0.json").is_file()
