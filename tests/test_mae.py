"""MAE image pretraining (model.mae, blipcore.model.mae): the masking, the loss against a hand computation, the
encoder on the visible patches only, the config's refusals, a tiny MAE run trained and evaluated through the Trainer,
a BLIP run seeded from its encoder with train.init, its FLOPs against torch's counter, the study's view of an
image-only run, and the small-data plan's FLOPs budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blipcore import BLIP
from blipcore.data import build_datasets
from blipcore.experiments.study import (
    completed_result,
    load_plan,
    parse_plan,
    planned_config,
    reported_evaluation,
    reported_runs,
    run_dir,
    run_rows,
    study_rows,
)
from blipcore.model.config import BlipConfig
from blipcore.model.flops import forward_flops, training_flops, training_step_flops
from blipcore.model.mae import (
    MAEDecoder,
    encode_visible,
    mae_loss,
    masked_autoencoder_loss,
    patch_targets,
    patchify,
    random_masking,
)
from blipcore.model.vision import VisionTransformer
from blipcore.model.vocabulary import training_word_pieces
from blipcore.paths import PROJECT_ROOT
from blipcore.runs.rundir import RunDir
from blipcore.training.trainer import Trainer
from tests.conftest import PHOTOS, SHAPES_PARAMS, small_cfg, tiny_config, tiny_preset_toml
from train.cli import main

# tiny_config's 32x32 images in 8-pixel patches: 16 patches, 4 of them visible at the default ratio 0.75
MAE = {"mae": True, "itc_weight": 0.0, "lm_weight": 0.0, "mae_decoder_width": 32, "mae_decoder_heads": 2,
       "mae_decoder_depth": 1}


def _images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- masking, targets, loss ------------------------------------------------------------------------------------
def test_masking_keeps_the_same_number_of_patches_per_image_a_different_set_each_and_is_seeded():
    patches, ratio = 36, 0.75
    visible = round((1 - ratio) * patches)
    assert visible == 9 == tiny_config(**MAE, image_size=96, patch_size=16).model.mae_visible_patches()
    masking = random_masking(8, patches, visible, generator=torch.Generator().manual_seed(0))
    assert masking.keep.shape == (8, visible) and masking.mask.shape == masking.restore.shape == (8, patches)
    assert (masking.mask.sum(dim=1) == patches - visible).all()
    for keep, mask in zip(masking.keep, masking.mask, strict=True):  # the kept patches are the unmasked ones
        assert len(set(keep.tolist())) == visible and set(keep.tolist()) == set((mask == 0).nonzero()[:, 0].tolist())
    assert len({tuple(sorted(keep.tolist())) for keep in masking.keep}) == 8  # each image its own set
    again = random_masking(8, patches, visible, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.keep, masking.keep) and torch.equal(again.mask, masking.mask)
    other = random_masking(8, patches, visible, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.mask, masking.mask)
    # restore puts [visible tokens, mask tokens] in patch order: patch keep[j] takes visible token j, a hidden patch
    # one of the mask tokens
    assert torch.equal(masking.restore.gather(1, masking.keep), torch.arange(visible).expand(8, -1))
    assert (masking.restore[masking.mask == 1] >= visible).all()
    assert torch.equal(masking.restore.sort(dim=1).values, torch.arange(patches).expand(8, -1))


def test_patches_come_row_by_row_as_the_vits_tokens_and_targets_are_normalised_per_patch():
    p, grid = 4, 3
    images = torch.zeros(2, 3, grid * p, grid * p)
    for row in range(grid):
        for col in range(grid):
            images[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p] = row * grid + col
    patches = patchify(images, p)
    assert patches.shape == (2, grid * grid, 3 * p * p)
    assert torch.equal(patches, torch.arange(grid * grid).float().view(1, -1, 1).expand(2, -1, 3 * p * p))
    noisy = _images(batch=2, size=12) * 3 + 5
    targets = patch_targets(noisy, p)
    torch.testing.assert_close(targets.mean(dim=-1), torch.zeros(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.var(dim=-1), torch.ones(2, 9), atol=1e-4, rtol=0)
    raw = patchify(noisy, p)
    torch.testing.assert_close(targets, (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt())
    assert torch.equal(patch_targets(images, p), torch.zeros_like(patches))  # a flat patch has nothing to predict


def test_the_loss_is_the_mean_squared_error_on_the_hidden_patches_only():
    pred = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])  # (B=1, N=3, D=2)
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third patch is visible: its error of 25 does not count
    assert mae_loss(pred, target, mask).item() == pytest.approx((1 + 2) / 2)  # patch means 1 and 2

    torch.manual_seed(0)
    cfg = tiny_config(**MAE).model
    vit, decoder, images = VisionTransformer(cfg), MAEDecoder(cfg), _images()
    set_output = torch.randn(3, 16, 3 * 8 * 8)
    decoder.forward = lambda tokens, restore: set_output  # the decoder's output, set by hand
    loss = masked_autoencoder_loss(vit, decoder, images, 4, torch.Generator().manual_seed(5))
    mask = random_masking(3, 16, 4, generator=torch.Generator().manual_seed(5)).mask
    target = patchify(images, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = sum(((set_output[b, n] - target[b, n]) ** 2).mean() for b in range(3) for n in range(16)
                  if mask[b, n]) / (3 * 12)
    torch.testing.assert_close(loss, by_hand)
    set_output[mask == 0] += 100.0  # the visible patches' predictions change nothing
    torch.testing.assert_close(masked_autoencoder_loss(vit, decoder, images, 4, torch.Generator().manual_seed(5)),
                               by_hand)


def test_the_encoder_reads_the_visible_patches_only():
    torch.manual_seed(0)
    vit = VisionTransformer(tiny_config(**MAE).model).eval()
    images = _images()
    with torch.no_grad():  # every patch kept in order: the encoder's own forward
        assert torch.equal(encode_visible(vit, images, torch.arange(16).expand(3, -1)), vit(images)[0])
        masking = random_masking(3, 16, 4, generator=torch.Generator().manual_seed(0))
        tokens = encode_visible(vit, images, masking.keep)
        assert tokens.shape == (3, 1 + 4, 64)
        changed = images.clone()  # new pixels in every hidden patch leave the visible tokens as they were
        hidden = masking.mask.view(3, 1, 4, 1, 4, 1).expand(3, 3, 4, 8, 4, 8).reshape(3, 3, 32, 32)
        changed[hidden == 1] = torch.randn(int((hidden == 1).sum()))
        assert torch.equal(encode_visible(vit, changed, masking.keep), tokens)


# --- config and model --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"mae": True, "itc_weight": 0.0}, "model.mae trains the image encoder alone: it needs itc_weight = lm_weight"),
    ({**MAE, "itm_weight": 0.5}, "ITM draws its hard negatives"),
    ({**MAE, "patch_embed": "conv-stem"}, "model.mae cannot be combined with model.patch_embed = 'conv-stem'"),
    ({**MAE, "shifted_patches": True}, "model.mae cannot be combined with model.shifted_patches"),
    ({**MAE, "text_only": True, "lm_weight": 1.0}, "model.mae trains the image encoder alone and model.text_only"),
    ({**MAE, "mae_mask_ratio": 1.0}, r"model.mae_mask_ratio must be in \(0, 1\)"),
    ({**MAE, "mae_mask_ratio": math.nan}, r"model.mae_mask_ratio must be in \(0, 1\)"),
    ({**MAE, "mae_mask_ratio": 0.99}, "must leave at least one patch visible"),  # 16 patches: round(0.16) = 0
    ({**MAE, "mae_mask_ratio": 0.01}, "and hide at least one"),
    ({**MAE, "mae_decoder_width": 30, "mae_decoder_heads": 4},
     "model.mae_decoder_width=30 is not divisible by model.mae_decoder_heads=4"),
    ({**MAE, "mae_decoder_depth": 0}, "model.mae_decoder_depth must be >= 1"),
    ({"itc_weight": 0.0, "lm_weight": 0.0}, r"every loss weight is 0: enable at least one of itc, lm, itm \(or"),
])
def test_mae_configs_that_cannot_work_are_refused_naming_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_an_mae_model_is_the_vit_and_its_decoder_and_reads_no_text():
    torch.manual_seed(0)
    cfg = tiny_config(**MAE)
    model = BLIP(cfg)
    assert {name.split(".")[0] for name in model.state_dict()} == {"visual_encoder", "mae_decoder"}
    blip = BLIP(tiny_config())  # the encoder's parameter names and shapes are a BLIP model's
    vision = {k: v.shape for k, v in blip.state_dict().items() if k.startswith("visual_encoder.")}
    assert {k: v.shape for k, v in model.state_dict().items() if k.startswith("visual_encoder.")} == vision
    assert not (model.use_itc or model.use_lm or model.use_itm)
    images = _images()
    out = model(images, None, None)
    assert set(out) == {"loss", "mae"} and out["loss"] is out["mae"] and 0.5 < out["mae"].item() < 2
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()  # evaluation hides the same patches every time, and leaves the global random stream alone
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(images, None, None)["mae"], model(images, None, None)["mae"]
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)
    tokens, feat = model.encode_image(images)  # the whole image still encodes (nearest neighbours, attention maps)
    assert tokens.shape == (3, 17, 64) and feat is None


# --- FLOPs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"mae_mask_ratio": 0.5, "mae_decoder_depth": 2, "vision_depth": 1}],
                         ids=["default-ratio", "half-masked"])
def test_mae_flops_match_torch_flop_counter(overrides):
    """blipcore.model.flops' MAE step against FlopCounterMode: the encoder on the visible tokens, the decoder on every
    patch, forward and forward + backward (the patch embedding computes no gradient for the images)."""
    cfg = tiny_config(**{**MAE, "image_size": 64, "vision_width": 32, **overrides})
    torch.manual_seed(0)
    model = BLIP(cfg).train()
    images = _images(batch=3, size=64)
    forward = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), forward, torch.no_grad():
        model(images, None, None)
    parts = forward_flops(cfg, 3, 8)
    assert set(parts) == {"vision", "mae_decoder"} and sum(parts.values()) == forward.get_total_flops()
    step = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), step:
        model(images, None, None)["loss"].backward()
    assert training_step_flops(cfg, 3, 8) == sum(training_flops(cfg, 3, 8).values()) == step.get_total_flops()


# --- training, evaluation, train.init ----------------------------------------------------------------------------
def mae_cfg(shapes_root: Path, **train) -> BlipConfig:
    """small_cfg's data and schedule with the tiny MAE model, and the held-out scenes as a test split."""
    return small_cfg(shapes_root, model=MAE, **train).override(
        {"data.test_annotations": "annotations/captions_heldout.json"})


