"""Attention against torch's own MultiheadAttention, and the explicit path against SDPA; drop path and
Locality Self-Attention."""

import math

import pytest
import torch
from torch import nn

from blipcore.model.layers import Attention, Block, DropPath, drop_path, drop_path_rates


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
    """blipcore.model.layers' CPU rule: bf16 attention over at most CPU_MATH_MAX_KEYS keys gives exactly torch's math
    backend (several times faster there than the fused kernel); longer attention, and fp32, the default kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blipcore.model import layers

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


# --- drop path (stochastic depth) --------------------------------------------------------------------------------
def test_drop_path_is_the_identity_in_evaluation_and_at_rate_0():
    x = torch.randn(8, 5, 4)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    module = DropPath(0.5).eval()
    assert torch.equal(module(x), x)
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop path rate"):
            DropPath(rate)


def test_drop_path_zeroes_whole_samples_at_its_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    rate, samples = 0.3, 20_000
    out = DropPath(rate).train()(torch.ones(samples, 3, 4))
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 1 / (1 - rate)).all(dim=1)
    assert torch.all(dropped | kept)  # every sample is either zeroed whole or kept whole, scaled by 1 / keep
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.015)  # binomial sd 0.0032
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # E[out] = x


def test_drop_path_rates_rise_linearly_from_0_to_the_rate():
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert drop_path_rates(0.2, 1) == [0.0]
    assert drop_path_rates(0.0, 3) == [0.0, 0.0, 0.0]


def test_block_drop_path_drops_both_residual_branches_per_sample():
    torch.manual_seed(0)
    block = Block(16, 2, drop_path=0.6)
    plain = Block(16, 2)
    plain.load_state_dict(block.state_dict())  # drop path adds no parameter
    assert isinstance(plain.drop_path, nn.Identity) and block.drop_path.rate == 0.6
    x = torch.randn(256, 5, 16)
    block.eval()
    plain.eval()
    torch.testing.assert_close(block(x)[0], plain(x)[0], rtol=0, atol=0)  # identity in evaluation

    block.train()
    out, _ = block(x)
    both_dropped = (out == x).flatten(1).all(dim=1)  # both branches dropped: the block passes x through
    assert 0.2 < both_dropped.float().mean().item() < 0.5  # P = 0.6^2 = 0.36
    with torch.no_grad():  # a sample whose attention branch alone was dropped: x + MLP branch / keep
        attn_dropped = x + block.mlp(block.norm2(x)) / 0.4
    assert ((out - attn_dropped).abs().flatten(1).amax(dim=1) < 1e-5).any()


# --- Locality Self-Attention -------------------------------------------------------------------------------------
def test_locality_attention_has_an_exact_zero_diagonal_and_its_fused_path_matches_the_explicit_one():
    torch.manual_seed(3)
    attn = Attention(32, 4, locality=True).eval()
    with torch.no_grad():
        attn.scale.copy_(torch.tensor([0.05, 0.2, 0.35, 1.0]))  # learned, away from the initial 1/sqrt(8)
    x = torch.randn(2, 7, 32)
    fused, none = attn(x)
    explicit, weights = attn(x, need_weights=True)
    assert none is None and weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    # with a padding mask too: masked keys and the diagonal both get exactly 0
    keep = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.bool)[:, None, None, :]
    fused, _ = attn(x, attn_mask=keep)
    explicit, weights = attn(x, attn_mask=keep, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert torch.all(weights[0, :, :, 5:] == 0) and torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)


def test_locality_attention_at_init_is_standard_attention_without_the_diagonal():
    torch.manual_seed(4)
    attn = Attention(32, 4, locality=True).eval()
    torch.testing.assert_close(attn.scale.detach(), torch.full((4,), 1 / math.sqrt(8)))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():  # by hand: softmax(Q K^T / sqrt(d)) with -inf on the diagonal
        q, (k, v) = attn._split_heads(attn.q(x)), attn._keys_values(x)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        scores = scores.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
        expected_w = scores.softmax(dim=-1)
        expected = attn.proj((expected_w @ v).transpose(1, 2).reshape(2, 6, 32))
        out, weights = attn(x, need_weights=True)
        fused, _ = attn(x)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_locality_attention_learns_its_scale_and_runs_in_bf16():
    torch.manual_seed(5)
    attn = Attention(32, 4, locality=True)
    x = torch.randn(3, 9, 32)
    attn(x)[0].square().sum().backward()
    assert attn.scale.grad is not None and torch.all(attn.scale.grad != 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 scale must not upcast q
        low, _ = attn.eval()(x)
        low_w, weights = attn(x, need_weights=True)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), attn(x)[0].detach(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(low, low_w, atol=0.02, rtol=0.02)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    with pytest.raises(ValueError, match="self-attention"):
        Attention(32, 4, context_dim=16, locality=True)
