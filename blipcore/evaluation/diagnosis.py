"""Run diagnosis: what went wrong in a run, in words, with the evidence.

A diagnosis reads what a run left behind — its validation evaluations (eval/*.json, and metrics.jsonl's val
lines, which hold the summary numbers even where no evaluation file is kept), its training log (metrics.jsonl's
train lines) and run.json — or a study record (studies/results/<plan>/*.json: its `history` when it has one,
else its reported evaluation). It returns findings, each with a name (FINDINGS), a severity
(metrics.SEVERITIES), when it started (step, and epoch where known), the evidence as numbers labelled by the
metric registry, the dashboard page and tab that shows it, and the remedy that the run's own evaluation or the
committed records measured, where one exists. Every level a finding is judged against is declared once, with
its reason, in metrics.THRESHOLDS.

Findings about one evaluation's numbers (collapse, reference rows, alignment, ITM) are judged at every
evaluation: one that no longer holds at the latest evaluation is reported as resolved, at severity "info", with
the severity it reached and the evaluation it stopped at. Memorisation and over-confidence compare evaluations;
optimisation faults and a starved step read the training log. A run still being written, a killed one (a partial
last metrics line) and one with no evaluation yet are diagnosed from what is there.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import is_number
from ..paths import PROJECT_ROOT
from ..runs.rundir import RunDir, RunError, list_runs, read_json
from .metrics import REFERENCE_ROWS, SEVERITIES, THRESHOLDS, Threshold, metric, metrics_in, thresholds

RECORDS_DIR = PROJECT_ROOT / "studies" / "results"  # the committed records: the remedies' measurements


# --- what a diagnosis can find ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """A finding's name, what it means, and the dashboard page and tab that show its numbers."""

    name: str
    meaning: str
    page: str
    tab: str


TOKEN_REPEAT, CAPTION_COLLAPSE = "token-repeat collapse", "caption collapse"
BELOW_ROW = "no better than a reference row"
ALIGNMENT, ITM, MEMORISATION = "alignment near chance", "ITM at chance", "memorisation"
OVER_CONFIDENCE, OPTIMISATION, STARVED = "over-confidence", "optimisation fault", "starved step"

FINDINGS: tuple[Kind, ...] = (
    Kind(TOKEN_REPEAT, "the decoder repeats words inside a caption (\"a dog dog dog\", the write-up's \"carriages "
         "carriages ...\"): the repetition rate or the longest run of one word is high", "Training",
         "Captioning and collapse"),
    Kind(CAPTION_COLLAPSE, "one caption for many images: the share of images given the single most common caption "
         "is high, so the decoder barely looks at the image", "Training", "Captioning and collapse"),
    Kind(BELOW_ROW, "the best decoding strategy's CIDEr is at or below a reference row's: the most frequent "
         "training caption given to every image (learned nothing) or the nearest training images' caption "
         "(retrieval, no generation)", "Training", "Captioning and collapse"),
    Kind(ALIGNMENT, "the ITC embeddings barely rank an image's own caption first: R@1 of both directions within a "
         "few times the chance level of the gallery (100/N % for N images), or ITC match AUC near 0.5",
         "Training", "Retrieval"),
    Kind(ITM, "the ITM head, where it is trained, tells an image's own caption from another image's no better "
         "than a coin (match AUC near 0.5)", "Training", "Retrieval"),
    Kind(MEMORISATION, "a validation loss has risen past its minimum and the dev numbers that loss trains for "
         "(ranking: R sum, text→image R@1, match AUC; captions: CIDEr) have fallen from their best: the later "
         "checkpoints are worse", "Training", "Losses"),
    Kind(OVER_CONFIDENCE, "a validation loss has risen past its minimum while the dev numbers it trains for still "
         "improve or hold: the model is more confident on its mistakes, not worse at ranking or captioning "
         "(milder than memorisation)", "Training", "Losses"),
    Kind(OPTIMISATION, "a loss spike, a non-finite loss or gradient norm, or a learning rate at its floor while "
         "the training loss still falls (the schedule, not convergence, ended learning)", "Training", "Losses"),
    Kind(STARVED, "the training loop waits for its next batch a large share of the time (data_wait_share): the "
         "data loader, not the model, sets the pace", "Training", "Optimisation"),
)
KINDS = {kind.name: kind for kind in FINDINGS}
assert {t.finding for t in THRESHOLDS} <= set(KINDS), "a threshold names a finding FINDINGS does not declare"


