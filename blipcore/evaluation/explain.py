"""Where the model looks: ViT attention rollout, per-token decoder cross-attention, ITM Grad-CAM, overlays.

Every function takes a BLIP model in eval mode and one preprocessed image, (3, S, S) or (1, 3, S, S),
and returns numpy arrays or small dataclasses that the dashboard draws. N = grid**2 image patches,
grid = S / patch_size; image token 0 is the ViT's [CLS]. Heat maps come back in [0, 1], divided by
their maximum rather than min-max stretched: an untrained model that looks everywhere shows up as a
flat map, not as amplified noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.transforms import denormalize
from ..model.blip import BLIP
from ..model.tokenizer import load_tokenizer, tokenize_captions

HEAD_FUSIONS = ("mean", "max", "min")


def _one_image(model: BLIP, image: Tensor) -> Tensor:
    """(3, S, S) or (1, 3, S, S) -> (1, 3, S, S) on the model's device and dtype."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected one image of shape (3, S, S) or (1, 3, S, S), got {tuple(image.shape)}")
    param = next(model.parameters())
    return image.to(device=param.device, dtype=param.dtype)


def _grid(num_patches: int) -> int:
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} image patches do not form a square grid")
    return grid


def _unit_scale(heat: np.ndarray) -> np.ndarray:
    """Divide a non-negative map by its maximum (all zeros stay zeros)."""
    peak = heat.max()
    return heat / peak if peak > 0 else np.zeros_like(heat)


# --- ViT self-attention --------------------------------------------------------------------------
@torch.no_grad()
def vit_attention(model: BLIP, image: Tensor) -> np.ndarray:
    """Raw ViT self-attention of one image: (layers, heads, 1+N, 1+N), rows sum to 1."""
    _, attentions = model.visual_encoder(_one_image(model, image), need_weights=True)
    return torch.stack(attentions)[:, 0].float().cpu().numpy()


def _attention_stack(attentions: np.ndarray | Sequence[np.ndarray | Tensor]) -> tuple[np.ndarray, int]:
    """Validate ViT attention as returned by `vit_attention` -> (layers, heads, 1+N, 1+N) float64, grid."""
    if len(attentions) == 0:
        raise ValueError("no attention layers given")
    stack = np.stack([np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a) for a in attentions])
    if stack.ndim != 4 or stack.shape[-1] != stack.shape[-2]:
        raise ValueError(f"expected attention of shape (layers, heads, 1+N, 1+N), got {stack.shape}")
    return stack.astype(np.float64), _grid(stack.shape[-1] - 1)


