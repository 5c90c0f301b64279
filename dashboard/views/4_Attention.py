"""Attention: where the model looks — ViT attention rollout, [CLS] attention per layer and head, the
decoder's cross-attention for each generated word, and Grad-CAM of the image-text matching score.
Every map comes from blipcore.evaluation.explain (through inference's caches); this page only lays them out."""


import streamlit as st

from blipcore.data import ImageLoadError
from blipcore.evaluation.decoding import STRATEGY_PRESETS, decoding_config
from blipcore.evaluation.explain import HEAD_FUSIONS, attention_rollout, cls_attention_maps, overlay_heatmap
from dashboard import common
from dashboard import explain_figures as figs
from dashboard import inference as inf

st.set_page_config(page_title="Attention · BLIP Lab", layout="wide")
st.title("Attention: where the model looks")

run = common.select_run()
epoch = common.select_epoch(run)
loaded = inf.open_checkpoint(run, epoch) or st.stop()
model = loaded.model

# --- the image -------------------------------------------------------------------------------------
source = st.sidebar.radio("Image", ["Validation set", "Upload"], key="attention_source", horizontal=True)
if source == "Upload":
    upload = st.sidebar.file_uploader("An image (JPEG, PNG, WebP)", type=inf.UPLOAD_TYPES, key="attention_upload")
    if upload is None:
        common.stop_with("Upload an image in the sidebar, or switch the image source back to the validation set.")
    try:
        picked = inf.read_upload(upload.name, upload.getvalue())
    except ImageLoadError as err:
        common.stop_with(f"Cannot use this file: {err}", "Upload a JPEG, PNG or WebP picture.", kind="error")
    if picked.note:
        st.info(picked.note)
else:
    records = inf.val_records(run) or st.stop()
    index = inf.pick_val_image(records, key=f"attention_image_{run.name}")
    picked = common.guarded(inf.val_image, records[index], what=f"validation image #{index}") or st.stop()

view = figs.upscale(inf.model_view(picked, model.cfg.image_size))
vit = inf.explanation("vit_attention", loaded, picked)

# --- ViT attention rollout -------------------------------------------------------------------------
st.header("ViT attention rollout")
st.caption(
    "How much each image patch flows into the ViT's [CLS] token through all layers (Abnar & Zuidema 2020): heads "
    "fused per layer, the weakest links discarded, the residual path kept. A flat map means the encoder has not "
    "learned to single anything out yet."
)
controls, images = st.columns([1, 3])
fusion = controls.radio("Head fusion", HEAD_FUSIONS, horizontal=True, key="attention_fusion")
discard = controls.slider("Discard ratio", 0.0, 0.95, 0.0, 0.05, key="attention_discard",
                          help="Share of the weakest attention links zeroed in every layer before rolling out.")
alpha = controls.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="attention_alpha")
rollout = attention_rollout(vit, fusion, discard)
images.image(
    [view, overlay_heatmap(view, rollout, alpha=alpha)],
    caption=[f"{picked.name} (as the model sees it)", f"rollout: {fusion} over heads, discard {discard:.0%}"],
    width=256,
)

# --- [CLS] attention per layer and head ------------------------------------------------------------
st.header("[CLS] attention per layer and head")
shared = st.toggle("One colour scale for all panels", value=True, key="attention_shared_scale",
                   help="Off: each panel divided by its own maximum, to see its shape even when it is nearly flat.")
st.plotly_chart(figs.attention_grid_figure(cls_attention_maps(vit), shared_scale=shared), key="attention_cls_grid")

# --- decoder cross-attention per generated word ----------------------------------------------------
st.header("Where the decoder looked for each word")
generated = ""  # the caption, the Grad-CAM text of an image without ground truth
if not model.use_lm:
    st.info("This run has no text decoder (model.lm_weight is 0): it does not caption, so there is no cross-attention.")
else:
    left, right = st.columns([1, 3])
    strategy = left.selectbox("Decoding strategy", list(STRATEGY_PRESETS), key="attention_strategy")
    caption = inf.captions(loaded, [picked], decoding_config(strategy))[0]
    generated = caption.text
    right.markdown(f"**Caption ({strategy}):** {caption.text or '*(empty)*'}")
    if model.cfg.text_only:
        right.info("This run is a text-only language model (model.text_only, decoder pretraining): it writes the "
                   "same caption for every image and its decoder never looks at the image.")
    elif not caption.tokens:
        right.info("The caption is empty (the decoder ended at once): there is no word to explain.")
    else:
        attention = inf.explanation("cross_attention", loaded, picked, tuple(caption.tokens))
        layers, heads = attention.maps.shape[1:3]
        layer = left.selectbox("Decoder layer", range(-1, layers), key="attention_layer",
                               format_func=lambda v: "mean of all layers" if v < 0 else f"layer {v}")
        head = left.selectbox("Head", range(-1, heads), key="attention_head",
                              format_func=lambda v: "mean of all heads" if v < 0 else f"head {v}")
        layer, head = (None if v < 0 else v for v in (layer, head))  # None: TokenAttention's mean
        words = figs.word_labels(attention.tokens)
        step = right.pills("Pick a word", range(len(words)), format_func=words.__getitem__,
                           default=0, key=f"attention_word_{picked.key}_{strategy}") or 0
        on_cls = attention.cls_weight[step].mean()
        right.image(
            overlay_heatmap(view, attention.token_map(step, layer, head), alpha=alpha), width=256,
            caption=f"'{words[step]}': where the decoder looked to choose it "
            f"({on_cls:.0%} of its attention went to the image's [CLS] token, not shown)",
        )
        # Lazy: a map per word is many images to send, drawn only when asked for.
        every_word = st.expander("Every word of the caption, side by side", key="attention_every_word",
                                 on_change="rerun")
        if every_word.open:
            every_word.image(figs.token_overlays(figs.upscale(view, 112), attention, layer, head, alpha=alpha),
                             caption=words, width=112)

# --- ITM Grad-CAM ----------------------------------------------------------------------------------
st.header("Grad-CAM of the image-text matching score")
if not model.use_itm:
    st.info(
        "This run has no ITM head (model.itm_weight is 0), so there is no matching score to explain. "
        "Train with `--set model.itm_weight=1.0` to get one."
    )
else:
    left, right = st.columns([2, 2])
    text = left.text_input("Caption to explain (typed, or the ground-truth one)",
                           value=picked.references[0] if picked.references else generated,
                           key=f"attention_gradcam_text_{picked.key}")
    if picked.references:
        left.caption("Ground truth: " + " · ".join(picked.references))
    depth = len(model.text_encoder.blocks)
    gradcam_layer = left.selectbox("Text-encoder block", range(depth), index=depth - 1, key="attention_gradcam_layer")
    heat = common.guarded(inf.explanation, "itm_gradcam", loaded, picked, text, gradcam_layer, what="Grad-CAM")
    if heat is not None:
        match = inf.explanation("itm_probability", loaded, picked, text)
        right.image(overlay_heatmap(view, heat, alpha=alpha), width=256,
                    caption=f"ITM says match with p = {match:.2f}; red: regions that raise that score")
