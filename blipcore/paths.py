"""The one declaration of the project's own folders.

`PROJECT_ROOT` is the checkout that holds the `blipcore` package (the project is installed editable,
`pip install -e .`): relative data roots in presets (`data/shapes`) are relative to it, and the
dashboard starts background training there, so both work from any current directory. Run folders
are the user's: relative to the current directory, `runs/` by default.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS_DIR = Path("runs")  # relative to the current folder, as `python -m train fit --run-dir` is
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def project_path(path: str | Path) -> Path:
    """`path` made absolute: a relative one is taken relative to PROJECT_ROOT."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()
