"""WebDataset shards: `python -m train data shards` writes them from a COCO-caption-format folder;
`data.kind = "webdataset"` streams them (split across ranks and workers, seeded, resumable at a shard,
corrupt samples and unreadable shards skipped); shards served over HTTP read the same."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import blipcore.training.trainer
from blipcore.data import CaptionCollator, build_datasets
from blipcore.data.folders import DataSourceError
from blipcore.data.shards import ShardDataset
from blipcore.runs.rundir import RunDir
from tests.conftest import small_cfg
from tests.test_fetch_coco import FakeCoco
from train.cli import main

BATCH = 4


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory, shapes_root) -> Path:
    """The tiny shapes dataset (64 train / 16 val images) as 8 shards of 8 images, 5 train images as files."""
    out = tmp_path_factory.mktemp("shards") / "out"
    assert main(["data", "shards", "--from", str(shapes_root), "--out", str(out), "--shard-size", "8",
                 "--train-files", "5", "--no-progress"]) == 0
    return out


def shards_cfg(shapes_root: Path, root: Path, **data):
    return small_cfg(shapes_root, batch_size=BATCH).override(
        {"data.kind": "webdataset", "data.root": str(root), "data.shuffle_buffer": 16,
         **{f"data.{k}": v for k, v in data.items()}})


def image_ids(dataset: ShardDataset, workers: int = 0) -> list[list[int]]:
    """The image ids of every batch a DataLoader draws from the dataset."""
    loader = DataLoader(dataset, batch_size=BATCH, collate_fn=CaptionCollator(24), num_workers=workers, drop_last=True)
    return [batch["image_ids"].tolist() for batch in loader]


def test_data_shards_writes_the_layout(shard_root, shapes_root):
    names = sorted(p.name for p in shard_root.glob("train-*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(8)]
    manifest = json.loads((shard_root / "shards.json").read_text())
    assert [s["images"] for s in manifest["train"]["shards"]] == [8] * 8 and manifest["val"]["images"] == 16
    with tarfile.open(shard_root / names[0]) as tar:
        members = tar.getnames()
        meta = json.loads(tar.extractfile(members[1]).read())
    assert members[:2] == ["1.png", "1.json"] and meta["image_id"] == 1 and len(meta["captions"]) >= 1
    assert len(list((shard_root / "train").iterdir())) == 5 and len(list((shard_root / "val").iterdir())) == 16
    source = json.loads((shapes_root / "annotations/captions_val.json").read_text())
    val = json.loads((shard_root / "annotations/captions_val.json").read_text())
    assert [i["id"] for i in val["images"]] == [i["id"] for i in source["images"]]


def test_one_epoch_reads_every_image_once_and_the_same_way_again(shard_root, shapes_root):
    datasets = build_datasets(shards_cfg(shapes_root, shard_root))
    train, val = datasets["train"], datasets["val"]
    assert isinstance(train, ShardDataset) and len(train) == 64 and len(val) == 16
    assert Path(val.records[0].file_path).is_file() and Path(train.records[0].file_path).is_file()
    first = image_ids(train)
    assert len(first) == 64 // BATCH and sorted(sum(first, [])) == sorted(r.image_id for r in train.records)
    assert image_ids(train) == first  # seeded by (seed, epoch)
    train.set_epoch(1)
    again = image_ids(train)
    assert again != first and sorted(sum(again, [])) == sorted(sum(first, []))

    every_caption = build_datasets(shards_cfg(shapes_root, shard_root, caption_mode="all"), splits=("train",))["train"]
    assert len(every_caption) == sum(len(r.captions) for r in train.records)
    per_image = Counter(sum(image_ids(every_caption), []))
    assert all(per_image[r.image_id] <= len(r.captions) for r in train.records)

    subset = build_datasets(shards_cfg(shapes_root, shard_root, subset=20), splits=("train",))["train"]
    assert len(subset) == 20 and set(sum(image_ids(subset), [])) <= set(range(1, 21))


def test_ranks_and_workers_share_the_shards_without_duplicates(shard_root, shapes_root, monkeypatch):
    train = build_datasets(shards_cfg(shapes_root, shard_root), splits=("train",))["train"]
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = image_ids(train, workers=2)
        assert len(batches) == 64 // 2 // BATCH  # every rank takes the same number of steps
        seen += sum(batches, [])
    assert sorted(seen) == list(range(1, 65))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")  # 8 shards cannot feed 16 readers
    with pytest.raises(DataSourceError, match="8 shard"):
        image_ids(train)


def test_resume_restarts_at_the_first_unfinished_shard(shard_root, shapes_root):
    train = build_datasets(shards_cfg(shapes_root, shard_root, shuffle_buffer=1), splits=("train",))["train"]
    whole = sum(image_ids(train), [])  # buffer 1: the shards' own order, the shard order seeded by the epoch
    train.start_batch = 3  # 12 items taken: the first shard (8) is done, the second was being read
    rest = sum(image_ids(train), [])
    assert len(rest) == 64 - 12 and not set(whole[:8]) & set(rest) and rest[:8] == whole[8:16]


def test_corrupt_samples_and_unreadable_shards_are_skipped_with_a_warning(shard_root, shapes_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(shard_root, root)
    with tarfile.open(shard_root / "train-000001.tar") as tar:  # one image's bytes replaced by garbage
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / "train-000001.tar", "w") as tar:
        for member, data in members:
            data = b"not an image" if member.name == members[0][0].name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (root / "train-000005.tar").write_bytes(b"\0" * 10)  # truncated to nothing
    train = build_datasets(shards_cfg(shapes_root, root), splits=("train",))["train"]
    with pytest.warns(UserWarning, match="skipping"):
        batches = image_ids(train)
    assert len(batches) == 64 // BATCH  # the epoch is still full: the reader went round its shards again
    assert any("train-000001.tar" in what for what in train.skipped)
    assert any("train-000005.tar" in what for what in train.skipped)

    for shard in root.glob("train-*.tar"):
        shard.write_bytes(b"")
    with pytest.raises(DataSourceError, match="no readable training sample"), pytest.warns(UserWarning):
        image_ids(build_datasets(shards_cfg(shapes_root, root), splits=("train",))["train"])


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) shards with curl")
def test_shards_over_http_and_brace_patterns(shard_root, shapes_root):
    with FakeCoco() as server:
        for shard in shard_root.glob("train-*.tar"):
            server.files[f"/bucket/{shard.name}"] = shard.read_bytes()
        pattern = f"{server.url}/bucket/train-{{000000..000007}}.tar"
        train = build_datasets(shards_cfg(shapes_root, shard_root, train_shards=pattern), splits=("train",))["train"]
        assert train.shards[0].url == f"{server.url}/bucket/train-000000.tar"
        assert sorted(sum(image_ids(train), [])) == list(range(1, 65))
    with pytest.raises(FileNotFoundError, match="has no train-000007.tar"):
        build_datasets(shards_cfg(shapes_root, shard_root, train_shards=str(shard_root / "train-{000000..000006}.tar")))


def test_pipe_shards_run_only_when_allowed(shard_root, shapes_root, monkeypatch):
    pattern = f"pipe:cat {shard_root}/train-{{000000..000007}}.tar"
    cfg = shards_cfg(shapes_root, shard_root, train_shards=pattern)  # e.g. from a hand-edited run.json
    with pytest.raises(ValueError, match="runs a shell command"):
        build_datasets(cfg, splits=("train",))
    monkeypatch.setenv("BLIPLAB_ALLOW_PIPE_SHARDS", "1")
    train = build_datasets(cfg, splits=("train",))["train"]
    assert train.shards[7].url == f"pipe:cat {shard_root}/train-000007.tar"
    assert sorted(sum(image_ids(train), [])) == list(range(1, 65))


def test_bad_arguments_and_missing_shards(tmp_path, shapes_root, capsys):
    assert main(["data", "shards", "--from", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a COCO-caption-format folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="python -m train data shards --from"):
        build_datasets(shards_cfg(shapes_root, tmp_path / "nothing"))


@pytest.mark.skipif(not hasattr(blipcore.training.trainer, "IterableDataset"),
                    reason="blipcore.training.trainer does not stream an IterableDataset yet")
def test_trains_five_steps_on_shards_and_resumes(shard_root, shapes_root, tmp_path):
    cfg = shards_cfg(shapes_root, shard_root, num_workers=2).override({"train.max_steps": 3, "train.epochs": 1})
    blipcore.training.trainer.Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert main(["fit", "--run-dir", str(tmp_path / "run"), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    assert RunDir(tmp_path / "run").read_info()["steps_done"] == 5
    assert torch.isfinite(torch.tensor([r["loss"] for r in RunDir(tmp_path / "run").read_metrics()
                                        if r["split"] == "train"])).all()
