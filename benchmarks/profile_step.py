"""Where a training step's time goes: a torch.profiler breakdown of one step of the trainer's own code path.

It builds the model and AdamW as the trainer does (BLIP(cfg), blipcore.training.trainer.build_optimizer, the autocast
blipcore.speed.autocast_dtype picks for the preset's train.precision on this machine) and trains on a
synthetic full-length batch: random pixels at the preset's image size, random word pieces filling
max_text_len ([CLS] first, [SEP] last, no padding), `train.grad_accum_steps` micro-batches per step as the
trainer accumulates them. Each step is the trainer's own (blipcore.training.trainer.train_step): forward (the model's
loss dict: ITC, LM, ITM as the preset weighs them), backward, clip_grad_norm_, the loss terms and gradient norm
recorded on the device (StepMonitor), optimizer.step and zero_grad, each part in a torch.profiler.record_function
region that train_step opens through its `region` argument. Inside the forward, regions are opened from the
outside, without touching blipcore's code: forward pre/post hooks on the vision encoder, the text encoder
(its ITC pass) and the decoder (and the momentum encoders when on), and record_function wrappers around
blipcore.model.losses' ITC and LM losses and the model's ITM loss, for as long as the profile runs.

It prints:

1. a region table: milliseconds per step and share of the step for each region; the rows add up to the step
   ("other (forward)" is the forward's time outside its named parts, "other" the step's outside every region:
   the device-side record of the step, the learning-rate update, Python between regions), and the forward FLOPs
   (blipcore.model.flops) and achieved GFLOP/s of the regions that do matrix products;
2. torch's operator table (key_averages), the top --top operators by self CPU time over all profiled steps
   (on CUDA also by self device time);
3. the step's FLOPs (blipcore.model.flops, as benchmarks/bench_vs_hf_blip.py counts them) and its achieved FLOP/s,
   from the median time of as many steps run without the profiler, over blipcore.speed.matmul_gflops() (an
   n x n fp32 matmul on all threads, measured in this process: the hardware ratio), and over a bf16 matmul's
   when the step runs under bf16 autocast.

On CUDA every region synchronizes the device as it opens and closes, so that its host time covers its
kernels; that removes the overlap of launches with execution, so the profiled step is slower than a real one.
Data loading is not part of the step (the batch is made once, on the device).

    python benchmarks/profile_step.py                                    # flickr8k-cpu preset, its batch of 64
    python benchmarks/profile_step.py --preset seed --batch-size 8 --top 30
    python benchmarks/profile_step.py --preset demo --set model.itm_weight=1 --json > profile.json
    python benchmarks/profile_step.py --trace step.json                  # also a Chrome trace (chrome://tracing)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from blipcore import BLIP, BlipConfig, speed
from blipcore.model import layers, losses
from blipcore.model.flops import forward_flops, training_flops
from blipcore.training.step import build_optimizer, synthetic_batch, train_step, with_counted_vocabulary

PREFIX = "blip::"  # every region this script opens is a record_function named blip::<region>

# Regions inside the forward, in table order: (name, label, the blipcore.model.flops forward part it does).
FORWARD_PARTS = (
    ("vision_encoder", "vision encoder (ViT)", "vision"),
    ("text_encoder", "text encoder (ITC)", "itc"),
    ("itc_loss", "ITC loss", None),
    ("itm", "ITM (negatives, multimodal encoder, head, loss)", "itm"),
    ("decoder", "decoder", "decoder"),
    ("lm_head_loss", "LM head + loss", "lm_head"),
    ("momentum_update", "momentum update", None),
    ("momentum_encoder", "momentum encoders", "momentum"),
)
# The step's top-level regions after the forward.
AFTER_FORWARD = (
    ("backward", "backward"),
    ("clip_grad_norm", "clip_grad_norm_"),
    ("optimizer_step", "optimizer.step (AdamW)"),
    ("zero_grad", "zero_grad"),
)


# --- regions -------------------------------------------------------------------------------------
class Regions:
    """record_function regions named blip::<name>: `with regions("name")`, module forward hooks (`hook`) and
    wrapped callables (`wrap`). They open only while `active` (the profiled steps); on CUDA each synchronizes
    the device at both ends, so that its host time covers its kernels."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = False
        self._open: list[record_function | None] = []

    def _enter(self, name: str) -> record_function:
        speed.synchronize(self.device)
        region = record_function(PREFIX + name)
        region.__enter__()
        return region

    def _exit(self, region: record_function) -> None:
        speed.synchronize(self.device)
        region.__exit__(None, None, None)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        region = self._enter(name) if self.active else None
        try:
            yield
        finally:
            if region is not None:
                self._exit(region)

    def hook(self, module: nn.Module, name: str, when: Callable[[tuple, dict], bool] | None = None) -> list[Any]:
        """A region around each forward of `module` (for which `when(args, kwargs)` holds); the hook handles."""

        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            wanted = self.active and (when is None or when(args, kwargs))
            self._open.append(self._enter(name) if wanted else None)

        def post(_module: nn.Module, _args: tuple, _kwargs: dict, _output: Any) -> None:
            if self._open and (region := self._open.pop()) is not None:
                self._exit(region)

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def wrap(self, owner: Any, attribute: str, name: str, stack: contextlib.ExitStack) -> None:
        """Replace owner.attribute (a function of a module, or a method of one object) by a wrapper that runs it
        in a region, until `stack` closes."""
        original = getattr(owner, attribute)
        own = attribute in vars(owner)  # a module's function; otherwise a method found through the class

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)
        if own:
            stack.callback(setattr, owner, attribute, original)
        else:
            stack.callback(delattr, owner, attribute)


