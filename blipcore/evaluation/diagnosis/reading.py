"""What a diagnosis reads: a run folder's evaluations (its evaluation files and metrics.jsonl's val lines, merged
by step), training lines and run.json, or a study record's history or reported evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...io import is_number
from ...runs.rundir import RunDir, RunError, read_json
from ..metrics import REFERENCE_ROWS, metric, metrics_in
from .report import onset_text


@dataclass
class Evaluation:
    """One evaluation's numbers, whatever they were read from: an evaluation file, a val line, a record."""

    step: int | None
    epoch: float | None
    split: str = "val"
    num_images: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    retrieval: dict[str, float] = field(default_factory=dict)
    matching: dict[str, float] = field(default_factory=dict)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return onset_text(self.step, self.epoch, self.split) or "the reported evaluation"

    def value(self, key: str) -> float | None:
        """A loss, retrieval or matching number, or "cider": the best strategy's CIDEr."""
        if key == "cider":
            best = self.best_strategy("cider")
            return None if best is None else best[1]
        for found in (self.losses, self.retrieval, self.matching):
            if is_number(found.get(key)):
                return float(found[key])
        return None

    def best_strategy(self, key: str) -> tuple[str, float] | None:
        values = [(name, float(m[key])) for name, m in self.strategies.items() if is_number(m.get(key))]
        return max(values, key=lambda item: item[1]) if values else None


@dataclass
class History:
    """What a diagnosis reads of one run or record."""

    name: str
    source: str
    path: str
    status: str | None
    error: str | None
    config: dict[str, Any]
    evaluations: list[Evaluation]
    train: list[dict[str, Any]]
    variant: tuple[str, str, str] | None = None  # (plan, stage, variant) of a study run or record

    def setting(self, section: str, name: str) -> Any:
        values = self.config.get(section)
        return values.get(name) if isinstance(values, dict) else None


def _numbers(value: Any) -> dict[str, float]:
    return {k: v for k, v in value.items() if is_number(v)} if isinstance(value, dict) else {}


def as_int(value: Any) -> int | None:
    return int(value) if is_number(value) else None


def evaluation_of(result: dict[str, Any], step: int | None = None, epoch: float | None = None,
                  split: str = "val") -> Evaluation:
    """An evaluation file's, a record's or a record history entry's numbers."""
    def rows(section: str) -> dict[str, dict[str, Any]]:
        entries = result.get(section)
        return {name: dict(entry["metrics"]) for name, entry in entries.items()
                if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict)} if isinstance(entries,
                                                                                                       dict) else {}

    label = result.get("label")
    labelled = re.fullmatch(r"epoch_(\d+)", label) if isinstance(label, str) else None
    if epoch is None:
        epoch = result.get("epoch") if is_number(result.get("epoch")) else (
            int(labelled.group(1)) if labelled else None)
    return Evaluation(step if step is not None else as_int(result.get("step")), epoch, split,
                      as_int(result.get("num_images")), _numbers(result.get("losses")),
                      _numbers(result.get("retrieval")), _numbers(result.get("matching")), rows("strategies"),
                      rows("reference_rows"))


# Per-strategy keys of a val line, longest first ("max_longest_run" before "longest_run").
_ROW_KEYS = sorted((m.key for group in ("captioning", "collapse") for m in metrics_in(group)), key=len, reverse=True)


def evaluation_of_line(line: dict[str, Any]) -> Evaluation:
    """A metrics.jsonl val line's numbers (the summary an evaluation writes beside its file)."""
    found = Evaluation(as_int(line.get("step")), line.get("epoch") if is_number(line.get("epoch")) else None)
    for key, value in line.items():
        declared = metric(key)
        if declared is None or not is_number(value):
            continue
        if declared.group == "loss":
            found.losses[key] = value
        elif declared.group in ("retrieval", "matching"):
            (found.retrieval if declared.group == "retrieval" else found.matching)[key] = value
        elif declared.group in ("captioning", "collapse"):
            suffix = next((k for k in _ROW_KEYS if key.endswith(f"_{k}")), None)
            if suffix is None:
                continue
            name = key[: -len(suffix) - 1]
            rows = found.reference_rows if name in REFERENCE_ROWS else found.strategies
            rows.setdefault(name, {})[suffix] = value
    return found


