"""A plan's questions answered from its runs' reported numbers: the [recovery] question (how much of what one
variant lost another wins back) and the [[target]]s every training variant is judged against, each judged only
beyond two standard deviations over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ...evaluation import metrics as M
from .plan import RECOVERY_ROLES, Plan, Recovery, Target, capfilt_protocol
from .records import Reported, RunResult


def reported_value(result: RunResult, key: str, row: str | None = None) -> float | None:
    """A run's reported number `key`: of its dev-chosen decoding strategy (or of reference row `row`), else of its
    retrieval or matching evaluation; None when it has none."""
    evaluation = result.evaluation
    if row is not None:  # a reference row has captioning and collapse metrics only
        value = evaluation.get("reference_rows", {}).get(row, {}).get("metrics", {}).get(key)
        return float(value) if M.is_number(value) else None
    entry = evaluation.get("strategies", {}).get(result.chosen, {})
    for found in (entry.get("metrics", {}), evaluation.get("retrieval", {}), evaluation.get("matching", {})):
        if M.is_number(found.get(key)):
            return float(found[key])
    return None


def recovery_summaries(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """The plan's recovery questions answered from its runs' reported numbers (each run's metric at its
    dev-chosen strategy), in the plan's order, each with the CapFilt protocol its treated variant trains on
    ("protocol": None where it trains on no CapFilt data); empty when the plan asks none."""
    summaries = []
    for recovery in plan.recoveries:
        values: dict[str, dict[int, float]] = {}
        for role in RECOVERY_ROLES:
            values[role] = {}
            for seed, result in reported.get(getattr(recovery, role), {}).items():
                if (value := reported_value(result, recovery.metric)) is not None:
                    values[role][seed] = value
        summaries.append({"protocol": capfilt_protocol(plan, recovery.treated[0]),
                          **judge_recovery(recovery, values)})
    return summaries


def judge_recovery(recovery: Recovery, values: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Each role's per-seed values ({role: {seed: value}}), mean and sd; the cost (reference - degraded, in the
    metric's better direction), what the treated variant won back, their ratio, and a verdict: "met" or
    "missed" only where the cost exceeds two standard deviations over seeds of the reference and the degraded
    runs (the larger of the two), else why it is not decided."""
    summary: dict[str, Any] = {"metric": recovery.metric, "target": recovery.target}
    for role in RECOVERY_ROLES:
        found = values.get(role, {})
        summary[role] = {"run": "/".join(getattr(recovery, role)),
                         "values": {str(seed): v for seed, v in found.items()},
                         "mean": statistics.fmean(found.values()) if found else None,
                         "sd": statistics.stdev(found.values()) if len(found) > 1 else None}
    summary.update(cost=None, won_back=None, share=None, two_sd=None)
    means = [summary[role]["mean"] for role in RECOVERY_ROLES]
    if any(mean is None for mean in means):
        summary["verdict"] = "not yet: every role needs an evaluated run"
        return summary
    sign = 1.0 if M.metric(recovery.metric).better == "higher" else -1.0
    reference, degraded, treated = means
    cost, won_back = sign * (reference - degraded), sign * (treated - degraded)
    summary.update(cost=cost, won_back=won_back, share=won_back / cost if cost > 0 else None)
    spreads = [summary[role]["sd"] for role in ("reference", "degraded")]
    if cost <= 0:
        summary["verdict"] = "no cost: the degraded runs are not worse than the reference"
    elif any(sd is None for sd in spreads):
        summary["verdict"] = "not decided: the spread needs 2 or more seeds of the reference and the degraded runs"
    else:
        summary["two_sd"] = 2 * max(spreads)
        if cost <= summary["two_sd"]:
            summary["verdict"] = "not decided: the cost is within two standard deviations over seeds"
        else:
            summary["verdict"] = "met" if summary["share"] >= recovery.target else "missed"
    return summary


