"""What a diagnosis says: the findings it can make (FINDINGS, each with its dashboard page and tab), the severities'
order, a finding's evidence, the Finding and Diagnosis it returns with their text and JSON forms and the order
of onset, what one evaluation's check reports (Hit), and the documentation's generated tables of findings and
thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..metrics import SEVERITIES, THRESHOLDS, Threshold, metric


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
def shown(key: str, value: Any) -> str:
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
        value = shown(self.key, self.value)
        if self.before is not None:
            value = f"{shown(self.key, self.before)} → {value}"
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
    held: str | None = None  # at how many evaluations it held ("2 of 8"), where not at every one since its onset
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
        """When it held: its onset; how often, where it did not hold at every evaluation since; when it was over."""
        onset = self.onset or "-"
        if self.until:
            return f"{onset}, at {self.held} evaluations, over by {self.until}"
        return f"{onset}, at {self.held} evaluations" if self.held else onset

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


# --- the order of onset ----------------------------------------------------------------------------
def onset_key(finding: Finding) -> tuple[float, float, int, int]:
    step = finding.step if finding.step is not None else math.inf
    epoch = finding.epoch if finding.epoch is not None else math.inf
    return step, epoch, list(KINDS).index(finding.name), -severity_rank(finding.severity)


# --- judging one evaluation ------------------------------------------------------------------------------
@dataclass
class Hit:
    """What one check found at one evaluation; diagnosing places it in time (a Finding)."""

    name: str
    subject: str
    severity: str
    summary: str
    evidence: list[Evidence]
    remedy: str | None = None


def level_passed(levels: list[Threshold], value: float, worse_when_high: bool, scale: float = 1.0) -> Threshold | None:
    """The most severe of `levels` that `value` passes."""
    for threshold in levels:  # most severe first
        level = threshold.level * scale
        if (value >= level) if worse_when_high else (value <= level):
            return threshold
    return None


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
