"""The committed study records (studies/results/<plan>/*.json) and what the remedies cite from them: per-variant
means, the effect of switching decoding strategy, and the remedy text a finding carries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...io import is_number
from ...paths import PROJECT_ROOT
from ...runs.rundir import RunError, read_json
from ..metrics import metric
from .reading import Evaluation, History, as_int, evaluation_of
from .report import shown

RECORDS_DIR = PROJECT_ROOT / "studies" / "results"  # the committed records: the remedies' measurements


@dataclass(frozen=True)
class RecordedRun:
    plan: str
    stage: str
    variant: str
    seed: int | None
    chosen: str
    evaluation: Evaluation
    path: str
    text_only: bool = False  # a text-only stage (no image input): no yardstick for an image captioner

    @property
    def group(self) -> tuple[str, str, str]:
        return self.plan, self.stage, self.variant


def variant_label(group: tuple[str, str, str]) -> str:
    """"recipes: original/original", how the study table names a variant, with its plan."""
    plan, stage, variant = group
    return f"{plan}: {stage}/{variant}"


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(key in value for key in ("evaluation", "config", "epoch", "chosen"))


@functools.lru_cache(maxsize=4)
def _records(root: str, stamp: tuple[tuple[str, int], ...]) -> tuple[RecordedRun, ...]:
    found = []
    for name, _ in stamp:
        path = Path(name)
        try:
            record = read_json(path, "study result record")
        except RunError:
            continue
        if not _is_record(record) or not isinstance(record["evaluation"], dict) or not isinstance(record["config"],
                                                                                                  dict):
            continue  # a CapFilt summary or another file beside the records
        found.append(RecordedRun(path.parent.name, str(record.get("stage", "")), str(record.get("variant", "")),
                                 as_int(record.get("seed")), str(record.get("chosen")),
                                 evaluation_of(record["evaluation"], split=str(record.get("split", "test"))),
                                 str(path), bool((record["config"].get("model") or {}).get("text_only"))))
    return tuple(found)


def committed_records(root: str | Path = RECORDS_DIR) -> list[RecordedRun]:
    """Every study record under `root` (<plan>/<run>.json), read once per change of the files."""
    files = sorted(Path(root).glob("*/*.json"))
    stamp = tuple((str(p), p.stat().st_mtime_ns) for p in files if p.is_file())
    return list(_records(str(root), stamp))


def average(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def variant_means(records: Sequence[RecordedRun], key: str) -> dict[tuple[str, str, str], dict[str, tuple[float, int]]]:
    """{variant: {strategy or reference row: (mean of `key` over its seeds, seeds)}}."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for run in records:
        for rows in (run.evaluation.strategies, run.evaluation.reference_rows):
            for name, numbers in rows.items():
                if is_number(numbers.get(key)):
                    values.setdefault(run.group, {}).setdefault(name, []).append(float(numbers[key]))
    return {group: {name: (average(v), len(v)) for name, v in by_name.items()} for group, by_name in values.items()}


def strategy_effects(records: Sequence[RecordedRun], key: str, strategy: str
                     ) -> dict[tuple[str, str, str], dict[str, tuple[float, float, int]]]:
    """What switching from `strategy` to each other decoding strategy did to `key` in each recorded variant:
    {variant: {other strategy: (mean under `strategy`, mean under the other, seeds)}}, means over the seeds that
    have both."""
    effects: dict[tuple[str, str, str], dict[str, tuple[float, float, int]]] = {}
    pairs: dict[tuple[tuple[str, str, str], str], list[tuple[float, float]]] = {}
    for run in records:
        base = run.evaluation.strategies.get(strategy, {}).get(key)
        if not is_number(base):
            continue
        for name, numbers in run.evaluation.strategies.items():
            if name != strategy and is_number(numbers.get(key)):
                pairs.setdefault((run.group, name), []).append((float(base), float(numbers[key])))
    for (group, name), values in sorted(pairs.items()):
        effects.setdefault(group, {})[name] = (average([a for a, _ in values]), average([b for _, b in values]),
                                               len(values))
    return effects


def _record_mean(records: Sequence[RecordedRun], key: str) -> dict[tuple[str, str, str], tuple[float, int]]:
    """{variant: (mean of a retrieval or matching number over its seeds, seeds)}."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for run in records:
        value = run.evaluation.value(key)
        if value is not None:
            values.setdefault(run.group, []).append(value)
    return {group: (average(v), len(v)) for group, v in values.items()}


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def _better(key: str, new: float, old: float) -> bool:
    declared = metric(key)
    return new > old if declared is not None and declared.better == "higher" else new < old


def own_strategy_remedy(evaluation: Evaluation, strategy: str, key: str) -> str | None:
    """The other strategies of the same evaluation that do better on `key`, best first, with their CIDEr."""
    mine = evaluation.strategies.get(strategy, {})
    if not is_number(mine.get(key)):
        return None
    better = sorted(((name, float(m[key])) for name, m in evaluation.strategies.items()
                     if name != strategy and is_number(m.get(key)) and _better(key, float(m[key]), mine[key])),
                    key=lambda item: item[1], reverse=metric(key).better == "higher")
    if not better:
        return None
    cider = mine.get("cider")
    parts = []
    for name, value in better:
        theirs = evaluation.strategies[name].get("cider")
        cost = (f", CIDEr {shown('cider', theirs)} against {shown('cider', cider)}"
                if is_number(theirs) and is_number(cider) else "")
        parts.append(f"{name} {shown(key, mine[key])} → {shown(key, value)}{cost}")
    return f"in this evaluation: {'; '.join(parts)}"


def records_strategy_remedy(records: Sequence[RecordedRun], history: History, strategy: str, key: str,
                             value: float) -> str | None:
    """What the records measured: in this run's own variant (a study run or record), what the other strategies
    did to `key` over its seeds; and the recorded variant that does best under `strategy`, where it beats
    `value`."""
    parts = []
    own = history.variant
    effects = strategy_effects(records, key, strategy).get(own, {}) if own else {}
    if effects:
        better = [(name, a, b, n) for name, (a, b, n) in effects.items() if _better(key, b, a)]
        if better:
            parts.append(f"records of {variant_label(own)}: " + "; ".join(
                f"{name} {shown(key, a)} → {shown(key, b)} ({seeds_text(n)})" for name, a, b, n in better))
        else:
            parts.append(f"records of {variant_label(own)}: no other strategy does better than {strategy} "
                         f"({', '.join(f'{name} {shown(key, b)}' for name, (_, b, _) in effects.items())})")
    imaging = [run for run in records if not run.text_only]
    means = {group: by_name[strategy] for group, by_name in variant_means(imaging, key).items()
             if strategy in by_name and group != own}
    if means:
        pick = max if metric(key).better == "higher" else min
        group = pick(means, key=lambda g: means[g][0])
        mean, n = means[group]
        if _better(key, mean, value):
            parts.append(f"best recorded {strategy}: {variant_label(group)} {shown(key, mean)} ({seeds_text(n)})")
    return "; ".join(parts) or None


def records_value_remedy(records: Sequence[RecordedRun], key: str, value: float | None) -> str | None:
    """The recorded variant with the best mean `key` (a retrieval or matching number), where it beats `value`."""
    means = _record_mean([run for run in records if not run.text_only], key)
    if not means:
        return None
    group = max(means, key=lambda g: means[g][0])
    mean, n = means[group]
    if value is not None and not _better(key, mean, value):
        return None
    return f"best recorded: {variant_label(group)} {metric(key).label} {shown(key, mean)} ({seeds_text(n)})"


def join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None
