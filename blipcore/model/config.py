"""Configuration: dataclasses for the model, the data and the training loop, presets, JSON round-trip.

A `BlipConfig` is the whole description of a run. It is written into `run.json` and into every
checkpoint sidecar, so a checkpoint can always be rebuilt into the model that produced it.

Presets are TOML files in blipcore/presets/ (package data), the one place they are defined:
`BlipConfig.preset("seed")` or `load_preset(name_or_path)` reads one, `available_presets()` lists them.
A preset file holds [model], [data] and [train] tables of fields; `base = "<preset>"` starts from another
preset, no `base` from the dataclass defaults below. A relative `data.root` is relative to the project
checkout (`blipcore.paths.project_path`). `--set section.field=value` on the command line
(`override_strings`) and `override({...})` change fields afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..paths import PRESETS_DIR, project_path

# bert-base-uncased has 30,522 word pieces; BLIP adds [DEC] (decoder begin) and [ENC] (multimodal encoder).
BERT_VOCAB_SIZE = 30522
VOCAB_SIZE = BERT_VOCAB_SIZE + 2
VOCABULARIES = ("full", "captions")  # model.vocabulary: all word pieces, or those of the training captions
DATA_KINDS = ("shapes", "coco", "webdataset")
# data.loader: how training reads a folder dataset (kind shapes or coco): "folder" decodes and augments each image
# in DataLoader workers; "cache" reads the decoded-image cache and augments whole batches on the device
# (blipcore.data.image_cache)
DATA_LOADERS = ("folder", "cache")
# Where a dataset comes from, for the message when it is missing (blipcore.data.datasets.fetch_hint): "" none,
# "coco2017" / "flickr8k" name the `python -m train data ...` command that fetches it, "test-fixture" has none.
DATA_SOURCES = ("", "coco2017", "flickr8k", "test-fixture")
CAPTION_MODES = ("random", "all")  # one random caption per image per epoch, or every caption a sample
DEVICES = ("auto", "cpu", "cuda")
PATCH_EMBEDS = ("linear", "conv-stem")  # model.patch_embed: ViT's patchify Conv2d, or Xiao et al.'s convolutional stem
ITC_LOSSES = ("softmax", "sigmoid")  # model.itc_loss: CLIP's symmetric cross-entropy, or SigLIP's pairwise sigmoid
# data.augment: named sets of training-image augmentations, each a tuple of the steps it applies in order.
# "crop": random resized crop (50-100 % of the area); "jitter": mild colour jitter (brightness, contrast, saturation,
# no hue: captions name colours); "flip": horizontal flip with "left" and "right" swapped in the caption.
AUGMENT_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "crop": ("crop",),
    "crop-jitter": ("crop", "jitter"),
    "crop-flip": ("crop", "flip"),
    "crop-jitter-flip": ("crop", "jitter", "flip"),
}
PRECISIONS = ("auto", "bf16", "fp32")
# train.compile: auto (CUDA: torch.compile with CUDA graphs; a CPU: eager), off, on (torch.compile without CUDA
# graphs), cudagraphs (with them; CUDA only). blipcore.training.step.compile_mode maps them to torch.compile's modes.
COMPILE_MODES = ("auto", "off", "on", "cudagraphs")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_at_least(section: str, config: Any, minimum: float, names: str) -> None:
    """ValueError naming the first field of `names` (space-separated) below `minimum` (or NaN)."""
    for name in names.split():
        value = getattr(config, name)
        if not value >= minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum}, got {value!r}")


def _check(checks: list[tuple[bool, str]]) -> None:
    """ValueError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class ModelConfig:
    """Architecture and loss terms. Widths must be divisible by their head counts."""

    # Vision transformer
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 512
    vision_depth: int = 6
    vision_heads: int = 8
    # Small-data remedies for the ViT, each off by default (docs: the small-data study)
    patch_embed: str = "linear"  # one of PATCH_EMBEDS; "conv-stem": 3x3 stride-2 convolutions down to the patch grid
    drop_path: float = 0.0  # stochastic depth of the vision blocks, rising linearly from 0 to this at the last block
    shifted_patches: bool = False  # Shifted Patch Tokenization (Lee et al. 2021): patches see their diagonal neighbours
    locality_attention: bool = False  # Locality Self-Attention: no token attends to itself; learned temperature
    # Text encoder (bidirectional; cross-attends to the image only for ITM) and decoder (causal + cross)
    # "full": bert-base-uncased's word pieces; "captions": only those of the training captions
    # (blipcore.model.vocabulary), then vocab_size is their number, which the trainer counts when a run starts
    vocabulary: str = "full"
    vocab_size: int = VOCAB_SIZE
    text_width: int = 512
    text_encoder_depth: int = 4
    text_decoder_depth: int = 4
    text_heads: int = 8
    max_text_len: int = 40
    tie_lm_head: bool = True  # LM head shares the decoder's word-embedding matrix
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Shared image-text space for ITC
    embed_dim: int = 256
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    itc_loss: str = "softmax"  # one of ITC_LOSSES; "sigmoid" (SigLIP) adds a learned logit bias
    # Loss weights: L = itc_weight*ITC + lm_weight*LM + itm_weight*ITM; a weight of 0 switches the term
    # off and its modules (ITM head, text-encoder cross-attention) are not built.
    itc_weight: float = 1.0
    lm_weight: float = 1.0
    itm_weight: float = 0.0
    itm_hard_negatives: bool = True  # ITM's negatives mined by ITC similarity (BLIP); False: uniform in the batch
    label_smoothing: float = 0.0  # LM label smoothing; BLIP uses 0.1
    # Train the decoder as a text-only language model on the captions: no image is read and the decoder's
    # cross-attention is skipped (decoder pretraining, chained into a full recipe with train.init). LM only.
    text_only: bool = False
    # Train the ViT alone as a masked autoencoder (blipcore.model.mae): no caption is read, ITC, LM and ITM are off; its
    # encoder then seeds a full recipe through train.init (image pretraining, as text_only is for the decoder)
    mae: bool = False
    mae_mask_ratio: float = 0.75  # share of each image's patches hidden from the encoder (He et al.: 75 %)
    # The decoder that reconstructs the hidden patches is discarded after pretraining: half the width of the
    # flickr8k-cpu ViT (256), as MAE's 512 is half of ViT-L's 1024, and 2 blocks (MAE's fine-tuning accuracy is the
    # same with 1 to 8; the full recipe goes on training the encoder, it is never probed frozen)
    mae_decoder_width: int = 128
    mae_decoder_depth: int = 2
    mae_decoder_heads: int = 4  # 32 dimensions per head, as MAE's decoder (512 wide, 16 heads)
    # BLIP's momentum encoder + queue of negatives for ITC (batch 8 gives only 7 in-batch negatives)
    momentum_encoder: bool = False
    momentum: float = 0.995
    queue_size: int = 4096
    distill_alpha: float = 0.4  # weight of the momentum model's soft targets
    # Decoder prompt (BLIP: 'a picture of '), prepended to every caption, excluded from loss and output
    prompt: str = "a picture of "

    def __post_init__(self) -> None:
        _check_at_least("model", self, 1, "image_size patch_size vision_width vision_depth vision_heads text_width "
                        "text_encoder_depth text_decoder_depth text_heads max_text_len embed_dim queue_size "
                        "mae_decoder_width mae_decoder_depth mae_decoder_heads")
        _check_at_least("model", self, 0, "itc_weight lm_weight itm_weight label_smoothing dropout drop_path")
        _check([
            (self.patch_embed in PATCH_EMBEDS,
             f"model.patch_embed must be one of {', '.join(PATCH_EMBEDS)}, got {self.patch_embed!r}"),
            (self.patch_embed != "conv-stem" or _is_power_of_two(self.patch_size) and self.patch_size >= 2,
             f"model.patch_embed = 'conv-stem' halves the image with each convolution down to the patch grid: "
             f"model.patch_size must be a power of 2 (>= 2), got {self.patch_size}"),
            (not (self.shifted_patches and self.patch_embed == "conv-stem"),
             "model.shifted_patches is a patch embedding of its own: it cannot be combined with "
             "model.patch_embed = 'conv-stem' (use one of them)"),
            (self.drop_path < 1, f"model.drop_path must be < 1, got {self.drop_path}"),
            (self.itc_loss in ITC_LOSSES,
             f"model.itc_loss must be one of {', '.join(ITC_LOSSES)}, got {self.itc_loss!r}"),
            (not (self.itc_loss == "sigmoid" and self.momentum_encoder),
             "model.itc_loss = 'sigmoid' cannot be combined with model.momentum_encoder: the momentum model's "
             "soft targets and queue are a softmax over negatives (use itc_loss = 'softmax')"),
            (self.vocabulary in VOCABULARIES,
             f"model.vocabulary must be one of {', '.join(VOCABULARIES)}, got {self.vocabulary!r}"),
            (self.vocabulary != "full" or self.vocab_size >= VOCAB_SIZE,
             f"model.vocab_size must be >= {VOCAB_SIZE} (bert-base-uncased's word pieces, [DEC] and [ENC]), "
             f"got {self.vocab_size}"),
            (self.vocabulary != "captions" or 2 <= self.vocab_size <= VOCAB_SIZE,
             f"with model.vocabulary = 'captions', model.vocab_size counts the kept word pieces: 2 to {VOCAB_SIZE}, "
             f"got {self.vocab_size}"),
            (self.vision_width % self.vision_heads == 0,
             f"model.vision_width={self.vision_width} is not divisible by model.vision_heads={self.vision_heads}"),
            (self.text_width % self.text_heads == 0,
             f"model.text_width={self.text_width} is not divisible by model.text_heads={self.text_heads}"),
            (self.image_size % self.patch_size == 0,
             f"model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}"),
            (self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.dropout < 1, f"model.dropout must be < 1, got {self.dropout}"),
            (self.label_smoothing < 1, f"model.label_smoothing must be < 1, got {self.label_smoothing}"),
            (0 < self.temperature_min <= self.temperature_init <= self.temperature_max,
             "model.temperature_init must lie in [temperature_min, temperature_max] with temperature_min > 0, got "
             f"{self.temperature_init} in [{self.temperature_min}, {self.temperature_max}]"),
            (0 <= self.momentum <= 1, f"model.momentum must be in [0, 1], got {self.momentum}"),
            (0 <= self.distill_alpha <= 1, f"model.distill_alpha must be in [0, 1], got {self.distill_alpha}"),
            (bool(self.itc_weight or self.lm_weight or self.itm_weight or self.mae),
             "every loss weight is 0: enable at least one of itc, lm, itm (or model.mae)"),
            (not self.itm_weight or bool(self.itc_weight),
             "ITM draws its hard negatives from ITC similarities: itm_weight needs itc_weight > 0"),
            (not (self.mae and self.text_only),
             "model.mae trains the image encoder alone and model.text_only the decoder alone: use one of them"),
            (not self.text_only or (self.lm_weight > 0 and not self.itc_weight and not self.itm_weight),
             "model.text_only trains the decoder alone: it needs lm_weight > 0 and itc_weight = itm_weight = 0, got "
             f"lm {self.lm_weight}, itc {self.itc_weight}, itm {self.itm_weight}"),
            (not self.mae or not (self.itc_weight or self.lm_weight or self.itm_weight),
             "model.mae trains the image encoder alone: it needs itc_weight = lm_weight = itm_weight = 0, got "
             f"itc {self.itc_weight}, lm {self.lm_weight}, itm {self.itm_weight}"),
            (not (self.mae and self.patch_embed == "conv-stem"),
             "model.mae cannot be combined with model.patch_embed = 'conv-stem': the stem's overlapping "
             "convolutions let a visible patch's token see the hidden pixels around it (use patch_embed = 'linear')"),
            (not (self.mae and self.shifted_patches),
             "model.mae cannot be combined with model.shifted_patches: each shifted patch carries half of its "
             "neighbours' pixels, the hidden ones included"),
            (0 < self.mae_mask_ratio < 1, f"model.mae_mask_ratio must be in (0, 1), got {self.mae_mask_ratio}"),
            (not self.mae or not 0 < self.mae_mask_ratio < 1  # (NaN: refused just above)
             or 1 <= self.mae_visible_patches() < self._patches(),
             f"model.mae_mask_ratio={self.mae_mask_ratio} of {self._patches()} patches must leave at least one "
             "patch visible and hide at least one"),
            (self.mae_decoder_width % self.mae_decoder_heads == 0,
             f"model.mae_decoder_width={self.mae_decoder_width} is not divisible by "
             f"model.mae_decoder_heads={self.mae_decoder_heads}"),
        ])

    def _patches(self) -> int:
        """Patches per image, (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    def mae_visible_patches(self) -> int:
        """Patches of each image the MAE encoder sees: round((1 - mae_mask_ratio) * patches), 9 of 36 at 0.75."""
        return round((1 - self.mae_mask_ratio) * self._patches())


@dataclass
class DataConfig:
    """Where the captioned images come from. One on-disk format: COCO caption JSON + image folder; to stream
    past one machine's disk, WebDataset shards of one (kind "webdataset": the layout of `python -m train data
    shards`, so the annotation and image fields below are not used)."""

    kind: str = "shapes"  # "shapes" (generated scenes), "coco" (a COCO-caption-format folder) or "webdataset"
    root: str = "data/shapes"  # for "webdataset": the folder `python -m train data shards` wrote (shards.json)
    source: str = ""  # one of DATA_SOURCES: when root is missing, the error names the command that fetches it
    train_annotations: str = "annotations/captions_train.json"
    val_annotations: str = "annotations/captions_val.json"
    train_images: str = "images"
    val_images: str = "images"
    # A held-out test split, read only by `python -m train eval --split test` ("" = none): the val split picks
    # checkpoints and decoding strategies, the test split reports them
    test_annotations: str = ""
    test_images: str = "images"
    subset: int = 0  # use only the first N training images (0 = all); the seed used 10,000 of train2017
    val_subset: int = 0
    caption_mode: str = "random"  # "random": one caption per image per epoch; "all": every caption a sample
    num_workers: int = 0  # DataLoader workers of the "folder" loader (the "cache" loader needs none)
    loader: str = "folder"  # one of DATA_LOADERS
    # where data.loader = "cache" keeps its files ("" = the user's cache folder, ~/.cache/bliplab/images); relative
    # to the project checkout, as root
    cache_dir: str = ""
    # WebDataset shards (kind == "webdataset"): the train shards are streamed; evaluation reads the val files
    train_shards: str = ""  # where the train shards are read from: "" = beside shards.json in root, or a brace
    #   pattern of paths or http(s) URLs, e.g. https://host/c/train-{000000..000009}.tar (pipe: commands only with
    #   BLIPLAB_ALLOW_PIPE_SHARDS=1 in the environment: a config in a run.json must not run commands)
    shuffle_buffer: int = 1000  # training items shuffled in a buffer of this many per DataLoader worker
    # Synthetic scenes (kind == "shapes"): generated into `root` if it is not there yet
    shapes_n_train: int = 3000
    shapes_n_val: int = 300
    shapes_n_heldout: int = 300
    shapes_image_size: int = 64
    shapes_seed: int = 0
    # Training-image augmentation: a name of AUGMENT_SETS. Generated scenes never get the crop (it would move or cut
    # the objects their captions place); evaluation images are never augmented.
    augment: str = "crop"
    # Fixed evaluation set for embeddings dumps and per-epoch evaluation (first N val images)
    eval_images: int = 200

    def __post_init__(self) -> None:
        _check_at_least("data", self, 0, "subset val_subset num_workers shapes_n_heldout")
        _check_at_least("data", self, 1, "shapes_n_train shapes_n_val eval_images shuffle_buffer")
        _check([
            (self.kind in DATA_KINDS, f"data.kind must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}"),
            (self.loader in DATA_LOADERS,
             f"data.loader must be one of {', '.join(DATA_LOADERS)}, got {self.loader!r}"),
            (self.loader != "cache" or self.kind != "webdataset",
             "data.loader = 'cache' reads a folder dataset (data.kind shapes or coco), not streamed WebDataset "
             "shards: use data.loader = 'folder'"),
            (self.source in DATA_SOURCES,
             f"data.source must be one of {', '.join(map(repr, DATA_SOURCES))}, got {self.source!r}"),
            (self.caption_mode in CAPTION_MODES,
             f"data.caption_mode must be one of {', '.join(CAPTION_MODES)}, got {self.caption_mode!r}"),
            (self.augment in AUGMENT_SETS,
             f"data.augment must be one of {', '.join(AUGMENT_SETS)}, got {self.augment!r}"),
            (self.shapes_image_size >= 16,
             f"data.shapes_image_size must be >= 16 pixels, got {self.shapes_image_size}"),
        ])


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 3
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit)
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"  # auto (compiled with CUDA graphs on CUDA, eager on a CPU) | off | on | cudagraphs
    log_every: int = 10
    eval_every_steps: int = 0  # extra fast evaluations inside an epoch (0 = only at epoch ends)
    eval_strategies: tuple[str, ...] = ("greedy", "beam")
    eval_caption_images: int = 100  # images captioned in each epoch-end evaluation
    keep_checkpoints: int = 0  # keep only the newest N epoch checkpoints (0 = keep all)
    save_state_every: int = 500  # also refresh checkpoints/last/ every N steps (0 = only at epoch ends)
    init: str = ""  # "RUN[:EPOCH]": start from that checkpoint's weights instead of random ones (fit --init)

    def __post_init__(self) -> None:
        _check_at_least("train", self, 1, "epochs batch_size grad_accum_steps log_every")
        _check_at_least("train", self, 0, "max_steps weight_decay warmup_steps min_lr_ratio grad_clip "
                        "eval_every_steps eval_caption_images keep_checkpoints save_state_every")
        _check([
            (self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a positive number, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"train.betas must be two numbers in [0, 1), got {list(self.betas)}"),
            (self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.device in DEVICES, f"train.device must be one of {', '.join(DEVICES)}, got {self.device!r}"),
            (self.precision in PRECISIONS,
             f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.compile in COMPILE_MODES,
             f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"),
        ])


def _typed(value: Any, example: Any, where: str) -> Any:
    """`value` (from JSON or TOML) as the type of the field's default `example`, or ValueError naming the
    field: a run.json or sidecar edited by hand (or by someone hostile) fails here, not deep in the model."""
    if isinstance(example, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(_typed(item, example[0], f"{where}[{i}]") if example else item for i, item in enumerate(value))
        expected = "a list"
    elif isinstance(example, bool):
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif isinstance(example, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "a whole number"
    elif isinstance(example, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:
        if isinstance(value, str):
            return value
        expected = "a string"
    raise ValueError(f"{where} must be {expected}, got {value!r}")


def _section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section {where} must be an object of fields, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    defaults = cls()
    return cls(**{name: _typed(value, getattr(defaults, name), f"{where}.{name}") for name, value in values.items()})


@dataclass
class BlipConfig:
    """Model + data + training: everything needed to reproduce a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlipConfig:
        values = dict(values)
        unknown = sorted(set(values) - {"model", "data", "train", "name"})
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)}")
        return cls(
            model=_section_from_dict(ModelConfig, values.get("model", {}), "model"),
            data=_section_from_dict(DataConfig, values.get("data", {}), "data"),
            train=_section_from_dict(TrainConfig, values.get("train", {}), "train"),
            name=values.get("name", "custom"),
        )

    @classmethod
    def from_json(cls, text: str) -> BlipConfig:
        return cls.from_dict(json.loads(text))

    # --- overrides -----------------------------------------------------------------------------
    def override(self, dotted: dict[str, Any]) -> BlipConfig:
        """A copy with `{"train.batch_size": 16, ...}` applied; values keep the field's type."""
        values = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if section not in ("model", "data", "train") or not name:
                raise ValueError(f"override {key!r} must look like model.X, data.X or train.X")
            if name not in values[section]:
                raise ValueError(f"unknown field {key!r} (known: {', '.join(sorted(values[section]))})")
            values[section][name] = value
        return BlipConfig.from_dict(values)

    def override_strings(self, assignments: list[str]) -> BlipConfig:
        """Apply `section.field=value` strings from the command line, parsing value by the field's type."""
        current = self.to_dict()
        parsed: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ValueError(f"--set {assignment!r}: expected section.field=value")
            key = key.strip()
            section, _, name = key.partition(".")
            if section not in current or name not in current[section]:
                raise ValueError(f"--set {assignment!r}: unknown field {key!r}")
            parsed[key] = _parse_like(raw.strip(), current[section][name], key)
        return self.override(parsed)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> BlipConfig:
        """The preset blipcore/presets/<name>.toml (see `load_preset`)."""
        return load_preset(name)


def _parse_like(raw: str, example: Any, key: str) -> Any:
    try:
        if isinstance(example, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(example, int):
            return int(raw)
        if isinstance(example, float):
            return float(raw)
        if isinstance(example, list):
            items = [item.strip() for item in raw.split(",") if item.strip()]
            return [_parse_like(item, example[0], key) for item in items] if example else items
        return raw
    except ValueError:
        raise ValueError(f"--set {key}={raw!r}: expected a value like {example!r}") from None


# --- presets -------------------------------------------------------------------------------------
_SECTIONS = ("model", "data", "train")


def available_presets() -> list[str]:
    """The names of the presets in blipcore/presets/, sorted."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


def _named_preset(name: str) -> Path:
    """The file of a preset name; ValueError listing the known presets for an unknown one."""
    known = available_presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(known)} (or a .toml path)")
    return PRESETS_DIR / f"{name}.toml"


def _read_preset(path: Path) -> dict[str, Any]:
    """The TOML table of a preset file, or ValueError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: not a valid TOML preset ({err})") from None


def _preset_config(path: Path, chain: tuple[Path, ...] = ()) -> BlipConfig:
    """The config a preset file describes: its `base` preset (none: the dataclass defaults) with the file's
    [model] / [data] / [train] fields applied. `chain` holds the files that named this one as base, to
    refuse a loop. Relative data roots are left as written (load_preset resolves the final one)."""
    if path.resolve() in chain:
        raise ValueError(f"{path}: preset base loop ({' -> '.join(p.name for p in (*chain, path))})")
    table = _read_preset(path)
    base = table.pop("base", None)
    unknown = sorted(set(table) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; a preset holds `base` and the tables "
                         f"{', '.join(f'[{s}]' for s in _SECTIONS)}")
    for section, fields in table.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: {section} must be a table ([{section}]) of fields, got {fields!r}")
    if base is None:
        cfg = BlipConfig()
    elif base in available_presets():
        cfg = _preset_config(PRESETS_DIR / f"{base}.toml", (*chain, path.resolve()))
    else:
        raise ValueError(f"{path}: base must name a preset ({', '.join(available_presets())}), got {base!r}")
    try:
        return cfg.override({f"{section}.{key}": value for section, fields in table.items()
                             for key, value in fields.items()})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_preset(name_or_path: str | Path) -> BlipConfig:
    """A preset by name (blipcore/presets/<name>.toml) or any .toml path, named after its file, with a
    relative data.root made absolute under the project checkout so it works from any current folder.
    ValueError for an unknown preset (listing the known ones), invalid TOML (naming the file) or a field of
    the wrong type or out of range (naming the file and the field)."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".toml":
        if not path.is_file():
            raise ValueError(f"preset file {path} not found")
    else:
        path = _named_preset(str(name_or_path))
    cfg = _preset_config(path)
    data = dataclasses.replace(cfg.data, root=str(project_path(cfg.data.root)))
    return dataclasses.replace(cfg, data=data, name=path.stem)
