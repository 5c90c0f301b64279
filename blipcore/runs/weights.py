"""Model weights and training state as bytes: safetensors for weights (tied tensors stored once), torch.load with
weights_only=True for optimizer state (never unpickled code), every load checked against the model it fills and,
for files of a run folder, against the sha256 recorded when they were saved. Damage is a CheckpointError naming the
file."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..io import sha256_bytes
from .files import CheckpointError


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names whose tensor is one already listed under an earlier name (tied weights: e.g.
    lm_head.weight is word_embeddings.weight). By identity, so it works on the meta device too."""
    seen, tied = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: contiguous CPU copies, tied weights stored once."""
    tied = tied_names(model)
    return {name: tensor.detach().to("cpu").contiguous()
            for name, tensor in model.state_dict().items() if name not in tied}


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` when `state` was made for another model than `model` (unexpected,
    missing or differently shaped tensors). Only shapes are read, so `model` may live on the meta device."""
    expected = model.state_dict()
    tied = tied_names(model)
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


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, with an error naming `source` when it was made for another model."""
    check_state_fits(model, state, source)
    model.load_state_dict(state, strict=False)


def load_init_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Start `model` from another run's weights (`fit --init`): every tensor both have is copied; the model's
    parts the checkpoint lacks (a head for a loss it was not trained with) keep their fresh initialisation,
    and momentum copies take their online twin's loaded weights; the checkpoint's parts the model has no use
    for (e.g. the decoder, for a filter trained with ITM + ITC only) are left out. Returns the module
    tensors loaded and, per top-level module, the tensors of each kind ({"new": {"itm_head": 2}, "dropped":
    {...}}); CheckpointError when a shared tensor's shape
    differs (another architecture: image size, widths, depths)."""
    expected = model.state_dict()
    tied = tied_names(model)
    wrong = [f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
             for name, tensor in state.items() if name in expected and expected[name].shape != tensor.shape]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{source}: another architecture than this run's: {'; '.join(wrong[:3])}{more}")
    model.load_state_dict({name: tensor for name, tensor in state.items() if name in expected}, strict=False)
    missing = sorted(set(expected) - set(state) - tied)
    for online, target in getattr(model, "momentum_pairs", []):  # momentum copies start as their online twins
        if any(name.startswith(f"{target}.") for name in missing):
            getattr(model, target).load_state_dict(getattr(model, online).state_dict())
    def per_module(names: list[str]) -> dict[str, int]:
        return dict(sorted(Counter(name.split(".")[0] for name in names).items()))

    dropped = sorted(set(state) - set(expected))
    return {"loaded_tensors": len(state) - len(dropped), "new": per_module(missing), "dropped": per_module(dropped)}


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


def read_verified_weights(path: Path, expected_sha256: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose sha256 must equal `expected_sha256` (from its sidecar or
    state.json); CheckpointError names the file when it is missing, unrecorded, corrupted or not safetensors."""
    if not isinstance(expected_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", expected_sha256):
        raise CheckpointError(f"{path}: no valid sha256 recorded for it ({expected_sha256!r}); it cannot be verified")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file is missing") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the weights ({err.strerror or err})") from None
    if sha256_bytes(data) != expected_sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match the one recorded when it was saved (the file is truncated or "
            "corrupted); use another checkpoint or retrain"
        )
    return decode_weights(data, str(path))
