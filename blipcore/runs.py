"""The run directory: the one contract between the trainer (writer) and the dashboard (reader).

    runs/<name>/
      run.json                      config, versions, git revision, device, status, timestamps
      metrics.jsonl                 one JSON object a line: step, epoch, split, loss, itc, lm, itm, ...
      checkpoints/epoch_003.safetensors + epoch_003.json   weights + sidecar (config, step, metrics, sha256)
      checkpoints/last/             resumable state: state.json names the weight and optimizer files
      embeddings/epoch_003.npz      image and text embeddings of the fixed evaluation set
      eval/epoch_003.json           captioning / retrieval / collapse metrics per decoding strategy

Every file is replaced atomically (temporary name in the same folder, fsync, rename), and a
checkpoint's sidecar is written after its weights, so a reader never takes a half-written file for
a checkpoint. metrics.jsonl is appended a whole line at a time; a reader skips a partial last line.
Nothing in a run directory is ever unpickled: weights are safetensors, optimizer state is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import BlipConfig

FORMAT_VERSION = 1
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunError(Exception):
    """A run directory is missing, unreadable, from another format version, or would be overwritten."""


class CheckpointError(RunError):
    """A checkpoint is missing, truncated, corrupted, or made for another model configuration."""


# --- atomic files ------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(value), indent=2, sort_keys=True) + "\n").encode())


def _jsonable(value: Any) -> Any:
    """Tensors, numpy scalars and non-finite floats made JSON-safe (NaN/inf become null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, raising RunError that names the file and the problem."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: {what} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: {what} is not valid JSON ({err})") from None
    except OSError as err:
        raise RunError(f"{path}: cannot read {what} ({err.strerror})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: {what} should be a JSON object, found {type(value).__name__}")
    return value


