"""The run directory: the one contract between the trainer (writer) and the dashboard (reader).

    runs/<name>/
      run.json                      config, versions, git revision, device, status, timestamps, best metrics
      metrics.jsonl                 one JSON object a line: step, epoch, split, loss, itc, lm, itm, ... (every
                                    key declared in blipcore.evaluation.metrics)
      checkpoints/epoch_003.safetensors + epoch_003.json   weights + sidecar (config, step, metrics, sha256)
      checkpoints/last/             resumable state: state.json (position, file names, sha256) names
                                    model-stepN-<sha>.safetensors and optimizer-stepN-<sha>.pt
      embeddings/epoch_003.npz      image and text embeddings of the fixed evaluation set
      eval/epoch_003.json           captioning / retrieval / collapse metrics per decoding strategy
      eval/step_00000400.json       the same, for evaluations inside an epoch (train.eval_every_steps)
      eval/epoch_003.test.json      the same on the held-out test split (`python -m train eval --split test`)
      projections/umap_epoch_003.npz  the dashboard's cache of 2-D layouts of the embeddings
      trainer.lock                  held (fcntl lock) by the one trainer writing this run; the OS releases it
                                    when that process ends, however it ends

Every file is replaced atomically (temporary name in the same folder, fsync, rename), and a
checkpoint's sidecar is written after its weights, so a reader never takes a half-written file for
a checkpoint. metrics.jsonl is appended a whole line at a time; a reader skips a partial last line.
Nothing in a run directory is ever unpickled: weights are safetensors, optimizer state is read with
`torch.load(weights_only=True)`. Readers turn every kind of damage (truncation, bad bytes, wrong
types, another format version) into RunError / CheckpointError naming the file; a failed write
(disk full, read-only folder) is a RunError too, and leaves the previous version of the file intact.
The trainer and the dashboard go through RunDir for every path here. Weights and training state as bytes are
blipcore.runs.weights, the trainer lock blipcore.runs.lock, the errors and shared readers blipcore.runs.files.
"""


from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import (
    STALE_TEMPORARY_PATTERN,
    atomic_write_bytes,
    atomic_write_json,
    is_number,
    jsonable,
    sha256_bytes,
    sha256_file,
    writing,
)
from ..model.config import BlipConfig
from .files import CheckpointError, RunError, iter_metrics, now, read_json
from .lock import TrainerLock
from .weights import (
    check_state_fits,
    encode_torch_state,
    encode_weights,
    load_model_state,
    load_torch_state,
    read_verified_weights,
)
from .weights import load_init_weights as load_init_weights  # re-exported: the trainer's `rundir.load_init_weights`

FORMAT_VERSION = 1
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# What a run folder holds (everything `--overwrite` deletes); the lock file stays, it belongs to the trainer.
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "embeddings", "eval", "projections")
LOCK_FILE = "trainer.lock"
STATE_FILE = "state.json"
# A study folder (runs/study-<name>/, blipcore.experiments.study) holds run folders, its plan and its table.
STUDY_TABLE = "study.json"
STUDY_PLAN = "plan.toml"


def parse_run_spec(spec: str) -> tuple[Path, int | None]:
    """"RUN[:EPOCH]" -> (run folder, epoch or None for the newest checkpoint). A folder name that itself ends
    in ":<digits>" is read as RUN:EPOCH; a path ending in ':' or ':<not digits>' is a folder name."""
    folder, colon, epoch = spec.rpartition(":")
    if colon and folder and epoch.isdigit():
        return Path(folder), int(epoch)
    return Path(spec), None


def init_checkpoint(spec: str) -> Checkpoint:
    """The checkpoint "RUN[:EPOCH]" names (train.init, capfilt's --captioner / --filter); RunError /
    CheckpointError saying what is missing."""
    folder, epoch = parse_run_spec(spec)
    run = RunDir(folder)
    if not run.exists():
        raise RunError(f"{folder}: not a run folder (no run.json there)")
    return run.checkpoint(epoch)


@dataclass
class SavedState:
    """What RunDir.load_state read back: the position (step, epoch, ...) and the training state."""

    position: dict[str, int]
    training: dict[str, Any]
    source: Path  # the training-state file, for error messages


