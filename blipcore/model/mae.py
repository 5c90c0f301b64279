"""Masked autoencoder (MAE) pretraining of the ViT: He et al. 2021, "Masked Autoencoders Are Scalable Vision
Learners", as facebookresearch/mae's models_mae.py computes it.

Why: on Flickr8k's 6,000 training photos a ViT trained from random weights barely aligns with text, and ITC and LM
teach it only what the captions say about each photo. MAE gives the encoder an objective of its own, on the same
in-domain photos, before it reads a caption. Of the self-supervised image objectives it is the one that fits here:

- it trains the project's plain ViT as it is: SLIP's SimCLR term needs a second augmented view of every image (a
  second augmentation pipeline in the data loader) and a projection head that is thrown away afterwards;
- a step is cheap: the encoder reads only the visible 25 % of the patches and [CLS], about a quarter of a full
  image's tokens, and the decoder that fills in the hidden patches is small (blipcore.model.flops counts both);
- it chains into BLIP as decoder pretraining (model.text_only) does: an MAE run (model.mae) keeps the encoder's
  parameter names (`visual_encoder.*`), so a full recipe starts from its checkpoint with
  train.init = "{run:<stage>/<variant>}" and trains its text towers from scratch; the MAE decoder is left behind
  (blipcore.runs.rundir.load_init_weights).

A step: each image's patches are ordered by per-sample noise and the first round((1 - mask_ratio) N) are kept
(`random_masking`); the ViT embeds every patch, adds their positions, drops the hidden ones, puts [CLS] in front and
runs its blocks on what is left (`encode_visible`); the decoder maps those tokens to its own width, puts a learned mask
token at each hidden position, adds positions of its own, runs its blocks on all 1 + N tokens and predicts the pixels
of every patch (`MAEDecoder`); the loss is the mean squared error on the hidden patches only (`mae_loss`), against each
patch's pixels normalised by their own mean and variance (`patch_targets`: MAE's norm_pix_loss, which the paper found
gives the better representation).

A visible token must depend on its own patch's pixels only, or the task leaks: model.patch_embed = "conv-stem"
(overlapping convolutions) and model.shifted_patches (half of each neighbour's pixels) are refused with model.mae
(blipcore.model.config).

Differences from the reference, each for a reason: the decoder's positional embeddings are learned, as the ViT's
are (MAE fixes both to sin-cos tables); the prediction head runs on the patch tokens only (MAE's prediction for
[CLS] is discarded anyway); in evaluation the masks come from a fixed seed (`EVAL_MASK_SEED`), so the validation loss
of every checkpoint is measured on the same hidden patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Block, init_weights
from .vision import VisionTransformer

EVAL_MASK_SEED = 0  # the masks of a model in eval mode: every evaluation hides the same patches


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, S, S) -> (B, N, p*p*C): each patch's pixels, patches row by row as the ViT's tokens, channels last."""
    b, c, height, width = images.shape
    p = patch_size
    x = images.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (height // p) * (width // p), p * p * c)


def patch_targets(images: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """What the decoder predicts (B, N, p*p*C): each patch's pixels normalised by their own mean and (unbiased)
    variance, MAE's norm_pix_loss: a patch's local structure is learned, not its absolute brightness."""
    target = patchify(images.float(), patch_size)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


@dataclass
class Masking:
    """Which patches of each image the encoder sees."""

    keep: Tensor  # (B, K) indices of the visible patches
    mask: Tensor  # (B, N) 1.0 at the hidden patches, 0.0 at the visible ones
    restore: Tensor  # (B, N) the permutation that puts [visible patches, hidden patches] back in patch order


def random_masking(batch: int, patches: int, visible: int, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> Masking:
    """Keep `visible` of `patches` patches per image, a different random set for each image: the patches ordered
    by per-sample uniform noise (argsort), the first `visible` kept."""
    noise = torch.rand(batch, patches, device=device, generator=generator)  # (B, N)
    shuffle = noise.argsort(dim=1)  # kept patches first
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, patches, device=device)
    mask[:, :visible] = 0
    return Masking(keep=shuffle[:, :visible], mask=mask.gather(1, restore), restore=restore)


def encode_visible(vit: VisionTransformer, images: Tensor, keep: Tensor) -> Tensor:
    """The ViT on the visible patches only: images (B, 3, S, S), keep (B, K) -> tokens (B, 1 + K, width), [CLS]
    first, then the kept patches in `keep`'s order. With every patch kept in order it is `vit(images)[0]`."""
    x = vit.patch_tokens(images) + vit.pos_embed[:, 1:]  # (B, N, width)
    x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, width)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, width)
    tokens, _ = vit.encode_tokens(torch.cat([cls, x], dim=1))
    return tokens


class MAEDecoder(nn.Module):
    """MAE's light decoder: the encoder's tokens and a mask token at each hidden position, with positions of its
    own, through model.mae_decoder_depth pre-norm blocks of model.mae_decoder_width, then a Linear to each patch's
    p*p*3 pixels. Only pretraining uses it: a full recipe started from an MAE run leaves it behind."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width, patches = cfg.mae_decoder_width, (cfg.image_size // cfg.patch_size) ** 2
        self.embed = nn.Linear(cfg.vision_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + patches, width))
        self.blocks = nn.ModuleList(Block(width, cfg.mae_decoder_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.mae_decoder_depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, 3 * cfg.patch_size**2)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: Tensor, restore: Tensor) -> Tensor:
        """The encoder's tokens (B, 1 + K, vision_width), [CLS] first, and the masking's `restore` (B, N) ->
        predicted pixels of every patch (B, N, p*p*3), in patch order."""
        x = self.embed(tokens)  # (B, 1 + K, width)
        batch, patches = restore.shape
        hidden = self.mask_token.expand(batch, 1 + patches - x.shape[1], -1)  # (B, N - K, width)
        x_ = torch.cat([x[:, 1:], hidden], dim=1)  # (B, N, width): visible patches, then hidden ones
        x_ = x_.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed  # (B, 1 + N, width)
        for block in self.blocks:
            x, _ = block(x)
        return self.pred(self.norm(x[:, 1:]))  # (B, N, p*p*3)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error on the hidden patches only: pred, target (B, N, D), mask (B, N) 1.0 where hidden ->
    the mean over the hidden patches of each one's mean squared error over its D pixel values (in fp32)."""
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def masked_autoencoder_loss(vit: VisionTransformer, decoder: MAEDecoder, images: Tensor, visible: int,
                            generator: torch.Generator | None = None) -> Tensor:
    """One MAE step's loss on images (B, 3, S, S): `visible` random patches per image encoded, all reconstructed,
    the hidden ones scored against their normalised pixels."""
    masking = random_masking(images.shape[0], vit.grid**2, visible, images.device, generator)
    pred = decoder(encode_visible(vit, images, masking.keep), masking.restore)
    return mae_loss(pred, patch_targets(images, vit.patch_size), masking.mask)
