"""Retrieval R@K from an ITC similarity matrix (percent, as BLIP reports), and the top candidates that ITM
re-ranks. The metrics' declarations are in blipcore.evaluation.metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .metrics import RECALL_KS


def _as_numpy(sim: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().float().cpu().numpy()
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"similarity must be a non-empty 2-D matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains NaN or infinite values")
    return sim


def topk_candidates(sim: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Column indices of the k highest similarities per row, best first (k clamps to n_cols).

    A stable sort on -sim: ties keep the lower index first. For image-to-text pass sim
    (n_images, n_texts); for text-to-image pass sim.T. Meant for ITM re-ranking of the top k.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return np.argsort(-_as_numpy(sim), axis=1, kind="stable")[:, :k]


def retrieval_metrics_from_ranks(
    i2t_ranks: Sequence[int] | np.ndarray, t2i_ranks: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """R@1/5/10 in percent from 0-based ranks of the best correct item (per image, per text)."""
    i2t, t2i = np.asarray(i2t_ranks), np.asarray(t2i_ranks)
    if i2t.size == 0 or t2i.size == 0:
        raise ValueError("ranks are empty")
    out = {f"i2t_r{k}": 100.0 * float(np.mean(i2t < k)) for k in RECALL_KS}
    out.update({f"t2i_r{k}": 100.0 * float(np.mean(t2i < k)) for k in RECALL_KS})
    out["rsum"] = sum(out.values())
    return out


def retrieval_metrics(
    sim: np.ndarray | torch.Tensor, text_to_image: Sequence[int]
) -> dict[str, float]:
    """Image-to-text and text-to-image R@1/5/10 (percent, as BLIP reports) and their sum, rsum.

    sim is (n_images, n_texts); text j describes image row text_to_image[j], and every image needs
    at least one text. An image scores a hit at K when any of its texts is in its top K. Ties are
    counted pessimistically: every wrong candidate scoring at least as high as the best correct one
    ranks ahead of it, so an encoder that maps everything to one point gets chance-level recall
    rather than a score made by the data order. K beyond the number of candidates clamps (R = 100).
    """
    sim = _as_numpy(sim)
    owner = np.asarray(text_to_image, dtype=np.int64)
    n_images, n_texts = sim.shape
    if owner.shape != (n_texts,):
        raise ValueError(f"text_to_image has {owner.size} entries for {n_texts} texts")
    if owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"text_to_image must index image rows 0..{n_images - 1}")
    if len(np.unique(owner)) != n_images:
        raise ValueError("every image needs at least one text in text_to_image")

    correct = owner[None, :] == np.arange(n_images)[:, None]  # (n_images, n_texts)
    best_correct = np.where(correct, sim, -np.inf).max(axis=1, keepdims=True)
    i2t_ranks = ((sim >= best_correct) & ~correct).sum(axis=1)
    own_sim = sim[owner, np.arange(n_texts)]
    t2i_ranks = (sim >= own_sim[None, :]).sum(axis=0) - 1  # minus the text's own image
    return retrieval_metrics_from_ranks(i2t_ranks, t2i_ranks)