# --- the run directory -------------------------------------------------------------------------
@dataclass
class Checkpoint:
    epoch: int
    step: int
    weights: Path
    sidecar: Path
    meta: dict[str, Any]


class RunDir:
    """Paths, writers and readers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        """The folder's name; for a run inside a study folder, "<study>/<run>" (unique in a runs folder)."""
        parent = self.path.parent
        return f"{parent.name}/{self.path.name}" if is_study(parent) else self.path.name

    run_json = property(lambda self: self.path / "run.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    last_dir = property(lambda self: self.path / "checkpoints" / "last")
    embeddings_dir = property(lambda self: self.path / "embeddings")
    eval_dir = property(lambda self: self.path / "eval")
    projections_dir = property(lambda self: self.path / "projections")

    def exists(self) -> bool:
        return self.run_json.is_file()

    # --- run.json ------------------------------------------------------------------------------
    def read_info(self) -> dict[str, Any]:
        info = read_json(self.run_json, "the run description")
        version = info.get("format_version")
        if version != FORMAT_VERSION:
            raise RunError(
                f"{self.run_json}: run format version {version!r}; this BLIP Lab reads version {FORMAT_VERSION}"
            )
        return info

    def config(self) -> BlipConfig:
        return _usable_config(self.read_info().get("config"), self.run_json, RunError)

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, {**info, "format_version": FORMAT_VERSION, "updated_at": now()},
                          error=RunError)

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = {**self.read_info(), **fields}
        self.write_info(info)
        return info

    # --- metrics.jsonl -------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line in a single write and fsync it (RunError if it cannot be written)."""
        line = json.dumps(jsonable({**record, "time": record.get("time", time.time())}), sort_keys=True) + "\n"
        with writing(self.metrics_file, RunError):
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_file, "ab") as f:
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete, parseable line; partial, non-UTF-8 or malformed lines are skipped."""
        return list(iter_metrics(self.metrics_file))

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after `after_step` (a resumed run logs those steps again), and lines without
        a numeric step."""
        kept = [r for r in self.read_metrics() if is_number(r.get("step")) and r["step"] <= after_step]
        kept_lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.metrics_file, kept_lines.encode(), error=RunError)

    # --- epoch checkpoints ---------------------------------------------------------------------
    def checkpoint_paths(self, epoch: int) -> tuple[Path, Path]:
        stem = self.checkpoints_dir / f"epoch_{epoch:03d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save_checkpoint(self, model: torch.nn.Module, cfg: BlipConfig, epoch: int, step: int, metrics: dict,
                        epoch_progress: float | None = None) -> Checkpoint:
        """Weights, then the sidecar naming their sha256. An older sidecar of the same epoch (a resumed run
        writing the epoch again) is removed first, so it never vouches for weights it did not describe.
        `epoch_progress` (epochs done, e.g. 0.65) is recorded for a checkpoint taken inside epoch `epoch`
        (a step budget that ended there)."""
        weights_path, sidecar_path = self.checkpoint_paths(epoch)
        data = encode_weights(model, {"format_version": str(FORMAT_VERSION), "epoch": str(epoch), "step": str(step)})
        with writing(sidecar_path, RunError):
            sidecar_path.unlink(missing_ok=True)
        atomic_write_bytes(weights_path, data, error=RunError)
        meta = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "step": step,
            "file": weights_path.name,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "epoch_progress": float(epoch if epoch_progress is None else epoch_progress),
            "config": cfg.to_dict(),
            "metrics": metrics,
            "created_at": now(),
        }
        # written last: its presence marks a complete checkpoint
        atomic_write_json(sidecar_path, meta, error=RunError)
        return Checkpoint(epoch, step, weights_path, sidecar_path, meta)

    def checkpoints(self) -> list[Checkpoint]:
        """Complete epoch checkpoints (readable sidecar and a weights file), oldest first; the others are
        skipped here, and `checkpoint(epoch)` says what is wrong with them."""
        found = []
        for sidecar in sorted(self.checkpoints_dir.glob("epoch_*.json")):
            match = re.fullmatch(r"epoch_(\d+)\.json", sidecar.name)
            if not match:
                continue
            try:
                found.append(self._read_checkpoint(int(match.group(1))))
            except CheckpointError:
                continue
        return found

    def _read_checkpoint(self, epoch: int) -> Checkpoint:
        """The checkpoint of `epoch`, or CheckpointError naming its file and what is wrong with it."""
        weights, sidecar = self.checkpoint_paths(epoch)
        try:
            meta = read_json(sidecar, "checkpoint sidecar")
        except RunError as err:
            raise CheckpointError(str(err)) from None
        if not weights.is_file():
            raise CheckpointError(f"{weights}: weights file is missing (its sidecar {sidecar.name} is there)")
        step = meta.get("step", 0)
        if not is_number(step):
            raise CheckpointError(f"{sidecar}: step should be a number, found {step!r}")
        return Checkpoint(epoch, int(step), weights, sidecar, meta)

    def epochs(self) -> list[int]:
        return [c.epoch for c in self.checkpoints()]

    def no_checkpoint_error(self) -> CheckpointError:
        """Why this folder has no checkpoint to read: it is not there, it is not a run, or no epoch has ended."""
        if not self.path.is_dir():
            return CheckpointError(f"{self.path}: no such run folder")
        if not self.exists():
            return CheckpointError(f"{self.path}: not a run folder (no run.json)")
        return CheckpointError(f"{self.path}: no checkpoint yet (one is written at the end of each epoch)")

    def checkpoint(self, epoch: int | None = None) -> Checkpoint:
        """The checkpoint of `epoch`, or the newest one; CheckpointError says why one is not there."""
        available = self.checkpoints()
        if epoch is None:
            if not available:
                raise self.no_checkpoint_error()
            return available[-1]
        for ckpt in available:
            if ckpt.epoch == epoch:
                return ckpt
        if any(p.exists() for p in self.checkpoint_paths(epoch)):
            self._read_checkpoint(epoch)  # an incomplete or damaged checkpoint: raises, naming the problem
        listed = ", ".join(str(c.epoch) for c in available) or "none yet"
        raise CheckpointError(f"{self.path}: no checkpoint for epoch {epoch}; available: {listed}")

    def load_model(self, epoch: int | None = None, device: str | torch.device = "cpu"):
        """Rebuild the model of a checkpoint, verifying its sha256. Returns (BLIP in eval mode, config, Checkpoint)."""
        from ..model.blip import BLIP

        ckpt = self.checkpoint(epoch)
        cfg = self._checkpoint_config(ckpt)
        state = read_verified_weights(ckpt.weights, ckpt.meta.get("sha256"))
        # The sidecar's config must describe these weights before any memory is spent on it: a config
        # edited to ask for a huge model is refused from the meta-device skeleton's shapes alone.
        with torch.device("meta"):
            check_state_fits(BLIP(cfg), state, str(ckpt.weights))
        model = BLIP(cfg)
        model.load_state_dict(state, strict=False)  # fits: checked on the skeleton just above
        return model.to(device).eval(), cfg, ckpt

    def _checkpoint_config(self, ckpt: Checkpoint) -> BlipConfig:
        return _usable_config(ckpt.meta.get("config"), ckpt.sidecar, CheckpointError)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` epoch checkpoints (sidecar first, so none looks complete)."""
        for ckpt in self.checkpoints()[:-keep] if keep > 0 else []:
            ckpt.sidecar.unlink(missing_ok=True)
            ckpt.weights.unlink(missing_ok=True)

    # --- embeddings and evaluation -------------------------------------------------------------
    def embeddings_path(self, epoch: int) -> Path:
        return self.embeddings_dir / f"epoch_{epoch:03d}.npz"

    def save_embeddings(self, epoch: int, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(self.embeddings_path(epoch), buffer.getvalue(), error=RunError)

    def load_embeddings(self, epoch: int) -> dict[str, np.ndarray]:
        """The arrays of an embeddings file; RunError when it is missing, damaged, not an .npz archive,
        or holds object arrays (never unpickled)."""
        path = self.embeddings_path(epoch)
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an .npz archive")
                arrays = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise RunError(f"{path}: no embeddings for epoch {epoch}") from None
        except Exception as err:  # noqa: BLE001 - zip, zlib, npy-header and pickle refusals alike mean a damaged file
            raise RunError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
        odd = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
        if odd:
            raise RunError(f"{path}: cannot be read (member(s) {', '.join(odd)} are not .npy arrays)")
        return arrays

    def embedding_epochs(self) -> list[int]:
        return _numbered_epochs(self.embeddings_dir, ".npz")

    def eval_path(self, epoch: int, split: str = "val") -> Path:
        """eval/epoch_003.json for the validation split (what training writes), eval/epoch_003.<split>.json
        for another (`python -m train eval --split test`)."""
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", split):
            raise ValueError(f"split {split!r}: lowercase letters, digits, '_' and '-'")
        return self.eval_dir / (f"epoch_{epoch:03d}.json" if split == "val" else f"epoch_{epoch:03d}.{split}.json")

    def save_eval(self, epoch: int, result: dict[str, Any], split: str = "val") -> None:
        atomic_write_json(self.eval_path(epoch, split),
                          {**result, "format_version": FORMAT_VERSION, "epoch": epoch, "split": split}, error=RunError)

    def save_step_eval(self, step: int, result: dict[str, Any]) -> None:
        """An evaluation inside an epoch (train.eval_every_steps): early collapse shows up here."""
        path = self.eval_dir / f"step_{step:08d}.json"
        atomic_write_json(path, {**result, "format_version": FORMAT_VERSION, "step": step}, error=RunError)

    def load_eval(self, epoch: int, split: str = "val") -> dict[str, Any]:
        return read_json(self.eval_path(epoch, split), f"{split} evaluation of epoch {epoch}")

    def validation_evaluations(self) -> list[dict[str, Any]]:
        """Every evaluation training made on the validation split, epoch ends (eval/epoch_NNN.json) and those inside
        an epoch (eval/step_NNNNNNNN.json), in the order of their steps. A file that cannot be read (a run being
        written by an older writer, say) is left out."""
        paths = [self.eval_path(epoch) for epoch in self.eval_epochs()]
        paths += [p for p in self.eval_dir.glob("step_*.json") if re.fullmatch(r"step_\d+\.json", p.name)]
        found = []
        for path in paths:
            try:
                found.append(read_json(path, "validation evaluation"))
            except RunError:
                continue
        return sorted(found, key=lambda result: (result.get("step") if isinstance(result.get("step"), int) else -1))

    def eval_epochs(self, split: str = "val") -> list[int]:
        """The epochs evaluated on `split`, sorted: the N of eval/epoch_NNN.json for the validation split,
        of eval/epoch_NNN.<split>.json for another (the files `eval_path` names)."""
        self.eval_path(0, split)  # the split's name is checked there
        return _numbered_epochs(self.eval_dir, ".json" if split == "val" else f".{split}.json")

    # --- the dashboard's cache of 2-D layouts ----------------------------------------------------
    def projection_path(self, method: str, epoch: int) -> Path:
        if not re.fullmatch(r"[a-z0-9]+", method):
            raise ValueError(f"projection method {method!r}: lowercase letters and digits only")
        return self.projections_dir / f"{method}_epoch_{epoch:03d}.npz"

    def save_projection(self, method: str, epoch: int, arrays: dict[str, np.ndarray]) -> None:
        """Cache a layout (RunError when the run folder cannot be written: the caller goes on uncached)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.projection_path(method, epoch), buffer.getvalue(), error=RunError)

    def load_projection(self, method: str, epoch: int) -> dict[str, np.ndarray] | None:
        """A cached layout's arrays, or None when there is none or it cannot be read (then it is recomputed)."""
        try:
            with np.load(self.projection_path(method, epoch), allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except Exception:  # noqa: BLE001 - missing, damaged or not an .npz: a cache miss
            return None

    # --- training: ownership, preparation, resumable state --------------------------------------
    def lock_for_training(self) -> TrainerLock:
        """Take the run's trainer lock (creating the folder), or RunError naming the process that holds it.
        The lock is an fcntl record lock: the OS drops it when its process ends, even by kill -9, and the
        DataLoader workers a trainer forks do not inherit it."""
        return TrainerLock.acquire(self.path / LOCK_FILE)

    def trainer_running(self) -> bool | None:
        """Whether a trainer holds this run's lock now; None when the run has no lock file (never trained
        by this version). A run.json saying "running" without a trainer means the trainer was killed."""
        path = self.path / LOCK_FILE
        return TrainerLock.is_held(path) if path.is_file() else None

    def prepare_for_training(self, resume: bool, overwrite: bool) -> tuple[TrainerLock, bool]:
        """Check the folder, take its trainer lock, then make it ready: refuse to clobber a run silently,
        replace it under `overwrite`, remove the temporaries a killed writer left, and fail now, not after
        an epoch, if the folder cannot be written. A run asked to resume that stopped before its first save
        (run.json, but neither resumable state nor an epoch checkpoint) has nothing to continue from: it
        is cleared and starts again. Returns (the lock, whether to resume from checkpoints/last/)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path} exists and is not a folder")
        if resume and not self.exists() and not self.has_state():
            raise RunError(f"{self.path}: nothing to resume (no run.json); start it without --resume")
        if not self.exists() and self.path.is_dir():
            foreign = [p.name for p in self.path.iterdir()
                       if p.name != LOCK_FILE and not STALE_TEMPORARY_PATTERN.fullmatch(p.name)]
            if foreign:
                raise RunError(f"{self.path} is a non-empty folder that is not a run; pick an empty or new --run-dir")
        lock = self.lock_for_training()
        try:
            resume = self._make_ready(resume, overwrite)
        except BaseException:
            lock.release()
            raise
        return lock, resume

    def _make_ready(self, resume: bool, overwrite: bool) -> bool:
        if resume and not self.has_state():
            if self.checkpoints():
                raise RunError(f"{self.path}: nothing to resume from (checkpoints/last/{STATE_FILE} is missing); "
                               "--overwrite starts the run again from step 0, deleting its epoch checkpoints")
            print(f"{self.path}: stopped before its first save; starting it again from step 0", file=sys.stderr)
            resume, overwrite = False, True
        if not resume and self.exists():
            if not overwrite:
                status = self.read_info().get("status")
                hint = "choose another --run-dir" if status == "completed" else "--resume continues it"
                raise RunError(f"{self.path} already holds a {status} run: {hint}, or pass --overwrite to replace it")
            for name in RUN_FILES:
                target = self.path / name
                with writing(target, RunError):
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.remove_stale_temporaries()
        try:
            with tempfile.TemporaryFile(dir=self.path) as probe:  # leaves nothing behind, even if killed
                probe.write(b"ok")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as err:
            raise RunError(
                f"{self.path}: cannot write the run folder ({err.strerror or err}); fix permissions or free space"
            ) from None
        return resume

    def has_state(self) -> bool:
        """Whether checkpoints/last/ holds resumable state (its state.json, written after the files it names)."""
        return (self.last_dir / STATE_FILE).is_file()

    def save_state(self, model: torch.nn.Module, training: dict[str, Any], position: dict[str, int],
                   cfg: BlipConfig) -> None:
        """checkpoints/last/: the weights and `training` (optimizer state, RNG states: tensors and plain
        containers) as new files first, state.json naming them with their sha256 and `position` last, then
        older files removed. A crash at any point leaves a complete, loadable state. Files are named by step
        and content, so a save never replaces a file the current state.json names with different bytes."""
        weights, extra = encode_weights(model), encode_torch_state(training)
        weights_sha, extra_sha = sha256_bytes(weights), sha256_bytes(extra)
        step = position["step"]
        names = {"weights": f"model-step{step:08d}-{weights_sha[:12]}.safetensors",
                 "optimizer": f"optimizer-step{step:08d}-{extra_sha[:12]}.pt"}
        atomic_write_bytes(self.last_dir / names["weights"], weights, error=RunError)
        atomic_write_bytes(self.last_dir / names["optimizer"], extra, error=RunError)
        atomic_write_json(self.last_dir / STATE_FILE, {
            "format_version": FORMAT_VERSION, **position, **names,
            "weights_sha256": weights_sha, "optimizer_sha256": extra_sha,
            "config": cfg.to_dict(), "saved_at": now(),
        }, error=RunError)
        for stale in self.last_dir.iterdir():
            if stale.name not in (*names.values(), STATE_FILE) and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)

    def load_state(self, model: torch.nn.Module, position_keys: tuple[str, ...]) -> SavedState:
        """Restore checkpoints/last/'s weights into `model` and return the saved position and training state.
        Every file is verified against the sha256 that state.json records, the training state is read
        without unpickling; any damage is a CheckpointError naming the file."""
        state_path = self.last_dir / STATE_FILE
        state = read_json(state_path, "resumable state")
        names = {key: state.get(key) for key in ("weights", "optimizer")}
        position = {key: state.get(key) for key in position_keys}
        bad = [f"{k}={v!r}" for k, v in names.items()
               if not isinstance(v, str) or v in ("", ".", "..") or Path(v).name != v]  # a file of last/, nothing else
        bad += [f"{k}={v!r}" for k, v in position.items() if type(v) is not int or v < 0]
        if bad:
            raise CheckpointError(f"{state_path}: damaged ({', '.join(bad)}); the run cannot be resumed")
        weights_path, training_path = self.last_dir / names["weights"], self.last_dir / names["optimizer"]
        load_model_state(model, read_verified_weights(weights_path, state.get("weights_sha256")), str(weights_path))
        try:
            actual = sha256_file(training_path)
        except OSError as err:
            raise CheckpointError(f"{training_path}: cannot be read ({err.strerror or err})") from None
        if actual != state.get("optimizer_sha256"):
            raise CheckpointError(f"{training_path}: sha256 does not match {STATE_FILE} (truncated or corrupted)")
        training = load_torch_state(training_path)
        if not isinstance(training, dict):
            raise CheckpointError(f"{training_path}: not the optimizer state of this run (a {type(training).__name__})")
        return SavedState(position, training, training_path)

    # --- after a crash -------------------------------------------------------------------------
    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files (".<name>.XXXXXXXX.tmp") that a writer killed mid-write left in the run
        folder and its subfolders. Only the run's writer may call this, before it starts writing."""
        for folder in (self.path, self.checkpoints_dir, self.last_dir, self.embeddings_dir, self.eval_dir,
                       self.projections_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else []:
                if STALE_TEMPORARY_PATTERN.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)


def _usable_config(value: Any, source: Path, error: type[RunError]) -> BlipConfig:
    """BlipConfig.from_dict of a config read from `source`, or `error` naming the file and the problem."""
    if not isinstance(value, dict):
        raise error(f"{source}: config should be a JSON object, found {type(value).__name__}")
    try:
        return BlipConfig.from_dict(value)
    except Exception as err:  # noqa: BLE001 - any field of the wrong type or value makes the file unusable
        raise error(f"{source}: config is not usable ({type(err).__name__}: {err})") from None


def _numbered_epochs(folder: Path, suffix: str) -> list[int]:
    """The N of the files epoch_NNN<suffix> in `folder`, sorted."""
    pattern = re.compile(r"epoch_(\d+)" + re.escape(suffix))
    return sorted(int(m.group(1)) for p in folder.glob(f"epoch_*{suffix}") if (m := pattern.fullmatch(p.name)))


def resolve_run_dir(runs_dir: str | Path, name: str) -> RunDir:
    """The run folder `name` inside `runs_dir`; names that could escape it are refused."""
    if not isinstance(name, str) or not RUN_NAME_PATTERN.fullmatch(name):
        raise RunError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (no slashes), at most 128 characters")
    return RunDir(Path(runs_dir) / name)


def is_study(folder: Path) -> bool:
    return (folder / STUDY_TABLE).is_file()


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    """Folders of `runs_dir` that hold a run.json, and the runs inside its study folders, sorted by name.
    Symlinked folders are not followed."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if RunDir(folder).exists():
            found.append(RunDir(folder))
        elif is_study(folder):
            found += [RunDir(p) for p in sorted(folder.iterdir())
                      if p.is_dir() and not p.is_symlink() and RunDir(p).exists()]
    return found
