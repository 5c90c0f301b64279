"""The speed report: BLIP Lab's model against transformers' BlipForConditionalGeneration of the same size.

Both models are built from random weights (nothing is downloaded) with the same widths, depths, heads,
image size and vocabulary. For each size (`--presets`, default demo,seed) it measures:

- training samples/s of a step (ours: the trainer's own, blipcore.training.step.train_step; HF's: the same
  autocast, clipping and AdamW) on the LM loss alone, ours against HF's (its captioning model has only LM), and of
  our full BLIP step (ITC + LM, ITC + LM + ITM) with no peer; on full-length synthetic captions, and on real COCO
  captions (--captions: by default coco-mini's, in blipcore.paths.SHARED_DATA_DIR, else the repository's
  tests/fixtures/coco-cc-by), a fresh batch each step, padded to its longest as the trainer's collator pads; with
  --compile, ours and HF also under torch.compile as the trainer compiles (CUDA graphs on CUDA), on the same
  captions padded to max_text_len;
- greedy and beam-3 latency of 8 images x 20 new tokens (min = max, so both generate exactly 20), ours
  through blipcore.evaluation.decoding.generate (what evaluation and the dashboard call, per-step entropies and
  log-probabilities included) against HF's generate;
- peak memory of each model, decoding and then training, each model in a child process of its own;
- the training step's achieved FLOP/s (counted by blipcore.model.flops on the unpadded captions) over the FLOP/s of
  a 2048 x 2048 matmul on all threads in the step's precision (on CUDA 8192 x 8192 bf16: MFU against the measured
  peak), and on CUDA over the GPU's data-sheet bf16 peak (SPEC_BF16_TFLOPS);
- with --parts trainer, the trainer's real step end to end (`python -m train fit` of each --trainer PRESET[:BATCH],
  data loading included): samples/s and steps/s from its log, and its FLOP/s against the same references.

Precision is the project's own choice on the machine at hand (blipcore.speed.autocast_dtype, "auto"):
bf16 autocast for training where this CPU's bf16 matmuls win (and on CUDA), and generate()'s bf16 copy of
the weights for decoding; HF runs under autocast of the same dtype, training and decoding.

The contenders of a measurement run in turn, step by step, in one process (the order reversed every
round), so background load falls on them in the same rounds. Ratios are HF / ours (above 1: ours faster or
smaller), of medians; every round's time is in the JSON (`rounds_s`) to show the noise.

    python benchmarks/bench_vs_hf_blip.py                            # table: demo (batch 32), seed (batch 8)
    python benchmarks/bench_vs_hf_blip.py --json > speed.json        # the same, as one JSON object
    python benchmarks/bench_vs_hf_blip.py --presets vit-b16 --parts training --compile --device cuda  # ViT-B/16
    python benchmarks/bench_vs_hf_blip.py --presets seed --compile  # + ours and HF under torch.compile
    python benchmarks/bench_vs_hf_blip.py --presets "" --parts trainer --trainer flickr8k:64 \
        --trainer-set model.image_size=128 --trainer-data data/flickr8k-128 --device cuda   # the trainer, end to end
    python benchmarks/bench_vs_hf_blip.py --presets tiny --steps 2 --warmup 1 --new-tokens 4   # seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

import blipcore._torchvision  # noqa: F401 - HF's BLIP imports torchvision, which needs the CPU shim
from blipcore import BLIP, BlipConfig, speed
from blipcore.evaluation.decoding import DecodingConfig, encode_for_decoding, generate
from blipcore.model.flops import unpadded_training_flops
from blipcore.model.tokenizer import load_tokenizer, special_ids, tokenize_captions
from blipcore.paths import COCO_CC_BY_FIXTURE, SHARED_DATA_DIR
from blipcore.runs.rundir import RunDir
from blipcore.training.step import StepMonitor, compile_mode, pad_captions, step_module, train_step
from blipcore.training.trainer import build_optimizer

# size -> (the preset it starts from, model fields changed, default batch size)
SIZES: dict[str, tuple[str, dict[str, Any], int]] = {
    "demo": ("demo", {}, 32),
    "seed": ("seed", {}, 8),
    "vit-b16": ("seed", {"vision_width": 768, "vision_depth": 12, "vision_heads": 12, "text_width": 768,
                         "text_encoder_depth": 12, "text_decoder_depth": 12, "text_heads": 12}, 64),
    "tiny": ("demo", {"image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 1, "vision_heads": 2,
                      "text_width": 64, "text_encoder_depth": 1, "text_decoder_depth": 1, "text_heads": 2,
                      "max_text_len": 16, "embed_dim": 32}, 4),
}
# Our models: the LM-only head-to-head with HF, and the full BLIP steps tracked without a peer.
VARIANTS: dict[str, dict[str, float]] = {
    "ours_lm": {"model.itc_weight": 0.0, "model.lm_weight": 1.0, "model.itm_weight": 0.0},
    "ours_itc_lm": {"model.itc_weight": 1.0, "model.lm_weight": 1.0, "model.itm_weight": 0.0},
    "ours_itc_lm_itm": {"model.itc_weight": 1.0, "model.lm_weight": 1.0, "model.itm_weight": 1.0},
}
# With --compile: ours_lm under torch.compile as the trainer compiles it (blipcore.training.step.step_module), and HF
# under the same torch.compile mode; both read their captions padded to max_text_len (static shapes).
COMPILED = {"ours_lm": "ours_lm_compiled", "hf_lm": "hf_lm_compiled"}
PARTS = ("training", "decoding", "memory", "trainer")
# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (without sparsity), by a word of the name
# torch.cuda.get_device_name gives, most specific first: the "spec peak" beside the measured matmul rate.
SPEC_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
CAPTION = "two small red circles to the left of a large blue square on a gray background"
# coco-mini's 3,041 training captions where the shared data is, else the fixture's 320 (fewer fresh batches)
SHARED_CAPTIONS = SHARED_DATA_DIR / "coco-mini/annotations/captions_train.json"
FIXTURE_CAPTIONS = COCO_CC_BY_FIXTURE / "annotations/captions_train.json"
BEAMS = 3


# --- setup ---------------------------------------------------------------------------------------
def size_config(name: str) -> BlipConfig:
    """The BlipConfig of a size of SIZES."""
    base, fields, _ = SIZES[name]
    return BlipConfig.preset(base).override({f"model.{key}": value for key, value in fields.items()})


def hf_peer(cfg: BlipConfig) -> nn.Module:
    """transformers' BlipForConditionalGeneration with our widths, depths, heads, image size and vocabulary."""
    from transformers import BlipConfig as HFBlipConfig
    from transformers import BlipForConditionalGeneration

    m = cfg.model
    vision = {"hidden_size": m.vision_width, "intermediate_size": int(m.vision_width * m.mlp_ratio),
              "num_hidden_layers": m.vision_depth, "num_attention_heads": m.vision_heads,
              "image_size": m.image_size, "patch_size": m.patch_size}
    text = {"vocab_size": m.vocab_size, "hidden_size": m.text_width,
            "intermediate_size": int(m.text_width * m.mlp_ratio),
            "num_hidden_layers": m.text_decoder_depth, "num_attention_heads": m.text_heads,
            "max_position_embeddings": m.max_text_len, "encoder_hidden_size": m.vision_width,
            "bos_token_id": special_ids()["dec"], "sep_token_id": special_ids()["sep"], "pad_token_id": 0}
    return BlipForConditionalGeneration(HFBlipConfig(text_config=text, vision_config=vision))


