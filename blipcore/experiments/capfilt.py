"""CapFilt (BLIP's Captioning and Filtering): a captioner writes synthetic captions for the training images, an
image-text filter scores every original and synthetic caption, and the captions it trusts become the
bootstrapped dataset a model is trained on again.

    python -m train capfilt --captioner RUN[:EPOCH] --filter RUN[:EPOCH] --data DIR --out DIR2

The captioner needs a trained decoder (LM); the filter an ITM head (its match probability is the score BLIP
filters with) or ITC (cosine similarity of the two embeddings); every caption gets both scores the filter
has. A caption is kept when its score reaches --threshold (ITM probability) or lies in the top --keep-fraction
of all scores. When DIR has a clean subset (`data noise --clean-images`: the human-annotated share), its images
are neither captioned nor filtered: their captions are kept as they are, as BLIP keeps COCO's. DIR2 is a derived
dataset (blipcore.data.derived: images linked, val/test annotations copied) whose training file holds the kept
captions, with:

    capfilt.jsonl   one line per caption scored, in image order, originals first, then the clean subset's:
                    {"image_id", "file_name", "origin": "original" | "synthetic" | "clean", "index" (the
                    original's position in the source's annotation file, or the synthetic caption's draw k),
                    "text", "planted" (from DIR/noise.jsonl; null when DIR has none or for synthetic captions),
                    "itm" (match probability or null), "itc" (cosine similarity or null; both null for a clean
                    caption, which is not scored), "kept"}
    capfilt.json    the settings, counts, the cut-off, where the captioner and the filter started from (their
                    run.json "init": a fine-tuned run names its init run and the parts that started fresh), and
                    with planted noise each scorer's ROC AUC, precision and recall at finding the planted
                    captions among the scored originals
    capfilt-scores/ the scores of each batch of images as it is done: a stopped run resumes (--resume) there

Batched on the project's decoding (blipcore.evaluation.decoding.generate) and model code, with a progress bar.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.derived import (
    CAPFILT_RECORD,
    CAPFILT_SCORES,
    CAPFILT_SUMMARY,
    read_caption_file,
    source_entries,
    write_derived_dataset,
)
from ..data.folders import MARKER, DataSourceError, write_file, write_json
from ..data.images import ImageLoadError, load_image
from ..data.prep.fetch import OutputFolder
from ..data.prep.noise import read_noise_record
from ..data.transforms import build_transform
from ..evaluation import metrics as M
from ..evaluation.decoding import STRATEGY_PRESETS, decoding_config, generate
from ..model.config import BlipConfig
from ..model.tokenizer import tokenize_captions
from ..runs.rundir import Checkpoint, RunDir, RunError, init_checkpoint, parse_run_spec, read_json

SCORERS = ("itm", "itc")  # the filter's two scores: ITM match probability, ITC cosine similarity
SCORED_ORIGINS = ("original", "synthetic")  # the captions the filter scores; "clean" and "unreadable" lines it does not
DEFAULT_THRESHOLD = 0.5  # ITM: keep a caption the filter finds more likely matching than not
SAMPLING = ("nucleus", "top-k")  # strategies that draw a different caption each time (BLIP's choice: nucleus)


class CapfiltError(ValueError):
    """A captioner, filter, dataset or setting CapFilt cannot use; the message names what is missing."""


@dataclass
class CapfiltSettings:
    """What decides the output: a resumed run must use the same (its scores are reused)."""

    synthetic_per_image: int = 1
    decoding: str = "nucleus"
    score: str = "auto"  # itm | itc | auto (itm when the filter has an ITM head, else itc)
    threshold: float | None = None  # keep captions whose score >= threshold (ITM probability)
    keep_fraction: float | None = None  # or keep this share of all captions, the highest scores
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        """CapfiltError for settings outside their range, before anything is loaded or written."""
        if self.threshold is not None and self.keep_fraction is not None:
            raise CapfiltError("give --threshold or --keep-fraction, not both")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise CapfiltError(f"--threshold must be in [0, 1] (an ITM match probability), got {self.threshold}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise CapfiltError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.score not in (*SCORERS, "auto"):
            raise CapfiltError(f"--score must be itm, itc or auto, got {self.score!r}")
        if self.score == "itc" and self.threshold is not None:
            raise CapfiltError("--threshold is an ITM probability; ITC similarities are filtered by --keep-fraction")
        if self.synthetic_per_image < 0 or self.batch_size < 1:
            raise CapfiltError("--synthetic must be >= 0 and --batch-size >= 1")
        if self.decoding not in STRATEGY_PRESETS:
            raise CapfiltError(f"--decoding must be one of {', '.join(STRATEGY_PRESETS)}, got {self.decoding!r}")
        if self.synthetic_per_image > 1 and self.decoding not in SAMPLING:
            raise CapfiltError(f"--decoding {self.decoding} gives the same caption every time: with --synthetic "
                               f"{self.synthetic_per_image} use a sampling strategy ({', '.join(SAMPLING)})")


@dataclass
class Models:
    """The loaded captioner and filter, and which scores the filter can give."""

    captioner: Any
    captioner_cfg: BlipConfig
    captioner_ckpt: Checkpoint
    filter: Any
    filter_cfg: BlipConfig
    filter_ckpt: Checkpoint
    scorers: tuple[str, ...] = field(default=())


def load_models(captioner: str, filter_spec: str, device: torch.device, writes_captions: bool = True) -> Models:
    """Load both checkpoints ("RUN[:EPOCH]"); CapfiltError naming the missing part when the captioner has no
    trained decoder (and is to write captions: with --synthetic 0 it writes none) or the filter neither an
    ITM head nor ITC."""
    loaded = []
    for spec in (captioner, filter_spec):
        ckpt = init_checkpoint(spec)
        model, cfg, ckpt = RunDir(parse_run_spec(spec)[0]).load_model(ckpt.epoch, device=device)
        loaded.append((model, cfg, ckpt))
    (cap, cap_cfg, cap_ckpt), (fil, fil_cfg, fil_ckpt) = loaded
    if writes_captions and not cap.use_lm:
        raise CapfiltError(f"--captioner {captioner}: this run has no decoder (it was trained with model.lm_weight "
                           "= 0): it cannot write captions; give a run trained with the LM loss")
    scorers = tuple(name for name, present in (("itm", fil.use_itm), ("itc", fil.use_itc)) if present)
    if not scorers:
        raise CapfiltError(f"--filter {filter_spec}: this run has neither an ITM head (model.itm_weight = 0) nor ITC "
                           "(model.itc_weight = 0): it cannot score captions")
    return Models(cap, cap_cfg, cap_ckpt, fil, fil_cfg, fil_ckpt, scorers)


def chosen_scorer(settings: CapfiltSettings, scorers: Sequence[str], filter_spec: str) -> str:
    if settings.score == "auto":
        return scorers[0]
    if settings.score not in scorers:
        part = "an ITM head (model.itm_weight = 0)" if settings.score == "itm" else "ITC (model.itc_weight = 0)"
        raise CapfiltError(f"--score {settings.score}: --filter {filter_spec} has no {part}")
    return settings.score


# --- scoring ------------------------------------------------------------------------------------------
@torch.inference_mode()
def filter_scores(model, images: torch.Tensor, texts: list[str], image_index: list[int],
                  device: torch.device) -> dict[str, list[float] | None]:
    """Each text's ITM match probability and ITC cosine similarity with its image (images[image_index[i]]);
    None for a score the model cannot give."""
    image_embeds, image_feat = model.encode_image(images.to(device))
    tokens = tokenize_captions(texts, model.cfg.max_text_len)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    rows = torch.tensor(image_index, device=device)
    scores: dict[str, list[float] | None] = {"itm": None, "itc": None}
    if model.use_itm:
        logits = model.itm_logits(image_embeds[rows], ids, mask)
        scores["itm"] = F.softmax(logits.float(), dim=-1)[:, 1].cpu().tolist()
    if model.use_itc:
        _, text_feat = model.encode_text(ids, mask)
        scores["itc"] = (image_feat[rows] * text_feat).sum(-1).float().cpu().tolist()
    return scores


def _pixels(pictures: list[Any], size: int) -> torch.Tensor:
    """The evaluation transform of each PIL image at `size` pixels, stacked (B, 3, size, size)."""
    transform = build_transform(size, train=False)
    return torch.stack([transform(picture) for picture in pictures])


def score_batch(models: Models, entries: list[dict[str, Any]], images_root: Path, settings: CapfiltSettings,
                device: torch.device, batch_number: int) -> list[dict[str, Any]]:
    """The capfilt.jsonl lines (without "kept") of one batch of images: their original captions, then
    K synthetic captions each. An image that cannot be read is left out (its captions too), with a line
    saying so ("origin": "unreadable")."""
    readable, pictures, lines = [], [], []
    for entry in entries:
        try:
            pictures.append(load_image(images_root / entry["file_name"]))
            readable.append(entry)
        except ImageLoadError as err:
            lines.append({"image_id": entry["image_id"], "file_name": entry["file_name"], "origin": "unreadable",
                          "text": str(err), "kept": False})
    if not readable:
        return lines
    sizes = {models.captioner_cfg.model.image_size, models.filter_cfg.model.image_size}
    pixels_at = {size: _pixels(pictures, size) for size in sizes}  # one decode, one tensor per model size
    synthetic: list[list[str]] = [[] for _ in readable]
    if settings.synthetic_per_image:
        pixels = pixels_at[models.captioner_cfg.model.image_size]
        for k in range(settings.synthetic_per_image):
            # a distinct, reproducible draw for every (batch, k): resuming writes the same captions
            seed = settings.seed + 1_000_003 * batch_number + k
            drawn = generate(models.captioner, pixels, decoding_config(settings.decoding, seed=seed))
            for i, caption in enumerate(drawn):
                synthetic[i].append(caption.text)
    pairs: list[tuple[int, dict[str, Any]]] = []
    for i, entry in enumerate(readable):
        for index, text, planted in entry["originals"]:
            pairs.append((i, {"origin": "original", "index": index, "text": text, "planted": planted}))
        for k, text in enumerate(synthetic[i]):
            pairs.append((i, {"origin": "synthetic", "index": k, "text": text, "planted": None}))
    pixels = pixels_at[models.filter_cfg.model.image_size]
    scores = filter_scores(models.filter, pixels, [p["text"] or "." for _, p in pairs], [i for i, _ in pairs],
                           device)
    for n, (i, pair) in enumerate(pairs):
        lines.append({"image_id": readable[i]["image_id"], "file_name": readable[i]["file_name"], **pair,
                      **{name: None if values is None else round(values[n], 6) for name, values in scores.items()}})
    return lines


# --- deciding and measuring ------------------------------------------------------------------------------
def cutoff(scores: Sequence[float], settings: CapfiltSettings) -> float:
    """The lowest score kept: the threshold, or the score at the keep fraction (ties kept)."""
    if settings.keep_fraction is not None:
        ranked = sorted(scores, reverse=True)
        return ranked[max(0, math.ceil(settings.keep_fraction * len(ranked)) - 1)] if ranked else 0.0
    return DEFAULT_THRESHOLD if settings.threshold is None else settings.threshold


def planted_detection(lines: Sequence[dict[str, Any]], scorer: str, kept: Sequence[bool]) -> dict[str, Any] | None:
    """How well dropping finds the planted captions among the originals: ROC AUC of the score (low = planted),
    and the precision and recall of the dropped set. None without planted flags."""
    originals = [(line, keep) for line, keep in zip(lines, kept, strict=True) if line.get("origin") == "original"
                 and line.get("planted") is not None and line.get(scorer) is not None]
    if not originals:
        return None
    planted = np.array([line["planted"] for line, _ in originals], dtype=bool)
    dropped = np.array([not keep for _, keep in originals], dtype=bool)
    suspicion = -np.array([line[scorer] for line, _ in originals], dtype=float)
    true_positives = int((planted & dropped).sum())
    return {
        "auc": M.roc_auc(suspicion, planted),
        "precision": true_positives / dropped.sum() if dropped.any() else None,
        "recall": true_positives / planted.sum() if planted.any() else None,
        "dropped": int(dropped.sum()),
    }


def scorer_report(lines: Sequence[dict[str, Any]], scorers: Sequence[str], chosen: str,
                  kept: Sequence[bool]) -> dict[str, Any] | None:
    """planted_detection for every scorer the filter has: the chosen one at its own cut-off, the other at the
    same number of originals dropped (so their precision and recall compare at equal cost)."""
    if not any(line.get("planted") is not None for line in lines):
        return None
    report: dict[str, Any] = {}
    originals = [i for i, line in enumerate(lines) if line.get("origin") == "original"]
    n_dropped = sum(not kept[i] for i in originals)
    for name in scorers:
        if name == chosen:
            decision = list(kept)
        else:  # drop the same number of originals, the lowest-scored by this scorer
            order = sorted(originals, key=lambda i: lines[i][name])
            lowest = set(order[:n_dropped])
            decision = [i not in lowest for i in range(len(lines))]
        report[name] = planted_detection(lines, name, decision)
    planted = [line["planted"] for line in lines
               if line.get("origin") == "original" and line.get("planted") is not None]
    return {"captions": len(planted), "planted": sum(planted), "scorers": report}


# --- the command -------------------------------------------------------------------------------------------
def _entries(document: dict[str, Any], noise: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One entry per image (in the file's image order) with its original captions (index, text, planted) and
    whether it belongs to the data's clean subset (noise.jsonl's "clean")."""
    if noise is not None and len(noise) != len(document["annotations"]):
        raise CapfiltError(f"{CAPFILT_RECORD}: the data's noise.jsonl has {len(noise)} lines for "
                           f"{len(document['annotations'])} training captions: it belongs to other captions")
    by_image: dict[int, list[tuple[int, str, bool | None]]] = {}
    clean: set[Any] = set()
    for index, annotation in enumerate(document["annotations"]):
        text = " ".join(annotation["caption"].split())
        if noise is not None and noise[index].get("clean"):
            clean.add(annotation["image_id"])
        if text:
            planted = None if noise is None else bool(noise[index]["planted"])
            by_image.setdefault(annotation["image_id"], []).append((index, text, planted))
    return [{"image_id": image["id"], "file_name": image["file_name"], "originals": by_image[image["id"]],
             "clean": image["id"] in clean} for image in document["images"] if image["id"] in by_image]


