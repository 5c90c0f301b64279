"""The run diagnosis (blipcore.evaluation.diagnosis): synthetic run folders written with RunDir's own writers, each
built to show one finding, and a healthy one that shows none; runs still being written, killed or not yet evaluated; the
committed records and the real GPU run; `python -m train diagnose`; and docs/diagnosis.md against the
declarations it documents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from blipcore.evaluation import diagnosis as D
from blipcore.evaluation.evaluator import summary_metrics
from blipcore.evaluation.metrics import SEVERITIES, THRESHOLDS, is_declared, metric, thresholds
from blipcore.runs.rundir import RunDir
from tests.conftest import REPO_ROOT
from train.cli import main

RECORDS = REPO_ROOT / "studies" / "results"
GPU_RUN = RECORDS / "gpu"
DOC = REPO_ROOT / "docs" / "diagnosis.md"
NO_RECORDS: list = []  # remedies from the run's own numbers only, where a test wants exactly those

HEALTHY_CAPTIONS = {"cider": 0.5, "bleu4": 0.2, "top_caption_share": 0.02, "repetition_rate": 0.1,
                    "longest_run": 1.0, "max_longest_run": 1, "distinct_1": 0.2, "unique_captions": 90}


def config(**model) -> dict:
    return {"name": "synthetic", "model": {"itc_weight": 1.0, "lm_weight": 1.0, "itm_weight": 0.0, **model},
            "data": {"eval_images": 100}, "train": {"lr": 1e-3, "min_lr_ratio": 0.0}}


def evaluation(step: int, *, val_itc: float = 2.0, val_lm: float = 3.0, r1: float = 20.0, rsum: float = 150.0,
               itc_auc: float = 0.9, itm_auc: float | None = None, strategies: dict | None = None,
               rows: dict | None = None, num_images: int = 100) -> dict:
    """An evaluation file's content, as the trainer writes it (eval/epoch_NNN.json)."""
    strategies = strategies or {"greedy": {}, "beam": {}}
    rows = rows or {"most-frequent": {"cider": 0.05, "top_caption_share": 1.0},
                    "nearest-neighbour": {"cider": 0.1, "top_caption_share": 0.01}}
    matching = {"itc_match_auc": itc_auc, **({"itm_match_auc": itm_auc} if itm_auc is not None else {})}
    return {"num_images": num_images, "step": step, "label": f"epoch_{step // 10:03d}",
            "losses": {"val_itc": val_itc, "val_lm": val_lm, "val_loss": val_itc + val_lm},
            "retrieval": {"i2t_r1": r1, "t2i_r1": r1, "rsum": rsum}, "matching": matching,
            "strategies": {name: {"metrics": {**HEALTHY_CAPTIONS, **m}, "notes": []} for name, m in strategies.items()},
            "reference_rows": {name: {"metrics": m, "notes": []} for name, m in rows.items()}}


def train_lines(steps: int = 30, every: int = 2, loss=lambda step: 10.0 - 0.1 * step, lr=lambda step: 1e-3,
                wait: float | None = 0.01) -> list[dict]:
    return [{"step": s, "epoch": s / 10, "loss": loss(s), "itc": loss(s) / 2, "lm": loss(s) / 2, "lr": lr(s),
             "grad_norm": 1.0, "samples_per_s": 100.0, **({"data_wait_share": wait} if wait is not None else {})}
            for s in range(every, steps + 1, every)]


def make_run(folder: Path, evaluations: list[dict] = (), train: list[dict] | None = None, status: str = "completed",
             cfg: dict | None = None, **info) -> RunDir:
    """A run folder written with RunDir's writers: run.json, train lines, and per evaluation its file and the
    val line the trainer logs beside it (evaluation.summary_metrics)."""
    run = RunDir(folder)
    run.write_info({"status": status, "config": cfg or config(), "preset": "synthetic", **info})
    lines = [{"split": "train", **line} for line in (train_lines() if train is None else train)]
    for result in evaluations:
        epoch = result["step"] // 10
        lines.append({"step": result["step"], "epoch": float(epoch), "split": "val", **summary_metrics(result)})
        run.save_eval(epoch, result)
    for line in sorted(lines, key=lambda line: (line["step"], line["split"] == "val")):
        run.append_metrics(line)
    return run


