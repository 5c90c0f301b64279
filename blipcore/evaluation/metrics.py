"""Captioning, retrieval and collapse metrics.

Captioning scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) come from pycocoevalcap with its PTB
tokenizer, corpus-level as COCO reports them. Collapse / diversity metrics are pure Python and make
the failure mode of from-scratch captioners measurable: one frequent word repeated, or one caption
given to every image. Retrieval R@K is computed from an ITC similarity matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import shutil
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Literal

import numpy as np
import torch

from ..io import is_number

SPICE_NOTE = (
    "SPICE is not reported: pycocoevalcap's SPICE downloads Stanford CoreNLP 3.6.0 on first use "
    "(impossible offline) and runs a Java process with an 8 GB heap."
)

# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Metric:
    """The one declaration of a number this project logs or reports: every table, chart, 'best' record
    and docs row reads its label, direction and format from here."""

    key: str
    label: str
    better: Literal["higher", "lower"] | None  # None: no better direction (a setting, a length, a time)
    fmt: str  # format spec of one value, e.g. ".3f"; "d" for counts
    doc: str  # what it means, in one line
    group: str  # one of GROUPS
    summary: bool = False  # copied into metrics.jsonl's val lines (per strategy for captioning / collapse)
    headline: bool = False  # shown in run tables (the Runs page, `train info`)

    def format(self, value: Any) -> str:
        """`value` formatted for a table; "-" for a missing one."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        if self.fmt == "d" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{int(value):,}"
        return format(value, self.fmt) if isinstance(value, numbers.Real) else str(value)

    def improves(self, new: float, old: float | None) -> bool:
        """Whether `new` is better than `old` (None: nothing yet, so any value is); ValueError for a metric
        with no better direction."""
        if self.better is None:
            raise ValueError(f"{self.key} has no better direction")
        if old is None:
            return True
        return new > old if self.better == "higher" else new < old


GROUPS = ("record", "loss", "optimisation", "retrieval", "matching", "captioning", "collapse")
RECALL_KS = (1, 5, 10)
_LOSS_LABELS = {"loss": "total loss", "itc": "ITC loss (image-text contrastive)", "lm": "LM loss (captioning)",
                "itm": "ITM loss (image-text matching)", "mae": "MAE loss (masked patch reconstruction)"}
_RETRIEVAL_DIRECTIONS = {"i2t": "image→text", "t2i": "text→image"}

