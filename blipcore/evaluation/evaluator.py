"""Evaluation of a model on the fixed evaluation set: validation losses, ITC retrieval, captioning
and collapse metrics per decoding strategy, the "learned nothing" reference row, and the
embeddings dump the dashboard's Alignment and Embeddings pages read.

The fixed evaluation set is the first `data.eval_images` validation images, so every epoch of every
run with the same data is measured on the same images.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data import CaptionCollator, CaptionDataset, build_transform
from ..io import atomic_write_json
from ..model.config import BlipConfig
from ..model.tokenizer import tokenize_captions
from ..runs.rundir import RunDir
from ..speed import autocast_dtype, describe
from . import metrics as M
from .captioning import caption_metrics, consensus_caption, most_frequent_caption_baseline, reference_row_scores
from .collapse import collapse_metrics, memorised_share, normalised_captions
from .matching import roc_auc
from .retrieval import retrieval_metrics, topk_candidates
from .scoring import coco_results

SAMPLES_PER_STRATEGY = 24
NN_NEIGHBOURS = 5  # training images whose captions the nearest-neighbour row picks its consensus from
NN_TRAIN_IMAGES = 1000  # the first training images searched (0 = all): bounds each evaluation's extra cost


@dataclass
class EvalImages:
    """The first N readable images of a split, with their record indices."""

    images: torch.Tensor  # (N, 3, S, S)
    records: list  # ImageRecord of each image, same order


_EVAL_IMAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_images(dataset: CaptionDataset, limit: int) -> EvalImages:
    """Decoded images of the first `limit` records (unreadable ones skipped), decoded once per
    dataset and reused by every epoch's evaluation."""
    cached = _EVAL_IMAGES.setdefault(dataset, {})
    if limit not in cached:
        cached[limit] = _decode_eval_images(dataset, limit)
    return cached[limit]


def _decode_eval_images(dataset: CaptionDataset, limit: int) -> EvalImages:
    images, records = [], []
    for index in range(min(limit, len(dataset.records))):
        item = dataset[index] if dataset.caption_mode == "random" else None
        if item is not None:
            images.append(item["image"])
            records.append(dataset.records[index])
    if not images:
        raise ValueError("no readable image in the evaluation set")
    return EvalImages(torch.stack(images), records)


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the wall time of the block to seconds[phase]: where an evaluation's time goes (eval JSON "seconds")."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - start, 2)


def _batches(tensor: torch.Tensor, size: int):
    for start in range(0, len(tensor), size):
        yield tensor[start : start + size]


@torch.no_grad()
def validation_losses(
    model, dataset: CaptionDataset, cfg: BlipConfig, device: torch.device, limit: int
) -> dict[str, float]:
    """Mean of each loss term over (at most `limit` items of) the validation split."""
    subset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(subset, batch_size=cfg.train.batch_size, collate_fn=CaptionCollator(cfg.model.max_text_len))
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        if batch is None or len(batch["images"]) < 2:
            continue
        out = model(
            batch["images"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
            batch["image_ids"].to(device),
        )
        n = len(batch["images"])
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
    return {f"val_{k}": v / count for k, v in sums.items()} if count else {}


@torch.no_grad()
def embed_eval_set(
    model, data: EvalImages, cfg: BlipConfig, device: torch.device, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """ITC embeddings of the evaluation images and of every reference caption."""
    image_feats = [model.encode_image(chunk.to(device))[1].float().cpu() for chunk in _batches(data.images, batch_size)]
    captions = [caption for record in data.records for caption in record.captions]
    text_to_image = np.array([i for i, record in enumerate(data.records) for _ in record.captions])
    text_feats = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize_captions(captions[start : start + batch_size], cfg.model.max_text_len)
        text_feat = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))[1]
        text_feats.append(text_feat.float().cpu())
    return {
        "image_embeds": torch.cat(image_feats).numpy(),
        "all_text_embeds": torch.cat(text_feats).numpy(),
        "text_to_image": text_to_image,
        "all_captions": np.array(captions),
    }