@dataclass(frozen=True)
class Precision:
    """The project's precision on this machine: training's autocast dtype (as the trainer decides) and
    decoding's weights (as generate() decides); None is fp32."""

    train: torch.dtype | None
    decode: torch.dtype | None

    @classmethod
    def of(cls, cfg: BlipConfig, device: torch.device) -> Precision:
        return cls(speed.autocast_dtype(device, cfg.train.precision),
                   speed.autocast_dtype(device, DecodingConfig().precision))

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype of the hardware reference: the training step's."""
        return self.train or torch.float32

    def to_dict(self) -> dict[str, str]:
        return {"training": speed.describe(self.train), "decoding": speed.describe(self.decode),
                "matmul_reference": str(self.matmul_dtype).removeprefix("torch.")}


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype`, or nothing for None, as the trainer does."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@dataclass
class Batch:
    """One training batch in both models' form: ours reads [CLS] caption [SEP]; HF reads our decoder's
    [DEC] prompt caption with its labels, so both models see the same tokens and targets."""

    images: Tensor
    ids: Tensor
    mask: Tensor
    hf_ids: Tensor
    hf_mask: Tensor
    hf_labels: Tensor

    @classmethod
    def of(cls, model: BLIP, images: Tensor, captions: list[str]) -> Batch:
        tokens = tokenize_captions(captions, model.cfg.max_text_len)
        ids, mask = tokens["input_ids"].to(images.device), tokens["attention_mask"].to(images.device)
        dec = model.decoder_batch(ids, mask)
        return cls(images, ids, mask, dec.input_ids, (dec.input_ids != special_ids()["pad"]).long(), dec.labels)

    @property
    def lm_targets(self) -> int:
        return int((self.hf_labels[:, 1:] != -100).sum())

    @property
    def micro(self) -> dict[str, Tensor]:
        """Our model's side of the batch as the trainer's collator gives it, every image its own."""
        return {"images": self.images, "input_ids": self.ids, "attention_mask": self.mask,
                "image_ids": torch.arange(len(self.ids), device=self.ids.device)}

    def padded(self, length: int) -> Batch:
        """The same captions padded to `length` tokens on both sides (the compiled contenders' static shapes)."""
        ids, mask = pad_captions(self.ids, self.mask, length)
        hf_ids, hf_mask = pad_captions(self.hf_ids, self.hf_mask, length)
        labels = torch.nn.functional.pad(self.hf_labels, (0, length - self.hf_labels.shape[1]), value=-100)
        return Batch(self.images, ids, mask, hf_ids, hf_mask, labels)

    def flops(self, cfg: BlipConfig) -> int:
        """FLOPs of one training step of a model with `cfg` on this batch, counted on the unpadded captions
        (blipcore.model.flops.unpadded_training_flops): padding is work that does nothing."""
        return unpadded_training_flops(cfg, self.mask.sum(dim=1).tolist())


def default_captions() -> Path:
    """The COCO caption file of the 'realistic' set: coco-mini's where the shared data is, else the fixture's."""
    return SHARED_CAPTIONS if SHARED_CAPTIONS.is_file() else FIXTURE_CAPTIONS


def caption_sets(cfg: BlipConfig, batch: int, count: int, path: Path) -> dict[str, list[list[str]] | str]:
    """Caption batches per set: 'full_length' (one batch, every caption max_text_len tokens long) and
    'realistic' (up to `count` batches of the real captions of the COCO caption file `path`, in shuffled order
    as an epoch draws them), or why not."""
    full = (CAPTION + " ") * (cfg.model.max_text_len // 8 + 1)  # more word pieces than max_text_len: cut there
    sets: dict[str, list[list[str]] | str] = {"full_length": [[full] * batch]}
    if not path.is_file():
        sets["realistic"] = f"skipped: {path} not found"
        return sets
    captions = [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    if len(captions) < batch:
        sets["realistic"] = f"skipped: {path} holds {len(captions)} captions, fewer than a batch of {batch}"
        return sets
    random.Random(0).shuffle(captions)
    sets["realistic"] = [captions[i * batch:(i + 1) * batch] for i in range(min(count, len(captions) // batch))]
    return sets


# --- timing --------------------------------------------------------------------------------------
# n x n matmuls per call of the hardware reference: a call long enough to time. One GPU matmul at n = 8192 takes
# milliseconds; one CPU matmul at n = 2048 takes a third of a second on 2 cores, and more only lengthens the run.
MATMUL_REPS = {"cpu": 1, "cuda": 5}


def matmul_reference(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[int], object], int]:
    """The hardware reference: a contender doing MATMUL_REPS n x n matmuls on all threads (n = MATMUL_SIZE),
    and the FLOPs of one call."""
    n, reps = speed.MATMUL_SIZE[device.type], MATMUL_REPS[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def run(_round: int) -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return run, 2 * n**3 * reps


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the hardware reference on its own, median of 10 calls."""
    run, flops = matmul_reference(device, dtype)
    return flops / statistics.median(speed.alternate({"matmul": run}, 10, 2, device)["matmul"])


# --- what is measured ----------------------------------------------------------------------------
GRAD_CLIP = 1.0  # both models' steps clip as the trainer does (every preset's train.grad_clip)


def ours_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, precision: Precision,
              monitor: StepMonitor) -> None:
    """The trainer's own step (blipcore.training.step.train_step): the model's loss dict under the trainer's
    autocast, backward, clipping, fused AdamW, the loss terms and gradient norm recorded on the device (`monitor`,
    never read here: nothing waits for the device)."""
    train_step(model, optimizer, [batch.micro], lr=optimizer.param_groups[0]["lr"], grad_clip=GRAD_CLIP,
               device=batch.images.device, autocast=precision.train, step=1, monitor=monitor)


def hf_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, precision: Precision,
            monitor: StepMonitor) -> None:
    """HF's step, as ours: its loss under the same autocast, backward, the same clipping and AdamW."""
    if batch.images.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    model.train()
    with autocast(batch.images.device, precision.train):
        loss = model(pixel_values=batch.images, input_ids=batch.hf_ids, attention_mask=batch.hf_mask,
                     labels=batch.hf_labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_decode(model: BLIP, images: Tensor, beams: int, new_tokens: int, precision: Precision) -> int:
    """Caption `images` with generate()'s greedy or beam preset (in its own precision, `precision.decode`),
    exactly `new_tokens` each; returns the shortest caption's length."""
    captions = generate(model, images, "greedy" if beams == 1 else "beam", max_length=new_tokens,
                        min_length=new_tokens, use_prompt=False)
    return min(len(caption.tokens) for caption in captions)


def ours_image_encoding(model: BLIP, images: Tensor) -> None:
    """The ViT forward that every caption starts from, generate()'s own
    (blipcore.evaluation.decoding.encode_for_decoding, same weights and precision): the part of decoding both models
    do alike, which bounds how far a faster decoding loop can go."""
    with torch.inference_mode():
        encode_for_decoding(model, images)


def hf_decode(model: nn.Module, images: Tensor, beams: int, new_tokens: int, precision: Precision) -> int:
    with torch.no_grad(), autocast(images.device, precision.decode):
        out = model.generate(pixel_values=images, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, num_beams=beams)
    return out.shape[1] - 1  # without [DEC]


def seconds_summary(times: list[float], batch: int, flops: float, matmul_rate: float,
                    spec_peak: float | None = None) -> dict[str, Any]:
    """A contender's median step and what it did: samples/s, its FLOPs (unpadded) and their rate, over the matmul
    reference measured beside it (`hardware_ratio`, MFU) and, on a GPU of SPEC_BF16_TFLOPS, over its data sheet's
    bf16 peak (`spec_ratio`)."""
    step = statistics.median(times)
    summary = {"step_s": step, "samples_per_s": batch / step, "gflop": flops / 1e9,
               "gflops_per_s": flops / step / 1e9, "hardware_ratio": flops / step / matmul_rate, "rounds_s": times}
    if spec_peak:
        summary["spec_ratio"] = flops / step / (spec_peak * 1e12)
    return summary


def measure_training(
    models: dict[str, nn.Module], cfgs: dict[str, BlipConfig], batches: list[Batch], precision: Precision,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Our three variants, HF (cfgs["hf_lm"] is ours_lm's: its step does the same useful work), the compiled
    contenders (on the same captions padded to max_text_len) and the matmul reference, alternating step by step;
    round i trains on batches[i % len(batches)]."""
    device = batches[0].images.device
    optimizers = {name: build_optimizer(model, cfgs[name].train) for name, model in models.items()}
    monitors = {name: StepMonitor(device) for name in models}
    matmul, matmul_flops = matmul_reference(device, precision.matmul_dtype)
    padded = [batch.padded(cfgs["ours_lm"].model.max_text_len) for batch in batches]

    def contender(name: str) -> Callable[[int], object]:
        step = hf_step if name.startswith("hf_") else ours_step
        source = padded if name in COMPILED.values() else batches
        return lambda round_: step(models[name], optimizers[name], source[round_ % len(source)], precision,
                                   monitors[name])

    for model in models.values():
        model.train()
    contenders = {name: contender(name) for name in models} | {"matmul": matmul}
    times = speed.alternate(contenders, args.steps, args.warmup, device)
    timed_batches = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
    size = len(batches[0].ids)
    report: dict[str, Any] = {
        "text_len": statistics.mean(b.ids.shape[1] for b in timed_batches),
        "real_tokens": statistics.mean(float(b.mask.sum()) / size for b in timed_batches),
        "lm_targets": statistics.mean(b.lm_targets for b in timed_batches),
        "matmul_gflops": matmul_flops / statistics.median(times["matmul"]) / 1e9,
    }
    spec = spec_peak(device)
    for name in models:
        flops = statistics.mean(b.flops(cfgs[name]) for b in timed_batches)
        report[name] = seconds_summary(times[name], size, flops, report["matmul_gflops"] * 1e9,
                                       spec["bf16_tflops"] if spec else None)
    report["ratio"] = report["hf_lm"]["step_s"] / report["ours_lm"]["step_s"]
    for eager, compiled in COMPILED.items():  # each model's eager step over its compiled one
        if compiled in report:
            speedup = report[eager]["step_s"] / report[compiled]["step_s"]
            report["compile_speedup" if eager == "ours_lm" else "hf_compile_speedup"] = speedup
    if all(compiled in report for compiled in COMPILED.values()):  # HF / ours, both compiled
        report["compiled_ratio"] = report["hf_lm_compiled"]["step_s"] / report["ours_lm_compiled"]["step_s"]
    return report


def measure_decoding(
    ours: BLIP, hf: nn.Module, images: Tensor, precision: Precision, args: argparse.Namespace
) -> dict[str, Any]:
    """Greedy and beam-3, ours and HF, and our image encoding alone, alternating; each decoder must generate
    exactly new_tokens per image. `ceiling` = HF's time over our image encoding's: the ratio ours would reach
    if everything after the ViT cost nothing."""
    n = args.new_tokens

    def contender(decode: Callable[..., int], model: nn.Module, beams: int) -> Callable[[int], int]:
        return lambda _round: decode(model, images, beams, n, precision)

    sides = (("ours", ours_decode, ours), ("hf", hf_decode, hf))
    contenders = {f"{who}_{beams}": contender(decode, model, beams)
                  for beams in (1, BEAMS) for who, decode, model in sides}
    hf.eval()
    for name, decode in contenders.items():
        if (length := decode(0)) != n:
            raise RuntimeError(f"{name} generated {length} tokens, not {n}")
    contenders["image_encoding"] = lambda _round: ours_image_encoding(ours, images)
    times = speed.alternate(contenders, args.steps, args.warmup, images.device)
    image_s = statistics.median(times["image_encoding"])
    report: dict[str, Any] = {"images": len(images), "new_tokens": n, "image_encoding_s": image_s}
    for label, beams in (("greedy", 1), (f"beam{BEAMS}", BEAMS)):
        ours_rounds, hf_rounds = times[f"ours_{beams}"], times[f"hf_{beams}"]
        ours_s, hf_s = statistics.median(ours_rounds), statistics.median(hf_rounds)
        report[label] = {"ours_s": ours_s, "hf_s": hf_s, "ratio": hf_s / ours_s, "ceiling": hf_s / image_s,
                         "ours_rounds_s": ours_rounds, "hf_rounds_s": hf_rounds}
    return report


# --- memory, in child processes -------------------------------------------------------------------
def peak_mib(device: torch.device) -> float:
    """Peak memory of the current window (MiB): CUDA allocations, or the process's peak RSS. On Linux that is
    VmHWM: getrusage's ru_maxrss would also count the RSS of the parent this process was forked from."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file() and (hwm := re.search(r"VmHWM:\s+(\d+) kB", status.read_text())):
        return int(hwm.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def new_peak_window(device: torch.device) -> float:
    """Start measuring the peak afresh from the memory in use now, and return that (MiB). On Linux, writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS; elsewhere the window keeps the older peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return peak_mib(device)


def child(args: argparse.Namespace) -> None:
    """--child ours|hf: one model decodes (greedy, beam), then trains 2 steps on the saved inputs; prints each
    phase's peak memory above the baseline (after imports and inputs, before the model) as one JSON line."""
    device = torch.device(args.device)
    inputs = torch.load(args.inputs, map_location=device)
    batch, images = Batch(**inputs["batch"]), inputs["decode_images"]
    cfg = size_config(args.presets)
    precision = Precision.of(cfg, device)  # the parent's choice: it sets blipcore.speed's answer for the CPU
    special_ids()  # loads the tokenizer, which both models' construction reads, before the baseline
    baseline = new_peak_window(device)
    torch.manual_seed(0)
    if args.child == "ours":
        model: nn.Module = BLIP(cfg.override(VARIANTS["ours_lm"])).to(device)
        decode, step = ours_decode, ours_step
    else:
        model, decode, step = hf_peer(cfg).to(device).eval(), hf_decode, hf_step
    for beams in (1, BEAMS):
        decode(model, images, beams, args.new_tokens, precision)
    decode_mib = peak_mib(device) - baseline
    new_peak_window(device)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    monitor = StepMonitor(device)
    for _ in range(2):  # the second step holds AdamW's state as well
        step(model, optimizer, batch, precision, monitor)
    print(json.dumps({"decode_mib": decode_mib, "train_mib": peak_mib(device) - baseline}))


def measure_memory(
    name: str, batch: Batch, images: Tensor, precision: Precision, args: argparse.Namespace
) -> dict[str, Any]:
    """Peak memory of ours (LM) and HF, each in a fresh process running this script with --child, told this
    process's CPU bf16 answer so that it decides the same precision."""
    report: dict[str, Any] = {"kind": "cuda max allocated" if images.device.type == "cuda" else "max RSS",
                              "train_captions": "full_length"}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "inputs.pt"
        torch.save({"batch": vars(batch), "decode_images": images}, path)
        env = os.environ | {speed.BF16_ENV: "1" if torch.bfloat16 in (precision.train, precision.decode) else "0"}
        for who in ("ours", "hf"):
            command = [sys.executable, __file__, "--child", who, "--inputs", str(path), "--presets", name,
                       "--new-tokens", str(args.new_tokens), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"memory child {who} failed:\n{done.stderr[-3000:]}")
            report["ours_lm" if who == "ours" else "hf_lm"] = json.loads(done.stdout.strip().splitlines()[-1])
    for phase in ("decode_mib", "train_mib"):
        report[f"ratio_{phase.removesuffix('_mib')}"] = report["hf_lm"][phase] / report["ours_lm"][phase]
    return report


# --- the trainer's real step, end to end ---------------------------------------------------------------
def trainer_fit(preset: str, batch: str, args: argparse.Namespace, run: Path) -> int:
    """`python -m train fit` of one --trainer entry into `run` for --trainer-steps steps (evaluation cut to the
    validation losses and retrieval on 64 images), stopped by SIGINT after --trainer-seconds, as Ctrl-C stops it:
    it saves and exits. Returns the exit status."""
    settings = [f"train.max_steps={args.trainer_steps}", "train.log_every=10", "train.eval_strategies=",
                "data.eval_images=64", "train.save_state_every=0", *([f"train.batch_size={batch}"] * bool(batch)),
                *args.trainer_set]
    command = [sys.executable, "-m", "train", "fit", "--preset", preset, "--run-dir", str(run), "--device",
               args.device, "--no-progress", *(f"--set={setting}" for setting in settings)]
    if args.trainer_data:
        command += ["--data-root", str(args.trainer_data)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as fit:
        try:
            _, err = fit.communicate(timeout=args.trainer_seconds)
        except subprocess.TimeoutExpired:
            fit.send_signal(signal.SIGINT)
            _, err = fit.communicate()
    if fit.returncode not in (0, 130):
        raise RuntimeError(f"{' '.join(command)} failed ({fit.returncode}):\n{err[-3000:]}")
    return fit.returncode


def caption_lengths(cfg: BlipConfig) -> list[int]:
    """Token lengths ([CLS] caption [SEP], unpadded) of every training caption of a COCO-format dataset."""
    path = Path(cfg.data.root) / cfg.data.train_annotations
    captions = [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    return [min(len(ids), cfg.model.max_text_len) for ids in load_tokenizer()(captions).input_ids]


def trainer_row(run: RunDir, status: int, matmul_gflops: float, spec: dict[str, Any] | None) -> dict[str, Any]:
    """What a trained run's log says of its speed: samples/s as the median of the logged windows of its second
    half (the first windows hold the compilation), steps/s, and its FLOP/s counted on the unpadded training
    captions (their mean per sample) over the matmul reference `matmul_gflops` and the spec peak."""
    cfg, info = run.config(), run.read_info()
    lines = [line for line in run.read_metrics() if line.get("split") == "train"]
    rates = [line["samples_per_s"] for line in lines]
    steady = rates[len(rates) // 2:]
    lengths = caption_lengths(cfg)
    per_sample = unpadded_training_flops(cfg, lengths) / len(lengths)
    samples_s = statistics.median(steady) if steady else None
    row = {"preset": info.get("preset"), "batch_size": cfg.train.batch_size, "image_size": cfg.model.image_size,
           "compile": cfg.train.compile, "loader": cfg.data.loader, "autocast": info.get("autocast"),
           "exit_status": status, "steps_done": lines[-1]["step"] if lines else 0, "windows_samples_per_s": rates,
           "samples_per_s": samples_s, "gflop_per_sample": per_sample / 1e9, "mean_caption_tokens":
           statistics.mean(lengths), "data_wait_share": statistics.median(line["data_wait_share"] for line in lines)
           if lines else None}
    if samples_s:
        row |= {"steps_per_s": samples_s / cfg.train.batch_size,
                "hardware_ratio": samples_s * per_sample / (matmul_gflops * 1e9)}
        if spec:
            row["spec_ratio"] = samples_s * per_sample / (spec["bf16_tflops"] * 1e12)
    return row


def measure_trainer(args: argparse.Namespace, matmul_gflops: float, spec: dict[str, Any] | None) -> dict[str, Any]:
    """samples/s of the trainer's real step, end to end (data loading included, as the trainer logs it), for each
    --trainer PRESET[:BATCH] (trainer_row)."""
    report: dict[str, Any] = {"data": str(args.trainer_data) if args.trainer_data else None,
                              "steps": args.trainer_steps, "set": args.trainer_set, "runs": {}}
    for entry in args.trainer:
        preset, _, batch = entry.partition(":")
        with tempfile.TemporaryDirectory() as folder:
            status = trainer_fit(preset, batch, args, Path(folder) / "run")
            report["runs"][entry] = trainer_row(RunDir(Path(folder) / "run"), status, matmul_gflops, spec)
    return report


# --- the report ----------------------------------------------------------------------------------
def spec_peak(device: torch.device) -> dict[str, Any] | None:
    """This GPU's dense bf16 peak from its data sheet (SPEC_BF16_TFLOPS): its name, the table's entry that matched
    and the peak in TFLOP/s; None on a CPU or a GPU the table does not name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(({"gpu": name, "entry": word, "bf16_tflops": tflops} for word, tflops in SPEC_BF16_TFLOPS
                 if word in name), None)


def machine(device: torch.device) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    dtypes = [torch.float32] + [torch.bfloat16] * (speed.autocast_dtype(device, "auto") is not None)
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "matmul_n": speed.MATMUL_SIZE[device.type],
        "matmul_gflops": {str(dtype).removeprefix("torch."): matmul_flops_per_s(device, dtype) / 1e9
                          for dtype in dtypes},
        "spec_peak": spec_peak(device),
    }


def compile_setting(device: torch.device) -> str:
    """The train.compile setting of the compiled contenders: the trainer's own "auto" on CUDA (CUDA graphs), "on"
    elsewhere ("auto" compiles nothing on a CPU)."""
    return "auto" if device.type == "cuda" else "on"


def build_models(cfg: BlipConfig, cfgs: dict[str, BlipConfig], device: torch.device,
                 compiled: list[str]) -> dict[str, nn.Module]:
    """Our variants and HF from random weights (seed 0); for each of `compiled` ("ours", "hf") a copy of ours_lm as
    the trainer compiles it (blipcore.training.step.step_module), or of HF under the same torch.compile mode."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {variant: BLIP(c).to(device) for variant, c in cfgs.items()}
    models["hf_lm"] = hf_peer(cfg).to(device)
    setting = compile_setting(device)
    if "ours" in compiled:
        ours = BLIP(cfgs["ours_lm"]).to(device)
        ours.load_state_dict(models["ours_lm"].state_dict())
        models[COMPILED["ours_lm"]] = step_module(ours, setting, device, cfg.model.max_text_len)[0]
    if "hf" in compiled:
        hf = hf_peer(cfg).to(device)
        hf.load_state_dict(models["hf_lm"].state_dict())
        models[COMPILED["hf_lm"]] = torch.compile(hf, mode=compile_mode(setting, device), dynamic=False)
    return models


def measure_size(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One size's report: the parts of args.parts that are measured per size (training, decoding, memory)."""
    cfg = size_config(name)
    size = args.batch_size or SIZES[name][2]
    cfgs = {variant: cfg.override(fields) for variant, fields in VARIANTS.items()}
    models = build_models(cfg, cfgs, device, args.compile)
    cfgs |= {compiled: cfgs["ours_lm"] for compiled in COMPILED.values()} | {"hf_lm": cfgs["ours_lm"]}
    ours: BLIP = models["ours_lm"]  # type: ignore[assignment]
    m, precision = cfg.model, Precision.of(cfg, device)
    report: dict[str, Any] = {
        "batch_size": size,
        "precision": precision.to_dict(),
        "model": {key: getattr(m, key) for key in ("image_size", "patch_size", "vision_width", "vision_depth",
                                                   "text_width", "text_encoder_depth", "text_decoder_depth",
                                                   "max_text_len")},
        "parameters": {variant: sum(p.numel() for p in model.parameters()) for variant, model in models.items()},
    }
    images = torch.randn(size, 3, m.image_size, m.image_size, device=device)
    sets = {set_name: captions if isinstance(captions, str) else [Batch.of(ours, images, c) for c in captions]
            for set_name, captions in caption_sets(cfg, size, args.warmup + args.steps, args.captions).items()}
    if "training" in args.parts:
        report["training"] = {set_name: batches if isinstance(batches, str)
                              else measure_training(models, cfgs, batches, precision, args)
                              for set_name, batches in sets.items()}
    decode_images = torch.randn(args.decode_images, 3, m.image_size, m.image_size, device=device)
    if "decoding" in args.parts:
        report["decoding"] = measure_decoding(ours, models["hf_lm"], decode_images, precision, args)
    del models, ours
    if "memory" in args.parts:
        report["memory"] = measure_memory(name, sets["full_length"][0], decode_images, precision, args)
    return report


def print_training(t: dict[str, Any], set_name: str) -> None:
    """One caption set's training rows: ours against HF, each variant, and the compiled pair."""
    label = f"{set_name} ({t['text_len']:.0f} tokens, {t['real_tokens']:.1f} real)"
    ours, hf = t["ours_lm"], t["hf_lm"]
    print(f"  {label + ', LM':44s} {ours['samples_per_s']:8.2f} {hf['samples_per_s']:8.2f} {t['ratio']:6.2f}  "
          f"{ours['hardware_ratio']:.0%}, HF {hf['hardware_ratio']:.0%} of {t['matmul_gflops']:.0f} GFLOP/s"
          + (f"; {ours['spec_ratio']:.0%}, HF {hf['spec_ratio']:.0%} of the spec peak" if "spec_ratio" in ours else ""))
    for variant, what in (("ours_itc_lm", "ITC + LM"), ("ours_itc_lm_itm", "ITC + LM + ITM")):
        print(f"  {'  ' + what:44s} {t[variant]['samples_per_s']:8.2f} {'':8s} {'':6s}  "
              f"{t[variant]['hardware_ratio']:.0%}")
    if "compiled_ratio" in t:
        ours, hf = (t[name] for name in COMPILED.values())
        print(f"  {'  LM, both compiled (padded to max_text_len)':44s} {ours['samples_per_s']:8.2f} "
              f"{hf['samples_per_s']:8.2f} {t['compiled_ratio']:6.2f}  {ours['hardware_ratio']:.0%}, "
              f"HF {hf['hardware_ratio']:.0%}; compiled / eager: ours {t['compile_speedup']:.2f}x, "
              f"HF {t['hf_compile_speedup']:.2f}x")
    elif "compile_speedup" in t:
        row = t[COMPILED["ours_lm"]]
        print(f"  {'  LM, compiled (padded to max_text_len)':44s} {row['samples_per_s']:8.2f} {'':8s} {'':6s}  "
              f"{row['hardware_ratio']:.0%}; compiled / eager {t['compile_speedup']:.2f}x")


def print_size(name: str, size: dict[str, Any]) -> None:
    m = size["model"]
    print(f"\n{name}: ViT {m['image_size']}/{m['patch_size']} width {m['vision_width']} x {m['vision_depth']}, "
          f"text width {m['text_width']}, encoder {m['text_encoder_depth']}, decoder {m['text_decoder_depth']}; "
          f"batch {size['batch_size']}; both models train in {size['precision']['training']} "
          f"and decode in {size['precision']['decoding']}")
    if "training" in size:
        print(f"  {'training, samples/s':44s} {'ours':>8s} {'HF':>8s} {'ratio':>6s}  share of the matmul FLOP/s")
        for set_name, t in size["training"].items():
            if isinstance(t, str):
                print(f"  {set_name}: {t}")
            else:
                print_training(t, set_name)
    if d := size.get("decoding"):
        print(f"  decoding {d['images']} x {d['new_tokens']} tokens, s{'':18s} {'':17s} ceiling (image encoding "
              f"{d['image_encoding_s']:.3f} s)")
        for label in ("greedy", f"beam{BEAMS}"):
            print(f"  {'  ' + label:44s} {d[label]['ours_s']:8.3f} {d[label]['hf_s']:8.3f} {d[label]['ratio']:6.2f}  "
                  f"{d[label]['ceiling']:.2f}")
    if mem := size.get("memory"):
        print(f"  peak memory, MiB ({mem['kind']})")
        for phase in ("decode", "train"):
            print(f"  {'  ' + phase:44s} {mem['ours_lm'][phase + '_mib']:8.0f} {mem['hf_lm'][phase + '_mib']:8.0f} "
                  f"{mem['ratio_' + phase]:6.2f}")


def print_trainer(trainer: dict[str, Any]) -> None:
    print(f"\nthe trainer's step end to end (python -m train fit, {trainer['steps']} steps, data {trainer['data']}): "
          "samples/s, the median of the second half's logged windows")
    for entry, row in trainer["runs"].items():
        if not row["samples_per_s"]:
            print(f"  {entry}: no window logged (exit status {row['exit_status']})")
            continue
        spec = f", {row['spec_ratio']:.0%} of the spec peak" if "spec_ratio" in row else ""
        print(f"  {entry}: batch {row['batch_size']} at {row['image_size']} px, compile {row['compile']}, loader "
              f"{row['loader']}: {row['samples_per_s']:.0f} samples/s = {row['steps_per_s']:.1f} steps/s, "
              f"{row['hardware_ratio']:.0%} of the matmul FLOP/s{spec}; data wait {row['data_wait_share']:.0%}")


def print_table(report: dict[str, Any]) -> None:
    mach = report["machine"]
    matmuls = ", ".join(f"{dtype} {gflops:.0f}" for dtype, gflops in mach["matmul_gflops"].items())
    print(f"{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']}, "
          f"transformers {mach['transformers']}, {mach['gpu'] or 'cpu'}")
    peak = mach["spec_peak"]
    print(f"{mach['matmul_n']}^2 matmul GFLOP/s: {matmuls}"
          + (f"; spec peak ({peak['entry']}) bf16 {peak['bf16_tflops']:.0f} TFLOP/s" if peak else "")
          + ". Ratios: HF / ours (above 1: ours faster or smaller).")
    for name, size in report["presets"].items():
        print_size(name, size)
    if "trainer" in report:
        print_trainer(report["trainer"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="demo,seed",
                        help=f"comma-separated sizes: {', '.join(SIZES)} (empty: none, e.g. with --parts trainer)")
    parser.add_argument("--parts", default="training,decoding,memory",
                        help=f"comma-separated parts of the report: {', '.join(PARTS)} (default %(default)s); "
                             "trainer needs --trainer")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch (default per size: " + ", ".join(f"{k} {v[2]}" for k, v in SIZES.items())
                        + ")")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds of each measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens generated per caption")
    parser.add_argument("--decode-images", type=int, default=8, help="images captioned at once")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--compile", nargs="?", const="ours,hf", default="", metavar="ours,hf",
                        help="also time ours_lm and HF (or the one named) under torch.compile, as the trainer "
                             "compiles (CUDA: CUDA graphs), on captions padded to max_text_len (contenders of their "
                             "own; compiling falls in the warm-up rounds, minutes on a CPU)")
    parser.add_argument("--captions", type=Path, default=None, metavar="JSON",
                        help="COCO caption file of the 'realistic' training set (default: "
                             f"{SHARED_CAPTIONS} if it is there, else the repository's {FIXTURE_CAPTIONS}; "
                             "$BLIPLAB_SHARED_DATA moves the first)")
    trainer = parser.add_argument_group("the trainer's step end to end (--parts trainer)")
    trainer.add_argument("--trainer", action="append", default=[], metavar="PRESET[:BATCH]",
                         help="a preset (name or .toml) trained by `python -m train fit` and timed from its log, at "
                              "its batch or BATCH (repeatable), e.g. --trainer flickr8k:64 --trainer flickr8k-gpu")
    trainer.add_argument("--trainer-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="a config override for every --trainer run (repeatable), e.g. model.image_size=128")
    trainer.add_argument("--trainer-data", type=Path, metavar="DIR", help="their dataset folder (--data-root)")
    trainer.add_argument("--trainer-steps", type=int, default=300, help="steps of each run (default %(default)s)")
    trainer.add_argument("--trainer-seconds", type=float, default=600.0,
                         help="stop each run (as Ctrl-C does) after this long (default %(default)s)")
    parser.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.child:
        child(args)
        return
    args.captions = (args.captions or default_captions()).resolve()
    names = [name for name in args.presets.split(",") if name]
    args.parts = [part for part in args.parts.split(",") if part]
    args.compile = [model for model in args.compile.split(",") if model]
    if set(args.compile) - {"ours", "hf"}:
        parser.error(f"--compile names ours and/or hf, not {args.compile}")
    if unknown := [name for name in names if name not in SIZES] + [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown size(s) or part(s) {unknown}; sizes: {', '.join(SIZES)}; parts: {', '.join(PARTS)}")
    if "trainer" in args.parts and not args.trainer:
        parser.error("--parts trainer: name the runs with --trainer PRESET[:BATCH]")
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "machine": machine(device),
        "settings": {key: getattr(args, key) for key in ("steps", "warmup", "new_tokens", "decode_images", "compile")}
        | {"beams": BEAMS, "captions": str(args.captions), "parts": args.parts},
        "presets": {name: measure_size(name, args, device) for name in names},
    }
    if "trainer" in args.parts:
        mach = report["machine"]
        rate = mach["matmul_gflops"].get("bfloat16", mach["matmul_gflops"]["float32"])  # the trainer's autocast's
        report["trainer"] = measure_trainer(args, rate, mach["spec_peak"])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