_DECLARED: tuple[Metric, ...] = (
    # fields of every metrics.jsonl line
    Metric("step", "step", None, "d", "optimiser steps done when the line was logged", "record"),
    Metric("epoch", "epoch", None, ".2f", "epochs done (a fraction inside an epoch)", "record"),
    Metric("split", "split", None, "s", '"train" (a window of training steps) or "val" (an evaluation)', "record"),
    Metric("time", "time", None, ".0f", "Unix time the line was written", "record"),
    # losses: train lines hold them as named, val lines as val_<name>
    *(Metric(key, label, "lower", ".4f", f"{label}, mean over the window or the validation items", "loss",
             headline=key == "loss") for key, label in _LOSS_LABELS.items()),
    # the optimiser, in train lines
    Metric("lr", "learning rate", None, ".2e", "learning rate of the step (warm-up, then cosine)", "optimisation"),
    Metric("temperature", "ITC temperature τ", None, ".4f", "learned temperature of the ITC softmax",
           "optimisation"),
    Metric("grad_norm", "gradient norm", None, ".3f", "global gradient norm before clipping, mean over the window",
           "optimisation"),
    Metric("samples_per_s", "throughput (samples/s)", "higher", ".1f", "training samples per second, all processes",
           "optimisation"),
    Metric("data_wait_share", "data wait (share of step time)", "lower", ".1%",
           "share of the window's time the training loop waited for the next batch (a starved step waits long)",
           "optimisation"),
    # retrieval from ITC embeddings (percent); itm_<key> after ITM re-ranking of ITC's top candidates
    *(Metric(f"{d}_r{k}", f"{arrow} R@{k}", "higher", ".1f",
             f"{arrow} retrieval: % of queries with a correct match in the top {k}", "retrieval", summary=True,
             headline=k == 1) for d, arrow in _RETRIEVAL_DIRECTIONS.items() for k in RECALL_KS),
    Metric("rsum", "R sum", "higher", ".1f", "sum of the six R@K", "retrieval", summary=True),
    # matching: can a score tell an image's own caption from another image's (CapFilt's filter task)?
    *(Metric(f"{scorer}_match_auc", f"{name} match AUC", "higher", ".3f",
             f"ROC AUC of the {score} at telling each evaluation image's own caption from another image's caption "
             "drawn at random (0.5 = chance, 1 = a perfect filter)", "matching", summary=True)
      for scorer, name, score in (("itc", "ITC", "ITC cosine similarity"), ("itm", "ITM", "ITM head's match logit"))),
    # captioning scores (pycocoevalcap, corpus level, fractions)
    *(Metric(f"bleu{n}", f"BLEU-{n}", "higher", ".3f", f"BLEU-{n}: {n}-gram precision against the references",
             "captioning", summary=n == 4) for n in range(1, 5)),
    Metric("meteor", "METEOR", "higher", ".3f", "METEOR (Java; skipped in the trainer's evaluations)", "captioning",
           summary=True),
    Metric("rouge_l", "ROUGE-L", "higher", ".3f", "ROUGE-L: longest common subsequence F-score", "captioning"),
    Metric("cider", "CIDEr", "higher", ".3f", "CIDEr: consensus with the references, TF-IDF weighted n-grams",
           "captioning", summary=True, headline=True),
    # collapse and diversity of the generated captions
    Metric("repetition_rate", "repetition rate", "lower", ".3f",
           "share of words that repeat an earlier word of the same caption (0 = none)", "collapse", summary=True),
    Metric("longest_run", "longest run", "lower", ".2f",
           'mean over captions of the longest run of one word repeated back to back ("a a a a" = 4)', "collapse"),
    Metric("max_longest_run", "longest run (max)", "lower", "d",
           "longest run of one word repeated back to back in any caption", "collapse"),
    Metric("distinct_1", "distinct-1", "higher", ".3f",
           "unique words / all words over the corpus (low = few words reused everywhere)", "collapse", summary=True),
    Metric("distinct_2", "distinct-2", "higher", ".3f", "unique word pairs / all word pairs over the corpus",
           "collapse"),
    Metric("top_caption_share", "share of the most common caption", "lower", ".1%",
           "share of images given the single most common caption (1 = one caption for all)", "collapse",
           summary=True),
    Metric("top_caption", "most common caption", None, "s",
           "the most common caption (normalised: lowercase, punctuation stripped)", "collapse"),
    Metric("unique_captions", "unique captions", "higher", "d", "number of different captions over the corpus",
           "collapse"),
    Metric("vocab_used", "vocabulary used", "higher", "d", "number of different words used over the corpus",
           "collapse"),
    Metric("mean_length", "mean length (words)", None, ".1f", "mean caption length in words", "collapse",
           summary=True),
    Metric("mean_entropy", "mean entropy (nats)", None, ".3f",
           "mean over captions of the mean per-step entropy of the decoder's next-word distribution (nats)",
           "collapse"),
    Metric("memorised_share", "share found among the training captions", None, ".1%",
           "share of captions found verbatim among the training captions (memorisation)", "collapse",
           summary=True),
)
# Rows that every evaluation scores beside the decoding strategies, so that "learned something" is measured:
# `<row>_<metric>` keys in metrics.jsonl, `reference_rows[<row>]` in an evaluation file.
REFERENCE_ROWS: dict[str, str] = {
    "most-frequent": "the most frequent training caption, given to every image (learned nothing)",
    "nearest-neighbour": "the consensus caption of the training images nearest by the model's image embedding "
                         "(Devlin et al. 2015: retrieval, no generation)",
}
METRICS: dict[str, Metric] = {m.key: m for m in _DECLARED}
# The collapse metrics and their docs, in declaration order (the collapse tables of README.md and docs/metrics.md
# list them).
COLLAPSE_METRIC_DOCS: dict[str, str] = {m.key: m.doc for m in _DECLARED if m.group == "collapse"}


