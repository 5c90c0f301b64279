"""GPU runs prepared to the minute: the speed report (`speed`), one study stage at 3 seeds (`study`) and the GPU
preset trained and tested (`preset`), each a call with a time budget, on a folder that `pack` makes on any machine;
`rehearse` runs every call on the CPU at a tiny size (tests/test_device_calls.py runs it), so that a GPU only has to
run what was already run here.

    python benchmarks/device_calls.py pack --from ../shared/data/flickr8k     # data/device, checked small
    export PYTHONPATH=$PWD:$PWD/data/device/site                              # then, on the GPU machine:
    python3 benchmarks/device_calls.py speed --pack data/device --out OUT
    python3 benchmarks/device_calls.py study --pack data/device --out OUT
    python3 benchmarks/device_calls.py preset --pack data/device --out OUT
    python benchmarks/device_calls.py rehearse --out /tmp/rehearsal           # every call, CPU, tiny size

`pack` writes Flickr8k pre-resized to 128 px (`python -m train data resize`), the pure-Python part of
pycocoevalcap that scoring needs without Java (site/), and the study to run (study.json): the small-data plan's
winner against its reference where its records (studies/results/small-data) name one, else the recipes plan's
tuned and no-label-smoothing variants.

`speed`: the trainer's real step end to end (`python -m train fit`, from the image cache, compiled) at batch 64 (the
`flickr8k` preset at 128 px) and at the `flickr8k-gpu` preset's batch; then ours against transformers' BLIP at
ViT-B/16 size, eager and both compiled alike, with the MFU against an 8192^2 bf16 matmul measured in the same
process and the GPU's spec peak (benchmarks/bench_vs_hf_blip.py). `study`: the chosen stage's runs (and any run of
the plan they need) trained and tested on the device, their records and test captions kept. `preset`: the
`flickr8k-gpu` preset trained end to end, its speed from its log, its dev-chosen checkpoint tested with greedy and
beam search: its captions and retrieval, beside a batch-64 run's.

Each job is a child process, stopped when the call's --budget (seconds) would be exceeded as Ctrl-C stops it (a
run saves its state; the same command resumes it), and a call leaves three files in OUT: <call>.json (what each job
measured or trained, its seconds and exit status), <call>.log (the children's output), <call>.tar.gz (each run's
run.json, metrics.jsonl and eval/*.json, the study's records and table, and every test caption as a COCO results
file captions/<run>.<epoch>.<split>.<strategy>.json, which `python -m train score` scores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_vs_hf_blip.py"
STUDIES = REPO / "studies"
# What every training run of a call reads its images from: the decoded-image cache (blipcore.data.image_cache),
# augmented on the device, instead of JPEGs decoded by DataLoader workers.
CACHE = {"data.loader": "cache"}
# The pycocoevalcap files scoring needs where there is no Java (BLEU, ROUGE-L, CIDEr; no tokenizer, METEOR, SPICE)
SCORING_FILES = ("bleu", "cider", "rouge")
GRACE = 25.0  # seconds a stopped child gets to save its state before it is killed
MAX_PACK_MIB = 56.0  # the folder and a checkout (about 5 MiB) copied together stay under 64 MiB
# What no preset reads, left out of the packed Flickr8k: the older hash split (official test images sit in both of
# its files) and the download manifest
UNREAD = ("annotations/captions_train.json", "annotations/captions_val.json", "source_manifest.tsv")


# --- what a call runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What the calls train, where and how long: the real sizes on a GPU (`real`), or the same jobs at a tiny size
    on the CPU (`tiny`, the rehearsal)."""

    device: str
    data: Path  # the dataset every job reads (Flickr8k at 128 px, or the rehearsal's copy of the test photos)
    work: Path  # where the calls keep their runs, each in <work>/<call>: a stopped call resumes from there
    trainer: tuple[str, ...]  # the --trainer entries timed end to end: batch 64, the GPU preset's batch
    trainer_set: tuple[str, ...]  # their --set
    trainer_steps: int
    gpu_preset: str  # trained end to end, evaluated, its test captions kept
    gpu_set: tuple[str, ...]  # its --set (the rehearsal: a few steps)
    bench: tuple[str, ...]  # the head-to-head's size, rounds and compile
    study: dict[str, Any]  # pack's choice: plan, only
    seeds: tuple[int, ...] = (0, 1, 2)
    preset: str | None = None  # the study's preset instead of the plan's (the rehearsal's tiny one)
    settings: dict[str, Any] = field(default_factory=dict)  # the study's extra settings, on top of CACHE
    minimum: dict[str, float] = field(default_factory=dict)  # seconds a job needs to be worth starting


