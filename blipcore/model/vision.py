"""ViT image encoder: Conv2d patch embedding, [CLS] token, learned positions, pre-norm blocks.

Small-data remedies, each a ModelConfig option and off by default (then the encoder, its parameter
names included, is the plain ViT): a convolutional stem (`patch_embed = "conv-stem"`) or Shifted Patch
Tokenization (`shifted_patches`) in place of the patchify Conv2d, stochastic depth (`drop_path`) and
Locality Self-Attention (`locality_attention`) in the blocks (blipcore.model.layers). Every option keeps the
token count, (S/p)^2 patches and [CLS].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Block, drop_path_rates, init_weights


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of the conv stem's log2(patch_size) stride-2 convolutions, doubling up to `width`
    (width 256, patch 16: 32, 64, 128, 256)."""
    n = int(math.log2(patch_size))
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"a conv stem needs a patch size that is a power of 2 (>= 2), got {patch_size}")
    return [max(1, width // 2 ** (n - 1 - i)) for i in range(n)]


class ConvStem(nn.Module):
    """Convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): 3x3
    stride-2 convolutions, each with a norm and ReLU, halve the image down to the patch grid, then a 1x1
    convolution maps to the width. Its overlapping, growing receptive fields replace the patchify
    convolution's hard cut into patches, which makes a ViT easier to optimise.

    Xiao et al. use BatchNorm; this stem uses GroupNorm with one group (each image normalised over its
    own channels and positions) so that a token never depends on the other images of the batch: batch
    statistics would let ITC's in-batch negatives leak into each other's features (what MoCo's shuffled
    BN guards against), differ between DDP ranks and between training batches and the dashboard's single
    images, and the momentum encoder's copy would keep running statistics that its parameters' moving
    average never touches. GroupNorm computes the same thing in training and evaluation, for any batch.
    """

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in = 3
        for channels in conv_stem_channels(patch_size, width):
            layers += [  # (no bias: the norm's shift takes its place)
                nn.Conv2d(channels_in, channels, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, channels),
                nn.ReLU(inplace=True),
            ]
            channels_in = channels
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels_in, width, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, (S/p)^2, width)."""
        return self.proj(self.convs(images)).flatten(2).transpose(1, 2)


class ShiftedPatchTokenizer(nn.Module):
    """Shifted Patch Tokenization (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"; as
    aanna0701/SPT_LSA_ViT computes it): the image and its 4 diagonal shifts by half a patch, zero
    padded, concatenated along channels (15), cut into patches, flattened, LayerNorm, Linear to the
    width. Each patch token then also sees half a patch of its diagonal neighbours: more spatial
    context per token than a ViT learns from a small data set on its own.
    """

    SHIFTS = 5  # the image and its 4 diagonal shifts

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = self.SHIFTS * 3 * patch_size**2
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, width)

    def shifted(self, images: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, 5C, S, S): the image, then its copies that hold at each pixel the pixel half a
        patch up-left, up-right, down-left and down-right of it (zeros beyond the border)."""
        s = self.patch_size // 2
        padded = F.pad(images, (s, s, s, s))
        height, width = images.shape[-2:]
        crops = [padded[..., top : top + height, left : left + width] for top, left in
                 ((0, 0), (0, 2 * s), (2 * s, 0), (2 * s, 2 * s))]  # left-up, right-up, left-down, right-down
        return torch.cat([images, *crops], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, (S/p)^2, width)."""
        x = self.shifted(images)
        b, c, height, width = x.shape
        p = self.patch_size
        # (B, C, g, p, g, p) -> (B, g, g, p, p, C) -> one row per patch, its pixels' channels innermost
        x = x.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.proj(self.norm(x.reshape(b, (height // p) * (width // p), p * p * c)))


def patch_embedding(cfg: ModelConfig) -> nn.Module:
    """The ViT's patch embedding that model.patch_embed and model.shifted_patches choose."""
    if cfg.shifted_patches:
        return ShiftedPatchTokenizer(cfg.patch_size, cfg.vision_width)
    if cfg.patch_embed == "conv-stem":
        return ConvStem(cfg.patch_size, cfg.vision_width)
    return nn.Conv2d(3, cfg.vision_width, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = patch_embedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, cfg.vision_width))
        self.blocks = nn.ModuleList(
            Block(cfg.vision_width, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout, drop_path=rate,
                  locality=cfg.locality_attention)
            for rate in drop_path_rates(cfg.drop_path, cfg.vision_depth)
        )
        self.norm = nn.LayerNorm(cfg.vision_width)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """images: (B, 3, S, S) normalised -> tokens (B, 1 + (S/p)^2, width), [CLS] first.

        With need_weights, also the self-attention weights of every block, each (B, H, 1+N, 1+N).
        """
        x = self.patch_tokens(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.encode_tokens(x, need_weights)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> patch embeddings (B, N, width), row by row, before [CLS] and the positions
        (a masked autoencoder adds the positions and drops the hidden patches before the blocks, blipcore.model.mae)."""
        if images.shape[-1] != self.grid * self.patch_size or images.shape[-2] != self.grid * self.patch_size:
            raise ValueError(
                f"expected images of {self.grid * self.patch_size}x{self.grid * self.patch_size}, "
                f"got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images)
        if isinstance(self.patch_embed, nn.Conv2d):  # the linear embedding: (B, width, g, g)
            x = x.flatten(2).transpose(1, 2)  # (B, N, width)
        return x

    def encode_tokens(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """Tokens with their positions (B, T, width), [CLS] first -> the blocks and the final norm: T is 1 + N for
        the whole image, fewer for a masked autoencoder's visible patches."""
        attentions = [] if need_weights else None
        for block in self.blocks:
            x, weights = block(x, need_weights=need_weights)
            if attentions is not None:
                attentions.append(weights.self_attn)
        return self.norm(x), attentions
