"""Captioning, retrieval and collapse metrics.

Captioning scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) come from pycocoevalcap with its PTB
tokenizer, corpus-level as COCO reports them. Collapse / diversity metrics are pure Python and make
the failure mode of from-scratch captioners measurable: one frequent word repeated, or one caption
given to every image. Retrieval R@K is computed from an ITC similarity matrix.
"""

from __future__ import annotations

import contextlib
import numbers
import shutil
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import Any

import numpy as np
import torch

SPICE_NOTE = (
    "SPICE is not reported: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 on first use "
    "(impossible offline) and runs a Java process with an 8 GB heap."
)

COLLAPSE_METRIC_DOCS: dict[str, str] = {
    "repetition_rate": "share of words that repeat an earlier word of the same caption (0 = none)",
    "longest_run": "mean over captions of the longest run of one word repeated back to back",
    "max_longest_run": "longest run of one word repeated back to back in any caption",
    "distinct_1": "unique words / all words over the corpus (low = few words reused everywhere)",
    "distinct_2": "unique word pairs / all word pairs over the corpus",
    "top_caption_share": "share of images given the single most common caption (1 = one caption for all)",
    "top_caption": "the most common caption (normalised: lowercase, punctuation stripped)",
    "unique_captions": "number of different captions over the corpus",
    "vocab_used": "number of different words used over the corpus",
    "mean_length": "mean caption length in words",
    "mean_entropy": "mean over captions of the mean per-step entropy of the decoder (nats)",
}

_PUNCTUATION = string.punctuation


def words(text: str) -> list[str]:
    """Lowercase whitespace tokens with leading/trailing ASCII punctuation stripped, empties dropped.

    The word definition of the collapse metrics, and the tokenization used for captioning scores
    when Java (hence the PTB tokenizer) is unavailable. It differs from PTB on clitics
    ("dog's" stays one token, PTB gives "dog 's") and drops standalone symbols such as "&".
    """
    return [w for w in (t.strip(_PUNCTUATION) for t in text.lower().split()) if w]


def _normalise(caption: str) -> str:
    """One caption as its words, so that "A dog." and "a dog" count as the same caption."""
    return " ".join(words(caption))


def _most_common(items: Iterable[str]) -> tuple[str, int]:
    """Most frequent item and its count; ties go to the alphabetically first, for determinism."""
    counts = Counter(items)
    if not counts:
        raise ValueError("no items to count")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# --------------------------------------------------------------------------- captioning


def _ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTB tokenizer (one Java call for everything), with its input made safe.

    The tokenizer maps output lines to captions by position, so a carriage return inside a caption
    silently shifts every later caption; whitespace is therefore collapsed to single spaces first.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize(
        {k: [{"caption": " ".join(c.split())} for c in caps] for k, caps in captions.items()}
    )
    if any(len(tokenized.get(k, ())) != len(caps) for k, caps in captions.items()):
        raise RuntimeError("PTB tokenizer output does not line up with its input")
    return tokenized


