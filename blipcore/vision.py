"""ViT image encoder: Conv2d patch embedding, [CLS] token, learned positions, pre-norm blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Block, init_weights


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, cfg.vision_width))
        self.blocks = nn.ModuleList(
            Block(cfg.vision_width, cfg.vision_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.vision_depth)
        )
        self.norm = nn.LayerNorm(cfg.vision_width)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """images: (B, 3, S, S) normalised -> tokens (B, 1 + (S/p)^2, width), [CLS] first.

        With need_weights, also the self-attention weights of every block, each (B, H, 1+N, 1+N).
        """
        if images.shape[-1] != self.grid * self.patch_size or images.shape[-2] != self.grid * self.patch_size:
            raise ValueError(
                f"expected images of {self.grid * self.patch_size}x{self.grid * self.patch_size}, "
                f"got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        attentions = [] if need_weights else None
        for block in self.blocks:
            x, weights = block(x, need_weights=need_weights)
            if attentions is not None:
                attentions.append(weights.self_attn)
        return self.norm(x), attentions