def metrics_in(group: str) -> list[Metric]:
    """The declared metrics of a group, in declaration order."""
    if group not in GROUPS:
        raise ValueError(f"unknown metric group {group!r}; groups: {', '.join(GROUPS)}")
    return [m for m in _DECLARED if m.group == group]


def summary_keys(group: str) -> list[str]:
    """Keys of a group that evaluations copy into metrics.jsonl (see Metric.summary)."""
    return [m.key for m in metrics_in(group) if m.summary]


@functools.cache
def metric(key: str) -> Metric | None:
    """The declaration of a logged key, or None when it is not declared. Resolves the derived keys:
    val_<loss> (validation losses), itm_<retrieval> (after ITM re-ranking) and <strategy>_<metric>
    (captioning and collapse per decoding strategy or reference row, e.g. greedy_cider,
    beam-no-repeat_top_caption_share, nearest-neighbour_cider)."""
    if key in METRICS:
        return METRICS[key]
    prefix, _, rest = key.partition("_")
    base = METRICS.get(rest)
    if prefix == "val" and base is not None and base.group == "loss":
        return dataclasses.replace(base, key=key, label=f"validation {base.label}")
    if prefix == "itm" and base is not None and base.group == "retrieval":
        return dataclasses.replace(base, key=key, label=f"{base.label} (ITM re-ranked)", headline=False)
    from .decoding import STRATEGY_PRESETS  # the strategy names; imported here, decoding imports the model

    for strategy in (*STRATEGY_PRESETS, *REFERENCE_ROWS):
        base = METRICS.get(key[len(strategy) + 1 :]) if key.startswith(f"{strategy}_") else None
        if base is not None and base.group in ("captioning", "collapse"):
            if strategy in REFERENCE_ROWS:  # a yardstick: nothing to rank epochs by, no column of its own
                return dataclasses.replace(base, key=key, label=f"{strategy} {base.label}", better=None,
                                           headline=False)
            return dataclasses.replace(base, key=key, label=f"{strategy} {base.label}")
    return None


def is_declared(key: str) -> bool:
    return metric(key) is not None


# --------------------------------------------------------------------------- diagnosis thresholds
# A run diagnosis (blipcore.evaluation.diagnosis) judges these numbers; every level it uses is declared here, once,
# with the reason for it, taken from the committed records (studies/results/): the recipes and CapFilt studies' test
# evaluations (1,000 Flickr8k test images) and the GPU run's training log and validation lines (500 dev images).
SEVERITIES = ("info", "warning", "error")  # a finding's severity, mildest first