def severity_rank(severity: str) -> int:
    """The place of a severity in metrics.SEVERITIES (0 = mildest); ValueError for another word."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: one of {', '.join(SEVERITIES)}")
    return SEVERITIES.index(severity)


def worst(severities: Iterable[str]) -> str | None:
    """The most severe of `severities`, None for none."""
    found = list(severities)
    return max(found, key=severity_rank) if found else None


# --- findings ---------------------------------------------------------------------------------------------
def _shown(key: str, value: Any) -> str:
    declared = metric(key)
    if declared is None:
        return "-" if value is None else str(value)
    text = declared.format(value)
    return f"\"{text}\"" if declared.fmt == "s" and value is not None else text


@dataclass(frozen=True)
class Evidence:
    """One number of a finding: the registry key it is (its label and format come from metrics.metric), its value,
    the value it changed from (`before`, if it is a change), and what the value is (`context`)."""

    key: str
    value: Any
    context: str = ""
    before: Any = None

    @property
    def label(self) -> str:
        declared = metric(self.key)
        return declared.label if declared is not None else self.key

    def text(self) -> str:
        value = _shown(self.key, self.value)
        if self.before is not None:
            value = f"{_shown(self.key, self.before)} → {value}"
        return f"{self.label} {value}" + (f" ({self.context})" if self.context else "")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "value": self.value, "before": self.before,
                "context": self.context, "text": self.text()}


def _epoch_text(epoch: float | None) -> str:
    return "" if epoch is None else f"{round(epoch, 2):g}"


def onset_text(step: int | None, epoch: float | None, split: str = "val") -> str:
    """"step 468 (epoch 1)", "epoch 1 (test)" for a record's reported evaluation, "" when nothing is known."""
    if step is not None:
        return f"step {step:,}" + (f" (epoch {_epoch_text(epoch)})" if epoch is not None else "")
    if epoch is not None:
        return f"epoch {_epoch_text(epoch)}" + (f" ({split})" if split != "val" else "")
    return ""


@dataclass
class Finding:
    """One thing that went wrong in a run. `severity` is what it is now; a finding that no longer holds at the
    latest evaluation is "info", with `peak` the severity it reached and `until` where it stopped."""

    name: str
    severity: str
    summary: str
    step: int | None
    epoch: float | None
    evidence: list[Evidence]
    subject: str = ""  # the decoding strategy, reference row or fault it is about
    remedy: str | None = None
    peak: str | None = None
    until: str | None = None  # the evaluation at which a resolved finding no longer held
    held: str | None = None  # at how many evaluations a resolved finding held ("2 of 8")
    split: str = "val"
    tab: str | None = None  # the dashboard tab, where it is not the kind's own

    @property
    def title(self) -> str:
        return f"{self.name} ({self.subject})" if self.subject else self.name

    @property
    def page(self) -> str:
        return KINDS[self.name].page

    @property
    def where(self) -> tuple[str, str]:
        """(page, tab) of the dashboard that shows the numbers."""
        return self.page, self.tab or KINDS[self.name].tab

    @property
    def onset(self) -> str:
        return onset_text(self.step, self.epoch, self.split)

    @property
    def resolved(self) -> bool:
        return self.until is not None

    def severity_text(self) -> str:
        return f"{self.severity} (was {self.peak})" if self.resolved and self.peak else self.severity

    def period(self) -> str:
        """When it held: its onset, and for a resolved finding how often and until when."""
        onset = self.onset or "-"
        return f"{onset}, at {self.held} evaluations, over by {self.until}" if self.until else onset

    def line(self) -> str:
        """One line: severity, name, onset and evidence (the remedy after an arrow)."""
        parts = [f"{self.severity_text():<7}", self.title, self.period()]
        parts.append("; ".join(e.text() for e in self.evidence) or self.summary)
        return "  ".join(parts) + (f"  -> {self.remedy}" if self.remedy else "")

    def to_dict(self) -> dict[str, Any]:
        page, tab = self.where
        return {"name": self.name, "subject": self.subject, "severity": self.severity, "peak": self.peak,
                "step": self.step, "epoch": self.epoch, "onset": self.onset, "until": self.until, "held": self.held,
                "summary": self.summary, "evidence": [e.to_dict() for e in self.evidence], "page": page,
                "tab": tab, "remedy": self.remedy}


@dataclass
class Diagnosis:
    """A run's findings in order of onset; `error` says why it could not be read (then it has none)."""

    name: str
    source: str  # "run" (a run folder) or "record" (a study record)
    path: str
    status: str | None
    evaluations: int
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    variant: str | None = None  # "<stage>/<variant>" of a study run or record

    @property
    def worst(self) -> str | None:
        return worst(f.severity for f in self.findings)

    @property
    def health(self) -> str:
        """The worst severity, "healthy" without a finding, "unreadable" for a run that could not be read."""
        return "unreadable" if self.error else self.worst or "healthy"

    def reaches(self, severity: str) -> bool:
        """Whether some finding is at least as severe as `severity`."""
        return any(severity_rank(f.severity) >= severity_rank(severity) for f in self.findings)

    def summary_line(self) -> str:
        """Every finding in one line ("healthy" without one)."""
        if self.error:
            return self.error
        return "; ".join(f"{f.title} ({f.severity_text()}, {f.onset or '-'})" for f in self.findings) or "healthy"

    def text(self) -> str:
        """One block: the run, then a line per finding."""
        status = f"{self.status}, " if self.status else ""
        head = f"{self.name} ({status}{self.evaluations} evaluation{'s' * (self.evaluations != 1)}): {self.health}"
        if self.error:
            return f"{head}\n  {self.error}"
        return "\n".join([head, *(f"  {f.line()}" for f in self.findings)])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "path": self.path, "status": self.status,
                "evaluations": self.evaluations, "health": self.health, "error": self.error, "variant": self.variant,
                "findings": [f.to_dict() for f in self.findings]}