def clean_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The capfilt.jsonl lines of the clean subset's captions: kept as they are, not scored."""
    return [{"image_id": entry["image_id"], "file_name": entry["file_name"], "origin": "clean", "index": index,
             "text": text, "planted": planted, "itm": None, "itc": None, "kept": True}
            for entry in entries if entry["clean"] for index, text, planted in entry["originals"]]


@dataclass
class CapfiltReport:
    out: Path
    summary: dict[str, Any]

    def text(self) -> str:
        c = self.summary["counts"]
        lines = [f"{c['images']:,} images: kept {c['kept_original']:,} of {c['original']:,} original and "
                 f"{c['kept_synthetic']:,} of {c['synthetic']:,} synthetic captions ({self.summary['score']} >= "
                 f"{self.summary['cutoff']:.3f}) -> {self.out}"]
        if c.get("clean"):
            lines.append(f"the clean subset's {c['clean']:,} captions of {c['clean_images']:,} images kept as they are")
        planted = self.summary.get("planted")
        for name, row in (planted or {}).get("scorers", {}).items():
            if row:
                lines.append(f"planted captions found by {name}: ROC AUC {row['auc']:.3f}, precision "
                             f"{M.format_share(row['precision'])}, recall {M.format_share(row['recall'])}")
        return "\n".join(lines)


