"""The evaluation the trainer and `python -m train eval` share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blipcore import BLIP
from blipcore.data import build_datasets
from blipcore.evaluation import collapse, retrieval
from blipcore.evaluation.evaluator import (
    eval_images,
    evaluate_model,
    itm_match_logits,
    matching_auc,
    mismatched_pairs,
    most_frequent_row,
    rerank_top_k,
    summary_metrics,
)
from blipcore.model.tokenizer import tokenize_captions
from tests.conftest import small_cfg, tiny_config


def test_reranking_with_an_oracle_fixes_every_pair_inside_the_top_k():
    rng = np.random.default_rng(0)
    text_to_image = np.repeat(np.arange(6), 2)  # 6 images, 2 captions each
    sim = rng.normal(size=(6, 12))
    oracle = lambda pairs: np.array([10.0 if text_to_image[j] == i else 0.0 for i, j in pairs])  # noqa: E731
    scores = rerank_top_k(sim, k=12, score_pairs=oracle)  # every pair is a candidate
    assert retrieval.retrieval_metrics(scores, text_to_image)["i2t_r1"] == 100.0
    assert retrieval.retrieval_metrics(scores, text_to_image)["t2i_r1"] == 100.0
    narrow = rerank_top_k(sim, k=1, score_pairs=oracle)  # only ITC's single best candidate is re-scored
    hits = [text_to_image[np.argmax(sim[i])] == i for i in range(6)]
    assert retrieval.retrieval_metrics(narrow, text_to_image)["i2t_r1"] >= 100.0 * np.mean(hits)


def test_itm_reranking_runs_on_a_model_with_an_itm_head(shapes_root):
    cfg = small_cfg(shapes_root, model={"itm_weight": 1.0})
    torch.manual_seed(0)
    result, _ = evaluate_model(BLIP(cfg), cfg, build_datasets(cfg), torch.device("cpu"), strategies=[], progress=False)
    assert {"itm_i2t_r1", "itm_t2i_r10", "itm_rsum"} <= set(result["retrieval"])
    assert set(result["matching"]) == {"itc_match_auc", "itm_match_auc"}
    assert all(0.0 <= value <= 1.0 for value in result["matching"].values())
    assert set(result["matching"]) <= set(summary_metrics(result))
    assert {"losses", "itc_retrieval", "itm_retrieval", "matching"} <= set(result["seconds"])  # where the time went
    assert all(seconds >= 0 for seconds in result["seconds"].values())


def test_itm_logits_of_length_sorted_batches_equal_each_pair_scored_alone():
    cfg = tiny_config(itm_weight=1.0)
    torch.manual_seed(0)
    model = BLIP(cfg).eval()
    image_tokens = torch.randn(3, 5, cfg.model.vision_width)
    captions = ["a dog", "a very small brown dog runs across a wide green field of grass", "two cats sit",
                "a man in a red shirt", "the sky"]
    rng = np.random.default_rng(0)
    pairs = [(int(i), int(j)) for i, j in zip(rng.integers(0, 3, 11), rng.integers(0, 5, 11), strict=True)]
    batched = itm_match_logits(model, image_tokens, captions, pairs, cfg, torch.device("cpu"), batch_size=4)
    alone = []  # each pair by itself: no padding at all, in the pairs' order
    for i, j in pairs:
        tokens = tokenize_captions([captions[j]], cfg.model.max_text_len)
        alone.append(model.itm_logits(image_tokens[[i]], tokens["input_ids"], tokens["attention_mask"])[0, 1].item())
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(np.round(batched, 4))) > 3  # the pairs really differ: order mistakes would show
    assert itm_match_logits(model, image_tokens, captions, [], cfg, torch.device("cpu")).shape == (0,)


def _embedded(image_embeds: np.ndarray, text_embeds: np.ndarray, captions_per_image: int) -> dict[str, np.ndarray]:
    n = len(image_embeds)
    return {"image_embeds": image_embeds, "all_text_embeds": text_embeds,
            "text_to_image": np.repeat(np.arange(n), captions_per_image),
            "all_captions": np.array([f"caption {j}" for j in range(n * captions_per_image)])}


def test_mismatched_pairs_give_each_image_its_first_caption_and_another_images():
    embedded = _embedded(np.zeros((7, 4)), np.zeros((21, 4)), captions_per_image=3)
    pairs, matches = mismatched_pairs(embedded)
    assert matches.tolist() == [True] * 7 + [False] * 7
    assert pairs[:7] == [(i, 3 * i) for i in range(7)]
    for image, text in pairs[7:]:
        assert text % 3 == 0 and embedded["text_to_image"][text] != image
    assert [image for image, _ in pairs[7:]] == list(range(7))
    assert mismatched_pairs(embedded)[0] == pairs  # seeded: the same pairs at every evaluation


def test_match_auc_is_the_roc_auc_of_the_scores_of_matching_against_mismatched_pairs():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 8))
    texts = np.repeat(images, 2, axis=0) + rng.normal(scale=2.0, size=(80, 8))  # noisy copies: informative
    embedded = _embedded(images, texts, captions_per_image=2)
    pairs, matches = mismatched_pairs(embedded)
    scores = [float(images[i] @ texts[j]) for i, j in pairs]

    class ConstantItm:  # an ITM head that says the same for every pair: chance
        def itm_logits(self, image_tokens, input_ids, attention_mask):
            return torch.zeros(len(input_ids), 2)

    cfg = tiny_config()
    result = matching_auc(ConstantItm(), embedded, torch.zeros(40, 3, 4), cfg, torch.device("cpu"))
    assert result["itc_match_auc"] == pytest.approx(roc_auc_score(matches, scores))
    assert 0.6 < result["itc_match_auc"] < 1.0
    assert result["itm_match_auc"] == 0.5
    perfect = _embedded(np.eye(6), np.eye(6), captions_per_image=1)
    assert matching_auc(None, perfect, None, cfg, torch.device("cpu")) == {"itc_match_auc": 1.0}


def test_reference_row_is_computed_once_per_data(shapes_root):
    cfg = small_cfg(shapes_root)
    datasets = build_datasets(cfg)
    data = eval_images(datasets["val"], 6)
    first = most_frequent_row(datasets["train"], data, meteor=False)
    assert most_frequent_row(datasets["train"], data, meteor=False) is first
    assert first["metrics"]["top_caption_share"] == 1.0 and first["caption"]


def test_nearest_neighbour_row_retrieves_the_captions_of_the_nearest_training_image(shapes_root):
    from blipcore.data import CaptionDataset, build_transform
    from blipcore.evaluation.evaluator import nearest_neighbour_row

    cfg = small_cfg(shapes_root)
    torch.manual_seed(0)
    model = BLIP(cfg).eval()
    train = build_datasets(cfg)["train"]
    # evaluation images that are training images: each one's nearest training image is itself
    seen = eval_images(CaptionDataset(train.records[:6], build_transform(cfg.model.image_size, train=False)), 6)
    row = nearest_neighbour_row(model, cfg, train, seen, torch.device("cpu"), meteor=False, neighbours=1)
    assert row["train_images"] == len(train.records) and row["neighbours"] == 1
    for sample, record in zip(row["samples"], seen.records, strict=True):
        assert sample["caption"] in record.captions
    assert row["metrics"]["memorised_share"] == 1.0 and row["metrics"]["cider"] > 1.0  # its own references


def test_evaluation_result_and_summary(shapes_root):
    cfg = small_cfg(shapes_root)
    torch.manual_seed(0)
    model = BLIP(cfg)
    result, dump = evaluate_model(model, cfg, build_datasets(cfg), torch.device("cpu"), ["greedy", "beam"],
                                  caption_images=4, progress=False)
    assert result["num_images"] == 8 and "SPICE" in result["spice"]
    assert set(result["strategies"]) == {"greedy", "beam"}
    assert len(result["strategies"]["beam"]["samples"]) == 4
    flat = summary_metrics(result)
    assert {"val_loss", "i2t_r1", "greedy_cider", "beam_repetition_rate", "greedy_memorised_share",
            "most-frequent_cider", "nearest-neighbour_cider"} <= set(flat)
    assert set(result["reference_rows"]) == {"most-frequent", "nearest-neighbour"}
    assert set(result["seconds"]) == {"images", "losses", "itc_retrieval", "matching", "decode_greedy", "score_greedy",
                                      "decode_beam", "score_beam", "reference_rows"}  # no ITM head: no ITM phase
    assert dump["image_embeds"].shape == (8, 32) and np.isfinite(dump["temperature"])
    sim = dump["image_embeds"] @ dump["text_embeds"].T
    assert sim.shape == (8, 8) and np.all(np.abs(sim) <= 1.0 + 1e-5)


def test_eval_on_another_dataset_writes_its_own_file_and_keeps_the_runs_reference_rows(tiny_runs_dir, tmp_path,
                                                                                         capsys):
    """`eval --data-root DIR --annotations FILE --split NAME`: the 10 val photos of tests/fixtures/coco-cc-by as a
    second test set of a run trained on shapes; the reference rows still quote the run's own training captions."""
    import shutil

    from blipcore.runs.rundir import RunDir
    from tests.conftest import PHOTOS, PHOTOS_VAL
    from train.cli import main

    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_runs_dir / "tiny", run_dir)  # the shared run stays read-only
    coco_mini = PHOTOS
    args = ["eval", "--run-dir", str(run_dir), "--epoch", "2", "--strategies", "greedy", "--no-meteor"]
    assert main([*args, "--data-root", str(coco_mini), "--annotations", "annotations/captions_val.json",
                 "--split", "coco-mini"]) == 0
    result = RunDir(run_dir).load_eval(2, split="coco-mini")
    references = json.loads((coco_mini / "annotations/captions_val.json").read_text())
    assert result["num_images"] == len(references["images"]) == PHOTOS_VAL
    shapes = Path(RunDir(run_dir).config().data.root) / "annotations/captions_train.json"
    shapes_captions = collapse.normalised_captions(a["caption"] for a in json.loads(shapes.read_text())["annotations"])
    # "learned nothing" from *its* data: a shapes caption
    assert result["reference_rows"]["most-frequent"]["caption"] in shapes_captions
    assert RunDir(run_dir).load_eval(2)["num_images"] != PHOTOS_VAL  # the val evaluation is untouched
    capsys.readouterr()
    assert main([*args, "--data-root", str(coco_mini), "--annotations", "annotations/captions_val.json"]) == 2
    assert "its own name" in capsys.readouterr().err
    assert main([*args, "--data-root", str(coco_mini)]) == 2
    assert "go with --annotations" in capsys.readouterr().err
    assert main([*args, "--annotations", "nope.json", "--split", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
