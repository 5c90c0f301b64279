"""data.augment: the named sets of training augmentations, the seeded flip and its caption swap."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blipcore._torchvision import transforms
from blipcore.data import CaptionDataset, build_datasets, build_transform, denormalize
from blipcore.data.coco import ImageRecord
from blipcore.data.prep.shards import write_shards
from blipcore.data.shards import ShardDataset
from blipcore.data.transforms import JITTER, augment_steps, draws_flip, flips, swap_left_right
from blipcore.model.config import AUGMENT_SETS
from tests.conftest import small_cfg, tiny_config

CAPTION = "a dog on the left and a cat on the right"
SWAPPED = "a dog on the right and a cat on the left"


def _noise(seed: int, size: tuple[int, int] = (40, 24)) -> Image.Image:
    """Random pixels: no image of it is its own mirror image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _records(folder: Path, n: int) -> list[ImageRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = folder / f"{i + 1}.png"
        _noise(i).save(path)
        records.append(ImageRecord(i + 1, str(path), [CAPTION, f"picture {i} of a tree"]))
    return records


def _coco_folder(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """A COCO-caption-format folder in the default layout: images/ + annotations/captions_{train,val}.json."""
    records = _records(root / "images", n_train + n_val)
    (root / "annotations").mkdir()
    for split, part in (("train", records[:n_train]), ("val", records[n_train:])):
        document = {"images": [{"id": r.image_id, "file_name": Path(r.file_path).name} for r in part],
                    "annotations": [{"image_id": r.image_id, "caption": CAPTION} for r in part]}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(document), encoding="utf-8")
    return root


def _as_list(items: list) -> list:
    return items


def _steps(transform: transforms.Compose) -> list[type]:
    return [type(step) for step in transform.transforms]


# --- swap_left_right ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("caption", "swapped"), [
    ("left", "right"),
    ("right", "left"),
    ("a cat to the left of a dog", "a cat to the right of a dog"),
    ("the leftmost chair", "the rightmost chair"),
    ("the rightmost chair", "the leftmost chair"),
    ("Left side of a bus", "Right side of a bus"),
    ("Right", "Left"),
    ("TURN LEFT", "TURN RIGHT"),
    (CAPTION, SWAPPED),
    (SWAPPED, CAPTION),
    ("a red square to the left of a blue circle, a star on the right.", "a red square to the right of a blue "
                                                                         "circle, a star on the left."),
    ("a man holding a bat in his left hand", "a man holding a bat in his right hand"),
    ("a left-hand turn lane", "a right-hand turn lane"),
    ("a left-handed pitcher", "a right-handed pitcher"),
    ("a cup in the top-left corner", "a cup in the top-right corner"),
    ("in the bottom right corner", "in the bottom left corner"),
    ("people walking from left to right", "people walking from right to left"),
    ("a car turning right at the light", "a car turning left at the light"),
    ("a dog on the right next to a cat", "a dog on the left next to a cat"),
    ("a dog looking left", "a dog looking right"),
    ("birds flying leftwards", "birds flying rightwards"),
])
def test_swap_left_right_swaps_the_words_that_name_a_side(caption, swapped):
    assert swap_left_right(caption) == swapped
    assert swap_left_right(swapped) == caption  # its own inverse on these


@pytest.mark.parametrize("caption", [
    "leftover pizza in a box", "a plate of leftovers", "a bright kitchen", "alright", "a righteous man",
    "an upright piano", "a copyright notice", "a cleft in the rock", "brighter colours", "rightly so",
    "all right", "a cat sitting right next to a dog", "a vase right in front of a window",
    "a dog looking right at the camera", "Right behind the fence is a horse", "luggage left on the sidewalk",
    "a bag left behind at the station", "the train has left the station", "food left over on a plate",
    "nothing left", "a sign that says LEFTY", "", "a photo of a tree",
])
def test_swap_left_right_leaves_other_words_and_senses_alone(caption):
    assert swap_left_right(caption) == caption


# --- the sets and the transform -----------------------------------------------------------------------------


