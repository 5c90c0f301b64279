"""A vocabulary of the training captions' word pieces (model.vocabulary = "captions"): the kept ids, a compact
model checked against the full model whose absent pieces are masked out (the reference), and a run that trains,
saves, reloads, resumes and decodes with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blipcore import BLIP, load_tokenizer
from blipcore.model.config import VOCAB_SIZE
from blipcore.model.tokenizer import special_ids, tokenize_captions
from blipcore.model.vocabulary import CompactEmbedding, caption_word_pieces
from blipcore.runs.rundir import RunDir
from blipcore.training.trainer import Trainer
from tests.conftest import small_cfg, tiny_config

CAPTIONS = ["a red circle on a white background", "two blue squares to the left of a green cross"]


def test_the_kept_word_pieces_are_the_captions_the_prompt_and_the_special_tokens():
    pieces = caption_word_pieces(CAPTIONS, "a picture of ")
    tokenizer = load_tokenizer()
    expected = {*special_ids().values(), tokenizer.unk_token_id,
                *tokenizer("a picture of", add_special_tokens=False).input_ids,
                *(i for caption in CAPTIONS for i in tokenizer(caption, add_special_tokens=False).input_ids)}
    assert pieces == sorted(expected) and pieces[0] == tokenizer.pad_token_id == 0


def compact_twin(full: BLIP, pieces: list[int]) -> BLIP:
    """A "captions"-vocabulary model holding `full`'s weights, its word rows (and LM head bias) at `pieces`."""
    cfg = tiny_config(vocabulary="captions", vocab_size=len(pieces))
    compact = BLIP(cfg, pieces)
    state = full.state_dict()
    state["word_embeddings.weight"] = state["word_embeddings.weight"][pieces]
    state["text_decoder.lm_head.bias"] = state["text_decoder.lm_head.bias"][pieces]
    tied = {name for name in state if name.endswith(("words.weight", "lm_head.weight"))}  # word_embeddings'
    missing, unexpected = compact.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=False)
    assert not unexpected and all(name in tied or name.endswith(("to_full", "to_compact")) for name in missing)
    return compact.eval()