def text_only_pass(args: tuple, kwargs: dict) -> bool:
    """Whether a TextEncoder call is the ITC pass (no image_embeds); the multimodal ITM pass is ITM's region."""
    image_embeds = kwargs.get("image_embeds", args[2] if len(args) > 2 else None)
    return image_embeds is None


@contextlib.contextmanager
def instrumented(model: BLIP, regions: Regions) -> Iterator[list[str]]:
    """Open the forward's regions on `model` from the outside (hooks and wrappers, removed on exit); yields
    the names of the forward regions this model runs."""
    m = model.cfg
    active = {
        "vision_encoder": not m.text_only,
        "text_encoder": model.use_itc,
        "itc_loss": model.use_itc,
        "itm": model.use_itm,
        "decoder": model.use_lm,
        "lm_head_loss": model.use_lm,
        "momentum_update": model.use_itc and m.momentum_encoder,
        "momentum_encoder": model.use_itc and m.momentum_encoder,
    }
    handles: list[Any] = []
    with contextlib.ExitStack() as stack:
        if active["vision_encoder"]:
            handles += regions.hook(model.visual_encoder, "vision_encoder")
        if active["text_encoder"]:
            handles += regions.hook(model.text_encoder, "text_encoder", when=text_only_pass)
            regions.wrap(losses, "contrastive_loss", "itc_loss", stack)
            regions.wrap(losses, "momentum_contrastive_loss", "itc_loss", stack)
        if active["itm"]:
            regions.wrap(model, "_itm_loss", "itm", stack)
        if active["decoder"]:
            handles += regions.hook(model.text_decoder, "decoder")
            regions.wrap(losses, "lm_loss", "lm_head_loss", stack)
        if active["momentum_encoder"]:
            regions.wrap(model, "_momentum_update", "momentum_update", stack)
            handles += regions.hook(model.visual_encoder_m, "momentum_encoder")
            handles += regions.hook(model.text_encoder_m, "momentum_encoder")
        try:
            yield [name for name, _, _ in FORWARD_PARTS if active[name]]
        finally:
            for handle in handles:
                handle.remove()


# --- the step --------------------------------------------------------------------------------------
def attention_ab(step: Callable[[], Any], device: torch.device, rounds: int) -> dict[str, float]:
    """The step with blipcore.model.layers' attention rule (on a CPU in bf16 / fp16, torch's math backend over at most
    CPU_MATH_MAX_KEYS keys) against the fused kernel everywhere: median milliseconds of `rounds` alternating pairs
    in this process, and their ratio (> 1: the rule is faster)."""
    rule = layers.CPU_MATH_MAX_KEYS
    times: dict[str, list[float]] = {"rule": [], "fused": []}
    try:
        for _ in range(rounds):
            for name, keys in (("rule", rule), ("fused", 0)):
                layers.CPU_MATH_MAX_KEYS = keys
                times[name].append(speed.seconds_of(step, device))
    finally:
        layers.CPU_MATH_MAX_KEYS = rule
    medians = {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}
    return {**medians, "fused_over_rule": medians["fused_ms"] / medians["rule_ms"]}


