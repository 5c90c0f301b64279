"""data.loader = "cache": the decoded-image cache (its files, key and crash safety), the batched augmentation
against the per-image transform it replaces, and training from it (exact resume included)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from blipcore._torchvision import transforms
from blipcore.data import CaptionCollator, ImageSkippedWarning, build_datasets, build_transform, load_image
from blipcore.data import image_cache as image_cache_module
from blipcore.data.batch_augment import BRIGHTNESS, CONTRAST, SATURATION, BatchAugment
from blipcore.data.coco import ImageRecord
from blipcore.data.image_cache import CacheLoader, image_key, open_image_cache, stored_side
from blipcore.model.config import BlipConfig
from blipcore.runs.rundir import RunDir
from blipcore.training.trainer import Trainer
from tests.conftest import PHOTOS, photos_cfg, tiny_config
from tests.test_trainer import assert_same_weights, final_weights
from train.cli import main

TF = transforms.functional
SIDE = 24  # the stored shorter side of these tests' own images


def _pixels(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _folder(root: Path) -> list[ImageRecord]:
    """Images of every kind the cache must keep: landscape, portrait, one past MAX_ASPECT, one smaller than SIDE,
    one turned by its EXIF orientation, and one that does not decode."""
    images = root / "images"
    images.mkdir(parents=True)
    for i, (name, width, height) in enumerate([("wide.png", 90, 60), ("tall.png", 40, 80), ("pano.png", 200, 40),
                                               ("small.png", 20, 16)]):
        _pixels(i, width, height).save(images / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 x 30, shown (and decoded) turned by 90 degrees: 30 x 60
    _pixels(9, 60, 30).save(images / "turned.jpg", exif=exif, quality=95)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    names = ["wide.png", "tall.png", "pano.png", "small.png", "turned.jpg", "broken.jpg"]
    return [ImageRecord(i, str(images / name), [f"picture {i}"]) for i, name in enumerate(names)]


def _read(cache_dir: Path, records: list[ImageRecord], root: Path, side: int = SIDE, **kw) -> tuple:
    return open_image_cache(records, root, side, cache_dir, workers=2, progress=False, **kw)


# --- the files ----------------------------------------------------------------------------------------------


def test_each_image_is_stored_once_shrunk_with_its_aspect_true_size_and_padding(tmp_path):
    records = _folder(tmp_path / "data")
    cache, built = _read(tmp_path / "cache", records, tmp_path / "data")
    assert built and cache.images.dtype == np.uint8
    # every slot landscape: the largest stored shorter side x the largest stored longer side (pano's, 2 x SIDE)
    assert cache.images.shape == (6, SIDE, 2 * SIDE, 3)
    expected = {  # original height, width; stored height, width; transposed
        0: [60, 90, 24, 36, 0], 1: [80, 40, 48, 24, 1], 2: [40, 200, 10, 48, 0], 3: [16, 20, 16, 20, 0],
        4: [60, 30, 48, 24, 1]}
    for index, row in expected.items():
        assert cache.sizes[index].tolist() == row
        height0, width0, height, width, transposed = row
        picture = load_image(records[index].file_path)
        assert picture.size == (width0, height0)
        if (width, height) != picture.size:
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        pixels = np.asarray(picture).transpose(1, 0, 2) if transposed else np.asarray(picture)
        slot = cache.images[index]
        assert np.array_equal(slot[:pixels.shape[0], :pixels.shape[1]], pixels)
        padding = np.ones(slot.shape[:2], bool)
        padding[:pixels.shape[0], :pixels.shape[1]] = False
        assert not slot[padding].any()
    assert list(cache.failed) == [5] and "broken.jpg" in cache.failed[5]
    assert not cache.images[5].any()
    again, built = _read(tmp_path / "cache", records, tmp_path / "data")
    assert not built and again.path == cache.path and np.array_equal(again.images, cache.images)


def test_the_key_changes_with_the_size_and_the_images_not_with_where_the_folder_is(tmp_path):
    records = _folder(tmp_path / "data")
    key = image_key(records, tmp_path / "data", SIDE)
    assert key == image_key(records, tmp_path / "data", SIDE) != image_key(records, tmp_path / "data", SIDE + 1)
    assert image_key(records[:-1], tmp_path / "data", SIDE) != key
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = [ImageRecord(r.image_id, r.file_path.replace("/data/", "/moved/"), r.captions) for r in records]
    assert image_key(moved, tmp_path / "moved", SIDE) == key
    with open(moved[0].file_path, "ab") as f:  # another picture under the same name
        f.write(b"\0")
    assert image_key(moved, tmp_path / "moved", SIDE) != key
    cache, _ = _read(tmp_path / "cache", records, tmp_path / "data")
    other, _ = _read(tmp_path / "cache", records, tmp_path / "data", side=SIDE + 6)
    assert cache.path != other.path and f"-{SIDE + 6}px-" in other.path.name and key[:16] in cache.path.name


def test_an_interrupted_build_is_never_read_as_a_cache_and_is_built_again(tmp_path, monkeypatch):
    records, root, folder = _folder(tmp_path / "data"), tmp_path / "data", tmp_path / "cache"
    store = image_cache_module._store

    def interrupted(images, i, path, side):
        if i == 3:
            raise KeyboardInterrupt
        return store(images, i, path, side)

    monkeypatch.setattr(image_cache_module, "_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _read(folder, records, root)
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []  # no file, whole or half
    monkeypatch.setattr(image_cache_module, "_store", store)
    complete, _ = _read(folder, records, root)
    path, expected = complete.path, np.array(complete.images)
    del complete  # its file is changed below: no mapping of it may be read after that
    manifest = path.with_suffix(".json")
    # a build killed after the rename, before its manifest, and another killed mid-write (its temporary file)
    manifest.unlink()
    head = path.read_bytes()[:1000]
    path.unlink()
    path.write_bytes(head)
    stale = folder / f".{path.name}.k1lled00.tmp"
    stale.write_bytes(b"half")
    cache, built = _read(folder, records, root)
    assert built and not stale.exists() and np.array_equal(cache.images, expected)
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "format": 0}))  # an older layout: built again, never misread
    assert _read(folder, records, root)[1]


def test_concurrent_builders_build_once(tmp_path):
    records, results = _folder(tmp_path / "data"), []
    threads = [threading.Thread(target=lambda: results.append(_read(tmp_path / "cache", records, tmp_path / "data")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(built for _, built in results) == [False, False, True]
    assert len({cache.path for cache, _ in results}) == 1


# --- the batched augmentation against the per-image transform ------------------------------------------------


def _replayed(image: Image.Image, draws, transform) -> torch.Tensor:
    """The per-image transform's output rebuilt from BatchAugment's draws with torchvision's own functions."""
    augment = BatchAugment(transform)
    top, left, height, width = draws.box
    pixels = TF.resized_crop(image, top, left, height, width, [augment.size, augment.size],
                             interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    pixels = TF.to_dtype(TF.to_image(pixels), torch.float32, scale=True)
    adjust = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation}
    for op in draws.order:
        pixels = adjust[op](pixels, draws.factors[op])
    return TF.normalize(pixels, list(augment.mean), list(augment.std))


