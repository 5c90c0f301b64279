"""Study: one study folder (`python -m train study PLAN --out runs/study-NAME`) at a glance — its table (mean ±
sd over seeds, sortable, CSV), each variant's seeds as a band on the loss and metric curves, the config fields
that differ between variants, one run per point on a metric-against-metric scatter, and the same evaluation
images captioned by every variant side by side. Under the table, each variant's diagnosis
(blipcore.evaluation.diagnosis): the findings of its runs, from their folders here or from their committed records."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st

from blipcore.evaluation.diagnosis import RECORDS_DIR, Diagnosis, diagnose_record, diagnose_run
from blipcore.evaluation.evaluator import summary_metrics
from blipcore.evaluation.metrics import metric, metrics_in
from blipcore.experiments.study import dev_choice, recovery_markdown, reported_evaluation, targets_markdown
from blipcore.runs.rundir import RunDir, RunError
from dashboard import common, figures
from dashboard import diagnosis_figures as df
from dashboard import study_figures as sf

SECTION_KEY = "study_section"  # session-state key of the open tab
TRAIN_KEYS = tuple(m.key for m in metrics_in("loss"))  # what the training curve can show
MAX_IMAGES = 12


def label(key: str) -> str:
    declared = metric(key)
    return f"{declared.label} ({key})" if declared is not None and declared.label != key else key


def study_runs(folder: Path) -> list[RunDir]:
    return [RunDir(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.is_symlink() and RunDir(p).exists()]


@st.cache_data(show_spinner=False, max_entries=256)
def _diagnosis(path: str, stamp: tuple[int, ...], record: bool = False) -> Diagnosis:
    return diagnose_record(path) if record else diagnose_run(RunDir(path))


def study_diagnoses(folder: Path, table: dict) -> tuple[dict[str, Diagnosis], dict[str, str]]:
    """({run: its diagnosis}, {run: its variant}): the study's run folders here, and for the runs counted from
    their records (`--results`) whose folders are elsewhere, the committed record (studies/results/<plan>/)."""
    diagnoses, variants = {}, {}
    for run in study_runs(folder):
        try:
            diagnoses[run.name] = _diagnosis(str(run.path), df.run_stamp(run))
        except RunError as err:
            diagnoses[run.name] = Diagnosis(run.name, "run", str(run.path), None, 0, error=str(err))
        info = common.guarded(common.load_info, run, what=f"the run.json of {run.name}") or {}
        variants[run.name] = sf.variant_of(run.name, info.get("config"))
    here = {name.rsplit("/", 1)[-1] for name in diagnoses}
    for row in table.get("runs") or []:
        name = str(row.get("run"))
        path = RECORDS_DIR / str(table.get("name")) / f"{name}.json"
        if row.get("source") != "record" or name in here or not path.is_file():
            continue
        try:
            found = _diagnosis(str(path), (path.stat().st_mtime_ns,), record=True)
        except RunError as err:
            found = Diagnosis(name, "record", str(path), None, 0, error=str(err))
        diagnoses[name], variants[name] = found, found.variant or sf.variant_of(name, None)
    return diagnoses, variants


def diagnosis_section(folder: Path, table: dict) -> None:
    diagnoses, variants = study_diagnoses(folder, table)
    if not diagnoses:
        return
    st.markdown("**Diagnosis by variant**: each finding of the variant's runs (blipcore.evaluation.diagnosis), how "
                "many of its runs have it and how severe; a run's evidence and remedies are on the Diagnosis page, or "
                "`python -m train diagnose --runs-dir` this folder.")
    frame = df.variant_table(diagnoses, variants)
    st.dataframe(frame.style.map(df.health_colour, subset=["health"]), hide_index=True, width="stretch",
                 key="study_diagnosis")


def table_section(folder: Path, table: dict) -> None:
    rows = table.get("rows") or []
    csv = folder / "study.csv"
    if not rows:
        st.info("No run of this study has finished an evaluation yet: the table fills in as its runs finish "
                "(each run's dev-chosen checkpoint, evaluated on the test split when the data has one). "
                "The other tabs show the runs' curves while they train.")
        diagnosis_section(folder, table)
        return
    numbers, texts = sf.study_table(rows)
    st.caption("One row per variant and decoding strategy (and the reference rows): mean ± sample standard deviation "
               "over the seeds. Click a column header to sort (by the mean). `chosen_on_dev`: how many seeds' "
               "highest dev CIDEr was this strategy.")
    st.dataframe(sf.styled_table(numbers, texts), hide_index=True, width="stretch", key="study_table")
    # the plan's recovery questions (CapFilt: how much of the noise's cost each protocol wins back), a figure each
    recoveries = table.get("recoveries") or ([table["recovery"]] if table.get("recovery") else [])
    if recoveries:
        st.markdown(recovery_markdown(recoveries))
        for index, summary in enumerate(recoveries):
            if len(recoveries) > 1:
                st.caption(f"Recovery: {summary.get('protocol') or summary.get('treated', {}).get('run', index + 1)}")
            st.plotly_chart(sf.recovery_figure(summary), key=f"study_recovery_{index}")
    if table.get("targets"):  # the plan's targets, every variant judged against each
        st.markdown(targets_markdown(table["targets"]))
        names = list(dict.fromkeys(row["target"] for row in table["targets"]))
        shown = st.selectbox("Target to draw", names, key="study_target")
        st.plotly_chart(sf.target_figure(table["targets"], shown), key="study_target_chart")
    if csv.is_file():
        st.download_button("Download study.csv", csv.read_bytes(), file_name=f"{folder.name}.csv", mime="text/csv",
                           key="study_csv")
    if table.get("runs"):
        st.markdown("**The runs counted**: `from` says whether a run's numbers come from its folder here (run) or "
                    "from its record (`--results`: a run trained elsewhere, whose folder is not here), and what "
                    "each run cost on which machine.")
        st.dataframe(sf.runs_table(table["runs"]), hide_index=True, width="stretch", key="study_runs_table")
    diagnosis_section(folder, table)


def curves_section(runs: list[RunDir], variants: dict[str, str]) -> None:
    records = {run.name: common.guarded(common.load_metrics, run, what=f"the metrics of {run.name}") or []
               for run in runs}
    if not any(records.values()):
        st.info("No metrics logged yet: the trainer writes a line every `train.log_every` steps.")
        return
    controls = st.columns([1, 2, 2])
    band = controls[0].radio("Seed spread", sf.BANDS, horizontal=True, key="study_band")
    train_keys = [k for k in TRAIN_KEYS if k in sf.logged_keys(records.values(), "train")]
    val_keys = sf.logged_keys(records.values(), "val")
    if train_keys:
        train_key = controls[1].selectbox("Training curve", train_keys, format_func=label, key="study_train_key")
        bands = sf.variant_bands(records, variants, train_key, "train")
        st.plotly_chart(sf.band_figure(bands, f"training {label(train_key)}", band=band), key="study_train_chart")
    if val_keys:
        default = next((k for k in ("greedy_cider", "val_loss") if k in val_keys), val_keys[0])
        val_key = controls[2].selectbox("Validation metric", val_keys, index=val_keys.index(default),
                                        format_func=label, key="study_val_key")
        bands = sf.variant_bands(records, variants, val_key, "val")
        st.plotly_chart(sf.band_figure(bands, f"validation {label(val_key)}", band=band), key="study_val_chart")
    else:
        st.caption("No validation line yet: runs evaluate at the end of each epoch (or `train.eval_every_steps`).")
    st.caption("One colour per variant: the line is the mean over its seeds at each step, the band their spread. "
               "A band that overlaps another variant's means the difference is within the seed noise.")


def config_section(configs: dict[str, dict], variants: dict[str, str]) -> None:
    if not configs:
        st.info("No run's config could be read.")
        return
    diff = sf.config_diff(configs, variants)
    if diff.empty:
        st.info("The variants' configs are identical (apart from their name and seed).")
        return
    st.caption("Only the config fields (run.json) whose values differ between the variants; a cell with "
               "\" / \" holds the different values of that variant's seeds.")
    st.dataframe(diff, width="stretch", key="study_config_table")


def run_numbers(run: RunDir) -> dict[str, float]:
    """What the study's table reports for a run (its dev-chosen checkpoint, on test when there is one),
    flattened as a metrics line; before that exists, its last validation line."""
    reported = common.guarded(reported_evaluation, run, what=f"the reported evaluation of {run.name}")
    if reported is not None:
        return summary_metrics(reported[3])
    return sf.final_val(common.guarded(common.load_metrics, run, what=f"the metrics of {run.name}") or [])


def scatter_section(runs: list[RunDir], variants: dict[str, str], seeds: dict[str, int | None]) -> None:
    points = sf.run_points({run.name: run_numbers(run) for run in runs}, variants, seeds)
    keys = sf.numeric_keys(points) if not points.empty else []
    if not keys:
        st.info("No run has a validation line yet: each point is a run's reported evaluation (the table's "
                "numbers), or its last validation line while it trains.")
        return
    x_default = next((k for k in ("greedy_top_caption_share", "greedy_distinct_1") if k in keys), keys[0])
    y_default = next((k for k in ("greedy_cider", "i2t_r1") if k in keys), keys[-1])
    left, right = st.columns(2)
    x = left.selectbox("x-axis", keys, index=keys.index(x_default), format_func=label, key="study_scatter_x")
    y = right.selectbox("y-axis", keys, index=keys.index(y_default), format_func=label, key="study_scatter_y")
    st.plotly_chart(sf.scatter_figure(points, x, y), key="study_scatter")
    st.caption("One point per run, coloured by variant: the numbers the table reports for it (its dev-chosen "
               "checkpoint, on the test split when there is one; its last validation line while it trains). "
               "Does one number buy the other?")


def chosen_eval(run: RunDir, split: str) -> tuple[int, dict] | None:
    """(epoch, evaluation) of `split` at the run's dev-chosen epoch (what the table reports), or of its newest
    evaluation of `split` when that epoch has none."""
    epochs = run.eval_epochs(split)
    if not epochs:
        return None
    choice = common.guarded(dev_choice, run, what=f"the dev choice of {run.name}")
    epoch = choice[0] if choice is not None and choice[0] in epochs else epochs[-1]
    result = common.guarded(common.load_eval, run, epoch, split, what=f"the evaluation of {run.name}")
    return None if result is None else (epoch, result)


def captions_section(runs: list[RunDir], variants: dict[str, str], seeds: dict[str, int | None]) -> None:
    has_test = all(run.eval_epochs("test") for run in runs)
    controls = st.columns([1, 1, 1, 1])
    split = controls[0].radio("Split", ["test", "val"] if has_test else ["val"], horizontal=True, key="study_split")
    seed_choices = sorted({s for s in seeds.values() if s is not None})
    seed = controls[1].selectbox("Seed", seed_choices, key="study_seed") if seed_choices else None
    chosen: dict[str, tuple[RunDir, int, dict]] = {}
    for run in runs:
        variant = variants[run.name]
        if variant in chosen or (seed is not None and seeds.get(run.name) not in (seed, None)):
            continue
        found = chosen_eval(run, split)
        if found is not None:
            chosen[variant] = (run, *found)
    if not chosen:
        st.info(f"No {split} evaluation with captions yet for seed {seed}: runs write one at the end of each epoch.")
        return
    strategies = [s for s in next(iter(chosen.values()))[2].get("strategies", {})
                  if all(s in result.get("strategies", {}) for _, _, result in chosen.values())]
    if not strategies:
        st.info("These evaluations share no decoding strategy.")
        return
    strategy = controls[2].selectbox("Decoding", strategies, key="study_strategy")
    count = controls[3].number_input("Images", 1, MAX_IMAGES, 4, key="study_images")
    samples = {v: result["strategies"][strategy].get("samples") or [] for v, (_, _, result) in chosen.items()}
    rows = sf.captions_side_by_side(samples, limit=int(count))
    st.caption("Each variant's run at its dev-chosen checkpoint: " + ", ".join(
        f"{v} = `{run.name}` epoch {epoch}" for v, (run, epoch, _) in chosen.items()))
    if not rows:
        st.info("The variants' evaluations share no sample image.")
        return
    for row in rows:
        with st.container(border=True):
            picture, truth, generated = st.columns([1, 2, 3])
            thumbnail = figures.load_thumbnail(row["file_path"], 128)
            if thumbnail is not None:
                picture.image(thumbnail, caption=Path(row["file_path"]).name, width=128)
            else:
                picture.caption(f"(image not found: {row['file_path']})")
            truth.markdown("**References**\n" + "\n".join(f"- {text}" for text in row["references"]))
            said = pd.DataFrame({"variant": list(row["captions"]),
                                 "caption": [c or "(empty caption)" for c in row["captions"].values()]})
            generated.table(said.set_index("variant"))


st.set_page_config(page_title="Study · BLIP Lab", layout="wide")  # also when opened directly by URL
st.title("Study")
folder = common.select_study()
table = common.guarded(common.load_study_table, folder, what="the study table") or {}
runs = study_runs(folder)
infos = {run.name: common.guarded(common.load_info, run, what=f"the run.json of {run.name}") for run in runs}
statuses = Counter(str((info or {}).get("status", "unreadable")) for info in infos.values())
st.caption(f"`{folder}` · plan `{table.get('name', '?')}` · preset `{table.get('preset', '?')}` · seeds "
           f"{table.get('seeds', '?')} · {len(runs)} runs" + (
               " (" + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ")" if runs else ""))
if not runs and table.get("rows"):  # a study of recorded runs (`--results`) whose folders are elsewhere
    st.info("No run folder of this study is here: its table comes from the records of runs trained elsewhere "
            "(`python -m train study ... --results DIR`). The curves, configs and captions need the run folders.")
    table_section(folder, table)
    st.stop()
if not runs:
    common.stop_with(f"The study `{folder.name}` has no run yet.",
                     "Its runs appear here as `python -m train study` starts them; the table fills in as they finish.")
runs = [run for run in runs if infos.get(run.name) is not None]
configs = {run.name: infos[run.name].get("config") or {} for run in runs}
variants = {run.name: sf.variant_of(run.name, configs[run.name]) for run in runs}
seeds = {run.name: sf.seed_of(run.name, configs[run.name]) for run in runs}
# Lazy tabs: the page's first render builds the table only.
common.lazy_tabs({
    "Table": lambda: table_section(folder, table),
    "Curves by variant": lambda: curves_section(runs, variants),
    "Config differences": lambda: config_section(configs, variants),
    "Metric against metric": lambda: scatter_section(runs, variants, seeds),
    "Captions side by side": lambda: captions_section(runs, variants, seeds),
}, key=SECTION_KEY)
