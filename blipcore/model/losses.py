"""BLIP's losses as small functions, testable in isolation (tests/test_losses.py).

ITC negatives come from every rank when training is distributed: features are gathered with
`torch.distributed.nn.functional.all_gather`, which carries gradients back to the rank that made
them, as open_clip does. Each rank scores its own rows against every rank's columns; DDP's gradient
averaging then gives exactly the gradient of the loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor, distributed: bool = True) -> Tensor:
    """Concatenate `x` from every rank along dim 0, keeping gradients (identity on one process)."""
    if not (distributed and is_distributed()):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor, distributed: bool = True) -> Tensor:
    """Concatenate `x` from every rank along dim 0, without gradients (momentum features, ids)."""
    if not (distributed and is_distributed()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def positive_targets(row_ids: Tensor, column_ids: Tensor) -> Tensor:
    """Soft targets (R, C): each row spreads its mass over the columns showing the same image.

    Two captions of one image in a batch are both positives, not a positive and a false negative.
    """
    same = (row_ids[:, None] == column_ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def contrastive_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    temperature: Tensor | float,
    image_ids: Tensor,
    distributed: bool = True,
) -> tuple[Tensor, Tensor]:
    """Symmetric image-text contrastive loss (ITC) over in-batch negatives, gathered across ranks.

    image_feat, text_feat: (B, D), L2-normalised; image_ids: (B,) identifies the image of each pair.
    `distributed=False` keeps negatives local (evaluation runs on one rank and must not gather).
    Returns the loss, (image-to-text CE + text-to-image CE) / 2, and the local image-to-text
    similarity (B, B) before temperature (ITM draws its hard negatives from it).
    """
    all_image = gather_with_grad(image_feat, distributed)
    all_text = gather_with_grad(text_feat, distributed)
    all_ids = gather_no_grad(image_ids, distributed)
    sim_i2t = image_feat @ all_text.t() / temperature  # (B, world*B)
    sim_t2i = text_feat @ all_image.t() / temperature
    targets = positive_targets(image_ids, all_ids)
    loss = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2
    return loss, image_feat @ text_feat.t()


def sigmoid_contrastive_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    temperature: Tensor | float,
    bias: Tensor | float,
    image_ids: Tensor,
    distributed: bool = True,
) -> tuple[Tensor, Tensor]:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) as the ITC term: every (image, text) pair of the batch is
    a binary question, "same image?", scored by sim / temperature + bias; no softmax over the batch.

    image_feat, text_feat: (B, D), L2-normalised; image_ids: (B,) (two captions of one image are both positives).
    The loss is the sum over pairs of -log sigmoid(+-logit), divided by the batch size, as the paper writes it.
    Distributed, each rank scores its own images against every rank's texts: the ranks' pairs together are the
    global batch's, each once. Returns the loss and the local image-to-text similarity (B, B) before temperature.
    """
    all_text = gather_with_grad(text_feat, distributed)
    all_ids = gather_no_grad(image_ids, distributed)
    logits = image_feat @ all_text.t() / temperature + bias  # (B, world*B)
    signs = 2.0 * (image_ids[:, None] == all_ids[None, :]).to(logits.dtype) - 1.0
    loss = -F.logsigmoid(signs * logits).sum() / image_feat.shape[0]
    return loss, image_feat @ text_feat.t()


