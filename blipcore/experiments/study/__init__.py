"""Studies: a plan of stages run into one folder of ordinary run directories, and one table of the results.

A plan is a TOML file:

    name = "recipes"
    preset = "flickr8k-cpu"             # every run starts from this preset ...
    seeds = [0, 1, 2]
    [set]                               # ... with these fields set (like --set on the command line)
    "train.max_steps" = 3000

    [[stage]]                           # a training stage: variants x seeds
    name = "ablation"
    [stage.variants]
    original = { "train.lr" = 5e-5, "train.batch_size" = 8 }
    tuned = {}

    [[stage]]                           # a command stage: `python -m train ARGS`, which makes a dataset
    name = "noisy"
    command = ["data", "noise", "--from", "{data_root}", "--out", "{study}/data/noisy", "--fraction", "0.3"]
    produces = "{study}/data/noisy"

    [[stage]]                           # trains on the dataset that stage "noisy" produced
    name = "on-noise"
    data = "noisy"
    [stage.variants]
    tuned = {}

Each run is `<study>/<stage>-<variant>-seed<seed>`, an ordinary run directory: the Runs, Training and
Compare pages list it, and `python -m train fit --run-dir ... --resume` continues it. Running the
plan again skips what is complete and resumes what is not, so a long study can be run a few runs at a time. A command
stage is done when its `produces` folder holds a `.complete` marker, which this package writes after
the command succeeded.

The protocol: each run's checkpoint is the epoch whose validation (dev) evaluation reached the highest
CIDEr with any strategy; when the data has a test split (data.test_annotations), that checkpoint is
evaluated on all of it with every strategy (eval/epoch_NNN.test.json) and the table reports the test
numbers, else the dev ones. The table (study.json / study.csv / study.md): one row per (stage, variant,
decoding strategy or reference row), the mean and the spread (sample standard deviation) over seeds,
how many seeds' dev choice the strategy was, and the minutes each run took.

Placeholders in commands: {study} (the study folder), {data_root} (the preset's data folder after `set`),
{run:<stage>/<variant>/<seed>} (a run folder of an earlier stage). A command stage whose `produces` holds {seed}
runs once per seed, and each seed's runs of the stages trained on it use that seed's output; its command may use
{seed} and name runs without a seed, {run:<stage>/<variant>} meaning the one of the same seed. That is how every
seed of a CapFilt plan is the whole loop (its own noisy model captions and filters for its own retraining):

    [[stage]]
    name = "bootstrapped-data"
    command = ["capfilt", "--captioner", "{run:noisy/tuned}", "--filter", "{run:noisy/tuned}", "--data",
               "{study}/data/noisy", "--out", "{study}/data/bootstrapped-seed{seed}", "--seed", "{seed}"]
    produces = "{study}/data/bootstrapped-seed{seed}"
 A variant's settings may name a run of an
earlier training stage too, {run:<stage>/<variant>} meaning the one of the same seed: that is how a stage
starts from another's weights (decoder pretraining, then the full recipe):

    [[stage]]
    name = "pretraining"
    [stage.variants]
    text-lm = { "model.text_only" = true, "model.itc_weight" = 0.0, "train.max_steps" = 300 }

    [[stage]]
    name = "recipes"
    [stage.variants]
    decoder-pretrained = { "train.init" = "{run:pretraining/text-lm}", "train.max_steps" = 600 }

Selecting a run (--only) selects the runs its settings name, and the runs a command stage it trains on names
(CapFilt's captioner), while that stage's output is not there yet.

A study stops at a run that did not complete (Ctrl-C, SIGTERM, a step budget cut short): the table leaves it
out, and the same command resumes it. Its later runs may build on it, so they wait.

Run folders are big and often do not outlive a machine; the numbers do. With a results folder (`--results DIR`)
every completed run's reported numbers (its dev-chosen checkpoint's evaluation, metrics only: no captions, no
weights) and every CapFilt stage's summary are kept there as small JSON files, one a run, meant to be committed.
The table counts a recorded run whose folder is gone, and the study does not train it again, unless a stage still
to run needs its folder (a captioner), or the plan now gives it other settings (the record is then ignored,
with a message). A run folder that is there always wins over its record.

A plan may ask one question of its table: how much of what one variant lost against another does a third win
back (CapFilt: of the CIDEr that noisy captions cost, how much does retraining on the bootstrapped data
recover?). Each run counts with its reported number (its dev-chosen checkpoint and decoding strategy):

    [recovery]
    metric = "cider"
    reference = "clean/tuned"          # stage/variant: the undamaged run
    degraded = "noisy/tuned"           # the damaged one
    treated = "bootstrapped/tuned"     # the repair
    target = 0.5                       # share of the cost it must win back ...
    # ... judged only where the cost exceeds two standard deviations over seeds (of reference and degraded)

`[[recovery]]` tables ask it of several protocols, a row each in one table (CapFilt's: a captioner and filter
that are the noisy-data model, against BLIP's fine-tuned on a clean subset); each row names the captioner and
filter of the CapFilt data its treated variant trains on.

And it may state targets, levels every training variant is judged against on the same reported numbers (mean over
seeds): a metric's level (at least, or at most for a lower-is-better metric), or a margin over a reference row,
met only where the margin also exceeds two standard deviations over seeds (of the variant and of the row):

    [[target]]
    metric = "cider"
    value = 0.30                       # CIDEr at least 0.30
    [[target]]
    metric = "cider"
    above = "nearest-neighbour"        # CIDEr at least 0.05 better than the nearest-neighbour row, and by more
    by = 0.05                          # than two sd over seeds

The package, each module importing only those before it: `plan` (the format and its checks), `folders` (run folders,
placeholders, each run's config), `records` (what a run counts with: its folder or its record), `judging` (recovery
and targets), `report` (the table and study.md), `running` (run_study).
"""

from .folders import planned_config, run_dir
from .judging import judge_against_variant, judge_recovery, judge_target, pooled_sd
from .plan import RECOVERY_ROLES, TABLE_METRICS, PlanError, Recovery, Target, load_plan, parse_plan
from .records import (
    HISTORY_TRAIN_LINES,
    RunResult,
    completed_result,
    config_differences,
    dev_choice,
    numbers_only,
    read_records,
    reported_evaluation,
    reported_runs,
    run_history,
)
from .report import (
    COST_TEXT_LEN,
    STEP_SPEED_FILE,
    code_revisions,
    history_steps,
    read_step_speed,
    records_report,
    recovery_markdown,
    run_rows,
    study_rows,
    targets_markdown,
    total_pflops,
    write_table,
)
from .running import StudyStopped, run_study, save_plan_copy, selection

__all__ = [
    "COST_TEXT_LEN", "HISTORY_TRAIN_LINES", "STEP_SPEED_FILE", "RECOVERY_ROLES", "TABLE_METRICS", "PlanError",
    "Recovery", "RunResult", "StudyStopped", "Target", "code_revisions", "completed_result", "config_differences",
    "dev_choice", "history_steps", "judge_against_variant", "judge_recovery", "judge_target", "load_plan",
    "numbers_only", "parse_plan", "planned_config", "pooled_sd", "read_records", "read_step_speed", "records_report",
    "recovery_markdown", "reported_evaluation", "reported_runs", "run_dir", "run_history", "run_rows", "run_study",
    "save_plan_copy", "selection", "study_rows", "targets_markdown", "total_pflops", "write_table"
]
