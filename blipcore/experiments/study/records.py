"""What a run counts with in a study's table: its folder (its dev-chosen checkpoint's reported evaluation) or its
record in a results folder (the same numbers, kept as a small JSON file), read, compared with the plan and written."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...evaluation import metrics as M
from ...io import atomic_write_json
from ...model.config import BlipConfig
from ...runs.rundir import RunDir, RunError, read_json
from .folders import planned_config, run_dir
from .plan import Plan

TestFn = Callable[[RunDir, int, list[str]], dict[str, Any]]  # (run, epoch, strategies) -> its test evaluation


def evaluate_on_test(run: RunDir, epoch: int, strategies: list[str]) -> dict[str, Any]:
    """The default TestFn: every image of the test split, METEOR included (blipcore.evaluation.evaluator), on the
    device the run trained on (its train.device; "auto": CUDA where torch sees one)."""
    import torch

    from ...evaluation.evaluator import CheckpointEvaluator

    device = run.config().train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return CheckpointEvaluator(run, "test", device=device).evaluate(epoch, strategies, meteor=True, progress=False)


def dev_choice(run: RunDir) -> tuple[int, str] | None:
    """(epoch, strategy) of the run's highest validation CIDEr over its epoch evaluations; None before one. A run
    that writes no caption, image-only (model.mae, image pretraining) or without a decoder (model.lm_weight = 0,
    e.g. a CapFilt filter): its last epoch, strategy "" (the checkpoint `capfilt` reads by default)."""
    model = run.config().model
    if model.mae or model.lm_weight <= 0:
        epochs = run.eval_epochs()
        return (epochs[-1], "") if epochs else None
    best: tuple[float, int, str] | None = None
    for epoch in run.eval_epochs():
        for name, entry in run.load_eval(epoch).get("strategies", {}).items():
            cider = entry.get("metrics", {}).get("cider")
            if M.is_number(cider) and (best is None or cider > best[0]):
                best = (cider, epoch, name)
    return None if best is None else (best[1], best[2])


def reported_evaluation(run: RunDir, test: TestFn | None = None) -> tuple[int, str, str, dict[str, Any]] | None:
    """(epoch, split, dev-chosen strategy, evaluation) that the table reports for a run: the test evaluation of
    its dev-chosen epoch when its data has a test split (made with `test` when missing and `test` is given),
    else that epoch's validation evaluation. None before the run's first evaluation, or while its test
    evaluation is missing and `test` is None. An image-only run reports its validation evaluation (its losses):
    it has no caption or retrieval for a test evaluation to measure."""
    choice = dev_choice(run)
    if choice is None:
        return None
    epoch, strategy = choice
    if not run.config().data.test_annotations or run.config().model.mae:
        return epoch, "val", strategy, run.load_eval(epoch)
    if run.eval_path(epoch, "test").is_file():
        return epoch, "test", strategy, run.load_eval(epoch, "test")
    if test is None:
        return None
    return epoch, "test", strategy, test(run, epoch, list(run.load_eval(epoch).get("strategies", {})))


# Config fields that say where a run's files are, which device it used and whether its step was compiled, not how
# it trained: a record made on another machine matches (the record's machine says which device trained it).
LOCATION_FIELDS = ("name", "data.root", "data.cache_dir", "train.init", "train.device", "train.compile")


@dataclass
class RunResult:
    """What the table counts for one run: its reported evaluation (see `reported_evaluation`), numbers only, and
    what the run cost. Made from a completed run folder, or read back from its record in a results folder."""
    epoch: int
    split: str
    chosen: str  # the dev-chosen decoding strategy
    evaluation: dict[str, Any]  # num_images, losses, retrieval, matching, strategies / reference_rows -> metrics
    train_seconds: float | None
    samples_per_s: float | None  # the median of its training lines
    machine: dict[str, Any]  # device (CPU model, fp32 matmul GFLOP/s), revisions (start, resumes), when it ended
    config: dict[str, Any]
    # What happened on the way there (see `run_history`): every validation evaluation's numbers and the training
    # log, thinned. Empty for records written before records kept it.
    history: dict[str, Any] = field(default_factory=dict)
    source: str = "run"  # "run" (its folder) or "record" (its results file)
    differs: list[str] = field(default_factory=list)  # config fields its folder's run has that the plan no longer gives

    RECORD_FIELDS = ("epoch", "split", "chosen", "evaluation", "train_seconds", "samples_per_s", "machine", "config")

    def record(self, stage: str, variant: str, seed: int) -> dict[str, Any]:
        record = {"stage": stage, "variant": variant, "seed": seed,
                  **{key: getattr(self, key) for key in self.RECORD_FIELDS}}
        return {**record, "history": self.history} if self.history else record

    @classmethod
    def from_record(cls, record: dict[str, Any], path: Path) -> RunResult:
        missing = [key for key in cls.RECORD_FIELDS if key not in record]
        if missing:
            raise RunError(f"{path}: not a study result record (no {', '.join(missing)})")
        history = record.get("history", {})
        if not isinstance(history, dict):
            raise RunError(f"{path}: its history should be an object, found {type(history).__name__}")
        return cls(**{key: record[key] for key in cls.RECORD_FIELDS}, history=history, source="record")


def numbers_only(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers, without its sample captions and texts like the most common caption (which quote
    the dataset): what a record keeps."""
    def metrics_of(key: str) -> dict[str, Any]:
        return {name: {"metrics": {k: v for k, v in entry.get("metrics", {}).items() if M.is_number(v)}}
                for name, entry in evaluation.get(key, {}).items()}

    return {"num_images": evaluation.get("num_images"), "losses": evaluation.get("losses", {}),
            "retrieval": evaluation.get("retrieval", {}), "matching": evaluation.get("matching", {}),
            "strategies": metrics_of("strategies"), "reference_rows": metrics_of("reference_rows")}


