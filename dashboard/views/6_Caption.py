"""Caption: upload pictures and read what each checkpoint says about them — one epoch, several runs,
or every epoch of a run to watch the captions form (or collapse) as training goes."""

from pathlib import Path

import pandas as pd
import streamlit as st

from blipcore.evaluation.decoding import STRATEGY_PRESETS, decoding_config
from dashboard import common
from dashboard import inference as inf

st.set_page_config(page_title="Caption · BLIP Lab", layout="wide")
st.title("Caption your images")

checkpoints = inf.select_checkpoints("caption", default="last", every_epoch=True)
strategy = st.sidebar.selectbox("Decoding strategy", list(STRATEGY_PRESETS), key="caption_strategy",
                                help="The Decoding lab page compares them and lets you tune their parameters.")

uploads = st.file_uploader(
    "Images (JPEG, PNG, WebP or GIF; several at once)", type=inf.UPLOAD_TYPES, accept_multiple_files=True,
    key="caption_files",
    help=f"Pictures over {common.MAX_UPLOAD_PIXELS:,} pixels are refused; of an animated one the first frame is used.",
)
files = [(upload.name, upload.getvalue()) for upload in uploads or []]

first_run = checkpoints[0][0]
toggle, number = st.columns([3, 1], vertical_alignment="bottom")
if toggle.toggle(f"Also caption a sample validation image of {first_run.name}", value=True, key="caption_use_sample"):
    records = inf.val_records(first_run)
    if records:
        index = number.number_input("Sample #", 0, len(records) - 1, 0, key=f"caption_sample_{first_run.name}")
        record = records[index]
        data = common.guarded(Path(record.file_path).read_bytes, what=f"validation image #{index}")
        if data is not None:
            files.append((f"validation #{index} ({Path(record.file_path).name})", data))
            st.caption("Its ground truth: " + " · ".join(record.captions))
if not files:
    common.stop_with("Upload one or more images above (or switch on the sample validation image).")

models = [loaded for run, epoch in checkpoints if (loaded := inf.open_checkpoint(run, epoch))]
without_decoder = [loaded.label for loaded in models if not loaded.model.use_lm]
if without_decoder:
    st.warning(f"No text decoder (model.lm_weight is 0), so no caption from: {', '.join(without_decoder)}.")
models = [loaded for loaded in models if loaded.model.use_lm]
if not models:
    common.stop_with("None of the chosen checkpoints can caption.", "Pick another run or epoch in the sidebar.")

with st.spinner(f"Captioning {len(files)} image(s) with {len(models)} checkpoint(s)…"):
    results = inf.caption_uploads(files, models, decoding_config(strategy))

st.header(f"Captions ({strategy})")
for result in results:
    if result.error:
        st.error(f"{result.error}: this file is skipped, the others are captioned.")
        continue
    with st.container(border=True):
        picture, table = st.columns([1, 4])
        picture.image(result.thumbnail, caption=result.name, width=inf.THUMBNAIL)
        if result.note:
            table.info(result.note)
        table.table(pd.DataFrame(result.captions, columns=["run", "epoch", "caption"]).set_index(["run", "epoch"]))
