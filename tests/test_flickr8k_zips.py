"""`python -m train data flickr8k`: tiny zips laid out as the Flickr8k distribution -> the layout of
../shared/data/flickr8k; bad zips and lines refused before anything is written; resume; zips by URL."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import blipcore.data.folders as folders
from blipcore.data.prep.flickr8k import hash_split
from blipcore.paths import SHARED_DATA_DIR
from blipcore.runs.rundir import RunDir
from tests.conftest import needs_shared_dataset, tiny_preset_toml
from tests.test_fetch_coco import FakeCoco, fill_the_disk_after
from train.cli import main

_CANDIDATES = [f"{1000 + 7 * i}_{i:04x}ab.jpg" for i in range(100)]
_HASH_VAL = [name for name in _CANDIDATES if hash_split(name) == "val"][:3]  # 3 of the 12 in val: training evaluates
NAMES = sorted([name for name in _CANDIDATES if hash_split(name) == "train"][:9] + _HASH_VAL)
QUIRK = "2258277193_586949ec62.jpg.1"  # in the real token file, with no image anywhere
CORRUPT = next(name for name in NAMES[3:] if name not in _HASH_VAL)
SPLITS = {"train": NAMES[:6], "dev": NAMES[6:9], "test": NAMES[9:11]}  # NAMES[11]: in no official list


def jpeg(i: int, size: tuple[int, int] = (50, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (20 * i % 256, 90, 160)).save(out, format="JPEG")
    return out.getvalue()


def zip_bytes(files: dict[str, bytes | str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def token_lines(names: list[str]) -> list[str]:
    return [f"{name}#{k}\tA dog number {i} runs , take {k} ." for i, name in enumerate(names) for k in range(5)]


def text_files(token: list[str] | None = None, splits: dict[str, list[str]] | None = None) -> dict[str, str]:
    splits = SPLITS if splits is None else splits
    files = {"Flickr8k.token.txt": "\n".join(token_lines(NAMES + [QUIRK]) if token is None else token) + "\n",
             "Flickr8k.lemma.token.txt": "ignored", "readme.txt": "ignored", "ExpertAnnotations.txt": "ignored"}
    files |= {f"Flickr_8k.{split}Images.txt": "\n".join(names) + "\n" for split, names in splits.items()}
    return files


def image_files(names: list[str] = NAMES) -> dict[str, bytes]:
    files = {f"Flicker8k_Dataset/{name}": jpeg(i)[:150] if name == CORRUPT else jpeg(i) for i, name in enumerate(names)}
    files["__MACOSX/Flicker8k_Dataset/._" + names[0]] = b"apple double"
    return files


@pytest.fixture
def zips(tmp_path: Path) -> tuple[Path, Path]:
    images, text = tmp_path / "Flickr8k_Dataset.zip", tmp_path / "Flickr8k_text.zip"
    images.write_bytes(zip_bytes(image_files()))
    text.write_bytes(zip_bytes(text_files()))
    return images, text


def convert(images: Path | str, text: Path | str, out: Path, *extra: str) -> int:
    return main(["data", "flickr8k", "--images", str(images), "--text", str(text), "--out", str(out), "--workers", "2",
                 "--no-progress", *extra])


TINY_FLICKR8K = tiny_preset_toml("flickr8k", eval_images=2)


def test_converts_to_the_shared_layout_and_trains(zips, tmp_path, capsys):
    out = tmp_path / "flickr8k"
    assert convert(*zips, out) == 3  # the corrupt image: converted the rest, exit 3
    captured = capsys.readouterr()
    assert f"1 image name(s) in Flickr8k.token.txt with no image in Flickr8k_Dataset.zip, their captions skipped: " \
           f"{QUIRK}" in captured.err
    assert "11 images with 55 captions" in captured.out and "failed: see" in captured.out
    assert (out / "failed.tsv").read_text().splitlines()[1].startswith(f"{CORRUPT}\t")

    names = sorted(set(NAMES) - {CORRUPT})
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    documents = {p.name: json.loads(p.read_text()) for p in (out / "annotations").iterdir()}
    assert set(documents) == {"captions_train.json", "captions_val.json", "captions_official_train.json",
                              "captions_official_dev.json", "captions_official_test.json"}
    shared = SHARED_DATA_DIR / "flickr8k/annotations"
    if shared.is_dir():  # the same files, keys and fields as the shared copy
        assert set(documents) == {p.name for p in shared.iterdir()}
        reference = json.loads((shared / "captions_official_dev.json").read_text())
        assert set(documents["captions_official_dev.json"]) == set(reference)
        assert set(documents["captions_official_dev.json"]["images"][0]) == set(reference["images"][0])
        assert set(documents["captions_official_dev.json"]["annotations"][0]) == set(reference["annotations"][0])

    hashed = documents["captions_train.json"]["images"] + documents["captions_val.json"]["images"]
    assert sorted(i["file_name"] for i in hashed) == names
    assert all(hash_split(i["file_name"]) == "train" for i in documents["captions_train.json"]["images"])
    assert all(hash_split(i["file_name"]) == "val" for i in documents["captions_val.json"]["images"])
    by_name = {i["file_name"]: i for i in hashed}
    assert by_name[NAMES[0]] == {
        "id": int(NAMES[0].split("_")[0]), "file_name": NAMES[0], "width": 50, "height": 40, "aspect_preserved": True,
        "flickr8k_official_split": "train", "source": f"Flickr8k_Dataset.zip:Flicker8k_Dataset/{NAMES[0]}"}
    assert by_name[NAMES[11]]["flickr8k_official_split"] == "none"
    for split, listed in SPLITS.items():
        official = documents[f"captions_official_{split}.json"]
        assert [i["file_name"] for i in official["images"]] == [n for n in listed if n != CORRUPT]
        assert {i["flickr8k_official_split"] for i in official["images"]} == {split}
    annotations = documents["captions_train.json"]["annotations"] + documents["captions_val.json"]["annotations"]
    assert sorted(a["id"] for a in annotations) == list(range(1, 56))
    first = [a for a in annotations if a["image_id"] == by_name[NAMES[0]]["id"]]
    assert [a["caption"] for a in first] == [f"A dog number 0 runs , take {k} ." for k in range(5)]

    preset = tmp_path / "tiny-flickr8k.toml"
    preset.write_text(TINY_FLICKR8K)
    code = main(["fit", "--preset", str(preset), "--data-root", str(out), "--run-dir", str(tmp_path / "run"),
                 "--max-steps", "3", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert RunDir(tmp_path / "run").read_info()["steps_done"] == 3


@needs_shared_dataset("flickr8k")
def test_hash_split_is_the_shared_copys():
    shared = SHARED_DATA_DIR / "flickr8k/annotations"
    for split in ("train", "val"):
        names = [i["file_name"] for i in json.loads((shared / f"captions_{split}.json").read_text())["images"]]
        assert {hash_split(name) for name in names} == {split}


def test_image_size_and_zips_by_url(tmp_path, zips, capsys):
    with FakeCoco() as server:
        server.files["/Flickr8k_Dataset.zip"] = zips[0].read_bytes()
        server.files["/Flickr8k_text.zip"] = zips[1].read_bytes()
        server.behaviour["/Flickr8k_Dataset.zip"] = "drop-once"  # continued by a Range request
        out = tmp_path / "small"
        assert convert(f"{server.url}/Flickr8k_Dataset.zip", f"{server.url}/Flickr8k_text.zip", out,
                       "--image-size", "20", "--backoff", "0") == 3
        assert server.ranges and (out / "downloads/Flickr8k_Dataset.zip").is_file()
        assert Image.open(out / "images" / NAMES[0]).size == (25, 20)

        server.files["/not-a-zip"] = b"<html>sign in first</html>"
        assert convert(f"{server.url}/not-a-zip", zips[1], tmp_path / "x") == 2
        assert "did not give a zip file (deleted" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_interrupted_by_a_full_disk_then_resumed(zips, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_write = fill_the_disk_after(4, monkeypatch)  # the marker and three images fit
    assert convert(*zips, out, "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert len(list((out / "images").iterdir())) == 3 and not (out / "annotations").exists()

    monkeypatch.setattr(folders, "atomic_write_bytes", real_write)
    assert convert(*zips, out) == 2 and "--resume to fetch only" in capsys.readouterr().err
    assert convert(*zips, out, "--resume") == 3
    assert "(8 converted now)" in capsys.readouterr().out  # 11 good images, 3 there before, the corrupt one fails


@pytest.mark.parametrize(("images", "text", "message"), [
    (image_files(), {"readme.txt": "x"}, "holds no Flickr8k.token.txt (it holds readme.txt): not Flickr8k_text.zip"),
    (image_files(), text_files(token=token_lines(NAMES)[:7] + [f"{NAMES[1]} A dog with no number"]),
     "Flickr8k.token.txt line 8: expected '<name>.jpg#<0-4><TAB><caption>', got"),
    (image_files(), text_files(token=token_lines(NAMES) + [f"{NAMES[3]}#2\tagain"]),
     f"line 61: caption #2 of {NAMES[3]} is listed twice (first on line 18)"),
    (image_files(), text_files(splits={**SPLITS, "test": [NAMES[9], NAMES[2]]}),
     f"Flickr_8k.testImages.txt line 2: {NAMES[2]} is listed twice (first in Flickr_8k.trainImages.txt line 3)"),
    ({**image_files(), f"other/{NAMES[4]}": jpeg(4)}, text_files(), f"holds {NAMES[4]} twice"),
    ({"Flicker8k_Dataset/readme.txt": b"x"}, text_files(), "holds no .jpg images"),
    ({f"Flicker8k_Dataset/{n}": jpeg(0) for n in ("a.jpg", "b.jpg")}, text_files(), "none of the 13 images named"),
    (image_files(), text_files(token=token_lines(["a.jpg"])), "none of the 1 images named"),
])
def test_bad_zips_are_refused_before_anything_is_written(tmp_path, capsys, images, text, message):
    (tmp_path / "i.zip").write_bytes(zip_bytes(images))
    (tmp_path / "t.zip").write_bytes(zip_bytes(text))
    out = tmp_path / "out"
    assert convert(tmp_path / "i.zip", tmp_path / "t.zip", out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_missing_or_unreadable_zip(tmp_path, zips, capsys):
    assert convert(tmp_path / "nope.zip", zips[1], tmp_path / "out") == 2
    assert "nope.zip: no such file" in capsys.readouterr().err
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    assert convert(zips[0], tmp_path / "bad.zip", tmp_path / "out") == 2
    assert "bad.zip: not a readable zip file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_that_is_listed_but_missing_is_a_failure(tmp_path, capsys):
    (tmp_path / "i.zip").write_bytes(zip_bytes(image_files(NAMES[:10])))
    (tmp_path / "t.zip").write_bytes(zip_bytes(text_files()))
    assert convert(tmp_path / "i.zip", tmp_path / "t.zip", tmp_path / "out") == 3
    rows = (tmp_path / "out/failed.tsv").read_text().splitlines()
    assert f"{NAMES[10]}\tlisted in Flickr_8k.testImages.txt but not in i.zip" in rows
    assert "3 image name(s) in Flickr8k.token.txt with no image in i.zip" in capsys.readouterr().err