def healthy_evaluations() -> list[dict]:
    return [evaluation(10 * e, val_itc=2.0 - 0.2 * e, val_lm=3.0 - 0.2 * e, r1=10.0 + 5 * e, rsum=100.0 + 20 * e,
                       itc_auc=0.8 + 0.03 * e, strategies={"greedy": {"cider": 0.3 + 0.1 * e},
                                                           "beam": {"cider": 0.35 + 0.1 * e}})
            for e in (1, 2, 3)]


def names(found: D.Diagnosis) -> dict[str, D.Finding]:
    return {f.title: f for f in found.findings}


# --- the declarations ---------------------------------------------------------------------------------------
def test_every_threshold_reads_a_declared_metric_and_says_why():
    assert SEVERITIES == ("info", "warning", "error")
    assert {t.finding for t in THRESHOLDS} == set(D.KINDS)  # every finding is judged against a declared level
    for t in THRESHOLDS:
        assert is_declared(t.key), t
        assert t.severity in SEVERITIES and len(t.reason) > 40 and "{level}" not in t.condition(), t
    assert thresholds("caption collapse")[0].severity == "error"  # most severe first
    with pytest.raises(ValueError):
        thresholds("no such finding")


def test_severities_are_ordered_once():
    assert D.worst(["info", "error", "warning"]) == "error" and D.worst([]) is None
    assert D.severity_rank("info") < D.severity_rank("warning") < D.severity_rank("error")
    with pytest.raises(ValueError):
        D.severity_rank("fatal")


def test_a_val_line_splits_into_strategies_and_reference_rows():
    line = {"step": 5, "epoch": 0.5, "split": "val", "val_itc": 1.0, "i2t_r1": 3.0, "itc_match_auc": 0.7,
            "greedy_cider": 0.2, "beam-no-repeat_top_caption_share": 0.4, "nearest-neighbour_cider": 0.1,
            "greedy_max_longest_run": 7, "greedy_longest_run": 2.0}
    found = D.evaluation_of_line(line)
    assert found.losses == {"val_itc": 1.0} and found.retrieval == {"i2t_r1": 3.0}
    assert found.strategies["greedy"] == {"cider": 0.2, "max_longest_run": 7, "longest_run": 2.0}
    assert found.reference_rows == {"nearest-neighbour": {"cider": 0.1}}
    assert found.strategies["beam-no-repeat"] == {"top_caption_share": 0.4}


# --- synthetic runs, one finding each -----------------------------------------------------------------------
def test_a_healthy_run_has_no_finding(tmp_path):
    found = D.diagnose_run(make_run(tmp_path / "healthy", healthy_evaluations()), NO_RECORDS)
    assert found.findings == [] and found.health == "healthy" and found.evaluations == 3
    assert not found.reaches("info")


def test_token_repeat_collapse_names_the_strategy_and_what_lowers_it(tmp_path):
    evals = healthy_evaluations()
    evals[-1]["strategies"]["greedy"]["metrics"].update(repetition_rate=0.7, longest_run=3.0, max_longest_run=9)
    evals[-1]["strategies"]["beam"]["metrics"].update(repetition_rate=0.2)
    found = names(D.diagnose_run(make_run(tmp_path / "repeat", evals), NO_RECORDS))
    finding = found["token-repeat collapse (greedy)"]
    assert finding.severity == "error" and finding.step == 30 and finding.epoch == 3
    keys = {e.key: e for e in finding.evidence}
    assert set(keys) == {"greedy_repetition_rate", "greedy_longest_run", "greedy_max_longest_run"}
    assert keys["greedy_repetition_rate"].text().startswith("greedy repetition rate 0.700")  # the registry's label
    assert "beam 0.700 → 0.200" in finding.remedy
    assert finding.where == ("Training", "Captioning and collapse")
    assert "token-repeat collapse (beam)" not in found