@dataclass(frozen=True)
class Threshold:
    """One level of one diagnosis finding: the finding fires with `severity` when the registry key `key` passes
    `level` as `test` says ("{level}" in it stands for the level, shown in `unit`: "metric" the key's own
    format, "share" a percentage, "factor" a plain number); `reason` says why this level."""

    finding: str
    key: str
    level: float
    severity: str
    test: str
    reason: str
    unit: Literal["metric", "share", "factor"] = "metric"
    subject: str = ""  # which of the finding's kinds it judges, where one finding has several (a loss spike, ...)

    def level_text(self) -> str:
        if self.unit == "share":
            return f"{self.level:.0%}"
        if self.unit == "factor":
            return f"{self.level:g}"
        return metric(self.key).format(self.level)

    def condition(self) -> str:
        """The test with its level filled in, e.g. "≥ 0.320"."""
        return self.test.format(level=self.level_text())


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("token-repeat collapse", "repetition_rate", 0.32, "warning", "≥ {level}",
              "the original recipe's test captions repeat 0.34-0.50 of their words (greedy; beam 0.37-0.46), every "
              "other recorded recipe's 0.22-0.30 (greedy), human captions (nearest-neighbour row) 0.12-0.13"),
    Threshold("token-repeat collapse", "repetition_rate", 0.60, "error", "≥ {level}",
              "no recorded run reaches it (worst: noisy-data CapFilt greedy, 0.52); the write-up's "
              "\"carriages carriages ...\" captions, most of whose words repeat, do"),
    Threshold("token-repeat collapse", "longest_run", 1.5, "warning", "≥ {level}",
              "the recorded runs' mean longest run is 1.00-1.08 (a few looping captions in 1,000); 1.5 means "
              "every other caption repeats a word back to back"),
    Threshold("token-repeat collapse", "max_longest_run", 4, "info", "≥ {level}",
              "two CapFilt runs' greedy captions (clean and bootstrapped data, seed 2) hold a loop of one word 14 "
              "times; every other recorded strategy's longest run is 1-3"),
    Threshold("caption collapse", "top_caption_share", 0.10, "warning", "≥ {level}",
              "human captions (nearest-neighbour row) give their most common caption to 0.8-1.6 % of the test "
              "images, the tuned recipe's greedy and beam captions to at most 8.5 %, the original recipe's greedy "
              "captions to 9.1-21.3 %"),
    Threshold("caption collapse", "top_caption_share", 0.50, "error", "≥ {level}",
              "one caption for half the images: only the text-only pretraining stage (no image input: 100 %) and "
              "the most-frequent row (by construction) get there; the worst image-conditioned run, 29.5 %"),
    Threshold("no better than a reference row", "most-frequent_cider", 0.0, "error",
              "best strategy's CIDEr minus the row's ≤ {level}",
              "every recorded run's best strategy beats the most-frequent row (CIDEr 0.062-0.067) by 0.020 (the "
              "text-only stage) to 0.150; at or below it, the captions say no more than one fixed sentence"),
    Threshold("no better than a reference row", "nearest-neighbour_cider", 0.0, "warning",
              "best strategy's CIDEr minus the row's ≤ {level}",
              "every recorded run's best strategy beats the nearest-neighbour row (by 0.007 to 0.121); the GPU "
              "run's first epoch did not (beam 0.125, row 0.146): retrieving training captions did as well"),
    Threshold("alignment near chance", "i2t_r1", 3, "warning",
              "R@1 of both directions ≤ {level} × chance (100/N %)", unit="factor", reason=(
                  "a random ranking finds 1 image in N; the recorded runs' better direction reaches 4.4-16 x chance "
                  "on 1,000 test images, the GPU run's 7-20 x on 500; within 3 x a few hits are counting noise")),
    Threshold("alignment near chance", "i2t_r1", 1.5, "error",
              "R@1 of both directions ≤ {level} × chance (100/N %)", unit="factor", reason=(
                  "as good as a random ranking: the ITC embeddings have learned no image-text alignment")),
    Threshold("alignment near chance", "itc_match_auc", 0.60, "warning", "≤ {level}",
              "the recorded runs' ITC match AUC is 0.70-0.81 (the GPU run's 0.72-0.79); 0.5 is chance"),
    Threshold("alignment near chance", "itc_match_auc", 0.55, "error", "≤ {level}",
              "within 0.05 of chance (0.5): ITC cannot tell an image's own caption from another image's"),
    Threshold("ITM at chance", "itm_match_auc", 0.60, "warning", "≤ {level}",
              "the recorded ITM heads reach 0.59 (decoder-pretrained recipe, seed 0: its ITC does better, 0.73) to "
              "0.79 (the CapFilt filters 0.68-0.79)"),
    Threshold("ITM at chance", "itm_match_auc", 0.55, "error", "≤ {level}",
              "within 0.05 of chance (0.5): a CapFilt filter with this head keeps and drops captions at random"),
    Threshold("over-confidence", "val_loss", 0.05, "info", "a validation loss ≥ {level} above its minimum",
              unit="share", reason=(
                  "the GPU run's validation ITC loss rose 4.6 % one epoch after its minimum (3.57, epoch 3) and "
                  "25.6 % by epoch 8 (4.48), while its dev ranking kept improving; 5 % leaves a one-epoch wobble out")),
    Threshold("memorisation", "rsum", 0.10, "warning",
              "a dev ranking metric (R sum, text→image R@1, match AUC above 0.5) ≥ {level} below its best, with "
              "a validation loss risen", unit="share", reason=(
                  "while its validation ITC loss rose 26 %, the GPU run's rsum, text→image R@1 and ITC match AUC "
                  "stayed within 0.8 %, 1.3 % and 4.5 % of their best: smaller falls are the noise of 500 images")),
    Threshold("memorisation", "cider", 0.20, "warning",
              "the best strategy's CIDEr ≥ {level} below its best, with the validation LM loss risen", unit="share",
              reason=("CIDEr of 200 captioned images moves more: the GPU run's best-strategy CIDEr fell 10.8 % "
                      "(0.265 to 0.236) in its last epoch while every ranking metric held")),
    Threshold("optimisation fault", "loss", 1.5, "warning", "≥ {level} × the median of the 10 lines before",
              unit="factor", subject="loss spike", reason=(
                  "none of the GPU run's 378 training lines exceeds the median of the 10 before it by more than "
                  "3.2 %; a loss half as high again is a blow-up starting, not noise")),
    Threshold("optimisation fault", "grad_norm", math.inf, "error", "not finite (NaN or infinite)",
              subject="non-finite", reason=(
                  "a NaN or infinite loss or gradient norm stops the trainer (NonFiniteLossError); no recorded run "
                  "had one")),
    Threshold("optimisation fault", "lr", 0.05, "info",
              "≤ its floor + {level} of (peak − floor), the training loss still falling", unit="share",
              subject="learning rate at its floor", reason=(
                  "a cosine schedule spends its last 14 % of steps within 5 % of its floor: a loss still falling "
                  "there was stopped by the schedule, not by convergence")),
    Threshold("optimisation fault", "loss", 0.02, "info",
              "falling ≥ {level} from the first half of the stretch at the floor to the second", unit="share",
              subject="learning rate at its floor", reason=(
                  "the GPU run's training loss still fell 3.5 % over its eighth epoch (5.69 to 5.49): 2 % over the "
                  "last stretch is still learning")),
    Threshold("starved step", "data_wait_share", 0.30, "warning", "median over the training lines ≥ {level}",
              "no committed record logs it yet (the GPU run predates it); the test suite's tiny CPU runs, whose "
              "batches are built inside the training loop, wait 2-38 %: a third of the time is the loader, "
              "not the model, setting the pace"),
)


