"""blipcore.evaluation.decoding: strategies against uncached reference loops and HF's logits processors, the
beam search's invariants, and the per-step evidence every Caption carries."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from blipcore import BLIP
from blipcore.evaluation.decoding import (
    STRATEGY_PRESETS,
    DecodingConfig,
    decoding_config,
    generate,
    no_repeat_ngram,
    process_logits,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from blipcore.model.tokenizer import load_tokenizer
from tests.conftest import tiny_config

DOG = load_tokenizer().convert_tokens_to_ids("dog")


def tiny_model(seed: int = 0) -> BLIP:
    torch.manual_seed(seed)
    return BLIP(tiny_config(vision_depth=1, text_decoder_depth=2)).eval()


@pytest.fixture(scope="module")
def model() -> BLIP:
    return tiny_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def biased_model(token: int, bias: float) -> BLIP:
    """A random model whose LM head adds `bias` to one token's logit."""
    biased = tiny_model()
    with torch.no_grad():
        biased.text_decoder.lm_head.bias[token] += bias
    return biased


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# --- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"strategy": "viterbi"}, {"num_beams": 0}, {"strategy": "sample", "top_p": 0.0},
        {"strategy": "sample", "top_p": 1.5}, {"strategy": "sample", "temperature": 0.0},
        {"strategy": "sample", "top_k": -1}, {"repetition_penalty": 0.0}, {"no_repeat_ngram_size": -1},
        {"max_length": 0}, {"min_length": 5, "max_length": 4}, {"length_penalty": math.nan},
        {"top_k": 50}, {"strategy": "beam", "temperature": 0.5},  # sampling knobs outside sampling
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        DecodingConfig(**bad)


def test_presets_overrides_and_round_trip():
    for cfg in STRATEGY_PRESETS.values():
        assert DecodingConfig.from_dict(cfg.to_dict()) == cfg
    assert decoding_config("beam").num_beams == 3
    assert decoding_config("nucleus", seed=7) == DecodingConfig(strategy="sample", top_p=0.9, seed=7)
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        decoding_config("best")
    with pytest.raises(ValueError, match="unknown decoding field"):
        decoding_config("greedy", beams=2)


# --- strategies against references --------------------------------------------------------------------
def test_greedy_equals_argmax_of_full_forwards(model, images):
    captions = generate(model, images, "greedy", max_length=10)
    sep = model.ids["sep"]
    with torch.no_grad():
        image_embeds, _ = model.encode_image(images)
        for i, caption in enumerate(captions):
            seq = model.decoder_prefix(1, "cpu")
            tokens, logprobs = [], []
            for _ in range(10):
                logits, _ = model.decode_step(seq, image_embeds[i : i + 1])
                logp = logits[0, -1].log_softmax(-1)
                token = int(logp.argmax())
                logprobs.append(float(logp[token]))
                if token == sep:
                    break
                tokens.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            assert caption.tokens == tokens
            assert caption.logprobs == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "top-k", "nucleus", "beam"])