@pytest.mark.parametrize(("augment", "crop"), [("crop", True), ("crop-jitter", True), ("none", True),
                                               ("crop-jitter", False)])
def test_the_draws_are_the_per_image_transforms_own(augment, crop):
    transform = build_transform(32, train=True, augment=augment, crop=crop)
    batched = BatchAugment(transform)
    for i, name in enumerate(sorted((PHOTOS / "images").iterdir())[:6]):
        image = load_image(name)
        torch.manual_seed(1000 + i)
        expected = transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(1000 + i)
            draws = batched.draws(image.height, image.width)
        assert torch.equal(_replayed(image, draws, transform), expected)
        assert (draws.box != (0, 0, image.height, image.width)) == (augment != "none" and crop)
        assert bool(draws.order) == ("jitter" in augment)


def _photos(tmp_path: Path, augment: str = "crop-jitter-flip") -> BlipConfig:
    return tiny_config().override({
        "data.kind": "coco", "data.root": str(PHOTOS), "data.caption_mode": "all", "data.augment": augment,
        "data.loader": "cache", "data.cache_dir": str(tmp_path / "cache"), "train.batch_size": 40})


def test_batches_from_the_cache_are_the_folder_loaders_items_resampled_from_the_cached_copy(tmp_path):
    cfg = _photos(tmp_path)
    dataset = build_datasets(cfg, splits=("train",))["train"]
    dataset.set_epoch(3)
    loader = CacheLoader.from_config(cfg, dataset, torch.device("cpu"), progress=False)
    assert loader.cache.images.shape[1] == stored_side(32) == 48  # the photos' shorter side, 64 px, at 1.5 x 32
    items = list(range(0, len(dataset), 2))  # of 64 photos x 5 captions
    cached = [loader.batch(items[i:i + 40]) for i in range(0, len(items), 40)]
    folder = [CaptionCollator(cfg.model.max_text_len)([dataset[i] for i in items[i:i + 40]])
              for i in range(0, len(items), 40)]
    for a, b in zip(cached, folder, strict=True):
        for key in ("input_ids", "attention_mask", "image_ids", "indices"):
            assert torch.equal(a[key], b[key]), key
        assert a["captions"] == b["captions"] and a["file_paths"] == b["file_paths"] and a["num_skipped"] == 0
    ours = torch.cat([batch["images"] for batch in cached])
    theirs = torch.cat([batch["images"] for batch in folder])
    assert ours.shape == theirs.shape == (len(items), 3, 32, 32)
    # item by item: the same crop, jitter and flip, resampled from the 48 px copy instead of the 64 px photo (its
    # box rounded to that copy's pixels): far closer to the folder's item than its mirror image or other draws are
    difference = (ours - theirs).abs().flatten(1).mean(1)
    mirrored = (ours - theirs.flip(-1)).abs().flatten(1).mean(1)
    dataset.set_epoch(4)
    redrawn = (torch.stack([dataset[i]["image"] for i in items]) - theirs).abs().flatten(1).mean(1)
    assert difference.mean() < 0.1 < 0.5 < redrawn.mean() and (difference < mirrored).all()
    assert (difference < redrawn).float().mean() > 0.95
    flipped = sum(dataset.flipped(i) for i in items)
    assert 55 <= flipped <= 105


