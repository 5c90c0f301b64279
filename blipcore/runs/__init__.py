"""The run directory, the one contract between the trainer and the dashboard (`rundir`): every path in a run
folder, its weights and resumable state (`weights`), the trainer lock (`lock`), study folders. It imports the model
and the bottom layer, nothing of evaluation, training or experiments. The names the rest of the project uses are
importable from here.
"""

from .files import CheckpointError, RunError, read_json
from .rundir import STUDY_PLAN, STUDY_TABLE, Checkpoint, RunDir, init_checkpoint, is_study, list_runs, parse_run_spec

__all__ = ["STUDY_PLAN", "STUDY_TABLE", "Checkpoint", "CheckpointError", "RunDir", "RunError", "init_checkpoint",
           "is_study", "list_runs", "parse_run_spec", "read_json"]
