"""Shared fixtures: tiny model configs that build and run in milliseconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blipcore import BlipConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def tiny_config(**model_overrides) -> BlipConfig:
    """A model small enough for unit tests: 32x32 images, width 64, one or two layers."""
    model = {
        "image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 2, "vision_heads": 2,
        "text_width": 64, "text_encoder_depth": 1, "text_decoder_depth": 2, "text_heads": 2,
        "max_text_len": 24, "embed_dim": 32,
    }
    model.update(model_overrides)
    return BlipConfig.preset("demo").override({f"model.{k}": v for k, v in model.items()})


@pytest.fixture
def tiny_cfg() -> BlipConfig:
    torch.manual_seed(0)
    return tiny_config()