# --- measuring -------------------------------------------------------------------------------------
def region_times(prof: profile) -> tuple[dict[str, float], dict[str, int]]:
    """Host microseconds and calls of each blip:: region over the profile (summed over its occurrences)."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.name.startswith(PREFIX) and event.device_type == DeviceType.CPU:
            name = event.name.removeprefix(PREFIX)
            totals[name] += event.time_range.elapsed_us()
            calls[name] += 1
    return totals, calls


def operator_rows(prof: profile, steps: int, step_ms: float, top: int, by_shape: bool) -> list[dict[str, Any]]:
    """torch's operators (our regions left out) by self CPU time: per step, and self time's share of the step."""
    averages = [e for e in prof.key_averages(group_by_input_shape=by_shape) if not e.key.startswith(PREFIX)]
    averages.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = []
    for e in averages[:top]:
        row = {"name": e.key, "calls": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps,
               "cpu_total_ms": e.cpu_time_total / 1e3 / steps}
        row["self_share"] = row["self_cpu_ms"] / step_ms
        if by_shape:
            row["input_shapes"] = str(e.input_shapes)
        if e.self_device_time_total:
            row["self_device_ms"] = e.self_device_time_total / 1e3 / steps
        rows.append(row)
    return rows


def profile_step(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run the measurement; the report (a JSON-able dict) and torch's operator table(s) as text."""
    device = torch.device(args.device)
    cfg = BlipConfig.preset(args.preset)
    if args.set:
        cfg = cfg.override_strings(args.set)
    if args.data_root:
        cfg = cfg.override({"data.root": args.data_root})
    cfg = with_counted_vocabulary(cfg)  # a "captions" vocabulary counted as the trainer does
    size = args.batch_size or cfg.train.batch_size
    dtype = speed.autocast_dtype(device, cfg.train.precision)  # the trainer's choice on this machine
    torch.manual_seed(cfg.train.seed)
    model = BLIP(cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    micro = [synthetic_batch(cfg, size, device, generator) for _ in range(cfg.train.grad_accum_steps)]
    regions = Regions(device)
    # the trainer's own step (blipcore.training.trainer.train_step) at the preset's peak learning rate, its parts in
    # regions
    step = functools.partial(train_step, model, optimizer, micro, lr=cfg.train.lr, grad_clip=cfg.train.grad_clip,
                             device=device, autocast=dtype, step=1, region=regions)

    matmul_dtypes = [torch.float32] + [dtype] * (dtype not in (None, torch.float32))
    matmul = {str(d).removeprefix("torch."): speed.matmul_gflops(device.type, speed.MATMUL_SIZE[device.type], dtype=d)
              for d in matmul_dtypes}

    with instrumented(model, regions) as forward_names:
        for _ in range(args.warmup):
            step()
        plain = [speed.seconds_of(step, device) for _ in range(args.steps)]  # no profiler: the real step time
        attention = attention_ab(step, device, args.attention_ab) if args.attention_ab else None
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
        regions.active = True
        try:
            with profile(activities=activities, record_shapes=args.record_shapes) as prof:
                for _ in range(args.steps):
                    step()
                speed.synchronize(device)
        finally:
            regions.active = False
    if args.trace:
        prof.export_chrome_trace(args.trace)

    totals, calls = region_times(prof)
    per_step = {name: us / 1e3 / args.steps for name, us in totals.items()}
    step_ms = per_step["step"]
    text_len, accum = cfg.model.max_text_len, cfg.train.grad_accum_steps
    forward_parts = {k: v * accum for k, v in forward_flops(cfg, size, text_len).items()}
    step_flops = sum(training_flops(cfg, size, text_len).values()) * accum

    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, label: str, ms: float, flops: float | None = None) -> None:
        rows[name] = {"label": label, "ms": ms, "share": ms / step_ms, "calls": calls.get(name, 0) / args.steps}
        if flops:
            rows[name] |= {"gflop": flops / 1e9, "gflops_per_s": flops / 1e9 / (ms / 1e3) if ms > 0 else None}

    for name, label, part in FORWARD_PARTS:
        if name in forward_names:
            row(name, label, per_step.get(name, 0.0), forward_parts.get(part) if part else None)
    forward_ms = per_step["forward"]
    row("forward_other", "other (forward)", forward_ms - sum(rows[name]["ms"] for name in forward_names))
    for name, label in AFTER_FORWARD:
        row(name, label, per_step.get(name, 0.0), step_flops - sum(forward_parts.values()) if name == "backward"
            else None)
    row("other", "other (outside the regions)", step_ms - sum(r["ms"] for r in rows.values()))

    unprofiled_s = statistics.median(plain)
    step_dtype = str(dtype or torch.float32).removeprefix("torch.")
    m = cfg.model
    report: dict[str, Any] = {
        "machine": {"cpu": speed.cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": device.type,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "settings": {"preset": cfg.name, "set": list(args.set or []), "batch_size": size, "grad_accum_steps": accum,
                     "steps": args.steps, "warmup": args.warmup, "precision": speed.describe(dtype),
                     "attention_ab": args.attention_ab,
                     "record_shapes": args.record_shapes},
        "model": {key: getattr(m, key) for key in (
            "image_size", "patch_size", "vision_width", "vision_depth", "text_width", "text_encoder_depth",
            "text_decoder_depth", "max_text_len", "itc_weight", "lm_weight", "itm_weight", "momentum_encoder")}
        | {"parameters": model.num_parameters()},
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "unprofiled_step_ms": unprofiled_s * 1e3,
        "unprofiled_rounds_ms": [t * 1e3 for t in plain],
        "attention_ab": attention,
        "regions": rows,
        "operators": operator_rows(prof, args.steps, step_ms, args.top, args.record_shapes),
        "flops": {
            "step_gflop": step_flops / 1e9,
            "forward_gflop": {k: v / 1e9 for k, v in forward_parts.items()},
            "gflops_per_s": step_flops / unprofiled_s / 1e9,
            "profiled_gflops_per_s": step_flops / (step_ms / 1e3) / 1e9,
            "matmul_n": speed.MATMUL_SIZE[device.type],
            "matmul_gflops": matmul,
            "hardware_ratio": step_flops / unprofiled_s / 1e9 / matmul["float32"],
            "step_dtype": step_dtype,
            "hardware_ratio_step_dtype": step_flops / unprofiled_s / 1e9 / matmul[step_dtype],
        },
    }
    table_kw = {"row_limit": args.top, "max_name_column_width": 60}
    averages = prof.key_averages(group_by_input_shape=args.record_shapes)
    text = (f"top {args.top} operators by self CPU time (torch.profiler, all {args.steps} profiled steps)\n"
            + averages.table(sort_by="self_cpu_time_total", **table_kw))
    if device.type == "cuda":
        text += (f"\ntop {args.top} operators by self device time\n"
                 + averages.table(sort_by="self_device_time_total", **table_kw))
    return report, text


