"""`python -m train data resize`: a copy of a dataset folder with every image shrunk, that loads and trains as the
source does; files named and formatted as before, the rest byte-identical; resumable; undecodable images copied
and reported; links to folders followed; bad settings and output folders refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from blipcore.data import build_datasets, load_coco_annotations, load_image
from blipcore.data.folders import MARKER
from blipcore.data.prep.fetch import DOWNLOADS
from blipcore.data.prep.noise import plant_noise
from blipcore.data.prep.resized import ResizeReport, resize_dataset
from tests.conftest import small_cfg
from train.cli import main

SPLITS = ("train", "val", "heldout")  # the shapes fixture's annotation files


def resize(source: Path, out: Path, size: int, **options) -> ResizeReport:
    return resize_dataset(source, out, size, progress=False, **options)


def files_under(root: Path) -> dict[str, Path]:
    """Relative path -> path of every file under `root` (links followed), the marker aside."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def marker(root: Path) -> dict:
    return json.loads((root / MARKER).read_text())


@pytest.fixture(scope="module")
def resized_shapes(shapes_root, tmp_path_factory) -> tuple[Path, ResizeReport]:
    """The 32 px shapes fixture resized to 16 px (read-only: shared by the module)."""
    out = tmp_path_factory.mktemp("resized") / "shapes-16"
    return out, resize(shapes_root, out, 16)


def photo(path: Path, size: tuple[int, int], mode: str = "RGB", **save) -> None:
    """An image of `size` (width, height), a colour gradient so resampling has something to do."""
    image = Image.linear_gradient("L").resize(size).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)


