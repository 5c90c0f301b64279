"""Findings about one evaluation's captions: token-repeat collapse, caption collapse, and a best decoding
strategy no better than a reference row.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...io import is_number
from ..metrics import THRESHOLDS, thresholds
from .reading import Evaluation, History
from .records import (
    RecordedRun,
    average,
    join,
    own_strategy_remedy,
    records_strategy_remedy,
    seeds_text,
    variant_label,
)
from .report import BELOW_ROW, CAPTION_COLLAPSE, TOKEN_REPEAT, Evidence, Hit, level_passed, worst


def _judged(ev: Evaluation, strategy: str, severity: str) -> tuple[str, str]:
    """(severity, note): a collapse under a strategy that is neither greedy (the decoder's own behaviour) nor the
    evaluation's best by CIDEr (the one a user would pick, as a study's dev choice does) is worth knowing, not a
    fault of the run: at most "info"."""
    best = ev.best_strategy("cider")
    if strategy == "greedy" or best is None or strategy == best[0] or severity == "info":
        return severity, ""
    return "info", f" (info: {best[0]} has the best CIDEr here)"


def _token_repeat(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[Hit]:
    hits = []
    for strategy, numbers in ev.strategies.items():
        fired = []
        for key in ("repetition_rate", "longest_run", "max_longest_run"):
            if is_number(numbers.get(key)) and (t := level_passed(thresholds(TOKEN_REPEAT, key), numbers[key], True)):
                fired.append((t, key))
        if not fired:
            continue
        severity, note = _judged(ev, strategy, worst(t.severity for t, _ in fired))
        main = fired[0][1]
        evidence = [Evidence(f"{strategy}_{key}", numbers[key], t.condition()) for t, key in fired]
        rate = numbers.get("repetition_rate")
        summary = (f"{strategy} captions repeat words" + (f": {rate:.0%} of their words repeat an earlier word of "
                                                          "the same caption" if is_number(rate) else "") + note)
        remedy = join(own_strategy_remedy(ev, strategy, main),
                       records_strategy_remedy(records, history, strategy, main, numbers[main]))
        hits.append(Hit(TOKEN_REPEAT, strategy, severity, summary, evidence, remedy))
    return hits


def _caption_collapse(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[Hit]:
    if history.setting("model", "text_only"):
        return []  # a text-only model sees no image: one caption for all is what it can do
    hits = []
    for strategy, numbers in ev.strategies.items():
        share = numbers.get("top_caption_share")
        levels = thresholds(CAPTION_COLLAPSE, "top_caption_share")
        if not is_number(share) or not (t := level_passed(levels, share, True)):
            continue
        evidence = [Evidence(f"{strategy}_top_caption_share", share, t.condition())]
        for key in ("unique_captions", "top_caption"):
            if numbers.get(key) is not None:
                evidence.append(Evidence(f"{strategy}_{key}", numbers[key]))
        severity, note = _judged(ev, strategy, t.severity)
        summary = f"{strategy} decoding gives one caption to {share:.0%} of the images{note}"
        remedy = join(own_strategy_remedy(ev, strategy, "top_caption_share"),
                       records_strategy_remedy(records, history, strategy, "top_caption_share", share))
        hits.append(Hit(CAPTION_COLLAPSE, strategy, severity, summary, evidence, remedy))
    return hits


def _below_rows(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[Hit]:
    best = ev.best_strategy("cider")
    if best is None:
        return []
    strategy, cider = best
    hits = []
    for row, numbers in ev.reference_rows.items():
        key = f"{row}_cider"
        if not is_number(numbers.get("cider")) or not any(t.key == key for t in THRESHOLDS if t.finding == BELOW_ROW):
            continue
        t = level_passed(thresholds(BELOW_ROW, key), cider - numbers["cider"], False)
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
            group = max(chosen, key=lambda g: average([a for a, _ in chosen[g]]))
            values = chosen[group]
            remedy = (f"best recorded: {variant_label(group)}, its dev-chosen strategy's CIDEr "
                      f"{average([a for a, _ in values]):.3f} against the {row} row's "
                      f"{average([b for _, b in values]):.3f} ({seeds_text(len(values))})")
        hits.append(Hit(BELOW_ROW, row, t.severity, summary, evidence, remedy))
    return hits


CHECKS = (_token_repeat, _caption_collapse, _below_rows)  # in the order FINDINGS declares them