def momentum_contrastive_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_keys: Tensor,
    text_feat_keys: Tensor,
    key_ids: Tensor,
    image_ids: Tensor,
    temperature: Tensor | float,
    alpha: float,
) -> Tensor:
    """BLIP's ITC with a momentum encoder and a queue.

    Keys (D, K) are the momentum encoder's features of this batch followed by the queue; targets mix
    the momentum model's own similarity distribution (weight alpha, distillation) with the
    same-image positives.
    """
    with torch.no_grad():
        targets = positive_targets(image_ids, key_ids)
        # The batch's own momentum features are the first B key columns; their rows score the keys.
        batch = image_feat.shape[0]
        sim_i2t_m = image_feat_keys[:, :batch].t() @ text_feat_keys / temperature
        sim_t2i_m = text_feat_keys[:, :batch].t() @ image_feat_keys / temperature
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_feat_keys / temperature
    sim_t2i = text_feat @ image_feat_keys / temperature
    return (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2


def lm_loss(
    hidden: Tensor, labels: Tensor, lm_head: nn.Linear, label_smoothing: float = 0.0, distributed: bool = True
) -> Tensor:
    """Next-token cross-entropy: the decoder state at position t predicts labels[:, t+1]; -100 is ignored.

    hidden: (B, L, width) final decoder states. Eager on a CPU, the vocabulary head runs only at positions with a
    target (not on [DEC], the prompt or padding), which is most of the cost of a small model's step;
    when training it runs fused with the loss (`linear_cross_entropy`: its matmuls in autocast's dtype, the rest in
    fp32). On a GPU and under torch.compile it runs at every position and the loss ignores the others: picking the
    target rows has a data-dependent shape, which waits for the device and breaks a compiled graph.
    The mean is over the global batch's tokens: each rank divides its sum by the mean token count per
    rank, so DDP's gradient averaging gives exactly the single-process loss on the same global batch.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    if hidden.device.type != "cpu" or torch.compiler.is_compiling():  # static shapes, no wait for the device
        logits = lm_head(hidden[:, :-1]).float()
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                label_smoothing=label_smoothing, reduction="sum")
        return total / _target_count(keep, distributed)
    states = hidden[:, :-1][keep]  # (number of targets, width)
    device = states.device.type
    autocast = torch.is_autocast_enabled(device)
    # Fused when training: under a CPU's bf16 autocast too, with bf16 matmuls as autocast's linear would run them
    # and the softmax in fp32, where autograd's unfused log-softmax over the vocabulary costs more than the fused
    # kernel's extra casts
    fused = torch.is_grad_enabled() and states.requires_grad
    if fused:
        matmul_dtype = torch.get_autocast_dtype(device) if autocast else None
        with torch.autocast(device, enabled=False):
            bias = None if lm_head.bias is None else lm_head.bias.float()
            total = linear_cross_entropy(states.float(), lm_head.weight.float(), bias, targets[keep], label_smoothing,
                                         matmul_dtype)
    else:
        total = F.cross_entropy(lm_head(states).float(), targets[keep], label_smoothing=label_smoothing,
                                reduction="sum")
    return total / _target_count(keep, distributed)


def _target_count(keep: Tensor, distributed: bool) -> Tensor:
    """lm_loss's divisor: the targets `keep` marks, the mean over ranks when distributed, at least 1."""
    count = keep.sum().float()
    if distributed and is_distributed():
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp_min(1.0)


# Logits computed at once by linear_cross_entropy: ~16 M floats (64 MB in fp32) a chunk of rows, whatever the
# vocabulary: smaller chunks make the vocabulary matmul slower than the passes they keep in cache, larger ones
# spill out of it.
CHUNK_ELEMENTS = 1 << 24


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, label_smoothing: float = 0.0,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    """sum over rows of F.cross_entropy(hidden @ weight.T + bias, targets, label_smoothing=...), with the same
    value and gradients, computed in row chunks: the (rows, vocabulary) logits are never all in memory, and
    each chunk's softmax is formed in place and multiplied out at once, instead of autograd's separate passes
    of log-softmax, its backward and zero-filled buffers (profiled at the flickr8k-cpu preset: a third of the LM
    loss's time). hidden (N, width), weight (vocab, width), targets (N,), all fp32.

    `matmul_dtype` (e.g. bf16 under autocast): the three vocabulary matmuls (logits, and the gradients of hidden
    and weight) take their inputs in that dtype, as autocast's linear and its backward would; the softmax, the
    loss and the gradients' sums stay fp32."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, float(label_smoothing), matmul_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in the forward (as Liger-Kernel's fused linear cross-entropy does): they
    need the chunk's logits, which are not kept; backward scales them by the incoming gradient.

    With smoothing e over V words the loss of a row is (1 - e)(lse - z_t) + e(lse - mean(z)), and the gradient
    of its logits softmax(z) - (1 - e) onehot(t) - e / V. The constant e / V and mean(z) = h . mean(W) + mean(b)
    are applied through the weights (rank-1 terms), not as passes over the (rows, vocabulary) chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                smoothing: float, matmul_dtype: torch.dtype | None) -> Tensor:
        vocab = weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        total = hidden.new_zeros((), dtype=torch.float32)
        buffer = hidden.new_empty((min(chunk, len(hidden)), vocab))  # one allocation: fresh pages cost a fault each
        low = matmul_dtype not in (None, hidden.dtype)
        low_weight = weight.to(matmul_dtype) if low else weight
        for start in range(0, len(hidden), chunk):
            rows = hidden[start : start + chunk]
            low_rows = rows.to(matmul_dtype) if low else rows
            target = targets[start : start + chunk, None]
            logits = buffer[: len(rows)]  # (rows of the chunk, vocab)
            if low:
                logits.copy_(torch.mm(low_rows, low_weight.t()))
                if bias is not None:
                    logits.add_(bias)
            elif bias is None:
                torch.mm(rows, weight.t(), out=logits)
            else:
                torch.addmm(bias, rows, weight.t(), out=logits)
            target_logit = logits.gather(1, target)
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place of the logits
            norm = probs.sum(dim=1, keepdim=True)
            probs.div_(norm)  # softmax
            logsumexp = top + norm.log()
            total += (1 - smoothing) * (logsumexp - target_logit).sum()
            # the softmax minus (1 - e) at each target: the gradient without its constant -e/V
            probs.scatter_add_(1, target, probs.new_full(target.shape, smoothing - 1.0))
            if low:
                low_probs = probs.to(matmul_dtype)
                grad_hidden[start : start + chunk] = torch.mm(low_probs, low_weight)
                grad_weight += torch.mm(low_probs.t(), low_rows)
            else:
                torch.mm(probs, weight, out=grad_hidden[start : start + chunk])
                torch.addmm(grad_weight, probs.t(), rows, out=grad_weight)  # (not addmm_: FlopCounterMode counts it)
            if grad_bias is not None:
                grad_bias += probs.sum(dim=0)
            if smoothing:
                total += smoothing * logsumexp.sum()
        if smoothing:  # mean(z) and the constant -e/V of every logit's gradient, through the weights
            mean_weight = weight.mean(dim=0)
            total -= smoothing * (hidden.sum(dim=0) @ mean_weight + (len(hidden) * bias.mean() if bias is not None
                                                                     else 0.0))
            grad_hidden -= smoothing * mean_weight
            grad_weight -= (smoothing / vocab) * hidden.sum(dim=0)
            if grad_bias is not None:
                grad_bias -= smoothing * len(hidden) / vocab
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_total, grad_weight * grad_total,
                grad_bias * grad_total if ctx.has_bias else None, None, None, None)


@torch.no_grad()
def sample_negatives(
    sim_i2t: Tensor, image_ids: Tensor, hard: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """For each image a negative text, for each text a negative image, pairs showing the same image
    excluded: drawn with probability softmax(similarity) over the batch when `hard` (BLIP's ITM mining:
    the pairs ITC finds most alike), uniformly among the other images otherwise (the ablation).

    Returns (negative text index per image, negative image index per text). A row with no other
    image to pick (all the batch shows one image) falls back to a uniformly drawn different index.
    """
    if not hard:
        sim_i2t = torch.zeros_like(sim_i2t)
    same = image_ids[:, None] == image_ids[None, :]
    picks = []
    for sim in (sim_i2t, sim_i2t.t()):
        weights = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0) + 1e-12 * (~same)
        empty = weights.sum(dim=1, keepdim=True) <= 0  # every item is the same image: any other index will do
        others = (~torch.eye(len(sim), dtype=torch.bool, device=sim.device)).float()
        weights = torch.where(empty, others, weights)  # (no test on the host: a step never waits for the device)
        picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return picks[0], picks[1]
