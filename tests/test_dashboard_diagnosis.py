"""The diagnosis on the dashboard: its tables built by plain functions (dashboard/diagnosis_figures.py) from
synthetic runs, and the pages run headless with Streamlit's AppTest: the Runs page's health and diagnosis columns,
the Diagnosis page (findings in order of onset, evidence, remedy, a button to the page that shows them, the
committed records), and the Study page's findings per variant."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from blipcore.evaluation import diagnosis as D
from blipcore.runs.rundir import STUDY_TABLE, RunDir
from dashboard import diagnosis_figures as df
from tests.test_dashboard_pages import DASHBOARD, copy_run, run_page, texts
from tests.test_dashboard_study import ROWS
from tests.test_diagnosis import NO_RECORDS, config, healthy_evaluations, make_run, train_lines


def collapsed_run(folder: Path, name: str = "synthetic") -> RunDir:
    """A run whose greedy captions collapse at its last evaluation (step 30) after a loss spike at step 20."""
    evals = healthy_evaluations()
    evals[-1]["strategies"]["greedy"]["metrics"].update(top_caption_share=0.4)
    spiky = train_lines(loss=lambda s: 20.0 if s == 20 else 10.0 - 0.1 * s)
    return make_run(folder, evals, train=spiky, cfg={**config(), "name": name})


# --- builders -------------------------------------------------------------------------------------------------
def test_the_findings_table_has_a_row_per_finding_in_order_of_onset(tmp_path):
    found = D.diagnose_run(collapsed_run(tmp_path / "run"), NO_RECORDS)
    table = df.findings_table(found)
    assert list(table.columns) == list(df.FINDING_COLUMNS)
    assert list(table["finding"]) == ["optimisation fault (loss spike)", "caption collapse (greedy)"]
    assert list(table["since"]) == ["step 20 (epoch 2)", "step 30 (epoch 3)"]
    assert list(table["shown on"]) == ["Training → Losses", "Training → Captioning and collapse"]
    assert table["evidence"][1].startswith("greedy share of the most common caption 40.0%")
    assert table["remedy measured"][1].startswith("in this evaluation: beam 40.0% → 2.0%")
    assert df.findings_table(D.diagnose_run(make_run(tmp_path / "ok", healthy_evaluations()), NO_RECORDS)).empty


def test_health_cells_and_the_table_by_variant(tmp_path):
    sick = D.diagnose_run(collapsed_run(tmp_path / "a0", "plan/s/a"), NO_RECORDS)
    well = D.diagnose_run(make_run(tmp_path / "a1", healthy_evaluations()), NO_RECORDS)
    assert df.health_cells(sick) == {"health": "warning", "diagnosis": sick.summary_line()}
    assert df.health_cells(well) == {"health": "healthy", "diagnosis": ""}
    assert df.health_cells(None) == {"health": None, "diagnosis": ""}
    unreadable = D.Diagnosis("b0", "run", "x", None, 0, error="x/run.json: not valid JSON")
    table = df.variant_table({"a0": sick, "a1": well, "b0": unreadable}, {"a0": "s/a", "a1": "s/a", "b0": "s/b"})
    rows = table.set_index("variant")
    assert rows.loc["s/a", "runs"] == 2 and rows.loc["s/a", "health"] == "warning"
    assert rows.loc["s/a", "findings"] == ("optimisation fault (loss spike): 1 of 2 runs, warning; "
                                           "caption collapse (greedy): 1 of 2 runs, warning")
    assert rows.loc["s/b", "health"] == "unreadable"
    assert df.health_colour("error").startswith("color: #") and df.health_colour(None) == ""


def test_every_findings_page_and_tab_exists_on_the_dashboard():
    for kind in D.FINDINGS:
        for tab in {kind.tab, "Optimisation"}:
            finding = D.Finding(kind.name, "info", "", None, None, [], tab=tab)
            file, key, shown = df.page_link(finding)
            source = (DASHBOARD / "views" / file).read_text()
            assert f'"{key}"' in source and f'"{shown}"' in source, (kind.name, file, key, shown)


# --- pages ------------------------------------------------------------------------------------------------------
def test_the_runs_page_shows_each_runs_health_and_findings(monkeypatch, tiny_runs_dir, tmp_path):
    copy_run(tiny_runs_dir, tmp_path)
    collapsed_run(tmp_path / "collapsed")
    make_run(tmp_path / "healthy", healthy_evaluations())
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_bytes(b"\xff not json")
    at = run_page(monkeypatch, tmp_path, "app.py")
    table = at.dataframe[0].value.set_index("run")
    assert list(table.columns[:2]) == ["status", "health"] and table.columns[-1] == "diagnosis"
    assert table.loc["healthy", "health"] == "healthy" and table.loc["healthy", "diagnosis"] == ""
    assert table.loc["collapsed", "health"] == "warning"
    assert "caption collapse (greedy) (warning, step 30 (epoch 3))" in table.loc["collapsed", "diagnosis"]
    assert table.loc["tiny", "health"] == D.diagnose_run(tmp_path / "tiny").health
    assert table.loc["garbage", "status"] == "unreadable" and pd.isna(table.loc["garbage", "health"])


def test_the_diagnosis_page_lists_findings_with_evidence_remedy_and_where_they_show(monkeypatch, tmp_path):
    collapsed_run(tmp_path / "collapsed")
    at = run_page(monkeypatch, tmp_path, "views/0_Diagnosis.py")
    findings, records = (frame.value for frame in at.dataframe)
    assert list(findings["finding"]) == ["optimisation fault (loss spike)", "caption collapse (greedy)"]
    shown = texts(at)
    assert "**warning**, 2 findings in order of onset" in shown
    assert "greedy share of the most common caption 40.0% (≥ 10.0%)" in shown
    assert "**Remedy measured:** in this evaluation: beam 40.0% → 2.0%" in shown
    assert [b.label for b in at.button] == ["Open Training → Losses", "Open Training → Captioning and collapse"]
    gpu = records.set_index("record").loc["gpu"]
    assert gpu["health"] == "info" and "over-confidence" in gpu["findings"]
    assert "memorisation" not in gpu["findings"]


def test_a_findings_button_opens_the_page_at_the_tab_that_shows_it(monkeypatch, tmp_path):
    collapsed_run(tmp_path / "collapsed")
    monkeypatch.setenv("BLIPLAB_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(DASHBOARD / "app.py"), default_timeout=60)  # inside the app's navigation
    at.run()
    at.switch_page("views/0_Diagnosis.py").run()
    assert not at.exception and at.title[0].value.startswith("Diagnosis")
    at.button[1].click().run()  # "Open Training → Captioning and collapse"
    assert not at.exception and at.title[0].value == "Training"
    assert at.session_state["training_section"] == "Captioning and collapse"
    panels = {a["text"] for chart in at.get("plotly_chart") for a in json.loads(chart.proto.spec)["layout"]
              .get("annotations", [])}
    assert "share of the most common caption" in panels and "total loss" not in panels


def test_the_diagnosis_page_for_a_healthy_run_and_for_runs_being_written(monkeypatch, tiny_runs_dir, tmp_path):
    make_run(tmp_path / "healthy", healthy_evaluations())
    at = run_page(monkeypatch, tmp_path, "views/0_Diagnosis.py")
    assert "healthy — no finding reaches a threshold" in texts(at) and len(at.dataframe) == 1  # the records only
    live = copy_run(tiny_runs_dir, tmp_path, "live")
    live.update_info(status="running")
    with open(live.metrics_file, "ab") as f:
        f.write(b'{"step": 17, "split": "tra')
    young = RunDir(tmp_path / "young")
    young.write_info({"status": "running"})  # nothing logged, no checkpoint: still selectable here
    for name in ("live", "young"):
        at = run_page(monkeypatch, tmp_path, "views/0_Diagnosis.py", {"selected_run": name})
        assert f"`{name}`" in texts(at)


def test_the_study_page_shows_the_findings_of_each_variant(monkeypatch, tmp_path):
    study = tmp_path / "study-syn"
    for variant, seed in (("a", 0), ("a", 1), ("b", 0), ("b", 1)):
        folder = study / f"s-{variant}-seed{seed}"
        if variant == "a" and seed == 0:
            collapsed_run(folder, f"syn/s/{variant}")
        else:
            make_run(folder, healthy_evaluations(), cfg={**config(), "name": f"syn/s/{variant}"})
    (study / STUDY_TABLE).write_text(json.dumps({"name": "syn", "preset": "demo", "seeds": [0, 1], "rows": ROWS}))
    at = run_page(monkeypatch, tmp_path, "views/8_Study.py")
    frame = at.dataframe[-1].value.set_index("variant")
    assert list(frame.index) == ["s/a", "s/b"] and list(frame["runs"]) == [2, 2]
    assert frame.loc["s/a", "health"] == "warning" and frame.loc["s/b", "health"] == "healthy"
    assert re.search(r"caption collapse \(greedy\): 1 of 2 runs, warning", frame.loc["s/a", "findings"])
    assert "Diagnosis by variant" in texts(at)