def _meteor_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    """Corpus METEOR from pycocoevalcap, its Java process stopped before returning."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        # "|||" separates fields in METEOR's stdin protocol; pycocoevalcap strips it from
        # hypotheses only, and one in a reference would desynchronise the exchange.
        refs = {k: [r.replace("|||", "") for r in v] for k, v in gts.items()}
        return float(scorer.compute_score(refs, res)[0])
    finally:
        _close_meteor(scorer)


def _close_meteor(scorer: Any) -> None:
    """Kill METEOR's java process now rather than at garbage collection.

    pycocoevalcap's compute_score takes a lock without try/finally, and its __del__ takes that
    lock again: if Java died mid-exchange, __del__ would block forever at interpreter exit.
    The lock is therefore left released.
    """
    proc = scorer.meteor_p
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):  # unflushed input to a dead process
            stream.close()
    if scorer.lock.locked():
        scorer.lock.release()


def caption_metrics(
    predictions: dict[int, str],
    references: dict[int, list[str]],
    *,
    meteor: bool = True,
) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one caption per image, corpus-level as COCO reports.

    Values are pycocoevalcap's, as fractions (papers print them x100; CIDEr can exceed 1). CIDEr's
    document frequencies come from the references of the scored images, so compare CIDEr only
    over the same image set. Only the images in `predictions` are scored; empty predictions score
    0 rather than fail. METEOR starts a Java process (about 10 s); `meteor=False` skips it.
    Returns keys bleu1..bleu4, meteor (None when skipped), rouge_l, cider, and notes: a list of
    what was skipped or approximated and why (empty when everything ran as COCO does).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("predictions is empty")
    missing = [i for i in predictions if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} predicted ids have no references, e.g. {missing[:5]}")
    if not all(isinstance(p, str) for p in predictions.values()):
        raise ValueError("every prediction must be a string")

    raw = {("gt", i): list(references[i]) for i in predictions}
    raw.update({("res", i): [p] for i, p in predictions.items()})
    notes: list[str] = []
    java = shutil.which("java") is not None
    fallback_reason = None if java else "Java not found"
    if java:
        try:
            tokenized = _ptb_tokenize(raw)
        except (OSError, RuntimeError) as err:
            fallback_reason = f"PTB tokenizer failed ({err})"
    if fallback_reason is not None:
        tokenized = {k: [_normalise(c) for c in caps] for k, caps in raw.items()}
        notes.append(
            f"{fallback_reason}: captions tokenized in pure Python (lowercase, punctuation "
            "stripped), so scores differ slightly from COCO-reported ones"
        )
    gts = {i: tokenized[("gt", i)] for i in predictions}
    res = {i: tokenized[("res", i)] for i in predictions}

    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out: dict[str, Any] = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["meteor"] = None
    if not meteor:
        notes.append("METEOR skipped on request (meteor=False)")
    elif not java:
        notes.append("METEOR skipped: it runs in Java, and Java was not found")
    else:
        try:
            out["meteor"] = _meteor_score(gts, res)
        except (OSError, ValueError) as err:  # Java died: broken pipe or an empty reply
            notes.append(f"METEOR failed and is not reported ({type(err).__name__}: {err})")
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["notes"] = notes
    return out


# --------------------------------------------------------------------------- collapse


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _longest_run(tokens: list[str]) -> int:
    return max((sum(1 for _ in run) for _, run in groupby(tokens)), default=0)


def collapse_metrics(
    captions: list[str], entropies: list[list[float]] | None = None
) -> dict[str, Any]:
    """Diversity and degeneration of a corpus of generated captions, one per image.

    Words are `words(caption)`. `entropies[i]` holds the per-step entropies (nats) of caption i;
    captions with no steps are left out of mean_entropy. See COLLAPSE_METRIC_DOCS for each key.
    """
    if not captions:
        raise ValueError("captions is empty")
    if entropies is not None and len(entropies) != len(captions):
        raise ValueError(f"{len(entropies)} entropy lists for {len(captions)} captions")
    tokenized = [words(c) for c in captions]
    unigrams = [w for t in tokenized for w in t]
    bigrams = [pair for t in tokenized for pair in zip(t, t[1:])]
    runs = [_longest_run(t) for t in tokenized]
    normalised = [" ".join(t) for t in tokenized]
    top_caption, top_count = _most_common(normalised)
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


def most_frequent_caption_baseline(
    train_captions: list[str], references: dict[int, list[str]], *, meteor: bool = True
) -> dict[str, Any]:
    """The "learned nothing" row: the most frequent training caption given to every image.

    Captions are counted normalised (lowercase, punctuation stripped, so "A dog." == "a dog");
    ties go to the alphabetically first. Returns {"caption": str, "metrics": caption_metrics and
    collapse_metrics merged}. BLEU of this row is far from zero: BLEU alone hides collapse.
    """
    normalised = [n for n in map(_normalise, train_captions) if n]
    if not normalised:
        raise ValueError("no non-empty training captions")
    if not references:
        raise ValueError("references is empty")
    caption, _ = _most_common(normalised)
    predictions = {i: caption for i in references}
    metrics = caption_metrics(predictions, references, meteor=meteor)
    metrics.update(collapse_metrics(list(predictions.values())))
    return {"caption": caption, "metrics": metrics}


# --------------------------------------------------------------------------- retrieval

_RECALL_KS = (1, 5, 10)


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
    out = {f"i2t_r{k}": 100.0 * float(np.mean(i2t < k)) for k in _RECALL_KS}
    out.update({f"t2i_r{k}": 100.0 * float(np.mean(t2i < k)) for k in _RECALL_KS})
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


# --------------------------------------------------------------------------- output


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral):
        return str(value)
    return f"{value:.4f}"


def format_metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: one row per strategy, one column per numeric metric, notes underneath.

    Columns are the numeric (or None) metrics in order of first appearance; strings such as
    top_caption are left out; a metric missing from a row shows as "-". Each row's "notes" and
    the SPICE note are printed below the table.
    """
    if not rows:
        raise ValueError("no rows to format")
    columns: list[str] = []
    for metrics in rows.values():
        for key, value in metrics.items():
            if (value is None or _is_number(value)) and key not in columns:
                columns.append(key)
    table = [["strategy", *columns]]
    table += [[name, *(_cell(m.get(c)) for c in columns)] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{name}: {note}" for name, m in rows.items() for note in m.get("notes") or ()]
    return "\n".join([*lines, "", *notes, SPICE_NOTE])
