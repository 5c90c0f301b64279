"""One optimiser step as the trainer takes it (train_step), the AdamW it steps (build_optimizer, its parameter
groups) and the learning-rate schedule: warm-up, then cosine decay. benchmarks/ build and time the same step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..model.config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the run stops before applying it."""



def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, embeddings, [CLS]/position tables, temperature."""
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """The trainer's AdamW over `model` (see parameter_groups); benchmarks build theirs here too.

    Fused (one kernel pass over every parameter) where torch has a fused AdamW for the parameters' device
    (CPU and CUDA): the same update as torch's default, which on a CPU loops over the tensors one by one
    (flickr8k-cpu has 247); `benchmarks/profile_step.py` shows its share of a step. Elsewhere, torch's
    default."""
    groups = parameter_groups(model, train.weight_decay)
    settings = {"lr": train.lr, "betas": tuple(train.betas)}
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **settings)


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to base_lr over warmup_steps, then cosine decay to base_lr * min_lr_ratio."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def no_region(name: str) -> contextlib.AbstractContextManager:
    """train_step's default `region`: none (benchmarks/profile_step.py passes profiler regions instead)."""
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[dict],
    *,
    lr: float,
    grad_clip: float,
    device: torch.device,
    autocast: torch.dtype | None,
    step: int,
    world_size: int = 1,
    region: Callable[[str], contextlib.AbstractContextManager] = no_region,
) -> tuple[dict[str, float], float, int]:
    """One optimiser step over the accumulated micro-batches (collated dicts); raises NonFiniteLossError before
    applying a non-finite update. Returns the loss terms averaged over the micro-batches, the gradient norm
    before clipping and the samples seen (all ranks).

    `model` is what runs the forward: under DDP its wrapper, whose gradients are synchronised at the last
    micro-batch only. `step` (1-based) names the step in errors. `region(name)` wraps the step ("step") and
    its parts ("forward", "backward", "clip_grad_norm", "optimizer_step", "zero_grad"): the trainer opens
    none, the step profiler opens torch.profiler regions, so both time the same code."""
    with region("step"):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, float] = {}
        samples = 0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or world_size == 1
            context = contextlib.nullcontext() if sync else model.no_sync()
            with context, torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                with region("forward"):
                    out = model(
                        batch["images"].to(device, non_blocking=True),
                        batch["input_ids"].to(device),
                        batch["attention_mask"].to(device),
                        batch["image_ids"].to(device),
                    )
                values = {k: v.detach().float() for k, v in out.items()}
                bad = [k for k, v in values.items() if k != "loss" and not torch.isfinite(v)]
                if bad or not torch.isfinite(values["loss"]):
                    term = bad[0] if bad else "total"
                    shown = ", ".join(f"{k}={v.item():.4g}" for k, v in values.items())
                    raise NonFiniteLossError(
                        f"step {step}: the {term} loss is not finite ({shown}); the run stops and "
                        "the last checkpoint is kept. Lower train.lr or check the data."
                    )
                with region("backward"):
                    (out["loss"] / len(micro)).backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v.item() / len(micro)
            samples += len(batch["images"]) * world_size
        with region("clip_grad_norm"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"step {step}: the gradient norm is {grad_norm.item()}; the run stops "
                                     "and the last checkpoint is kept. Lower train.lr.")
        with region("optimizer_step"):
            optimizer.step()
        with region("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    return sums, float(grad_norm), samples
