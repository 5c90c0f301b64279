"""What each variant of a study plan costs in time: the trainer's own step (blipcore.training.step.train_step) of
every variant's model, timed in turn in one process, so that each variant's samples/s is read as a ratio of the
plan's reference variant's measured in the same run, on the same machine, under the same load.

Each variant's config is the one the study gives its run (the preset, the plan's [set], the variant's settings;
train.init is not loaded: weights do not change a step's time). Its model and AdamW are built as the trainer builds
them, and it steps on a synthetic batch at the preset's batch size (random pixels at its image size, random word
pieces filling max_text_len: blipcore.training.step.synthetic_batch). The rounds alternate the variants, the order
reversed every other round, after --warmup untimed rounds; a variant's time is the median of its rounds, its ratio
the median of its rounds' ratios to the reference's in the same round (a slow spell of the machine falls on both).

What it leaves out: data loading and augmentation (data.augment: the loader's work, not the step's), evaluation,
and checkpointing. A variant the study trains with no image-text step (an MAE run) is timed all the same: its step
is its own.

The JSON it writes with --out (e.g. studies/results/small-data/step-speed.json, blipcore.experiments.study.
STEP_SPEED_FILE) is what the study's table reads for its "samples/s × reference" column, with the command,
machine and date of the measurement.

    python benchmarks/variant_speed.py studies/small-data.toml --data-root ../shared/data/flickr8k \\
        --only screening --out studies/results/small-data/step-speed.json
    python benchmarks/variant_speed.py studies/recipes.toml --steps 3 --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blipcore import BLIP, speed
from blipcore.experiments.study import COST_TEXT_LEN, STEP_SPEED_FILE, load_plan
from blipcore.experiments.study.folders import planned_config
from blipcore.model.config import BlipConfig
from blipcore.model.flops import training_step_flops
from blipcore.training.step import build_optimizer, synthetic_batch, train_step, with_counted_vocabulary


def variant_configs(plan_path: Path, only: list[str], data_root: str | None) -> dict[str, BlipConfig]:
    """"stage/variant" -> the config the study gives its seed-0 run, for the plan's training stages (or those named
    by `only`: STAGE or STAGE/VARIANT), the reference first."""
    plan = load_plan(plan_path)
    if data_root:
        plan.overrides["data.root"] = str(Path(data_root).resolve())
    configs = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            name = f"{stage.name}/{variant}"
            if only and not any(name == o or stage.name == o for o in only):
                continue
            cfg = planned_config(plan, Path("study"), stage, variant, 0)
            # weights are not loaded (they cost no time), and a stage that trains on a dataset an earlier stage makes
            # reads the plan's own here: its vocabulary is counted there, its step takes as long
            configs[name] = cfg.override({"train.init": "", "data.root": plan.base_config().data.root})
    if not configs:
        raise SystemExit(f"error: {plan_path}: no training variant matches --only {' '.join(only)}")
    reference = plan.reference if plan.reference in configs else next(iter(configs))
    return {reference: configs[reference], **{k: v for k, v in configs.items() if k != reference}}


def build_step(cfg: BlipConfig, device: torch.device) -> tuple[Callable[[], None], int, BlipConfig]:
    """A function that takes one trainer step of `cfg`'s model on a fixed synthetic batch, the samples a step
    takes, and the config as built (its caption vocabulary counted)."""
    cfg = with_counted_vocabulary(cfg)
    torch.manual_seed(cfg.train.seed)
    model = BLIP(cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    size = cfg.train.batch_size
    micro = [synthetic_batch(cfg, size, device, generator) for _ in range(cfg.train.grad_accum_steps)]
    dtype = speed.autocast_dtype(device, cfg.train.precision)

    def step() -> None:
        train_step(model, optimizer, micro, lr=cfg.train.lr, grad_clip=cfg.train.grad_clip, device=device,
                   autocast=dtype, step=1)

    return step, size * cfg.train.grad_accum_steps, cfg


def measure(configs: dict[str, BlipConfig], steps: int, warmup: int, device: torch.device,
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Each variant's step seconds (median of `steps` alternating rounds), samples/s, its ratio to the first
    variant's (the reference: the median of the rounds' ratios, and their range) and its GFLOP a step."""
    built = {name: build_step(cfg, device) for name, cfg in tqdm(configs.items(), desc="build", disable=not progress)}
    names = list(built)
    bar = tqdm(total=(warmup + steps) * len(names), desc="steps", unit="step", disable=not progress)
    times = speed.alternate({name: lambda _round, step=built[name][0]: step() for name in names}, steps, warmup,
                            device, after_each=lambda: bar.update(1))
    bar.close()
    rows = {}
    reference_name = names[0]
    reference_rate = [built[reference_name][1] / t for t in times[reference_name]]
    for name, (_, samples, cfg) in built.items():
        median = statistics.median(times[name])
        # the ratio in each round, to the reference's in that round: a slow spell of the machine falls on both
        ratios = [samples / t / r for t, r in zip(times[name], reference_rate, strict=True)]
        rows[name] = {"step_s": median, "step_s_all": times[name], "samples_per_s": samples / median,
                      "batch_size": samples, "gflops": training_step_flops(cfg, samples, COST_TEXT_LEN) / 1e9,
                      "samples_per_s_ratio": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)]}
    return rows


def report(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    device = torch.device(args.device)
    configs = variant_configs(args.plan, args.only, args.data_root)
    variants = measure(configs, args.steps, args.warmup, device, progress=not args.no_progress)
    return {
        "command": "python benchmarks/variant_speed.py " + shlex.join(argv),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": speed.cpu_model(), "device": device.type,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads(),
                    "matmul_fp32_gflops": round(speed.matmul_gflops(device.type), 1)},
        "settings": {"steps": args.steps, "warmup": args.warmup, "reference": next(iter(configs))},
        "variants": variants,
    }


def print_report(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"{result['command']}\n{machine['gpu'] or machine['cpu']}, {machine['torch_threads']} threads, fp32 matmul "
          f"{machine['matmul_fp32_gflops']} GFLOP/s, {result['date']}; median of {result['settings']['steps']} "
          "alternating rounds\n")
    print(f"{'variant':34s} {'step s':>8s} {'samples/s':>10s} {'× reference':>12s} {'rounds':>11s} "
          f"{'GFLOP a step':>13s}")
    for name, row in result["variants"].items():
        low, high = row["ratio_range"]
        print(f"{name:34s} {row['step_s']:8.3f} {row['samples_per_s']:10.1f} {row['samples_per_s_ratio']:12.2f} "
              f"{low:5.2f}-{high:4.2f} {row['gflops']:13.1f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path, help="a study plan, e.g. studies/small-data.toml")
    parser.add_argument("--only", nargs="*", default=[], metavar="STAGE[/VARIANT]",
                        help="the stages or variants to time (default: every training variant of the plan)")
    parser.add_argument("--data-root", help="the dataset, as for `python -m train study` (it sets the caption "
                                            "vocabulary's size where the preset counts it from the captions)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--out", type=Path, help=f"write the JSON here too (the study table reads "
                                                 f"<results>/{STEP_SPEED_FILE})")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be at least 1 and --warmup at least 0")
    try:
        result = report(args, argv)
    except (ValueError, OSError) as err:  # a plan that does not parse (PlanError), a dataset that is not there
        raise SystemExit(f"error: {err}") from None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
