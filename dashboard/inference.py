"""Inference for the model pages (Attention, Decoding lab, Caption, Compare).

Checkpoints come from `common.load_model` (one cached model per checkpoint), validation images are
read once, uploads are decoded safely (`blipcore.data.load_image`), and every per-image computation
(captions, attention maps, Grad-CAM) is cached by (checkpoint sha256, image bytes sha256,
parameters), so a page re-renders without running the model again. Widget helpers shared by these
pages live here too.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch
from PIL import Image

from blipcore.data import ImageLoadError, build_datasets, build_transform, load_image
from blipcore.data.coco import ImageRecord
from blipcore.evaluation.collapse import collapse_metrics
from blipcore.evaluation.decoding import Caption, DecodingConfig, generate
from blipcore.evaluation.explain import decoder_cross_attention, itm_gradcam, tensor_to_uint8, vit_attention
from blipcore.model.blip import BLIP
from blipcore.model.tokenizer import tokenize_captions
from blipcore.runs.rundir import Checkpoint, RunDir, RunError
from dashboard.common import MAX_UPLOAD_PIXELS, guarded, load_model, select_runs, stop_with
from dashboard.explain_figures import upscale

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "gif"]
BATCH_SIZE = 32  # images per generate() call: batched for speed, small enough for a laptop's memory
THUMBNAIL = 160
GALLERY_PAGE = 12
WORKING_SIZE = 1024  # uploads are kept at most this many pixels on a side: models read <= 384, memory stays small


# --- checkpoints -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """A checkpoint's model ready for inference. `key` names it in the caches: the weights' sha256,
    so a retrained epoch never reuses results of the old weights."""

    run: RunDir
    epoch: int
    model: BLIP
    key: tuple[str, int, str]

    @classmethod
    def of(cls, run: RunDir, model: BLIP, ckpt: Checkpoint) -> Loaded:
        return cls(run, ckpt.epoch, model, (str(run.path), ckpt.epoch, str(ckpt.meta.get("sha256", ""))))

    @property
    def label(self) -> str:
        return f"{self.run.name} · epoch {self.epoch}"


def open_checkpoint(run: RunDir, epoch: int) -> Loaded | None:
    """The model of a checkpoint (cached), or None after a message that says why it cannot be loaded."""
    loaded = guarded(load_model, run, epoch, what=f"the model of {run.name} epoch {epoch}")
    return None if loaded is None else Loaded.of(run, loaded[0], loaded[2])


# --- images ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PickedImage:
    """An image to run a model on. key: sha256 of the file's bytes, the cache key of all results on it."""

    name: str
    image: Image.Image
    key: str
    references: tuple[str, ...] = ()  # ground-truth captions (validation images)
    note: str | None = None  # something the user should know, e.g. that only the first frame is used


