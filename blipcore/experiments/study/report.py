"""A study's table: the variant rows (mean and spread over seeds), the runs (where each number comes from, what it
cost in minutes and FLOPs, when its validation numbers peaked), the CapFilt filters, the recovery and targets
sections; written as study.json, study.csv and study.md by the one Markdown table writer, `markdown`."""

from __future__ import annotations

import csv
import io
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...data.derived import CAPFILT_SUMMARY
from ...evaluation import metrics as M
from ...io import atomic_write_bytes, atomic_write_json
from ...model.config import BlipConfig
from ...model.flops import training_step_flops
from ...runs.rundir import STUDY_TABLE, RunError, read_json
from .folders import run_dir, stage_output
from .judging import recovery_summaries, target_rows
from .plan import RECOVERY_ROLES, RETRIEVAL_METRICS, TABLE_METRICS, Plan, Stage, capfilt_protocol, run_references
from .records import Reported, RunResult, record_path, reported_runs, save_record

# The decoding cell of a run that writes no caption but ranks and matches (a CapFilt filter, trained without LM)
NO_CAPTIONS = "-"


def study_rows(plan: Plan, reported: Reported, speeds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (stage, variant, strategy or reference row): mean and spread over the seeds' runs; a run that
    writes no caption but has retrieval or matching numbers (a filter) has one row, decoding NO_CAPTIONS. `speeds`:
    a step-speed measurement (read_step_speed), whose samples/s ratio each variant's rows show."""
    measured = (speeds or {}).get("variants", {})
    rows = []
    ratios = _compute_ratios(plan, reported)
    for stage in (s for s in plan.stages if s.trains):
        for variant in stage.variants:
            found = reported.get((stage.name, variant), {})
            by_row: dict[str, list[dict[str, Any]]] = {}
            for seed, result in found.items():
                evaluation = result.evaluation
                entries = {**evaluation.get("strategies", {}), **evaluation.get("reference_rows", {})}
                if not entries and (evaluation.get("retrieval") or evaluation.get("matching")):
                    entries = {NO_CAPTIONS: {}}
                for name, entry in entries.items():
                    values = {**entry.get("metrics", {}), **evaluation.get("retrieval", {}),
                              **evaluation.get("matching", {}), "epoch": result.epoch,
                              "minutes": (result.train_seconds or 0) / 60,
                              "chosen": name == (result.chosen or NO_CAPTIONS),
                              "gflops": step_gflops(result.config), "compute_ratio": ratios.get((stage.name, variant,
                                                                                                seed))}
                    by_row.setdefault(name, []).append(values)
            for name, values in by_row.items():
                row: dict[str, Any] = {"stage": stage.name, "variant": variant, "decoding": name,
                                       "split": "/".join(sorted({result.split for result in found.values()})),
                                       "seeds": len(values), "chosen_on_dev": sum(v["chosen"] for v in values),
                                       "epochs": sorted({v["epoch"] for v in values})}
                for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, "minutes", "gflops", "compute_ratio"):
                    numbers = [v[key] for v in values if M.is_number(v.get(key))]
                    row[key] = statistics.fmean(numbers) if numbers else None
                    row[f"{key}_sd"] = statistics.stdev(numbers) if len(numbers) > 1 else None
                row["speed_ratio"] = measured.get(f"{stage.name}/{variant}", {}).get("samples_per_s_ratio")
                rows.append(row)
    return rows


def _compute_ratios(plan: Plan, reported: Reported) -> dict[tuple[str, str, int], float]:
    """Each run's PFLOPs in all as a ratio of the plan's reference variant's (mean over its seeds)."""
    if plan.reference is None:
        return {}
    stage, variant = plan.reference.split("/", 1)
    references = [v for seed in reported.get((stage, variant), {})
                  if (v := total_pflops(plan, reported, stage, variant, seed)) is not None]
    if not references:
        return {}
    reference = statistics.fmean(references)
    return {(s, v, seed): total / reference for (s, v), seeds in reported.items() for seed in seeds
            if (total := total_pflops(plan, reported, s, v, seed)) is not None}