def test_cached_decoding_equals_uncached(model, images, strategy):
    cached, uncached = (generate(model, images, strategy, max_length=8, use_cache=c) for c in (True, False))
    for a, b in zip(cached, uncached, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.entropies == pytest.approx(b.entropies, abs=1e-4)


def test_sampling_is_reproducible_with_a_seed(model, images):
    first, again, other = (generate(model, images, "top-k", max_length=8, seed=s) for s in (3, 3, 4))
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert [c.tokens for c in first] != [c.tokens for c in other]


def test_beam_of_one_equals_greedy(model, images):
    greedy = generate(model, images, "greedy", max_length=8)
    beam = generate(model, images, "beam", num_beams=1, max_length=8)
    for g, b in zip(greedy, beam, strict=True):
        assert b.tokens == g.tokens
        assert b.logprobs == pytest.approx(g.logprobs, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_finds_a_likelier_caption_than_greedy(seed):
    """Not a theorem (beam search prunes, and an ended candidate outside the top K is dropped, as in
    HF and fairseq), but with four beams and captions that run to max_length it holds here."""
    model, images = tiny_model(seed), torch.randn(4, 3, 32, 32)
    greedy = generate(model, images, "greedy", max_length=6)
    beam = generate(model, images, "beam", num_beams=4, length_penalty=0.0, early_stopping=False, max_length=6)
    for g, b in zip(greedy, beam, strict=True):
        assert sum(b.logprobs) >= sum(g.logprobs) - 1e-5
        assert b.score == pytest.approx(sum(b.logprobs), abs=1e-4)  # no rules, no length penalty


def reference_beam(model: BLIP, image: torch.Tensor, k: int, penalty: float, early: bool, max_new: int):
    """Textbook beam search with HF's rules, one image, lists and full forwards: (score, tokens with [SEP])."""
    sep = model.ids["sep"]
    with torch.no_grad():
        image_embeds, _ = model.encode_image(image[None])
        prefix = model.decoder_prefix(1, "cpu")[0].tolist()
        running, finished = [(0.0, [])], []
        for step in range(max_new):
            seqs = torch.tensor([prefix + tokens for _, tokens in running])  # running beams have one length
            logits, _ = model.decode_step(seqs, image_embeds.expand(len(seqs), -1, -1))
            values, ids = logits[:, -1].log_softmax(-1).topk(2 * k)
            candidates = [
                (total + v, tokens + [t])
                for (total, tokens), vs, ts in zip(running, values.tolist(), ids.tolist(), strict=True)
                for v, t in zip(vs, ts, strict=True)
            ]
            candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * k]
            last, running = step == max_new - 1, []
            for rank, (total, tokens) in enumerate(candidates):
                if last or tokens[-1] == sep:
                    if rank < k:
                        finished.append((total / (step + 1) ** penalty, tokens))
                elif len(running) < k:
                    running.append((total, tokens))
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            reach = running[0][0] / (max_new if penalty > 0 else step + 2) ** penalty if running else -math.inf
            if last or (len(finished) >= k and (early or reach <= finished[-1][0])):
                return finished[0]


@pytest.mark.parametrize("penalty, early", [(0.0, False), (1.0, True), (1.0, False), (-0.5, False)])
def test_beam_equals_reference_beam_search(penalty, early):
    model = tiny_model(1)
    with torch.no_grad():  # make [SEP] competitive so that hypotheses end at different steps
        model.text_decoder.lm_head.bias[model.ids["sep"]] += 0.3
    images = torch.randn(3, 3, 32, 32)
    captions = generate(model, images, "beam", num_beams=3, length_penalty=penalty, early_stopping=early, max_length=7)
    for image, caption in zip(images, captions, strict=True):
        score, tokens = reference_beam(model, image, 3, penalty, early, 7)
        assert caption.tokens + [model.ids["sep"]] * caption.finished == tokens
        assert caption.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batch_equals_one_image_at_a_time(strategy):
    """Rows that finish early leave the batch (and beams are reordered) without disturbing the others."""
    model = tiny_model(3)
    with torch.no_grad():
        model.text_decoder.lm_head.bias[model.ids["sep"]] += 0.3
    images = torch.randn(5, 3, 32, 32)
    batch = generate(model, images, strategy, max_length=8)
    alone = [generate(model, images[i : i + 1], strategy, max_length=8)[0] for i in range(len(images))]
    assert len({len(c.tokens) for c in batch}) > 1, "captions should end at different steps"
    for b, a in zip(batch, alone, strict=True):
        assert b.tokens == a.tokens
        assert b.score == pytest.approx(a.score, abs=1e-4)


# --- logits rules against HF -------------------------------------------------------------------------
def random_case(rows: int = 4, vocab: int = 50, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of both signs, and input ids drawn from a few tokens so that n-grams repeat."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=g) * 3, torch.randint(0, 4, (rows, length), generator=g)


def test_repetition_penalty_matches_hf():
    logits, ids = random_case()
    for penalty in (1.5, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.equal(repetition_penalty(logits, ids, penalty), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 13])
def test_no_repeat_ngram_matches_hf(n):
    logits, ids = random_case()
    assert torch.equal(no_repeat_ngram(logits, ids, n), NoRepeatNGramLogitsProcessor(n)(ids, logits.clone()))


def test_top_k_and_top_p_match_hf():
    logits, ids = random_case()
    for k in (1, 5, 100):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))


@pytest.mark.parametrize("generated", [1, 5])
def test_all_rules_compose_in_hf_order(generated):
    logits, ids = random_case()
    prefix, sep = ids.shape[1] - generated, 7
    cfg = DecodingConfig(strategy="sample", repetition_penalty=1.3, no_repeat_ngram_size=2, min_length=3,
                         temperature=0.7, top_k=20, top_p=0.8)
    hf = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
        MinNewTokensLengthLogitsProcessor(prefix, 3, sep), TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20), TopPLogitsWarper(0.8),
    ])
    assert torch.allclose(process_logits(logits, ids, generated, cfg, sep), hf(ids, logits.clone()))