def _score_batches(models: Models, entries: list[dict[str, Any]], images_root: Path,
                   settings: CapfiltSettings, device: torch.device, scores_dir: Path,
                   progress: bool) -> list[dict[str, Any]]:
    """Every caption's scores line, batch by batch: each batch's lines are written to `scores_dir` as it is
    done, and a batch already there (a resumed run) is read back instead of scored again."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    batches = [entries[i:i + settings.batch_size] for i in range(0, len(entries), settings.batch_size)]
    lines: list[dict[str, Any]] = []
    with tqdm(total=len(entries), desc="capfilt", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for number, batch in enumerate(batches):
            path = scores_dir / f"batch_{number:06d}.jsonl"
            if path.is_file():
                batch_lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            else:
                batch_lines = score_batch(models, batch, images_root, settings, device, number)
                write_file(path, "".join(json.dumps(line, ensure_ascii=False) + "\n"
                                         for line in batch_lines).encode())
            lines += batch_lines
            bar.update(len(batch))
    return lines


def run_capfilt(captioner: str, filter_spec: str, data: str | Path, out: str | Path,
                settings: CapfiltSettings | None = None, train_annotations: str | None = None,
                train_images: str | None = None, device: str = "cpu", resume: bool = False,
                overwrite: bool = False, progress: bool = True) -> CapfiltReport:
    """Caption, filter and write the bootstrapped dataset (see the module docstring). The settings, the runs
    and the folders are checked before anything is written. `train_annotations` / `train_images` default to
    the filter run's data config (the layout it was trained on)."""
    settings = settings or CapfiltSettings()
    settings.check()
    data, out = Path(data), Path(out)
    torch_device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                                else "cpu")
    models = load_models(captioner, filter_spec, torch_device, writes_captions=settings.synthetic_per_image > 0)
    scorer = chosen_scorer(settings, models.scorers, filter_spec)
    train_annotations = train_annotations or models.filter_cfg.data.train_annotations
    images_root = data / (train_images or models.filter_cfg.data.train_images)
    document = read_caption_file(data, train_annotations)
    if not images_root.is_dir():
        raise DataSourceError(f"{images_root}: no such image folder (choose it with --train-images)")
    if out.resolve() == data.resolve():
        raise DataSourceError("--out must be another folder than --data")
    entries = _entries(document, read_noise_record(data))
    scored_entries = [entry for entry in entries if not entry["clean"]]
    owned = (Path(train_annotations).parts[0], CAPFILT_RECORD, CAPFILT_SUMMARY, CAPFILT_SCORES, MARKER,
             *source_entries(data, train_annotations))
    recorded = {"captioner": f"{models.captioner_ckpt.weights.parent.parent}:{models.captioner_ckpt.epoch}",
                "filter": f"{models.filter_ckpt.weights.parent.parent}:{models.filter_ckpt.epoch}",
                "data": str(data.resolve()), "train_annotations": train_annotations,
                **{k: v for k, v in vars(settings).items() if k not in ("threshold", "keep_fraction")}}
    folder = OutputFolder(out, "capfilt", recorded, owned, resume=resume, overwrite=overwrite, label="capfilt",
                          resume_does="continue where it stopped (the batches already scored are kept)")
    folder.start({})

    lines = _score_batches(models, scored_entries, images_root, settings, torch_device, out / CAPFILT_SCORES,
                           progress)
    scored = [line for line in lines if line["origin"] in SCORED_ORIGINS]
    cut = cutoff([line[scorer] for line in scored], settings)
    for line in lines:
        line["kept"] = line["origin"] in SCORED_ORIGINS and line[scorer] >= cut
    lines += clean_lines(entries)
    if scored and not any(line["kept"] for line in scored):  # the scores stay in OUT: --resume re-cuts them
        low, high = min(line[scorer] for line in scored), max(line[scorer] for line in scored)
        raise CapfiltError(f"the filter kept no caption: every {scorer.upper()} score is below the cut-off {cut:.3f} "
                           f"(they range from {low:.3f} to {high:.3f}; an ITM head still at chance gives every pair "
                           "about its training share of positives, 1/3). Lower --threshold, or keep the best-scored "
                           "share with --keep-fraction; --resume reuses the scores already computed")
    kept_by_image: dict[int, list[str]] = {}
    for line in lines:
        if line["kept"]:
            kept_by_image.setdefault(line["image_id"], []).append(line["text"])
    images = [image for image in document["images"] if image["id"] in kept_by_image]
    annotations = [{"id": n + 1, "image_id": image["id"], "caption": text}
                   for n, (image, text) in enumerate((image, text) for image in images
                                                     for text in kept_by_image[image["id"]])]
    bootstrapped = {**document, "images": images, "annotations": annotations}
    write_derived_dataset(data, out, train_annotations, bootstrapped)
    write_file(out / CAPFILT_RECORD, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
    counts = {"images": len(entries), "images_kept": len(images), **caption_counts(lines),
              "clean_images": len(entries) - len(scored_entries)}
    planted = scorer_report(lines, models.scorers, scorer, [line["kept"] for line in lines])
    summary = {**recorded, "threshold": settings.threshold, "keep_fraction": settings.keep_fraction,
               "score": scorer, "scorers": list(models.scorers), "cutoff": cut,
               "images_root": str(images_root.resolve()), "counts": counts, "planted": planted,
               "captioner_init": _started_from(models.captioner_ckpt), "filter_init": _started_from(models.filter_ckpt)}
    write_json(out / CAPFILT_SUMMARY, summary)
    return CapfiltReport(out, summary)


def caption_counts(lines: Sequence[dict[str, Any]]) -> dict[str, int]:
    """capfilt.json's caption counts: unreadable images, then per origin (original, synthetic, clean) how many
    captions there were and how many were kept."""
    origins = (*SCORED_ORIGINS, "clean")
    return {"unreadable": sum(line["origin"] == "unreadable" for line in lines),
            **{origin: sum(line["origin"] == origin for line in lines) for origin in origins},
            **{f"kept_{origin}": sum(line["kept"] and line["origin"] == origin for line in lines)
               for origin in origins}}


def _started_from(ckpt: Checkpoint) -> dict[str, Any] | None:
    """Where a captioner's or filter's run started: its run.json "init" (the run it was fine-tuned from, and the
    parts that started fresh, e.g. an ITM head its init lacked), None for a run trained from random weights."""
    try:
        return RunDir(ckpt.weights.parent.parent).read_info().get("init")
    except RunError:
        return None


# --- reading a CapFilt folder (the dashboard, the study) -----------------------------------------------------
@dataclass
class CapfiltResult:
    folder: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def images_root(self) -> Path:
        return Path(self.summary.get("images_root", self.folder))


def load_capfilt(folder: str | Path) -> CapfiltResult:
    """capfilt.json and capfilt.jsonl of a CapFilt output folder; CapfiltError when they are missing or damaged."""
    folder = Path(folder)
    if not (folder / CAPFILT_SUMMARY).is_file():
        raise CapfiltError(f"{folder}: no {CAPFILT_SUMMARY} (not a finished `python -m train capfilt` output)")
    try:
        summary = read_json(folder / CAPFILT_SUMMARY, "CapFilt summary")
        text = (folder / CAPFILT_RECORD).read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, RunError) as err:
        raise CapfiltError(f"{folder}: unreadable CapFilt record ({err})") from None
    return CapfiltResult(folder, summary, records)


def find_capfilt_folders(*roots: str | Path, depth: int = 3) -> list[Path]:
    """Folders holding a capfilt.json under `roots` (a study keeps its datasets in <study>/data/), at most
    `depth` levels down, sorted by path."""
    found: set[Path] = set()
    for root in map(Path, roots):
        for level in range(depth + 1):
            pattern = "/".join(["*"] * level + [CAPFILT_SUMMARY])
            found |= {path.parent for path in root.glob(pattern) if path.is_file()}
    return sorted(found)
