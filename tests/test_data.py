"""blipcore.data: image decoding, COCO-format annotations, the dataset, the collator, build_datasets."""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from blipcore.data import (
    MEAN,
    AnnotationError,
    CaptionCollator,
    CaptionDataset,
    DatasetNotFoundError,
    ImageLoadError,
    ImageSkippedWarning,
    build_datasets,
    build_transform,
    denormalize,
    load_coco_annotations,
    load_image,
)
from blipcore.model.config import BlipConfig
from blipcore.paths import SHARED_DATA_DIR
from tests.conftest import PHOTOS, PHOTOS_TRAIN, PHOTOS_VAL, needs_shared_dataset

LONG_CAPTION = " ".join(["a very long caption about a dog"] * 60)
NON_ASCII_CAPTION = "un café à côté d'une boulangerie — 日本の猫"


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def _exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF orientation 6 says: turn 90 degrees clockwise to display (-> 20x40)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_halves(), "JPEG", exif=exif.tobytes(), quality=95)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (CRC fixed up) claims width x height: a decompression bomb's header."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


# Every kind of file a real image folder holds. Good ones decode; bad ones are skipped.
def _fixture_files() -> dict[str, bytes]:
    rgb = _encode(_halves(), "JPEG")
    gray16 = Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16))
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((0, 255, 0), (255, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "good.jpg": rgb,
        "png_named.jpg": _encode(_halves(), "PNG"),
        "gray16.png": _encode(gray16, "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "rgba.png": _encode(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG"),
        "anim.gif": gif.getvalue(),
        "exif.jpg": _exif_rotated_jpeg(),
        "long.jpg": rgb,
        "unicode.jpg": rgb,
        "truncated.jpg": rgb[: len(rgb) // 2],
        "empty.jpg": b"",
        "noise.jpg": bytes(range(256)) * 4,
    }


BAD_FILES = ("truncated.jpg", "empty.jpg", "noise.jpg", "missing.jpg")


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    """A COCO-format folder: annotations/captions.json + images/ with good, odd and broken files."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name, data in _fixture_files().items():
        (images_dir / name).write_bytes(data)
    names = list(_fixture_files()) + ["missing.jpg", "nocaption.jpg"]
    images = [{"id": i + 1, "file_name": name, "width": 16, "height": 16} for i, name in enumerate(names)]
    annotations = []
    for image in images:
        caption = {"long.jpg": LONG_CAPTION, "unicode.jpg": NON_ASCII_CAPTION, "nocaption.jpg": "   "}.get(
            image["file_name"], f"a picture called {image['file_name']}"
        )
        annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "caption": caption})
    annotations.append({"id": 999, "image_id": 1, "caption": ""})  # dropped, the image keeps its other caption
    (tmp_path / "annotations").mkdir()
    document = {"images": images, "annotations": annotations}
    (tmp_path / "annotations" / "captions.json").write_text(json.dumps(document), encoding="utf-8")
    return tmp_path


# --- load_image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["good.jpg", "png_named.jpg", "gray16.png", "cmyk.jpg", "rgba.png", "anim.gif"])
def test_load_image_gives_rgb(name: str) -> None:
    image = load_image(_fixture_files()[name])
    assert image.mode == "RGB"


def test_load_image_converts_modes_faithfully() -> None:
    files = _fixture_files()
    gray = np.asarray(load_image(files["gray16.png"]))
    assert gray.max() > 200 and gray.min() < 10  # scaled from 16 bits, not clipped to white
    assert load_image(files["cmyk.jpg"]).getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=8)
    assert load_image(files["rgba.png"]).getpixel((8, 8)) == (255, 255, 255)  # transparent -> white
    assert load_image(files["anim.gif"]).getpixel((8, 8)) == (0, 255, 0)  # first frame


def test_load_image_applies_exif_orientation() -> None:
    image = load_image(_exif_rotated_jpeg())
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_accepts_path_and_file_object(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_fixture_files()["good.jpg"])
    assert load_image(path).size == (40, 20)
    assert load_image(str(path)).size == (40, 20)
    with open(path, "rb") as handle:
        assert load_image(handle).size == (40, 20)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty"),
        ("noise.jpg", "not an image"),
        ("missing.jpg", "not found"),
    ],
)
def test_load_image_refuses_bad_files(tmp_path: Path, name: str, problem: str) -> None:
    path = tmp_path / name
    if name != "missing.jpg":
        path.write_bytes(_fixture_files()[name])
    with pytest.raises(ImageLoadError, match=problem) as caught:
        load_image(path)
    assert str(path) in str(caught.value)


def test_load_image_refuses_decompression_bombs_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(100_000, 100_000))  # beyond PIL's own limit: DecompressionBombError
    with pytest.raises(ImageLoadError, match="too large") as caught:
        load_image(path)
    assert "bomb.png" in str(caught.value)
    with pytest.raises(ImageLoadError, match="too large"):  # between PIL's warning limit and its error limit
        load_image(_png_claiming(10_000, 10_000))
    with pytest.raises(ImageLoadError, match="too large"):  # over our limit, under PIL's
        load_image(_png_claiming(8_000, 8_000))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_fixture_files()["good.jpg"], max_pixels=100)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00"]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's own complaint about some random bytes
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=512))
def test_load_image_random_bytes_raise_only_image_load_error(prefix: bytes, body: bytes) -> None:
    try:
        image = load_image(prefix + body)
    except ImageLoadError:
        return
    assert image.mode == "RGB"


# --- annotations ------------------------------------------------------------------------------------------


def test_load_coco_annotations(coco_dir: Path) -> None:
    records = load_coco_annotations(coco_dir / "annotations" / "captions.json", coco_dir / "images")
    names = [Path(record.file_path).name for record in records]
    assert names == list(_fixture_files()) + ["missing.jpg"]  # file order kept; nocaption.jpg dropped
    by_name = {Path(record.file_path).name: record for record in records}
    assert by_name["good.jpg"].captions == ["a picture called good.jpg"]  # the empty caption is gone
    assert by_name["long.jpg"].captions == [LONG_CAPTION]
    assert by_name["unicode.jpg"].captions == [NON_ASCII_CAPTION]
    assert by_name["good.jpg"].info == {"width": 16, "height": 16}
    assert len(load_coco_annotations(coco_dir / "annotations" / "captions.json", coco_dir / "images", subset=3)) == 3


VALID = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "file not found"),
        ("", "empty file"),
        ("{not json", "invalid JSON"),
        (json.dumps(VALID)[:-20], "truncated"),
        ("[1, 2]", "top level is a list"),
        (json.dumps({"annotations": []}), "key 'images' missing"),
        (json.dumps({"images": []}), "key 'annotations' missing"),
        (json.dumps({**VALID, "images": {"id": 1}}), "'images' is dict, expected a list"),
        (json.dumps({**VALID, "images": [{"file_name": "a.jpg"}]}), r"images\[0\]: key 'id' missing"),
        (json.dumps({**VALID, "images": [{"id": "1", "file_name": "a.jpg"}]}), r"images\[0\].id is str"),
        (json.dumps({**VALID, "images": [{"id": True, "file_name": "a.jpg"}]}), r"images\[0\].id is bool"),
        (json.dumps({**VALID, "images": [VALID["images"][0]] * 2}), "duplicate image id 1"),
        (json.dumps({**VALID, "annotations": [{"image_id": 1, "caption": 5}]}), r"annotations\[0\].caption is int"),
        (json.dumps({**VALID, "annotations": ["a cat"]}), r"annotations\[0\] is str, expected an object"),
    ],
)
def test_bad_annotation_files_raise_annotation_error_naming_the_file(
    tmp_path: Path, text: str | None, problem: str
) -> None:
    path = tmp_path / "annotations" / "captions_train.json"
    path.parent.mkdir()
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=problem) as caught:
        load_coco_annotations(path, tmp_path / "images")
    assert str(path) in str(caught.value)


def test_non_utf8_annotation_file(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(AnnotationError, match="not UTF-8"):
        load_coco_annotations(path, tmp_path)


# --- dataset and collator ---------------------------------------------------------------------------------


def test_dataloader_skips_and_counts_bad_images(coco_dir: Path) -> None:
    records = load_coco_annotations(coco_dir / "annotations" / "captions.json", coco_dir / "images")
    dataset = CaptionDataset(records, build_transform(32, train=True), caption_mode="all")
    loader = DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=CaptionCollator(max_len=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert batches[-1] is None  # the last batch holds only missing.jpg: the trainer skips it
    batches = batches[:-1]

    seen = [Path(path).name for batch in batches for path in batch["file_paths"]]
    good = [name for name in list(_fixture_files()) if name not in BAD_FILES]
    assert seen == good
    assert sorted(Path(path).name for path in dataset.skipped) == sorted(BAD_FILES)
    assert sum(batch["num_skipped"] for batch in batches) == len(BAD_FILES) - 1
    skip_warnings = [str(w.message) for w in caught if issubclass(w.category, ImageSkippedWarning)]
    assert len(skip_warnings) == len(BAD_FILES)
    for name in BAD_FILES:
        assert any(name in message for message in skip_warnings)

    for batch in batches:
        size = len(batch["captions"])
        assert batch["images"].shape == (size, 3, 32, 32) and batch["images"].dtype == torch.float32
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == size
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert batch["input_ids"].shape[1] <= 16  # the very long caption is truncated
        assert batch["image_ids"].dtype == torch.long and batch["indices"].dtype == torch.long
    assert NON_ASCII_CAPTION in [caption for batch in batches for caption in batch["captions"]]

    # A second pass warns no more: one warning per file and process.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(loader)
    assert not [w for w in caught if issubclass(w.category, ImageSkippedWarning)]


def test_collator_returns_none_for_an_all_bad_batch() -> None:
    assert CaptionCollator(max_len=8)([None, None]) is None


def test_caption_modes(coco_dir: Path) -> None:
    records = load_coco_annotations(coco_dir / "annotations" / "captions.json", coco_dir / "images")
    records[0].captions = [f"caption {i}" for i in range(5)]
    transform = build_transform(16, train=False)
    every = CaptionDataset(records, transform, caption_mode="all")
    assert len(every) == len(records) + 4
    assert [every[i]["caption"] for i in range(5)] == records[0].captions
    assert every[5]["index"] == 1

    one = CaptionDataset(records, transform, caption_mode="random", seed=3)
    assert len(one) == len(records)
    chosen = {}
    for epoch in range(8):
        one.set_epoch(epoch)
        chosen[epoch] = one[0]["caption"]
        assert one[0]["caption"] == chosen[epoch]  # deterministic within an epoch
    assert len(set(chosen.values())) > 1  # and varies across epochs
    again = CaptionDataset(records, transform, caption_mode="random", seed=3)
    again.set_epoch(5)
    assert again[0]["caption"] == chosen[5]
    with pytest.raises(ValueError, match="caption_mode"):
        CaptionDataset(records, transform, caption_mode="some")
    pickle.dumps(one)  # DataLoader workers under spawn need this


def test_transforms_shape_and_denormalize() -> None:
    image = Image.new("RGB", (50, 30), (255, 128, 0))
    for train in (True, False):
        tensor = build_transform(24, train=train)(image)
        assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32
    restored = denormalize(build_transform(24, train=False)(image))
    assert restored[:, 5, 5].tolist() == pytest.approx([1.0, 128 / 255, 0.0], abs=0.01)
    batch = torch.zeros(2, 3, 4, 4)
    assert denormalize(batch)[1, :, 0, 0].tolist() == pytest.approx(list(MEAN))


# --- build_datasets -----------------------------------------------------------------------------------------


def test_build_datasets_coco_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    cfg = BlipConfig.preset("seed").override({"data.root": str(root)})
    with pytest.raises(DatasetNotFoundError, match="train2017") as caught:
        build_datasets(cfg)
    assert str(root) in str(caught.value)


def test_build_datasets_coco_missing_annotations(tmp_path: Path) -> None:
    cfg = BlipConfig.preset("seed").override({"data.root": str(tmp_path)})
    with pytest.raises(DatasetNotFoundError, match="captions_train2017.json") as caught:
        build_datasets(cfg)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(ValueError, match="heldout"):
        build_datasets(cfg, splits=("heldout",))


def test_real_coco_photos_load_in_place() -> None:
    cfg = BlipConfig(name="coco-mini").override(
        {"data.kind": "coco", "data.root": str(PHOTOS), "model.image_size": 64, "model.patch_size": 16}
    )
    datasets = build_datasets(cfg)
    assert len(datasets["train"]) == PHOTOS_TRAIN and len(datasets["val"]) == PHOTOS_VAL
    assert all(len(record.captions) >= 5 for record in datasets["val"].records)
    loader = DataLoader(datasets["train"], batch_size=8, collate_fn=CaptionCollator(cfg.model.max_text_len))
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 64, 64)
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= cfg.model.max_text_len
    assert not datasets["train"].skipped


def test_the_photo_fixture_is_cc_by_and_attributed_photo_by_photo() -> None:
    attribution = (PHOTOS / "ATTRIBUTION.md").read_text(encoding="utf-8")
    names = set()
    for split in ("train", "val"):
        document = json.loads((PHOTOS / f"annotations/captions_{split}.json").read_text(encoding="utf-8"))
        assert document["licenses"] == [
            {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]
        for image in document["images"]:
            assert image["license"] == 4 and image["coco_url"] and image["flickr_url"] in attribution
            assert f"| {split} | {image['file_name']} | {image['id']} |" in attribution
            names.add(image["file_name"])
    assert {path.name for path in (PHOTOS / "images").iterdir()} == names


@needs_shared_dataset("flickr8k")
def test_flickr8k_official_splits_are_disjoint_and_test_holds_1000_images():
    from blipcore.model.config import load_preset

    root = SHARED_DATA_DIR / "flickr8k"
    cfg = load_preset("flickr8k").override({"data.root": str(root)})
    splits = build_datasets(cfg, splits=("train", "val", "test"))
    files = {name: {r.file_path for r in dataset.records} for name, dataset in splits.items()}
    assert {name: len(paths) for name, paths in files.items()} == {"train": 6000, "val": 1000, "test": 1000}
    assert not files["train"] & files["val"] and not files["train"] & files["test"] and not files["val"] & files["test"]
    assert all(len(r.captions) == 5 for r in splits["test"].records)