@pytest.fixture(scope="module")
def mae_study(tmp_path_factory, shapes_root) -> Path:
    """A study folder holding one completed MAE run, image-pretraining-mae-seed0 (2 epochs of 8 steps)."""
    study = tmp_path_factory.mktemp("study")
    Trainer(mae_cfg(shapes_root), run_dir(study, "image-pretraining", "mae", 0), progress=False).fit()
    return study


def test_a_tiny_mae_run_trains_its_loss_falls_and_its_evaluation_is_its_validation_loss(mae_study):
    run = RunDir(run_dir(mae_study, "image-pretraining", "mae", 0))
    assert run.read_info()["status"] == "completed"
    train = [line for line in run.read_metrics() if line["split"] == "train"]
    assert set(train[0]) >= {"loss", "mae"} and "itc" not in train[0] and train[0]["temperature"] is None
    assert train[-1]["mae"] < train[0]["mae"]
    evaluation = run.load_eval(2)
    assert set(evaluation["losses"]) == {"val_mae", "val_loss"}
    assert evaluation["losses"]["val_mae"] < run.load_eval(1)["losses"]["val_mae"]
    assert not {"strategies", "reference_rows", "retrieval", "matching"} & set(evaluation)
    assert run.load_eval(2)["losses"]["val_mae"] == run.read_info()["best"]["val_mae"]["value"]
    assert not run.embeddings_path(2).exists()  # no ITC embedding to dump


