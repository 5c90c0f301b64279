"""The ViT's small-data remedies (model.patch_embed, drop_path, shifted_patches, locality_attention): the default
encoder unchanged, what each option computes against a reference by hand, FLOPs against torch's counter, and a
tiny BLIP training with each. Drop path and Locality Self-Attention at the layer level: tests/test_layers.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blipcore import BLIP
from blipcore.model.flops import forward_flops, training_flops
from blipcore.model.layers import DropPath
from blipcore.model.tokenizer import tokenize_captions
from blipcore.model.vision import ConvStem, ShiftedPatchTokenizer, VisionTransformer, conv_stem_channels
from blipcore.training.trainer import Trainer
from tests.conftest import small_cfg, tiny_config

OPTIONS: dict[str, dict[str, Any]] = {
    "linear": {},
    "conv-stem": {"patch_embed": "conv-stem"},
    "drop-path": {"drop_path": 0.3},
    "shifted-patches": {"shifted_patches": True},
    "locality-attention": {"locality_attention": True},
}

# The default encoder's state-dict keys (vision_depth 1): existing checkpoints load only while they stay.
PLAIN_VIT_KEYS = [
    "cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.q.weight", "blocks.0.attn.q.bias",
    "blocks.0.attn.kv.weight", "blocks.0.attn.kv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias",
]


def _vit(**overrides: Any) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(tiny_config(**overrides).model)


def _images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _plain_vit_forward(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The ViT as it was before these options, by hand from the encoder's parameters."""
    embed = vit.patch_embed
    x = F.conv2d(images, embed.weight, embed.bias, stride=vit.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(len(images), -1, -1), x], dim=1) + vit.pos_embed
    for block in vit.blocks:
        attn, (b, t, width) = block.attn, x.shape
        h = block.norm1(x)
        q = attn.q(h).view(b, t, attn.heads, -1).transpose(1, 2)
        k, v = (z.view(b, t, attn.heads, -1).transpose(1, 2) for z in attn.kv(h).chunk(2, dim=-1))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(b, t, width))
        x = x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
    return vit.norm(x)


# --- the default encoder ------------------------------------------------------------------------------------------
def test_default_encoder_keeps_its_parameter_names_and_the_plain_vit_forward():
    vit = _vit(vision_depth=1).eval()
    assert list(vit.state_dict()) == PLAIN_VIT_KEYS
    assert isinstance(vit.patch_embed, nn.Conv2d) and vit.patch_embed.kernel_size == (8, 8)
    assert isinstance(vit.blocks[0].drop_path, nn.Identity) and not vit.blocks[0].attn.locality
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(vit(images)[0], _plain_vit_forward(vit, images), atol=1e-5, rtol=1e-5)
    # a checkpoint of the default model loads strictly into one built with the options' defaults spelled out
    explicit = _vit(vision_depth=1, patch_embed="linear", drop_path=0.0, shifted_patches=False,
                    locality_attention=False)
    explicit.load_state_dict(vit.state_dict())


@pytest.mark.parametrize("overrides", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_keeps_the_token_count_and_returns_every_blocks_attention(overrides):
    vit = _vit(**overrides).eval()
    images = _images()
    with torch.no_grad():
        fused, none = vit(images)
        explicit, attentions = vit(images, need_weights=True)
    assert none is None and fused.shape == (2, 1 + 4**2, 64)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert len(attentions) == 2 and all(a.shape == (2, 2, 17, 17) for a in attentions)
    for weights in attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 17))
        diagonal = weights.diagonal(dim1=-2, dim2=-1)
        assert torch.all(diagonal == 0) if overrides.get("locality_attention") else torch.all(diagonal > 0)


# --- conv stem ----------------------------------------------------------------------------------------------------
def test_conv_stem_channels_double_up_to_the_width():
    assert conv_stem_channels(16, 256) == [32, 64, 128, 256]
    assert conv_stem_channels(8, 64) == [16, 32, 64]
    assert conv_stem_channels(2, 48) == [48]
    for patch in (1, 12):
        with pytest.raises(ValueError, match="power of 2"):
            conv_stem_channels(patch, 64)