def attention_rollout(
    attentions: np.ndarray | Sequence[np.ndarray | Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) as jacobgil/vit-explain computes it -> (grid, grid) in [0, 1].

    attentions: (layers, heads, 1+N, 1+N), e.g. from `vit_attention`. Per layer: fuse heads
    (mean/max/min), zero the lowest `discard_ratio` share of the fused matrix's entries (never flat
    index 0, the [CLS]->[CLS] weight, as in vit-explain), average with the identity for the residual
    path, renormalise rows, and multiply onto the layers below. The [CLS] row over the patches is the map.
    (vit-explain's `a / a.sum(dim=-1)` broadcasts over columns; rows are renormalised here as intended.)
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    stack, grid = _attention_stack(attentions)
    fused = getattr(stack, head_fusion)(axis=1)  # (layers, T, T)
    tokens = fused.shape[-1]
    identity = np.eye(tokens)
    result = identity
    for layer in fused:
        lowest = np.argsort(layer, axis=None, kind="stable")[: int(layer.size * discard_ratio)]
        layer.flat[lowest[lowest != 0]] = 0.0
        a = (layer + identity) / 2
        result = (a / a.sum(axis=-1, keepdims=True)) @ result
    return _unit_scale(result[0, 1:]).reshape(grid, grid)


def cls_attention_maps(attentions: np.ndarray | Sequence[np.ndarray | Tensor]) -> np.ndarray:
    """The [CLS] query's raw attention over the patches, per layer and head: (layers, heads, grid, grid)."""
    stack, grid = _attention_stack(attentions)
    return stack[:, :, 0, 1:].reshape(*stack.shape[:2], grid, grid)


# --- decoder cross-attention ---------------------------------------------------------------------
@dataclass
class TokenAttention:
    """Cross-attention of each generated token over the image.

    tokens: word pieces of the caption, one per step. maps: (steps, layers, heads, grid, grid), the
    raw weights on the patches. cls_weight: (steps, layers, heads), the weight on the image [CLS]
    token; maps summed over the grid plus cls_weight is 1 for every step, layer and head.
    """

    tokens: list[str]
    maps: np.ndarray
    cls_weight: np.ndarray

    def token_map(self, step: int, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """(grid, grid) in [0, 1] for one step; averages over all layers / heads where None."""
        heat = self.maps[step]  # (layers, heads, grid, grid)
        heat = heat.mean(axis=0) if layer is None else heat[layer]
        heat = heat.mean(axis=0) if head is None else heat[head]
        return _unit_scale(heat)


@torch.no_grad()
def decoder_cross_attention(
    model: BLIP, image: Tensor, token_ids: Sequence[int] | Tensor, use_prompt: bool = True
) -> TokenAttention:
    """Decoder cross-attention for a generated caption `token_ids` (T word-piece ids, as generated,
    without [DEC] or the prompt) -> TokenAttention with T steps.

    One teacher-forced pass over [DEC] (+ prompt when use_prompt) + token_ids[:-1], with a causal
    decoder exactly what incremental decoding computed. The map of token t is the attention of the
    query at position prefix_len - 1 + t, the one whose output PREDICTED token t: it shows where the
    decoder looked when it chose that word (not where it looks after reading it).
    """
    if model.cfg.text_only:
        raise ValueError("this model is a text-only language model (model.text_only): its decoder never looks at "
                         "the image")
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).tolist()
    if not ids:
        raise ValueError("token_ids is empty: there is no generated token to explain")
    pixels = _one_image(model, image)
    image_embeds, _ = model.visual_encoder(pixels)
    prefix = model.decoder_prefix(1, pixels.device)
    if not use_prompt:
        prefix = prefix[:, :1]
    inputs = torch.cat([prefix, torch.tensor([ids[:-1]], dtype=torch.long, device=pixels.device)], dim=1)
    _, attentions = model.decode_step(inputs, image_embeds, need_weights=True)
    # (layers, heads, L, 1+N) -> the predicting positions -> (steps, layers, heads, 1+N)
    weights = torch.stack(attentions)[:, 0, :, prefix.shape[1] - 1 :].permute(2, 0, 1, 3).float().cpu().numpy()
    grid = _grid(weights.shape[-1] - 1)
    return TokenAttention(
        tokens=load_tokenizer().convert_ids_to_tokens(ids),
        maps=weights[..., 1:].reshape(*weights.shape[:3], grid, grid),
        cls_weight=weights[..., 0],
    )


# --- ITM Grad-CAM --------------------------------------------------------------------------------
def itm_gradcam(model: BLIP, image: Tensor, caption: str, layer: int = -1) -> np.ndarray:
    """Grad-CAM of the ITM "match" logit on the text encoder's cross-attention at block `layer`
    -> (grid, grid) in [0, 1].

    As in ALBEF / BLIP (LAVIS `compute_gradcam`): attention * relu(d logit / d attention), image
    [CLS] column dropped, mean over heads, then mean over the text queries. Those are [ENC] and the
    caption's word pieces ([SEP] and padding excluded); ALBEF averages the word pieces only, but it
    reads a middle block: at the last block only [ENC]'s cross-attention reaches the ITM head (no
    later layer mixes tokens), so without [ENC] the default layer=-1 would always give zeros.
    Gradients come from torch.autograd.grad on the image tokens' graph only, so parameters' .grad
    are left untouched and frozen weights do not matter.
    """
    if not model.use_itm:
        raise ValueError("this model has no ITM head (model.itm_weight is 0): Grad-CAM needs the ITM logit")
    depth = len(model.text_encoder.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range for a text encoder of {depth} blocks")
    pixels = _one_image(model, image)
    tokens = tokenize_captions([caption], model.cfg.max_text_len)
    ids, mask = tokens["input_ids"].to(pixels.device), tokens["attention_mask"].to(pixels.device)
    words = ids.shape[1] - 2  # [CLS] caption [SEP], one caption so no padding
    if words < 1:
        raise ValueError("caption is empty: Grad-CAM needs at least one word")
    with torch.no_grad():
        image_embeds, _ = model.visual_encoder(pixels)
    with torch.enable_grad():
        image_embeds.requires_grad_(True)  # puts the cross-attention weights in the graph
        enc_ids = ids.clone()
        enc_ids[:, 0] = model.ids["enc"]
        hidden, attentions = model.text_encoder(enc_ids, mask, image_embeds=image_embeds, need_weights=True)
        match_logit = model.itm_head(hidden[:, 0])[0, 1]
        cam = attentions[layer]  # (1, heads, L, 1+N)
        (grad,) = torch.autograd.grad(match_logit, cam)
    heat = (cam.detach() * grad.clamp(min=0))[0, :, : 1 + words, 1:]  # (heads, [ENC] + words, N)
    heat = heat.mean(dim=(0, 1)).float().cpu().numpy()
    grid = _grid(heat.size)
    return _unit_scale(heat).reshape(grid, grid)


# --- overlays ------------------------------------------------------------------------------------
def _jet(x: np.ndarray) -> np.ndarray:
    """Piecewise-linear approximation of matplotlib's 'jet': blue -> cyan -> yellow -> red."""
    return np.clip(1.5 - np.abs(4.0 * x[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def _hot(x: np.ndarray) -> np.ndarray:
    """'hot': black -> red -> yellow -> white."""
    return np.clip(3.0 * x[..., None] - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)


COLORMAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"jet": _jet, "hot": _hot}


def tensor_to_uint8(image_tensor: Tensor) -> np.ndarray:
    """A preprocessed (normalised) image tensor (3, H, W) or (1, 3, H, W) -> displayable (H, W, 3) uint8."""
    if image_tensor.dim() == 4 and image_tensor.shape[0] == 1:
        image_tensor = image_tensor[0]
    if image_tensor.dim() != 3 or image_tensor.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image_tensor.shape)}")
    pixels = denormalize(image_tensor.detach().float().cpu()).permute(1, 2, 0).numpy()
    return np.round(pixels * 255).astype(np.uint8)


def overlay_heatmap(
    image: Image.Image | np.ndarray, heat: np.ndarray, alpha: float = 0.5, colormap: str = "jet"
) -> np.ndarray:
    """Blend a (g, g) heat map in [0, 1] over an image: (H, W, 3) uint8.

    The map is upsampled bilinearly to the image size (PIL), coloured with `colormap` ('jet' or
    'hot') and mixed as (1 - alpha) * image + alpha * colour; alpha=0 gives the image back.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {colormap!r}")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or not np.isfinite(heat).all():
        raise ValueError(f"expected a finite 2-D heat map, got shape {heat.shape}")
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    upsampled = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colour = COLORMAPS[colormap](np.clip(upsampled, 0.0, 1.0)) * 255.0
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
