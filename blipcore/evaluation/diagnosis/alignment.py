"""Findings about one evaluation's image-text alignment: ITC retrieval and matching near chance, and an ITM head
at chance.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...io import is_number
from ..metrics import Threshold, metric, thresholds
from .reading import Evaluation, History
from .records import RecordedRun, records_value_remedy
from .report import ALIGNMENT, ITM, Evidence, Hit, level_passed, worst


def _images(ev: Evaluation, history: History) -> int | None:
    if ev.num_images:
        return ev.num_images
    configured = history.setting("data", "eval_images")
    return int(configured) if is_number(configured) and configured > 0 else None


def _alignment(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[Hit]:
    fired: list[tuple[Threshold, list[Evidence]]] = []
    n = _images(ev, history)
    r1 = [(key, ev.retrieval[key]) for key in ("i2t_r1", "t2i_r1") if is_number(ev.retrieval.get(key))]
    if n and len(r1) == 2:
        chance = 100.0 / n
        t = level_passed(thresholds(ALIGNMENT, "i2t_r1"), max(v for _, v in r1), False, scale=chance)
        if t is not None:
            chance_text = f"chance {metric('i2t_r1').format(chance)} for {n:,} images; {t.condition()}"
            fired.append((t, [Evidence(key, value, f"{value / chance:.1f} × chance" + ("" if i else f", {chance_text}"))
                              for i, (key, value) in enumerate(r1)]))
    auc = ev.matching.get("itc_match_auc")
    if is_number(auc) and (t := level_passed(thresholds(ALIGNMENT, "itc_match_auc"), auc, False)):
        fired.append((t, [Evidence("itc_match_auc", auc, f"0.5 = chance; {t.condition()}")]))
    if not fired:
        return []
    severity = worst(t.severity for t, _ in fired)
    evidence = [e for _, found in fired for e in found]
    summary = "image-text alignment near chance: the ITC embeddings barely find an image's own caption"
    remedy = records_value_remedy(records, "itc_match_auc", ev.matching.get("itc_match_auc"))
    return [Hit(ALIGNMENT, "", severity, summary, evidence, remedy)]


def _itm(ev: Evaluation, history: History, records: Sequence[RecordedRun]) -> list[Hit]:
    auc = ev.matching.get("itm_match_auc")
    weight = history.setting("model", "itm_weight")
    if not is_number(auc) or (is_number(weight) and weight <= 0):
        return []
    t = level_passed(thresholds(ITM, "itm_match_auc"), auc, False)
    if t is None:
        return []
    evidence = [Evidence("itm_match_auc", auc, f"0.5 = chance; {t.condition()}")]
    if is_number(ev.matching.get("itc_match_auc")):
        evidence.append(Evidence("itc_match_auc", ev.matching["itc_match_auc"], "the same pairs"))
    summary = "the ITM head tells an image's own caption from another image's little better than a coin"
    return [Hit(ITM, "", t.severity, summary, evidence, records_value_remedy(records, "itm_match_auc", auc))]


CHECKS = (_alignment, _itm)  # in the order FINDINGS declares them
