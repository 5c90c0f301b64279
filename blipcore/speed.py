"""Speed choices made on the machine at hand, measured, never assumed from one CPU.

bf16 is the one that matters on CPUs: where the processor multiplies bf16 matrices natively (AMX or
AVX512-BF16, e.g. recent Xeons) a bf16 matmul is several times faster than fp32, a training step
under bf16 autocast runs 1.1-1.6x faster and decoding with a bf16 copy of the weights up to 2.5x;
where it does not (many AMD EPYC and older Intel parts) bf16 is emulated and can be a hundred times
slower. So `precision = "auto"` (training and decoding alike) asks `bf16_speedup()`: one timed
512 x 512 matmul in each precision (milliseconds), once per process. BLIPLAB_CPU_BF16=1 or =0 in the
environment answers for it (the tests set 0, so that they compute the same on every machine).
"""

from __future__ import annotations

import copy
import functools
import os
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")
BF16_ENV = "BLIPLAB_CPU_BF16"

PROBE_SIZE = 512
# bf16 autocast also pays casts and keeps norms and softmax in fp32: it wins a whole step only when the
# matmuls themselves are clearly faster.
BF16_MIN_SPEEDUP = 2.0


# The hardware reference of the benchmarks: an n x n matmul on all threads, n by device type.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@functools.cache
def matmul_gflops(device_type: str = "cpu", size: int = 2048, repeats: int = 3,
                  dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a size x size matmul in `dtype` on all threads (best of `repeats`), once per process: the
    hardware number a run's minutes are read against (run.json's device, docs/results.md)."""
    device = torch.device(device_type)
    generator = torch.Generator(device).manual_seed(0)  # its own: measuring never moves a run's random stream
    a, b = (torch.randn(size, size, device=device, generator=generator).to(dtype) for _ in range(2))

    return 2 * size**3 / _best_time(lambda: torch.mm(a, b), repeats, device) / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a CUDA device runs them asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds one call of `fn` takes, the device's queued work included (the benchmarks' stopwatch)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(contenders: dict[str, Callable[[int], object]], steps: int, warmup: int, device: torch.device,
              after_each: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each contender at each round, called with the round's index, in turn (the order reversed
    every other round) after `warmup` untimed rounds: the benchmarks' way to compare contenders in one process, so
    that a slow spell of the machine falls on all of them. `after_each` is called after every call (a progress bar)."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + steps):
        for name in names if round_ % 2 == 0 else reversed(names):
            seconds = seconds_of(functools.partial(contenders[name], round_), device)
            if after_each is not None:
                after_each()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (e.g. "AMD EPYC 7B13"), or the platform's machine type."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed warm-up (first-call allocation, kernel
    selection)."""
    fn()
    return min(seconds_of(fn, device) for _ in range(repeats))


@functools.cache
def bf16_speedup(device_type: str = "cpu") -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this machine (below 1: slower)."""
    if device_type != "cpu":
        raise ValueError(f"bf16_speedup probes the CPU; got {device_type!r}")
    forced = os.environ.get(BF16_ENV)
    if forced in ("0", "1"):
        return BF16_MIN_SPEEDUP if forced == "1" else 0.0
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))  # the global RNG untouched
    b = a.bfloat16()
    cpu = torch.device("cpu")
    fp32 = _best_time(lambda: a @ a, 3, cpu)
    bf16 = _best_time(lambda: b @ b, 3, cpu)
    return fp32 / bf16


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` ("auto" | "bf16" | "fp32") on `device`, None for plain fp32.

    auto: bf16 on a CUDA device that supports it; on the CPU, bf16 when its matmuls are at least
    BF16_MIN_SPEEDUP times faster than fp32 here (see bf16_speedup)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if bf16_speedup("cpu") >= BF16_MIN_SPEEDUP else None
    return None


_INFERENCE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with its weights in `dtype`, for decoding: no per-call casts, half the bytes read per step.
    Cached per model and rebuilt when any of its parameters changed (training updates them in place)."""
    signature = (dtype, tuple(p._version for p in model.parameters()), next(model.parameters()).device)
    cached = _INFERENCE_COPIES.get(model)
    if cached is None or cached[0] != signature:
        cached = (signature, _cast_copy(model, dtype))
        _INFERENCE_COPIES[model] = cached
    return cached[1]


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy whose floating-point tensors are made in `dtype` directly (deepcopy's memo hands it the cast
    tensors), so no second full-precision copy is ever held; tied weights stay tied, integer buffers exact."""
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        data = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
        memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if isinstance(tensor, nn.Parameter) else data
    return copy.deepcopy(model, memo).eval()


def describe(dtype: torch.dtype | None) -> str:
    """How run.json names the choice."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"