@pytest.mark.parametrize("patch", [8, 16])
def test_conv_stem_halves_the_image_down_to_the_patch_grid(patch):
    vit = _vit(image_size=64, patch_size=patch, patch_embed="conv-stem")
    stem = vit.patch_embed
    assert isinstance(stem, ConvStem)
    convs = [m for m in stem.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == int(math.log2(patch))  # log2(p) stride-2 convolutions
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == conv_stem_channels(patch, 64) and convs[0].in_channels == 3
    assert sum(isinstance(m, nn.GroupNorm) for m in stem.convs) == len(convs)
    assert sum(isinstance(m, nn.ReLU) for m in stem.convs) == len(convs)
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 64
    grid = 64 // patch
    images = _images(size=64)
    assert stem.convs(images).shape == (2, 64, grid, grid)
    tokens, attentions = vit(images, need_weights=True)
    assert tokens.shape == (2, 1 + grid**2, 64) and attentions[0].shape[-1] == 1 + grid**2


def test_conv_stem_normalises_each_image_on_its_own():
    """No batch statistics: an image's tokens are the same alone as in a batch, in training too."""
    stem = _vit(patch_embed="conv-stem").patch_embed.train()
    images = _images(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(stem(images)[2:3], stem(images[2:3]), atol=1e-5, rtol=1e-5)


# --- Shifted Patch Tokenization -----------------------------------------------------------------------------------
def test_shifted_patches_are_the_image_and_its_4_diagonal_half_patch_shifts():
    tokenizer = ShiftedPatchTokenizer(patch_size=4, width=16)
    images = _images(batch=2, size=8)
    shifted = tokenizer.shifted(images)
    assert shifted.shape == (2, 15, 8, 8)
    torch.testing.assert_close(shifted[:, :3], images, rtol=0, atol=0)

    def moved(down: int, right: int) -> torch.Tensor:
        """The image moved `down` rows and `right` columns, what comes in from beyond the border zeroed."""
        out = torch.roll(images, shifts=(down, right), dims=(-2, -1))
        rows = slice(0, down) if down > 0 else slice(8 + down, 8)
        cols = slice(0, right) if right > 0 else slice(8 + right, 8)
        out[..., rows, :] = 0
        out[..., :, cols] = 0
        return out

    # Each pixel of a copy holds the pixel half a patch (2) away: left-up, right-up, left-down, right-down.
    for i, (down, right) in enumerate([(2, 2), (2, -2), (-2, 2), (-2, -2)]):
        torch.testing.assert_close(shifted[:, 3 * (i + 1) : 3 * (i + 2)], moved(down, right), rtol=0, atol=0)
    assert shifted[0, 3 + 1, 5, 6] == images[0, 1, 3, 4]  # left-up: from 2 rows up, 2 columns left
    assert torch.all(shifted[:, 3:6, :2] == 0) and torch.all(shifted[:, 3:6, :, :2] == 0)


def test_shifted_patch_tokens_are_layernorm_linear_of_each_flattened_patch():
    torch.manual_seed(0)
    tokenizer = ShiftedPatchTokenizer(patch_size=4, width=16)
    nn.init.normal_(tokenizer.norm.weight)
    images = _images(batch=2, size=8)
    shifted = tokenizer.shifted(images)
    # patches in row-major order; in each, the pixels row-major and their 15 channels innermost (p1 p2 c)
    patches = torch.stack([shifted[:, :, r : r + 4, c : c + 4].permute(0, 2, 3, 1).reshape(2, -1)
                           for r in (0, 4) for c in (0, 4)], dim=1)
    assert patches.shape == (2, 4, 15 * 16)
    expected = tokenizer.proj(F.layer_norm(patches, (240,), tokenizer.norm.weight, tokenizer.norm.bias))
    torch.testing.assert_close(tokenizer(images), expected, atol=1e-5, rtol=1e-5)

    vit = _vit(shifted_patches=True)
    assert isinstance(vit.patch_embed, ShiftedPatchTokenizer)
    assert vit.patch_embed.proj.in_features == 15 * 8**2 and vit(_images())[0].shape == (2, 17, 64)


# --- drop path and LSA in the model -------------------------------------------------------------------------------
def test_drop_path_rises_linearly_over_the_vision_blocks_only():
    torch.manual_seed(0)
    model = BLIP(tiny_config(vision_depth=3, drop_path=0.2))
    vision = [block.drop_path for block in model.visual_encoder.blocks]
    assert isinstance(vision[0], nn.Identity)
    assert [p.rate for p in vision[1:]] == pytest.approx([0.1, 0.2])
    text = [*model.text_encoder.blocks, *model.text_decoder.blocks]
    assert all(isinstance(block.drop_path, nn.Identity) for block in text)
    vit, images = model.visual_encoder, _images(batch=32)
    torch.manual_seed(1)
    first = vit.train()(images)[0]
    assert not torch.equal(first, vit(images)[0])  # stochastic in training
    assert torch.equal(vit.eval()(images)[0], vit(images)[0])  # deterministic in evaluation


def test_locality_attention_is_in_the_vision_blocks_only():
    model = BLIP(tiny_config(locality_attention=True))
    assert all(block.attn.locality for block in model.visual_encoder.blocks)
    assert not any(block.attn.locality for block in [*model.text_encoder.blocks, *model.text_decoder.blocks])
    scales = [name for name, _ in model.named_parameters() if name.endswith("attn.scale")]
    assert scales == ["visual_encoder.blocks.0.attn.scale", "visual_encoder.blocks.1.attn.scale"]


# --- FLOPs --------------------------------------------------------------------------------------------------------
FLOP_CASES = {
    "linear": {},
    "conv-stem-p8": {"patch_embed": "conv-stem"},
    "conv-stem-p16": {"patch_embed": "conv-stem", "patch_size": 16},
    "shifted-patches": {"shifted_patches": True},
    "drop-path-lsa": {"drop_path": 0.5, "locality_attention": True},
}


@pytest.mark.parametrize("overrides", FLOP_CASES.values(), ids=FLOP_CASES.keys())
def test_vision_flops_match_torch_flop_counter(overrides):
    """blipcore.model.flops' ViT part against FlopCounterMode, the forward and forward + backward (the input gradient of
    the product that reads the images is not computed). SDPA in its math backend, as in
    tests/test_benchmarks.py::test_flops_match_torch_flop_counter; the encoder in training mode, so a drop path
    branch that is dropped is computed, and counted, all the same."""
    cfg = tiny_config(**{"image_size": 64, "patch_size": 8, "vision_width": 32, "vision_depth": 2, **overrides})
    torch.manual_seed(0)
    vit = VisionTransformer(cfg.model).train()
    images = _images(batch=3, size=64)
    forward = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), forward, torch.no_grad():
        vit(images)
    assert forward_flops(cfg, 3, 8)["vision"] == forward.get_total_flops()
    step = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), step:
        vit(images)[0].square().sum().backward()
    assert training_flops(cfg, 3, 8)["vision"] == step.get_total_flops()


