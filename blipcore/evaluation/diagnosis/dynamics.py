"""Findings over a run's course: memorisation and over-confidence (comparing evaluations), and optimisation faults
and a starved step (the training log).
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from ...io import is_number
from ..metrics import metric, thresholds
from .reading import History
from .records import average, join
from .report import MEMORISATION, OPTIMISATION, OVER_CONFIDENCE, STARVED, Evidence, Finding, shown

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


def loss_findings(history: History) -> list[Finding]:
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
                                f"({shown(key, best)})")
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
                                    remedy=join(*(r for _, _, remedies in found for r in remedies))))
    return findings


# --- the training log: optimisation faults and a starved step ---------------------------------------------
TERMS = ("loss", "itc", "lm", "itm", "grad_norm")  # the numbers of a train line that must be finite


def _line_epoch(line: dict[str, Any]) -> float | None:
    return line.get("epoch") if is_number(line.get("epoch")) else None


def training_findings(history: History) -> list[Finding]:
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
    before, after = average(stretch[:half]), average(stretch[half:])
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