def real(pack: Path, device: str, work: Path) -> Setup:
    """The GPU calls: Flickr8k at 128 px from `pack`."""
    data = (pack / "flickr8k-128").resolve()
    cache = tuple(f"{key}={value}" for key, value in CACHE.items())
    return Setup(device=device, data=data, work=work, trainer=("flickr8k:64", "flickr8k-gpu"),
                 trainer_set=("model.image_size=128", *cache), trainer_steps=200, gpu_preset="flickr8k-gpu",
                 gpu_set=(), bench=("--presets", "vit-b16", "--compile", "--steps", "8", "--warmup", "2"),
                 study=json.loads((pack / "study.json").read_text()),
                 minimum={"trainer": 60, "vit-b16": 120, "gpu-preset": 150, "study": 120})


def tiny(work: Path, seeds: tuple[int, ...]) -> Setup:
    """The rehearsal: the same jobs on the CPU at a tiny size, on a copy of tests/fixtures/coco-cc-by whose val
    split is also its test split, the study choice as `pack` would make it."""
    from blipcore.paths import COCO_CC_BY_FIXTURE

    data = work / "photos"
    if not data.is_dir():
        shutil.copytree(COCO_CC_BY_FIXTURE, data)
        shutil.copy(data / "annotations/captions_val.json", data / "annotations/captions_test.json")
    preset = work / "tiny.toml"
    preset.write_text(TINY_PRESET)
    cache_dir = f"data.cache_dir={work / 'cache'}"
    few = ("train.max_steps=2", "train.log_every=1", *(f"{k}={v}" for k, v in CACHE.items()), cache_dir)
    return Setup(device="cpu", data=data, work=work / "runs", trainer=(f"{preset}:4", f"{preset}:8"),
                 trainer_set=few, trainer_steps=2,
                 gpu_preset=str(preset), gpu_set=few, bench=("--presets", "tiny", "--steps", "1", "--warmup", "0"),
                 study=choose_study(), seeds=seeds, preset=str(preset),
                 settings={"train.max_steps": 2, "train.eval_strategies": ["greedy"], "data.cache_dir":
                           str(work / "cache")})


# The rehearsal's model and data layout: tests/conftest.py's tiny model on a COCO-format folder with a test split
TINY_PRESET = """base = "coco-mini"
[model]
image_size = 32
patch_size = 8
vision_width = 64
vision_depth = 1
vision_heads = 2
text_width = 64
text_encoder_depth = 1
text_decoder_depth = 1
text_heads = 2
max_text_len = 24
embed_dim = 32
[data]
num_workers = 0
eval_images = 8
test_annotations = "annotations/captions_test.json"
test_images = "images"
[train]
batch_size = 4
warmup_steps = 1
precision = "fp32"
eval_strategies = ["greedy"]
eval_caption_images = 4
save_state_every = 0
"""


def choose_study(results: Path = STUDIES / "results") -> dict[str, Any]:
    """The study stage a call trains: the small-data plan's winner against its reference where its records name
    one (a variant above the reference on the ITC match AUC or text-to-image R@1 by its plan's rule, its captions
    not below the reference's; the largest ITC match AUC margin first), else the recipes plan's tuned and
    no-label-smoothing variants."""
    from blipcore.experiments.study import load_plan
    from blipcore.experiments.study.judging import target_rows
    from blipcore.experiments.study.records import reported_runs

    plan_path = STUDIES / "small-data.toml"
    plan = load_plan(plan_path)
    reported = reported_runs(plan, Path(tempfile.gettempdir()) / "no-study-folder", results / plan.name)
    rows = target_rows(plan, reported) if reported else []
    judged: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("above") == plan.reference or row.get("not_below") == plan.reference:
            judged.setdefault(row["run"], {})[row["metric"]] = row
    winners = sorted((run for run, by in judged.items()
                      if any(by.get(m, {}).get("verdict") == "met" for m in ("itc_match_auc", "t2i_r1"))
                      and str(by.get("cider", {}).get("verdict", "")).startswith("met")),
                     key=lambda run: -(judged[run].get("itc_match_auc", {}).get("margin") or 0.0))
    where = os.path.relpath(results / plan.name, REPO)
    if winners:
        return {"plan": os.path.relpath(plan_path, REPO), "only": [winners[0], plan.reference],
                "why": f"{winners[0]} helped over {plan.reference} in {where}"}
    return {"plan": "studies/recipes.toml", "only": ["recipes/tuned", "recipes/no-label-smoothing"],
            "why": f"no small-data variant has helped over {plan.reference} in {where}"}