def test_a_compact_model_computes_what_the_full_model_does_on_the_pieces_it_keeps():
    torch.manual_seed(0)
    full = BLIP(tiny_config()).eval()
    pieces = caption_word_pieces(CAPTIONS, full.cfg.prompt)
    compact = compact_twin(full, pieces)
    assert compact.num_parameters() < full.num_parameters() - (VOCAB_SIZE - len(pieces)) * 64
    tokens = tokenize_captions(CAPTIONS, 24)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the text tower reads the same words: the ITC embedding is the same
        torch.testing.assert_close(compact.encode_text(tokens["input_ids"], tokens["attention_mask"])[1],
                                   full.encode_text(tokens["input_ids"], tokens["attention_mask"])[1])
        # decoding sees logits on bert-base-uncased ids: the full model's where kept, never chosen elsewhere
        image_embeds, _ = full.encode_image(images)
        dec = full.decoder_batch(tokens["input_ids"], tokens["attention_mask"])
        full_logits, _ = full.decode_step(dec.input_ids, image_embeds)
        compact_logits, _ = compact.decode_step(dec.input_ids, image_embeds)
        assert compact_logits.shape == full_logits.shape
        torch.testing.assert_close(compact_logits[..., pieces], full_logits[..., pieces])
        absent = torch.ones(VOCAB_SIZE, dtype=torch.bool)
        absent[pieces] = False
        assert compact_logits.softmax(-1)[..., absent].max() == 0
        logp = compact_logits.log_softmax(-1)
        assert torch.isfinite(-(logp.exp() * logp).sum(-1)).all()  # the decoder's entropy stays a number
        # the LM loss is the full model's cross-entropy over the kept pieces only (reference: the others masked)
        reference = full_logits.masked_fill(absent, float("-inf"))[:, :-1]
        targets = dec.labels[:, 1:]
        expected = F.cross_entropy(reference.reshape(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=-100)
        torch.manual_seed(1)
        got = compact(images, tokens["input_ids"], tokens["attention_mask"])["lm"]
    torch.testing.assert_close(got, expected)


def test_an_unknown_piece_reads_as_unk_and_a_missing_label_stays_ignored():
    pieces = caption_word_pieces(CAPTIONS, "a picture of ")
    words = CompactEmbedding(pieces, 8, padding_idx=0)
    unk = load_tokenizer().unk_token_id
    zebra = load_tokenizer().convert_tokens_to_ids("zebra")
    ids = torch.tensor([[0, unk, zebra, pieces[-1], -100]])
    assert words.compact(ids).tolist() == [[0, pieces.index(unk), pieces.index(unk), len(pieces) - 1, -100]]
    with pytest.raises(ValueError, match="ascending"):
        CompactEmbedding([0, 5, 3], 8, padding_idx=0)


def test_the_momentum_encoder_copies_the_vocabulary_and_a_checkpoint_restores_both(tmp_path):
    pieces = caption_word_pieces(CAPTIONS, "a picture of ")
    cfg = tiny_config(vocabulary="captions", vocab_size=len(pieces), momentum_encoder=True, queue_size=16)
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(BLIP(cfg, pieces), cfg, epoch=1, step=1, metrics={})
    loaded, _, _ = run.load_model()  # built as a skeleton (the first ids), then its own map loaded
    for words in (loaded.word_embeddings, loaded.text_decoder.embeddings.words, loaded.text_encoder_m.embeddings.words):
        assert torch.equal(words.to_full, torch.tensor(pieces))
        assert words.compact(torch.tensor(pieces)).tolist() == list(range(len(pieces)))


def test_a_bad_vocabulary_setting_is_refused():
    with pytest.raises(ValueError, match="model.vocabulary must be one of full, captions"):
        tiny_config(vocabulary="words")
    with pytest.raises(ValueError, match="counts the kept word pieces"):
        tiny_config(vocabulary="captions", vocab_size=1)
    with pytest.raises(ValueError, match="3 word pieces for model.vocab_size=4"):
        BLIP(tiny_config(vocabulary="captions", vocab_size=4), [0, 100, 101])


def test_a_captions_vocabulary_run_trains_saves_reloads_resumes_and_decodes(shapes_root, tmp_path):
    cfg = small_cfg(shapes_root, model={"vocabulary": "captions"}, epochs=1, max_steps=3,
                    eval_strategies=["greedy"]).override({"train.save_state_every": 1})
    run = RunDir(tmp_path / "compact")
    stopped = Trainer(cfg.override({"train.max_steps": 2}), run.path, progress=False)
    stopped.fit()
    pieces = caption_word_pieces((c for r in stopped.train_set.records for c in r.captions), cfg.model.prompt)
    recorded = run.config().model
    assert recorded.vocabulary == "captions" and recorded.vocab_size == len(pieces) < 200
    assert torch.equal(stopped.model.word_embeddings.to_full, torch.tensor(pieces))
    Trainer(run.config().override({"train.max_steps": 3}), run.path, resume=True, progress=False).fit()
    assert run.read_info()["status"] == "completed"
    model, _, _ = run.load_model()
    assert torch.equal(model.word_embeddings.to_full, torch.tensor(pieces))
    greedy = run.load_eval(1)["strategies"]["greedy"]
    assert greedy["samples"] and all(isinstance(s["caption"], str) for s in greedy["samples"])
    vocabulary = {load_tokenizer().convert_ids_to_tokens(i) for i in pieces}
    generated = {piece for s in greedy["samples"] for piece in load_tokenizer().tokenize(s["caption"])}
    assert generated <= vocabulary  # it never says a word piece its captions lack

    # a run starting from its weights keeps their vocabulary (a fine-tune on other captions: a clean subset), though
    # its own captions and prompt would make another: the rows keep meaning the same words
    other = small_cfg(shapes_root, model={"vocabulary": "captions"}, epochs=1, max_steps=1).override(
        {"train.init": str(run.path), "model.prompt": "an image of "})
    own = caption_word_pieces((c for r in stopped.train_set.records for c in r.captions), "an image of ")
    Trainer(other, tmp_path / "other", progress=False).fit()
    assert own != pieces
    assert torch.equal(RunDir(tmp_path / "other").load_model()[0].word_embeddings.to_full, torch.tensor(pieces))