# --- training -----------------------------------------------------------------------------------------------------
TRAIN_CASES = {
    **OPTIONS,
    "conv-stem-dp-lsa-momentum-itm": {"patch_embed": "conv-stem", "drop_path": 0.2, "locality_attention": True,
                                      "momentum_encoder": True, "queue_size": 16, "itm_weight": 0.5},
    "spt-dp-lsa-momentum": {"shifted_patches": True, "drop_path": 0.2, "locality_attention": True,
                            "momentum_encoder": True, "queue_size": 16},
}


@pytest.mark.parametrize("overrides", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_a_tiny_blip_with_each_option_trains_a_step(overrides):
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    model = BLIP(cfg).train()
    captions = ["a red circle", "two blue squares on the left", "a green star", "a small yellow triangle"]
    tokens = tokenize_captions(captions, cfg.model.max_text_len)
    batch = (_images(batch=4), tokens["input_ids"], tokens["attention_mask"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(*batch, image_ids=torch.arange(4))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    embed = dict(model.visual_encoder.patch_embed.named_parameters())
    assert embed and all(p.grad is not None and torch.isfinite(p.grad).all() for p in embed.values())
    assert all(p.grad.abs().sum() > 0 for p in embed.values())
    if cfg.model.locality_attention:
        assert all(block.attn.scale.grad.abs().sum() > 0 for block in model.visual_encoder.blocks)
    if cfg.model.momentum_encoder:  # the momentum model computes targets: its copy of the ViT drops nothing
        rates = [m.rate for m in model.visual_encoder_m.modules() if isinstance(m, DropPath)]
        assert rates and all(rate == 0.0 for rate in rates)
        assert max(m.rate for m in model.visual_encoder.modules() if isinstance(m, DropPath)) == 0.2
    before = {name: p.detach().clone() for name, p in embed.items()}
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in embed.items())
    assert torch.isfinite(model(*batch, image_ids=torch.arange(4))["loss"])


def test_the_trainer_runs_every_option_together(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, model={"patch_embed": "conv-stem", "drop_path": 0.2, "locality_attention": True},
                    max_steps=2, epochs=1)
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["status"] == "completed" and summary["step"] == 2