# --- running jobs within a budget ----------------------------------------------------------------------------
class Call:
    """One call's jobs, run in turn within `budget` seconds, their output logged to OUT/<name>.log."""

    def __init__(self, name: str, out: Path, budget: float, setup: Setup) -> None:
        self.name, self.out, self.setup = name, out, setup
        self.end = time.monotonic() + budget
        self.jobs: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / f"{name}.log").open("a", encoding="utf-8")

    def left(self) -> float:
        return self.end - time.monotonic()

    def worth(self, job: str) -> bool:
        """Whether `job` still has the seconds it needs; a job that has not is recorded as skipped."""
        if self.left() - GRACE >= self.setup.minimum.get(job, 0.0):
            return True
        self.jobs.append({"job": job, "skipped": f"{self.left():.0f} s left"})
        return False

    def run(self, job: str, command: list[str], reserve: float = 0.0) -> tuple[int, str]:
        """Run `command` until it ends or the budget less `reserve` is spent (then SIGINT, then after GRACE seconds
        SIGKILL); its stderr goes to the log. Returns the exit status and its stdout."""
        started = time.monotonic()
        self.log.write(f"\n=== {job}: {' '.join(command)}\n")
        self.log.flush()
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO, env=env) as child:
            try:
                stdout, _ = child.communicate(timeout=max(1.0, self.left() - reserve - GRACE))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                try:
                    stdout, _ = child.communicate(timeout=GRACE)
                except subprocess.TimeoutExpired:
                    child.kill()
                    stdout, _ = child.communicate()
        self.jobs.append({"job": job, "seconds": round(time.monotonic() - started, 1), "exit_status": child.returncode})
        return child.returncode, stdout

    def finish(self, report: dict[str, Any], folders: dict[str, Path]) -> None:
        """OUT/<name>.json (the report and each job's seconds and status) and OUT/<name>.tar.gz (`folders`' small
        files: each arcname -> folder)."""
        report["jobs"] = self.jobs
        (self.out / f"{self.name}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        with tarfile.open(self.out / f"{self.name}.tar.gz", "w:gz") as tar:
            for arcname, folder in folders.items():
                for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                    if path.is_file() and _small_result(path):
                        tar.add(path, arcname=f"{arcname}/{path.relative_to(folder)}")
        self.log.close()


def _small_result(path: Path) -> bool:
    """What comes back of a run: its records, logs, evaluations and captions, not its weights or states."""
    return path.suffix in (".json", ".jsonl", ".md", ".csv", ".toml") and "checkpoints" not in path.parts


def bench_json(call: Call, job: str, arguments: list[str], reserve: float = 0.0) -> dict[str, Any] | None:
    """benchmarks/bench_vs_hf_blip.py --json with `arguments` as one job; its report, or None if it did not end."""
    status, stdout = call.run(job, [sys.executable, str(BENCH), "--device", call.setup.device, "--json", *arguments],
                              reserve)
    return json.loads(stdout) if status == 0 and stdout.strip() else None


# --- call 1: the speed report; the GPU preset trained and tested --------------------------------------------
def speed_call(setup: Setup, out: Path, budget: float) -> dict[str, Any]:
    """The trainer's real step end to end at batch 64 and at the GPU preset's batch, then the head-to-head with HF
    at ViT-B/16 size (MFU, spec peak); OUT/speed.json, speed.log, speed.tar.gz."""
    call, report = Call("speed", out, budget, setup), {}
    if call.worth("trainer"):  # what the head-to-head needs is kept for it: each run stops in its share of the rest
        kept = setup.minimum.get("vit-b16", 0.0) + GRACE
        share = (call.left() - kept - 2 * GRACE) / len(setup.trainer)
        report["end_to_end"] = bench_json(call, "trainer", [
            "--presets", "", "--parts", "trainer", *(f"--trainer={entry}" for entry in setup.trainer),
            "--trainer-data", str(setup.data), "--trainer-steps", str(setup.trainer_steps),
            "--trainer-seconds", f"{max(share, 30.0):.0f}", *(f"--trainer-set={s}" for s in setup.trainer_set)],
            reserve=kept)
    if call.worth("vit-b16"):
        report["head_to_head"] = bench_json(call, "vit-b16", ["--parts", "training", *setup.bench])
    call.finish(report, {})
    return report


def preset_call(setup: Setup, out: Path, budget: float) -> dict[str, Any]:
    """The GPU preset trained end to end and tested: its captions and retrieval beside a batch-64 run's, its speed
    as its log gives it; OUT/preset.json, preset.log, preset.tar.gz (the run's logs and evaluations, its captions)."""
    call, report, work = Call("preset", out, budget, setup), {}, setup.work / "preset"
    if call.worth("gpu-preset"):
        report["gpu_preset"] = gpu_preset_run(call, work / "runs" / "gpu-preset", work / "captions")
    call.finish(report, {"runs": work / "runs", "captions": work / "captions"})
    return report


def gpu_preset_run(call: Call, run: Path, captions: Path) -> dict[str, Any]:
    """The GPU preset trained end to end (stopped resumably where the budget ends, keeping a minute for its test),
    its dev-chosen checkpoint tested with its captions kept, and its speed as its log gives it."""
    from blipcore.runs.rundir import RunDir

    setup, done = call.setup, RunDir(run)
    if done.exists() and done.read_info().get("status") == "completed":
        status = 0
    else:  # a run stopped by an earlier call resumes
        status, _ = call.run("gpu-preset", [
            sys.executable, "-m", "train", "fit", "--preset", setup.gpu_preset, "--data-root", str(setup.data),
            "--run-dir", str(run), "--device", setup.device, "--no-progress", *(["--resume"] * done.has_state()),
            *(f"--set={s}" for s in setup.gpu_set)], reserve=60.0)
    return {"fit_exit_status": status, **evaluate_test_split(call, run, captions), **logged_speed(run, status)}


def logged_speed(run: Path, status: int) -> dict[str, Any]:
    """A run's speed as its log gives it (bench_vs_hf_blip.trainer_row), against a bf16 matmul (fp32 on a CPU
    without bf16) measured here and the GPU's spec peak."""
    import torch

    from blipcore import speed
    from blipcore.runs.rundir import RunDir

    bench = load_bench()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if speed.autocast_dtype(device, "auto") is not None else torch.float32
    rate = speed.matmul_gflops(device.type, speed.MATMUL_SIZE[device.type], dtype=dtype)
    if not (run / "metrics.jsonl").is_file():
        return {"speed": None}
    return {"speed": bench.trainer_row(RunDir(run), status, rate, bench.spec_peak(device)),
            "matmul_gflops": rate, "matmul_dtype": str(dtype).removeprefix("torch.")}


def evaluate_test_split(call: Call, run: Path, captions: Path) -> dict[str, Any]:
    """The run's dev-chosen checkpoint evaluated on the test split with greedy and beam, every caption written to
    `captions` as <run>.<epoch>.test.<strategy>.json; what was chosen."""
    from blipcore.experiments.study import dev_choice
    from blipcore.runs.rundir import RunDir

    choice = dev_choice(RunDir(run)) if (run / "run.json").is_file() else None
    if choice is None:
        return {"test": "no epoch evaluated on dev: nothing to test"}
    epoch, strategy = choice
    folder = captions / run.name
    status, _ = call.run("gpu-preset-test", [
        sys.executable, "-m", "train", "eval", "--run-dir", str(run), "--epoch", str(epoch), "--split", "test",
        "--strategies", "greedy,beam", "--no-meteor", "--device", call.setup.device, "--captions-out", str(folder)])
    name_captions(folder, run.name)
    return {"test": {"epoch": epoch, "dev_strategy": strategy, "exit_status": status}}


def name_captions(folder: Path, run: str) -> None:
    """Caption files epoch_NNN.<split>.<strategy>.json in `folder` moved beside it as <run>.epoch_NNN...json:
    one folder of uniquely named files, the rows of one `python -m train score` table."""
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        path.rename(folder.parent / f"{run}.{path.name}")
    if folder.is_dir():
        folder.rmdir()


def load_bench() -> Any:
    """benchmarks/bench_vs_hf_blip.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vs_hf_blip", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# --- call 2: one study stage at 3 seeds ----------------------------------------------------------------------
def study_call(setup: Setup, out: Path, budget: float) -> dict[str, Any]:
    """The chosen study stage's runs trained and tested in a child process (stopped resumably where the budget
    ends); OUT/study.json (the choice, the table's rows), study.log, study.tar.gz (records, table, runs' logs and
    evaluations, test captions)."""
    call, work = Call("study", out, budget, setup), setup.work / "study"
    report: dict[str, Any] = {"choice": setup.study, "seeds": list(setup.seeds)}
    if call.worth("study"):
        arguments = {"plan": str(REPO / setup.study["plan"]), "only": setup.study["only"], "seeds": setup.seeds,
                     "preset": setup.preset, "device": setup.device,
                     "settings": {"data.root": str(setup.data), **CACHE, **setup.settings}}
        status, _ = call.run("study", [sys.executable, str(Path(__file__).resolve()), "_study", json.dumps(arguments),
                                       str(work)])
        report["exit_status"] = status
        table = work / "study" / "study.json"
        report["rows"] = json.loads(table.read_text())["rows"] if table.is_file() else None
    call.finish(report, {"study": work / "study", "records": work / "records", "captions": work / "captions"})
    return report


def study_child(arguments: dict[str, Any], work: Path) -> int:
    """The study run in this process (the `_study` child): the plan's chosen runs into work/study, their records in
    work/records, each run's test evaluation on the device with its captions in work/captions."""
    import torch

    from blipcore.evaluation.evaluator import CheckpointEvaluator
    from blipcore.experiments.study import StudyStopped, load_plan, run_study
    from blipcore.runs.rundir import STUDY_PLAN
    from blipcore.training.trainer import Trainer
    from train.cli import main as train_main

    study, captions = work / "study", work / "captions"
    study.mkdir(parents=True, exist_ok=True)
    settings = arguments["settings"] | {"train.device": arguments["device"]}
    plan_file = study / STUDY_PLAN  # the plan as this call runs it: `study --report` reads its records against it
    plan_file.write_text(amended_plan(Path(arguments["plan"]).read_text(), arguments["preset"], settings))
    plan = load_plan(plan_file)
    device = torch.device(arguments["device"])

    def train(cfg: Any, folder: Path, resume: bool) -> dict[str, Any]:
        try:
            return Trainer(cfg, folder, resume=resume, progress=False).fit()
        finally:  # each run compiles its own model: the last one's graphs are not kept (nor counted in its limits)
            torch._dynamo.reset()

    def test(run: Any, epoch: int, strategies: list[str]) -> dict[str, Any]:
        folder = captions / run.path.name
        result = CheckpointEvaluator(run, "test", device=device).evaluate(
            epoch, strategies, meteor=False, progress=False, captions_dir=folder)
        name_captions(folder, run.path.name)
        return result

    try:
        run_study(plan, study, train, train_main, log=lambda line: print(f"[study] {line}", file=sys.stderr),
                  test=test, only=arguments["only"], seeds=arguments["seeds"], results=work / "records")
    except StudyStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 130
    return 0


