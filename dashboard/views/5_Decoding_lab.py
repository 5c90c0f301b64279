"""Decoding lab: the same checkpoint decoded by greedy, beam, top-k, nucleus, repetition penalty and
no-repeat n-gram side by side — the captions, each step's probability and entropy (where the loop
starts), and the collapse metrics of each strategy on a validation subset."""


import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from blipcore.evaluation.decoding import STRATEGY_PRESETS, DecodingConfig, decoding_config
from blipcore.evaluation.metrics import COLLAPSE_METRIC_DOCS
from blipcore.model.tokenizer import load_tokenizer
from dashboard import common
from dashboard import explain_figures as figs
from dashboard import inference as inf

# The parameters worth editing per preset, and each one's widget range (min, max, step).
EDITABLE = {
    "greedy": ("max_length",),
    "beam": ("num_beams", "length_penalty", "max_length"),
    "top-k": ("top_k", "temperature", "seed", "max_length"),
    "nucleus": ("top_p", "temperature", "seed", "max_length"),
    "repetition-penalty": ("repetition_penalty", "max_length"),
    "no-repeat-ngram": ("no_repeat_ngram_size", "max_length"),
    "beam-no-repeat": ("num_beams", "no_repeat_ngram_size", "length_penalty", "max_length"),
}
RANGES = {
    "num_beams": (1, 10, 1), "length_penalty": (-2.0, 3.0, 0.1), "top_k": (0, 1000, 5), "top_p": (0.05, 1.0, 0.05),
    "temperature": (0.05, 3.0, 0.05), "repetition_penalty": (0.5, 3.0, 0.05), "no_repeat_ngram_size": (0, 6, 1),
    "max_length": (1, 60, 1), "seed": (0, 2**31 - 1, 1),
}
MAX_SUBSET = 500  # images decoded per strategy on a button press: minutes at most on a CPU
DEFAULT_STRATEGIES = ["greedy", "beam", "top-k", "nucleus", "repetition-penalty", "no-repeat-ngram"]

st.set_page_config(page_title="Decoding lab · BLIP Lab", layout="wide")
st.title("Decoding lab: the collapse and the strategies that fix it")
st.caption(
    "A small captioner trained from scratch tends to fall into repeating its most frequent word. Greedy and beam "
    "search follow the model's most likely path straight into that loop; sampling, a repetition penalty or banning "
    "repeated n-grams step out of it. Compare them on the same checkpoint and images."
)

run = common.select_run()
epoch = common.select_epoch(run)
loaded = inf.open_checkpoint(run, epoch) or st.stop()
if not loaded.model.use_lm:
    common.stop_with("This run has no text decoder (model.lm_weight is 0): it does not caption.",
                     "Pick a run trained with the LM loss.")
records = inf.val_records(run) or st.stop()


# --- strategies and their parameters ---------------------------------------------------------------
def strategy_editor(name: str, column: DeltaGenerator) -> DecodingConfig | None:
    """The preset `name` with the user's values for its editable fields; None (and why) when invalid."""
    preset = STRATEGY_PRESETS[name]
    values = {}
    with column.expander(f"**{name}**", expanded=False):
        for field in EDITABLE.get(name, ("max_length",)):
            low, high, step = RANGES[field]
            value = getattr(preset, field)
            values[field] = st.number_input(field, type(step)(low), type(step)(high), type(step)(value), step,
                                            key=f"decoding_{name}_{field}")
    try:
        return decoding_config(name, **values)
    except ValueError as err:
        column.error(f"{name}: {err}")
        return None


chosen = st.sidebar.multiselect(
    "Strategies", list(STRATEGY_PRESETS), default=DEFAULT_STRATEGIES, key="decoding_strategies"
)
if not chosen:
    common.stop_with("Pick at least one decoding strategy in the sidebar.")
st.subheader("Parameters")
columns = st.columns(min(4, len(chosen)))
configs = {name: cfg for i, name in enumerate(chosen) if (cfg := strategy_editor(name, columns[i % len(columns)]))}

indices = st.multiselect("Validation images", range(len(records)), default=list(range(min(2, len(records)))),
                         format_func=lambda i: f"#{i}", key=f"decoding_images_{run.name}")
images = inf.val_images([records[i] for i in indices])
if not images or not configs:
    common.stop_with("Pick at least one validation image (and a strategy with valid parameters).")
tokenizer = load_tokenizer()


def decoded() -> dict[str, list]:
    """Every chosen strategy's captions of the chosen images (cached per checkpoint, image and config)."""
    return {name: inf.captions(loaded, images, cfg) for name, cfg in configs.items()}


