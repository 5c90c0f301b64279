"""blipcore.data.shapes: the synthetic scene generator and its place in build_datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipcore.data import build_datasets, generate_shapes, shapes_ready
from blipcore.data.shapes import BACKGROUNDS, COLOURS, HELDOUT_COMBOS, META_FILE, MIN_CONTRAST, SPLITS
from blipcore.model.config import BlipConfig
from blipcore.model.tokenizer import load_tokenizer

PARAMS = {"n_train": 60, "n_val": 20, "n_heldout": 20, "image_size": 64, "seed": 0}


def _annotations(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != META_FILE
    }


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **PARAMS, progress=False)
    return root


def test_generation_is_deterministic(shapes_root: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "again", **PARAMS, progress=False)
    assert _files(tmp_path / "again") == _files(shapes_root)  # byte-identical JSON and PNGs

    generate_shapes(tmp_path / "other", **{**PARAMS, "seed": 1}, progress=False)
    assert _annotations(tmp_path / "other", "train") != _annotations(shapes_root, "train")
    assert _files(tmp_path / "other") != _files(shapes_root)


def test_layout_and_meta(shapes_root: Path) -> None:
    meta = json.loads((shapes_root / META_FILE).read_text(encoding="utf-8"))
    assert meta["complete"] is True and meta["params"] == PARAMS
    assert sorted(map(tuple, meta["heldout_combos"])) == sorted(HELDOUT_COMBOS)
    assert shapes_ready(shapes_root, PARAMS)
    assert not shapes_ready(shapes_root, {**PARAMS, "n_train": 61})
    for split in SPLITS:
        document = _annotations(shapes_root, split)
        assert len(document["images"]) == PARAMS[f"n_{split}"]
        ids = [image["id"] for image in document["images"]]
        per_image = {image_id: 0 for image_id in ids}
        for annotation in document["annotations"]:
            per_image[annotation["image_id"]] += 1
        assert set(per_image.values()) == {5}  # five captions per image
        for image in document["images"]:
            assert 1 <= len(image["objects"]) <= 3
            with Image.open(shapes_root / "images" / image["file_name"]) as png:
                assert png.size == (64, 64) and png.mode == "RGB"


def test_heldout_combos_only_in_heldout(shapes_root: Path) -> None:
    def combos(split: str) -> list[set[tuple[str, str]]]:
        return [
            {(obj["colour"], obj["shape"]) for obj in image["objects"]}
            for image in _annotations(shapes_root, split)["images"]
        ]

    heldout = set(HELDOUT_COMBOS)
    for split in ("train", "val"):
        assert all(not scene & heldout for scene in combos(split))
    assert all(scene & heldout for scene in combos("heldout"))


def test_captions_are_single_bert_word_pieces(tmp_path: Path) -> None:
    generate_shapes(tmp_path, n_train=400, n_val=0, n_heldout=100, progress=False)
    tokenizer = load_tokenizer()
    words = {
        word
        for split in ("train", "heldout")
        for annotation in _annotations(tmp_path, split)["annotations"]
        for word in annotation["caption"].split()
    }
    for word in sorted(words):
        assert tokenizer.tokenize(word) == [word], f"{word!r} is not one bert-base-uncased word piece"


def test_objects_are_drawn_where_the_annotation_says(shapes_root: Path) -> None:
    for image in _annotations(shapes_root, "train")["images"]:
        pixels = np.asarray(Image.open(shapes_root / "images" / image["file_name"]), dtype=np.int16)
        for obj in image["objects"]:
            assert math.dist(COLOURS[obj["colour"]], BACKGROUNDS[image["background"]]) >= MIN_CONTRAST
            x, y = int(obj["x"] * 64), int(obj["y"] * 64)
            assert np.abs(pixels[y, x] - COLOURS[obj["colour"]]).max() <= 12, (image["file_name"], obj)


def test_captions_describe_the_scene(shapes_root: Path) -> None:
    document = _annotations(shapes_root, "train")
    captions: dict[int, list[str]] = {}
    for annotation in document["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    for image in document["images"]:
        for caption in captions[image["id"]]:
            for obj in image["objects"]:
                assert obj["colour"] in caption.split() and obj["shape"] in caption, (caption, obj)
        if image["layout"] == "pair_horizontal":
            assert any("left" in caption for caption in captions[image["id"]])


def test_build_datasets_regenerates_an_interrupted_generation(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    cfg = BlipConfig.preset("demo").override(
        {
            "data.root": str(root),
            "data.shapes_n_train": 12,
            "data.shapes_n_val": 4,
            "data.shapes_n_heldout": 4,
        }
    )
    datasets = build_datasets(cfg, splits=("train", "val", "heldout"))
    assert {split: len(dataset) for split, dataset in datasets.items()} == {"train": 12, "val": 4, "heldout": 4}
    complete = _files(root)

    # Interrupted: marker gone, one image half-written. The next build regenerates the folder.
    (root / META_FILE).unlink()
    broken = root / "images" / "train_000003.png"
    broken.write_bytes(broken.read_bytes()[:20])
    datasets = build_datasets(cfg)
    assert _files(root) == complete and shapes_ready(root, {**PARAMS, "n_train": 12, "n_val": 4, "n_heldout": 4})
    item = datasets["train"][3]
    assert item is not None and item["image"].shape == (3, 64, 64)
    assert datasets["train"].records[0].info["objects"]  # the structured scene travels with the record
