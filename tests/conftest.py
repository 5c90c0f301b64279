"""Shared fixtures: tiny model configs that build and run in milliseconds on a CPU."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blipcore import BlipConfig
from blipcore.paths import COCO_CC_BY_FIXTURE, SHARED_DATA_DIR, SHARED_DATA_ENV

# Tests run tiny models, and several tests start subprocesses (DDP ranks, a killed trainer, a Streamlit
# server) on a 2-core machine: one thread each avoids oversubscription, which made tiny fits 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# precision "auto" picks bf16 only on CPUs whose bf16 matmuls win (blipcore.speed): tests, subprocesses
# included, compute in fp32 on every machine unless they ask for bf16 by name.
os.environ["BLIPLAB_CPU_BF16"] = "0"

REPO_ROOT = Path(__file__).resolve().parents[1]
# 64 train and 10 val real COCO photos (CC BY 2.0), 64 px on the short side, with their COCO captions, in the
# repository: what the tests train, evaluate and caption on when they need photos (tests/fixtures/make_coco_cc_by.py).
PHOTOS = COCO_CC_BY_FIXTURE
PHOTOS_TRAIN, PHOTOS_VAL = 64, 10


def needs_shared_dataset(name: str) -> Callable[[Callable], Callable]:
    """Mark the test `shared_data` (`pytest -m shared_data` runs these alone) and skip it, saying why and how to run
    it, where the full dataset SHARED_DATA_DIR / name is missing."""
    root = SHARED_DATA_DIR / name
    skip = pytest.mark.skipif(not root.is_dir(), reason=(
        f"needs the full {name} dataset in {root}, which is not there: set {SHARED_DATA_ENV} to the folder that "
        f"holds {name}/ (default: ../shared/data beside the checkout)"))
    return lambda test: pytest.mark.shared_data(skip(test))


def tiny_config(**model_overrides) -> BlipConfig:
    """A model small enough for unit tests: 32x32 images, width 64, one or two layers."""
    model = {
        "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 2, "vision_heads": 2,
        "text_width": 64, "text_encoder_depth": 1, "text_decoder_depth": 2, "text_heads": 2,
        "max_text_len": 24, "embed_dim": 32,
    }
    model.update(model_overrides)
    return BlipConfig.preset("demo").override({f"model.{k}": v for k, v in model.items()})


def tiny_preset_toml(base: str, eval_images: int, **train: object) -> str:
    """A preset file on `base` (whose data layout it keeps) with tiny_config()'s model and small, fast, fp32
    training on the CPU: for tests that train through `python -m train fit --preset FILE` on a real layout."""
    model = {"image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 1, "vision_heads": 2,
             "text_width": 64, "text_encoder_depth": 1, "text_decoder_depth": 1, "text_heads": 2,
             "max_text_len": 24, "embed_dim": 32}
    settings = {"batch_size": 4, "warmup_steps": 1, "device": "cpu", "precision": "fp32", "eval_strategies": [],
                "eval_caption_images": 2, "save_state_every": 0, **train}
    lines = [f'base = "{base}"', "[model]", *(f"{k} = {v}" for k, v in model.items()),
             "[data]", "num_workers = 0", f"eval_images = {eval_images}", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_cfg() -> BlipConfig:
    torch.manual_seed(0)
    return tiny_config()


SHAPES_PARAMS = {"n_train": 64, "n_val": 16, "n_heldout": 8, "image_size": 32, "seed": 0}


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A tiny generated shapes dataset (64 train, 16 val, 8 held-out images of 32x32)."""
    from blipcore.data import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **SHAPES_PARAMS, progress=False)
    return root


def small_cfg(shapes_root: Path, model: dict | None = None, **train) -> BlipConfig:
    """tiny_config() trained on the tiny shapes dataset, 2 epochs of 8 steps, CPU."""
    cfg = tiny_config(**(model or {}))
    data = {f"data.shapes_{k}": v for k, v in SHAPES_PARAMS.items()}
    settings = {
        "train.epochs": 2, "train.batch_size": 8, "train.lr": 1e-3, "train.warmup_steps": 2, "train.log_every": 2,
        "train.eval_strategies": [], "train.eval_caption_images": 4, "train.device": "cpu", "train.save_state_every": 0,
        "train.precision": "fp32",  # exactness tests compare weights bit for bit: no bf16 where "auto" would pick it
        **{f"train.{k}": v for k, v in train.items()},
    }
    return cfg.override({"data.root": str(shapes_root), "data.eval_images": 8, **data, **settings})


def photos_cfg(shapes_root: Path, **train) -> BlipConfig:
    """small_cfg on the 64 real photos of tests/fixtures/coco-cc-by: unlike shapes, its training transform draws
    a random crop per image."""
    return small_cfg(shapes_root, **train).override({
        "data.kind": "coco", "data.root": str(PHOTOS), "data.train_annotations":
        "annotations/captions_train.json", "data.val_annotations": "annotations/captions_val.json",
        "data.subset": 64, "data.eval_images": 8,
    })


@pytest.fixture(scope="session")
def tiny_runs_dir(tmp_path_factory, shapes_root) -> Path:
    """A runs folder holding one finished run, `tiny` (2 epochs, ITC + LM + ITM, greedy evaluation),
    for dashboard and CLI tests. Treat it as read-only: it is shared by every test of the run."""
    from blipcore.training.trainer import Trainer

    runs = tmp_path_factory.mktemp("runs")
    cfg = small_cfg(shapes_root, model={"itm_weight": 0.5}, eval_strategies=["greedy"])
    Trainer(cfg, runs / "tiny", progress=False).fit()
    return runs
