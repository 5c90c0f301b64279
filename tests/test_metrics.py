"""Tests of the metric registry (blipcore.evaluation.metrics) and its computations: captioning scores against
pycocoevalcap, collapse, retrieval."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blipcore.evaluation import captioning, metrics
from blipcore.evaluation.captioning import caption_metrics, most_frequent_caption_baseline
from blipcore.evaluation.collapse import collapse_metrics, words
from blipcore.evaluation.metrics import SPICE_NOTE, format_metrics_table
from blipcore.evaluation.retrieval import retrieval_metrics, retrieval_metrics_from_ranks, topk_candidates

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java not installed")

REFERENCES = {
    1: ["A dog runs on the grass.", "A brown dog running in a field.", "The dog is playing outside."],
    2: ["Two people ride bicycles down a street.", "Cyclists on a city road."],
    3: ["A man in a red shirt climbs a rock.", "A climber scales a cliff.", "Man rock climbing.",
        "A person climbing up a large rock face.", "Someone climbs a steep wall of rock."],
    4: ["A child eats ice cream.", "A little girl with an ice cream cone.", "Kid eating dessert."],
    5: ["A black cat sleeps on a sofa.", "A cat napping on the couch."],
    7: ["Boats in a harbour at sunset.", "Several boats docked in the water.", "A marina at dusk.",
        "Sail boats on calm water."],
}
PREDICTIONS = {  # includes an empty and a punctuation-only caption: they must score, not crash
    1: "a dog running on the grass",
    2: "a man rides a bicycle on a street",
    3: "",
    4: "a child eating an ice cream cone .",
    5: "...",
    7: "boats boats boats boats",
}
CAPTION_KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "notes"}


def _pycocoevalcap_direct(predictions, references) -> dict[str, float]:
    """Scores computed the documented pycocoevalcap way, independently of blipcore."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scorer = meteor_module.Meteor()
    meteor, _ = scorer.compute_score(gts, res)
    captioning._close_meteor(scorer)  # pycocoevalcap's __del__ leaves the pipes open
    return {
        **{f"bleu{n + 1}": b for n, b in enumerate(bleu)},
        "meteor": meteor,
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


@pytest.fixture(scope="module")
def scored():
    """caption_metrics on the hand-made set (the one METEOR run), with the Meteor instances seen."""
    started = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", RecordingMeteor)
        result = caption_metrics(PREDICTIONS, REFERENCES)
    return result, started


@needs_java
def test_caption_metrics_equal_pycocoevalcap(scored):
    result, _ = scored
    assert set(result) == CAPTION_KEYS
    assert result["notes"] == []
    expected = _pycocoevalcap_direct(PREDICTIONS, REFERENCES)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(result[key], float)
    assert 0 < result["bleu1"] < 1 and result["cider"] > 0


@needs_java
def test_meteor_java_process_is_stopped(scored):
    _, started = scored
    assert len(started) == 1
    process = started[0].meteor_p
    assert process.poll() is not None
    assert not started[0].lock.locked()


def test_perfect_beats_collapsed():
    references = {i: [c] * 3 for i, c in enumerate(
        ["a dog runs on the grass", "two people ride bicycles down a street",
         "a man in a red shirt climbs a rock", "a child eats an ice cream cone"])}
    perfect = caption_metrics({i: r[0] for i, r in references.items()}, references, meteor=False)
    collapsed = caption_metrics({i: "a a a a" for i in references}, references, meteor=False)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] > collapsed["cider"] + 1
    assert perfect["meteor"] is None
    assert perfect["notes"] == ["METEOR skipped on request (meteor=False)"]


