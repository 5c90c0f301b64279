"""Text towers: a bidirectional encoder and a causal decoder that cross-attends to image tokens.

As in BLIP, the encoder and decoder share the word embeddings. The encoder reads [CLS] caption [SEP]
and gives the [CLS] embedding for ITC; in multimodal mode ([ENC] first) it cross-attends to the
image tokens and feeds the ITM head. The decoder reads [DEC] prompt caption [SEP] causally,
cross-attending to the image tokens at every layer, and predicts the next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import Block, LayerCache, init_weights
from .vocabulary import CompactEmbedding


class TextEmbeddings(nn.Module):
    """Word + learned position embeddings. `words` may be shared with another tower."""

    def __init__(self, cfg: ModelConfig, words: nn.Embedding) -> None:
        super().__init__()
        self.words = words
        self.positions = nn.Embedding(cfg.max_text_len, cfg.text_width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, start: int = 0) -> Tensor:
        length = input_ids.shape[1]
        if start + length > self.positions.num_embeddings:
            raise ValueError(f"text of {start + length} tokens exceeds max_text_len={self.positions.num_embeddings}")
        positions = torch.arange(start, start + length, device=input_ids.device)
        return self.drop(self.words(input_ids) + self.positions(positions))


class TextEncoder(nn.Module):
    """Bidirectional encoder; cross-attends to image tokens when built with `multimodal=True`."""

    def __init__(self, cfg: ModelConfig, words: nn.Embedding, multimodal: bool) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(cfg, words)
        context_dim = cfg.vision_width if multimodal else None
        self.blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio, cfg.dropout, context_dim=context_dim)
            for _ in range(cfg.text_encoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.text_width)
        self.apply(init_weights)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_embeds: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """input_ids, attention_mask: (B, L) -> hidden states (B, L, width).

        With image_embeds (B, N, vision_width) the encoder is multimodal (ITM). With need_weights,
        also the cross-attention weights of each block, (B, H, L, N) (self-attention when text-only).
        """
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): pad keys are never attended
        x = self.embeddings(input_ids)
        attentions = [] if need_weights else None
        for block in self.blocks:
            x, weights = block(x, attn_mask=key_mask, context=image_embeds, need_weights=need_weights)
            if attentions is not None:
                attentions.append(weights.cross_attn if image_embeds is not None else weights.self_attn)
        return self.norm(x), attentions


@dataclass
class KVCache:
    """Keys/values of every decoder layer for incremental decoding.

    `layers[i]["self"]` grows by one step per generated token; `layers[i]["cross"]` holds the image
    tokens' keys/values, computed on the first step and reused.
    """

    layers: list[dict[str, LayerCache]] = field(default_factory=list)

    @classmethod
    def empty(cls, depth: int) -> KVCache:
        return cls([{"self": {}, "cross": {}} for _ in range(depth)])

    @property
    def length(self) -> int:
        """Number of tokens already decoded into the cache."""
        first = self.layers[0]["self"] if self.layers else {}
        return first["k"].shape[2] if "k" in first else 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search re-ranks and duplicates hypotheses)."""
        for layer in self.layers:
            for part in layer.values():
                for name in list(part):
                    part[name] = part[name].index_select(0, index)


class TextDecoder(nn.Module):
    """Causal decoder with cross-attention to image tokens and a language-model head."""

    def __init__(self, cfg: ModelConfig, words: nn.Embedding) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(cfg, words)
        self.blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio, cfg.dropout, context_dim=cfg.vision_width)
            for _ in range(cfg.text_decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.text_width)
        self.lm_head = nn.Linear(cfg.text_width, cfg.vocab_size)
        self.apply(init_weights)
        if cfg.tie_lm_head:
            self.lm_head.weight = words.weight

    def forward(
        self,
        input_ids: Tensor,
        image_embeds: Tensor | None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        return_hidden: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """input_ids: (B, L) new tokens; image_embeds: (B, N, vision_width), or None for a text-only language
        model (cross-attention skipped) -> logits (B, L, VOCAB_SIZE) over bert-base-uncased's ids, whatever the
        model's vocabulary,
        or with return_hidden the final hidden states (B, L, width) that `lm_head` maps to logits
        (training applies the vocabulary head only where there is a label to predict).

        Captions are right-padded, so the causal mask alone keeps real tokens from seeing padding
        (padded positions are excluded from the loss). With a cache holding T steps, the new tokens
        sit at positions T.., attend to the cached keys, and are appended to the cache.
        With need_weights, also the cross-attention weights of each block, (B, H, L, N).
        """
        start = 0 if cache is None else cache.length
        x = self.embeddings(input_ids, start=start)
        attentions = [] if need_weights else None
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x,
                is_causal=True,
                context=image_embeds,
                cache=None if cache is None else cache.layers[i],
                need_weights=need_weights,
            )
            if attentions is not None:
                attentions.append(weights.cross_attn)
        x = self.norm(x)
        if return_hidden:
            return x, attentions
        logits = self.lm_head(x)
        words = self.embeddings.words  # a compact vocabulary's logits go back on bert-base-uncased's ids
        return (words.expand(logits) if isinstance(words, CompactEmbedding) else logits), attentions