def _study_variant(config: dict[str, Any]) -> tuple[str, str, str] | None:
    parts = str(config.get("name") or "").split("/")
    return (parts[-3], parts[-2], parts[-1]) if len(parts) >= 3 else None


def read_run(run: RunDir) -> History:
    """A run folder's evaluations (files and val lines merged by step) and training lines; RunError when it is
    not a run folder or its run.json cannot be read."""
    if not run.exists():
        raise RunError(f"{run.path}: not a run folder (no run.json)")
    info = run.read_info()
    lines = run.read_metrics()
    by_step: dict[int, Evaluation] = {}
    for line in lines:
        if line.get("split") == "val" and is_number(line.get("step")):
            by_step[int(line["step"])] = evaluation_of_line(line)  # a step logged again: the last line counts
    for result in run.validation_evaluations():
        found = evaluation_of(result)
        if found.step is None:
            continue
        known = by_step.setdefault(found.step, found)
        if known is not found:  # the file holds every metric, the line a summary: the file's numbers win
            known.num_images = found.num_images
            known.epoch = known.epoch if known.epoch is not None else found.epoch
            for mine, theirs in ((known.losses, found.losses), (known.retrieval, found.retrieval),
                                 (known.matching, found.matching)):
                mine.update(theirs)
            for mine_rows, their_rows in ((known.strategies, found.strategies),
                                          (known.reference_rows, found.reference_rows)):
                for name, numbers in their_rows.items():
                    mine_rows[name] = {**mine_rows.get(name, {}), **numbers}
    train: dict[int, dict[str, Any]] = {}
    for line in lines:
        if line.get("split") == "train" and is_number(line.get("step")):
            train[int(line["step"])] = line
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    error = info.get("error") if isinstance(info.get("error"), str) else None
    return History(run.name, "run", str(run.path), str(info.get("status")) if info.get("status") else None, error,
                   config, [by_step[s] for s in sorted(by_step)], [train[s] for s in sorted(train)],
                   _study_variant(config))


def record_history(record: dict[str, Any], path: Path) -> History:
    """A study record's history (every validation evaluation, the thinned training log) or, for a record written
    before records kept one, its reported evaluation alone."""
    missing = [key for key in ("evaluation", "config", "epoch") if key not in record]
    if missing:
        raise RunError(f"{path}: not a study result record (no {', '.join(missing)})")
    history = record.get("history") or {}
    if not isinstance(history, dict):
        raise RunError(f"{path}: its history should be an object, found {type(history).__name__}")
    evaluations = [evaluation_of(entry) for entry in history.get("evaluations") or [] if isinstance(entry, dict)]
    evaluations.sort(key=lambda e: -1 if e.step is None else e.step)
    if not evaluations and isinstance(record["evaluation"], dict):
        evaluations = [evaluation_of(record["evaluation"], epoch=as_int(record.get("epoch")),
                                     split=str(record.get("split") or "test"))]
    train = [line for line in history.get("train") or [] if isinstance(line, dict) and is_number(line.get("step"))]
    config = record["config"] if isinstance(record["config"], dict) else {}
    variant = ((path.parent.name, str(record["stage"]), str(record["variant"]))
               if "stage" in record and "variant" in record else _study_variant(config))
    return History(f"{path.parent.name}/{path.stem}", "record", str(path), "recorded", None, config, evaluations,
                   sorted(train, key=lambda line: line["step"]), variant)


def read_record(path: str | Path) -> History:
    path = Path(path)
    return record_history(read_json(path, "study result record"), path)