# --- what a diagnosis reads -------------------------------------------------------------------------------
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


def _int(value: Any) -> int | None:
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
    return Evaluation(step if step is not None else _int(result.get("step")), epoch, split,
                      _int(result.get("num_images")), _numbers(result.get("losses")),
                      _numbers(result.get("retrieval")), _numbers(result.get("matching")), rows("strategies"),
                      rows("reference_rows"))


# Per-strategy keys of a val line, longest first ("max_longest_run" before "longest_run").
_ROW_KEYS = sorted((m.key for group in ("captioning", "collapse") for m in metrics_in(group)), key=len, reverse=True)


def evaluation_of_line(line: dict[str, Any]) -> Evaluation:
    """A metrics.jsonl val line's numbers (the summary an evaluation writes beside its file)."""
    found = Evaluation(_int(line.get("step")), line.get("epoch") if is_number(line.get("epoch")) else None)
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
        evaluations = [evaluation_of(record["evaluation"], epoch=_int(record.get("epoch")),
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


# --- the committed records: what the remedies measured ----------------------------------------------------
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
                                 _int(record.get("seed")), str(record.get("chosen")),
                                 evaluation_of(record["evaluation"], split=str(record.get("split", "test"))),
                                 str(path), bool((record["config"].get("model") or {}).get("text_only"))))
    return tuple(found)


def committed_records(root: str | Path = RECORDS_DIR) -> list[RecordedRun]:
    """Every study record under `root` (<plan>/<run>.json), read once per change of the files."""
    files = sorted(Path(root).glob("*/*.json"))
    stamp = tuple((str(p), p.stat().st_mtime_ns) for p in files if p.is_file())
    return list(_records(str(root), stamp))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def variant_means(records: Sequence[RecordedRun], key: str) -> dict[tuple[str, str, str], dict[str, tuple[float, int]]]:
    """{variant: {strategy or reference row: (mean of `key` over its seeds, seeds)}}."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for run in records:
        for rows in (run.evaluation.strategies, run.evaluation.reference_rows):
            for name, numbers in rows.items():
                if is_number(numbers.get(key)):
                    values.setdefault(run.group, {}).setdefault(name, []).append(float(numbers[key]))
    return {group: {name: (_mean(v), len(v)) for name, v in by_name.items()} for group, by_name in values.items()}


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
        effects.setdefault(group, {})[name] = (_mean([a for a, _ in values]), _mean([b for _, b in values]),
                                               len(values))
    return effects


def _record_mean(records: Sequence[RecordedRun], key: str) -> dict[tuple[str, str, str], tuple[float, int]]:
    """{variant: (mean of a retrieval or matching number over its seeds, seeds)}."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for run in records:
        value = run.evaluation.value(key)
        if value is not None:
            values.setdefault(run.group, []).append(value)
    return {group: (_mean(v), len(v)) for group, v in values.items()}


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def _better(key: str, new: float, old: float) -> bool:
    declared = metric(key)
    return new > old if declared is not None and declared.better == "higher" else new < old


def _own_strategy_remedy(evaluation: Evaluation, strategy: str, key: str) -> str | None:
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
        cost = (f", CIDEr {_shown('cider', theirs)} against {_shown('cider', cider)}"
                if is_number(theirs) and is_number(cider) else "")
        parts.append(f"{name} {_shown(key, mine[key])} → {_shown(key, value)}{cost}")
    return f"in this evaluation: {'; '.join(parts)}"


def _records_strategy_remedy(records: Sequence[RecordedRun], history: History, strategy: str, key: str,
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
                f"{name} {_shown(key, a)} → {_shown(key, b)} ({_seeds(n)})" for name, a, b, n in better))
        else:
            parts.append(f"records of {variant_label(own)}: no other strategy does better than {strategy} "
                         f"({', '.join(f'{name} {_shown(key, b)}' for name, (_, b, _) in effects.items())})")
    imaging = [run for run in records if not run.text_only]
    means = {group: by_name[strategy] for group, by_name in variant_means(imaging, key).items()
             if strategy in by_name and group != own}
    if means:
        pick = max if metric(key).better == "higher" else min
        group = pick(means, key=lambda g: means[g][0])
        mean, n = means[group]
        if _better(key, mean, value):
            parts.append(f"best recorded {strategy}: {variant_label(group)} {_shown(key, mean)} ({_seeds(n)})")
    return "; ".join(parts) or None