# The training log a record keeps: at most this many lines (every k-th, and the last), of these numbers.
HISTORY_TRAIN_LINES = 200
HISTORY_TRAIN_KEYS = ("step", "epoch", "loss", "itc", "lm", "itm", "mae", "lr", "temperature", "grad_norm",
                      "samples_per_s", "data_wait_share")


def run_history(run: RunDir) -> dict[str, Any]:
    """What a record keeps of how a run got to its result: `evaluations`, every validation evaluation training made
    (step, label, and the numbers `numbers_only` keeps: losses, each strategy's and reference row's metrics,
    retrieval, matching), in step order; `train`, the training log's numbers, thinned to HISTORY_TRAIN_LINES lines.
    Training curves, collapse over steps and a run's diagnosis can be drawn again from it on any machine."""
    evaluations = [{"step": result.get("step"), "label": result.get("label"), **numbers_only(result)}
                   for result in run.validation_evaluations()]
    lines = [{key: line[key] for key in HISTORY_TRAIN_KEYS if M.is_number(line.get(key))}
             for line in run.read_metrics() if line.get("split") == "train"]
    stride = max(1, math.ceil(len(lines) / HISTORY_TRAIN_LINES))
    kept = lines[::stride] + ([lines[-1]] if lines and (len(lines) - 1) % stride else [])
    return {"evaluations": evaluations, "train": kept}


def completed_result(run: RunDir) -> RunResult | None:
    """A completed run's RunResult; None while it is not completed (a stopped or running run is not a result) or
    has no reported evaluation yet."""
    info = run.read_info()
    if info.get("status") != "completed" or (reported := reported_evaluation(run)) is None:
        return None
    epoch, split, chosen, evaluation = reported
    speeds = [line["samples_per_s"] for line in run.read_metrics()
              if line.get("split") == "train" and M.is_number(line.get("samples_per_s"))]
    machine = {"device": info.get("device"), "git_revision": info.get("git_revision"),
               "resumed_revisions": [resumed.get("git_revision") for resumed in info.get("resumes", [])],
               "finished_at": info.get("finished_at")}
    return RunResult(epoch, split, chosen, numbers_only(evaluation), info.get("train_seconds"),
                     statistics.median(speeds) if speeds else None, machine, info.get("config", {}),
                     history=run_history(run))


def record_path(results: Path, stage: str, variant: str, seed: int) -> Path:
    return results / f"{run_dir(Path(), stage, variant, seed).name}.json"


def config_differences(recorded: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """The "section.field" names whose values differ between a run's config and the one its plan gives, apart
    from LOCATION_FIELDS and what a run fills in when it starts (the size of a "captions" vocabulary). A field
    one side lacks counts at its default: a run recorded before an option existed trained as the option's
    default does (every new option is off by default)."""
    def flat(cfg: dict[str, Any]) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, fields in cfg.items() if isinstance(fields, dict)
                for key, value in fields.items()}

    defaults = flat(BlipConfig().to_dict())
    a, b = {**defaults, **flat(recorded)}, {**defaults, **flat(planned)}
    counted = {"model.vocab_size"} if a.get("model.vocabulary") == b.get("model.vocabulary") == "captions" else set()
    return sorted(key for key in set(a) | set(b)
                  if key not in LOCATION_FIELDS and key not in counted and a.get(key) != b.get(key))


def read_records(plan: Plan, study: Path, results: Path,
                 log: Callable[[str], None] | None = None) -> dict[tuple[str, str, int], RunResult]:
    """The plan's runs recorded in `results` with the settings the plan gives them now; `log` says which records
    it leaves out because their settings differ."""
    found = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            for seed in plan.seeds:
                path = record_path(results, stage.name, variant, seed)
                if not path.is_file():
                    continue
                result = RunResult.from_record(read_json(path, "study result record"), path)
                planned = planned_config(plan, study, stage, variant, seed).to_dict()
                if differences := config_differences(result.config, planned):
                    if log is not None:
                        log(f"{path}: recorded with other settings than the plan's ({', '.join(differences[:4])}"
                            f"{', ...' if len(differences) > 4 else ''}), not counted")
                    continue
                found[stage.name, variant, seed] = result
    return found


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Write a record unless it already holds exactly this (no churn in a committed folder)."""
    if path.is_file() and read_json(path, "study result record") == json.loads(json.dumps(record)):
        return
    atomic_write_json(path, record)


# {(stage, variant): {seed: its RunResult}}
Reported = dict[tuple[str, str], dict[int, RunResult]]


def reported_runs(plan: Plan, study: Path, results: Path | None = None,
                  log: Callable[[str], None] | None = None) -> Reported:
    """Each training variant's runs that count in the table: completed runs in `study` with a reported
    evaluation (the folder is the truth, even when the plan now gives the run other settings: `differs` says
    which), and, for the others, their records in `results` (see `read_records`)."""
    records = read_records(plan, study, results, log) if results is not None else {}
    reported: Reported = {}
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = reported.setdefault((stage.name, variant), {})
            for seed in plan.seeds:
                run = RunDir(run_dir(study, stage.name, variant, seed))
                result = completed_result(run) if run.exists() else None
                if result is not None:
                    result.differs = config_differences(
                        result.config, planned_config(plan, study, stage, variant, seed).to_dict())
                else:
                    result = records.get((stage.name, variant, seed))
                if result is not None:
                    found[seed] = result
    return reported