# The step-speed measurement of a study's variants in its results folder (benchmarks/variant_speed.py --out): each
# variant's samples/s as a ratio of the reference's, timed in turn in one run
STEP_SPEED_FILE = "step-speed.json"


def read_step_speed(results: Path | None) -> dict[str, Any] | None:
    """The results folder's step-speed measurement (STEP_SPEED_FILE), None where it has none; RunError (one line)
    for a file that is not one."""
    path = None if results is None else Path(results) / STEP_SPEED_FILE
    if path is None or not path.is_file():
        return None
    speeds = read_json(path, "step-speed measurement")
    if not isinstance(speeds.get("variants"), dict) or not isinstance(speeds.get("machine"), dict):
        raise RunError(f"{path}: not a step-speed measurement (benchmarks/variant_speed.py --out writes one)")
    return speeds


def speed_note(speeds: dict[str, Any] | None) -> str:
    """The line under the variants table that says where its samples/s ratios come from (empty without them)."""
    if not speeds:
        return ""
    machine = speeds["machine"]
    rounds = speeds.get("settings", {}).get("steps", "?")
    return (f"\nsamples/s × reference: each variant's training step (data loading left out) timed in turn with the "
            f"reference's, the median of {rounds} rounds' ratios, by `{speeds.get('command')}` on "
            f"{machine.get('gpu') or machine.get('cpu')}, {speeds.get('date')}.\n")


# Word pieces of a caption with [CLS] and [SEP] at which the table counts a step's FLOPs: Flickr8k's captions average
# about 14; the ratios between variants hardly move with it.
COST_TEXT_LEN = 16


def step_gflops(config: dict[str, Any]) -> float | None:
    """GFLOPs of one training step of a run's config (blipcore.model.flops at COST_TEXT_LEN); None for a config that no
    longer loads."""
    try:
        cfg = BlipConfig.from_dict(config)
    except ValueError:
        return None
    return training_step_flops(cfg, cfg.train.batch_size * cfg.train.grad_accum_steps, COST_TEXT_LEN) / 1e9


def run_steps(result: RunResult) -> int | None:
    """The optimiser steps a run took: its training log's last step, else its step budget (train.max_steps)."""
    lines = result.history.get("train", [])
    if lines and isinstance(lines[-1].get("step"), int):
        return lines[-1]["step"]
    steps = result.config.get("train", {}).get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def total_pflops(plan: Plan, reported: Reported, stage: str, variant: str, seed: int) -> float | None:
    """PFLOPs a run cost in all: its steps x its step's FLOPs, plus those of the runs it started from (train.init to
    an earlier stage's run, e.g. an image-only or text-only pretraining); None where any part is unknown."""
    result = reported.get((stage, variant), {}).get(seed)
    steps, gflops = (run_steps(result), step_gflops(result.config)) if result is not None else (None, None)
    if steps is None or gflops is None:
        return None
    total = steps * gflops / 1e6
    overrides = next(s for s in plan.stages if s.name == stage).variants[variant]
    for ref_stage, ref_variant, ref_seed in run_references(overrides):
        earlier = total_pflops(plan, reported, ref_stage, ref_variant, seed if ref_seed is None else ref_seed)
        if earlier is None:
            return None
        total += earlier
    return total


# What the runs table reads from a record's history: key -> label (each the step of a best validation number)
HISTORY_LABELS = {"evaluations": "evaluations", "val_itc_min_step": "val ITC loss lowest at",
                  "dev_r1_max_step": "dev R@1 best at", "dev_cider_max_step": "dev CIDEr best at"}