def read_upload(name: str, data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> PickedImage:
    """Decode an uploaded file (format from the content, not the name) or raise ImageLoadError naming
    the file: empty, not an image, corrupt, or over `max_pixels` (refused from the header). Decoded
    once per content; a larger picture is kept shrunk to WORKING_SIZE."""
    if not data:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    return _decode_upload(name, hashlib.sha256(data).hexdigest(), max_pixels, data)


@st.cache_resource(show_spinner=False, max_entries=64)
def _decode_upload(name: str, digest: str, max_pixels: int, _data: bytes) -> PickedImage:
    source = io.BytesIO(_data)
    source.name = name
    image = load_image(source, max_pixels=max_pixels)
    image.thumbnail((WORKING_SIZE, WORKING_SIZE), Image.Resampling.LANCZOS)
    with Image.open(io.BytesIO(_data)) as probe:
        animated = bool(getattr(probe, "is_animated", False))
    note = f"{name}: animated image, only its first frame is captioned" if animated else None
    return PickedImage(name, image, digest, note=note)


@st.cache_resource(show_spinner=False, max_entries=512)
def _file_image(path: str, mtime_ns: int, references: tuple[str, ...]) -> PickedImage:
    data = Path(path).read_bytes()
    return PickedImage(Path(path).name, load_image(data), hashlib.sha256(data).hexdigest(), references)


def val_image(record: ImageRecord) -> PickedImage:
    """A validation image with its reference captions (read once; raises ImageLoadError / OSError)."""
    return _file_image(record.file_path, Path(record.file_path).stat().st_mtime_ns, tuple(record.captions))


def val_images(records: Sequence[ImageRecord]) -> list[PickedImage]:
    """The readable images of `records`, with a warning naming those that cannot be read."""
    images, bad = [], []
    for record in records:
        try:
            images.append(val_image(record))
        except (ImageLoadError, OSError) as err:
            bad.append(str(err))
    if bad:
        st.warning(f"{len(bad)} validation image(s) cannot be read and are left out: " + "; ".join(bad[:3]))
    return images


@st.cache_resource(show_spinner="Reading the validation set…", max_entries=16)
def _val_records(run_path: str, run_mtime_ns: int) -> list[ImageRecord]:
    cfg = RunDir(run_path).config()
    annotations = Path(cfg.data.root) / cfg.data.val_annotations
    if not annotations.is_file():  # build_datasets would generate missing shapes: not inside a page
        raise RunError(
            f"the validation set of this run is not at {annotations} (the data folder was moved or deleted); "
            f"`python -m train eval --run-dir {run_path}` rebuilds a generated dataset"
        )
    return build_datasets(cfg, splits=("val",))["val"].records


def val_records(run: RunDir) -> list[ImageRecord] | None:
    """The run's validation images and captions, or None after a message saying why they are missing."""
    try:
        mtime = run.run_json.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return guarded(_val_records, str(run.path), mtime, what="the validation images")


def pixels(images: Sequence[PickedImage], image_size: int) -> torch.Tensor:
    """The model's input, (B, 3, S, S): the evaluation transform of each image."""
    transform = build_transform(image_size, train=False)
    return torch.stack([transform(p.image) for p in images])


def model_view(image: PickedImage, image_size: int) -> np.ndarray:
    """The image as the model sees it (resized to its input size), (S, S, 3) uint8: the frame of every map."""
    return tensor_to_uint8(pixels([image], image_size)[0])


@st.cache_resource(show_spinner=False, max_entries=1024)
def _thumbnail(image_key: str, size: int, _image: Image.Image) -> Image.Image:
    return Image.fromarray(upscale(_image, size))


def thumbnail(image: PickedImage, size: int = THUMBNAIL) -> Image.Image:
    """The image with its longer side `size` pixels (photos shrink, 32-pixel model inputs grow), cached."""
    return _thumbnail(image.key, size, image.image)


# --- captions --------------------------------------------------------------------------------------
def _decoding_key(cfg: DecodingConfig) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(cfg.to_dict().items()))


@st.cache_data(show_spinner=False, max_entries=1024)
def _captions(
    model_key: tuple[str, int, str], image_keys: tuple[str, ...], decoding: tuple[tuple[str, Any], ...],
    _model: BLIP, _images: Sequence[PickedImage],
) -> list[Caption]:
    return generate(_model, pixels(_images, _model.cfg.image_size), DecodingConfig(**dict(decoding)))


def captions(loaded: Loaded, images: Sequence[PickedImage], decoding: DecodingConfig) -> list[Caption]:
    """Captions of `images` by one checkpoint, in batches of BATCH_SIZE, each batch cached."""
    found: list[Caption] = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = list(images[start : start + BATCH_SIZE])
        found += _captions(loaded.key, tuple(p.key for p in batch), _decoding_key(decoding), loaded.model, batch)
    return found


