"""Explanations: rollout and [CLS] maps by hand, decoder cross-attention against cached decoding,
ITM Grad-CAM, overlays."""

import numpy as np
import pytest
import torch
from PIL import Image

from blipcore import BLIP
from blipcore.evaluation.explain import (
    attention_rollout,
    cls_attention_maps,
    decoder_cross_attention,
    itm_gradcam,
    overlay_heatmap,
    tensor_to_uint8,
    vit_attention,
)
from tests.conftest import tiny_config

# One layer, 1 + 4 tokens: [CLS] attends 0.2 to itself and 0.1, 0.3, 0.4, 0.0 to the patches;
# patches attend uniformly.
ROW0 = [0.2, 0.1, 0.3, 0.4, 0.0]
UNIFORM = [0.2] * 5


def _one_layer(*heads_row0):
    """(1 layer, heads, 5, 5) with the given [CLS] rows and uniform patch rows."""
    return np.array([[[row0] + [UNIFORM] * 4 for row0 in heads_row0]])


def _model(**overrides):
    torch.manual_seed(0)
    return BLIP(tiny_config(**overrides)).eval()


def _image(model, seed=0):
    size = model.cfg.image_size
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


# --- rollout ---------------------------------------------------------------------------------------
def test_rollout_one_layer_by_hand():
    # (A + I) / 2 keeps rows summing to 1, so the [CLS] row over patches is ROW0[1:] / 2; / max.
    expected = np.array([[0.05, 0.15], [0.2, 0.0]]) / 0.2
    np.testing.assert_allclose(attention_rollout(_one_layer(ROW0)), expected)


def test_rollout_head_fusion_by_hand():
    attn = _one_layer(ROW0, [0.6, 0.1, 0.1, 0.0, 0.2])
    # max of the heads: [0.6, 0.1, 0.3, 0.4, 0.2]; + I, / 2, rows renormalised; patches / max
    np.testing.assert_allclose(attention_rollout(attn, head_fusion="max"), [[0.25, 0.75], [1.0, 0.5]])
    # min: [0.2, 0.1, 0.1, 0.0, 0.0]
    np.testing.assert_allclose(attention_rollout(attn, head_fusion="min"), [[1.0, 1.0], [0.0, 0.0]])
    mean = attention_rollout(attn, head_fusion="mean")  # [0.4, 0.1, 0.2, 0.2, 0.1]
    np.testing.assert_allclose(mean, [[0.5, 1.0], [1.0, 0.5]])


def test_rollout_discard_by_hand():
    # 2 of 25 entries discarded: the 0.0 and the 0.1 of the [CLS] row -> patches [0, 0.3, 0.4, 0]
    np.testing.assert_allclose(attention_rollout(_one_layer(ROW0), discard_ratio=0.08), [[0.0, 0.75], [1.0, 0.0]])


def test_rollout_multiplies_layers_in_order():
    second = np.eye(5)[None, None].copy()
    second[0, 0, 0] = [0, 1, 0, 0, 0]  # [CLS] copies patch 1 in the top layer
    # a2[0] = (e1 + e0) / 2, so the result row is (a1[0] + a1[1]) / 2 with
    # a1[0] = [0.6, 0.05, 0.15, 0.2, 0] and a1[1] = [0.1, 0.6, 0.1, 0.1, 0.1]
    expected = np.array([0.325, 0.125, 0.15, 0.05]) / 0.325
    rollout = attention_rollout(np.concatenate([_one_layer(ROW0), second]))
    np.testing.assert_allclose(rollout.reshape(-1), expected)


def test_rollout_of_identity_or_uniform_attention_is_uniform():
    identity = attention_rollout(np.broadcast_to(np.eye(17), (3, 2, 17, 17)))
    assert identity.shape == (4, 4)
    np.testing.assert_array_equal(identity, np.zeros((4, 4)))  # [CLS] never reads a patch: flat, not NaN
    uniform = attention_rollout(np.full((3, 2, 17, 17), 1 / 17))
    np.testing.assert_allclose(uniform, np.ones((4, 4)))


def test_rollout_validates_arguments():
    attn = _one_layer(ROW0)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(attn, head_fusion="median")
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="discard_ratio"):
            attention_rollout(attn, discard_ratio=ratio)
    with pytest.raises(ValueError, match="square grid"):
        attention_rollout(np.ones((1, 1, 4, 4)) / 4)
    with pytest.raises(ValueError, match="shape"):
        attention_rollout(np.ones((1, 5, 5)))


def test_rollout_and_cls_maps_of_a_real_model():
    model = _model()
    attn = vit_attention(model, _image(model))
    assert attn.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    variants = {
        (fusion, ratio): attention_rollout(attn, fusion, ratio)
        for fusion in ("mean", "max", "min")
        for ratio in (0.0, 0.9)
    }
    for rollout in variants.values():
        assert rollout.shape == (4, 4) and rollout.min() >= 0.0 and rollout.max() <= 1.0
    assert not np.allclose(variants["mean", 0.0], variants["max", 0.0])
    assert not np.allclose(variants["mean", 0.0], variants["mean", 0.9])

    maps = cls_attention_maps(attn)
    assert maps.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(maps.reshape(2, 2, 16), attn[:, :, 0, 1:])