def rerank_top_k(sim: np.ndarray, k: int, score_pairs: Callable[[list[tuple[int, int]]], np.ndarray]) -> np.ndarray:
    """BLIP's retrieval protocol: ITC picks each image's and each text's top-k candidates, `score_pairs`
    re-scores those (image, text) pairs; pairs outside every top-k rank behind all re-scored ones.
    Returns the re-scored (images, texts) matrix for `retrieval.retrieval_metrics`."""
    pairs = {(i, int(j)) for i, row in enumerate(topk_candidates(sim, k)) for j in row}
    pairs |= {(int(i), j) for j, column in enumerate(topk_candidates(sim.T, k)) for i in column}
    ordered = sorted(pairs)
    scores = np.full(sim.shape, np.nan)
    scores[tuple(np.array(ordered).T)] = score_pairs(ordered)
    scores[np.isnan(scores)] = np.nanmin(scores) - 1.0
    return scores


def first_caption_rows(embedded: dict[str, np.ndarray]) -> np.ndarray:
    """The row of each evaluation image's first caption among embedded["all_captions"]."""
    text_to_image = embedded["text_to_image"]
    return np.array([int(np.argmax(text_to_image == i)) for i in range(len(embedded["image_embeds"]))])


@torch.no_grad()
def image_tokens(model, data: EvalImages, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """The ViT's output tokens of every evaluation image (images, 1+N, vision_width), on the CPU: what the
    ITM head's cross-attention reads."""
    return torch.cat([model.encode_image(chunk.to(device))[0].cpu() for chunk in _batches(data.images, batch_size)])


@torch.no_grad()
def itm_match_logits(model, tokens_of_images: torch.Tensor, captions: Sequence[str], pairs: Sequence[tuple[int, int]],
                     cfg: BlipConfig, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """The ITM head's match logit of each (image, caption) index pair. Pairs run in batches of captions of
    similar token length, each batch padded only to its longest: the same logits as batches in pair order padded
    to their longest outlier (padding is masked), with far fewer padded positions."""
    if not pairs:
        return np.empty(0)
    tokens = tokenize_captions(list(captions), cfg.model.max_text_len)  # each caption once, padded to the longest
    lengths = tokens["attention_mask"].sum(dim=1)
    images, texts = (torch.tensor(column) for column in zip(*pairs, strict=True))
    order = torch.argsort(lengths[texts], stable=True)
    out = np.empty(len(pairs), dtype=np.float32)
    for rows in order.split(batch_size):
        chunk_texts = texts[rows]
        width = int(lengths[chunk_texts].max())
        logits = model.itm_logits(tokens_of_images[images[rows]].to(device),
                                  tokens["input_ids"][chunk_texts, :width].to(device),
                                  tokens["attention_mask"][chunk_texts, :width].to(device))
        out[rows.numpy()] = logits[:, 1].float().cpu().numpy()
    return out


def itm_reranked_retrieval(
    model, embedded: dict[str, np.ndarray], tokens_of_images: torch.Tensor, cfg: BlipConfig, device: torch.device,
    k: int = 16,
) -> dict[str, float]:
    """Retrieval R@K after re-scoring ITC's top-k candidates with the ITM head (match logit + ITC similarity)."""
    sim = embedded["image_embeds"] @ embedded["all_text_embeds"].T  # (images, texts)
    captions = embedded["all_captions"].tolist()

    def score_pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
        return itm_match_logits(model, tokens_of_images, captions, pairs, cfg, device) + sim[tuple(np.array(pairs).T)]

    reranked = retrieval_metrics(rerank_top_k(sim, k, score_pairs), embedded["text_to_image"])
    return {f"itm_{key}": value for key, value in reranked.items()}


def mismatched_pairs(embedded: dict[str, np.ndarray], seed: int = 0) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(image, caption) index pairs and whether each matches: every evaluation image with its first caption, and
    with the first caption of another image drawn at random (seeded, never itself), as CapFilt's planted noise
    pairs an image with another image's caption."""
    first = first_caption_rows(embedded)
    n = len(first)
    other = (np.arange(n) + np.random.default_rng(seed).integers(1, n, size=n)) % n
    pairs = [(i, int(first[i])) for i in range(n)] + [(i, int(first[j])) for i, j in enumerate(other)]
    return pairs, np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]


def matching_auc(model, embedded: dict[str, np.ndarray], tokens_of_images: torch.Tensor | None, cfg: BlipConfig,
                 device: torch.device) -> dict[str, float]:
    """ROC AUC of the ITC similarity (and of the ITM match logit, given the image tokens of a model with an ITM
    head) at telling the matching pairs of `mismatched_pairs` from the mismatched ones: 0.5 is chance, 1 a
    perfect filter. Comparable between runs whatever negatives their ITM trained on. {} with under 2 images."""
    if len(embedded["image_embeds"]) < 2:
        return {}
    pairs, matches = mismatched_pairs(embedded)
    images, texts = np.array(pairs).T
    itc = (embedded["image_embeds"][images] * embedded["all_text_embeds"][texts]).sum(axis=1)
    out = {"itc_match_auc": roc_auc(itc, matches)}
    if tokens_of_images is not None:
        captions = embedded["all_captions"].tolist()
        out["itm_match_auc"] = roc_auc(itm_match_logits(model, tokens_of_images, captions, pairs, cfg, device),
                                         matches)
    return out


def embeddings_dump(
    embedded: dict[str, np.ndarray], data: EvalImages, temperature: float | None
) -> dict[str, np.ndarray]:
    """The npz the dashboard reads: one (image, first caption) pair per row, plus every caption."""
    first_caption_row = first_caption_rows(embedded)
    return {
        "image_embeds": embedded["image_embeds"],
        "text_embeds": embedded["all_text_embeds"][first_caption_row],
        "image_ids": np.array([r.image_id for r in data.records], dtype=np.int64),
        "file_paths": np.array([r.file_path for r in data.records]),
        "captions": np.array([r.captions[0] for r in data.records]),
        "all_text_embeds": embedded["all_text_embeds"],
        "all_captions": embedded["all_captions"],
        "text_to_image": embedded["text_to_image"],
        "temperature": np.array(np.nan if temperature is None else temperature, dtype=np.float32),
    }


def caption_strategies(
    model, data: EvalImages, strategies: list[str], device: torch.device, meteor: bool, progress: bool,
    known_captions: set[str] | None = None, seconds: dict[str, float] | None = None,
    all_captions: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Captions of the evaluation images by each strategy, scored for quality and collapse, and with the
    normalised training captions `known_captions`, for memorisation. `seconds` gets each strategy's
    decoding time ("decode_<strategy>") and scoring time ("score_<strategy>"); `all_captions` every
    caption of each strategy, in the COCO results format (the result keeps only a few samples)."""
    seconds = {} if seconds is None else seconds
    from .decoding import decoding_config, generate

    references = {i: record.captions for i, record in enumerate(data.records)}
    results = {}
    for name in tqdm(strategies, desc="decode", disable=not progress, leave=False):
        dcfg = decoding_config(name)
        captions = []
        with timed(seconds, f"decode_{name}"):
            for chunk in _batches(data.images, 32):
                captions += generate(model, chunk.to(device), dcfg)
        predictions = {i: c.text for i, c in enumerate(captions)}
        if all_captions is not None:
            all_captions[name] = coco_results(data.records, [c.text for c in captions])
        with timed(seconds, f"score_{name}"):
            scores = caption_metrics(predictions, references, meteor=meteor)
        collapse = collapse_metrics([c.text for c in captions], [c.entropies for c in captions])
        if known_captions is not None:
            collapse["memorised_share"] = memorised_share([c.text for c in captions], known_captions)
        results[name] = {
            "params": dcfg.to_dict(),
            "computed_in": describe(autocast_dtype(torch.device(device), dcfg.precision)),  # what "auto" became
            "metrics": {**{k: v for k, v in scores.items() if k != "notes"}, **collapse},
            "notes": scores.get("notes", []),
            "samples": [
                {"image_id": r.image_id, "file_path": r.file_path, "caption": c.text, "references": r.captions[:5],
                 "mean_entropy": float(np.mean(c.entropies)) if c.entropies else None}
                for r, c in list(zip(data.records, captions, strict=True))[:SAMPLES_PER_STRATEGY]
            ],
        }
    return results


_TRAIN_CAPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MOST_FREQUENT_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def train_captions(train_set: CaptionDataset) -> set[str]:
    """The training captions, normalised, computed once per training set (memorisation is measured on it)."""
    if train_set not in _TRAIN_CAPTIONS:
        _TRAIN_CAPTIONS[train_set] = normalised_captions(c for record in train_set.records for c in record.captions)
    return _TRAIN_CAPTIONS[train_set]


def most_frequent_row(train_set: CaptionDataset, data: EvalImages, meteor: bool) -> dict[str, Any]:
    """Scores of the most frequent training caption given to every image: what 'learned nothing' scores.

    It depends only on the data, so it is computed once per (training set, evaluation images) and
    reused by every epoch's evaluation.
    """
    key = (tuple(r.image_id for r in data.records), meteor)
    cached = _MOST_FREQUENT_ROWS.setdefault(train_set, {})
    if key not in cached:
        captions = [c for record in train_set.records for c in record.captions]
        references = {i: record.captions for i, record in enumerate(data.records)}
        cached[key] = most_frequent_caption_baseline(captions, references, meteor=meteor)
    return cached[key]


@torch.no_grad()
def image_features(model, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings (N, D): the ITC embedding, or the ViT's [CLS] token without ITC."""
    feats = []
    for chunk in _batches(images, batch_size):
        tokens, feat = model.encode_image(chunk.to(device))
        feats.append((feat if feat is not None else F.normalize(tokens[:, 0], dim=-1)).float().cpu())
    return torch.cat(feats)


@torch.no_grad()
def nearest_neighbour_row(
    model, cfg: BlipConfig, train_set: CaptionDataset, data: EvalImages, device: torch.device, meteor: bool,
    neighbours: int = NN_NEIGHBOURS, train_images: int = NN_TRAIN_IMAGES,
    all_captions: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The nearest-neighbour reference row (Devlin et al. 2015): for each evaluation image, the `neighbours`
    training images nearest by the model's image embedding (cosine), and the consensus caption among all
    their captions. It scores what retrieving a caption, without generating one, would: a captioner below
    it has learned less about the images than its own image encoder has. The training images are the
    first `train_images` of the split (0 = all), decoded with the evaluation transform. `all_captions`
    gets its every caption under "nearest-neighbour", as caption_strategies does."""
    records = train_set.records[:train_images] if train_images else train_set.records
    images, kept = _neighbour_images(train_set, len(records), cfg.model.image_size)
    nearest = (image_features(model, data.images, device) @ image_features(model, images, device).T).topk(
        min(neighbours, len(kept)))
    predictions = {i: consensus_caption([c for j in row for c in records[kept[j]].captions])
                   for i, row in enumerate(nearest.indices.tolist())}
    if all_captions is not None:
        all_captions["nearest-neighbour"] = coco_results(data.records, list(predictions.values()))
    references = {i: record.captions for i, record in enumerate(data.records)}
    scores = reference_row_scores(predictions, references, train_captions(train_set), meteor=meteor)
    samples = [{"image_id": r.image_id, "file_path": r.file_path, "caption": predictions[i],
                "references": r.captions[:5]} for i, r in enumerate(data.records[:SAMPLES_PER_STRATEGY])]
    return {"neighbours": neighbours, "train_images": len(kept), **scores, "samples": samples}


_NEIGHBOUR_IMAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _neighbour_images(train_set: CaptionDataset, count: int, size: int) -> tuple[torch.Tensor, list[int]]:
    """The first `count` training images (the readable ones, evaluation transform) and their record indices: decoded
    once per training set and size, and reused by every evaluation's nearest-neighbour row, as eval_images does."""
    cached = _NEIGHBOUR_IMAGES.setdefault(train_set, {})
    if (count, size) not in cached:
        plain = CaptionDataset(train_set.records[:count], build_transform(size, train=False), caption_mode="random")
        batches = [(images, indices) for images, indices in DataLoader(plain, batch_size=64,
                                                                       collate_fn=_stack_readable) if indices]
        if not batches:
            raise ValueError("no readable training image for the nearest-neighbour row")
        cached[count, size] = (torch.cat([images for images, _ in batches]),
                               [index for _, indices in batches for index in indices])
    return cached[count, size]


def _stack_readable(items: list[dict[str, Any] | None]) -> tuple[torch.Tensor, list[int]]:
    """collate_fn of the nearest-neighbour pass: the readable images and their record indices."""
    kept = [item for item in items if item is not None]
    if not kept:
        return torch.empty(0), []
    return torch.stack([item["image"] for item in kept]), [item["index"] for item in kept]


def reference_rows(
    model, cfg: BlipConfig, train_set: CaptionDataset, data: EvalImages, device: torch.device, meteor: bool,
    all_captions: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every row of metrics.REFERENCE_ROWS, scored on the evaluation images like a decoding strategy;
    `all_captions` gets the model-dependent rows' captions (the most frequent caption is one sentence)."""
    return {"most-frequent": most_frequent_row(train_set, data, meteor),
            "nearest-neighbour": nearest_neighbour_row(model, cfg, train_set, data, device, meteor,
                                                       all_captions=all_captions)}


def evaluate_model(
    model,
    cfg: BlipConfig,
    datasets: dict[str, CaptionDataset],
    device: torch.device,
    strategies: list[str] | None = None,
    caption_images: int | None = None,
    meteor: bool = False,
    progress: bool = True,
    split: str = "val",
    all_captions: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Full evaluation on `datasets[split]` (its first data.eval_images images). Returns (the
    eval/epoch_NNN.json content, the embeddings dump or None); `all_captions` gets every caption of each
    strategy and of the nearest-neighbour row (scoring.coco_results)."""
    strategies = list(cfg.train.eval_strategies if strategies is None else strategies)
    if strategies:
        from .decoding import check_strategy_names

        check_strategy_names(strategies)
    model.eval()
    val = datasets[split]
    seconds: dict[str, float] = {}
    with timed(seconds, "images"):
        data = eval_images(val, cfg.data.eval_images)
    result: dict[str, Any] = {"num_images": len(data.records), "spice": M.SPICE_NOTE}
    loss_items = max(cfg.data.eval_images, 2 * cfg.train.batch_size)
    with timed(seconds, "losses"):
        result["losses"] = validation_losses(model, val, cfg, device, limit=loss_items)
    dump = None
    if model.use_itc:
        with timed(seconds, "itc_retrieval"):
            embedded = embed_eval_set(model, data, cfg, device)
            sim = embedded["image_embeds"] @ embedded["all_text_embeds"].T
            result["retrieval"] = retrieval_metrics(sim, embedded["text_to_image"])
        tokens_of_images = None
        if model.use_itm:
            with timed(seconds, "itm_retrieval"):
                tokens_of_images = image_tokens(model, data, device)
                result["retrieval"].update(itm_reranked_retrieval(model, embedded, tokens_of_images, cfg, device))
        with timed(seconds, "matching"):
            result["matching"] = matching_auc(model, embedded, tokens_of_images, cfg, device)
        dump = embeddings_dump(embedded, data, float(model.temperature))
    if model.use_lm and strategies:
        n = caption_images if caption_images is not None else cfg.train.eval_caption_images
        subset = EvalImages(data.images[:n], data.records[:n])
        known = train_captions(datasets["train"]) if "train" in datasets else None
        result["strategies"] = caption_strategies(model, subset, strategies, device, meteor, progress, known, seconds,
                                                  all_captions)
        if "train" in datasets:
            with timed(seconds, "reference_rows"):
                result["reference_rows"] = reference_rows(model, cfg, datasets["train"], subset, device, meteor,
                                                          all_captions)
    result["seconds"] = seconds
    return result, dump


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for metrics.jsonl, checkpoint sidecars and 'best' tracking: val_*, retrieval, and
    <strategy>_<metric> for each decoding strategy and reference row."""
    flat: dict[str, float] = dict(result.get("losses", {}))
    flat.update(result.get("retrieval", {}))
    flat.update(result.get("matching", {}))
    per_strategy = M.summary_keys("captioning") + M.summary_keys("collapse")
    rows = {**result.get("strategies", {}), **result.get("reference_rows", {})}
    for name, entry in rows.items():
        for key in per_strategy:
            value = entry["metrics"].get(key)
            if M.is_number(value):
                flat[f"{name}_{key}"] = value
    return flat


class CheckpointEvaluator:
    """Evaluates checkpoints of one run on one split and writes eval/epoch_NNN[.<split>].json (what
    `python -m train eval` and the study's test report do); the data is built once for all checkpoints."""

    def __init__(self, run: RunDir, split: str = "val", device: str | torch.device = "cpu",
                 other_data: tuple[Path, Path] | None = None) -> None:
        """`other_data`: (annotation file, image folder) of another dataset to evaluate on as a test split,
        written as eval/epoch_NNN.<split>.json (e.g. split "coco-mini"); the reference rows still come from
        the run's own training data."""
        if other_data is not None and split in ("val", "test"):
            raise ValueError("another dataset's evaluation needs its own name (e.g. coco-mini), not val or test")
        self.run, self.name, self.device, self.other_data = run, split, device, other_data
        self.split = "test" if other_data is not None else split  # the dataset split evaluated
        self.datasets: dict[str, CaptionDataset] | None = None

    def evaluate(self, epoch: int, strategies: list[str], images: int | None = None, meteor: bool = True,
                 progress: bool = True, captions_dir: Path | None = None) -> dict[str, Any]:
        """The evaluation of `epoch` on the split: the test split whole, val on its fixed evaluation set
        (`images` can widen it). Written to the run, embeddings too on val; returns the result. With
        `captions_dir`, every caption of each strategy and of the nearest-neighbour row goes there as a COCO
        results file, epoch_NNN.<split>.<name>.json (`python -m train score` scores them elsewhere)."""
        from ..data import build_datasets

        model, cfg, ckpt = self.run.load_model(epoch, device=self.device)
        if self.other_data is not None:  # absolute paths: read as they are, whatever the run's data.root
            annotations, images_dir = (str(Path(p).resolve()) for p in self.other_data)
            cfg = cfg.override({"data.test_annotations": annotations, "data.test_images": images_dir})
        if self.datasets is None:
            if self.split == "test" and not cfg.data.test_annotations:
                raise ValueError(f"{self.run.path}: its data has no test split (data.test_annotations is empty)")
            self.datasets = build_datasets(cfg, splits=("train", self.split))
        images = images or (len(self.datasets["test"].records) if self.split == "test" else None)
        if images:
            cfg.data.eval_images = max(cfg.data.eval_images, images)
        all_captions: dict[str, list[dict[str, Any]]] | None = {} if captions_dir is not None else None
        result, dump = evaluate_model(model, cfg, self.datasets, self.device, strategies, caption_images=images,
                                      meteor=meteor, progress=progress, split=self.split, all_captions=all_captions)
        result.update(step=ckpt.step, label=f"epoch_{epoch:03d}")
        for name, entries in (all_captions or {}).items():
            atomic_write_json(Path(captions_dir) / f"epoch_{epoch:03d}.{self.name}.{name}.json", entries)
        self.run.save_eval(epoch, result, split=self.name)
        if dump is not None and self.split == "val":  # the dashboard's embeddings are of the val set
            self.run.save_embeddings(epoch, dump)
        return result


def evaluate_run_epoch(
    model, cfg: BlipConfig, datasets: dict[str, CaptionDataset], run: RunDir, epoch: int | None, step: int,
    label: str, device: torch.device, progress: bool = True, epoch_progress: float | None = None,
) -> dict[str, float]:
    """The trainer's evaluation: writes eval/<label>.json, the embeddings (with an epoch checkpoint) and a
    split="val" line in metrics.jsonl, whose epoch is `epoch_progress` (epochs done, a fraction inside an
    epoch). Returns the flat summary."""
    result, dump = evaluate_model(model, cfg, datasets, device, meteor=False, progress=progress)
    result.update(step=step, label=label)
    if epoch is not None:
        run.save_eval(epoch, result)
        if dump is not None:
            run.save_embeddings(epoch, dump)
    else:
        run.save_step_eval(step, result)
    flat = summary_metrics(result)
    run.append_metrics({"step": step, "epoch": epoch_progress, "split": "val", **flat})
    return flat