def test_without_java_falls_back(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    result = caption_metrics(PREDICTIONS, REFERENCES)
    assert set(result) == CAPTION_KEYS
    assert result["meteor"] is None
    assert any("Java not found" in n and "pure Python" in n for n in result["notes"])
    assert any(n.startswith("METEOR skipped") for n in result["notes"])
    assert 0 < result["bleu1"] < 1 and result["cider"] > 0
    # identical references and predictions stay perfect under the fallback tokenization
    same = caption_metrics({1: "A dog, running."}, {1: ["a dog running"]}, meteor=False)
    assert same["bleu1"] == pytest.approx(1.0)


@needs_java
def test_broken_java_tools_degrade_without_hanging(monkeypatch):
    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "missing.jar")
    monkeypatch.setattr(meteor_module, "METEOR_JAR", "missing.jar")
    result = caption_metrics(PREDICTIONS, REFERENCES)
    assert result["meteor"] is None
    assert any(n.startswith("PTB tokenizer failed") for n in result["notes"])
    assert any(n.startswith("METEOR failed") for n in result["notes"])
    assert result["cider"] > 0


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({}, REFERENCES, "empty"),
        ({1: "a dog", 99: "a cat"}, REFERENCES, "no references"),
        ({1: "a dog"}, {1: []}, "no references"),
        ({1: None}, REFERENCES, "string"),
    ],
)
def test_caption_metrics_validation(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        caption_metrics(predictions, references, meteor=False)


def test_words():
    assert words("A dog's toy, black-and-white... !") == ["a", "dog's", "toy", "black-and-white"]
    assert words("  ") == []


def test_collapse_repeated_word():
    result = collapse_metrics(["a a a a"])
    assert result["repetition_rate"] == 0.75
    assert result["longest_run"] == 4 and result["max_longest_run"] == 4
    assert result["distinct_1"] == 0.25
    assert result["distinct_2"] == pytest.approx(1 / 3)
    assert result["vocab_used"] == 1 and result["mean_length"] == 4
    assert result["mean_entropy"] is None
    # every collapse metric but memorisation, which needs the training captions (evaluation adds it)
    assert set(result) == {m.key for m in metrics.metrics_in("collapse")} - {"memorised_share"}


def test_collapse_identical_and_distinct_corpora():
    same = collapse_metrics(["A dog runs.", "a dog runs", "A DOG RUNS!"])
    assert same["top_caption_share"] == 1.0 and same["unique_captions"] == 1
    assert same["top_caption"] == "a dog runs"
    assert same["distinct_1"] == pytest.approx(3 / 9)
    distinct = collapse_metrics(["dog", "cat", "bird"])
    assert distinct["distinct_1"] == 1.0 and distinct["repetition_rate"] == 0.0
    assert distinct["distinct_2"] == 0.0  # no bigrams, no division by zero
    assert distinct["top_caption_share"] == pytest.approx(1 / 3)
    assert distinct["top_caption"] == "bird"  # ties go to the alphabetically first


def test_collapse_runs_empty_captions_and_entropy():
    result = collapse_metrics(
        ["a cat cat sits", "", "b b b a b"], entropies=[[1.0, 3.0], [], [0.5, 0.5, 2.0]]
    )
    assert result["longest_run"] == pytest.approx((2 + 0 + 3) / 3)
    assert result["max_longest_run"] == 3
    assert result["repetition_rate"] == pytest.approx((1 + 3) / 9)
    assert result["mean_length"] == 3
    assert result["mean_entropy"] == pytest.approx((2.0 + 1.0) / 2)
    empty = collapse_metrics(["", "..."])
    assert empty["repetition_rate"] == 0.0 and empty["distinct_1"] == 0.0
    assert empty["top_caption_share"] == 1.0 and empty["mean_length"] == 0


def test_collapse_validation():
    with pytest.raises(ValueError, match="empty"):
        collapse_metrics([])
    with pytest.raises(ValueError, match="entropy"):
        collapse_metrics(["a", "b"], entropies=[[1.0]])


def test_most_frequent_caption_baseline():
    train = ["A dog runs.", "a dog runs", "Two people ride bikes.", "a cat", " A dog runs . "]
    result = most_frequent_caption_baseline(train, REFERENCES, meteor=False)
    assert result["caption"] == "a dog runs"
    assert result["metrics"]["top_caption_share"] == 1.0
    assert result["metrics"]["top_caption"] == "a dog runs"
    assert result["metrics"]["unique_captions"] == 1
    assert result["metrics"]["bleu1"] > 0
    assert "notes" not in result["metrics"] and result["notes"] == ["METEOR skipped on request (meteor=False)"]
    with pytest.raises(ValueError):
        most_frequent_caption_baseline(["", "..."], REFERENCES, meteor=False)


def test_retrieval_perfect():
    n = 12
    sim = np.eye(n)[np.repeat(np.arange(n), 2)].T  # two captions per image, both matched
    result = retrieval_metrics(sim, np.repeat(np.arange(n), 2))
    assert all(v == 100.0 for k, v in result.items() if k != "rsum")
    assert result["rsum"] == 600.0
    assert retrieval_metrics(torch.eye(n, dtype=torch.bfloat16), list(range(n)))["rsum"] == 600.0


def test_retrieval_hand_computed():
    sim = np.array([
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.4],   # image 0: text 1 first            -> rank 0
        [0.5, 0.6, 0.1, 0.2, 0.7, 0.3],   # image 1: best own 0.2, 4 above   -> rank 4
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.35],  # image 2: best own 0.4, 1 above   -> rank 1
    ])
    # text ranks: t0 2, t1 0, t2 2, t3 2 (tie with image 0 counts against it), t4 1, t5 1
    result = retrieval_metrics(sim, [0, 0, 1, 1, 2, 2])
    assert result["i2t_r1"] == pytest.approx(100 / 3)
    assert result["i2t_r5"] == result["i2t_r10"] == 100.0  # K beyond 6 candidates clamps
    assert result["t2i_r1"] == pytest.approx(100 / 6)
    assert result["t2i_r5"] == 100.0
    assert result["rsum"] == pytest.approx(100 / 3 + 100 / 6 + 400)