def test_the_batched_resampling_of_a_gpu_matches_the_per_image_kernel_of_a_cpu(tmp_path):
    """The path a GPU takes (all windows at once, as matrix products), run here on the CPU: torch's antialiased
    float kernel to the rounding, and the per-image uint8 kernel a CPU takes but for that kernel's own rounding
    (to 8 bits between its two passes, as PIL's), transposed slots included."""
    cfg = _photos(tmp_path)
    dataset = build_datasets(cfg, splits=("train",))["train"]
    loader = CacheLoader.from_config(cfg, dataset, torch.device("cpu"), progress=False)
    _, indices, _, draws, flips = zip(*loader._draw(range(120)), strict=True)
    windows, transposed = loader.windows(indices, draws)
    assert transposed.any() and not transposed.all()
    images = torch.from_numpy(loader.cache.images)
    each = loader.augment._resample_each(images, indices, windows, transposed, flips)
    batched = loader.augment._resample_batch(images, torch.tensor(indices), torch.from_numpy(windows).float(),
                                             torch.from_numpy(transposed), torch.tensor(flips))
    reference = torch.stack([
        F.interpolate(images[slot, r0:r1, c0:c1].permute((2, 1, 0) if turned else (2, 0, 1))[None].float(),
                      size=(32, 32), mode="bicubic", antialias=True)[0].flip(-1 if flip else ())
        for slot, (r0, r1, c0, c1), turned, flip in zip(indices, windows.tolist(), transposed, flips, strict=True)])
    assert (batched - reference.round().clamp(0, 255)).abs().max() <= 1
    assert (each - batched).abs().max() <= 8 and (each - batched).abs().mean() < 0.3
    whole = BatchAugment(dataset.transform, per_image=False)  # every step of the GPU's path
    assert torch.allclose(whole(images, indices, windows, transposed, draws, flips),
                          loader.augment(images, indices, windows, transposed, draws, flips), atol=0.1)


def test_batched_augmentation_has_the_distribution_of_the_per_image_transform(tmp_path):
    """Independent draws (the cache at epoch 0, the folder at epoch 1): the pixel statistics of their outputs must
    not tell the two apart (two-sample Kolmogorov-Smirnov); and the windows the cache resamples cover the share of
    the picture that the drawn crop boxes cover."""
    cfg = _photos(tmp_path)
    dataset = build_datasets(cfg, splits=("train",))["train"]
    loader = CacheLoader.from_config(cfg, dataset, torch.device("cpu"), progress=False)
    items = list(range(len(dataset)))
    ours = torch.cat([loader.batch(items[i:i + 40])["images"] for i in range(0, len(items), 40)])
    dataset.set_epoch(1)
    theirs = torch.stack([dataset[i]["image"] for i in items])
    for statistic in (lambda x: x.mean((1, 2, 3)), lambda x: x.std((1, 2, 3)), lambda x: x[:, 0].mean((1, 2)),
                      lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))):  # brightness, contrast, red, detail
        assert stats.ks_2samp(statistic(ours).numpy(), statistic(theirs).numpy()).pvalue > 0.01
    assert abs(ours.mean() - theirs.mean()) < 0.05 and abs(ours.std() / theirs.std() - 1) < 0.05
    # the cached crop windows cover the share of the picture that the drawn boxes cover
    with torch.random.fork_rng(devices=[]):
        shares, windows = [], []
        for item in items:
            torch.random.default_generator.manual_seed(dataset.augment_seed(item))
            index = dataset._locate(item)[0]
            height0, width0, height, width, _ = loader.cache.sizes[index].tolist()
            draws = loader.augment.draws(height0, width0)
            shares.append(draws.box[2] * draws.box[3] / (height0 * width0))
            ((r0, r1, c0, c1),), _ = loader.windows([index], [draws])
            windows.append((r1 - r0) * (c1 - c0) / (height * width))
    assert 0.5 - 0.05 <= min(shares) and max(shares) <= 1 and np.allclose(windows, shares, atol=0.06)
    assert stats.ks_2samp(windows, shares).pvalue > 0.2


