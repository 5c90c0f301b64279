"""Diagnosing: every check over a run's or record's history, findings of one evaluation placed in time (since
when they hold, or when they stopped), in order of onset; a run folder, a record, a runs folder, the committed
records; and the documentation's table of the committed records' diagnoses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...paths import PROJECT_ROOT
from ...runs.rundir import RunDir, RunError, list_runs
from . import alignment, collapse
from .dynamics import loss_findings, training_findings
from .reading import History, read_record, read_run
from .records import RECORDS_DIR, RecordedRun, committed_records
from .report import Diagnosis, Finding, onset_key, severity_rank

EVALUATION_CHECKS = (*collapse.CHECKS, *alignment.CHECKS)


def _evaluation_findings(history: History, records: Sequence[RecordedRun]) -> list[Finding]:
    evals = history.evaluations
    per_eval = [{(hit.name, hit.subject): hit for check in EVALUATION_CHECKS for hit in check(ev, history, records)}
                for ev in evals]
    keys = list(dict.fromkeys(key for hits in per_eval for key in hits))
    findings = []
    last = len(evals) - 1
    for key in keys:
        held = [i for i, hits in enumerate(per_eval) if key in hits]
        if held[-1] == last:  # it holds now, as the latest evaluation shows it, since it first held
            hit, onset = per_eval[last][key], evals[held[0]]
            lapsed = len(held) < last - held[0] + 1  # it stopped for a while in between: say how often it held
            findings.append(Finding(hit.name, hit.severity, hit.summary, onset.step, onset.epoch, hit.evidence,
                                    hit.subject, hit.remedy, held=f"{len(held)} of {len(evals)}" if lapsed else None,
                                    split=onset.split))
        else:  # it held once and stopped: reported as it was at its worst
            peak_index = max(held, key=lambda i: (severity_rank(per_eval[i][key].severity), -i))
            hit, onset, stopped = per_eval[peak_index][key], evals[held[0]], evals[held[-1] + 1]
            findings.append(Finding(hit.name, "info", f"{hit.summary} (at {evals[peak_index].where}; resolved)",
                                    onset.step, onset.epoch, hit.evidence, hit.subject, hit.remedy,
                                    peak=hit.severity, until=stopped.where, held=f"{len(held)} of {len(evals)}",
                                    split=onset.split))
    return findings


def diagnose(history: History, records: Sequence[RecordedRun] | None = None) -> Diagnosis:
    """The findings of a run or record, in order of onset. `records` (default: the committed records) are what
    the remedies cite."""
    records = committed_records() if records is None else records
    findings = (_evaluation_findings(history, records) + loss_findings(history) + training_findings(history))
    return Diagnosis(history.name, history.source, history.path, history.status, len(history.evaluations),
                     sorted(findings, key=onset_key),
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
