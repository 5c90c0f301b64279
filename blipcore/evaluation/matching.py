"""ROC curve and AUC of a score that should tell positives from negatives: the match AUC of an evaluation (an
image's own caption against another image's) and CapFilt's filter against planted noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_curve(scores: Sequence[float] | np.ndarray,
              positives: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) of calling every item with score >= threshold
    positive, one point per distinct score from the highest down, after a first point (0, 0) at +inf."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1] if len(scores) else np.array([], int)
    tp = np.cumsum(positives)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = max(1, int(positives.sum())), max(1, int((~positives).sum()))
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, scores[last_of_tie]])


def roc_auc(scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half; Mann-Whitney U / (n_pos n_neg)). None when either class is empty."""
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