def history_steps(history: dict[str, Any]) -> dict[str, Any]:
    """From a record's history: how many validation evaluations it made and the step of the lowest validation ITC
    loss, of the best dev R@1 (image-to-text plus text-to-image) and of the best dev CIDEr of any strategy. A
    validation loss at its lowest well before dev R@1 at its best is over-confidence; both early, memorisation."""
    evaluations = [e for e in history.get("evaluations", []) if isinstance(e.get("step"), int)]

    def step_of_best(value: Callable[[dict[str, Any]], Any], lowest: bool = False) -> int | None:
        scored = [(v, e["step"]) for e in evaluations if M.is_number(v := value(e))]
        if not scored:
            return None
        return (min(scored, key=lambda p: p[0]) if lowest else max(scored, key=lambda p: p[0]))[1]

    def r1(e: dict[str, Any]) -> float | None:
        found = [e.get("retrieval", {}).get(key) for key in ("i2t_r1", "t2i_r1")]
        return sum(found) if all(M.is_number(v) for v in found) else None

    def cider(e: dict[str, Any]) -> float | None:
        found = [entry.get("metrics", {}).get("cider") for entry in e.get("strategies", {}).values()]
        return max((v for v in found if M.is_number(v)), default=None)

    return {"evaluations": len(evaluations) or None,
            "val_itc_min_step": step_of_best(lambda e: e.get("losses", {}).get("val_itc"), lowest=True),
            "dev_r1_max_step": step_of_best(r1), "dev_cider_max_step": step_of_best(cider)}


def run_rows(plan: Plan, reported: Reported) -> list[dict[str, Any]]:
    """One row per counted run: where its numbers come from, what it reported, what it cost on which machine (the
    minutes, the CPU model and its measured fp32 matmul rate, the FLOPs of a step and of the whole run) and, from
    its history, when its validation numbers were at their best."""
    rows = []
    for (stage, variant), seeds in reported.items():
        for seed, result in sorted(seeds.items()):
            device = result.machine.get("device") or {}
            rows.append({"run": run_dir(Path(), stage, variant, seed).name, "source": result.source,
                         "split": result.split, "epoch": result.epoch, "chosen": result.chosen,
                         "minutes": None if result.train_seconds is None else result.train_seconds / 60,
                         "samples_per_s": result.samples_per_s,
                         "device": device.get("cpu_model") or device.get("name"),
                         "matmul_fp32_gflops": device.get("matmul_fp32_gflops"),
                         "git_revision": code_revisions(result.machine), "differs": result.differs,
                         "gflops": step_gflops(result.config),
                         "pflops": total_pflops(plan, reported, stage, variant, seed),
                         **history_steps(result.history)})
    return rows


def code_revisions(machine: dict[str, Any]) -> str:
    """The short revisions of the code that trained a run: the one it started with, then each other one a resume
    continued it with ("b7054b0+eec98c1")."""
    revisions: list[str] = []
    for revision in [machine.get("git_revision"), *machine.get("resumed_revisions", [])]:
        if revision and revision[:7] not in revisions:
            revisions.append(revision[:7])
    return "+".join(revisions)