def thresholds(finding: str, key: str | None = None, subject: str = "") -> list[Threshold]:
    """The declared thresholds of a finding (of one key, of one subject), most severe first."""
    found = [t for t in THRESHOLDS
             if t.finding == finding and (key is None or t.key == key) and (not subject or t.subject == subject)]
    if not found:
        raise ValueError(f"no threshold declared for {finding!r}" + (f" on {key!r}" if key else ""))
    return sorted(found, key=lambda t: -SEVERITIES.index(t.severity))


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
    bigrams = [pair for t in tokenized for pair in zip(t, t[1:], strict=False)]
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
    collapse_metrics merged, "notes": caption_metrics' notes}, laid out as an evaluation's strategy
    entry. BLEU of this row is far from zero: BLEU alone hides collapse.
    """
    normalised = [n for n in map(_normalise, train_captions) if n]
    if not normalised:
        raise ValueError("no non-empty training captions")
    if not references:
        raise ValueError("references is empty")
    caption, _ = _most_common(normalised)
    scores = reference_row_scores({i: caption for i in references}, references, set(normalised), meteor=meteor)
    return {"caption": caption, **scores}


def memorised_share(captions: Sequence[str], train_captions: set[str]) -> float:
    """Share of `captions` found verbatim among `train_captions` (a set of normalised training captions,
    see `normalised_captions`): a captioner that only recites its training set scores 1."""
    if not captions:
        raise ValueError("captions is empty")
    return sum(_normalise(c) in train_captions for c in captions) / len(captions)


def normalised_captions(captions: Iterable[str]) -> set[str]:
    """Captions as the collapse metrics compare them (lowercase, punctuation stripped), as a set."""
    return {n for n in map(_normalise, captions) if n}


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


# --------------------------------------------------------------------------- retrieval

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


# --------------------------------------------------------------------------- output


# --- detection (CapFilt's filter against planted noise) ---------------------------------------------------
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
            if (value is None or is_number(value)) and key not in columns:
                columns.append(key)
    table = [["strategy", *columns]]
    table += [[name, *(_cell(m.get(c)) for c in columns)] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{name}: {note}" for name, m in rows.items() for note in m.get("notes") or ()]
    return "\n".join([*lines, "", *notes, SPICE_NOTE])
