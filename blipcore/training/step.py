"""One optimiser step as the trainer takes it (train_step), the AdamW it steps (build_optimizer, its parameter
groups), the learning-rate schedule (warm-up, then cosine decay), the device-side record of the steps
(StepMonitor) and the compiled module a step runs (step_module). benchmarks/ build and time the same step.

A step never waits for the device: its loss terms and gradient norm stay device tensors, added up by StepMonitor,
and a step whose loss or gradient norm is not finite is skipped on the device (AdamW's found_inf, as torch's
GradScaler skips a step); the host reads the record every N steps and stops the run naming the first bad step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.config import VOCAB_SIZE, BlipConfig, TrainConfig
from ..model.tokenizer import load_tokenizer, special_ids


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the run stops, that step not applied."""


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


class StepMonitor:
    """The record of the steps since the host last read it, kept on the device so that no step waits for the host:
    each loss term's sum and the gradient norm's sum and largest value over the window, and the first step whose
    loss or gradient norm was not finite, with its values. The sums are float64, a step's terms added in the order
    and precision the trainer once added host floats, so the logged means are the numbers it logged then.

    `record` is called by train_step; `read` (the window's numbers, then a new window) and `check` (only whether a
    step went bad) bring it to the host, each in one transfer, and raise NonFiniteLossError for a bad step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: every step so far was finite
        self.names: tuple[str, ...] = ()  # the loss terms, in the order of the vectors below, then the gradient norm
        self.bad_values: Tensor | None = None
        self.sums: Tensor | None = None
        self.grad_max = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def record(self, terms: dict[str, Tensor], grad_norm: Tensor, step: int) -> Tensor:
        """Add one step (its loss terms, float64 scalars on the device, and its gradient norm); returns found_inf,
        a float32 scalar on the device: 1 where the step must not be applied."""
        values = torch.stack([*terms.values(), grad_norm.detach().double()])
        if self.sums is None:
            self.names = tuple(terms)
            self.sums = torch.zeros_like(values)
            self.bad_values = torch.full_like(values, math.nan)
        bad = ~torch.isfinite(values).all()
        first = bad & (self.first_bad == 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_values = torch.where(first, values, self.bad_values)
        self.sums += values
        self.grad_max = torch.maximum(self.grad_max, values[-1])
        self.steps += 1
        return bad.float()

    def check(self) -> None:
        """Raise NonFiniteLossError if a recorded step was not finite (one scalar read: a wait on a GPU)."""
        if first := int(self.first_bad):
            raise self._error(first, self.bad_values.tolist())

    def read(self) -> dict[str, float]:
        """The window's mean of each loss term, mean and largest gradient norm ({} if no step), and a new window;
        NonFiniteLossError if a recorded step was not finite."""
        if self.sums is None or not self.steps:
            return {}
        n = len(self.names) + 1
        packed = torch.cat([self.first_bad.double()[None], self.bad_values, self.sums, self.grad_max[None]]).tolist()
        if first := int(packed[0]):
            raise self._error(first, packed[1 : 1 + n])
        sums = packed[1 + n : 1 + 2 * n]
        reading = {name: total / self.steps for name, total in zip(self.names, sums, strict=False)}
        reading |= {"grad_norm": sums[-1] / self.steps, "grad_norm_max": packed[-1]}
        self.sums.zero_()
        self.grad_max.zero_()
        self.steps = 0
        return reading

    def _error(self, step: int, values: list[float]) -> NonFiniteLossError:
        terms, grad_norm = dict(zip(self.names, values, strict=False)), values[-1]
        bad = [k for k, v in terms.items() if k != "loss" and not math.isfinite(v)]
        if bad or not math.isfinite(terms.get("loss", 0.0)):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            term = bad[0] if bad else "total"
            return NonFiniteLossError(f"step {step}: the {term} loss is not finite ({shown}); the run stops and the "
                                      "last checkpoint is kept. Lower train.lr or check the data.")
        return NonFiniteLossError(f"step {step}: the gradient norm is {grad_norm}; the run stops and the last "
                                  "checkpoint is kept. Lower train.lr.")


def compile_mode(setting: str, device: torch.device) -> str | None:
    """torch.compile's mode for train.compile = `setting` on `device`, or None for eager.

    auto: "reduce-overhead" (inductor with CUDA graphs: a step is replayed, not launched kernel by kernel) on CUDA;
    eager on a CPU, where compiling measured no gain (docs/speed.md) and costs minutes. on: "default" (inductor,
    no CUDA graphs). cudagraphs: "reduce-overhead", CUDA only."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"train.compile = 'cudagraphs' needs a CUDA device, not {device.type}")
    return "default" if setting == "on" else "reduce-overhead"