# --- lengths, prompt and per-step evidence --------------------------------------------------------------
def test_caption_evidence(model, images):
    model.train()
    captions = generate(model, images, "beam", max_length=6, return_cross_attention=True)
    assert model.training, "generate restores the model's mode"
    cfg = model.cfg
    for c in captions:
        steps = len(c.tokens) + c.finished
        assert len(c.logprobs) == len(c.processed_logprobs) == len(c.entropies) == steps
        assert all(0 <= e <= math.log(cfg.vocab_size) + 1e-4 for e in c.entropies)
        assert all(lp <= 0 for lp in c.logprobs)
        n_image_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        assert c.cross_attention.shape == (steps, cfg.text_decoder_depth, cfg.text_heads, n_image_tokens)
        assert c.cross_attention.dtype == torch.float32
        assert torch.allclose(c.cross_attention.sum(-1), torch.ones(()), atol=1e-5)
    assert generate(model, images, "greedy")[0].cross_attention is None


def test_min_and_max_length_and_prompt():
    sep_model = biased_model(load_tokenizer().sep_token_id, 20.0)
    x = torch.randn(2, 3, 32, 32)
    for strategy in ("greedy", "beam", "nucleus"):
        assert all(c.tokens == [] and c.finished and c.text == "" for c in generate(sep_model, x, strategy))
        for c in generate(sep_model, x, strategy, min_length=3):
            assert len(c.tokens) == 3 and c.finished
    dog_model = biased_model(DOG, 20.0)
    prefix_len = 1 + len(dog_model.prompt_ids)
    (c,) = generate(dog_model, x[:1], "greedy", max_length=4)
    assert c.tokens == [DOG] * 4 and c.text == "dog dog dog dog" and not c.finished  # no 'a picture of'
    (c,) = generate(dog_model, x[:1], "greedy", max_length=100)  # capped by the position table
    assert len(c.tokens) == dog_model.cfg.max_text_len - prefix_len
    (c,) = generate(dog_model, x[:1], "greedy", max_length=100, use_prompt=False)
    assert len(c.tokens) == dog_model.cfg.max_text_len - 1


@pytest.mark.parametrize("strategy", ["greedy", "beam", "top-k"])
def test_no_repeat_ngram_breaks_a_collapsed_model(strategy):
    model, x = biased_model(DOG, 5.0), torch.randn(2, 3, 32, 32)
    assert all(c.tokens == [DOG] * 12 for c in generate(model, x, "greedy", max_length=12))
    prompt = model.prompt_ids.tolist()
    for n in (1, 3):
        for c in generate(model, x, strategy, no_repeat_ngram_size=n, max_length=12):
            assert len(c.tokens) == 12
            assert not has_repeated_ngram([model.ids["dec"], *prompt, *c.tokens], n)


def test_bf16_decoding_uses_a_bf16_copy_kept_in_step_with_the_weights(model, images):
    from blipcore import speed

    fp32 = generate(model, images, "beam", max_length=6, precision="fp32", return_cross_attention=True)
    bf16 = generate(model, images, "beam", max_length=6, precision="bf16", return_cross_attention=True)
    copy = speed.inference_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the model itself is left in fp32"
    for a, b in zip(fp32, bf16, strict=True):  # the evidence stays float32, and close to fp32's
        assert b.cross_attention.dtype == torch.float32 and len(b.entropies) == len(b.tokens) + b.finished
        steps = min(len(a.entropies), len(b.entropies))
        assert torch.allclose(torch.tensor(a.entropies[:steps]), torch.tensor(b.entropies[:steps]), atol=0.1)
    assert speed.inference_copy(model, torch.bfloat16) is copy  # cached while the weights are unchanged
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # what an optimiser step does
    try:
        assert speed.inference_copy(model, torch.bfloat16) is not copy
    finally:
        with torch.no_grad():
            next(model.parameters()).sub_(1.0)


def test_the_bf16_copy_is_made_without_a_second_fp32_copy_and_keeps_ties_and_integer_buffers():
    from blipcore import speed

    model = BLIP(tiny_config(momentum_encoder=True, queue_size=16)).eval()
    copy = speed._cast_copy(model, torch.bfloat16)
    assert copy.text_decoder.lm_head.weight is copy.word_embeddings.weight  # tied weights stay tied
    assert copy.idx_queue.dtype == torch.long and copy.image_queue.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in copy.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items(), strict=True):
        assert b.data_ptr() != a.data_ptr(), name  # nothing shared with the original
        if a.is_floating_point():  # bf16 keeps about 3 significant digits
            torch.testing.assert_close(b.float(), a.float(), atol=0.02, rtol=0.01, msg=name)
        else:
            assert torch.equal(a, b), name
