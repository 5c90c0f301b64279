"""The metric registry: the one declaration of every number the project logs or reports (label, better
direction, format, group), its formatting, and the diagnosis thresholds beside it.

The numbers are computed elsewhere: captioning scores and the reference rows in blipcore.evaluation.captioning
(pycocoevalcap), collapse / diversity in blipcore.evaluation.collapse, retrieval R@K in
blipcore.evaluation.retrieval, ROC AUC (the match AUC) in blipcore.evaluation.matching.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from ..io import is_number
from .matching import roc_auc as roc_auc  # re-exported: CapFilt reads `metrics.roc_auc`

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
    Metric("grad_norm_max", "largest gradient norm", None, ".3f",
           "global gradient norm before clipping, the window's largest", "optimisation"),
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



def format_share(value: Any, missing: str = "-") -> str:
    """A share (a fraction) as a percentage with one decimal, e.g. "12.5%"; `missing` for None or a value that is
    not a finite number."""
    return f"{value:.1%}" if is_number(value) else missing


# --------------------------------------------------------------------------- output


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