def step_module(model: nn.Module, setting: str, device: torch.device, max_text_len: int) -> tuple[nn.Module, int]:
    """What train_step runs for train.compile = `setting`, and the caption length it pads to: `model` itself and 0
    (eager: captions padded to each batch's longest), or torch.compile's wrapper of it (its weights shared; the
    model itself stays eager for evaluation) and `max_text_len`: static shapes, compiled once, never a recompile
    for a new caption length. Padding changes no loss (padded keys are masked, padded labels ignored); FLOPs are
    counted on the unpadded tokens (blipcore.model.flops.unpadded_training_flops)."""
    mode = compile_mode(setting, device)
    if mode is None:
        return model, 0
    return torch.compile(model, mode=mode, dynamic=False), max_text_len


def pad_captions(input_ids: Tensor, attention_mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Captions right-padded with [PAD] (mask 0) to `length` tokens, on their device (no host work)."""
    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    return F.pad(input_ids, (0, extra), value=special_ids()["pad"]), F.pad(attention_mask, (0, extra), value=0)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device` without waiting for it: a host tensor is pinned first where it is not (a copy from
    pageable memory to a GPU waits for the work queued before it)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def apply_unless(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """optimizer.step(), skipped where found_inf is 1: on the device by torch's fused AdamW (its found_inf, which
    torch's GradScaler sets the same way; its step count is left as it was), by the host elsewhere (a wait)."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not found_inf.item():
        optimizer.step()


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
    monitor: StepMonitor | None = None,
    pad_to: int = 0,
) -> int:
    """One optimiser step over the accumulated micro-batches (collated dicts); returns the samples seen (all ranks).

    Nothing waits for the device: the loss terms (averaged over the micro-batches) and the gradient norm before
    clipping go to `monitor`, and a step whose loss or gradient norm is not finite is not applied (apply_unless).
    Without a `monitor` the step reads its own record at once and raises NonFiniteLossError for such a step.

    `model` is what runs the forward (step_module's: maybe compiled; under DDP its wrapper, whose gradients are
    synchronised at the last micro-batch only); `pad_to` > 0 pads the captions to that length (step_module's).
    `step` (1-based) names the step in errors. `region(name)` wraps the step ("step") and its parts ("forward",
    "backward", "clip_grad_norm", "optimizer_step", "zero_grad"): the trainer opens none, the step profiler opens
    torch.profiler regions, so both time the same code."""
    own = monitor is None
    monitor = StepMonitor(device) if monitor is None else monitor
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (a no-op without them)
    with region("step"):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        terms: dict[str, Tensor] = {}
        samples = 0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or world_size == 1
            context = contextlib.nullcontext() if sync else model.no_sync()
            ids, mask = (to_device(batch[key], device) for key in ("input_ids", "attention_mask"))
            if pad_to:
                ids, mask = pad_captions(ids, mask, pad_to)
            with context, torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                with region("forward"):
                    out = model(to_device(batch["images"], device), ids, mask, to_device(batch["image_ids"], device))
                with region("backward"):
                    (out["loss"] / len(micro)).backward()
            for k, v in out.items():  # as the host added v.item() / len(micro) in float64
                part = v.detach().float().double() / len(micro)
                terms[k] = terms[k] + part if k in terms else part
            samples += len(batch["images"]) * world_size
        with region("clip_grad_norm"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        found_inf = monitor.record(terms, grad_norm, step)
        with region("optimizer_step"):
            apply_unless(optimizer, found_inf)
        with region("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
    if own:
        monitor.check()
    return samples


# --- what benchmarks/ step on --------------------------------------------------------------------
def synthetic_batch(cfg: BlipConfig, size: int, device: torch.device, generator: torch.Generator) -> dict[str, Tensor]:
    """A collated batch as the trainer's loader gives it: random pixels and random word pieces filling
    max_text_len ([CLS] w ... w [SEP], no padding), every image its own (distinct image ids)."""
    m, ids, tok = cfg.model, special_ids(), load_tokenizer()
    low = max(i for i in tok.all_special_ids if i < min(ids["dec"], ids["enc"])) + 1  # after [PAD] .. [MASK]
    high = min(ids["dec"], ids["enc"])  # bert-base-uncased's word pieces end where [DEC] and [ENC] were added
    words = torch.randint(low, high, (size, m.max_text_len), generator=generator)
    words[:, 0], words[:, -1] = ids["cls"], ids["sep"]
    images = torch.randn(size, 3, m.image_size, m.image_size, generator=generator)
    return {"images": images.to(device), "input_ids": words.to(device),
            "attention_mask": torch.ones_like(words).to(device), "image_ids": torch.arange(size, device=device)}


def with_counted_vocabulary(cfg: BlipConfig) -> BlipConfig:
    """`cfg` with model.vocab_size as the trainer counts it for model.vocabulary = "captions" (the word pieces of
    the training captions under data.root, and the prompt's); `cfg` itself otherwise."""
    if cfg.model.vocabulary != "captions" or cfg.model.vocab_size != VOCAB_SIZE:
        return cfg
    from ..data import build_datasets
    from ..model.vocabulary import training_word_pieces

    train_set = build_datasets(cfg, splits=("train",))["train"]
    return cfg.override({"model.vocab_size": len(training_word_pieces(train_set, cfg.model.prompt))})
