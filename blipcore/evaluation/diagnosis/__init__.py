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

The modules, by job:

    report.py       the findings a diagnosis can make, Finding, Diagnosis, their order, text and JSON, the
                    documentation's tables of findings and thresholds
    reading.py      the evidence: a run folder's or a study record's evaluations and training log
    records.py      the committed records and the remedies they measured
    collapse.py     one evaluation's captions: token-repeat and caption collapse, reference rows
    alignment.py    one evaluation's alignment: ITC near chance, ITM at chance
    dynamics.py     a run's course: memorisation, over-confidence, optimisation faults, a starved step
    diagnosing.py   every check over a history, in order of onset; runs, records, the committed records
"""

from ...runs.rundir import RunError
from .diagnosing import (
    EVALUATION_CHECKS,
    committed_diagnoses,
    diagnose,
    diagnose_record,
    diagnose_run,
    diagnose_runs,
    records_markdown,
)
from .dynamics import PAIRED, SHOWN, TERMS
from .reading import (
    Evaluation,
    History,
    evaluation_of,
    evaluation_of_line,
    read_record,
    read_run,
    record_history,
)
from .records import RECORDS_DIR, RecordedRun, committed_records, strategy_effects, variant_label, variant_means
from .report import (
    ALIGNMENT,
    BELOW_ROW,
    CAPTION_COLLAPSE,
    FINDINGS,
    ITM,
    KINDS,
    MEMORISATION,
    OPTIMISATION,
    OVER_CONFIDENCE,
    STARVED,
    TOKEN_REPEAT,
    Diagnosis,
    Evidence,
    Finding,
    Kind,
    findings_markdown,
    onset_text,
    severity_rank,
    thresholds_markdown,
    worst,
)

__all__ = [
    "ALIGNMENT", "BELOW_ROW", "CAPTION_COLLAPSE", "EVALUATION_CHECKS", "FINDINGS", "ITM", "KINDS", "MEMORISATION",
    "OPTIMISATION", "OVER_CONFIDENCE", "PAIRED", "RECORDS_DIR", "SHOWN", "STARVED", "TERMS", "TOKEN_REPEAT",
    "Diagnosis", "Evaluation", "Evidence", "Finding", "History", "Kind", "RecordedRun", "RunError",
    "committed_diagnoses", "committed_records", "diagnose", "diagnose_record", "diagnose_run", "diagnose_runs",
    "evaluation_of", "evaluation_of_line", "findings_markdown", "onset_text", "read_record", "read_run",
    "record_history", "records_markdown", "severity_rank", "strategy_effects", "thresholds_markdown",
    "variant_label", "variant_means", "worst",
]