# --- model weights -----------------------------------------------------------------------------
def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: contiguous CPU copies, tied weights stored once."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key in seen:  # e.g. lm_head.weight is word_embeddings.weight
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, with an error naming `source` when it was made for another model."""
    expected = model.state_dict()
    tied = set(expected) - set(model_state(model))
    problems = []
    for name, tensor in state.items():
        if name not in expected:
            problems.append(f"unexpected tensor {name}")
        elif expected[name].shape != tensor.shape:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(state) - tied)
    problems += [f"missing tensor {name}" for name in missing]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{source}: made for a different model configuration: {'; '.join(problems[:3])}{more}"
        )
    model.load_state_dict(state, strict=False)


def encode_weights(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    return save_safetensors(model_state(model), metadata=metadata)


def decode_weights(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: not a readable safetensors file ({err}); it may be truncated") from None


def load_torch_state(path: Path) -> Any:
    """Optimizer state: tensors and plain containers only (weights_only=True never unpickles code)."""
    try:
        return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # noqa: BLE001 - any decoding failure is a damaged file to the user
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None


def encode_torch_state(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


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
        return self.path.name

    run_json = property(lambda self: self.path / "run.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    last_dir = property(lambda self: self.path / "checkpoints" / "last")
    embeddings_dir = property(lambda self: self.path / "embeddings")
    eval_dir = property(lambda self: self.path / "eval")

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
        info = self.read_info()
        try:
            return BlipConfig.from_dict(info["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise RunError(f"{self.run_json}: config is not usable ({err})") from None

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, {**info, "format_version": FORMAT_VERSION, "updated_at": now()})

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = {**self.read_info(), **fields}
        self.write_info(info)
        return info

    # --- metrics.jsonl -------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line in a single write and fsync it."""
        line = json.dumps(_jsonable({**record, "time": record.get("time", time.time())}), sort_keys=True) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete, parseable line; partial, non-UTF-8 or malformed lines are skipped."""
        return list(iter_metrics(self.metrics_file))

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after `after_step` (a resumed run logs those steps again)."""
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= after_step]
        atomic_write_bytes(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    # --- epoch checkpoints ---------------------------------------------------------------------
    def checkpoint_paths(self, epoch: int) -> tuple[Path, Path]:
        stem = self.checkpoints_dir / f"epoch_{epoch:03d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save_checkpoint(self, model: torch.nn.Module, cfg: BlipConfig, epoch: int, step: int, metrics: dict) -> Checkpoint:
        weights_path, sidecar_path = self.checkpoint_paths(epoch)
        data = encode_weights(model, {"format_version": str(FORMAT_VERSION), "epoch": str(epoch), "step": str(step)})
        atomic_write_bytes(weights_path, data)
        meta = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "step": step,
            "file": weights_path.name,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "config": cfg.to_dict(),
            "metrics": metrics,
            "created_at": now(),
        }
        atomic_write_json(sidecar_path, meta)  # written last: its presence marks a complete checkpoint
        return Checkpoint(epoch, step, weights_path, sidecar_path, meta)

    def checkpoints(self) -> list[Checkpoint]:
        """Complete epoch checkpoints (sidecar present and readable), oldest first."""
        found = []
        for sidecar in sorted(self.checkpoints_dir.glob("epoch_*.json")):
            match = re.fullmatch(r"epoch_(\d+)\.json", sidecar.name)
            if not match:
                continue
            try:
                meta = read_json(sidecar, "checkpoint sidecar")
            except RunError:
                continue
            weights = sidecar.with_suffix(".safetensors")
            if weights.is_file():
                found.append(Checkpoint(int(match.group(1)), int(meta.get("step", 0)), weights, sidecar, meta))
        return found

    def epochs(self) -> list[int]:
        return [c.epoch for c in self.checkpoints()]

    def checkpoint(self, epoch: int | None = None) -> Checkpoint:
        """The checkpoint of `epoch`, or the newest one."""
        available = self.checkpoints()
        if not available:
            raise CheckpointError(f"{self.path}: no checkpoint yet (one is written at the end of each epoch)")
        if epoch is None:
            return available[-1]
        for ckpt in available:
            if ckpt.epoch == epoch:
                return ckpt
        raise CheckpointError(
            f"{self.path}: no checkpoint for epoch {epoch}; available: {', '.join(str(c.epoch) for c in available)}"
        )

    def load_model(self, epoch: int | None = None, device: str | torch.device = "cpu"):
        """Rebuild the model of a checkpoint, verifying its sha256. Returns (BLIP in eval mode, config, Checkpoint)."""
        from .model import BLIP

        ckpt = self.checkpoint(epoch)
        cfg = self._checkpoint_config(ckpt)
        model = BLIP(cfg)
        load_model_state(model, read_verified_weights(ckpt.weights, ckpt.meta.get("sha256")), str(ckpt.weights))
        return model.to(device).eval(), cfg, ckpt

    def _checkpoint_config(self, ckpt: Checkpoint) -> BlipConfig:
        try:
            return BlipConfig.from_dict(ckpt.meta["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{ckpt.sidecar}: config is not usable ({err})") from None

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
        atomic_write_bytes(self.embeddings_path(epoch), buffer.getvalue())

    def load_embeddings(self, epoch: int) -> dict[str, np.ndarray]:
        path = self.embeddings_path(epoch)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise RunError(f"{path}: no embeddings for epoch {epoch}") from None
        except (OSError, ValueError, EOFError) as err:
            raise RunError(f"{path}: cannot be read ({err})") from None

    def embedding_epochs(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.embeddings_dir.glob("epoch_*.npz") if (m := re.fullmatch(r"epoch_(\d+)\.npz", p.name)))

    def eval_path(self, epoch: int) -> Path:
        return self.eval_dir / f"epoch_{epoch:03d}.json"

    def save_eval(self, epoch: int, result: dict[str, Any]) -> None:
        atomic_write_json(self.eval_path(epoch), {**result, "format_version": FORMAT_VERSION, "epoch": epoch})

    def save_step_eval(self, step: int, result: dict[str, Any]) -> None:
        """An evaluation inside an epoch (train.eval_every_steps): early collapse shows up here."""
        atomic_write_json(self.eval_dir / f"step_{step:08d}.json", {**result, "format_version": FORMAT_VERSION, "step": step})

    def load_eval(self, epoch: int) -> dict[str, Any]:
        return read_json(self.eval_path(epoch), f"evaluation of epoch {epoch}")

    def eval_epochs(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.eval_dir.glob("epoch_*.json") if (m := re.fullmatch(r"epoch_(\d+)\.json", p.name)))


def read_verified_weights(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file is missing") from None
    if expected_sha256 and sha256_bytes(data) != expected_sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match its sidecar (the file is truncated or corrupted); "
            "use another epoch or retrain"
        )
    return decode_weights(data, str(path))


def iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # a partial last line of a run still being written, or a damaged line
        if isinstance(record, dict):
            yield record


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def resolve_run_dir(runs_dir: str | Path, name: str) -> RunDir:
    """The run folder `name` inside `runs_dir`; names that could escape it are refused."""
    if not RUN_NAME_PATTERN.match(name) or name in (".", ".."):
        raise RunError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (no slashes), at most 128 characters")
    return RunDir(Path(runs_dir) / name)


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    """Folders of `runs_dir` that hold a run.json, sorted by name."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink() and (p / "run.json").is_file()]