# --- captions side by side -------------------------------------------------------------------------
def captions_section() -> None:
    results = decoded()
    for i, image in enumerate(images):
        picture, table = st.columns([1, 5])
        picture.image(inf.thumbnail(image), caption=image.name, width=128)
        rows = []
        for name, found in results.items():
            caption = found[i]
            at = figs.loop_start(caption.tokens)
            repeat = "—" if at is None else f"word {at + 1}: '{tokenizer.convert_ids_to_tokens(caption.tokens[at])}'"
            rows.append({
                "strategy": name, "caption": caption.text, "first repeat": repeat,
                "words": len(caption.tokens), "log p": round(sum(caption.logprobs), 2),
            })
        table.dataframe(pd.DataFrame(rows), hide_index=True, key=f"decoding_captions_{i}",
                        column_config={"caption": st.column_config.TextColumn(width="large")})
        if image.references:
            table.caption("Ground truth: " + " · ".join(image.references))


# --- per-step probability and entropy --------------------------------------------------------------
def steps_section() -> None:
    st.caption(
        "p(token): the model's probability (temperature 1, no rules) of the token each strategy chose. Entropy: "
        "how unsure the model was at that step. The shaded step is the first word that repeats an earlier one: "
        "where a collapsing decoder's loop starts (a healthy caption may repeat 'the' once). The last step is "
        "[SEP] when the caption ended by itself."
    )
    shown = st.selectbox("Image", range(len(images)), format_func=lambda i: images[i].name, key="decoding_step_image")
    steps = {}
    for name, found in decoded().items():
        caption = found[shown]
        labels = tokenizer.convert_ids_to_tokens(caption.tokens) + (["[SEP]"] if caption.finished else [])
        steps[name] = figs.StepSeries(labels, caption.logprobs, caption.entropies, figs.loop_start(caption.tokens))
    st.plotly_chart(figs.step_figure(steps), key="decoding_steps")


# --- collapse metrics on a validation subset -------------------------------------------------------
def collapse_section() -> None:
    size = st.slider("Images (the first N of the validation set)", 1, min(MAX_SUBSET, len(records)),
                     min(32, len(records)), key=f"decoding_subset_{run.name}")
    computed = st.session_state.setdefault("decoding_collapse", {})
    request = (loaded.key, size, tuple((name, tuple(sorted(cfg.to_dict().items()))) for name, cfg in configs.items()))
    if st.button("Compute collapse metrics", type="primary", key="decoding_compute"):
        bar = st.progress(0.0, text="Decoding…")
        computed[request] = inf.collapse_by_strategy(
            loaded, inf.val_images(records[:size]), configs, progress=lambda done, text: bar.progress(done, text=text)
        )
        bar.empty()
    if request in computed:
        metrics = computed[request]
        frame = figs.strategy_metrics_frame(metrics)
        help_of = {m: st.column_config.Column(help=doc) for m, doc in COLLAPSE_METRIC_DOCS.items()}
        st.dataframe(frame, column_config=help_of, key="decoding_collapse_table")
        st.plotly_chart(figs.collapse_bar_figure(metrics), key="decoding_collapse_bars")
    else:
        st.info("Press **Compute collapse metrics** to decode the subset with every strategy above (cached "
                "afterwards).")
    with st.expander("What the collapse metrics mean"):
        st.markdown("\n".join(f"- **{name}**: {doc}" for name, doc in COLLAPSE_METRIC_DOCS.items()))


# --- the stored evaluation -------------------------------------------------------------------------
def stored_section() -> None:
    if epoch not in run.eval_epochs():
        st.info(f"Epoch {epoch} has no stored evaluation (eval/epoch_{epoch:03d}.json is written at each epoch's end).")
        return
    stored = common.guarded(common.load_eval, run, epoch, what=f"eval/epoch_{epoch:03d}.json")
    if not stored:
        return
    rows = {name: entry.get("metrics", {}) for name, entry in stored.get("strategies", {}).items()}
    for name, reference in (stored.get("reference_rows") or {}).items():
        if reference.get("metrics"):
            rows[f"({name})"] = reference["metrics"]
    st.caption(
        f"Written by the trainer on {stored.get('num_images', '?')} validation images at the end of epoch {epoch}. "
        "The last rows are yardsticks: (most-frequent) gives the most frequent training caption to every image, "
        "a model that learned nothing; (nearest-neighbour) the consensus caption of the training images nearest "
        "by the model's image embedding, retrieval without generation."
    )
    if rows:
        st.dataframe(figs.strategy_metrics_frame(rows), key="decoding_stored_table")


# Only the open tab runs (and decodes).
SECTIONS = {
    "Captions side by side": captions_section,
    "Step by step: probability and entropy": steps_section,
    "Collapse on a validation subset": collapse_section,
    "Stored evaluation": stored_section,
}
common.lazy_tabs(SECTIONS, key="decoding_section")
