"""Runs exported to TensorBoard (`python -m train export`): written from the run directory with TensorBoard's own
summary writer (torch.utils.tensorboard), so that TensorBoard overlays many runs, shows each epoch's embeddings in
its projector (PCA, UMAP, t-SNE) and compares a study's variants in its HParams view.

    <out>/<run name>/                 one folder a run (`<study>/<run>` for a study's run): one row of HParams
      bliplab-export.json             what is already written there (steps, evaluations, epochs): exporting again
                                      writes only what is new
      events.out.tfevents.*           the run's config (run.json), flattened, as hyperparameters (HParams)
      projector_config.pbtxt          the projector's embeddings: <step>/epoch_NNN/ holds tensors.tsv (the epoch's
                                      image and text embeddings), metadata.tsv (caption, modality, image file,
                                      pair) and sprite.png (thumbnails)
      train/                          metrics.jsonl's training lines
      validation/                     its validation lines and every evaluation of the validation split
                                      (eval/*.json): each metric per decoding strategy and reference row, a few
                                      dev images' captions (text) and the ITC similarity matrix (image)
      <split>/                        evaluations of another split (eval/epoch_NNN.<split>.json), e.g. test/

A scalar's tag is "<group>/<label>" from the metric registry (blipcore.evaluation.metrics); a validation loss takes
its training loss's tag, so the two draw on one chart. What is not complete yet (a partial last line of
metrics.jsonl, an unreadable evaluation or embeddings file) is left for a later export. Training lines are written
once per step: after a resume, lines logged again at steps already exported are not written again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import atomic_write_bytes, atomic_write_json, is_number
from ..paths import project_path
from ..runs.files import read_json
from ..runs.rundir import CheckpointError, RunDir, RunError

STATE_FILE = "bliplab-export.json"
STATE_VERSION = 1
PROJECTOR_CONFIG = "projector_config.pbtxt"
PROJECTOR_COLUMNS = ("caption", "modality", "image", "pair")  # the first labels the points
SPLIT_FOLDERS = {"train": "train", "val": "validation"}  # an evaluation of another split: a folder of its name
DEV_IMAGES = 6  # captioned dev images shown per strategy and evaluation
ITC_PAIRS = 64  # the ITC similarity image shows the first pairs of the evaluation set
ITC_IMAGE_SIDE = 256  # ... each cell scaled up to make the image at least this many pixels wide
THUMBNAIL_SIDE = 32  # the projector's thumbnails
NOT_SCALARS = ("step", "time", "split")  # fields of a metrics line that are not plotted (step is the x axis)
EVAL_FILE = re.compile(r"(?:epoch_\d+(?:\.(?P<split>[a-z][a-z0-9_-]{0,31}))?|step_\d+)\.json")
# viridis at 0, 1/4, 1/2, 3/4 and 1: the colours of the ITC similarity image, low to high
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def summary_writer_class() -> type:
    """torch.utils.tensorboard's SummaryWriter; ValueError (one line at the command line) when the tensorboard
    package, which it writes with, is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("exporting to TensorBoard needs the tensorboard package: pip install tensorboard "
                         "(requirements.txt pins the version the project is tested with)") from None
    return SummaryWriter


# --- what is written, as plain functions of the run's data ----------------------------------------
def scalar_tag(key: str) -> str | None:
    """The TensorBoard tag of a logged key, "<group>/<label>" from the metric registry: a validation loss (val_lm)
    takes its training loss's tag (lm) so the two share a chart; a key the registry does not declare is
    "other/<key>"; None for the fields that are not plotted (step, time, split)."""
    from ..evaluation.metrics import metric

    if key in NOT_SCALARS:
        return None
    declared = metric(key)
    if declared is None:
        return f"other/{key}"
    if declared.group == "loss" and key.startswith("val_"):
        declared = metric(key[len("val_"):]) or declared
    return f"{declared.group}/{declared.label}"


