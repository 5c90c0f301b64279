"""`python -m train export`: runs written as TensorBoard logs, read back with TensorBoard's own event reader: the
scalars at their steps, the hyperparameters, the projector's config and files; exporting again writes nothing twice;
a folder that is not a run is one error line; a half-written run exports what is complete."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from blipcore.experiments import tensorboard as export_module
from blipcore.experiments.tensorboard import STATE_FILE, export_runs, scalar_tag
from blipcore.runs.rundir import RunDir
from train.cli import main

LOSS, VAL_LOSS_TAG = "loss/total loss", scalar_tag("val_loss")


def accumulator(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(folder: Path, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator(folder).Scalars(tag)}


def written_events(folder: Path) -> Counter:
    """Every summary value under `folder`, read raw from every event file, as (run folder, tag, step): a count
    above 1 is a point written twice."""
    found: Counter = Counter()
    for path in folder.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found[(str(path.parent.relative_to(folder)), value.tag, event.step)] += 1
    return found


def export(*args: str) -> int:
    return main(["export", *args, "--no-progress"])


@pytest.fixture(scope="module")
def exported(tiny_runs_dir, tmp_path_factory) -> Path:
    """The tiny runs folder exported once (read-only for the tests)."""
    out = tmp_path_factory.mktemp("tensorboard")
    assert export("--runs-dir", str(tiny_runs_dir), "--tensorboard", str(out)) == 0
    return out


def test_scalars_are_read_back_at_their_steps_train_and_validation_together(tiny_runs_dir, exported):
    lines = RunDir(tiny_runs_dir / "tiny").read_metrics()
    train = {line["step"]: line["loss"] for line in lines if line["split"] == "train"}
    val = {line["step"]: line["val_loss"] for line in lines if line["split"] == "val"}
    assert train and val and VAL_LOSS_TAG == LOSS  # a validation loss shares its training loss's chart
    assert scalars(exported / "tiny" / "train", LOSS) == pytest.approx(train)
    assert scalars(exported / "tiny" / "validation", LOSS) == pytest.approx(val)
    r1 = {line["step"]: line["i2t_r1"] for line in lines if line["split"] == "val"}
    assert scalars(exported / "tiny" / "validation", "retrieval/image→text R@1") == pytest.approx(r1)
    # every metric of each evaluation per decoding strategy, those metrics.jsonl does not carry included
    evaluation = RunDir(tiny_runs_dir / "tiny").load_eval(2)
    distinct_2 = scalars(exported / "tiny" / "validation", "collapse/greedy distinct-2")
    assert distinct_2[evaluation["step"]] == pytest.approx(evaluation["strategies"]["greedy"]["metrics"]["distinct_2"])
    assert "greedy_distinct_2" not in lines[-1]


def test_captions_and_the_itc_matrix_per_evaluation(tiny_runs_dir, exported):
    run = RunDir(tiny_runs_dir / "tiny")
    acc = accumulator(exported / "tiny" / "validation")
    steps = [run.load_eval(epoch)["step"] for epoch in (1, 2)]
    captions = acc.Tensors("captions/greedy/text_summary")  # torch adds /text_summary to a text tag
    assert [event.step for event in captions] == steps
    table = captions[-1].tensor_proto.string_val[0].decode()
    sample = run.load_eval(2)["strategies"]["greedy"]["samples"][0]
    assert table.startswith("| image | caption |") and Path(sample["file_path"]).name in table
    images = acc.Images("alignment/ITC similarity (first pairs)")
    assert [event.step for event in images] == steps and images[0].width >= 256


def test_hyperparameters_are_the_runs_config(tiny_runs_dir, exported):
    content = accumulator(exported / "tiny").PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
    values = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    config = RunDir(tiny_runs_dir / "tiny").config()
    assert values["model.itm_weight"].number_value == config.model.itm_weight == 0.5
    assert values["train.lr"].number_value == pytest.approx(config.train.lr)
    assert values["data.kind"].string_value == config.data.kind
    assert values["train.eval_strategies"].string_value == "greedy"


def test_the_projector_config_names_each_epochs_embeddings_metadata_and_thumbnails(tiny_runs_dir, exported):
    run = RunDir(tiny_runs_dir / "tiny")
    config = ProjectorConfig()
    text_format.Parse((exported / "tiny" / "projector_config.pbtxt").read_text(), config)
    steps = [run.load_eval(epoch)["step"] for epoch in (1, 2)]
    assert [e.tensor_name for e in config.embeddings] == [f"epoch_001:{steps[0]:05d}", f"epoch_002:{steps[1]:05d}"]
    arrays = run.load_embeddings(2)
    entry = config.embeddings[-1]
    tensors = np.loadtxt(exported / "tiny" / entry.tensor_path, delimiter="\t")
    np.testing.assert_allclose(tensors, np.concatenate([arrays["image_embeds"], arrays["text_embeds"]]), atol=1e-6)
    rows = (exported / "tiny" / entry.metadata_path).read_text().splitlines()
    n = len(arrays["image_embeds"])
    assert rows[0] == "caption\tmodality\timage\tpair" and len(rows) == 1 + 2 * n
    assert rows[1].split("\t")[:2] == [str(arrays["captions"][0]), "image"]
    assert rows[1 + n].split("\t")[:2] == [str(arrays["captions"][0]), "text"]
    assert (exported / "tiny" / entry.sprite.image_path).is_file() and list(entry.sprite.single_image_dim) == [32, 32]


def test_exporting_again_writes_nothing(tiny_runs_dir, exported, capsys):
    first, files = written_events(exported), sorted(exported.rglob("*"))
    assert first and max(first.values()) == 1
    assert export("--run-dir", str(tiny_runs_dir / "tiny"), "--tensorboard", str(exported)) == 0
    assert "tiny: nothing new" in capsys.readouterr().out
    assert written_events(exported) == first and sorted(exported.rglob("*")) == files  # not even an empty event file


def test_a_half_written_run_exports_what_is_complete_and_the_rest_later(tiny_runs_dir, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    full_metrics = (run_dir / "metrics.jsonl").read_bytes()
    lines = full_metrics.splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    last_embeddings = RunDir(run_dir).embeddings_path(2)
    kept_embeddings = last_embeddings.read_bytes()
    last_embeddings.unlink()
    out = tmp_path / "tb"

    assert export("--run-dir", str(run_dir), "--tensorboard", str(out)) == 0
    complete = [json.loads(line) for line in lines[:3]]
    assert set(scalars(out / "tiny" / "train", LOSS)) == {r["step"] for r in complete if r["split"] == "train"}
    assert (out / "tiny" / "projector_config.pbtxt").read_text().count("tensor_name") == 1

    (run_dir / "metrics.jsonl").write_bytes(full_metrics)  # the trainer goes on
    last_embeddings.write_bytes(kept_embeddings)
    assert export("--run-dir", str(run_dir), "--tensorboard", str(out)) == 0
    steps = {json.loads(line)["step"] for line in lines if json.loads(line)["split"] == "train"}
    assert set(scalars(out / "tiny" / "train", LOSS)) == steps
    assert max(written_events(out).values()) == 1
    assert (out / "tiny" / "projector_config.pbtxt").read_text().count("tensor_name") == 2  # merged, not replaced


def test_follow_exports_until_the_run_ends(tiny_runs_dir, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir, ignore=shutil.ignore_patterns("checkpoints", "trainer.lock"))
    run = RunDir(run_dir)
    lines = run.metrics_file.read_bytes().splitlines(keepends=True)
    run.metrics_file.write_bytes(b"".join(lines[:2]))
    run.update_info(status="running")  # no trainer lock file: as a trainer of an older version leaves it
    naps = []

    def trainer_goes_on(seconds: float) -> None:
        naps.append(seconds)
        run.metrics_file.write_bytes(b"".join(lines))
        run.update_info(status="completed")

    reports = []
    assert export_runs(lambda: [run], tmp_path / "tb", follow=True, interval=0.5, progress=False,
                       report=reports.append, sleep=trainer_goes_on) == []
    assert naps == [0.5] and len(reports) == 2  # one pass while running, one after it ended, then it stops
    assert len(scalars(tmp_path / "tb" / "tiny" / "train", LOSS)) == sum(b'"train"' in line for line in lines)


def test_ctrl_c_keeps_what_is_written_and_exits_130(tiny_runs_dir, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir, ignore=shutil.ignore_patterns("checkpoints", "trainer.lock"))
    RunDir(run_dir).update_info(status="running")

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_runs(lambda: [RunDir(run_dir)], tmp_path / "tb", follow=True, progress=False, sleep=interrupted)
    assert json.loads((tmp_path / "tb" / "tiny" / STATE_FILE).read_text())["train_step"] is not None
    assert scalars(tmp_path / "tb" / "tiny" / "train", LOSS)  # flushed

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_runs", stopped)
    assert export("--run-dir", str(run_dir), "--tensorboard", str(tmp_path / "tb"), "--follow") == 130
    assert "interrupted: what was exported is kept" in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_is_one_error_line(tiny_runs_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [("--run-dir", tmp_path / "empty", "not a run folder"), ("--run-dir", tmp_path / "nowhere", "no such"),
             ("--run-dir", tiny_runs_dir, "folder of runs; export them with --runs-dir"),
             ("--runs-dir", tmp_path / "empty", "holds no run folder")]
    for option, folder, message in cases:
        assert export(option, str(folder), "--tensorboard", str(tmp_path / "tb")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "tb").exists()
    # nor is a run folder a place to export into
    assert export("--run-dir", str(tiny_runs_dir / "tiny"), "--tensorboard", str(tiny_runs_dir)) == 2
    assert "is a run folder" in capsys.readouterr().err


def test_an_export_folder_holds_one_run(tiny_runs_dir, tmp_path, capsys):
    """Two runs of one name from two runs folders, or a run started again, are not mixed in one export folder."""
    for runs in ("a", "b"):
        (tmp_path / runs / "tiny").mkdir(parents=True)
        shutil.copy(tiny_runs_dir / "tiny" / "run.json", tmp_path / runs / "tiny" / "run.json")
    out = str(tmp_path / "tb")
    assert export("--run-dir", str(tmp_path / "a" / "tiny"), "--tensorboard", out) == 0
    assert export("--run-dir", str(tmp_path / "b" / "tiny"), "--tensorboard", out) == 2
    assert f"holds the export of {(tmp_path / 'a' / 'tiny').resolve()}" in capsys.readouterr().err
    RunDir(tmp_path / "a" / "tiny").update_info(created_at="2027-01-01T00:00:00+0000")  # fit --overwrite
    assert export("--run-dir", str(tmp_path / "a" / "tiny"), "--tensorboard", out) == 2
    assert "was started again since it was exported" in capsys.readouterr().err