# --- decoder cross-attention -----------------------------------------------------------------------
@pytest.mark.parametrize("use_prompt", [True, False])
def test_decoder_cross_attention_matches_cached_decoding(use_prompt):
    model = _model()
    image = _image(model)
    token_ids = [1037, 2417, 4418, 102]  # "a red circle [SEP]"
    result = decoder_cross_attention(model, image, token_ids, use_prompt=use_prompt)
    assert result.tokens == ["a", "red", "circle", "[SEP]"]
    assert result.maps.shape == (4, 2, 2, 4, 4) and result.cls_weight.shape == (4, 2, 2)
    np.testing.assert_allclose(result.maps.sum(axis=(-2, -1)) + result.cls_weight, 1.0, atol=1e-5)

    # Incremental decoding: the prefix, then one token at a time; each call's last query predicts a token.
    with torch.no_grad():
        image_embeds, _ = model.visual_encoder(image[None])
        prefix = model.decoder_prefix(1, "cpu")[:, : None if use_prompt else 1]
        cache = model.new_cache()
        steps = []
        for new in [prefix] + [torch.tensor([[t]]) for t in token_ids[:-1]]:
            _, cross = model.decode_step(new, image_embeds, cache, need_weights=True)
            steps.append(torch.stack([w[0, :, -1] for w in cross]))  # (layers, heads, 1+N)
    incremental = torch.stack(steps).numpy()
    np.testing.assert_allclose(result.cls_weight, incremental[..., 0], atol=1e-5)
    np.testing.assert_allclose(result.maps.reshape(4, 2, 2, 16), incremental[..., 1:], atol=1e-5)

    heat = result.token_map(1)
    assert heat.shape == (4, 4) and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    one_head = result.maps[1, 0, 1]
    np.testing.assert_allclose(result.token_map(1, layer=0, head=1), one_head / one_head.max())


def test_decoder_cross_attention_rejects_empty_captions():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        decoder_cross_attention(model, _image(model), [])


# --- ITM Grad-CAM ----------------------------------------------------------------------------------
def test_itm_gradcam():
    model = _model(itm_weight=1.0)
    image = _image(model)
    heat = itm_gradcam(model, image, "a red circle on the left")
    assert heat.shape == (4, 4) and np.isfinite(heat).all() and heat.min() >= 0.0
    assert all(p.grad is None for p in model.parameters())
    assert not np.allclose(heat, itm_gradcam(model, image, "two blue squares"))
    assert itm_gradcam(model, image, "a red circle", layer=0).shape == (4, 4)
    with pytest.raises(ValueError, match="layer"):
        itm_gradcam(model, image, "a red circle", layer=1)
    with pytest.raises(ValueError, match="empty"):
        itm_gradcam(model, image, "")


def test_itm_gradcam_needs_an_itm_head():
    model = _model()
    with pytest.raises(ValueError, match="this model has no ITM head"):
        itm_gradcam(model, _image(model), "a red circle")


# --- every ViT option -------------------------------------------------------------------------------
VISION_OPTIONS = {
    "conv-stem": {"patch_embed": "conv-stem"},
    "drop-path": {"drop_path": 0.3},
    "shifted-patches": {"shifted_patches": True},
    "locality-attention": {"locality_attention": True},
    "conv-stem-drop-path-lsa": {"patch_embed": "conv-stem", "drop_path": 0.3, "locality_attention": True},
}


@pytest.mark.parametrize("options", VISION_OPTIONS.values(), ids=VISION_OPTIONS.keys())
def test_explanations_of_every_vision_option(options):
    """Rollout, [CLS] maps, decoder cross-attention and ITM Grad-CAM read the ViT through its attention weights and
    tokens, which every model.patch_embed / drop_path / shifted_patches / locality_attention keeps."""
    model = _model(itm_weight=1.0, **options)
    image = _image(model)
    attn = vit_attention(model, image)
    assert attn.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(attn, vit_attention(model, image))  # eval: drop path off
    heats = {f"rollout-{fusion}-{ratio}": attention_rollout(attn, fusion, ratio)
             for fusion in ("mean", "max", "min") for ratio in (0.0, 0.5)}
    heats["gradcam"] = itm_gradcam(model, image, "a red circle on the left")
    heats["token"] = decoder_cross_attention(model, image, [1037, 2417, 4418, 102]).token_map(1)
    for name, heat in heats.items():
        assert heat.shape == (4, 4) and np.isfinite(heat).all(), name
        assert heat.min() >= 0.0 and heat.max() <= 1.0, name
    maps = cls_attention_maps(attn)
    assert maps.shape == (2, 2, 4, 4) and np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())


# --- overlays --------------------------------------------------------------------------------------
def test_overlay_heatmap():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    heat = rng.random((4, 4))
    out = overlay_heatmap(image, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    np.testing.assert_array_equal(overlay_heatmap(Image.fromarray(image), heat, alpha=0.0), image)
    hot = overlay_heatmap(image, np.ones((2, 2)), alpha=1.0, colormap="hot")
    assert (hot == 255).all()  # the top of 'hot' is white
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        overlay_heatmap(image, heat, colormap="viridis")


def test_tensor_to_uint8_undoes_preprocessing():
    from blipcore.data import build_transform

    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    tensor = build_transform(16, train=False)(Image.fromarray(pixels))
    out = tensor_to_uint8(tensor)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).max() <= 1
    np.testing.assert_array_equal(tensor_to_uint8(tensor[None]), out)
