"""The diagnosis's tables for the Runs page, the Diagnosis page and the Study page, built by plain functions of
data (blipcore.evaluation.diagnosis's Diagnosis and Finding in; pandas frames and strings out). Nothing here imports
Streamlit, so tests build the same tables the pages show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from blipcore.evaluation.diagnosis import Diagnosis, Finding, worst
from blipcore.io import mtime_of
from blipcore.runs.rundir import RunDir

# The pages a finding's numbers are on (blipcore.evaluation.diagnosis.Kind.page), their files in views/, and the
# session-state key of their open tab (each page's SECTION_KEY), so a link can open the page at the finding's tab.
PAGE_FILES = {"Training": "1_Training.py", "Alignment": "2_Alignment.py", "Decoding lab": "5_Decoding_lab.py",
              "Study": "8_Study.py"}
SECTION_KEYS = {"Training": "training_section", "Alignment": "alignment_section",
                "Decoding lab": "decoding_section", "Study": "study_section"}
HEALTH_COLOURS = {"healthy": "#27AE60", "info": "#2E6BE6", "warning": "#B7791F", "error": "#C0392B",
                  "unreadable": "#C0392B"}
FINDING_COLUMNS = ("severity", "finding", "since", "evidence", "shown on", "remedy measured")


def run_stamp(run: RunDir) -> tuple[float, float, float]:
    """What a run's diagnosis depends on, as modification times (run.json, metrics.jsonl, the eval folder, which
    changes when an evaluation file is added): a cache key that changes when the trainer writes."""
    return mtime_of(run.run_json), mtime_of(run.metrics_file), mtime_of(run.eval_dir)


def files_stamp(folder: Path) -> tuple[tuple[str, float], ...]:
    """Every file under `folder` with its modification time: a cache key for what is diagnosed from them."""
    return tuple((str(p), mtime_of(p)) for p in sorted(Path(folder).rglob("*")) if p.is_file())


def health_colour(health: str | None) -> str:
    return f"color: {HEALTH_COLOURS[health]}; font-weight: 600" if health in HEALTH_COLOURS else ""


def health_cells(diagnosis: Diagnosis | None) -> dict[str, str | None]:
    """The Runs table's two diagnosis cells: the worst severity (or "healthy") and every finding in one line."""
    if diagnosis is None:
        return {"health": None, "diagnosis": ""}
    return {"health": diagnosis.health, "diagnosis": "" if diagnosis.health == "healthy" else diagnosis.summary_line()}


def shown_on(finding: Finding) -> str:
    page, tab = finding.where
    return f"{page} → {tab}"


def page_link(finding: Finding) -> tuple[str, str | None, str] | None:
    """(views/ file, session-state key of its tabs, tab) of the page that shows a finding; None for a page
    without a file here."""
    page, tab = finding.where
    if page not in PAGE_FILES:
        return None
    return PAGE_FILES[page], SECTION_KEYS.get(page), tab


def findings_table(diagnosis: Diagnosis) -> pd.DataFrame:
    """One row per finding, in order of onset: severity, name, when it held, evidence, where it shows, remedy."""
    rows = [{"severity": f.severity_text(), "finding": f.title, "since": f.period(),
             "evidence": "; ".join(e.text() for e in f.evidence) or f.summary, "shown on": shown_on(f),
             "remedy measured": f.remedy or ""} for f in diagnosis.findings]
    return pd.DataFrame(rows, columns=list(FINDING_COLUMNS))


def records_table(diagnoses: Sequence[Diagnosis]) -> pd.DataFrame:
    """One row per committed record or recorded run: its name, health and findings."""
    return pd.DataFrame([{"record": d.name, "variant": d.variant or "", "health": d.health,
                          "findings": "" if d.health == "healthy" else d.summary_line()} for d in diagnoses],
                        columns=["record", "variant", "health", "findings"])


def variant_table(diagnoses: Mapping[str, Diagnosis], variants: Mapping[str, str]) -> pd.DataFrame:
    """One row per variant of a study: its runs, the worst health among them, and each finding with how many of
    its runs have it ("caption collapse (greedy): 2 of 3 runs, warning")."""
    grouped: dict[str, list[Diagnosis]] = {}
    for name, diagnosis in diagnoses.items():
        grouped.setdefault(variants.get(name) or diagnosis.variant or name, []).append(diagnosis)
    rows = []
    for variant, found in grouped.items():
        counts: dict[str, list[str]] = {}
        for diagnosis in found:
            for finding in diagnosis.findings:
                counts.setdefault(finding.title, []).append(finding.severity)
        healths = [d.health for d in found]
        severities = [h for h in healths if h not in ("healthy", "unreadable")]
        health = "unreadable" if "unreadable" in healths else worst(severities) or "healthy"
        shown = "; ".join(f"{title}: {len(levels)} of {len(found)} runs, {worst(levels)}"
                          for title, levels in counts.items())
        rows.append({"variant": variant, "runs": len(found), "health": health, "findings": shown})
    return pd.DataFrame(rows, columns=["variant", "runs", "health", "findings"])