# --- output --------------------------------------------------------------------------------------
def print_report(report: dict[str, Any], operators: str) -> None:
    mach, s, m, f = report["machine"], report["settings"], report["model"], report["flops"]
    print(f"{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']}, "
          f"{mach['gpu'] or 'cpu'}")
    losses_on = " + ".join(f"{k.removesuffix('_weight').upper()} {m[k]:g}"
                           for k in ("itc_weight", "lm_weight", "itm_weight") if m[k])
    print(f"{s['preset']}{' ' + ' '.join(s['set']) if s['set'] else ''}: ViT {m['image_size']}/{m['patch_size']} "
          f"width {m['vision_width']} x {m['vision_depth']}, text width {m['text_width']}, encoder "
          f"{m['text_encoder_depth']}, decoder {m['text_decoder_depth']}, {m['max_text_len']} tokens; {losses_on}"
          f"{', momentum encoder' if m['momentum_encoder'] else ''}; {m['parameters'] / 1e6:.1f} M parameters")
    accum = f" x {s['grad_accum_steps']} accumulated" if s["grad_accum_steps"] > 1 else ""
    print(f"batch {s['batch_size']}{accum}, {s['precision']}; {s['steps']} profiled steps after {s['warmup']} "
          f"warm-up: {report['step_ms']:.1f} ms per step profiled, {report['unprofiled_step_ms']:.1f} ms without "
          f"the profiler (median of {s['steps']})\n")
    print(f"{'region':50s} {'ms/step':>9s} {'share':>7s} {'fwd GFLOP':>10s} {'GFLOP/s':>8s}")

    def line(label: str, r: dict[str, Any]) -> None:
        rate = f"{r['gflops_per_s']:8.0f}" if r.get("gflops_per_s") else ""
        gflop = f"{r['gflop']:10.2f}" if "gflop" in r else " " * 10
        print(f"{label:50s} {r['ms']:9.2f} {r['share']:7.1%} {gflop} {rate}")

    regions = report["regions"]
    line("forward", {"ms": report["forward_ms"], "share": report["forward_ms"] / report["step_ms"]})
    after = {name for name, _ in AFTER_FORWARD} | {"other"}
    for name, r in regions.items():
        line(("  " if name not in after else "") + r["label"], r)
    line("step", {"ms": report["step_ms"], "share": 1.0})
    print("(backward's GFLOP: the step's FLOPs less the forward's. On a CPU (and on a GPU outside autocast) the LM "
          "head's gradients are computed in its forward, fused with the loss "
          "(blipcore.model.losses.linear_cross_entropy): that region then holds three of its matmuls, and backward's "
          "GFLOP/s reads high)\n")
    refs = ", ".join(f"{d} {g:.0f}" for d, g in f["matmul_gflops"].items())
    dtype_note = (f"; {f['hardware_ratio_step_dtype']:.0%} of the {f['step_dtype']} matmul's"
                  if f["step_dtype"] != "float32" else "")
    print(f"FLOPs (blipcore.model.flops): {f['step_gflop']:.2f} GFLOP per step; {f['gflops_per_s']:.0f} GFLOP/s "
          f"without the profiler ({f['profiled_gflops_per_s']:.0f} profiled) = {f['hardware_ratio']:.0%} of the fp32 "
          f"matmul's GFLOP/s{dtype_note} ({f['matmul_n']}^2 matmul GFLOP/s in this process: {refs})\n")
    if ab := report["attention_ab"]:
        print(f"attention as blipcore.model.layers runs it: {ab['rule_ms']:.1f} ms a step; the fused kernel "
              f"everywhere: {ab['fused_ms']:.1f} ms ({ab['fused_over_rule']:.2f}x; medians of {s['attention_ab']} "
              "alternating pairs)\n")
    print(operators)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="flickr8k-cpu",
                        help="a preset name (blipcore/presets/) or a .toml path (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="samples per micro-batch (default: the preset's train.batch_size)")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                        help="override a config field, as `python -m train fit --set` (repeatable), e.g. "
                             "--set model.itm_weight=1 --set train.precision=fp32")
    parser.add_argument("--data-root", metavar="DIR",
                        help="the preset's dataset folder, read only to count a 'captions' vocabulary's word pieces "
                             "as the trainer does (or give their number: --set model.vocab_size=N)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, also timed without the profiler "
                        "(default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (default %(default)s)")
    parser.add_argument("--attention-ab", type=int, default=0, metavar="ROUNDS",
                        help="also time ROUNDS alternating pairs of steps: attention as blipcore.model.layers runs it "
                             "(the math backend for short sequences on a CPU in bf16) against the fused kernel "
                             "everywhere, and print their ratio")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="operator rows (default %(default)s)")
    parser.add_argument("--record-shapes", action="store_true",
                        help="record input shapes and split the operator table by them (more profiler overhead)")
    parser.add_argument("--trace", metavar="FILE", help="also write a Chrome trace of the profiled steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.top < 1 or args.attention_ab < 0 or (
            args.batch_size is not None and args.batch_size < 1):
        parser.error("--steps, --top and --batch-size must be at least 1, --warmup and --attention-ab at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    try:
        report, operators = profile_step(args)
    except (ValueError, FileNotFoundError) as err:  # an unknown preset, a bad --set, no dataset to count words in
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, operators)
    return 0


if __name__ == "__main__":
    sys.exit(main())