def test_sets_are_read_from_the_config():
    for name, steps in AUGMENT_SETS.items():
        assert augment_steps(name) == steps
        assert flips(name) == ("flip" in steps)
        train = _steps(build_transform(16, train=True, augment=name))
        assert (transforms.RandomResizedCrop in train) == ("crop" in steps)
        assert (transforms.ColorJitter in train) == ("jitter" in steps)
        assert transforms.RandomHorizontalFlip not in train  # the dataset flips, with the caption
        assert _steps(build_transform(16, train=False, augment=name)) == _steps(build_transform(16, train=False))
        no_crop = _steps(build_transform(16, train=True, augment=name, crop=False))
        assert transforms.RandomResizedCrop not in no_crop
        assert (transforms.ColorJitter in no_crop) == ("jitter" in steps)
    assert _steps(build_transform(16, train=True)) == _steps(build_transform(16, train=True, augment="crop"))
    with pytest.raises(ValueError, match="crop-jitter-flip"):
        augment_steps("flip")


def test_none_gives_the_evaluation_transform_output():
    image = _noise(1)
    torch.manual_seed(0)
    trained = build_transform(24, train=True, augment="none")(image)
    assert torch.equal(trained, build_transform(24, train=False)(image))
    torch.manual_seed(0)
    assert not torch.equal(build_transform(24, train=True, augment="crop")(image), trained)


def test_jitter_is_mild_keeps_the_size_and_never_changes_hue():
    steps = build_transform(24, train=True, augment="crop-jitter").transforms
    jitter = next(step for step in steps if isinstance(step, transforms.ColorJitter))
    assert jitter.hue is None and max(JITTER.values()) <= 0.3
    image = _noise(2)
    plain = denormalize(build_transform(24, train=False)(image))
    jittered = build_transform(24, train=True, augment="crop-jitter", crop=False)  # no crop: pixels line up
    grey = Image.new("RGB", (30, 20), (128, 128, 128))
    colour = Image.new("RGB", (30, 20), (120, 70, 40))
    hue = colorsys.rgb_to_hsv(120, 70, 40)[0]
    changes = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = jittered(image)
        assert out.shape == (3, 24, 24)
        changes.append((denormalize(out) - plain).abs().mean().item())
        assert (denormalize(out) - plain).abs().max() <= 0.5
        torch.manual_seed(seed)
        stays_grey = denormalize(jittered(grey))
        assert torch.allclose(stays_grey[0], stays_grey[1], atol=1e-5)
        assert torch.allclose(stays_grey[1], stays_grey[2], atol=1e-5)
        assert 0.8 * 128 / 255 - 0.01 <= stays_grey.mean() <= 1.2 * 128 / 255 + 0.01  # brightness, mildly
        torch.manual_seed(seed)
        r, g, b = denormalize(jittered(colour))[:, 10, 10].tolist()
        assert colorsys.rgb_to_hsv(r, g, b)[0] == pytest.approx(hue, abs=0.01)
    assert 0 < min(changes) and max(changes) < 0.15 and len(set(changes)) > 10


# --- the flip in CaptionDataset -------------------------------------------------------------------------------


def test_a_flipped_item_is_the_mirror_image_with_its_caption_swapped(tmp_path):
    records = _records(tmp_path / "images", 16)
    transform = build_transform(16, train=True, augment="crop")  # the same crop draws with and without the flip
    plain = CaptionDataset(records, transform, caption_mode="all", seed=7)
    flipping = CaptionDataset(records, transform, caption_mode="all", seed=7, flip=True)
    flipped = 0
    for item in range(len(plain)):
        a, b = plain[item], flipping[item]
        if torch.equal(b["image"], a["image"]):
            assert b["caption"] == a["caption"]
        else:
            flipped += 1
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert b["caption"] == swap_left_right(a["caption"])
            assert a["caption"] != CAPTION or b["caption"] == SWAPPED
        assert {k: v for k, v in b.items() if k not in ("image", "caption")} == {
            k: v for k, v in a.items() if k not in ("image", "caption")}
    assert 8 <= flipped <= 24  # of 32 items