def collapse_by_strategy(
    loaded: Loaded, images: Sequence[PickedImage], strategies: Mapping[str, DecodingConfig],
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """collapse_metrics of each strategy's captions of `images`; progress(fraction, text) after each batch."""
    batches = -(-len(images) // BATCH_SIZE)
    done, results = 0, {}
    for name, cfg in strategies.items():
        found: list[Caption] = []
        for start in range(0, len(images), BATCH_SIZE):
            found += captions(loaded, images[start : start + BATCH_SIZE], cfg)
            done += 1
            if progress:
                progress(done / (batches * len(strategies)), f"{name}: {len(found)} / {len(images)} images")
        results[name] = collapse_metrics([c.text for c in found], [c.entropies for c in found])
    return results


@dataclass
class CaptionedUpload:
    """One uploaded file: a thumbnail and its caption by each checkpoint, or why it was refused."""

    name: str
    thumbnail: Image.Image | None = None
    note: str | None = None
    error: str | None = None
    captions: list[tuple[str, int, str]] = field(default_factory=list)  # (run, epoch, caption)


def caption_uploads(
    files: Sequence[tuple[str, bytes]], checkpoints: Sequence[Loaded], decoding: DecodingConfig,
    max_pixels: int = MAX_UPLOAD_PIXELS,
) -> list[CaptionedUpload]:
    """Caption every readable file of `files` (name, bytes) with every checkpoint, in one batch per
    checkpoint. A bad file (empty, not an image, corrupt, too large) gets its error and does not stop
    the others; an animated one is captioned from its first frame, with a note saying so."""
    results, readable = [], []
    for name, data in files:
        try:
            picked = read_upload(name, data, max_pixels)
        except ImageLoadError as err:
            results.append(CaptionedUpload(name, error=str(err)))
            continue
        results.append(CaptionedUpload(name, thumbnail(picked), picked.note))
        readable.append((results[-1], picked))
    for loaded in checkpoints:
        texts = captions(loaded, [picked for _, picked in readable], decoding)
        for (result, _), caption in zip(readable, texts, strict=True):
            result.captions.append((loaded.run.name, loaded.epoch, caption.text))
    return results


# --- explanations (blipcore.evaluation.explain, cached) ---------------------------------------------------------
@torch.inference_mode()
def itm_match_probability(model: BLIP, image: torch.Tensor, caption: str) -> float:
    """The ITM head's probability that `caption` matches the image: the score Grad-CAM explains."""
    image_embeds, _ = model.encode_image(image)
    tokens = tokenize_captions([caption], model.cfg.max_text_len)
    return float(model.itm_logits(image_embeds, tokens["input_ids"], tokens["attention_mask"]).softmax(-1)[0, 1])


_EXPLAINERS: dict[str, Callable[..., Any]] = {
    "vit_attention": vit_attention,  # () -> (layers, heads, 1+N, 1+N)
    "cross_attention": decoder_cross_attention,  # (token_ids,) -> TokenAttention
    "itm_gradcam": itm_gradcam,  # (caption, layer) -> (grid, grid)
    "itm_probability": itm_match_probability,  # (caption,) -> float
}


@st.cache_data(show_spinner=False, max_entries=256)
def _explanation(
    kind: str, model_key: tuple[str, int, str], image_key: str, args: tuple[Any, ...], _model: BLIP, _image: PickedImage
) -> Any:
    return _EXPLAINERS[kind](_model, pixels([_image], _model.cfg.image_size), *args)


def explanation(kind: str, loaded: Loaded, image: PickedImage, *args: Any) -> Any:
    """`kind` of _EXPLAINERS (blipcore.evaluation.explain's maps, and the ITM score) for one image, cached by
    (checkpoint, image, args)."""
    return _explanation(kind, loaded.key, image.key, tuple(args), loaded.model, image)


# --- widgets shared by the model pages -------------------------------------------------------------
def select_checkpoints(key: str, default: str = "last", every_epoch: bool = False) -> list[tuple[RunDir, int]]:
    """Sidebar: runs, then epochs of each ("last": its newest; "ends": its first and newest).
    every_epoch adds a checkbox that takes every epoch of each run."""
    runs = select_runs(key=key)
    if not runs:
        stop_with("Pick at least one run in the sidebar.")
    take_all = every_epoch and st.sidebar.checkbox("Every epoch of each run", key=f"{key}_every_epoch")
    chosen = []
    for run in runs:
        epochs = run.epochs()
        if not epochs:
            st.sidebar.caption(f"`{run.name}` has no checkpoint yet.")
            continue
        if take_all:
            picked = epochs
        else:
            initial = epochs[-1:] if default == "last" else sorted({epochs[0], epochs[-1]})
            picked = st.sidebar.multiselect(
                f"Epochs of {run.name}", epochs, default=initial, key=f"{key}_epochs_{run.name}"
            )
        chosen += [(run, epoch) for epoch in picked]
    if not chosen:
        stop_with("Pick at least one epoch in the sidebar.", "Checkpoints are written at the end of each epoch.")
    return chosen


def pick_val_image(records: Sequence[ImageRecord], key: str) -> int:
    """A validation image by index, with the thumbnails of its page of the set to browse by eye."""
    def label(i: int) -> str:
        return f"#{i} · {records[i].captions[0] if records[i].captions else Path(records[i].file_path).name}"

    index = st.selectbox("Validation image", range(len(records)), key=key, format_func=label)
    start = index // GALLERY_PAGE * GALLERY_PAGE
    shown = records[start : start + GALLERY_PAGE]
    # Lazy: the thumbnails are decoded and sent only while the expander is open.
    gallery = st.expander("Thumbnails of the validation images around this one", key=f"{key}_gallery",
                          on_change="rerun")
    if gallery.open:
        shown_ok = []  # unreadable ones are left out here; the picked one says why where it is used
        for offset, record in enumerate(shown):
            try:
                shown_ok.append((f"#{start + offset}", thumbnail(val_image(record), 96)))
            except (ImageLoadError, OSError):
                continue
        gallery.image([image for _, image in shown_ok], caption=[label for label, _ in shown_ok], width=72)
    return index