def amended_plan(text: str, preset: str | None, settings: dict[str, Any]) -> str:
    """A plan's TOML with `settings` in its [set] table (replacing the plan's own values of those fields) and, when
    given, another preset: one plan that says how its runs were trained, with their records."""
    keys = tuple(json.dumps(key) for key in settings)
    lines = [line for line in text.splitlines() if not line.strip().startswith(keys)]
    if preset:
        lines = [f"preset = {json.dumps(preset)}" if line.startswith("preset =") else line for line in lines]
    entries = [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in settings.items()]
    where = lines.index("[set]") + 1 if "[set]" in lines else lines.index("[[stage]]")
    lines[where:where] = entries if "[set]" in lines else ["[set]", *entries, ""]
    return "\n".join(lines) + "\n"


# --- here: the folder a GPU call reads, and the rehearsal ------------------------------------------------------
def pack(source: Path, folder: Path, max_mib: float) -> dict[str, Any]:
    """`folder`: Flickr8k at 128 px (`python -m train data resize`), the scoring code that needs no Java (site/),
    the study to run (study.json); refused when over `max_mib`."""
    import pycocoevalcap

    data = folder / "flickr8k-128"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "train", "data", "resize", "--from", str(source), "--out", str(data),
                        "--size", "128", "--quality", "85"], check=True, cwd=REPO)
    for name in UNREAD:
        (data / name).unlink(missing_ok=True)
    site = folder / "site" / "pycocoevalcap"
    shutil.rmtree(site, ignore_errors=True)
    installed = Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __init__.py
    for name in SCORING_FILES:
        source_path, target = installed / name, site / name
        if source_path.is_dir():
            shutil.copytree(source_path, target, ignore=shutil.ignore_patterns("__pycache__", "*.jar", "*.gz"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source_path, target)
    choice = choose_study()
    (folder / "study.json").write_text(json.dumps(choice, indent=2), encoding="utf-8")
    mib = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20
    if mib > max_mib:
        raise SystemExit(f"error: {folder} holds {mib:.1f} MiB, over --max-mib {max_mib:g}")
    return {"folder": str(folder), "mib": round(mib, 1), "study": choice}


def rehearse(out: Path, seeds: tuple[int, ...], budget: float) -> dict[str, Any]:
    """Every call on the CPU at a tiny size into `out`, as a GPU runs them."""
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    setup = tiny(work, seeds)
    return {name: call(setup, out, budget) for name, call in CALLS.items()}


CALLS = {"speed": speed_call, "preset": preset_call, "study": study_call}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="make the folder a GPU call reads (here)")
    packing.add_argument("--from", dest="source", type=Path, required=True, help="the Flickr8k folder")
    packing.add_argument("--folder", type=Path, default=REPO / "data" / "device", help="default %(default)s")
    packing.add_argument("--max-mib", type=float, default=MAX_PACK_MIB, help="refuse a larger folder (%(default)s)")
    for name, what in (("speed", "the speed report"), ("study", "one study stage at 3 seeds"),
                       ("preset", "the GPU preset trained and tested")):
        call = commands.add_parser(name, help=f"{what}, on a GPU, within --budget")
        call.add_argument("--pack", type=Path, default=REPO / "data" / "device", help="pack's folder")
        call.add_argument("--out", type=Path, required=True, help="where its three files go")
        call.add_argument("--work", type=Path, default=REPO / "runs" / "device",
                          help="where the calls keep their runs (default %(default)s): the same command resumes")
        call.add_argument("--budget", type=float, default=330.0, help="seconds it may take (default %(default)s)")
        call.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    rehearsal = commands.add_parser("rehearse", help="every call on the CPU at a tiny size")
    rehearsal.add_argument("--out", type=Path, required=True)
    rehearsal.add_argument("--seeds", default="0,1,2", help="the study's seeds (default %(default)s)")
    rehearsal.add_argument("--budget", type=float, default=600.0, help="seconds each call may take")
    child = commands.add_parser("_study", help=argparse.SUPPRESS)
    child.add_argument("arguments")
    child.add_argument("work", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_study":
        return study_child(json.loads(args.arguments), args.work)
    if args.command == "pack":
        report = pack(args.source.resolve(), args.folder.resolve(), args.max_mib)
    elif args.command == "rehearse":
        report = rehearse(args.out.resolve(), tuple(int(s) for s in args.seeds.split(",")), args.budget)
    else:
        setup = real(args.pack.resolve(), args.device, args.work.resolve())
        report = CALLS[args.command](setup, args.out.resolve(), args.budget)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