def caption_collapse_run(folder: Path, beam_share: float) -> D.Diagnosis:
    evals = healthy_evaluations()
    evals[-1]["strategies"]["greedy"]["metrics"].update(top_caption_share=0.4, top_caption="a dog runs")
    evals[-1]["strategies"]["beam"]["metrics"].update(top_caption_share=beam_share)
    return D.diagnose_run(make_run(folder, evals), NO_RECORDS)


def test_caption_collapse_remedy_comes_from_the_runs_own_numbers(tmp_path):
    lowered = names(caption_collapse_run(tmp_path / "lowered", beam_share=0.05))["caption collapse (greedy)"]
    assert lowered.severity == "warning"
    assert {e.text() for e in lowered.evidence} >= {'greedy most common caption "a dog runs"'}
    assert lowered.remedy.startswith("in this evaluation: beam 40.0% → 5.0%, CIDEr 0.650 against 0.600")
    # beam collapses worse here: no remedy claims it lowers the share, and beam's own collapse is its finding
    found = names(caption_collapse_run(tmp_path / "raised", beam_share=0.6))
    assert found["caption collapse (greedy)"].remedy is None
    assert found["caption collapse (beam)"].severity == "error"
    assert "greedy 60.0% → 40.0%" in found["caption collapse (beam)"].remedy


def test_a_collapse_under_a_strategy_nobody_would_pick_is_info(tmp_path):
    evals = healthy_evaluations()
    evals[-1]["strategies"]["repetition-penalty"] = {"metrics": {**HEALTHY_CAPTIONS, "cider": 0.1,
                                                                 "top_caption_share": 0.3}}
    finding = names(D.diagnose_run(make_run(tmp_path / "side", evals), NO_RECORDS))[
        "caption collapse (repetition-penalty)"]
    assert finding.severity == "info" and "beam has the best CIDEr" in finding.summary


def test_captions_no_better_than_a_reference_row(tmp_path):
    evals = healthy_evaluations()
    evals[-1]["reference_rows"]["nearest-neighbour"]["metrics"]["cider"] = 0.7  # above beam's 0.65
    found = names(D.diagnose_run(make_run(tmp_path / "nn", evals), NO_RECORDS))
    finding = found["no better than a reference row (nearest-neighbour)"]
    assert finding.severity == "warning"
    assert [e.text() for e in finding.evidence] == ["beam CIDEr 0.650 (the best strategy)",
                                                    "nearest-neighbour CIDEr 0.700"]
    evals[-1]["reference_rows"]["most-frequent"]["metrics"]["cider"] = 0.9
    found = names(D.diagnose_run(make_run(tmp_path / "mf", evals), NO_RECORDS))
    assert found["no better than a reference row (most-frequent)"].severity == "error"


@pytest.mark.parametrize(("r1", "num_images", "auc", "severity"), [
    (2.0, 100, 0.9, "warning"),  # 2 x chance (1 % for 100 images)
    (1.0, 100, 0.9, "error"),  # chance itself
    (2.0, 1000, 0.9, None),  # 20 x chance (0.1 % for 1,000 images): the same R@1, another gallery
    (20.0, 100, 0.52, "error"),  # ranking fine, but ITC cannot tell matching from mismatched pairs
    (20.0, 100, 0.58, "warning"),
])
def test_alignment_is_graded_against_the_gallerys_chance_level(tmp_path, r1, num_images, auc, severity):
    evals = healthy_evaluations()
    evals[-1].update(num_images=num_images, retrieval={"i2t_r1": r1, "t2i_r1": r1, "rsum": 160.0},
                     matching={"itc_match_auc": auc})
    found = names(D.diagnose_run(make_run(tmp_path / "align", evals), NO_RECORDS)).get("alignment near chance")
    assert (found and found.severity) == severity
    if found and auc > 0.6:
        assert f"chance {100 / num_images:.1f} for {num_images} images" in found.evidence[0].text()


def test_itm_at_chance_only_where_itm_is_trained(tmp_path):
    evals = healthy_evaluations()
    evals[-1]["matching"]["itm_match_auc"] = 0.51
    trained = D.diagnose_run(make_run(tmp_path / "itm", evals, cfg=config(itm_weight=0.5)), NO_RECORDS)
    assert names(trained)["ITM at chance"].severity == "error"
    untrained = D.diagnose_run(make_run(tmp_path / "no-itm", evals, cfg=config(itm_weight=0.0)), NO_RECORDS)
    assert "ITM at chance" not in names(untrained)