def _records_value_remedy(records: Sequence[RecordedRun], key: str, value: float | None) -> str | None:
    """The recorded variant with the best mean `key` (a retrieval or matching number), where it beats `value`."""
    means = _record_mean([run for run in records if not run.text_only], key)
    if not means:
        return None
    group = max(means, key=lambda g: means[g][0])
    mean, n = means[group]
    if value is not None and not _better(key, mean, value):
        return None
    return f"best recorded: {variant_label(group)} {metric(key).label} {_shown(key, mean)} ({_seeds(n)})"


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


# --- judging one evaluation ------------------------------------------------------------------------------
@dataclass
class _Hit:
    name: str
    subject: str
    severity: str
    summary: str
    evidence: list[Evidence]
    remedy: str | None = None


def _fired(levels: list[Threshold], value: float, worse_when_high: bool, scale: float = 1.0) -> Threshold | None:
    """The most severe of `levels` that `value` passes."""
    for threshold in levels:  # most severe first
        level = threshold.level * scale
        if (value >= level) if worse_when_high else (value <= level):
            return threshold
    return None


def _judged(ev: Evaluation, strategy: str, severity: str) -> tuple[str, str]:
    """(severity, note): a collapse under a strategy that is neither greedy (the decoder's own behaviour) nor the
    evaluation's best by CIDEr (the one a user would pick, as a study's dev choice does) is worth knowing, not a
    fault of the run: at most "info"."""
    best = ev.best_strategy("cider")
    if strategy == "greedy" or best is None or strategy == best[0] or severity == "info":
        return severity, ""
    return "info", f" (info: {best[0]} has the best CIDEr here)"


