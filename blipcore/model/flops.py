"""FLOPs of a BLIP training step, counted analytically as nanoGPT's `estimate_mfu` counts them.

Only matrix products count, as in `torch.utils.flop_counter`: multiplying an (m x k) by a (k x n)
matrix is 2mkn FLOPs, so n tokens through a Linear(d_in, d_out) cost 2 n d_in d_out. LayerNorm,
softmax, GELU, biases, embedding look-ups, the losses' elementwise work, ITC's B x B similarity
products and AdamW are left out (together well under 1% of a step at the presets' sizes).

Forward, with vision width d_v, text width d_t, MLP widths h = int(d * mlp_ratio), vocabulary V:

- ViT, per image, on its T_v = (S/p)^2 + 1 tokens (patches and [CLS]): the patch embedding, a
  Conv2d that is a Linear(3 p^2, d_v) on each patch, 2 (S/p)^2 3p^2 d_v; each block
  2 T_v (4 d_v^2 + 2 d_v h_v) for the query, key+value and output projections and the MLP, plus
  attention 4 T_v^2 d_v (Q K^T and weights x V, 2 T_v^2 d_v each).
  With model.patch_embed = "conv-stem" the patch embedding is its convolutions instead, each
  2 H_out W_out k^2 C_in C_out (k = 3 for the stride-2 ones, then the 1x1 one to d_v); with
  model.shifted_patches, a Linear(15 p^2, d_v) on each patch (its LayerNorm is not counted).
  model.drop_path and model.locality_attention change no product: a dropped branch is still computed
  (then multiplied by 0) and counted, so with drop path the count is an upper bound on the work that
  reaches the output; LSA's learned scale and diagonal mask are elementwise.
- text encoder for ITC, per caption of L tokens ([CLS] caption [SEP], padded as the batch is), each
  block 2 L (4 d_t^2 + 2 d_t h_t) + 4 L^2 d_t; the ITC projections 2 (d_v + d_t) embed_dim on the
  two [CLS] tokens.
- ITM: the same encoder, cross-attending to the image, on 3B pairs (B positives, 2B mined
  negatives). Cross-attention adds to each block the query and output projections 2 L 2 d_t^2,
  the image tokens' keys and values 2 T_v d_v 2 d_t and attention 4 L T_v d_t; the head 2 d_t 2.
- text decoder, per caption, on D = min(max_text_len, L + P) tokens ([DEC], the P prompt tokens,
  the caption after [CLS]): blocks as the multimodal encoder's. Causal self-attention is counted
  in full, as nanoGPT and the flash-attention kernels' counters do.
- LM head 2 d_t V at each target position only: the project runs it only where there is a label.
- momentum encoder (when on, with ITC): one more forward of the ViT and the ITC text encoder.
- MAE (model.mae, image pretraining; blipcore.model.mae), per image, with K = round((1 - mae_mask_ratio) (S/p)^2)
  visible patches and decoder width d_m, MLP width h_m: the patch embedding on every patch (as above: the hidden ones
  are dropped after it); the ViT blocks on the K + 1 visible tokens, 2 (K+1) (4 d_v^2 + 2 d_v h_v) + 4 (K+1)^2 d_v
  each; the decoder's embedding 2 (K+1) d_v d_m, its blocks on all 1 + N tokens (N = (S/p)^2), and its
  prediction head 2 N d_m 3p^2 on the patch tokens. No text is read.

Training: the backward pass computes, for each product, the gradient with respect to its input
and to its weight, two products of the forward one's size, so a step costs 3x the forward: for a
decoder-only transformer that is nanoGPT's 6 N T + 12 n_layer d T^2 per sequence of T tokens.
Two exceptions: the product that reads the images (the patch embedding, or the conv stem's first
convolution) needs no gradient for its input, 2x; the momentum encoder runs without gradients, 1x.
(Shifted Patch Tokenization reads the images through a LayerNorm with learned weights, whose gradient
needs its Linear's input gradient: 3x.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .config import BlipConfig, ModelConfig
from .tokenizer import load_tokenizer
from .vision import ShiftedPatchTokenizer, conv_stem_channels


def _model(cfg: BlipConfig | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, BlipConfig) else cfg


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of `tokens` rows through a Linear(d_in, d_out)."""
    return 2 * tokens * d_in * d_out