def test_train_init_from_an_mae_run_seeds_a_blip_runs_encoder_and_leaves_its_text_towers_fresh(
        mae_study, shapes_root, tmp_path):
    mae_run = RunDir(run_dir(mae_study, "image-pretraining", "mae", 0))
    mae_model, _, _ = mae_run.load_model(2)
    blip_cfg = small_cfg(shapes_root, epochs=1, max_steps=2).override(
        {"model.vocabulary": "captions", "train.init": str(mae_run.path)})
    pieces = training_word_pieces(build_datasets(blip_cfg, splits=("train",))["train"], blip_cfg.model.prompt)
    blip_cfg = blip_cfg.override({"model.vocab_size": len(pieces)})
    trainer = Trainer(blip_cfg, tmp_path / "blip", progress=False)
    torch.manual_seed(0)
    trainer.model = BLIP(blip_cfg, pieces)
    fresh = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    spec = blip_cfg.train.init
    report = trainer._load_init_weights(spec, *trainer._read_init_weights(spec))  # what fit() does with train.init
    state = trainer.model.state_dict()
    encoder = {name: tensor for name, tensor in mae_model.state_dict().items() if name.startswith("visual_encoder.")}
    assert report["loaded_tensors"] == len(encoder) and set(report["dropped"]) == {"mae_decoder"}
    assert {"word_embeddings", "text_encoder", "text_decoder", "vision_proj", "text_proj"} <= set(report["new"])
    assert "visual_encoder" not in report["new"]
    for name, tensor in state.items():
        expected = encoder[name] if name in encoder else fresh[name]
        assert torch.equal(tensor, expected), name
    # and through fit: a BLIP run with a compact vocabulary starts from the MAE run's encoder
    summary = Trainer(blip_cfg, tmp_path / "fit", progress=False).fit()
    info = RunDir(tmp_path / "fit").read_info()
    assert summary["status"] == "completed" and info["init"]["loaded_tensors"] == len(encoder)