def test_retrieval_reversed_and_ties_are_pessimistic():
    n = 12
    reversed_sim = np.eye(n)[::-1]  # every image prefers another image's caption
    assert retrieval_metrics(reversed_sim, list(range(n)))["rsum"] == 0.0
    constant = retrieval_metrics(np.zeros((n, n)), list(range(n)))  # a collapsed encoder
    assert constant["i2t_r1"] == constant["t2i_r10"] == 0.0


def test_retrieval_matches_blip_itm_eval_on_random_scores():
    rng = np.random.default_rng(0)
    owner = np.concatenate([np.arange(15), rng.integers(0, 15, size=25)])
    sim = rng.normal(size=(15, owner.size))

    def blip_ranks(scores, correct_sets):  # BLIP's itm_eval: argsort, best correct position
        return np.array([min(np.where(np.argsort(s)[::-1] == c)[0][0] for c in cs)
                         for s, cs in zip(scores, correct_sets, strict=True)])

    i2t = blip_ranks(sim, [np.where(owner == i)[0] for i in range(15)])
    t2i = blip_ranks(sim.T, [[o] for o in owner])
    assert retrieval_metrics(sim, owner) == pytest.approx(retrieval_metrics_from_ranks(i2t, t2i))


def test_retrieval_validation():
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(np.eye(3), [0, 1])
    with pytest.raises(ValueError, match="index image rows"):
        retrieval_metrics(np.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_metrics(np.eye(3), [0, 1, 1])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.ones(3), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 2), np.nan), [0, 1])