def _token_repeat(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[_Hit]:
    hits = []
    for strategy, numbers in ev.strategies.items():
        fired = []
        for key in ("repetition_rate", "longest_run", "max_longest_run"):
            if is_number(numbers.get(key)) and (t := _fired(thresholds(TOKEN_REPEAT, key), numbers[key], True)):
                fired.append((t, key))
        if not fired:
            continue
        severity, note = _judged(ev, strategy, worst(t.severity for t, _ in fired))
        main = fired[0][1]
        evidence = [Evidence(f"{strategy}_{key}", numbers[key], t.condition()) for t, key in fired]
        rate = numbers.get("repetition_rate")
        summary = (f"{strategy} captions repeat words" + (f": {rate:.0%} of their words repeat an earlier word of "
                                                          "the same caption" if is_number(rate) else "") + note)
        remedy = _join(_own_strategy_remedy(ev, strategy, main),
                       _records_strategy_remedy(records, history, strategy, main, numbers[main]))
        hits.append(_Hit(TOKEN_REPEAT, strategy, severity, summary, evidence, remedy))
    return hits


def _caption_collapse(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[_Hit]:
    if history.setting("model", "text_only"):
        return []  # a text-only model sees no image: one caption for all is what it can do
    hits = []
    for strategy, numbers in ev.strategies.items():
        share = numbers.get("top_caption_share")
        if not is_number(share) or not (t := _fired(thresholds(CAPTION_COLLAPSE, "top_caption_share"), share, True)):
            continue
        evidence = [Evidence(f"{strategy}_top_caption_share", share, t.condition())]
        for key in ("unique_captions", "top_caption"):
            if numbers.get(key) is not None:
                evidence.append(Evidence(f"{strategy}_{key}", numbers[key]))
        severity, note = _judged(ev, strategy, t.severity)
        summary = f"{strategy} decoding gives one caption to {share:.0%} of the images{note}"
        remedy = _join(_own_strategy_remedy(ev, strategy, "top_caption_share"),
                       _records_strategy_remedy(records, history, strategy, "top_caption_share", share))
        hits.append(_Hit(CAPTION_COLLAPSE, strategy, severity, summary, evidence, remedy))
    return hits


def _below_rows(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[_Hit]:
    best = ev.best_strategy("cider")
    if best is None:
        return []
    strategy, cider = best
    hits = []
    for row, numbers in ev.reference_rows.items():
        key = f"{row}_cider"
        if not is_number(numbers.get("cider")) or not any(t.key == key for t in THRESHOLDS if t.finding == BELOW_ROW):
            continue
        t = _fired(thresholds(BELOW_ROW, key), cider - numbers["cider"], False)
        if t is None:
            continue
        evidence = [Evidence(f"{strategy}_cider", cider, "the best strategy"), Evidence(key, numbers["cider"])]
        summary = f"the best strategy ({strategy}) scores CIDEr {cider:.3f}, the {row} row {numbers['cider']:.3f}"
        remedy = None
        chosen = {}
        for run in (run for run in records if not run.text_only):
            row_cider = run.evaluation.reference_rows.get(row, {}).get("cider")
            own = run.evaluation.strategies.get(run.chosen, {}).get("cider")
            if is_number(row_cider) and is_number(own):
                chosen.setdefault(run.group, []).append((own, row_cider))
        if chosen:
            group = max(chosen, key=lambda g: _mean([a for a, _ in chosen[g]]))
            values = chosen[group]
            remedy = (f"best recorded: {variant_label(group)}, its dev-chosen strategy's CIDEr "
                      f"{_mean([a for a, _ in values]):.3f} against the {row} row's {_mean([b for _, b in values]):.3f}"
                      f" ({_seeds(len(values))})")
        hits.append(_Hit(BELOW_ROW, row, t.severity, summary, evidence, remedy))
    return hits


def _images(ev: Evaluation, history: History) -> int | None:
    if ev.num_images:
        return ev.num_images
    configured = history.setting("data", "eval_images")
    return int(configured) if is_number(configured) and configured > 0 else None


def _alignment(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[_Hit]:
    fired: list[tuple[Threshold, list[Evidence]]] = []
    n = _images(ev, history)
    r1 = [(key, ev.retrieval[key]) for key in ("i2t_r1", "t2i_r1") if is_number(ev.retrieval.get(key))]
    if n and len(r1) == 2:
        chance = 100.0 / n
        t = _fired(thresholds(ALIGNMENT, "i2t_r1"), max(v for _, v in r1), False, scale=chance)
        if t is not None:
            chance_text = f"chance {metric('i2t_r1').format(chance)} for {n:,} images; {t.condition()}"
            fired.append((t, [Evidence(key, value, f"{value / chance:.1f} × chance" + ("" if i else f", {chance_text}"))
                              for i, (key, value) in enumerate(r1)]))
    auc = ev.matching.get("itc_match_auc")
    if is_number(auc) and (t := _fired(thresholds(ALIGNMENT, "itc_match_auc"), auc, False)):
        fired.append((t, [Evidence("itc_match_auc", auc, f"0.5 = chance; {t.condition()}")]))
    if not fired:
        return []
    severity = worst(t.severity for t, _ in fired)
    evidence = [e for _, found in fired for e in found]
    summary = "image-text alignment near chance: the ITC embeddings barely find an image's own caption"
    remedy = _records_value_remedy(records, "itc_match_auc", ev.matching.get("itc_match_auc"))
    return [_Hit(ALIGNMENT, "", severity, summary, evidence, remedy)]


def _itm(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[_Hit]:
    auc = ev.matching.get("itm_match_auc")
    weight = history.setting("model", "itm_weight")
    if not is_number(auc) or (is_number(weight) and weight <= 0):
        return []
    t = _fired(thresholds(ITM, "itm_match_auc"), auc, False)
    if t is None:
        return []
    evidence = [Evidence("itm_match_auc", auc, f"0.5 = chance; {t.condition()}")]
    if is_number(ev.matching.get("itc_match_auc")):
        evidence.append(Evidence("itc_match_auc", ev.matching["itc_match_auc"], "the same pairs"))
    summary = "the ITM head tells an image's own caption from another image's little better than a coin"
    return [_Hit(ITM, "", t.severity, summary, evidence, _records_value_remedy(records, "itm_match_auc", auc))]


EVALUATION_CHECKS = (_token_repeat, _caption_collapse, _below_rows, _alignment, _itm)


def _evaluation_findings(history: History, records: Sequence[RecordedRun]) -> list[Finding]:
    evals = history.evaluations
    per_eval = [{(hit.name, hit.subject): hit for check in EVALUATION_CHECKS for hit in check(ev, history, records)}
                for ev in evals]
    keys = list(dict.fromkeys(key for hits in per_eval for key in hits))
    findings = []
    last = len(evals) - 1
    for key in keys:
        held = [i for i, hits in enumerate(per_eval) if key in hits]
        if held[-1] == last:  # it holds now: since the start of its latest unbroken stretch
            start = last
            while start - 1 in held:
                start -= 1
            hit, onset = per_eval[last][key], evals[start]
            findings.append(Finding(hit.name, hit.severity, hit.summary, onset.step, onset.epoch, hit.evidence,
                                    hit.subject, hit.remedy, split=onset.split))
        else:  # it held once and stopped: reported as it was at its worst
            peak_index = max(held, key=lambda i: (severity_rank(per_eval[i][key].severity), -i))
            hit, onset, stopped = per_eval[peak_index][key], evals[held[0]], evals[held[-1] + 1]
            findings.append(Finding(hit.name, "info", f"{hit.summary} (at {evals[peak_index].where}; resolved)",
                                    onset.step, onset.epoch, hit.evidence, hit.subject, hit.remedy,
                                    peak=hit.severity, until=stopped.where, held=f"{len(held)} of {len(evals)}",
                                    split=onset.split))
    return findings


# --- comparing evaluations: memorisation and over-confidence ----------------------------------------------
# What each validation loss trains for, judged for a fall (R@1 of image→text is shown, not judged: N queries only)
PAIRED = {"val_itc": ("rsum", "t2i_r1", "itc_match_auc"), "val_itm": ("itm_match_auc",), "val_lm": ("cider",)}
SHOWN = {"val_itc": ("i2t_r1",)}


def _fall(values: list[tuple[int, float]], upto: int, key: str) -> tuple[float, int, float] | None:
    """(relative fall of the value at `upto` from the best before it, index of the best, best) — AUCs above 0.5."""
    seen = [(i, v) for i, v in values if i <= upto]
    if len(seen) < 2 or seen[-1][0] != upto:
        return None
    best_index, best = max(seen, key=lambda item: item[1])
    base = 0.5 if key.endswith("_match_auc") else 0.0
    if best <= base:
        return None
    return (best - seen[-1][1]) / (best - base), best_index, best


def _loss_findings(history: History) -> list[Finding]:
    evals = history.evaluations
    present = {key for ev in evals for key in ev.losses}
    losses = [key for key in PAIRED if key in present] or (["val_loss"] if "val_loss" in present else [])
    rise_level = thresholds(OVER_CONFIDENCE, "val_loss")[0]
    memorised: list[tuple[int, list[Evidence], list[str]]] = []
    confident: list[tuple[int, list[Evidence], list[str]]] = []
    for loss in losses:
        points = [(i, float(ev.losses[loss])) for i, ev in enumerate(evals) if is_number(ev.losses.get(loss))]
        if len(points) < 2:
            continue
        paired = PAIRED.get(loss, tuple(k for keys in PAIRED.values() for k in keys))
        series = {key: [(i, v) for i, ev in enumerate(evals) if (v := ev.value(key)) is not None] for key in paired}
        states = []
        for j, (index, value) in enumerate(points):
            low_index, low = min(points[: j + 1], key=lambda item: item[1])
            risen = index > low_index and low > 0 and (value - low) / low >= rise_level.level
            fallen = []
            for key, values in series.items():
                fall = _fall(values, index, key)
                level = thresholds(MEMORISATION, "cider" if key == "cider" else "rsum")[0]
                if risen and fall is not None and fall[0] >= level.level:
                    fallen.append((key, fall, level))
            states.append((MEMORISATION if fallen else OVER_CONFIDENCE) if risen else None)
        if states[-1] is None:
            continue
        start = len(states) - 1
        while start > 0 and states[start - 1] is not None and (states[-1] == OVER_CONFIDENCE
                                                               or states[start - 1] == MEMORISATION):
            start -= 1
        index, value = points[-1]
        low_index, low = min(points, key=lambda item: item[1])
        lowest = evals[low_index]
        evidence = [Evidence(loss, value, f"lowest at {lowest.where}; {(value - low) / low:+.1%}", before=low)]
        remedies = []
        if states[-1] == MEMORISATION:
            for key, values in series.items():
                fall = _fall(values, index, key)
                level = thresholds(MEMORISATION, "cider" if key == "cider" else "rsum")[0]
                if fall is None or fall[0] < level.level:
                    continue
                share, best_index, best = fall
                what = "the best strategy's; " if key == "cider" else ""
                evidence.append(Evidence(key, evals[index].value(key), f"{what}best at {evals[best_index].where}; "
                                                                        f"{share:.0%} below it", before=best))
                remedies.append(f"the best checkpoint by {metric(key).label} is at {evals[best_index].where} "
                                f"({_shown(key, best)})")
            memorised.append((points[start][0], evidence, remedies))
        else:
            for key in (*SHOWN.get(loss, ()), *paired):
                at_low, now = evals[low_index].value(key), evals[index].value(key)
                if at_low is not None and now is not None:
                    evidence.append(Evidence(key, now, "at the loss minimum → latest", before=at_low))
            improved = [key for key in paired if (a := evals[low_index].value(key)) is not None
                        and (b := evals[index].value(key)) is not None and b > a]
            if improved:
                remedies.append(f"{', '.join(metric(k).label for k in improved)} improved from the loss minimum "
                                f"({lowest.where}) to {evals[index].where}: choose checkpoints by "
                                f"{'these' if len(improved) > 1 else 'it'}, not by the validation loss")
            confident.append((points[start][0], evidence, remedies))
    findings = []
    for name, severity, found, summary in (
            (MEMORISATION, thresholds(MEMORISATION)[0].severity, memorised,
             "a validation loss rose past its minimum and the dev numbers it trains for fell from their best"),
            (OVER_CONFIDENCE, rise_level.severity, confident,
             "a validation loss rose past its minimum while the dev numbers it trains for still improve or hold")):
        if found:
            onset = evals[min(start for start, _, _ in found)]
            findings.append(Finding(name, severity, summary, onset.step, onset.epoch,
                                    [e for _, evidence, _ in found for e in evidence], split=onset.split,
                                    remedy=_join(*(r for _, _, remedies in found for r in remedies))))
    return findings


# --- the training log: optimisation faults and a starved step ---------------------------------------------
TERMS = ("loss", "itc", "lm", "itm", "grad_norm")  # the numbers of a train line that must be finite


def _line_epoch(line: dict[str, Any]) -> float | None:
    return line.get("epoch") if is_number(line.get("epoch")) else None


def _training_findings(history: History) -> list[Finding]:
    train = history.train
    findings = []
    # non-finite loss or gradient norm: in the log (NaN or null), or the error the trainer stopped with
    bad = next(((line, key) for line in train for key in TERMS if key in line and not is_number(line[key])), None)
    nonfinite = thresholds(OPTIMISATION, subject="non-finite")[0]
    stopped = re.search(r"NonFiniteLossError: step (\d+): (.*)", history.error or "")
    if bad is not None:
        line, key = bad
        findings.append(Finding(OPTIMISATION, nonfinite.severity, f"the {metric(key).label} is not finite",
                                int(line["step"]), _line_epoch(line), [Evidence(key, line[key], "not finite")],
                                subject="non-finite loss" if key != "grad_norm" else "non-finite gradient norm"))
    elif stopped:
        findings.append(Finding(OPTIMISATION, nonfinite.severity, f"the run stopped: {stopped.group(2)}",
                                int(stopped.group(1)), None, [], subject="non-finite loss"))
    # loss spikes: a line far above the median of the lines before it
    spike = thresholds(OPTIMISATION, "loss", "loss spike")[0]
    losses = [(line, float(line["loss"])) for line in train if is_number(line.get("loss"))]
    spikes = []
    for i in range(5, len(losses)):
        median = statistics.median(v for _, v in losses[max(0, i - 10): i])
        if median > 0 and losses[i][1] >= spike.level * median:
            spikes.append((losses[i][0], losses[i][1], median))
    if spikes:
        line, value, median = spikes[0]
        summary = (f"{len(spikes)} loss spike{'s' * (len(spikes) > 1)}: the training loss jumped to "
                   f"{value / median:.1f} × the median of the 10 lines before")
        evidence = [Evidence("loss", value, f"{value / median:.1f} × the median of the lines before; "
                                            f"≥ {spike.level_text()} ×", before=median)]
        if len(spikes) > 1:
            worst_line, worst_value, worst_median = max(spikes, key=lambda s: s[1] / s[2])
            evidence.append(Evidence("loss", worst_value, f"the largest, at step {int(worst_line['step']):,}",
                                     before=worst_median))
        findings.append(Finding(OPTIMISATION, spike.severity, summary, int(line["step"]), _line_epoch(line),
                                evidence, subject="loss spike"))
    findings += _lr_floor(history, losses)
    findings += _starved(train)
    return findings


def _lr_floor(history: History, losses: list[tuple[dict[str, Any], float]]) -> list[Finding]:
    near, falling = (thresholds(OPTIMISATION, key, "learning rate at its floor")[0] for key in ("lr", "loss"))
    rates = [(line, float(line["lr"])) for line, _ in losses if is_number(line.get("lr"))]
    if len(rates) < 4:
        return []
    configured = history.setting("train", "lr")
    peak = float(configured) if is_number(configured) and configured > 0 else max(v for _, v in rates)
    ratio = history.setting("train", "min_lr_ratio")
    floor = peak * (float(ratio) if is_number(ratio) else 0.0)
    limit = floor + near.level * (peak - floor)
    start = len(rates)
    while start > 0 and rates[start - 1][1] <= limit:
        start -= 1
    stretch = [float(line["loss"]) for line, _ in rates[start:]]
    if start == 0 or len(stretch) < 4:  # never above the floor (warm-up still going) or too few lines there
        return []
    half = len(stretch) // 2
    before, after = _mean(stretch[:half]), _mean(stretch[half:])
    fall = (before - after) / before if before > 0 else 0.0
    if fall < falling.level:
        return []
    line, rate = rates[start]
    evidence = [Evidence("lr", rate, f"from step {int(line['step']):,}; floor {floor:.2e}, peak {peak:.2e}"),
                Evidence("loss", after, f"mean of each half of the {len(stretch)} lines at the floor; "
                                        f"{-fall:+.1%}", before=before)]
    summary = ("the learning rate reached its floor while the training loss was still falling: the schedule ended "
               "learning")
    return [Finding(OPTIMISATION, near.severity, summary, int(line["step"]), _line_epoch(line), evidence,
                    subject="learning rate at its floor", tab="Optimisation")]


def _starved(train: list[dict[str, Any]]) -> list[Finding]:
    level = thresholds(STARVED, "data_wait_share")[0]
    shares = [(line, float(line["data_wait_share"])) for line in train if is_number(line.get("data_wait_share"))]
    if len(shares) < 3:
        return []  # older runs do not log it
    median = statistics.median(v for _, v in shares)
    if median < level.level:
        return []
    line = next(line for line, v in shares if v >= level.level)
    evidence = [Evidence("data_wait_share", median, f"median of {len(shares)} lines; ≥ {level.level_text()}"),
                Evidence("data_wait_share", max(v for _, v in shares), "the highest")]
    speeds = [float(line["samples_per_s"]) for line, _ in shares if is_number(line.get("samples_per_s"))]
    if speeds:
        evidence.append(Evidence("samples_per_s", statistics.median(speeds), "median"))
    summary = f"the training loop waited for its next batch {median:.0%} of the time (median)"
    return [Finding(STARVED, level.severity, summary, int(line["step"]), _line_epoch(line), evidence)]


# --- diagnosing ---------------------------------------------------------------------------------------------
def _onset_key(finding: Finding) -> tuple[float, float, int, int]:
    step = finding.step if finding.step is not None else math.inf
    epoch = finding.epoch if finding.epoch is not None else math.inf
    return step, epoch, list(KINDS).index(finding.name), -severity_rank(finding.severity)


def diagnose(history: History, records: Sequence[RecordedRun] | None = None) -> Diagnosis:
    """The findings of a run or record, in order of onset. `records` (default: the committed records) are what
    the remedies cite."""
    records = committed_records() if records is None else records
    findings = (_evaluation_findings(history, records) + _loss_findings(history) + _training_findings(history))
    return Diagnosis(history.name, history.source, history.path, history.status, len(history.evaluations),
                     sorted(findings, key=_onset_key),
                     variant="/".join(history.variant[1:]) if history.variant else None)


def diagnose_run(run: RunDir | str | Path, records: Sequence[RecordedRun] | None = None) -> Diagnosis:
    """A run folder's diagnosis; RunError when it is not a run folder or cannot be read."""
    return diagnose(read_run(run if isinstance(run, RunDir) else RunDir(run)), records)


def diagnose_record(path: str | Path, records: Sequence[RecordedRun] | None = None) -> Diagnosis:
    """A study record's diagnosis; RunError when it is not a readable record."""
    return diagnose(read_record(path), records)


def diagnose_runs(folder: str | Path, records: Sequence[RecordedRun] | None = None) -> list[Diagnosis]:
    """Every run of a runs folder (a study folder's runs included, blipcore.runs.rundir.list_runs); a run that cannot be
    read is listed with the reason and no findings."""
    records = committed_records() if records is None else records
    found = []
    for run in list_runs(folder):
        try:
            found.append(diagnose_run(run, records))
        except RunError as err:
            found.append(Diagnosis(run.name, "run", str(run.path), None, 0, error=str(err)))
    return found


def committed_diagnoses(root: str | Path = RECORDS_DIR) -> list[Diagnosis]:
    """The committed records (<plan>/<run>.json) and recorded run folders (e.g. gpu/) under `root`, diagnosed."""
    root = Path(root)
    records = committed_records(root)
    found = [diagnose_record(run.path, records) for run in sorted(records, key=lambda r: r.path)]
    return found + diagnose_runs(root, records)


# --- the documentation's generated parts -------------------------------------------------------------------
def findings_markdown() -> str:
    """The findings: name, what it means, where the dashboard shows it."""
    lines = ["| finding | what it means | shown on |", "|---|---|---|"]
    lines += [f"| {k.name} | {k.meaning} | {k.page} page, {k.tab} tab |" for k in FINDINGS]
    return "\n".join(lines) + "\n"


def thresholds_markdown() -> str:
    """Every declared threshold (metrics.THRESHOLDS): finding, the number judged, its level, severity, reason."""
    lines = ["| finding | judged | level | severity | why this level |", "|---|---|---|---|---|"]
    for t in THRESHOLDS:
        judged = metric(t.key).label + (f" ({t.subject})" if t.subject else "")
        lines.append(f"| {t.finding} | {judged} | {t.condition()} | {t.severity} | {t.reason} |")
    return "\n".join(lines) + "\n"


def records_markdown(root: str | Path = RECORDS_DIR) -> str:
    """The committed records' diagnoses as a table: one row per record or recorded run folder."""
    root = Path(root)
    lines = ["| record | read from | health | findings (onset) |", "|---|---|---|---|"]
    for found in committed_diagnoses(root):
        path = Path(found.path)
        where = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
        read = (f"{found.evaluations} validation evaluations" if found.source == "run" or found.evaluations > 1
                else "its reported evaluation")
        shown = "<br>".join(f"{f.title}: {f.severity_text()}, {f.period()}" for f in found.findings) or "-"
        lines.append(f"| `{where}` | {read} | {found.health} | {shown} |")
    return "\n".join(lines) + "\n"
