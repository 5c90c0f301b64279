"""Captioning scores and the reference rows scored beside the decoding strategies.

Captioning scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) come from pycocoevalcap with its PTB tokenizer, corpus-level
as COCO reports them (SPICE is not: metrics.SPICE_NOTE says why). The reference rows (metrics.REFERENCE_ROWS) are
captions that measure whether a model learned something: the most frequent training caption, and the consensus
caption of the nearest training images. The metrics' declarations are in blipcore.evaluation.metrics.
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .collapse import collapse_metrics, memorised_share, most_common, normalise_caption, words


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
        tokenized = {k: [normalise_caption(c) for c in caps] for k, caps in raw.items()}
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



def most_frequent_caption_baseline(
    train_captions: list[str], references: dict[int, list[str]], *, meteor: bool = True
) -> dict[str, Any]:
    """The "learned nothing" row: the most frequent training caption given to every image.

    Captions are counted normalised (lowercase, punctuation stripped, so "A dog." == "a dog");
    ties go to the alphabetically first. Returns {"caption": str, "metrics": caption_metrics and
    collapse_metrics merged, "notes": caption_metrics' notes}, laid out as an evaluation's strategy
    entry. BLEU of this row is far from zero: BLEU alone hides collapse.
    """
    normalised = [n for n in map(normalise_caption, train_captions) if n]
    if not normalised:
        raise ValueError("no non-empty training captions")
    if not references:
        raise ValueError("references is empty")
    caption, _ = most_common(normalised)
    scores = reference_row_scores({i: caption for i in references}, references, set(normalised), meteor=meteor)
    return {"caption": caption, **scores}



def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tokens) + Counter(zip(tokens, tokens[1:], strict=False))


def consensus_caption(candidates: Sequence[str]) -> str:
    """The candidate most like the others: highest mean unigram + bigram F1 against every other candidate
    (Devlin et al. 2015 pick the consensus caption of the nearest training images this way, with BLEU or
    CIDEr as the similarity). Ties go to the earlier candidate, so the nearest image's captions win them."""
    if not candidates:
        raise ValueError("no candidate captions")
    grams = [_ngrams(words(c)) for c in candidates]
    sizes = [sum(g.values()) for g in grams]

    def f1(i: int, j: int) -> float:
        overlap = sum((grams[i] & grams[j]).values())
        return 2 * overlap / (sizes[i] + sizes[j]) if sizes[i] + sizes[j] else 0.0

    scores = [sum(f1(i, j) for j in range(len(candidates)) if j != i) for i in range(len(candidates))]
    return candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]


def reference_row_scores(
    predictions: dict[int, str], references: dict[int, list[str]], train_captions: set[str] | None, *, meteor: bool
) -> dict[str, Any]:
    """Captions scored like a decoding strategy (a reference row, or captions written elsewhere):
    {"metrics": captioning, collapse and, given the normalised `train_captions`, memorisation metrics,
    "notes": what was skipped}."""
    metrics = caption_metrics(predictions, references, meteor=meteor)
    notes = metrics.pop("notes")
    captions = list(predictions.values())
    metrics.update(collapse_metrics(captions))
    if train_captions is not None:
        metrics["memorised_share"] = memorised_share(captions, train_captions)
    return {"metrics": metrics, "notes": notes}