def test_topk_candidates():
    sim = np.array([[0.1, 0.5, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    assert topk_candidates(sim, 3).tolist() == [[3, 1, 2], [0, 1, 2]]  # tie keeps lower index
    assert topk_candidates(torch.tensor(sim), 10).shape == (2, 4)
    with pytest.raises(ValueError):
        topk_candidates(sim, 0)


def test_format_metrics_table():
    rows = {
        "greedy": {"bleu4": 0.01234, "meteor": None, "cider": 0.1, "top_caption": "a a",
                   "unique_captions": 3, "notes": ["METEOR skipped on request (meteor=False)"]},
        "beam-3": {"bleu4": 0.2, "cider": 0.5, "i2t_r1": 40.0},
    }
    text = format_metrics_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["strategy", "bleu4", "meteor", "cider", "unique_captions", "i2t_r1"]
    assert lines[2].split() == ["greedy", "0.0123", "-", "0.1000", "3", "-"]
    assert lines[3].split() == ["beam-3", "0.2000", "-", "0.5000", "-", "40.0000"]
    assert "greedy: METEOR skipped on request (meteor=False)" in text
    assert text.endswith(SPICE_NOTE)
    with pytest.raises(ValueError):
        format_metrics_table({})


def test_consensus_caption_is_the_candidate_most_like_the_others():
    from blipcore.evaluation.captioning import consensus_caption

    candidates = ["a cat sleeps on a sofa", "a dog runs on the grass", "a dog running on grass", "the dog runs"]
    assert consensus_caption(candidates) == "a dog runs on the grass"
    assert consensus_caption(["one", "two"]) == "one"  # a tie: the nearer image's caption
    with pytest.raises(ValueError):
        consensus_caption([])


def test_memorised_share_counts_verbatim_training_captions():
    from blipcore.evaluation.collapse import memorised_share, normalised_captions

    known = normalised_captions(["A dog runs.", "Two cats"])
    assert memorised_share(["a dog runs", "A DOG RUNS!", "a dog walks", "two cats"], known) == 0.75


def test_readme_collapse_table_is_the_registrys():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for m in metrics.metrics_in("collapse"):
        if m.better is not None or m.fmt != "s":  # every collapse number, not the caption itself
            assert f"| `{m.key}` | {m.doc} |" in readme, m.key


def test_registry_resolves_derived_keys_with_the_base_metrics_direction():
    from blipcore.evaluation.decoding import STRATEGY_PRESETS

    assert metrics.metric("val_lm").better == "lower" and metrics.metric("val_lm").group == "loss"
    assert metrics.metric("itm_t2i_r5").better == "higher" and not metrics.metric("itm_t2i_r5").headline
    for strategy in STRATEGY_PRESETS:
        assert metrics.metric(f"{strategy}_top_caption_share").better == "lower"
        assert metrics.metric(f"{strategy}_cider").headline
    for undeclared in ("val_lr", "itm_cider", "nucleus_loss", "greedy_", "cider_greedy", "nope"):
        assert metrics.metric(undeclared) is None, undeclared
    assert metrics.metric("top_caption_share").format(0.25) == "25.0%"
    assert metrics.metric("unique_captions").format(1234) == "1,234" and metrics.metric("cider").format(None) == "-"
    assert metrics.metric("cider").improves(0.3, 0.2) and metrics.metric("repetition_rate").improves(0.1, 0.2)
    with pytest.raises(ValueError, match="no better direction"):
        metrics.metric("mean_length").improves(1.0, 2.0)


def test_every_key_a_run_writes_is_declared(tiny_runs_dir):
    """metrics.jsonl lines and every metric section of an evaluation file, for every decoding strategy."""
    from blipcore.data import build_datasets
    from blipcore.evaluation.decoding import STRATEGY_PRESETS
    from blipcore.evaluation.evaluator import evaluate_model, summary_metrics
    from blipcore.runs.rundir import RunDir

    run = RunDir(tiny_runs_dir / "tiny")
    logged = {key for record in run.read_metrics() for key in record}
    assert {"loss", "itm", "val_itm", "itm_i2t_r1", "greedy_cider"} <= logged
    model, cfg, _ = run.load_model()
    result, _ = evaluate_model(model, cfg, build_datasets(cfg), "cpu", list(STRATEGY_PRESETS), caption_images=4,
                               meteor=False, progress=False)
    evaluation = run.load_eval(run.epochs()[-1])
    written = logged | set(summary_metrics(result))
    for source in (evaluation, result):
        written |= set(source["losses"]) | set(source["retrieval"])
        written |= {key for row in source["reference_rows"].values() for key in row["metrics"]}
        written |= {key for entry in source["strategies"].values() for key in entry["metrics"]}
    undeclared = sorted(key for key in written if not metrics.is_declared(key))
    assert undeclared == []