def target_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """Every training variant with a counted run judged against each of the plan's targets (`judge_target`)."""
    rows = []
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            results = {seed: r for seed, r in reported.get((stage.name, variant), {}).items() if r.chosen}
            if not results:  # none yet, or an image-only run (no captions, no retrieval): nothing to judge
                continue
            for target in plan.targets:
                if target.other_variant == f"{stage.name}/{variant}":
                    continue  # a variant is not judged against itself
                values = {seed: v for seed, result in results.items()
                          if (v := reported_value(result, target.metric)) is not None}
                if target.other_variant is not None:
                    other = reported.get(tuple(target.other_variant.split("/", 1)), {})
                    references = {seed: v for seed, result in other.items()
                                  if (v := reported_value(result, target.metric)) is not None}
                    judged = judge_against_variant(target, values, references)
                else:
                    references = {} if target.above is None else {
                        seed: v for seed, result in results.items()
                        if (v := reported_value(result, target.metric, target.above)) is not None}
                    judged = judge_target(target, values, references)
                rows.append({"run": f"{stage.name}/{variant}", **judged})
    return rows


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The pooled sample standard deviation of two groups of seeds; None unless each has 2 or more."""
    if len(a) < 2 or len(b) < 2:
        return None
    squares = (len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)
    return math.sqrt(squares / (len(a) + len(b) - 2))


def judge_against_variant(target: Target, values: dict[int, float], others: dict[int, float]) -> dict[str, Any]:
    """One variant against another variant of the plan (`target.above` or `target.not_below`), on each side's
    seeds (they need not be the same seeds). "above": met when the mean is better by at least `by` and by more than
    two pooled standard deviations, and the worst seed beats the other's best. "not_below": met unless the mean is
    worse by more than two pooled standard deviations. One seed on either side cannot show a spread: "not decided",
    unless the margin already decides it (an "above" margin under `by`; a "not_below" margin of 0 or more)."""
    summary = _target_summary(target, values)
    if not values or not others:
        summary["verdict"] = f"no value: {'its runs' if not values else target.other_variant} reported no number"
        return summary
    sign = 1.0 if M.metric(target.metric).better == "higher" else -1.0
    summary["reference_mean"] = statistics.fmean(others.values())
    summary["margin"] = margin = sign * (summary["mean"] - summary["reference_mean"])
    spread = pooled_sd(list(values.values()), list(others.values()))
    summary["two_sd"] = None if spread is None else 2 * spread
    if target.not_below is not None:
        if margin >= 0:
            summary["verdict"] = "met"
        elif spread is None:
            summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds on each side"
        else:
            summary["verdict"] = "missed: worse by more than two standard deviations" if -margin > 2 * spread \
                else "met: within two standard deviations"
        return summary
    worst, best_other = min(sign * v for v in values.values()), max(sign * v for v in others.values())
    if margin < target.by or margin <= 0:
        summary["verdict"] = "missed"
    elif spread is None:
        summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds on each side"
    elif margin <= 2 * spread:
        summary["verdict"] = "missed: the margin is within two standard deviations over seeds"
    elif worst <= best_other:
        summary["verdict"] = "missed: its worst seed does not beat the other's best"
    else:
        summary["verdict"] = "met"
    return summary


def _target_summary(target: Target, values: dict[int, float]) -> dict[str, Any]:
    """What every judged target row holds before its verdict: the target, the seeds' values, mean and sd."""
    return {"target": target.describe(), "metric": target.metric, "level": target.value, "above": target.above,
            "by": target.by if target.above else None, "not_below": target.not_below,
            "values": {str(seed): v for seed, v in values.items()}, "seeds": len(values),
            "mean": statistics.fmean(values.values()) if values else None,
            "sd": statistics.stdev(values.values()) if len(values) > 1 else None,
            "reference_mean": None, "margin": None, "margins": None, "two_sd": None}


def judge_target(target: Target, values: dict[int, float], references: dict[int, float] | None = None
                 ) -> dict[str, Any]:
    """One variant against one target. `values`: each seed's reported number; `references`: each seed's number of
    the target's reference row (for `above`). The verdict is "met" or "missed", or "not decided" where the
    margin over a reference row needs a spread that one seed cannot give; a missing number is "no value"."""
    summary = _target_summary(target, values)
    if not values:
        summary["verdict"] = "no value: its runs did not report this number"
        return summary
    sign = 1.0 if M.metric(target.metric).better == "higher" else -1.0
    if target.above is None:
        summary["verdict"] = "met" if sign * (summary["mean"] - target.value) >= 0 else "missed"
        return summary
    references = references or {}
    if not references:
        summary["verdict"] = f"no value: its runs did not report the {target.above} row"
        return summary
    reference_sd = statistics.stdev(references.values()) if len(references) > 1 else None
    summary["reference_mean"] = statistics.fmean(references.values())
    summary["margins"] = {str(seed): sign * (v - references[seed]) for seed, v in values.items() if seed in references}
    summary["margin"] = margin = sign * (summary["mean"] - summary["reference_mean"])
    if margin < target.by:
        summary["verdict"] = "missed"
    elif summary["sd"] is None or reference_sd is None:
        summary["verdict"] = "not decided: two standard deviations over seeds need 2 or more seeds"
    else:
        summary["two_sd"] = 2 * max(summary["sd"], reference_sd)
        summary["verdict"] = ("met" if margin > summary["two_sd"]
                              else "missed: the margin is within two standard deviations over seeds")
    return summary