def loss_run(folder: Path, rsum: list[float], val_itc: list[float]) -> D.Diagnosis:
    evals = [evaluation(10 * (i + 1), val_itc=loss, val_lm=3.0 - 0.1 * i, r1=10.0 + i, rsum=r, itc_auc=0.8,
                        strategies={"greedy": {"cider": 0.3 + 0.01 * i}})
             for i, (r, loss) in enumerate(zip(rsum, val_itc, strict=True))]
    return D.diagnose_run(make_run(folder, evals), NO_RECORDS)


def test_memorisation_needs_a_risen_loss_and_a_fallen_dev_metric(tmp_path):
    found = names(loss_run(tmp_path / "memo", rsum=[100, 140, 150, 120, 110], val_itc=[2.0, 1.5, 1.4, 1.6, 1.9]))
    assert "over-confidence" not in found
    finding = found["memorisation"]
    assert finding.severity == "warning" and finding.step == 40  # from the first evaluation with both
    texts = [e.text() for e in finding.evidence]
    assert texts[0].startswith("validation ITC loss (image-text contrastive) 1.4000 → 1.9000 (lowest at step 30")
    assert any(t.startswith("R sum 150.0 → 110.0 (best at step 30") for t in texts)
    assert "the best checkpoint by R sum is at step 30" in finding.remedy


def test_a_rising_loss_while_ranking_improves_is_over_confidence(tmp_path):
    found = names(loss_run(tmp_path / "conf", rsum=[100, 120, 130, 140, 150], val_itc=[2.0, 1.5, 1.6, 1.8, 2.1]))
    assert "memorisation" not in found
    finding = found["over-confidence"]
    assert finding.severity == "info" and finding.step == 30  # 1.6 is 6.7 % above the minimum 1.5
    assert "R sum 120.0 → 150.0 (at the loss minimum → latest)" in [e.text() for e in finding.evidence]


def test_a_loss_that_rose_and_came_back_down_is_no_finding(tmp_path):
    found = loss_run(tmp_path / "back", rsum=[100, 120, 130, 140], val_itc=[2.0, 1.5, 1.8, 1.4])
    assert not {"memorisation", "over-confidence"} & set(names(found))


def test_loss_spike_and_non_finite_values_are_optimisation_faults(tmp_path):
    spiky = train_lines(loss=lambda s: 20.0 if s == 20 else 10.0 - 0.1 * s)
    found = names(D.diagnose_run(make_run(tmp_path / "spike", healthy_evaluations(), train=spiky), NO_RECORDS))
    finding = found["optimisation fault (loss spike)"]
    assert finding.severity == "warning" and finding.step == 20 and finding.where == ("Training", "Losses")
    assert finding.evidence[0].before == pytest.approx(9.0)  # the median of the 10 lines before
    lines = train_lines()
    lines[5]["grad_norm"] = math.nan  # written as null, as the trainer's writer does
    found = names(D.diagnose_run(make_run(tmp_path / "nan", healthy_evaluations(), train=lines), NO_RECORDS))
    assert found["optimisation fault (non-finite gradient norm)"].severity == "error"
    stopped = make_run(tmp_path / "stopped", [], status="failed",
                       error="NonFiniteLossError: step 17: the itc loss is not finite (loss=nan)")
    finding = names(D.diagnose_run(stopped, NO_RECORDS))["optimisation fault (non-finite loss)"]
    assert finding.severity == "error" and finding.step == 17


def cosine(step: int, total: int = 60, peak: float = 1e-3) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