@pytest.mark.parametrize("data", ["coco", "shapes"])
def test_python_m_train_fit_trains_an_mae_config_on_a_coco_folder_and_on_generated_shapes(data, shapes_root,
                                                                                           tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text(tiny_preset_toml("coco-mini" if data == "coco" else "demo", eval_images=4, lr=1e-3))
    root = PHOTOS if data == "coco" else shapes_root
    sets = ["model.mae=true", "model.itc_weight=0", "model.lm_weight=0", "model.mae_decoder_width=32",
            "model.mae_decoder_heads=2", "model.mae_decoder_depth=1",
            *(f"data.shapes_{k}={v}" for k, v in SHAPES_PARAMS.items() if data == "shapes")]
    args = ["fit", "--preset", str(preset), "--data-root", str(root), "--run-dir", str(tmp_path / "mae"),
            "--max-steps", "3", "--no-progress", *(arg for value in sets for arg in ("--set", value))]
    assert main(args) == 0
    run = RunDir(tmp_path / "mae")
    assert run.read_info()["status"] == "completed" and run.config().model.mae
    assert set(run.load_eval(run.eval_epochs()[-1])["losses"]) == {"val_mae", "val_loss"}


# --- the study ----------------------------------------------------------------------------------------------------
def test_a_completed_image_only_run_is_a_study_result_reported_on_val_with_no_caption_rows(mae_study):
    run = RunDir(run_dir(mae_study, "image-pretraining", "mae", 0))
    epoch, split, chosen, evaluation = reported_evaluation(run)  # no test evaluation asked for, though it has a split
    assert (epoch, split, chosen) == (2, "val", "") and "val_mae" in evaluation["losses"]
    result = completed_result(run)
    assert result is not None and result.train_seconds > 0 and result.evaluation["losses"] == evaluation["losses"]
    assert [e["label"] for e in result.history["evaluations"]] == ["epoch_001", "epoch_002"]
    assert result.history["train"] and "loss" in result.history["train"][0]
    plan = parse_plan({"name": "mae", "preset": "demo", "seeds": [0],
                       "stage": [{"name": "image-pretraining", "variants": {"mae": {}}}]})
    reported = reported_runs(plan, mae_study)
    assert list(reported[("image-pretraining", "mae")]) == [0]
    assert study_rows(plan, reported) == []  # no caption metric rows with made-up numbers
    (row,) = run_rows(plan, reported)
    assert row["run"] == "image-pretraining-mae-seed0" and row["split"] == "val" and row["chosen"] == ""


def test_the_small_data_plans_image_pretraining_costs_the_references_flops():
    """The round-2 pair (MAE steps, then BLIP steps from its encoder) costs the reference's 1,800 steps, counted with
    blipcore.model.flops at the flickr8k-cpu preset's batch, 16-token captions and the training captions' 6,646 word
    pieces, within 2 %."""
    plan = load_plan(PROJECT_ROOT / "studies" / "small-data.toml")
    stages = {stage.name: stage for stage in plan.stages}

    def cost(stage: str, variant: str) -> tuple[float, BlipConfig]:
        cfg = planned_config(plan, Path("study"), stages[stage], variant, 0).override({"model.vocab_size": 6646})
        return training_step_flops(cfg, cfg.train.batch_size, 16) * cfg.train.max_steps, cfg

    reference, ref_cfg = cost("screening", "reference")
    pretraining, mae = cost("image-pretraining", "mae")
    recipe, blip = cost("self-supervised", "mae-init")
    assert ref_cfg.train.max_steps == 1800 and ref_cfg.train.batch_size == 64
    assert mae.model.mae and mae.train.eval_strategies == () and blip.train.init.endswith("image-pretraining-mae-seed0")
    assert blip.model == ref_cfg.model and mae.train.batch_size == 64
    assert abs((pretraining + recipe) / reference - 1) < 0.02
    assert 0.25 < pretraining / reference < 0.4  # about a third of the budget