def line_scalars(line: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line (or a flattened evaluation) that are plotted, by key."""
    return {key: float(value) for key, value in line.items() if is_number(value) and scalar_tag(key) is not None}


def evaluation_scalars(result: dict[str, Any]) -> dict[str, float]:
    """Every declared number of an evaluation file, by its metrics.jsonl key: the losses (val_*), retrieval R@K,
    match AUCs, and each captioning and collapse metric per decoding strategy and reference row
    (<strategy>_<metric>); metrics.jsonl's validation lines hold only the summary ones."""
    from ..evaluation.metrics import is_declared

    flat: dict[str, Any] = {}
    for section in ("losses", "retrieval", "matching"):
        flat.update(_mapping(result.get(section)))
    for name, entry in {**_mapping(result.get("strategies")), **_mapping(result.get("reference_rows"))}.items():
        flat.update({f"{name}_{key}": value for key, value in _mapping(_mapping(entry).get("metrics")).items()})
    return {key: value for key, value in line_scalars(flat).items() if is_declared(key)}


def captions_table(entry: dict[str, Any], limit: int = DEV_IMAGES) -> str | None:
    """The first `limit` sample captions of a strategy (or reference row) of an evaluation as a Markdown table:
    image file, caption, the first reference caption. None when it has no samples."""
    samples = [s for s in entry.get("samples") or [] if isinstance(s, dict)][:limit]
    if not samples:
        return None
    rows = ["| image | caption | a reference caption |", "|---|---|---|"]
    for sample in samples:
        references = sample.get("references") or [""]
        cells = (Path(str(sample.get("file_path", ""))).name, sample.get("caption", ""), references[0])
        rows.append("| " + " | ".join(_cell(value) for value in cells) + " |")
    return "\n".join(rows)


def similarity_image(image_embeds: np.ndarray, text_embeds: np.ndarray, pairs: int = ITC_PAIRS,
                     side: int = ITC_IMAGE_SIDE) -> np.ndarray:
    """The ITC similarity of the first `pairs` evaluation pairs (row i: image i, column j: the caption of image j)
    as an RGB image (H, W, 3 uint8), viridis from the matrix's lowest value to its highest, each cell scaled up
    so the image is at least `side` pixels wide."""
    n = min(pairs, len(image_embeds), len(text_embeds))
    sim = np.asarray(image_embeds[:n], dtype=np.float64) @ np.asarray(text_embeds[:n], dtype=np.float64).T
    low, high = float(sim.min()), float(sim.max())
    scaled = (sim - low) / (high - low) if high > low else np.zeros_like(sim)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS))
    rgb = np.stack([np.interp(scaled, stops, VIRIDIS[:, channel]) for channel in range(3)], axis=-1)
    factor = max(1, -(-side // max(n, 1)))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1).round().astype(np.uint8)


def hyperparameters(info: dict[str, Any]) -> dict[str, float | str]:
    """run.json's config flattened to dotted keys (model.vision_width, train.lr, ...), with the preset: numbers
    stay numbers, booleans and lists become text, missing values are left out."""
    flat: dict[str, float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}" if not prefix else f"{prefix}.{key}", inner)
        elif isinstance(value, bool):
            flat[prefix] = str(value).lower()
        elif is_number(value) or isinstance(value, str):
            flat[prefix] = value
        elif isinstance(value, (list, tuple)):
            flat[prefix] = ",".join(str(item) for item in value)

    walk("", _mapping(info.get("config")))
    if isinstance(info.get("preset"), str):
        flat["preset"] = info["preset"]
    return flat


def projector_metadata(arrays: dict[str, np.ndarray]) -> list[list[str]]:
    """The projector's metadata rows (PROJECTOR_COLUMNS) of an embeddings file: its images, then their first
    captions, each with its caption, image file name and pair number."""
    n = len(arrays["image_embeds"])
    captions = [" ".join(caption.split()) for caption in per_pair(arrays, "captions")]
    names = [Path(path).name for path in per_pair(arrays, "file_paths")]
    return [[captions[i], modality, names[i], str(i)] for modality in ("image", "text") for i in range(n)]


def per_pair(arrays: dict[str, np.ndarray], key: str) -> list[str]:
    """An embeddings file's text array of one entry per pair (captions, file_paths); empty strings when it has
    none of that length."""
    value, n = arrays.get(key), len(arrays["image_embeds"])
    return [str(item) for item in value] if value is not None and value.ndim == 1 and len(value) == n else [""] * n


def thumbnail(path: str, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """An evaluation image as a (3, side, side) float array in [0, 1], centre-cropped (a relative path is taken from
    the working folder, else from the project's); mid-grey when it cannot be read (or there is no path)."""
    from PIL import ImageOps

    from ..data.images import ImageLoadError, load_image

    grey = np.full((3, side, side), 0.5, dtype=np.float32)
    if not path:
        return grey
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = project_path(candidate)
    try:
        image = ImageOps.fit(load_image(candidate), (side, side))
    except (ImageLoadError, OSError):
        return grey
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cell(value: Any) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


# --- one run's export folder ----------------------------------------------------------------------
@dataclass
class ExportCounts:
    """What one pass over a run wrote, and what it left for later."""

    scalars: int = 0
    texts: int = 0
    epochs: int = 0  # epochs of embeddings: an ITC similarity image and a projector entry each
    hparams: bool = False
    skipped: list[str] = field(default_factory=list)  # files that could not be read yet, with why

    def __bool__(self) -> bool:
        return bool(self.scalars or self.texts or self.epochs or self.hparams)

    def text(self) -> str:
        if not self:
            return "nothing new"
        parts = [(self.scalars, "scalar"), (self.texts, "caption table"), (self.epochs, "epoch")]
        text = [f"{count} {word}{'s' if count != 1 else ''}" for count, word in parts if count]
        if self.epochs:
            text[-1] += " of embeddings (ITC matrix, projector)"
        return ", ".join(text + (["hyperparameters"] if self.hparams else []))


class RunExport:
    """One run's export folder, `<out>/<run name>`: its writers (opened on first use, so a pass with nothing new
    writes no file) and the record of what is already written there."""

    def __init__(self, run: RunDir, out: str | Path, progress: bool = True) -> None:
        self.run, self.progress = run, progress
        self.folder = Path(out) / run.name
        for folder in (Path(out), self.folder):
            if (folder / "run.json").exists():
                raise RunError(f"{folder} is a run folder: export into a folder of its own, e.g. runs/tensorboard")
        self._writer_class = summary_writer_class()
        self._writers: dict[str, Any] = {}
        self._thumbnails: dict[str, np.ndarray] = {}
        self._read: dict[Path, tuple[int, int]] = {}  # evaluation files written out: (mtime, size) when read
        self.state = self._load_state()
        self._saved = json.dumps(self.state, sort_keys=True)
        self.passes = 0

    def _load_state(self) -> dict[str, Any]:
        """The record of what this folder holds; RunError when it holds another run's export, or this run's from
        before it was started again (--overwrite)."""
        info = self.run.read_info()
        source, created = str(self.run.path.resolve()), info.get("created_at")
        path = self.folder / STATE_FILE
        if not path.exists():
            return {"format_version": STATE_VERSION, "run": source, "created_at": created, "train_step": None,
                    "scalars": {}, "texts": {}, "epochs": [], "hparams": False}
        state = read_json(path, "export record")
        shapes = {"train_step": (int, type(None)), "scalars": dict, "texts": dict, "epochs": list, "hparams": bool}
        if state.get("format_version") != STATE_VERSION or any(
                not isinstance(state.get(key), kinds) for key, kinds in shapes.items()):
            raise RunError(f"{path}: not an export record this version reads; delete {self.folder} to export again")
        if state.get("run") != source:
            raise RunError(f"{self.folder} holds the export of {state.get('run')}; choose another --tensorboard folder")
        if state.get("created_at") != created:
            raise RunError(f"{self.run.path} was started again since it was exported to {self.folder}; delete that "
                           "folder to export the new run")
        return state

    def writer(self, name: str) -> Any:
        """The SummaryWriter of a subfolder ("" for the run's own folder), opened on first use."""
        if name not in self._writers:
            self._writers[name] = self._writer_class(log_dir=str(self.folder / name) if name else str(self.folder))
        return self._writers[name]

    def export_pass(self) -> ExportCounts:
        """Write what is new since the last pass (or the last export into this folder), flush it and record it."""
        counts = ExportCounts()
        try:
            self._hparams(counts)
            self._metrics_lines(counts)
            self._evaluations(counts)
            self._embeddings(counts)
        finally:
            for writer in self._writers.values():
                writer.flush()
            self._save_state()
            self.passes += 1
        return counts

    def close(self) -> None:
        """Flush and close the writers, and record what they wrote."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._save_state()

    def _save_state(self) -> None:
        text = json.dumps(self.state, sort_keys=True)
        if text != self._saved:
            atomic_write_json(self.folder / STATE_FILE, self.state, error=RunError)
            self._saved = text

    def _hparams(self, counts: ExportCounts) -> None:
        """The run's config as its hyperparameters, once: HParams compares the runs of an export folder
        by them, with the last value of every exported scalar as its metrics."""
        if self.state["hparams"]:
            return
        from torch.utils.tensorboard.summary import hparams

        _, start_info, _ = hparams(hyperparameters(self.run.read_info()), {})
        self.writer("").file_writer.add_summary(start_info)
        self.state["hparams"] = counts.hparams = True

    def _metrics_lines(self, counts: ExportCounts) -> None:
        """metrics.jsonl: training lines after the last step written, into train/; validation lines' numbers not
        yet written at their step, into validation/."""
        for line in self.run.read_metrics():
            step = line.get("step")
            if not is_number(step):
                continue
            walltime = float(line["time"]) if is_number(line.get("time")) else None
            if line.get("split") == "val":
                self._scalars(SPLIT_FOLDERS["val"], int(step), line_scalars(line), walltime, counts)
            elif self.state["train_step"] is None or step > self.state["train_step"]:
                writer = self.writer(SPLIT_FOLDERS["train"])
                for key, value in line_scalars(line).items():
                    writer.add_scalar(scalar_tag(key), value, int(step), walltime=walltime)
                    counts.scalars += 1
                self.state["train_step"] = int(step)

    def _scalars(self, folder: str, step: int, values: dict[str, float], walltime: float | None,
                 counts: ExportCounts) -> None:
        """Write the keys of `values` not yet written at `step` in `folder` (the state keeps them per step)."""
        done = self.state["scalars"].setdefault(folder, {}).setdefault(str(step), [])
        for key, value in values.items():
            if key not in done:
                self.writer(folder).add_scalar(scalar_tag(key), value, step, walltime=walltime)
                done.append(key)
                counts.scalars += 1

    def _evaluations(self, counts: ExportCounts) -> None:
        """eval/*.json, in the order of their steps: every metric not yet written at the evaluation's step, and
        each strategy's captions of a few dev images as a Markdown table (text)."""
        found = []
        for path in sorted(self.run.eval_dir.glob("*.json")):
            match = EVAL_FILE.fullmatch(path.name)
            try:
                stat = path.stat()
                if not match or self._read.get(path) == (stat.st_mtime_ns, stat.st_size):
                    continue  # not an evaluation, or unchanged since this process wrote it out
                result = read_json(path, "evaluation")
            except (OSError, RunError) as err:
                counts.skipped.append(str(err))
                continue
            self._read[path] = (stat.st_mtime_ns, stat.st_size)
            if isinstance(result.get("step"), int) and not isinstance(result["step"], bool):
                found.append((result["step"], match.group("split") or "val", stat.st_mtime, result))
        for step, split, written_at, result in sorted(found, key=lambda item: item[:2]):
            folder = SPLIT_FOLDERS.get(split, split)
            self._scalars(folder, step, evaluation_scalars(result), written_at, counts)
            done = self.state["texts"].setdefault(folder, [])
            rows = {**_mapping(result.get("strategies")), **_mapping(result.get("reference_rows"))}
            for name, entry in rows.items():
                table = captions_table(_mapping(entry))
                if table is not None and f"{step}/{name}" not in done:
                    self.writer(folder).add_text(f"captions/{name}", table, step)
                    done.append(f"{step}/{name}")
                    counts.texts += 1

    def _embeddings(self, counts: ExportCounts) -> None:
        """Each epoch's embeddings not yet written: the ITC similarity matrix (image, validation/) and the image and
        text embeddings in the projector, at the step of the epoch's evaluation."""
        pending = [epoch for epoch in self.run.embedding_epochs() if epoch not in self.state["epochs"]]
        for epoch in tqdm(pending, desc=f"{self.run.name}: embeddings", unit="epoch", leave=False,
                          disable=not self.progress or not pending):
            path, step = self.run.embeddings_path(epoch), self._epoch_step(epoch)
            try:
                arrays = self.run.load_embeddings(epoch)
                image_embeds, text_embeds = arrays["image_embeds"], arrays["text_embeds"]
            except RunError as err:
                counts.skipped.append(str(err))
                continue
            except KeyError as err:
                counts.skipped.append(f"{path}: no {err} array")
                continue
            if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
                counts.skipped.append(f"{path}: image and text embeddings of shapes {image_embeds.shape} and "
                                      f"{text_embeds.shape}, not two matching matrices")
                continue
            if step is None:
                counts.skipped.append(f"{path}: no evaluation or checkpoint of epoch {epoch} yet to give its step")
                continue
            self.writer(SPLIT_FOLDERS["val"]).add_image("alignment/ITC similarity (first pairs)",
                                                        similarity_image(image_embeds, text_embeds), step,
                                                        dataformats="HWC")
            self._projector(epoch, step, arrays)
            self.state["epochs"].append(epoch)
            counts.epochs += 1

    def _epoch_step(self, epoch: int) -> int | None:
        """The step of an epoch's evaluation (its checkpoint's when the evaluation cannot be read), or None."""
        try:
            step = self.run.load_eval(epoch).get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                return step
        except RunError:
            pass
        try:
            return self.run.checkpoint(epoch).step
        except CheckpointError:
            return None

    def _projector(self, epoch: int, step: int, arrays: dict[str, np.ndarray]) -> None:
        """The epoch's image and text embeddings as one projector tensor "epoch_NNN:<step>", images first, with
        their metadata and thumbnails (a text row shows its image's). The writer rewrites projector_config.pbtxt
        with only its own entries, so the entries of earlier exports are merged back in."""
        thumbnails = np.stack([self._thumbnail(path) for path in per_pair(arrays, "file_paths")])
        label_img = torch.from_numpy(np.concatenate([thumbnails, thumbnails]))
        config_path = self.folder / PROJECTOR_CONFIG
        before = _projector_config(config_path)
        embeddings = np.concatenate([arrays["image_embeds"], arrays["text_embeds"]]).astype(np.float32)
        self.writer("").add_embedding(embeddings, metadata=projector_metadata(arrays), label_img=label_img,
                                      global_step=step, tag=f"epoch_{epoch:03d}",
                                      metadata_header=list(PROJECTOR_COLUMNS))
        written = _projector_config(config_path)
        known = {entry.tensor_name for entry in before.embeddings}
        before.embeddings.extend(entry for entry in written.embeddings if entry.tensor_name not in known)
        from google.protobuf import text_format

        atomic_write_bytes(config_path, text_format.MessageToString(before).encode(), error=RunError)

    def _thumbnail(self, path: str) -> np.ndarray:
        if path not in self._thumbnails:
            self._thumbnails[path] = thumbnail(path)
        return self._thumbnails[path]


def _projector_config(path: Path) -> Any:
    """The ProjectorConfig in `path` (empty when there is none yet)."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    if path.is_file():
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    return config


# --- many runs, once or following them --------------------------------------------------------------
def is_running(run: RunDir) -> bool:
    """Whether a trainer is still writing the run: run.json says so and its trainer lock is held (a trainer killed
    mid-run leaves "running" in run.json but not the lock)."""
    try:
        status = run.read_info().get("status")
    except RunError:
        return False
    return status == "running" and run.trainer_running() is not False


def export_runs(find_runs: Callable[[], Iterable[RunDir]], out: str | Path, follow: bool = False,
                interval: float = 5.0, progress: bool = True, report: Callable[[str], None] = print,
                warn: Callable[[str], None] = print, sleep: Callable[[float], None] | None = None) -> list[str]:
    """Export the runs `find_runs` names into `out`, one folder each; with `follow`, again every `interval` seconds
    (finding the runs anew: a study's next run joins) until none of them is running, then once more. `report` gets
    a line per run and pass that wrote something (and each run's first pass), `warn` each run that cannot be
    exported (its folder holds another run's export, its run.json cannot be read), which is left out while the
    others are exported. Returns those runs' errors. Writers are flushed and closed however it ends (Ctrl-C
    included)."""
    exports: dict[Path, RunExport] = {}
    errors: dict[Path, str] = {}
    try:
        while True:
            runs = [run for run in find_runs() if run.path not in errors]
            running = follow and any(is_running(run) for run in runs)
            for run in runs:
                try:
                    export = exports.get(run.path) or exports.setdefault(run.path, RunExport(run, out, progress))
                    counts = export.export_pass()
                except RunError as err:
                    errors[run.path] = str(err)
                    warn(str(err))
                    continue
                if counts or export.passes == 1:
                    report(f"{run.name}: {counts.text()}" + "".join(f"\n  not yet: {why}" for why in counts.skipped))
            if not running:
                return list(errors.values())
            (sleep or time.sleep)(interval)
    finally:
        for export in exports.values():
            export.close()
