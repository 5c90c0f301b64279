"""Collapse and diversity of generated captions, pure Python: the failure mode of from-scratch captioners made
measurable (one frequent word repeated, one caption given to every image), and the word definition every caption
comparison of the project uses (`words`). The metrics' declarations are in blipcore.evaluation.metrics."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import Any

import numpy as np

_PUNCTUATION = string.punctuation


def words(text: str) -> list[str]:
    """Lowercase whitespace tokens with leading/trailing ASCII punctuation stripped, empties dropped.

    The word definition of the collapse metrics, and the tokenization used for captioning scores
    when Java (hence the PTB tokenizer) is unavailable. It differs from PTB on clitics
    ("dog's" stays one token, PTB gives "dog 's") and drops standalone symbols such as "&".
    """
    return [w for w in (t.strip(_PUNCTUATION) for t in text.lower().split()) if w]


def normalise_caption(caption: str) -> str:
    """One caption as its words, so that "A dog." and "a dog" count as the same caption."""
    return " ".join(words(caption))


def most_common(items: Iterable[str]) -> tuple[str, int]:
    """Most frequent item and its count; ties go to the alphabetically first, for determinism."""
    counts = Counter(items)
    if not counts:
        raise ValueError("no items to count")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _longest_run(tokens: list[str]) -> int:
    return max((sum(1 for _ in run) for _, run in groupby(tokens)), default=0)


def collapse_metrics(
    captions: list[str], entropies: list[list[float]] | None = None
) -> dict[str, Any]:
    """Diversity and degeneration of a corpus of generated captions, one per image.

    Words are `words(caption)`. `entropies[i]` holds the per-step entropies (nats) of caption i;
    captions with no steps are left out of mean_entropy. See metrics.COLLAPSE_METRIC_DOCS for each key.
    """
    if not captions:
        raise ValueError("captions is empty")
    if entropies is not None and len(entropies) != len(captions):
        raise ValueError(f"{len(entropies)} entropy lists for {len(captions)} captions")
    tokenized = [words(c) for c in captions]
    unigrams = [w for t in tokenized for w in t]
    bigrams = [pair for t in tokenized for pair in zip(t, t[1:], strict=False)]
    runs = [_longest_run(t) for t in tokenized]
    normalised = [" ".join(t) for t in tokenized]
    top_caption, top_count = most_common(normalised)
    step_means = [sum(e) / len(e) for e in entropies or () if len(e)]
    return {
        "repetition_rate": _ratio(sum(len(t) - len(set(t)) for t in tokenized), len(unigrams)),
        "longest_run": sum(runs) / len(runs),
        "max_longest_run": max(runs),
        "distinct_1": _ratio(len(set(unigrams)), len(unigrams)),
        "distinct_2": _ratio(len(set(bigrams)), len(bigrams)),
        "top_caption_share": top_count / len(captions),
        "top_caption": top_caption,
        "unique_captions": len(set(normalised)),
        "vocab_used": len(set(unigrams)),
        "mean_length": len(unigrams) / len(captions),
        "mean_entropy": float(np.mean(step_means)) if step_means else None,
    }



def memorised_share(captions: Sequence[str], train_captions: set[str]) -> float:
    """Share of `captions` found verbatim among `train_captions` (a set of normalised training captions,
    see `normalised_captions`): a captioner that only recites its training set scores 1."""
    if not captions:
        raise ValueError("captions is empty")
    return sum(normalise_caption(c) in train_captions for c in captions) / len(captions)


def normalised_captions(captions: Iterable[str]) -> set[str]:
    """Captions as the collapse metrics compare them (lowercase, punctuation stripped), as a set."""
    return {n for n in map(normalise_caption, captions) if n}

