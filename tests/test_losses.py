"""The losses in isolation, against hand computations."""

import math

import pytest
import torch

from blipcore.model import losses


def test_itc_hand_computed_3x3():
    # Unit vectors at angles 0, 90 and 180 degrees make the cosine similarities easy to write down.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    temperature = 0.5
    loss, sim = losses.contrastive_loss(image, text, temperature, torch.tensor([0, 1, 2]))
    expected_sim = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(sim, expected_sim)

    def ce(row, target):
        logits = [v / temperature for v in row]
        return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))

    rows = expected_sim.tolist()
    cols = expected_sim.t().tolist()
    i2t = sum(ce(rows[i], i) for i in range(3)) / 3
    t2i = sum(ce(cols[i], i) for i in range(3)) / 3
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-5


def test_itc_two_captions_of_one_image_are_both_positives():
    targets = losses.positive_targets(torch.tensor([7, 7, 3]), torch.tensor([7, 7, 3]))
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_itc_perfect_alignment_has_low_loss_and_gradients_flow():
    feats = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    aligned, _ = losses.contrastive_loss(feats, feats, 0.01, torch.arange(8))
    shuffled, _ = losses.contrastive_loss(feats, feats.roll(1, 0), 0.01, torch.arange(8))
    assert aligned.item() < 0.05 < shuffled.item()
    shuffled.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_lm_loss_ignores_prompt_and_padding():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 10)
    hidden = torch.randn(1, 5, 4)
    labels = torch.tensor([[-100, -100, 3, 4, -100]])
    loss = losses.lm_loss(hidden, labels, head)
    logits = head(hidden)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_cross_entropy_matches_torch_in_value_and_gradients(monkeypatch, smoothing, bias):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 64 * 300)  # chunks of 64 rows: 3 chunks, the last one short
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    bias_ = torch.randn(300, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(0, 300, (150,), generator=generator)
    inputs = [hidden, weight] + ([bias_] if bias else [])
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias_), targets,
                                                  label_smoothing=smoothing, reduction="sum")
    fused = losses.linear_cross_entropy(hidden, weight, bias_, targets, smoothing)
    torch.testing.assert_close(fused, reference)
    for got, expected in zip(torch.autograd.grad(0.3 * fused, inputs), torch.autograd.grad(0.3 * reference, inputs),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lm_loss_is_fused_when_training_and_equal_either_way(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 6))
    labels[:, :2], labels[2, 4:] = -100, -100
    calls = []
    fused = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy", lambda *args: calls.append(1) or fused(*args))
    trained = losses.lm_loss(hidden, labels, head, label_smoothing=0.1)
    assert calls == [1]
    with torch.no_grad():
        evaluated = losses.lm_loss(hidden, labels, head, label_smoothing=0.1)
    assert calls == [1]  # no gradient wanted: plain cross-entropy, no gradients computed in the forward
    torch.testing.assert_close(trained, evaluated)
    trained.backward()
    plain = hidden.detach().requires_grad_()
    keep = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(head(plain[:, :-1])[keep], labels[:, 1:][keep], label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(hidden.grad, plain.grad)


def test_lm_loss_under_a_cpus_bf16_autocast_is_fused_with_bf16_matmuls(monkeypatch):
    """bf16 decoder states (autocast) train through the fused kernel, its vocabulary matmuls in bf16 as autocast's
    linear runs them: the loss and the gradients are those of autocast's own (unfused) linear + cross-entropy, to
    bf16's precision, and the gradient reaches the bf16 states and the fp32 head."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500)
    hidden = torch.randn(4, 12, 32).bfloat16().requires_grad_()
    labels = torch.randint(0, 500, (4, 12))
    calls = []
    fused = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy",
                        lambda *args: calls.append([a.dtype for a in args[:3]] + [args[-1]]) or fused(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = losses.lm_loss(hidden, labels, head, label_smoothing=0.1)
    assert calls == [[torch.float32] * 3 + [torch.bfloat16]] and trained.dtype == torch.float32
    trained.backward()
    assert hidden.grad.dtype == torch.bfloat16
    got = (trained.detach(), hidden.grad.clone(), head.weight.grad.clone())

    hidden.grad, head.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's unfused linear, its logits in bf16
        logits = head(hidden[:, :-1]).flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:].flatten(), label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=0, atol=1e-2)
    for fused_grad, unfused_grad in zip(got[1:], (hidden.grad, head.weight.grad), strict=True):
        error = (fused_grad.float() - unfused_grad.float()).norm() / unfused_grad.float().norm()
        assert error < 2e-2


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_with_bf16_matmuls_equals_the_fp32_one_of_bf16_rounded_inputs(smoothing):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 64, generator=generator).bfloat16().float().requires_grad_()
    weight = (0.3 * torch.randn(900, 64, generator=generator)).bfloat16().float().requires_grad_()
    bias = torch.randn(900, generator=generator, requires_grad=True)
    targets = torch.randint(0, 900, (150,), generator=generator)
    fused = losses.linear_cross_entropy(hidden, weight, bias, targets, smoothing, torch.bfloat16)
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                                  label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(fused, reference, rtol=2e-3, atol=0)  # only the logits' bf16 rounding differs
    assert fused.item() != losses.linear_cross_entropy(hidden, weight, bias, targets, smoothing).item()  # it does
    inputs = [hidden, weight, bias]
    for got, expected in zip(torch.autograd.grad(fused, inputs), torch.autograd.grad(reference, inputs), strict=True):
        assert (got - expected).norm() / expected.norm() < 2e-2


def test_negatives_never_pick_the_same_image():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3])
    sim = torch.randn(5, 5) + 10 * torch.eye(5)
    for hard in (True, False):
        for _ in range(20):
            neg_text, neg_image = losses.sample_negatives(sim, ids, hard=hard)
            assert torch.all(ids[neg_text] != ids) and torch.all(ids[neg_image] != ids)


def test_hard_negatives_follow_the_similarity_and_random_ones_do_not():
    """Image 0 looks most like text 3: mining picks it almost always, uniform drawing a third of the time."""
    ids, sim = torch.arange(4), torch.zeros(4, 4)
    sim[0, 3] = 8.0
    generator = torch.Generator().manual_seed(0)
    picks = {hard: torch.stack([losses.sample_negatives(sim, ids, hard, generator)[0][0] for _ in range(600)])
             for hard in (True, False)}
    assert (picks[True] == 3).float().mean() > 0.99
    assert abs((picks[False] == 3).float().mean() - 1 / 3) < 0.07


def test_momentum_itc_reduces_to_plain_targets_with_alpha_zero():
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.arange(4)
    loss = losses.momentum_contrastive_loss(image, text, image.t(), text.t(), ids, ids, 0.1, alpha=0.0)
    plain, _ = losses.contrastive_loss(image, text, 0.1, ids)
    torch.testing.assert_close(loss, plain)


def _siglip_reference(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """The SigLIP paper's pseudo-code (Zhai et al. 2023, Algorithm 1) for a batch of distinct images."""
    n = image.shape[0]
    logits = image @ text.t() * scale + bias
    labels = 2 * torch.eye(n) - torch.ones(n, n)
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / n


def test_sigmoid_itc_is_the_siglip_papers_loss():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    loss, sim = losses.sigmoid_contrastive_loss(image, text, 0.1, -10.0, torch.arange(6))
    torch.testing.assert_close(loss, _siglip_reference(image, text, 10.0, -10.0))
    torch.testing.assert_close(sim, image @ text.t())


def test_sigmoid_itc_counts_two_captions_of_one_image_as_positives_and_trains_its_bias():
    image = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss, _ = losses.sigmoid_contrastive_loss(image, text, 0.5, bias, torch.tensor([7, 7, 3]))
    logits = image @ text.t() / 0.5 + bias.detach()
    signs = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    torch.testing.assert_close(loss.detach(), -torch.nn.functional.logsigmoid(signs * logits).sum() / 3)
    loss.backward()
    assert bias.grad < 0  # 5 positives of 9 pairs at a bias of -10: raising the bias lowers the loss


def test_sigmoid_itc_perfect_alignment_has_lower_loss_than_shuffled():
    feats = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    aligned, _ = losses.sigmoid_contrastive_loss(feats, feats, 0.05, -5.0, torch.arange(8))
    shuffled, _ = losses.sigmoid_contrastive_loss(feats, feats.roll(1, 0), 0.05, -5.0, torch.arange(8))
    assert aligned.item() < shuffled.item()