def runs_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The counted runs as a Markdown table (empty without any)."""
    if not rows:
        return ""
    headers = ["run", "from", "reported", "minutes", "samples/s", "device", "fp32 matmul GFLOP/s", "revision",
               "GFLOP a step", "PFLOP in all", *HISTORY_LABELS.values(), "settings the plan no longer gives"]
    body = [[row["run"], row["source"], f"{row['split']} epoch {row['epoch']}" + (f", {row['chosen']}" if row["chosen"]
                                                                                    else ""),
             _number(row["minutes"], 1), _number(row["samples_per_s"], 1), row["device"],
             _number(row["matmul_fp32_gflops"], 0), row["git_revision"] or None, _number(row["gflops"], 1),
             _number(row["pflops"], 2), *(row[key] for key in HISTORY_LABELS), ", ".join(row["differs"]) or None]
            for row in rows]
    return markdown(headers, body, "Runs: where each number comes from (run = its folder here, record = its results "
                                   "file), what it cost, and when its validation numbers were at their best (steps; "
                                   "- where the record keeps no history)")


# What the filters table counts of each CapFilt output (capfilt.json's "counts"): the captions and images there
# were, and how many were kept; the clean subset's captions are kept as they are
FILTER_COUNTS = ("original", "kept_original", "images", "images_kept", "synthetic", "kept_synthetic", "clean",
                 "clean_images")


def filter_rows(plan: Plan, study: Path, results: Path | None = None) -> list[dict[str, Any]]:
    """One row per (CapFilt command stage, seed, scorer) whose output exists here, or whose summary `results`
    holds: its protocol (which captioner and filter, `capfilt_protocol`), how well the filter found the planted
    captions (ROC AUC, precision, recall) and what it kept (blipcore.experiments.capfilt's capfilt.json). A
    summary found here is recorded in `results`."""
    rows = []
    for stage in (s for s in plan.stages if not s.trains):
        for seed in plan.seeds if stage.per_seed else [None]:
            summary = _capfilt_summary(stage, plan, study, seed, results)
            if summary is None:
                continue
            counts, planted = summary.get("counts", {}), summary.get("planted") or {}
            for scorer in summary.get("scorers", []):
                detection = (planted.get("scorers") or {}).get(scorer) or {}
                rows.append({"protocol": capfilt_protocol(plan, stage.name), "stage": stage.name, "seed": seed,
                             "scorer": scorer, "decided": scorer == summary.get("score"),
                             "auc": detection.get("auc"), "precision": detection.get("precision"),
                             "recall": detection.get("recall"), "dropped_original": detection.get("dropped"),
                             "planted": planted.get("planted"), **{key: counts.get(key) for key in FILTER_COUNTS}})
    return rows


def _capfilt_summary(stage: Stage, plan: Plan, study: Path, seed: int | None,
                     results: Path | None) -> dict[str, Any] | None:
    """A command stage's CapFilt summary: from its output here (then recorded in `results`), else from its record
    in `results`; None when neither is there (or the stage is not CapFilt)."""
    found = stage_output(stage, plan, study, seed) / CAPFILT_SUMMARY
    name = stage.name if seed is None else f"{stage.name}-seed{seed}"
    recorded = None if results is None else results / f"{name}.{CAPFILT_SUMMARY}"
    if found.is_file():
        summary = read_json(found, "CapFilt summary")
        if recorded is not None:
            save_record(recorded, summary)
        return summary
    if recorded is not None and recorded.is_file():
        return read_json(recorded, "recorded CapFilt summary")
    return None


def _recovery_value(summary: dict[str, Any], role: str) -> str:
    """A role's mean ± sd over its seeds in a recovery table, "-" before a run."""
    declared, entry = M.metric(summary["metric"]), summary[role]
    if entry["mean"] is None:
        return "-"
    spread = f" ± {declared.format(entry['sd'])}" if entry["sd"] is not None else ""
    seeds = len(entry["values"])
    return f"{declared.format(entry['mean'])}{spread} ({seeds} seed{'' if seeds == 1 else 's'})"


def recovery_markdown(summaries: dict[str, Any] | Sequence[dict[str, Any]] | None) -> str:
    """The recovery questions (one summary, or a list: one per protocol) as one short Markdown table, a row a
    question: a role's column names its variant when every row has the same ("clean/tuned (reference)"), else
    each cell does; a protocol column where a question's treated variant trains on CapFilt data. Empty without a
    question."""
    summaries = [summaries] if isinstance(summaries, dict) else list(summaries or [])
    if not summaries:
        return ""
    protocols = any(summary.get("protocol") for summary in summaries)
    shared = {role: len({summary[role]["run"] for summary in summaries}) == 1 for role in RECOVERY_ROLES}
    heads = [f"{summaries[0][role]['run']} ({role})" if shared[role] else role for role in RECOVERY_ROLES]
    rows = []
    for summary in summaries:
        declared = M.metric(summary["metric"])
        roles = [_recovery_value(summary, role) if shared[role] else
                 f"{summary[role]['run']}: {_recovery_value(summary, role)}" for role in RECOVERY_ROLES]
        numbers = [None if summary[key] is None else declared.format(summary[key]) for key in ("cost", "won_back")]
        share = None if summary["share"] is None else f"{100 * summary['share']:.0f}%"
        rows.append([*([summary.get("protocol")] if protocols else []), *roles, *numbers, share,
                     f"{100 * summary['target']:.0f}%", summary["verdict"]])
    labels = ", ".join(sorted({M.metric(summary["metric"]).label for summary in summaries}))
    return markdown([*(["protocol"] if protocols else []), *heads, "cost", "won back", "share won back", "target",
                     "verdict"], rows,
                    f"Recovery in {labels}: each run's dev-chosen checkpoint and decoding, mean ± sd over seeds")


def targets_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The targets as a Markdown table, one row per variant and a column per target (empty without targets)."""
    if not rows:
        return ""
    targets = list(dict.fromkeys(row["target"] for row in rows))
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        declared = M.metric(row["metric"])
        compared = row["above"] is not None or row.get("not_below") is not None
        shown = row["margin"] if compared else row["mean"]
        value = "-" if shown is None else ("+" if compared and shown >= 0 else "") + declared.format(shown)
        if row["sd"] is not None and not compared:
            value += f" ± {declared.format(row['sd'])}"
        if row["two_sd"] is not None:
            value += f" (2 sd {declared.format(row['two_sd'])})"
        cells.setdefault(row["run"], {})[row["target"]] = f"{value}: {row['verdict'].split(':')[0]}"
    seeds = {row["run"]: row["seeds"] for row in rows}
    body = [[run, seeds[run], *(found.get(t) for t in targets)] for run, found in cells.items()]
    return markdown(["variant", "seeds", *targets], body,
                    "Targets: each variant's reported numbers (dev-chosen checkpoint and decoding), mean ± sd over "
                    "seeds; a margin over a reference row or another variant counts only beyond two sd over seeds")


def write_table(plan: Plan, study: Path, results: Path | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """study.json, study.csv and study.md in `study`, from its completed runs and the records in `results` (which
    gets a record of every completed run here); returns the JSON content."""
    reported = reported_runs(plan, study, results, log)
    if results is not None:
        for (stage, variant), seeds in reported.items():
            for seed, result in seeds.items():
                if result.source == "run" and not result.differs:  # a record holds what the plan asks for
                    save_record(record_path(results, stage, variant, seed), result.record(stage, variant, seed))
    table = study_table(plan, study, reported, results)
    atomic_write_json(study / STUDY_TABLE, table)
    columns = ["stage", "variant", "decoding", "split", "seeds", "chosen_on_dev", "epochs"] + [
        k for key in (*TABLE_METRICS, *RETRIEVAL_METRICS, *(key for key, _, _ in COST_COLUMNS))
        for k in (key, f"{key}_sd")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table["rows"])
    atomic_write_bytes(study / "study.csv", buffer.getvalue().encode())
    atomic_write_bytes(study / "study.md", table_markdown(table).encode())
    return table


def study_table(plan: Plan, study: Path, reported: Reported, results: Path | None) -> dict[str, Any]:
    """Everything the study's table says (study.json): variant rows, runs, filters, recovery and targets."""
    recoveries = recovery_summaries(plan, reported)
    # "recovery": the first question, as readers of one question (the dashboard's Study page) expect it
    speeds = read_step_speed(results)
    return {"name": plan.name, "preset": plan.preset, "seeds": plan.seeds, "rows": study_rows(plan, reported, speeds),
            "step_speed": speeds,
            "runs": run_rows(plan, reported), "filters": filter_rows(plan, study, results),
            "recovery": recoveries[0] if recoveries else None, "recoveries": recoveries,
            "targets": target_rows(plan, reported)}


def table_markdown(table: dict[str, Any]) -> str:
    """study.md: the variants table, then the filters, recovery, targets and runs sections a study has."""
    if not table["rows"]:
        return "No run of this study is complete or recorded yet.\n"
    return (markdown_table(table["rows"]) + speed_note(table.get("step_speed"))
            + filters_markdown(table["filters"]) + recovery_markdown(table["recoveries"])
            + targets_markdown(table["targets"]) + runs_markdown(table["runs"]))


def records_report(plan: Plan, results: Path, command: str) -> str:
    """The study's table from its committed records in `results` alone (no run folder counts, nothing is written
    there): the Markdown page that docs/results/<plan>.md holds, headed by the `command` that regenerates it."""
    with tempfile.TemporaryDirectory() as nowhere:  # an empty study folder: only records count
        study = Path(nowhere)
        table = study_table(plan, study, reported_runs(plan, study, results), results)
    return (f"# Study `{plan.name}`: the table of its records\n\nGenerated from the records in `{results}` by\n\n"
            f"    {command}\n\nDo not edit: change the plan or add records, then run the command again.\n\n"
            + table_markdown(table))


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """The one Markdown table writer of the study's report: a title line (optional), the header and the rows, each
    cell as given (None as "-"); a blank line before the title or table, so that sections follow one another."""
    lines = ["", title, ""] if title else [""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: Any, digits: int) -> str:
    return "-" if not M.is_number(value) else f"{value:.{digits}f}"


# Columns of the variants table beyond the metrics: (key, label, digits)
COST_COLUMNS = (("minutes", "minutes", 1), ("gflops", "GFLOP a step", 1), ("compute_ratio", "compute × reference", 2),
                ("speed_ratio", "samples/s × reference", 2))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The study as a Markdown table: mean ± sd over seeds, in each metric's declared format, and what it cost."""
    def cell(row: dict[str, Any], key: str, show: Callable[[Any], str]) -> str:
        value, spread = row.get(key), row.get(f"{key}_sd")
        return show(value) + (f" ± {show(spread)}" if M.is_number(spread) and not math.isnan(spread) else "")

    keys = [*TABLE_METRICS, *RETRIEVAL_METRICS]
    headers = ["stage", "variant", "decoding", "split", "seeds (chosen on dev)", *(M.metric(k).label for k in keys),
               *(label for _, label, _ in COST_COLUMNS)]
    body = [[row["stage"], row["variant"], row["decoding"], row["split"], f"{row['seeds']} ({row['chosen_on_dev']})",
             *(cell(row, key, M.metric(key).format) for key in keys),
             *(cell(row, key, lambda v, d=digits: _number(v, d)) for key, _, digits in COST_COLUMNS)]
            for row in rows]
    return markdown(headers, body).lstrip("\n")


def filters_markdown(filters: Sequence[dict[str, Any]]) -> str:
    """The CapFilt filters as a Markdown table, protocols side by side (empty when the study has none)."""
    if not filters:
        return ""

    def share(value: Any) -> str:
        return "-" if not M.is_number(value) else f"{100 * value:.1f}%"

    def kept(row: dict[str, Any], key: str, total: str) -> str:
        found, of = row.get(key), row.get(total)
        if not isinstance(found, int) or not isinstance(of, int):
            return "-"
        return f"{share(found / of) if of else '-'} ({found} of {of})"

    def clean(row: dict[str, Any]) -> str:
        return f"{row['clean']} captions of {row['clean_images']} images" if row.get("clean") else "-"

    headers = ["protocol", "stage", "seed", "scorer", "decided", "ROC AUC", "precision", "recall", "originals kept",
               "images kept", "synthetic kept", "clean, kept as they are"]
    body = [[row["protocol"], row["stage"], "all" if row["seed"] is None else row["seed"], row["scorer"],
             "yes" if row["decided"] else "no", _number(row["auc"], 3), share(row["precision"]),
             share(row["recall"]), kept(row, "kept_original", "original"), kept(row, "images_kept", "images"),
             kept(row, "kept_synthetic", "synthetic"), clean(row)] for row in filters]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in filters:
        groups.setdefault((row["protocol"], row["stage"], row["scorer"]), []).append(row)
    spread = [[*key, len(rows), *(_mean_sd([row[name] for row in rows], show) for name, show in (
        ("auc", lambda v: _number(v, 3)), ("precision", share), ("recall", share)))] for key, rows in groups.items()]
    return (markdown(headers, body, "CapFilt filters: finding the planted captions among the scored originals (low "
                                    "score = planted), and what each protocol kept")
            + markdown(["protocol", "stage", "scorer", "seeds", "ROC AUC", "precision", "recall"], spread,
                       "CapFilt filters over seeds: mean ± sd"))


def _mean_sd(values: Sequence[Any], show: Callable[[Any], str]) -> str:
    """The mean ± sample sd of the numbers among `values`, each shown by `show` ("-" without any)."""
    numbers = [v for v in values if M.is_number(v)]
    if not numbers:
        return "-"
    spread = f" ± {show(statistics.stdev(numbers))}" if len(numbers) > 1 else ""
    return show(statistics.fmean(numbers)) + spread
