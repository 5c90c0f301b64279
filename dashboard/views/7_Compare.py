"""Compare: checkpoints of one or several runs side by side — their metrics, their captions of the same
random validation images next to the ground truth, and how far their embeddings moved per epoch."""

import random
from itertools import pairwise

import numpy as np
import pandas as pd
import streamlit as st

from blipcore.evaluation.decoding import STRATEGY_PRESETS, decoding_config
from blipcore.runs.rundir import RunDir, RunError
from dashboard import common
from dashboard import explain_figures as figs
from dashboard import inference as inf

SECTION_KEY = "compare_section"  # session-state key of the open tab


def metrics_section(checkpoints: list[tuple[RunDir, int]]) -> None:
    """The stored evaluation of each checkpoint per decoding strategy, and its sidecar's losses and retrieval."""
    evaluated, summaries = [], []
    for run, epoch in checkpoints:
        if epoch in run.eval_epochs():
            what = f"the evaluation of {run.name} epoch {epoch}"
            stored = common.guarded(common.load_eval, run, epoch, what=what) or {}
            strategies = {name: entry.get("metrics", {}) for name, entry in stored.get("strategies", {}).items()}
            if strategies:
                frame = figs.strategy_metrics_frame(strategies).reset_index()
                evaluated.append(frame.assign(run=run.name, epoch=epoch))
        try:
            summaries.append({"run": run.name, "epoch": epoch, **run.checkpoint(epoch).meta.get("metrics", {})})
        except RunError as err:
            st.warning(f"Cannot read the checkpoint of {run.name} epoch {epoch}: {err}")
    if evaluated:
        st.subheader("Captioning and collapse per decoding strategy (eval/epoch_NNN.json)")
        table, empty = figs.drop_empty_columns(pd.concat(evaluated).set_index(["run", "epoch", "strategy"]))
        st.dataframe(table, key="compare_eval_table")
        if empty:
            st.caption(f"Not computed for these checkpoints: {', '.join(empty)}." + (
                " Epoch-end evaluations skip METEOR (its Java start costs ~10 s); "
                "`python -m train eval --run-dir RUN --epoch all` computes it." if "meteor" in empty else ""))
    else:
        st.info("No evaluation file for these checkpoints yet: `python -m train eval --run-dir RUN --epoch all`.")
    if summaries:
        st.subheader("Validation losses and retrieval (checkpoint sidecars)")
        st.dataframe(figs.checkpoint_metrics_frame(summaries), key="compare_checkpoint_table")


def captions_section(checkpoints: list[tuple[RunDir, int]]) -> None:
    """The same random validation images captioned by every checkpoint, beside their ground truth."""
    first_run = checkpoints[0][0]
    records = inf.val_records(first_run)
    if not records:
        return
    controls = st.columns([1, 1, 1, 3])
    count = controls[0].number_input("Images", 1, min(12, len(records)), min(3, len(records)), key="compare_count")
    strategy = controls[1].selectbox("Decoding strategy", list(STRATEGY_PRESETS), key="compare_strategy")
    if controls[2].button("Reshuffle", key="compare_reshuffle"):
        st.session_state["compare_seed"] = random.randrange(2**31)
    seed = st.session_state.setdefault("compare_seed", 0)
    controls[3].caption(
        f"Images from the validation set of {first_run.name}, seed {seed}; every checkpoint captions the same ones."
    )
    sample = inf.val_images([records[i] for i in sorted(random.Random(seed).sample(range(len(records)), count))])
    opened = [inf.open_checkpoint(run, epoch) for run, epoch in checkpoints]
    models = [loaded for loaded in opened if loaded and loaded.model.use_lm]
    by_model = {loaded.label: inf.captions(loaded, sample, decoding_config(strategy)) for loaded in models}
    for i, image in enumerate(sample):
        with st.container(border=True):
            picture, truth, generated = st.columns([1, 2, 3])
            picture.image(inf.thumbnail(image), caption=image.name, width=128)
            truth.markdown("**Ground truth**\n" + "\n".join(f"- {text}" for text in image.references))
            said = {"checkpoint": list(by_model), "caption": [found[i].text for found in by_model.values()]}
            generated.table(pd.DataFrame(said).set_index("checkpoint"))


def drift(run: RunDir, before: int, after: int) -> dict[str, np.ndarray]:
    """Per-item cosine distance moved by the run's embeddings from epoch `before` to `after`."""
    return figs.embedding_drift(common.load_embeddings(run, before), common.load_embeddings(run, after))


def drift_section(checkpoints: list[tuple[RunDir, int]]) -> None:
    """Mean cosine distance the evaluation set's embeddings moved per epoch, between the epochs picked."""
    st.caption(
        "Mean cosine distance between an item's embedding at one epoch and at the next, from the first to the last "
        "epoch picked, on the fixed evaluation set. Large steps: the shared space is still being reorganised; near "
        "zero: it has settled."
    )
    rows, distances = [], {}
    for run in dict.fromkeys(run for run, _ in checkpoints):
        picked = [e for r, e in checkpoints if r == run]
        epochs = [e for e in run.embedding_epochs() if min(picked) <= e <= max(picked)]
        for before, after in pairwise(epochs):
            what = f"the embeddings of {run.name} epochs {before} and {after}"
            moved = common.guarded(drift, run, before, after, what=what)
            if moved is not None:
                distances[f"{run.name}: {before}→{after}"] = moved
                rows += [{"run": run.name, "step": f"{before}→{after}", "kind": kind, "mean": float(values.mean())}
                         for kind, values in moved.items()]
    if not rows:
        st.info("Pick a first and a last epoch with embeddings (embeddings/epoch_NNN.npz) in between to see them move.")
        return
    st.plotly_chart(figs.drift_figure(pd.DataFrame(rows)), key="compare_drift")
    if st.checkbox("Per-item histogram", key="compare_histogram"):
        pair = st.selectbox("Epochs", list(distances), key="compare_histogram_pair")
        st.plotly_chart(figs.drift_histogram(distances[pair], title=pair), key="compare_drift_histogram")


st.set_page_config(page_title="Compare · BLIP Lab", layout="wide")
st.title("Compare checkpoints")
chosen = inf.select_checkpoints("compare", default="ends")
# Lazy tabs: the page's first render builds one section, not three.
common.lazy_tabs({
    "Metrics": lambda: metrics_section(chosen),
    "Captions of random validation images": lambda: captions_section(chosen),
    "How far the embeddings moved": lambda: drift_section(chosen),
}, key=SECTION_KEY)
