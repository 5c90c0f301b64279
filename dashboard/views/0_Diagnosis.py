"""Diagnosis: what went wrong in a run, in words, with the evidence — every finding of blipcore.evaluation.diagnosis in
order of onset, the numbers behind it (labelled by the metric registry), a link to the page and tab that shows them, and
the remedy that the run's own evaluation or the committed records measured; below, the committed records
diagnosed the same way. The levels are declared, with their reasons, in blipcore/evaluation/metrics.py (THRESHOLDS)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from blipcore.evaluation.diagnosis import RECORDS_DIR, Diagnosis, Finding, committed_diagnoses, diagnose_run
from blipcore.runs.rundir import RunDir, RunError
from dashboard import common
from dashboard import diagnosis_figures as df

VIEWS = Path(__file__).parent


@st.cache_data(show_spinner=False, max_entries=256)
def _diagnosis(path: str, stamp: tuple[float, float, float]) -> Diagnosis:
    return diagnose_run(RunDir(path))


@st.cache_data(show_spinner="Diagnosing the committed records…", max_entries=4)
def _records(stamp: tuple[tuple[str, float], ...]) -> list[Diagnosis]:
    return committed_diagnoses(RECORDS_DIR)


def open_button(index: int, finding: Finding) -> None:
    """A button that opens the page showing a finding's numbers, at its tab."""
    target = df.page_link(finding)
    if target is None:
        st.caption(f"Shown on: {df.shown_on(finding)}")
        return
    file, section_key, tab = target
    if st.button(f"Open {df.shown_on(finding)}", key=f"diagnosis_open_{index}"):
        if section_key:
            st.session_state[section_key] = tab
        st.switch_page(str(VIEWS / file))


def show_findings(diagnosis: Diagnosis) -> None:
    if diagnosis.error:
        st.warning(f"`{diagnosis.name}` cannot be diagnosed: {diagnosis.error}")
        return
    evaluations = f"{diagnosis.evaluations} evaluation{'s' * (diagnosis.evaluations != 1)}"
    if not diagnosis.findings:
        st.success(f"`{diagnosis.name}` ({diagnosis.status}, {evaluations}): healthy — no finding reaches a "
                   "threshold.")
        return
    st.markdown(f"`{diagnosis.name}` ({diagnosis.status}, {evaluations}): **{diagnosis.health}**, "
                f"{len(diagnosis.findings)} finding{'s' * (len(diagnosis.findings) != 1)} in order of onset.")
    st.dataframe(df.findings_table(diagnosis), hide_index=True, width="stretch", key="diagnosis_findings")
    for index, finding in enumerate(diagnosis.findings):
        with st.container(border=True):
            st.markdown(f"**{finding.severity_text()} · {finding.title}** — {finding.period()}")
            st.markdown(finding.summary)
            st.markdown("\n".join(f"- {evidence.text()}" for evidence in finding.evidence))
            if finding.remedy:
                st.markdown(f"**Remedy measured:** {finding.remedy}")
            open_button(index, finding)


st.set_page_config(page_title="Diagnosis · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("Diagnosis: what went wrong, with the evidence")
st.caption("Each finding is judged against a level declared, with the recorded runs' numbers that justify it, in "
           "`blipcore/evaluation/metrics.py` (docs/diagnosis.md lists them). The same findings: "
           "`python -m train diagnose --run-dir RUN`.")
run = common.select_run(require_epochs=False)
try:
    found = _diagnosis(str(run.path), df.run_stamp(run))
except RunError as err:
    found = Diagnosis(run.name, "run", str(run.path), None, 0, error=str(err))
show_findings(found)

with st.expander("The committed records, diagnosed (studies/results)"):
    st.caption("The runs the project's results come from: each study record's reported test evaluation (records "
               "written with their history: every validation evaluation), and the GPU run's folder. The remedies "
               "above cite these numbers.")
    st.dataframe(df.records_table(_records(df.files_stamp(RECORDS_DIR))), hide_index=True, width="stretch",
                 key="diagnosis_records")
