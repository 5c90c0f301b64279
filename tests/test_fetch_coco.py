"""`python -m train data coco` against a fake COCO served from 127.0.0.1 by a server the test starts: the
annotations zip (with HTTP Range), images of which some misbehave (404, 500, HTML, truncated, corrupt, slow),
interruption and --resume, a full disk, bad annotations and output folders, and 5 training steps on the result.
No test reaches the internet."""

from __future__ import annotations

import errno
import io
import json
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import blipcore.data.folders as folders
import blipcore.data.prep.coco2017 as coco2017
import blipcore.training.trainer
from blipcore.io import FileError
from blipcore.runs.rundir import RunDir
from tests.conftest import tiny_preset_toml
from train.cli import main

TRAIN, VAL = 12, 4
# image index in train2017 -> how its URL misbehaves
BAD = {2: "404", 4: "corrupt", 5: "slow-once", 7: "500", 8: "html", 9: "truncate", 10: "slow"}
FAILING = {"404", "corrupt", "500", "html", "truncate", "slow"}  # those still failed after the retries


def jpeg(index: int, size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, ((40 * index) % 256, (90 * index) % 256, 200)).save(out, format="JPEG")
    return out.getvalue()


class FakeCoco:
    """images.cocodataset.org on 127.0.0.1: `files` by URL path, `behaviour` by URL path ("404", "500", "html",
    "truncate", "slow", "slow-once", "drop-once" (the first answer stops half-way)). Range requests are honoured.
    Every request is counted in `requests` and Range headers are kept in `ranges`."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, str] = {}
        self.requests: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with fake.lock:
                    fake.requests[self.path] += 1
                    count = fake.requests[self.path]
                    if self.headers.get("Range"):
                        fake.ranges.append(self.headers["Range"])
                fake.answer(self, count)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def answer(self, handler: BaseHTTPRequestHandler, count: int) -> None:
        path, how = handler.path, self.behaviour.get(handler.path, "")
        try:
            if path not in self.files or how in ("404", "500"):
                handler.send_error(500 if how == "500" else 404)
                return
            body = self.files[path]
            if how == "slow" or (how == "slow-once" and count == 1):
                threading.Event().wait(1.5)  # longer than the client's timeout: it gives up and retries
            start = int(handler.headers["Range"].removeprefix("bytes=").split("-")[0]) if handler.headers.get(
                "Range") else 0
            handler.send_response(206 if start else 200)
            if start:
                handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            handler.send_header("Content-Type", "text/html" if how == "html" else "application/octet-stream")
            handler.send_header("Content-Length", str(len(body) - start))
            handler.end_headers()
            if how == "truncate" or (how == "drop-once" and count == 1):
                handler.wfile.write(body[start:start + (len(body) - start) // 2])
                handler.close_connection = True
                return
            handler.wfile.write(body[start:])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to answer
            pass

    def __enter__(self) -> FakeCoco:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def captions_document(split: str, base: str, n: int, start_id: int) -> dict:
    names = [f"{start_id + i:012d}.jpg" for i in range(n)]
    images = [{"license": 1, "file_name": name, "coco_url": f"{base}/{split}/{name}", "height": 30, "width": 40,
               "id": start_id + i} for i, name in enumerate(names)]
    annotations = [{"image_id": start_id + i, "id": 10 * (start_id + i) + k, "caption": f"picture {i} seen {k}"}
                   for i in range(n) for k in range(3)]
    return {"info": {"description": "fake COCO"}, "licenses": [{"id": 1, "name": "x"}], "images": images,
            "annotations": annotations}


def annotations_zip(documents: dict[str, dict]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, document in documents.items():
            zf.writestr(f"annotations/{name}", json.dumps(document))
    return out.getvalue()


def behave(server: FakeCoco) -> None:
    """Every URL of the fake COCO answers at once and correctly."""
    server.behaviour.clear()
    for i, how in BAD.items():
        if how == "corrupt":
            server.files[f"/train2017/{100 + i:012d}.jpg"] = jpeg(i)


@pytest.fixture
def coco() -> Iterator[FakeCoco]:
    """A fake COCO: annotations zip (its first answer drops half-way) + 12 train / 4 val images, 6 misbehaving."""
    with FakeCoco() as server:
        train = captions_document("train2017", server.url, TRAIN, 100)
        val = captions_document("val2017", server.url, VAL, 500)
        server.files["/annotations/annotations_trainval2017.zip"] = annotations_zip(
            {"captions_train2017.json": train, "captions_val2017.json": val, "instances_train2017.json": {}})
        server.behaviour["/annotations/annotations_trainval2017.zip"] = "drop-once"
        for i, record in enumerate(train["images"] + val["images"]):
            path = record["coco_url"].removeprefix(server.url)
            server.files[path] = jpeg(i)[:200] if BAD.get(i) == "corrupt" else jpeg(i)
            if i in BAD and BAD[i] != "corrupt":
                server.behaviour[path] = BAD[i]
        yield server


def data_coco(server: FakeCoco, out: Path, *extra: str) -> int:
    annotations = f"{server.url}/annotations/annotations_trainval2017.zip"
    return main(["data", "coco", "--out", str(out), "--annotations", annotations, "--first", str(TRAIN),
                 "--val-first", str(VAL), "--workers", "4", "--timeout", "0.5", "--retries", "2", "--backoff", "0.05",
                 "--no-progress", *extra])


def leftovers(out: Path) -> list[Path]:
    """Temporary or partial files anywhere under `out`."""
    return [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]


TINY_SEED = tiny_preset_toml("seed", eval_images=4, lr=1e-3)


def test_fetch_interrupt_resume_and_train_five_steps(coco, tmp_path, monkeypatch, capsys):
    out = tmp_path / "coco2017"
    calls = {"n": 0}
    real_fetch_one = coco2017._fetch_one

    def interrupted_after_three(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_fetch_one(*args)

    monkeypatch.setattr(coco2017, "_fetch_one", interrupted_after_three)
    assert data_coco(coco, out) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err
    assert any(r.startswith("bytes=") for r in coco.ranges)  # the zip's first answer dropped: continued by Range
    assert (out / "downloads/annotations_trainval2017.zip").is_file() and not leftovers(out)
    written = sorted(p.name for p in (out / "train2017").iterdir())
    assert 1 <= len(written) <= 3 and not (out / "annotations").exists()

    assert data_coco(coco, out) == 2  # a second run must say what it does with the first's files
    assert "--resume to fetch only what is missing or failed" in capsys.readouterr().err

    monkeypatch.setattr(coco2017, "_fetch_one", real_fetch_one)
    assert data_coco(coco, out, "--resume") == 3  # some images fail for good: usable, exit 3
    stdout = capsys.readouterr().out
    assert f"{TRAIN - len(FAILING)} of {TRAIN} train and {VAL} of {VAL} val images" in stdout
    assert f"{len(FAILING)} failed: see {out / 'failed.tsv'}" in stdout and "--resume" in stdout
    assert coco.requests["/annotations/annotations_trainval2017.zip"] == 2  # downloaded once (in two parts)
    for name in written:  # fetched before the interruption: never asked for again
        assert coco.requests[f"/train2017/{name}"] == 1
    assert coco.requests["/train2017/000000000105.jpg"] == 2  # the slow one: timed out once, then arrived

    rows = (out / "failed.tsv").read_text().splitlines()
    assert rows[0] == "url\treason" and len(rows) == 1 + len(FAILING)
    reasons = dict(row.split("\t") for row in rows[1:])
    base = f"{coco.url}/train2017/0000000001"
    assert reasons[f"{base}02.jpg"] == "HTTP 404 Not Found"
    assert reasons[f"{base}04.jpg"].startswith("truncated image") or "corrupt" in reasons[f"{base}04.jpg"]
    assert reasons[f"{base}07.jpg"].startswith("HTTP 500") and "(3 attempts)" in reasons[f"{base}07.jpg"]
    assert reasons[f"{base}08.jpg"] == "the server sent text/html, not an image"
    assert reasons[f"{base}09.jpg"].startswith("truncated: ") and "(3 attempts)" in reasons[f"{base}09.jpg"]
    assert reasons[f"{base}10.jpg"] == "timed out after 0.5 s (3 attempts)"

    train = json.loads((out / "annotations/captions_train2017.json").read_text())
    ids = [image["id"] for image in train["images"]]
    assert ids == [100 + i for i in range(TRAIN) if BAD.get(i) not in FAILING]  # the file's order, failures left out
    assert {a["image_id"] for a in train["annotations"]} == set(ids) and len(train["annotations"]) == 3 * len(ids)
    assert train["info"] == {"description": "fake COCO"} and not leftovers(out)
    assert sorted(p.name for p in (out / "train2017").iterdir()) == [f"{i:012d}.jpg" for i in ids]

    failed_again = sum(coco.requests.values())
    leftover = out / "train2017" / ".000000000100.jpg.x1y2z3.tmp"  # what a kill -9 mid-write leaves
    leftover.write_bytes(b"half")
    assert data_coco(coco, out, "--resume") == 3  # only the failed ones are tried again
    assert sum(coco.requests.values()) - failed_again == len(FAILING) + 3 * 2  # 500, truncate, slow: 3 attempts
    assert not leftover.exists()
    capsys.readouterr()

    preset = tmp_path / "tiny-seed.toml"
    preset.write_text(TINY_SEED)
    code = main(["fit", "--preset", str(preset), "--data-root", str(out), "--run-dir", str(tmp_path / "run"),
                 "--max-steps", "5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    info = RunDir(tmp_path / "run").read_info()
    assert info["status"] == "completed" and info["steps_done"] == 5
    assert info["train_items"] == 3 * (TRAIN - len(FAILING))  # caption_mode "all": every caption an item


def test_image_size_shrinks_the_shorter_side_and_keeps_small_images(coco, tmp_path):
    behave(coco)
    out = tmp_path / "small"
    assert data_coco(coco, out, "--image-size", "24") == 0
    train = json.loads((out / "annotations/captions_train2017.json").read_text())
    assert {(i["width"], i["height"], i["orig_width"], i["orig_height"]) for i in train["images"]} == {(32, 24, 40, 30)}
    assert Image.open(out / "train2017" / train["images"][0]["file_name"]).size == (32, 24)
    assert not (out / "failed.tsv").exists()
    marker = json.loads((out / folders.MARKER).read_text())
    assert marker["command"] == "coco" and marker["settings"] == {"image_size": 24}

    assert data_coco(coco, out, "--resume", "--image-size", "32") == 2  # the files were made at another size
    assert data_coco(coco, out, "--resume", "--image-size", "24") == 0


def fill_the_disk_after(writes: int, monkeypatch):
    """Every file write of the data commands after the first `writes` fails as on a full disk; returns the real
    writer, to put back when space is free again."""
    real_write, done = folders.atomic_write_bytes, {"n": 0}

    def disk_fills_up(path, data):
        done["n"] += 1
        if done["n"] > writes:
            raise FileError(f"{path}: cannot be written") from OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(folders, "atomic_write_bytes", disk_fills_up)
    return real_write


def test_disk_full_stops_says_so_and_resumes(coco, tmp_path, monkeypatch, capsys):
    behave(coco)
    out = tmp_path / "full"
    real_write = fill_the_disk_after(4, monkeypatch)  # the marker and three images fit
    assert data_coco(coco, out, "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "stopped" in err and "--resume" in err and "Traceback" not in err
    assert len(list((out / "train2017").iterdir())) == 3 and not (out / "annotations").exists()
    assert not leftovers(out)
    monkeypatch.setattr(folders, "atomic_write_bytes", real_write)
    assert data_coco(coco, out, "--resume") == 0
    assert len(json.loads((out / "annotations/captions_train2017.json").read_text())["images"]) == TRAIN


@pytest.mark.parametrize(("documents", "message"), [
    ({"instances_train2017.json": {"images": [], "annotations": []}}, "holds no captions_train2017.json"),
    ({"captions_train2017.json": {"images": [{"id": 1, "file_name": "a.jpg", "coco_url": "http://x/a.jpg"}],
                                  "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]},
      "captions_val2017.json": {"images": [], "annotations": []}},
     "annotations[0]: key 'caption' missing: not COCO captions"),
    ({"captions_train2017.json": {"images": [{"id": 1, "file_name": "a.jpg", "coco_url": "http://x/a.jpg"},
                                             {"id": 1, "file_name": "a.jpg", "coco_url": "http://x/a.jpg"}],
                                  "annotations": []},
      "captions_val2017.json": {"images": [], "annotations": []}},
     r"images[1]: image 1 (a.jpg) is listed twice"),
    ({"captions_train2017.json": {"images": [{"id": 1, "file_name": "../../evil.jpg", "coco_url": "http://x/a"}],
                                  "annotations": []},
      "captions_val2017.json": {"images": [], "annotations": []}},
     "is not a plain file name"),
])
def test_bad_annotations_are_refused_and_leave_nothing(tmp_path, capsys, documents, message):
    with FakeCoco() as server:
        server.files["/annotations/annotations_trainval2017.zip"] = annotations_zip(documents)
        out = tmp_path / "out"
        assert data_coco(server, out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # the downloaded zip was not COCO captions: deleted, and the folder made for it


def test_bad_annotation_sources(tmp_path, capsys):
    with FakeCoco() as server:
        server.files["/a.zip"] = b"<html>not found, but with status 200</html>"
        code = main(["data", "coco", "--out", str(tmp_path / "a"), "--annotations", f"{server.url}/a.zip",
                     "--no-progress"])
        assert code == 2 and "not a readable zip" in capsys.readouterr().err and not (tmp_path / "a").exists()

        server.files["/b.zip"] = b"x" * 1000
        server.behaviour["/b.zip"] = "truncate"  # every answer stops half-way: the download cannot complete
        assert main(["data", "coco", "--out", str(tmp_path / "b"), "--annotations", f"{server.url}/b.zip",
                     "--retries", "1", "--backoff", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "download failed: truncated: 750 of 1,000 bytes (2 attempts); 750 bytes kept in" in err  # 500 + 250
        assert (tmp_path / "b/downloads/b.zip.part").stat().st_size == 750  # the next run continues from here
        server.behaviour.clear()
        assert main(["data", "coco", "--out", str(tmp_path / "b"), "--annotations", f"{server.url}/b.zip",
                     "--no-progress"]) == 2  # complete now, by Range, but not a zip
        assert server.ranges[-1] == "bytes=750-" and "not a readable zip" in capsys.readouterr().err

    json_file = tmp_path / "captions_train2017.json"
    json_file.write_text('{"images": [], "annotations": []}')
    assert main(["data", "coco", "--out", str(tmp_path / "c"), "--annotations", str(json_file), "--no-progress"]) == 2
    assert "captions_val2017.json: cannot read" in capsys.readouterr().err
    (tmp_path / "captions_val2017.json").write_text("[1, 2]")
    assert main(["data", "coco", "--out", str(tmp_path / "c"), "--annotations", str(tmp_path), "--no-progress"]) == 2
    assert "top level is a list, expected COCO captions" in capsys.readouterr().err
    assert main(["data", "coco", "--out", str(tmp_path / "c"), "--annotations", str(tmp_path / "nope.zip")]) == 2
    assert "no such file, folder or http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_out_holding_something_else_is_refused_unless_overwrite(coco, tmp_path, capsys):
    behave(coco)
    out = tmp_path / "mine"
    (out / "train2017").mkdir(parents=True)
    (out / "train2017/old.jpg").write_bytes(b"old")
    (out / "notes.txt").write_text("keep me")
    assert data_coco(coco, out) == 2
    assert "already holds something else (notes.txt, train2017)" in capsys.readouterr().err
    assert data_coco(coco, out, "--resume") == 2
    assert data_coco(coco, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me" and not (out / "train2017/old.jpg").exists()
    (out / "file").write_text("")
    assert main(["data", "coco", "--out", str(out / "file"), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_help_explains_the_order_the_layout_and_the_exit_codes(capsys):
    for command in ("coco", "flickr8k"):
        with pytest.raises(SystemExit) as stopped:
            main(["data", command, "--help"])
        assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "annotation file's own `images` list" in out and "Flicker8k_Dataset/<name>.jpg" in out
    assert out.count("exit status: 0") == 2 and "--resume" in out


def test_format_shards_writes_webdataset_shards_of_the_fetched_folder(coco, tmp_path, capsys):
    behave(coco)
    out = tmp_path / "coco2017"
    assert data_coco(coco, out, "--format", "shards") == 0
    assert f"--set data.kind=webdataset --data-root {out / 'shards'}" in capsys.readouterr().out
    manifest = json.loads((out / "shards/shards.json").read_text())
    assert manifest["train"]["images"] == TRAIN and manifest["val"]["images"] == VAL
    if not hasattr(blipcore.training.trainer, "IterableDataset"):
        pytest.skip("blipcore.training.trainer does not stream an IterableDataset yet")
    preset = tmp_path / "tiny-seed.toml"
    preset.write_text(TINY_SEED)
    code = main(["fit", "--preset", str(preset), "--data-root", str(out / "shards"), "--set", "data.kind=webdataset",
                 "--run-dir", str(tmp_path / "run"), "--max-steps", "5", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert RunDir(tmp_path / "run").read_info()["steps_done"] == 5
