"""Attention against torch's own MultiheadAttention, and the explicit path against SDPA."""

import torch
from torch import nn

from blipcore.layers import Attention


def _attention_pair(dim=32, heads=4):
    torch.manual_seed(0)
    ours = Attention(dim, heads).eval()
    reference = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        reference.out_proj.weight.copy_(ours.proj.weight)
        reference.out_proj.bias.copy_(ours.proj.bias)
    return ours, reference


def test_self_attention_equals_torch_multihead_attention():
    ours, reference = _attention_pair()
    x = torch.randn(2, 7, 32)
    expected, expected_w = reference(x, x, x, need_weights=True, average_attn_weights=False)
    out, _ = ours(x)
    out_w, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_w, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_w, atol=1e-5, rtol=1e-5)


def test_padding_mask_equals_torch_multihead_attention():
    ours, reference = _attention_pair()
    x = torch.randn(2, 6, 32)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected, _ = reference(x, x, x, key_padding_mask=~keep)
    out, _ = ours(x, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_explicit_path_equals_sdpa_causal_and_cross():
    torch.manual_seed(1)
    attn = Attention(32, 4, context_dim=48).eval()
    x, ctx = torch.randn(3, 5, 32), torch.randn(3, 9, 48)
    fused, _ = attn(x, context=ctx)
    explicit, weights = attn(x, context=ctx, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 4, 5, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 5))

    self_attn = Attention(32, 4).eval()
    fused, _ = self_attn(x, is_causal=True)
    explicit, weights = self_attn(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert torch.all(weights.triu(1) == 0)


def test_cached_self_attention_equals_full():
    torch.manual_seed(2)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 6, 32)
    full, _ = attn(x, is_causal=True)
    cache: dict = {}
    first, _ = attn(x[:, :3], is_causal=True, cache=cache)
    steps = [first] + [attn(x[:, i : i + 1], is_causal=True, cache=cache)[0] for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache["k"].shape == (2, 4, 6, 8)


def test_short_attention_on_a_cpu_in_bf16_runs_the_math_backend_and_long_attention_the_fused_kernel():
    """blipcore.layers' CPU rule: bf16 attention over at most CPU_MATH_MAX_KEYS keys gives exactly torch's math
    backend (several times faster there than the fused kernel); longer attention, and fp32, the default kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blipcore import layers

    torch.manual_seed(2)
    attn = Attention(64, 4).eval()
    for keys in (layers.CPU_MATH_MAX_KEYS, layers.CPU_MATH_MAX_KEYS + 1):
        x = torch.randn(2, keys, 64)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours, _ = attn(x, is_causal=True)
            q = attn._split_heads(attn.q(x))
            k, v = attn._keys_values(x)
            with sdpa_kernel(SDPBackend.MATH) if keys <= layers.CPU_MATH_MAX_KEYS else sdpa_kernel(
                    [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            expected = attn.proj(expected.transpose(1, 2).reshape(2, keys, -1))
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected), keys
    fp32, _ = attn(torch.ones(1, 3, 64))  # outside autocast: the fused kernel, as ever
    with torch.no_grad():
        torch.testing.assert_close(fp32, attn(torch.ones(1, 3, 64), need_weights=True)[0])
