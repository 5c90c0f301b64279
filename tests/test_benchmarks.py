"""The speed report cannot rot: benchmarks/bench_vs_hf_blip.py runs end to end at a tiny size and reports
every field with sane values, and blipcore.model.flops agrees with torch's own FLOP counter."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blipcore import BLIP, BlipConfig
from blipcore.model import losses as blip_losses
from blipcore.model.flops import training_flops, training_step_flops, unpadded_training_flops
from blipcore.model.tokenizer import tokenize_captions
from tests.conftest import REPO_ROOT, tiny_config

BENCH = REPO_ROOT / "benchmarks" / "bench_vs_hf_blip.py"
# --compile ours: the trainer's compiled step is timed too, on captions padded to max_text_len (one shape: one
# compilation, in the warm-up round, most of this test's time); HF's compiled contender is the same code path
TINY = ["--presets", "tiny", "--steps", "2", "--warmup", "1", "--new-tokens", "4", "--decode-images", "2",
        "--compile", "ours"]
CONTENDERS = ("ours_lm", "hf_lm", "ours_itc_lm", "ours_itc_lm_itm", "ours_lm_compiled")


def load_script(name: str, path: Path) -> ModuleType:
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("bench_vs_hf_blip", BENCH)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(BENCH), *TINY, "--json"], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_machine_and_settings(report: dict[str, Any], bench: ModuleType) -> None:
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert machine["torch"] == torch.__version__ and machine["device"] == "cpu" and machine["gpu"] is None
    assert machine["matmul_n"] == 2048 and machine["matmul_gflops"]["float32"] > 0
    assert machine["spec_peak"] is None  # a data sheet's bf16 peak is a GPU's
    # the real captions: coco-mini's in the shared data folder, else the repository's fixture's
    settings = dict(report["settings"])
    assert settings.pop("captions") == str(bench.default_captions().resolve())
    assert settings == {"steps": 2, "warmup": 1, "new_tokens": 4, "decode_images": 2, "compile": ["ours"], "beams": 3,
                        "parts": ["training", "decoding", "memory"]}
    assert list(report["presets"]) == ["tiny"]


def test_training(report: dict[str, Any], bench: ModuleType) -> None:
    size = report["presets"]["tiny"]
    batch = size["batch_size"]
    assert batch == 4
    # conftest sets BLIPLAB_CPU_BF16=0: the project's "auto" precision is fp32 here, for both models
    assert size["precision"] == {"training": "fp32", "decoding": "fp32", "matmul_reference": "float32"}
    assert all(count > 0 for count in size["parameters"].values()) and set(size["parameters"]) == set(CONTENDERS)
    assert set(size["training"]) == {"full_length", "realistic"}  # real captions even without ../shared
    assert size["training"]["realistic"]["real_tokens"] < size["training"]["realistic"]["text_len"]
    for training in (t for t in size["training"].values() if isinstance(t, dict)):
        assert training["matmul_gflops"] > 0
        for name in CONTENDERS:
            row = training[name]
            assert row["step_s"] > 0 and row["gflop"] > 0
            assert len(row["rounds_s"]) == 2 and row["step_s"] == pytest.approx(statistics.median(row["rounds_s"]))
            assert row["samples_per_s"] == pytest.approx(batch / row["step_s"])
            assert row["gflops_per_s"] == pytest.approx(row["gflop"] / row["step_s"])
            assert row["hardware_ratio"] == pytest.approx(row["gflops_per_s"] / training["matmul_gflops"])
        assert training["ratio"] == pytest.approx(training["hf_lm"]["step_s"] / training["ours_lm"]["step_s"])
        # the compiled step reads padded captions; its FLOPs, as every contender's, count the unpadded ones
        assert training["hf_lm"]["gflop"] == training["ours_lm"]["gflop"] == training["ours_lm_compiled"]["gflop"]
        assert "spec_ratio" not in training["ours_lm"] and "compiled_ratio" not in training  # HF not compiled
        assert training["compile_speedup"] == pytest.approx(
            training["ours_lm"]["step_s"] / training["ours_lm_compiled"]["step_s"])
        assert training["ours_lm"]["gflop"] < training["ours_itc_lm"]["gflop"] < training["ours_itc_lm_itm"]["gflop"]
    full, real = size["training"]["full_length"], size["training"]["realistic"]
    cfg = bench.size_config("tiny")
    assert full["text_len"] == full["real_tokens"] == cfg.model.max_text_len
    lm_only = cfg.override(bench.VARIANTS["ours_lm"])  # the model's own labels give flops.full_lm_targets' count
    assert full["ours_lm"]["gflop"] == pytest.approx(training_step_flops(lm_only, batch, cfg.model.max_text_len) / 1e9)
    # real captions (the timed rounds' batches: those after the warm-up): FLOPs counted on each unpadded caption
    batches = bench.caption_sets(cfg, batch, 3, Path(report["settings"]["captions"]))["realistic"][1:]
    lengths = [tokenize_captions(c, cfg.model.max_text_len)["attention_mask"].sum(dim=1).tolist() for c in batches]
    expected = statistics.mean(unpadded_training_flops(lm_only, n) for n in lengths) / 1e9
    assert real["ours_lm"]["gflop"] == pytest.approx(expected)
    assert expected < statistics.mean(training_step_flops(lm_only, batch, max(n)) for n in lengths) / 1e9


def test_decoding_and_memory(report: dict[str, Any]) -> None:
    size = report["presets"]["tiny"]
    decoding = size["decoding"]
    assert decoding["images"] == 2 and decoding["new_tokens"] == 4
    for strategy in ("greedy", "beam3"):
        row = decoding[strategy]
        assert row["ours_s"] > 0 and row["hf_s"] > 0
        assert row["ours_s"] == pytest.approx(statistics.median(row["ours_rounds_s"]))
        assert row["hf_s"] == pytest.approx(statistics.median(row["hf_rounds_s"]))
        assert row["ratio"] == pytest.approx(row["hf_s"] / row["ours_s"])
        assert row["ceiling"] == pytest.approx(row["hf_s"] / decoding["image_encoding_s"])
    assert decoding["image_encoding_s"] > 0
    memory = size["memory"]
    assert memory["kind"] == "max RSS"
    for phase in ("decode", "train"):
        ours, hf = memory["ours_lm"][f"{phase}_mib"], memory["hf_lm"][f"{phase}_mib"]
        assert ours > 0 and hf > 0
        assert memory[f"ratio_{phase}"] == pytest.approx(hf / ours)
    assert memory["ours_lm"]["train_mib"] > memory["ours_lm"]["decode_mib"]  # + gradients and AdamW's state


def test_table_prints(bench: ModuleType, report: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    bench.print_table(report)
    table = capsys.readouterr().out
    assert "tiny:" in table and "ITC + LM + ITM" in table and "beam3" in table and "peak memory" in table


def test_real_caption_batches_or_why_not(bench: ModuleType, tmp_path: Path) -> None:
    cfg = bench.size_config("tiny")
    sets = bench.caption_sets(cfg, 4, 3, bench.FIXTURE_CAPTIONS)  # the repository's own, always there
    assert [len(batch) for batch in sets["realistic"]] == [4, 4, 4] and len(set(map(tuple, sets["realistic"]))) == 3
    assert bench.caption_sets(cfg, 4, 3, tmp_path / "none.json")["realistic"].startswith("skipped: ")
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "a dog"}] * 3}))
    assert "3 captions, fewer than a batch of 4" in bench.caption_sets(cfg, 4, 3, few)["realistic"]


@pytest.mark.parametrize(
    "losses",
    [
        {"itc_weight": 0.0},
        {"lm_weight": 0.0},
        {},
        {"itm_weight": 1.0},
        {"momentum_encoder": True, "queue_size": 64},
        {"itc_weight": 0.0, "text_only": True},
    ],
    ids=["lm", "itc", "itc+lm", "itc+lm+itm", "momentum", "text-only-lm"],
)
@pytest.mark.parametrize("padded", [False, True], ids=["full-length", "padded"])
def test_flops_match_torch_flop_counter(
    losses: dict[str, Any], padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """blipcore.model.flops against torch.utils.flop_counter.FlopCounterMode over one forward + backward.

    Both count matrix products only: the linear layers, the patch embedding's convolution (its backward
    without an input gradient) and attention's two batched products, causal attention in full. Both ignore
    softmax, LayerNorm, GELU, biases, embedding look-ups and the losses' elementwise work. The counter also
    counts ITC's B x B similarity products, which blipcore.model.flops leaves out (< 0.1% here). SDPA runs in its
    math backend: torch has no FLOP formula for the CPU flash kernel and would count attention as 0.
    Checked: the whole step, the step without the LM head (the vocabulary head dominates a tiny model), the
    ViT alone, all within 10% (they agree to 0.1%). The counter sees the fused LM head's matmuls in its
    forward (torch.addmm with out=, which it counts; addmm_ it would not).
    """
    torch.manual_seed(0)
    cfg = tiny_config(image_size=64, patch_size=8, vision_width=32, text_width=32, vision_depth=2,
                      text_encoder_depth=2, text_decoder_depth=2, max_text_len=32, **losses)
    model = BLIP(cfg)
    long = "a red circle to the left of a blue square " * 4
    captions = ["a red circle", long, "two green triangles above a small yellow star", long] if padded else [long] * 4
    tokens = tokenize_captions(captions, cfg.model.max_text_len)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    counter = FlopCounterMode(display=False, depth=None)
    # The LM head runs fused with its loss, gradients included, outside the lm_head module: counted as the
    # counter's growth during each call of blipcore.model.losses.linear_cross_entropy.
    lm_head_flops = []
    fused = blip_losses.linear_cross_entropy

    def counted_fused(*args: Any) -> torch.Tensor:
        before = counter.get_total_flops()
        total = fused(*args)
        lm_head_flops.append(counter.get_total_flops() - before)
        return total

    monkeypatch.setattr(blip_losses, "linear_cross_entropy", counted_fused)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(4, 3, 64, 64), ids, mask)["loss"].backward()
    counted = {module: sum(counts.values()) for module, counts in counter.get_flop_counts().items()}

    targets = int((model.decoder_batch(ids, mask).labels[:, 1:] != -100).sum()) if padded else None
    parts = training_flops(cfg, 4, ids.shape[1], targets)
    assert sum(parts.values()) == training_step_flops(cfg, 4, ids.shape[1], targets)
    assert sum(parts.values()) == pytest.approx(counted["Global"], rel=0.10)
    lm_head = sum(lm_head_flops)
    assert sum(parts.values()) - parts.get("lm_head", 0) == pytest.approx(counted["Global"] - lm_head, rel=0.10)
    assert parts.get("vision", 0) == pytest.approx(counted.get("BLIP.visual_encoder", 0), rel=0.10)


# --- benchmarks/profile_step.py: the torch.profiler breakdown of one training step -----------------------
PROFILE = REPO_ROOT / "benchmarks" / "profile_step.py"
PROFILE_TINY = [
    "--preset", "demo", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--top", "8", "--json",
    "--attention-ab", "1",
    *(f"--set=model.{key}={value}" for key, value in {
        "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 1, "vision_heads": 2,
        "text_width": 64, "text_encoder_depth": 1, "text_decoder_depth": 1, "text_heads": 2, "max_text_len": 16,
        "embed_dim": 32, "itm_weight": 1, "momentum_encoder": "true", "queue_size": 64}.items()),
]
# every region of a step with ITC + LM + ITM and the momentum encoder, in the report's order
PROFILE_REGIONS = ("vision_encoder", "text_encoder", "itc_loss", "itm", "decoder", "lm_head_loss", "momentum_update",
                   "momentum_encoder", "forward_other", "backward", "clip_grad_norm", "optimizer_step", "zero_grad",
                   "other")


@pytest.fixture(scope="module")
def profiler() -> ModuleType:
    return load_script("profile_step", PROFILE)


@pytest.fixture(scope="module")
def profile_report(profiler: ModuleType) -> tuple[dict[str, Any], str]:
    """One tiny profiled step in this process (seconds): the report and its JSON as printed."""
    args = profiler.build_parser().parse_args(PROFILE_TINY)
    report, operators = profiler.profile_step(args)
    return report, operators


def test_profile_step_regions(profile_report: tuple[dict[str, Any], str]) -> None:
    report, _ = profile_report
    assert report["settings"]["batch_size"] == 4 and report["settings"]["steps"] == 1
    assert report["settings"]["precision"] == "fp32"  # conftest: BLIPLAB_CPU_BF16=0
    assert report["model"]["itm_weight"] == 1 and report["model"]["momentum_encoder"] is True
    assert report["machine"]["cpu"] and report["machine"]["torch_threads"] >= 1
    ab = report["attention_ab"]  # one pair of steps, attention by the CPU rule and fused everywhere
    assert ab["rule_ms"] > 0 and ab["fused_ms"] > 0 and ab["fused_over_rule"] == ab["fused_ms"] / ab["rule_ms"]
    from blipcore.model import layers

    assert layers.CPU_MATH_MAX_KEYS > 0  # the A/B put the rule back (0 = fused everywhere)
    regions = report["regions"]
    assert tuple(regions) == PROFILE_REGIONS
    step = report["step_ms"]
    assert step > 0 and report["unprofiled_step_ms"] > 0
    for name, row in regions.items():
        if name in ("forward_other", "other"):  # the rest of the forward, of the step: never negative
            assert row["ms"] >= -1e-3, (name, row)
        else:
            assert row["ms"] > 0 and row["calls"] >= 1, (name, row)
        assert row["share"] == pytest.approx(row["ms"] / step)
    # the rows partition the step: the named regions and the two "other" rows add up to it
    assert sum(row["ms"] for row in regions.values()) == pytest.approx(step, rel=1e-6)
    assert sum(row["share"] for row in regions.values()) == pytest.approx(1.0, rel=1e-6)
    forward_parts = [row["ms"] for name, row in regions.items() if PROFILE_REGIONS.index(name) < 8]
    assert sum(forward_parts) <= report["forward_ms"] * (1 + 1e-6) < step
    # the regions cover the step: what falls outside them (loss checks, Python between regions) is small
    assert regions["other"]["share"] < 0.5
    assert regions["backward"]["gflop"] > 0 and regions["decoder"]["gflops_per_s"] > 0


def test_profile_step_flops_and_operators(profile_report: tuple[dict[str, Any], str], profiler: ModuleType) -> None:
    report, operators = profile_report
    flops = report["flops"]
    cfg = BlipConfig.preset("demo").override_strings([s.removeprefix("--set=") for s in PROFILE_TINY
                                                      if s.startswith("--set=")])
    assert flops["step_gflop"] == pytest.approx(training_step_flops(cfg, 4, 16) / 1e9)
    assert flops["matmul_gflops"]["float32"] > 0 and flops["step_dtype"] == "float32"
    assert flops["gflops_per_s"] == pytest.approx(flops["step_gflop"] / (report["unprofiled_step_ms"] / 1e3))
    assert flops["hardware_ratio"] == pytest.approx(flops["gflops_per_s"] / flops["matmul_gflops"]["float32"])
    assert flops["hardware_ratio"] > 0 and flops["hardware_ratio_step_dtype"] == flops["hardware_ratio"]
    ops = report["operators"]
    assert 0 < len(ops) <= 8 and not any(op["name"].startswith("blip::") for op in ops)
    assert all(op["self_cpu_ms"] > 0 for op in ops)
    assert [op["self_cpu_ms"] for op in ops] == sorted((op["self_cpu_ms"] for op in ops), reverse=True)
    assert "Self CPU" in operators and "aten::" in operators
    json.dumps(report)  # --json prints it as it is


def test_profile_step_prints(profile_report: tuple[dict[str, Any], str], profiler: ModuleType,
                             capsys: pytest.CaptureFixture[str]) -> None:
    profiler.print_report(*profile_report)
    out = capsys.readouterr().out
    assert "vision encoder" in out and "LM head + loss" in out and "optimizer.step" in out
    assert "GFLOP/s" in out and "Self CPU" in out


def test_profile_step_refuses_unknown_names(profiler: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert profiler.main(["--preset", "no-such-preset", "--json"]) == 2
    assert profiler.main(["--preset", "demo", "--set", "model.no_such_field=1", "--json"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no-such-preset'" in err and "no_such_field" in err