def test_the_flip_is_drawn_from_seed_epoch_and_item_alone(tmp_path):
    records = _records(tmp_path / "images", 24)
    for record in records:
        record.captions = [CAPTION]  # every draw of the caption is CAPTION: a swap shows the flip
    transform = build_transform(16, train=False)

    def flipped(dataset: CaptionDataset) -> list[bool]:
        return [dataset[i]["caption"] == SWAPPED for i in range(len(dataset))]

    def dataset(seed: int) -> CaptionDataset:
        return CaptionDataset(records, transform, seed=seed, flip=True)

    first = flipped(dataset(3))
    torch.manual_seed(123)  # the process's random stream plays no part
    assert flipped(dataset(3)) == first
    assert 6 <= sum(first) <= 18 and flipped(dataset(4)) != first
    later = dataset(3)
    later.set_epoch(1)
    assert flipped(later) != first
    loader = DataLoader(dataset(3), batch_size=5, num_workers=2, collate_fn=_as_list)
    assert [item["caption"] == SWAPPED for batch in loader for item in batch] == first
    many = [draws_flip(f"0:0:{item}") for item in range(2000)]
    assert 900 <= sum(many) <= 1100 and many == [draws_flip(f"0:0:{item}") for item in range(2000)]


# --- from a config --------------------------------------------------------------------------------------------


def test_build_datasets_passes_data_augment_through(tmp_path):
    root = _coco_folder(tmp_path / "coco")
    base = tiny_config().override({"data.kind": "coco", "data.root": str(root), "train.seed": 5})
    items = {}
    for name, steps in AUGMENT_SETS.items():
        datasets = build_datasets(base.override({"data.augment": name}))
        train, val = datasets["train"], datasets["val"]
        assert train.flip == ("flip" in steps) and not val.flip
        assert (transforms.RandomResizedCrop in _steps(train.transform)) == ("crop" in steps)
        assert (transforms.ColorJitter in _steps(train.transform)) == ("jitter" in steps)
        assert _steps(val.transform) == _steps(build_transform(32, train=False))
        items[name] = [train[i] for i in range(len(train))]
    # The flip set's items are the crop set's, mirrored (caption swapped) or not.
    pairs = list(zip(items["crop"], items["crop-flip"], strict=True))
    mirrored = [torch.equal(b["image"], a["image"].flip(-1)) and b["caption"] == SWAPPED for a, b in pairs]
    same = [torch.equal(b["image"], a["image"]) and b["caption"] == CAPTION for a, b in pairs]
    assert all(m != s for m, s in zip(mirrored, same, strict=True)) and any(mirrored) and any(same)


def test_generated_scenes_get_no_crop_but_jitter_and_flip(shapes_root):
    for name, steps in AUGMENT_SETS.items():
        train = build_datasets(small_cfg(shapes_root).override({"data.augment": name}), splits=("train",))["train"]
        assert transforms.RandomResizedCrop not in _steps(train.transform)
        assert (transforms.ColorJitter in _steps(train.transform)) == ("jitter" in steps)
        assert train.flip == ("flip" in steps)


def test_shard_items_are_flipped_with_their_captions_too(tmp_path):
    source = _coco_folder(tmp_path / "coco", n_train=16)
    out = tmp_path / "shards"
    write_shards(source, out, shard_size=4, workers=1, progress=False)
    base = tiny_config().override({"data.kind": "webdataset", "data.root": str(out), "data.shuffle_buffer": 8,
                                   "train.batch_size": 4, "train.seed": 2})

    def read(augment: str) -> dict[int, dict]:
        train = build_datasets(base.override({"data.augment": augment}), splits=("train",))["train"]
        assert isinstance(train, ShardDataset) and train.flip == flips(augment)
        items = {item["image_id"]: item for item in train}
        assert len(items) == 16
        return items

    plain, flipping = read("crop"), read("crop-flip")
    assert read("crop-flip").keys() == flipping.keys()
    mirrored = 0
    for image_id, a in plain.items():
        b = flipping[image_id]
        if b["caption"] == SWAPPED:
            mirrored += 1
            assert torch.equal(b["image"], a["image"].flip(-1))
        else:
            assert b["caption"] == CAPTION and torch.equal(b["image"], a["image"])
    assert 0 < mirrored < 16