def block_flops(tokens: int, width: int, mlp_width: int, context_tokens: int = 0, context_width: int = 0) -> int:
    """Forward FLOPs of one transformer Block on one sequence; `context_tokens` > 0 adds cross-attention."""
    flops = linear_flops(tokens, width, 4 * width)  # query, key + value, output projection
    flops += 4 * tokens * tokens * width  # Q K^T and weights x V
    flops += linear_flops(tokens, width, mlp_width) + linear_flops(tokens, mlp_width, width)
    if context_tokens:
        flops += linear_flops(tokens, width, 2 * width)  # query and output projection
        flops += linear_flops(context_tokens, context_width, 2 * width)  # the context's keys and values
        flops += 4 * tokens * context_tokens * width
    return flops


def image_tokens(cfg: BlipConfig | ModelConfig) -> int:
    """Tokens the ViT produces per image: its patches and [CLS]."""
    m = _model(cfg)
    return (m.image_size // m.patch_size) ** 2 + 1


def prompt_length(cfg: BlipConfig | ModelConfig) -> int:
    """Word pieces of the decoder prompt ('a picture of ' is 3)."""
    return len(load_tokenizer()(_model(cfg).prompt, add_special_tokens=False).input_ids)


def decoder_length(cfg: BlipConfig | ModelConfig, text_len: int) -> int:
    """Decoder tokens for captions of `text_len` tokens: [DEC] prompt caption, cut at max_text_len."""
    return min(_model(cfg).max_text_len, text_len + prompt_length(cfg))


def full_lm_targets(cfg: BlipConfig | ModelConfig, batch: int, text_len: int) -> int:
    """LM targets of a batch whose captions all fill `text_len` tokens (no padding): every decoder
    position from the prompt's last token on predicts the next token."""
    return batch * (decoder_length(cfg, text_len) - 1 - prompt_length(cfg))


def _conv_stem_flops(m: ModelConfig, batch: int) -> list[int]:
    """Forward FLOPs of each convolution of the conv stem, in order (the last is the 1x1 one)."""
    flops, side, channels_in = [], m.image_size, 3
    for channels in conv_stem_channels(m.patch_size, m.vision_width):
        side //= 2  # 3x3, stride 2, padding 1 on an even side
        flops.append(2 * batch * side * side * 3 * 3 * channels_in * channels)
        channels_in = channels
    return [*flops, linear_flops(batch * side * side, channels_in, m.vision_width)]


def _patch_embed_flops(m: ModelConfig, batch: int) -> int:
    """Forward FLOPs of the ViT's patch embedding."""
    patches = batch * (m.image_size // m.patch_size) ** 2
    if m.shifted_patches:
        return linear_flops(patches, ShiftedPatchTokenizer.SHIFTS * 3 * m.patch_size**2, m.vision_width)
    if m.patch_embed == "conv-stem":
        return sum(_conv_stem_flops(m, batch))
    return linear_flops(patches, 3 * m.patch_size**2, m.vision_width)


def _image_input_flops(m: ModelConfig, batch: int) -> int:
    """Forward FLOPs of the product whose input is the images: its backward computes no input gradient."""
    if m.shifted_patches:  # the images go through a LayerNorm with weights first
        return 0
    if m.patch_embed == "conv-stem":
        return _conv_stem_flops(m, batch)[0]
    return _patch_embed_flops(m, batch)


def _vision_flops(m: ModelConfig, batch: int) -> int:
    tokens, mlp = image_tokens(m), int(m.vision_width * m.mlp_ratio)
    return _patch_embed_flops(m, batch) + batch * m.vision_depth * block_flops(tokens, m.vision_width, mlp)


def _mae_flops(m: ModelConfig, batch: int) -> dict[str, int]:
    """Forward FLOPs of an MAE step: the ViT on the visible patches, the decoder on every patch."""
    patches, visible = image_tokens(m) - 1, m.mae_visible_patches()
    width, mlp = m.mae_decoder_width, int(m.mae_decoder_width * m.mlp_ratio)
    encoder = batch * m.vision_depth * block_flops(visible + 1, m.vision_width, int(m.vision_width * m.mlp_ratio))
    decoder = (linear_flops(batch * (visible + 1), m.vision_width, width)
               + batch * m.mae_decoder_depth * block_flops(patches + 1, width, mlp)
               + linear_flops(batch * patches, width, 3 * m.patch_size**2))
    return {"vision": _patch_embed_flops(m, batch) + encoder, "mae_decoder": decoder}


def _itc_flops(m: ModelConfig, batch: int, text_len: int) -> int:
    blocks = m.text_encoder_depth * block_flops(text_len, m.text_width, int(m.text_width * m.mlp_ratio))
    return batch * blocks + linear_flops(batch, m.vision_width + m.text_width, m.embed_dim)


def forward_flops(
    cfg: BlipConfig | ModelConfig, batch: int, text_len: int, lm_targets: int | None = None
) -> dict[str, int]:
    """Forward FLOPs of `model(images, input_ids, attention_mask)` in training mode, per part of the
    model (parts that are off are absent): vision, itc, itm, momentum, decoder, lm_head; with model.mae, vision
    (the ViT on the visible patches) and mae_decoder, whatever text_len.

    text_len: the length of input_ids ([CLS] caption [SEP], padded to the batch's longest);
    lm_targets: the batch's label positions (default: every caption fills text_len, see full_lm_targets).
    """
    m = _model(cfg)
    mlp, tokens_v = int(m.text_width * m.mlp_ratio), image_tokens(m)
    if m.mae:  # image pretraining: no text
        return _mae_flops(m, batch)
    if m.text_only:  # decoder pretraining: no image, no cross-attention
        length = decoder_length(m, text_len)
        targets = full_lm_targets(m, batch, text_len) if lm_targets is None else lm_targets
        return {"decoder": batch * m.text_decoder_depth * block_flops(length, m.text_width, mlp),
                "lm_head": linear_flops(targets, m.text_width, m.vocab_size)}
    parts = {"vision": _vision_flops(m, batch)}
    if m.itc_weight > 0:
        parts["itc"] = _itc_flops(m, batch, text_len)
        if m.momentum_encoder:
            parts["momentum"] = parts["vision"] + parts["itc"]
    if m.itm_weight > 0:
        block = block_flops(text_len, m.text_width, mlp, tokens_v, m.vision_width)
        parts["itm"] = 3 * batch * (m.text_encoder_depth * block + linear_flops(1, m.text_width, 2))
    if m.lm_weight > 0:
        length = decoder_length(m, text_len)
        block = block_flops(length, m.text_width, mlp, tokens_v, m.vision_width)
        parts["decoder"] = batch * m.text_decoder_depth * block
        targets = full_lm_targets(m, batch, text_len) if lm_targets is None else lm_targets
        parts["lm_head"] = linear_flops(targets, m.text_width, m.vocab_size)
    return parts


def training_flops(
    cfg: BlipConfig | ModelConfig, batch: int, text_len: int, lm_targets: int | None = None
) -> dict[str, int]:
    """FLOPs of one training step (forward + backward) per part, as forward_flops: 3x the forward,
    except the product that reads the images (no gradient for them: 2x) and the momentum encoder (1x)."""
    parts = {name: (1 if name == "momentum" else 3) * flops
             for name, flops in forward_flops(cfg, batch, text_len, lm_targets).items()}
    if "vision" in parts:
        parts["vision"] -= _image_input_flops(_model(cfg), batch)
    return parts


def training_step_flops(
    cfg: BlipConfig | ModelConfig, batch: int, text_len: int, lm_targets: int | None = None
) -> int:
    """Total FLOPs of one training step (see training_flops)."""
    return sum(training_flops(cfg, batch, text_len, lm_targets).values())


def unpadded_training_flops(cfg: BlipConfig | ModelConfig, lengths: Iterable[int]) -> int:
    """FLOPs of one training step on captions of these unpadded lengths ([CLS] caption [SEP], cut at
    max_text_len), one image each: every caption counted at its own length, so the padding a batch carries (to its
    longest caption, or to max_text_len on the compiled path) counts for nothing. What a step's MFU is read on.
    (ITM's mined negatives pair an image with another caption of the batch: counted at the pair's own caption.)"""
    counts = Counter(min(int(n), _model(cfg).max_text_len) for n in lengths)
    return sum(count * training_step_flops(cfg, 1, length) for length, count in counts.items())