@pytest.fixture
def photos_root(tmp_path) -> Path:
    """A tiny COCO-caption folder of odd images: wide, tall PNG with alpha (upper-case extension), one already
    small, one EXIF-rotated, one that does not decode; a README, a source marker, downloads/ and a stale
    temporary file."""
    root = tmp_path / "photos"
    photo(root / "images/wide.jpg", (60, 40), quality=95)
    photo(root / "images/tall.PNG", (30, 50), mode="RGBA")
    photo(root / "images/small.jpg", (20, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show it: stored 60 x 40, shown 40 x 60
    photo(root / "images/rotated.jpg", (60, 40), exif=exif.tobytes())
    (root / "images/broken.jpg").write_text("this is not a JPEG")
    names = ["wide.jpg", "tall.PNG", "small.jpg", "rotated.jpg", "broken.jpg"]
    document = {"images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
                "annotations": [{"image_id": i, "caption": f"picture {name}"} for i, name in enumerate(names)]}
    (root / "annotations").mkdir()
    (root / "annotations/captions_train.json").write_text(json.dumps(document))
    (root / "README.txt").write_text("photos\n")
    (root / MARKER).write_text(json.dumps({"command": "flickr8k", "settings": {}}))
    (root / DOWNLOADS).mkdir()
    (root / DOWNLOADS / "Flickr8k_Dataset.zip").write_bytes(b"PK big archive")
    (root / "images/.wide.jpg.abcd1234.tmp").write_bytes(b"half a file")
    return root


# --- the copy ----------------------------------------------------------------------------------------------------
def test_the_copy_loads_as_the_same_dataset_with_small_images(shapes_root, resized_shapes):
    out, report = resized_shapes
    for split in SPLITS:
        name = f"annotations/captions_{split}.json"
        before = load_coco_annotations(shapes_root / name, shapes_root / "images")
        after = load_coco_annotations(out / name, out / "images")
        assert [(r.image_id, r.captions, Path(r.file_path).name) for r in after] == \
            [(r.image_id, r.captions, Path(r.file_path).name) for r in before]
        for record in after:  # 32 x 32 PNGs, now 16 x 16 PNGs under the same names
            with Image.open(record.file_path) as image:
                assert image.size == (16, 16) and image.format == "PNG" and image.mode == "RGB"
    source, copy = files_under(shapes_root), files_under(out)
    assert sorted(copy) == sorted(source)  # every file, under the same path and name
    others = [name for name in source if not name.endswith(".png")]
    assert others and all(copy[name].read_bytes() == source[name].read_bytes() for name in others)
    images = len(source) - len(others)
    assert (report.resized, report.kept, report.copied, report.undecodable) == (images, 0, len(others), [])
    assert report.bytes_after < report.bytes_before
    assert marker(out)["command"] == "resize" and marker(out)["settings"]["size"] == 16
    assert "images resized to 16 px" in report.summary() and f"--data-root {out}" in report.summary()


def test_training_reads_the_copy_at_the_models_size(resized_shapes):
    out, _ = resized_shapes
    cfg = small_cfg(out).override({"data.kind": "coco", "data.root": str(out)})  # the shapes layout, read as COCO
    train = build_datasets(cfg, splits=("train",))["train"]
    item = train[0]
    assert item["image"].shape == (3, cfg.model.image_size, cfg.model.image_size)
    assert Path(item["file_path"]).parent == out / "images" and load_image(item["file_path"]).size == (16, 16)


def test_odd_images_are_shrunk_upright_in_their_own_format_and_the_undecodable_one_copied(photos_root, tmp_path,
                                                                                           capsys):
    out = tmp_path / "out"
    assert main(["data", "resize", "--from", str(photos_root), "--out", str(out), "--size", "24",
                 "--no-progress"]) == 0
    summary = capsys.readouterr().out
    sizes = {"wide.jpg": (36, 24), "tall.PNG": (24, 40), "rotated.jpg": (24, 36)}  # EXIF applied: upright
    for name, size in sizes.items():
        with Image.open(out / "images" / name) as image:
            assert (image.size, image.mode) == (size, "RGB")
            assert image.format == ("PNG" if name.endswith(".PNG") else "JPEG")
    for name in ("small.jpg", "broken.jpg"):  # already small enough; undecodable: both copied unchanged
        assert (out / "images" / name).read_bytes() == (photos_root / "images" / name).read_bytes()
    assert "3 images resized to 24 px, 1 already 24 px or smaller" in summary
    assert "1 image files could not be resized and were copied unchanged" in summary
    assert "images/broken.jpg (not an image" in summary
    # the source's marker, downloads/ and stale temporary file are not copied; the rest is
    assert sorted(files_under(out)) == ["README.txt", "annotations/captions_train.json", "images/broken.jpg",
                                        "images/rotated.jpg", "images/small.jpg", "images/tall.PNG", "images/wide.jpg"]
    assert marker(out)["command"] == "resize"
    records = load_coco_annotations(out / "annotations/captions_train.json", out / "images")
    assert all(Path(record.file_path).is_file() for record in records)


def test_quality_is_the_jpeg_quality(photos_root, tmp_path):
    low, high = tmp_path / "low", tmp_path / "high"
    resize(photos_root, low, 24, quality=5)
    resize(photos_root, high, 24, quality=95)
    assert (low / "images/wide.jpg").stat().st_size < (high / "images/wide.jpg").stat().st_size
    assert (low / "images/tall.PNG").read_bytes() == (high / "images/tall.PNG").read_bytes()  # PNG: lossless


def test_a_linked_image_folder_is_followed(shapes_root, tmp_path):
    noisy = tmp_path / "noisy"
    plant_noise(shapes_root, noisy, fraction=0.25, seed=0)  # images/ is a link to the source's
    assert (noisy / "images").is_symlink()
    out = tmp_path / "out"
    report = resize(noisy, out, 16)
    assert (out / "images").is_dir() and not (out / "images").is_symlink()
    assert report.resized == len(list((shapes_root / "images").iterdir()))
    for split in SPLITS:  # the noisy captions, now with the small images
        name = f"annotations/captions_{split}.json"
        assert (out / name).read_bytes() == (noisy / name).read_bytes()
    assert (out / "noise.jsonl").read_bytes() == (noisy / "noise.jsonl").read_bytes()
    assert marker(out)["command"] == "resize" and marker(noisy)["command"] == "noise"
    with Image.open(next((out / "images").iterdir())) as image:
        assert image.size == (16, 16)


# --- resuming and refusing ---------------------------------------------------------------------------------------
def test_resume_writes_only_the_missing_files(shapes_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = resize(shapes_root, out, 16)
    images = sorted((out / "images").iterdir())
    missing = images[:5]
    for path in missing:  # an interrupted run: these never arrived, one left a temporary file
        path.unlink()
    (out / "images" / f".{missing[0].name}.x1y2z3w4.tmp").write_bytes(b"half")
    untouched = {path: path.stat().st_mtime_ns for path in images[5:]}
    written: list[Path] = []
    import blipcore.data.prep.resized as resized

    real_write = resized.write_file
    monkeypatch.setattr(resized, "write_file", lambda path, data: (written.append(path), real_write(path, data)))
    again = resize(shapes_root, out, 16, resume=True)
    assert sorted(written) == missing
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in untouched.items())
    assert sorted((out / "images").iterdir()) == images  # the temporary file is gone
    assert (again.resized, again.copied, again.bytes_after) == (first.resized, first.copied, first.bytes_after)
    assert again.kept_from_earlier == len(files_under(out)) - len(missing)


def test_ctrl_c_keeps_complete_files_and_names_the_command_that_continues(shapes_root, tmp_path, monkeypatch, capsys):
    import blipcore.data.prep.resized as resized

    out = tmp_path / "out"
    command = ["data", "resize", "--from", str(shapes_root), "--out", str(out), "--size", "16", "--no-progress"]
    calls, real_mirror = [], resized.mirror_file

    def interrupted_after_ten(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real_mirror(*args, **kwargs)

    monkeypatch.setattr(resized, "mirror_file", interrupted_after_ten)
    assert main(command) == 130
    assert f"{' '.join(command)} --resume" in capsys.readouterr().err
    kept = {name: path.stat().st_mtime_ns for name, path in files_under(out).items()}
    assert 1 <= len(kept) <= 10 and not [p for p in out.rglob("*.tmp")]
    monkeypatch.setattr(resized, "mirror_file", real_mirror)
    assert main([*command, "--resume"]) == 0
    assert sorted(files_under(out)) == sorted(files_under(shapes_root))
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not written again


def test_an_earlier_copy_is_refused_without_resume_and_with_other_settings(resized_shapes, shapes_root, capsys):
    out, _ = resized_shapes
    before = {name: path.stat().st_mtime_ns for name, path in files_under(out).items()}
    assert main(["data", "resize", "--from", str(shapes_root), "--out", str(out), "--size", "16"]) == 2
    assert "--resume to write only the files that are missing" in capsys.readouterr().err
    assert main(["data", "resize", "--from", str(shapes_root), "--out", str(out), "--size", "20", "--resume"]) == 2
    assert "size 16, now 20" in capsys.readouterr().err
    assert {name: path.stat().st_mtime_ns for name, path in files_under(out).items()} == before


def test_an_out_folder_holding_something_else_is_refused_and_overwrite_keeps_what_is_not_its_own(shapes_root,
                                                                                                  tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "thesis.tex").write_text("precious")
    (out / "images" / "stale.png").write_bytes(b"an entry the source also has: --overwrite replaces it")
    command = ["data", "resize", "--from", str(shapes_root), "--out", str(out), "--size", "16", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "already holds something else (images, thesis.tex)" in err and "--overwrite" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["images", "images/stale.png",
                                                                              "thesis.tex"]
    assert main([*command, "--overwrite"]) == 0
    assert (out / "thesis.tex").read_text() == "precious" and not (out / "images" / "stale.png").exists()
    assert sorted(files_under(out)) == sorted([*files_under(shapes_root), "thesis.tex"])


@pytest.mark.parametrize(("option", "value"), [("--size", "8"), ("--quality", "0"), ("--quality", "96")])
def test_out_of_range_settings_are_refused_naming_the_option(shapes_root, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    arguments = {"--size": "16", option: value}
    assert main(["data", "resize", "--from", str(shapes_root), "--out", str(out),
                 *[word for pair in arguments.items() for word in pair]]) == 2
    assert f"error: {option} must be" in capsys.readouterr().err and not out.exists()


def test_an_out_folder_inside_the_source_or_around_it_is_refused(photos_root, tmp_path, capsys):
    for source, out, words in ((photos_root, photos_root / "small", "lies inside --from"),
                               (photos_root, photos_root, "--out must be another folder than --from"),
                               (photos_root / "images", photos_root, "lies inside --out")):
        listing = sorted(photos_root.rglob("*"))
        assert main(["data", "resize", "--from", str(source), "--out", str(out), "--size", "16"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err
        assert sorted(photos_root.rglob("*")) == listing  # nothing written


def test_a_broken_link_in_the_source_is_refused_before_writing(photos_root, tmp_path, capsys):
    (photos_root / "images" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    assert main(["data", "resize", "--from", str(photos_root), "--out", str(out), "--size", "16"]) == 2
    assert "gone.jpg: a broken link" in capsys.readouterr().err and not out.exists()