def test_learning_rate_at_its_floor_while_the_loss_still_falls(tmp_path):
    falling = train_lines(steps=60, lr=cosine, loss=lambda s: 10.0 - 0.1 * s)
    finding = names(D.diagnose_run(make_run(tmp_path / "floor", healthy_evaluations(), train=falling),
                                   NO_RECORDS))["optimisation fault (learning rate at its floor)"]
    assert finding.severity == "info" and finding.where == ("Training", "Optimisation") and finding.step >= 52
    flat = train_lines(steps=60, lr=cosine, loss=lambda s: max(5.0, 10.0 - 0.1 * s))
    assert not D.diagnose_run(make_run(tmp_path / "flat", healthy_evaluations(), train=flat), NO_RECORDS).findings
    warming = train_lines(steps=20, lr=lambda s: 1e-3 * s / 1000)  # still in warm-up: never above the floor yet
    assert not D.diagnose_run(make_run(tmp_path / "warm", healthy_evaluations(), train=warming),
                              NO_RECORDS).findings


def test_a_starved_step_needs_the_logged_wait_share(tmp_path):
    starved = names(D.diagnose_run(make_run(tmp_path / "starved", healthy_evaluations(),
                                            train=train_lines(wait=0.6)), NO_RECORDS))["starved step"]
    assert starved.severity == "warning" and starved.where == ("Training", "Optimisation")
    assert starved.evidence[0].text() == "data wait (share of step time) 60.0% (median of 15 lines; ≥ 30.0%)"
    older = D.diagnose_run(make_run(tmp_path / "older", healthy_evaluations(), train=train_lines(wait=None)),
                           NO_RECORDS)
    assert not older.findings  # a run from before the trainer logged it: no finding, no error


def test_a_collapse_that_went_away_is_info_with_the_severity_it_reached(tmp_path):
    evals = healthy_evaluations()
    evals[0]["strategies"]["greedy"]["metrics"].update(top_caption_share=0.7)
    run = make_run(tmp_path / "early", evals[1:])
    run.save_step_eval(10, evals[0])  # an evaluation inside the first epoch, without a val line
    finding = names(D.diagnose_run(run, NO_RECORDS))["caption collapse (greedy)"]
    assert (finding.severity, finding.peak, finding.step) == ("info", "error", 10)
    assert finding.until == "step 20 (epoch 2)" and finding.held == "1 of 3"
    assert not D.diagnose_run(run, NO_RECORDS).reaches("warning")


def test_a_collapse_that_lapsed_and_came_back_is_dated_from_its_first_onset(tmp_path):
    evals = healthy_evaluations() + [evaluation(40, val_itc=1.2, val_lm=2.2, r1=30.0, rsum=180.0, itc_auc=0.92,
                                                strategies={"greedy": {"cider": 0.7}, "beam": {"cider": 0.75}})]
    for index, rate in enumerate((0.5, 0.2, 0.4, 0.45)):  # repeats, dips under the level once, repeats again
        evals[index]["strategies"]["greedy"]["metrics"].update(repetition_rate=rate)
    finding = names(D.diagnose_run(make_run(tmp_path / "lapsed", evals), NO_RECORDS))["token-repeat collapse (greedy)"]
    assert finding.until is None and finding.severity != "info"  # it holds at the latest evaluation
    assert (finding.step, finding.held) == (10, "3 of 4")
    assert finding.period() == "step 10 (epoch 1), at 3 of 4 evaluations"
    steady = healthy_evaluations()
    for ev in steady:
        ev["strategies"]["greedy"]["metrics"].update(repetition_rate=0.5)
    held_throughout = names(D.diagnose_run(make_run(tmp_path / "steady", steady), NO_RECORDS))
    assert held_throughout["token-repeat collapse (greedy)"].held is None


def test_runs_being_written_killed_or_not_evaluated_are_diagnosed(tmp_path):
    live = make_run(tmp_path / "live", healthy_evaluations()[:1], status="running")
    with open(live.metrics_file, "ab") as f:
        f.write(b'{"step": 31, "split": "tra')  # a partial last line: the trainer is mid-write, or was killed
    assert D.diagnose_run(live, NO_RECORDS).health == "healthy"
    young = make_run(tmp_path / "young", [], status="running")
    assert D.diagnose_run(young, NO_RECORDS).evaluations == 0
    bare = RunDir(tmp_path / "bare")
    bare.write_info({"status": "running"})  # no config, no metrics yet
    found = D.diagnose_run(bare, NO_RECORDS)
    assert found.findings == [] and found.status == "running"
    with pytest.raises(D.RunError, match="not a run folder"):
        D.diagnose_run(tmp_path / "nothing")


