"""Transformer building blocks shared by the vision and text towers.

`Attention` runs through `F.scaled_dot_product_attention` (the fused path) unless attention weights
are asked for, in which case it computes softmax(QK^T / sqrt(d)) explicitly and returns the weights:
the dashboard's attention maps and Grad-CAM need them, training does not. Both paths take the same
masks and give the same output (tests/test_layers.py checks that, and checks against
torch.nn.MultiheadAttention).

Two small-data remedies for the ViT live here too (tests/test_vision_options.py): `DropPath`, stochastic
depth on a block's residual branches, and Locality Self-Attention (`Attention(..., locality=True)`).

On a CPU in bf16 or fp16 (autocast, the inference copy), torch's fused (flash) kernel is several times slower
than its math backend for the short sequences of the CPU presets and faster for long ones, so attention over at
most CPU_MATH_MAX_KEYS keys runs the math backend there.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# A per-layer cache is a plain dict: {"k": (B, H, T, head_dim), "v": ...}. Self-attention appends the
# new step's keys/values to it; cross-attention fills it once with the image tokens' keys/values.
LayerCache = dict[str, Tensor]
# Below this many keys the math backend wins on a CPU in bf16 (the CPU presets' 37 image tokens and 40 text
# tokens); the ViT-B/16 size's 197 keys favour the fused kernel.
CPU_MATH_MAX_KEYS = 64


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention when `context` is given.

    locality: Locality Self-Attention (Lee et al. 2021, "Vision Transformer for Small-Size Datasets";
    as aanna0701/SPT_LSA_ViT computes it): no query attends to its own key (the diagonal is masked),
    and the softmax scale is learned, one per head, starting at the usual 1/sqrt(head_dim). Both
    sharpen the attention, which in a ViT trained on little data stays smooth and is dominated by
    each token's attention to itself.
    """

    def __init__(
        self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0, locality: bool = False
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if locality and context_dim is not None:
            raise ValueError("locality self-attention masks each token's own key: it needs self-attention")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.locality = locality
        if locality:  # the learned inverse temperature of each head, multiplying Q K^T
            self.scale = nn.Parameter(torch.full((heads,), self.head_dim**-0.5))

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # (B, N, H*hd) -> (B, H, N, hd)
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: LayerCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, Lq, dim); context: (B, Lk, context_dim) for cross-attention.

        attn_mask: bool, broadcastable to (B, H, Lq, Lk), True where a query may attend.
        is_causal: each query attends to keys at its own position or earlier; with a cache holding T
        past steps, query i sits at position T + i.
        Returns the output (B, Lq, dim) and, when need_weights, the weights (B, H, Lq, Lk).
        """
        q = self._split_heads(self.q(x))
        if context is None:
            k, v = self._keys_values(x)
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._keys_values(context)
            if cache is not None:
                cache["k"], cache["v"] = k, v

        q_len, k_len = q.shape[2], k.shape[2]
        if self.locality:
            # Learned scale on the queries (SDPA then runs with scale=1); query i, at position k_len - q_len + i,
            # may attend to every key but its own.
            q = q * self.scale.to(q.dtype).view(1, -1, 1, 1)
            positions = torch.arange(k_len, device=x.device)
            not_self = positions[None, :] != positions[k_len - q_len :, None]  # (Lq, Lk)
            attn_mask = not_self if attn_mask is None else attn_mask & not_self
        if is_causal and (q_len != k_len or attn_mask is not None or need_weights):
            # Bottom-right aligned causal mask: query i (of q_len) sees keys up to k_len - q_len + i.
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).tril(k_len - q_len)
            attn_mask = causal if attn_mask is None else attn_mask & causal
            is_causal = False

        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
            if not self.locality:  # (LSA's learned scale is on the queries already)
                scores = scores / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            short_on_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and \
                k_len <= CPU_MATH_MAX_KEYS
            with sdpa_kernel(SDPBackend.MATH) if short_on_cpu else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                     is_causal=is_causal, scale=1.0 if self.locality else None)
        out = out.transpose(1, 2).reshape(x.shape[0], q_len, -1)
        return self.proj(out), weights


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016, as timm's `drop_path`): in training, zero whole samples of a
    residual branch's output x (B, ...) with probability `rate` and scale the rest by 1 / (1 - rate),
    so the expectation is unchanged; the identity in evaluation."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # one draw per sample
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """`drop_path` as a module, for a residual branch of a Block."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop path rates rising linearly from 0 at the first block to `rate` at the last (as timm's
    `torch.linspace(0, rate, depth)`): early blocks, which every later one builds on, are dropped least."""
    # plain Python, not torch.linspace: models are also built on the meta device (checkpoint loading)
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


@dataclass
class BlockAttention:
    """Attention weights of one block, each (B, H, Lq, Lk); None unless asked for."""

    self_attn: Tensor | None = None
    cross_attn: Tensor | None = None


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP.

    drop_path: stochastic depth rate of each residual branch; locality: Locality Self-Attention in the
    self-attention (see Attention). Both are off for the text towers.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        context_dim: int | None = None,
        drop_path: float = 0.0,
        locality: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout, locality=locality)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: dict[str, LayerCache] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, BlockAttention]:
        """cache: {"self": LayerCache, "cross": LayerCache} for incremental decoding."""
        h, self_w = self.attn(
            self.norm1(x),
            attn_mask=attn_mask,
            is_causal=is_causal,
            cache=None if cache is None else cache["self"],
            need_weights=need_weights,
        )
        x = x + self.drop_path(self.drop(h))
        cross_w = None
        if context is not None:
            if not self.has_cross:
                raise ValueError("this block was built without cross-attention")
            h, cross_w = self.cross_attn(
                self.norm_cross(x),
                context=context,
                attn_mask=context_mask,
                cache=None if cache is None else cache["cross"],
                need_weights=need_weights,
            )
            x = x + self.drop_path(self.drop(h))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, BlockAttention(self_w, cross_w)


def init_weights(module: nn.Module) -> None:
    """BERT/ViT-style initialisation: N(0, 0.02) truncated for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
