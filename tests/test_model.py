"""BLIP model: shapes, the public API, causality, the KV cache, presets and config round-trip."""

import pytest
import torch

from blipcore import BLIP, BlipConfig, load_tokenizer
from blipcore.model.config import available_presets, load_preset
from blipcore.model.tokenizer import tokenize_captions
from blipcore.paths import PRESETS_DIR, PROJECT_ROOT
from tests.conftest import tiny_config


def _batch(cfg, captions=("a red circle", "two blue squares on the left")):
    tokens = tokenize_captions(list(captions), cfg.model.max_text_len)
    images = torch.randn(len(captions), 3, cfg.model.image_size, cfg.model.image_size)
    return images, tokens["input_ids"], tokens["attention_mask"]


def test_module_shapes(tiny_cfg):
    model = BLIP(tiny_cfg).eval()
    images, ids, mask = _batch(tiny_cfg)
    image_embeds, image_feat = model.encode_image(images)
    assert image_embeds.shape == (2, 1 + (32 // 8) ** 2, 64)
    assert image_feat.shape == (2, 32) and torch.allclose(image_feat.norm(dim=-1), torch.ones(2))
    hidden, text_feat = model.encode_text(ids, mask)
    assert hidden.shape == (*ids.shape, 64) and text_feat.shape == (2, 32)
    dec = model.decoder_batch(ids, mask)
    logits, cross = model.decode_step(dec.input_ids, image_embeds, need_weights=True)
    assert logits.shape == (*dec.input_ids.shape, 30524)
    assert len(cross) == 2 and cross[0].shape == (2, 2, dec.input_ids.shape[1], image_embeds.shape[1])
    _, vit_attn = model.visual_encoder(images, need_weights=True)
    assert len(vit_attn) == 2 and vit_attn[0].shape == (2, 2, 17, 17)


def test_forward_returns_finite_loss_terms_and_trains(tiny_cfg):
    model = BLIP(tiny_cfg)
    out = model(*_batch(tiny_cfg))
    assert set(out) == {"loss", "itc", "lm"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["itc"] + out["lm"])
    out["loss"].backward()
    assert model.visual_encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.temp.grad is not None


def test_itm_and_momentum_terms():
    cfg = tiny_config(itm_weight=0.5, momentum_encoder=True, queue_size=16)
    model = BLIP(cfg)
    images, ids, mask = _batch(cfg, ["a", "b c", "d e f", "g"])
    out = model(images, ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    assert set(out) == {"loss", "itc", "lm", "itm"}
    torch.testing.assert_close(out["loss"], out["itc"] + out["lm"] + 0.5 * out["itm"])
    assert model.queue_ptr.item() == 4 and model.idx_queue[:4].tolist() == [0, 0, 1, 2]
    out["loss"].backward()
    assert model.itm_head.weight.grad is not None
    assert not any(p.requires_grad for p in model.visual_encoder_m.parameters())


def test_itm_draws_its_negatives_as_the_config_says(monkeypatch):
    from blipcore.model import losses

    seen, sample = [], losses.sample_negatives
    monkeypatch.setattr(losses, "sample_negatives", lambda sim, ids, hard: seen.append(hard) or sample(sim, ids, hard))
    for hard in (True, False):
        cfg = tiny_config(itm_weight=1.0, itm_hard_negatives=hard)
        assert torch.isfinite(BLIP(cfg)(*_batch(cfg))["itm"])
    assert seen == [True, False]


def test_the_itm_head_learns_to_match_through_the_enc_path():
    """The [ENC] path (multimodal text encoder, cross-attention, ITM head) can learn: on one fixed batch of 16
    pairs, with negatives drawn at random, the ITM loss leaves chance (0.64, the entropy of the 1-in-3 positive
    rate) and falls far below it. Each negative pairs a caption with another image, so the image must be read.
    (Trained from scratch on real data with hard negatives it stays at chance: docs/results.md, "ITM at chance".)"""
    torch.manual_seed(0)
    cfg = tiny_config(itm_weight=1.0, lm_weight=0.0, itm_hard_negatives=False)
    model = BLIP(cfg).train()
    images = torch.randn(16, 3, 32, 32)
    input_ids = torch.randint(1000, 2000, (16, 10))
    input_ids[:, 0] = model.ids["cls"]
    mask = torch.ones_like(input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    itm = []
    for _ in range(120):
        out = model(images, input_ids, mask)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        itm.append(out["itm"].item())
    assert itm[0] > 0.6 and sum(itm[-10:]) / 10 < 0.3


def test_loss_switches_build_only_what_is_used():
    cfg = tiny_config(itc_weight=0.0)
    lm_only = BLIP(cfg)
    assert not hasattr(lm_only, "text_encoder") and not hasattr(lm_only, "vision_proj")
    out = lm_only(*_batch(cfg))
    assert set(out) == {"loss", "lm"}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        tiny_config(itc_weight=0.0, lm_weight=0.0)


def test_a_text_only_language_model_reads_the_captions_alone():
    """Decoder pretraining: the LM loss of a text-only model does not depend on the image, its gradient reaches the
    decoder but never its cross-attention or the vision tower, and captions ignore the image too."""
    cfg = tiny_config(itc_weight=0.0, text_only=True)
    model = BLIP(cfg)
    images, ids, mask = _batch(cfg)
    out = model(images, ids, mask)
    assert set(out) == {"loss", "lm"}
    torch.testing.assert_close(model(torch.randn_like(images), ids, mask)["lm"], out["lm"])
    out["loss"].backward()
    block = model.text_decoder.blocks[0]
    assert block.attn.q.weight.grad.abs().sum() > 0 and block.cross_attn.kv.weight.grad is None
    assert all(p.grad is None for p in model.visual_encoder.parameters())
    model.eval()
    prefix = model.decoder_prefix(2, "cpu")
    with torch.no_grad():
        embeds, _ = model.encode_image(images)
        logits, _ = model.decode_step(prefix, embeds)
        other, _ = model.decode_step(prefix, model.encode_image(torch.randn_like(images))[0])
    torch.testing.assert_close(logits, other)
    with pytest.raises(ValueError, match="text_only trains the decoder alone"):
        tiny_config(text_only=True)  # ITC is on


def test_decoder_is_causal(tiny_cfg):
    model = BLIP(tiny_cfg).eval()
    images, ids, mask = _batch(tiny_cfg)
    image_embeds, _ = model.encode_image(images)
    dec_ids = model.decoder_batch(ids, mask).input_ids
    changed = dec_ids.clone()
    changed[:, -1] = 2158
    a, _ = model.decode_step(dec_ids, image_embeds)
    b, _ = model.decode_step(changed, image_embeds)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_kv_cached_decoding_equals_full_forward(tiny_cfg):
    model = BLIP(tiny_cfg).eval()
    images, ids, mask = _batch(tiny_cfg, ["a small red circle above a blue square", "two green stars"])
    image_embeds, _ = model.encode_image(images)
    seq = model.decoder_batch(ids, mask).input_ids[:, :9]
    full, _ = model.decode_step(seq, image_embeds)
    cache = model.new_cache()
    first, _ = model.decode_step(seq[:, :4], image_embeds, cache)
    steps = [first] + [model.decode_step(seq[:, i : i + 1], image_embeds, cache)[0] for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == 9
    cache.reorder(torch.tensor([1, 1]))
    assert cache.layers[0]["self"]["k"].shape[0] == 2
    torch.testing.assert_close(cache.layers[0]["self"]["k"][0], cache.layers[0]["self"]["k"][1])


def test_decoder_input_has_dec_prompt_and_masked_labels(tiny_cfg):
    model = BLIP(tiny_cfg)
    _, ids, mask = _batch(tiny_cfg, ["a man riding a horse"])
    dec = model.decoder_batch(ids, mask)
    prompt = load_tokenizer()("a picture of ", add_special_tokens=False).input_ids
    assert dec.input_ids[0].tolist() == [30522, *prompt, 1037, 2158, 5559, 1037, 3586, 102]
    assert dec.labels[0].tolist() == [-100] * (1 + len(prompt)) + [1037, 2158, 5559, 1037, 3586, 102]


def test_seed_preset_is_the_seed_write_up():
    cfg = BlipConfig.preset("seed")
    m = cfg.model
    assert (m.image_size, m.patch_size, m.vision_width, m.max_text_len, m.vocab_size) == (224, 16, 512, 40, 30524)
    assert m.itc_weight > 0 and m.lm_weight > 0 and m.itm_weight == 0
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs, cfg.data.subset) == (8, 5e-5, 3, 10000)


# Key fields of every preset as the Python dicts + train/configs/*.toml gave them before the presets moved
# into blipcore/presets/: (model), (data, root relative to the checkout), (train).
PRESET_KEY_FIELDS = {
    "demo": ((64, 8, 192, 3, 32, 0.0, 0.0), ("shapes", "data/shapes", 0, "random", 0, 200),
             (5, 48, 1e-3, 40, 0.05, 60)),
    "seed": ((224, 16, 512, 4, 40, 0.0, 0.0), ("coco", "data/coco2017", 10000, "all", 4, 200),
             (3, 8, 5e-5, 500, 0.0, 100)),
    "coco-mini": ((96, 12, 192, 3, 32, 0.0, 0.0), ("coco", "data/coco-mini", 0, "all", 0, 66),
                  (5, 32, 5e-4, 40, 0.05, 66)),
    "flickr8k": ((224, 16, 384, 4, 40, 0.0, 0.1), ("coco", "data/flickr8k", 0, "all", 4, 500),
                 (10, 64, 3e-4, 500, 0.0, 200)),
    "flickr8k-cpu": ((96, 16, 256, 4, 40, 0.0, 0.1), ("coco", "data/flickr8k", 0, "all", 1, 1000),
                     (100, 64, 5e-4, 100, 0.1, 200)),
}


@pytest.mark.parametrize("name", sorted(PRESET_KEY_FIELDS))
def test_presets_are_the_configs_they_were(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data roots are the checkout's, whatever the current folder
    cfg = load_preset(name)
    m, d, t = cfg.model, cfg.data, cfg.train
    model, (kind, root, *data), train = PRESET_KEY_FIELDS[name]
    assert (m.image_size, m.patch_size, m.vision_width, m.text_decoder_depth, m.max_text_len, m.itm_weight,
            m.label_smoothing) == model
    assert (d.kind, d.root, d.subset, d.caption_mode, d.num_workers, d.eval_images) == (
        kind, str((PROJECT_ROOT / root).resolve()), *data)
    assert (t.epochs, t.batch_size, t.lr, t.warmup_steps, t.min_lr_ratio, t.eval_caption_images) == train
    assert cfg.name == name and BlipConfig.preset(name) == cfg


def test_presets_live_in_blipcore():
    assert set(PRESET_KEY_FIELDS) <= set(available_presets())
    assert {p.stem for p in PRESETS_DIR.glob("*.toml")} == set(available_presets())


def test_preset_files_chain_through_base_and_keep_absolute_roots(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(f'base = "coco-mini"\n[data]\nroot = "{tmp_path.as_posix()}"\n[train]\nepochs = 1\n')
    cfg = load_preset(path)
    assert cfg.name == "mine" and cfg.data.root == tmp_path.as_posix()
    assert (cfg.model.image_size, cfg.model.vision_width, cfg.train.epochs) == (96, 192, 1)  # coco-mini, then demo


@pytest.mark.parametrize(("text", "message"), [
    (None, r"unknown preset 'nope'; presets: coco-mini, demo, flickr8k, flickr8k-cpu, flickr8k-gpu, seed"),
    ("[model\n", r"mine\.toml: not a valid TOML preset"),
    ('base = "demo"\n[model]\nimage_size = "big"\n', r"mine\.toml: model\.image_size must be a whole number"),
    ('base = "nope"\n',
     r"mine\.toml: base must name a preset \(coco-mini, demo, flickr8k, flickr8k-cpu, flickr8k-gpu, seed\), "
     r"got 'nope'"),
    ("[modle]\nx = 1\n", r"mine\.toml: unknown key\(s\) modle"),
    ("[train]\nbatchsize = 1\n", r"mine\.toml: unknown field 'train\.batchsize'"),
])
def test_preset_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_preset(path if text is not None else "nope")


def test_config_json_round_trip_and_overrides():
    cfg = BlipConfig.preset("demo")
    assert BlipConfig.from_json(cfg.to_json()) == cfg
    changed = cfg.override_strings(
        ["train.batch_size=16", "model.tie_lm_head=false", "train.eval_strategies=greedy,beam"]
    )
    assert changed.train.batch_size == 16 and changed.model.tie_lm_head is False
    assert changed.train.eval_strategies == ("greedy", "beam")
    with pytest.raises(ValueError, match="unknown field"):
        cfg.override_strings(["train.batchsize=16"])
    with pytest.raises(ValueError, match="expected a value like"):
        cfg.override_strings(["train.batch_size=big"])
    with pytest.raises(ValueError, match="not divisible"):
        cfg.override({"model.vision_heads": 5})


@pytest.mark.parametrize(("override", "message"), [
    ({"model.vision_heads": 0}, r"model\.vision_heads must be >= 1, got 0"),
    ({"model.patch_size": 0}, r"model\.patch_size must be >= 1, got 0"),
    ({"model.dropout": 1.0}, r"model\.dropout must be < 1"),
    ({"model.vocab_size": 100}, r"model\.vocab_size must be >= 30524"),
    ({"model.temperature_init": 0.9}, r"model\.temperature_init must lie in"),
    ({"model.itm_weight": -1.0}, r"model\.itm_weight must be >= 0"),
    ({"data.eval_images": 0}, r"data\.eval_images must be >= 1"),
    ({"data.kind": "imagenet"}, r"data\.kind must be one of shapes, coco"),
    ({"data.caption_mode": "first"}, r"data\.caption_mode must be one of random, all"),
    ({"train.batch_size": 0}, r"train\.batch_size must be >= 1, got 0"),
    ({"train.epochs": 0}, r"train\.epochs must be >= 1"),
    ({"train.lr": float("nan")}, r"train\.lr must be a positive number"),
    ({"train.betas": [0.9, 1.0]}, r"train\.betas must be two numbers in \[0, 1\)"),
    ({"train.device": "tpu"}, r"train\.device must be one of auto, cpu, cuda"),
    ({"train.precision": "fp16"}, r"train\.precision must be one of auto, bf16, fp32"),
    ({"train.warmup_steps": -1}, r"train\.warmup_steps must be >= 0"),
    # wrong types, as a hand-edited run.json or sidecar would have them
    ({"model.image_size": 64.5}, r"model\.image_size must be a whole number, got 64\.5"),
    ({"model.tie_lm_head": 1}, r"model\.tie_lm_head must be true or false, got 1"),
    ({"model.prompt": 3}, r"model\.prompt must be a string, got 3"),
    ({"train.eval_strategies": "greedy"}, r"train\.eval_strategies must be a list, got 'greedy'"),
    ({"train.eval_strategies": ["greedy", 2]}, r"train\.eval_strategies\[1\] must be a string, got 2"),
])
def test_config_values_out_of_range_or_of_the_wrong_type_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        BlipConfig.preset("demo").override(override)


def test_config_fields_keep_their_types_from_json():
    cfg = BlipConfig.preset("demo").override({"train.lr": 1, "train.betas": [0, 0.5]})  # JSON and TOML give ints
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.betas == (0.0, 0.5)


def test_readme_snippet_seed_model():
    cfg = BlipConfig.preset("seed")
    model = BLIP(cfg)
    tok = load_tokenizer()
    enc = tok(["a man riding a horse", "a dog"], padding=True, return_tensors="pt")
    out = model(torch.randn(2, 3, 224, 224), enc.input_ids, enc.attention_mask)
    assert 50_000_000 < model.num_parameters() < 100_000_000
    assert set(out) == {"loss", "itc", "lm"} and all(torch.isfinite(v) for v in out.values())


def test_a_sigmoid_itc_model_learns_its_bias_and_trains():
    cfg = tiny_config(itc_loss="sigmoid", itm_weight=0.5)
    model = BLIP(cfg)
    assert model.itc_bias.item() == -10.0 and "itc_bias" in model.state_dict()
    images, ids, mask = _batch(cfg, ["a", "b c", "d e f", "g"])
    out = model(images, ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    assert set(out) == {"loss", "itc", "lm", "itm"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.itc_bias.grad is not None and model.temp.grad is not None
    assert not hasattr(BLIP(tiny_config()), "itc_bias")  # the softmax loss has no bias


@pytest.mark.parametrize(("override", "message"), [
    ({"model.itc_loss": "sigmoid", "model.momentum_encoder": True}, r"cannot be combined with model\.momentum_encoder"),
    ({"model.itc_loss": "hinge"}, r"model\.itc_loss must be one of softmax, sigmoid"),
    ({"model.patch_embed": "conv-stem", "model.patch_size": 12, "model.image_size": 96},
     r"model\.patch_size must be a power of 2"),
    ({"model.patch_embed": "conv-stem", "model.shifted_patches": True}, r"cannot be combined with model\.patch_embed"),
    ({"model.patch_embed": "resnet"}, r"model\.patch_embed must be one of linear, conv-stem"),
    ({"model.drop_path": 1.0}, r"model\.drop_path must be < 1"),
    ({"model.drop_path": -0.1}, r"model\.drop_path must be >= 0"),
    ({"data.augment": "mixup"}, r"data\.augment must be one of none, crop, crop-jitter"),
])
def test_small_data_options_that_cannot_work_are_refused_at_config_time(override, message):
    with pytest.raises(ValueError, match=message):
        BlipConfig.preset("demo").override(override)