def test_an_image_that_does_not_decode_is_skipped_with_a_warning(tmp_path):
    root = tmp_path / "data"
    records = _folder(root)
    (root / "annotations").mkdir()
    document = {"images": [{"id": r.image_id, "file_name": Path(r.file_path).name} for r in records],
                "annotations": [{"image_id": r.image_id, "caption": r.captions[0]} for r in records]}
    (root / "annotations" / "captions_train.json").write_text(json.dumps(document))
    cfg = tiny_config().override({"data.kind": "coco", "data.root": str(root), "data.loader": "cache",
                                  "data.cache_dir": str(tmp_path / "cache"), "model.image_size": 16})
    dataset = build_datasets(cfg, splits=("train",))["train"]
    loader = CacheLoader.from_config(cfg, dataset, torch.device("cpu"), progress=False)
    with pytest.warns(ImageSkippedWarning, match="broken.jpg"):
        batch = loader.batch(list(range(6)))
    assert batch["num_skipped"] == 1 and batch["indices"].tolist() == [0, 1, 2, 3, 4]
    assert batch["images"].shape == (5, 3, 16, 16) and torch.isfinite(batch["images"]).all()
    assert loader.batch([5]) is None


# --- configuration, command line and training --------------------------------------------------------------


def test_the_loader_is_checked_with_the_config():
    with pytest.raises(ValueError, match="data.loader must be one of folder, cache"):
        tiny_config().override({"data.loader": "memory"})
    with pytest.raises(ValueError, match="not streamed WebDataset shards"):
        tiny_config().override({"data.kind": "webdataset", "data.loader": "cache"})
    assert BlipConfig.from_dict({"data": {}}).data.loader == "folder"  # a run recorded before the option


def test_data_cache_builds_once_and_says_how_to_train_on_it(tmp_path, capsys):
    argv = ["data", "cache", "--from", str(PHOTOS), "--size", "32", "--out", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cached 64 images at 48 px" in out and "--set data.loader=cache" in out
    assert len(list((tmp_path / "c").glob("train-48px-*.npy"))) == 1 and list((tmp_path / "c").glob("tokens-*"))
    assert main(argv) == 0 and "already cached: 64 images" in capsys.readouterr().out
    assert main(["data", "cache", "--from", str(PHOTOS)]) == 2
    assert "--size PX or --preset NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ended:
        main(["data", "cache", "--help"])
    assert ended.value.code == 0 and "fit --set data.loader=cache" in capsys.readouterr().out


def test_training_from_the_cache_resumes_exactly(shapes_root, tmp_path, monkeypatch):
    cfg = photos_cfg(shapes_root, epochs=1).override({
        "data.loader": "cache", "data.cache_dir": str(tmp_path / "cache"), "data.augment": "crop-jitter-flip",
        "data.num_workers": 2})
    summary = Trainer(cfg, tmp_path / "straight", progress=False).fit()
    info = RunDir(tmp_path / "straight").read_info()
    assert summary["status"] == "completed" and summary["step"] == 8 and info["data_workers"] == 0
    assert len(list((tmp_path / "cache").glob("train-48px-*.npy"))) == 1

    original = Trainer._optimizer_step

    def stop_after_three(self, micro):
        result = original(self, micro)
        if self.step + 1 >= 3:
            self.stop_requested = True
        return result

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_after_three)
    assert Trainer(cfg, tmp_path / "resumed", progress=False).fit()["step"] == 3
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    assert Trainer(cfg, tmp_path / "resumed", resume=True, progress=False).fit()["status"] == "completed"
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