def test_a_record_with_its_history_is_diagnosed_like_its_run(tmp_path):
    from blipcore.experiments.study import numbers_only, run_history

    evals = healthy_evaluations()
    evals[-1]["strategies"]["greedy"]["metrics"].update(top_caption_share=0.4)
    run = make_run(tmp_path / "run", evals, cfg={**config(), "name": "plan/stage/variant"})
    record = {"stage": "stage", "variant": "variant", "seed": 0, "epoch": 3, "split": "val", "chosen": "beam",
              "evaluation": numbers_only(evals[-1]), "config": config(), "train_seconds": 1.0, "samples_per_s": 1.0,
              "machine": {}, "history": run_history(run)}
    path = tmp_path / "plan" / "stage-variant-seed0.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    from_record, from_run = D.diagnose_record(path, NO_RECORDS), D.diagnose_run(run, NO_RECORDS)
    assert [f.line() for f in from_record.findings] == [f.line() for f in from_run.findings]
    assert from_record.variant == from_run.variant == "stage/variant" and from_record.evaluations == 3
    del record["history"]  # a record written before records kept it: its reported evaluation alone
    path.write_text(json.dumps(record))
    older = D.diagnose_record(path, NO_RECORDS)
    assert older.evaluations == 1 and names(older)["caption collapse (greedy)"].onset == "epoch 3"
    path.write_text(json.dumps({"counts": {}}))
    with pytest.raises(D.RunError, match="not a study result record"):
        D.diagnose_record(path)


# --- the committed records ------------------------------------------------------------------------------------
def test_the_gpu_run_is_over_confident_not_memorising():
    found = D.diagnose_run(GPU_RUN)
    assert found.evaluations == 8 and "memorisation" not in names(found)
    finding = names(found)["over-confidence"]
    assert finding.severity == "info" and finding.step > 1404  # after the minimum, at epoch 3
    loss, *rest = finding.evidence
    assert loss.key == "val_itc" and loss.before == pytest.approx(3.570, abs=1e-3)
    assert loss.value == pytest.approx(4.484, abs=1e-3) and "lowest at step 1,404 (epoch 3)" in loss.context
    r1 = next(e for e in rest if e.key == "i2t_r1")
    assert (r1.before, r1.value) == (pytest.approx(2.0), pytest.approx(4.0))
    assert found.worst == "info"  # its early collapse resolved by epoch 3: info, with the severity it reached
    assert all(f.resolved for f in found.findings if f.name != "over-confidence")


def test_committed_recipe_records_give_the_findings_their_numbers_say():
    records = D.committed_records()
    # the original recipe's seed-0 record keeps its ten dev evaluations: collapse from the first (step 375)
    original = D.diagnose_record(RECORDS / "recipes" / "original-original-seed0.json", records)
    assert original.evaluations == 10
    collapse = names(original)["caption collapse (greedy)"]
    assert (collapse.severity, collapse.onset, collapse.held) == ("warning", "step 375", None)  # at all ten
    assert collapse.evidence[0].value == pytest.approx(0.23)  # as the latest evaluation shows it
    assert "beam 23.0% → 7.5%" in collapse.remedy  # this record's own evaluation
    assert "records of recipes: original/original: beam 15.1% → 8.4% (3 seeds)" in collapse.remedy  # its seeds
    beam = names(original)["caption collapse (beam)"]  # every image's caption the same word at step 375, 7.5 % at last
    assert (beam.severity, beam.peak, beam.onset, beam.resolved) == ("info", "warning", "step 375", True)
    repeats = names(original)["token-repeat collapse (greedy)"]
    assert (repeats.onset, repeats.held) == ("step 375", "8 of 10")  # under the level at steps 3,000 and 3,375
    assert repeats.evidence[0].value == pytest.approx(0.322, abs=1e-3)
    tuned = names(D.diagnose_record(RECORDS / "recipes" / "recipes-tuned-seed0.json", records))
    assert not {"caption collapse (greedy)", "caption collapse (beam)", "token-repeat collapse (greedy)"} & set(tuned)
    # the direction of beam's effect is measured per recipe, not assumed: it helps the original recipe, not the tuned
    effects = D.strategy_effects(records, "top_caption_share", "greedy")
    before, after, seeds = effects["recipes", "original", "original"]["beam"]
    assert (round(before, 3), round(after, 3), seeds) == (0.151, 0.084, 3)
    before, after, _ = effects["recipes", "recipes", "tuned"]["beam"]
    assert after > before
    text_only = D.diagnose_record(RECORDS / "recipes" / "pretraining-text-lm-seed0.json", records)
    assert text_only.health == "healthy"  # one caption for every image is all a text-only model can say
    itm = names(D.diagnose_record(RECORDS / "recipes" / "recipes-decoder-pretrained-seed0.json", records))
    assert itm["ITM at chance"].severity == "warning" and itm["ITM at chance"].evidence[0].value == pytest.approx(
        0.585, abs=1e-3)


# --- the command line ---------------------------------------------------------------------------------------
def test_diagnose_exit_codes_and_output(tmp_path, capsys):
    healthy = make_run(tmp_path / "runs" / "healthy", healthy_evaluations())
    evals = healthy_evaluations()
    evals[-1]["strategies"]["greedy"]["metrics"].update(top_caption_share=0.4)
    collapsed = make_run(tmp_path / "runs" / "collapsed", evals)
    assert main(["diagnose", "--run-dir", str(healthy.path)]) == 0
    assert capsys.readouterr().out.startswith("healthy (completed, 3 evaluations): healthy")
    assert main(["diagnose", "--run-dir", str(collapsed.path)]) == 0  # a warning does not reach --fail-on error
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:5] == ["warning", "caption", "collapse", "(greedy)", "step"]
    assert main(["diagnose", "--run-dir", str(collapsed.path), "--fail-on", "warning"]) == 1
    capsys.readouterr()
    assert main(["diagnose", "--runs-dir", str(tmp_path / "runs"), "--json", "--fail-on", "warning"]) == 1
    found = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert found["healthy"]["health"] == "healthy" and found["collapsed"]["health"] == "warning"
    finding = found["collapsed"]["findings"][0]
    assert finding["name"] == "caption collapse" and finding["subject"] == "greedy" and finding["step"] == 30
    assert finding["evidence"][0]["label"] == "greedy share of the most common caption"
    assert (finding["page"], finding["tab"]) == ("Training", "Captioning and collapse")
    assert main(["diagnose", "--record", str(RECORDS / "recipes" / "original-original-seed0.json"),
                 "--fail-on", "warning"]) == 1
    capsys.readouterr()


@pytest.mark.parametrize("args", [
    ["--run-dir", "{tmp}/missing"],
    ["--run-dir", "{tmp}/runs"],  # a folder of runs, not a run
    ["--runs-dir", "{tmp}/missing"],
    ["--runs-dir", "{tmp}/empty"],
    ["--runs-dir", "{tmp}/runs"],  # holds an unreadable run beside a readable one
    ["--record", "{tmp}/runs/broken/run.json"],
])
def test_diagnose_says_in_one_line_what_it_cannot_read(tmp_path, capsys, args):
    make_run(tmp_path / "runs" / "healthy", healthy_evaluations())
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    assert main(["diagnose", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- the documentation ----------------------------------------------------------------------------------------
def test_the_doc_lists_every_finding_and_threshold_and_the_records_diagnosis_is_current():
    doc = DOC.read_text()
    assert D.findings_markdown() in doc
    metrics_page = (REPO_ROOT / "docs" / "metrics.md").read_text()
    assert D.thresholds_markdown() in metrics_page, ("docs/metrics.md: paste "
                                                     "blipcore.evaluation.diagnosis.thresholds_markdown()")
    assert D.records_markdown() in doc, "docs/diagnosis.md: paste blipcore.evaluation.diagnosis.records_markdown()"
    for t in THRESHOLDS:
        assert t.reason in metrics_page and metric(t.key).label in metrics_page
