"""The one declaration of the project's own folders.

`PROJECT_ROOT` is the checkout that holds the `blipcore` package (the project is installed editable,
`pip install -e .`): relative data roots in presets (`data/shapes`) are relative to it, and the
dashboard starts background training there, so both work from any current directory. Run folders
are the user's: relative to the current directory, `runs/` by default.

`SHARED_DATA_DIR` is the one place that says where the large datasets beside the checkout live (the full
Flickr8k in `flickr8k/`, 674 COCO photos in `coco-mini/`): `../shared/data` next to the checkout, or the
folder named by the environment variable `BLIPLAB_SHARED_DATA`. A clone has no such folder; the tests then
use `COCO_CC_BY_FIXTURE`, 74 small CC BY COCO photos with their captions shipped in tests/fixtures, and
skip only what needs the full Flickr8k.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS_DIR = Path("runs")  # relative to the current folder, as `python -m train fit --run-dir` is
PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # package data, as ASSETS_DIR
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the bert-base-uncased word pieces (blipcore.model.tokenizer)

SHARED_DATA_ENV = "BLIPLAB_SHARED_DATA"
# The folder that holds flickr8k/ and coco-mini/ (it may not exist): $BLIPLAB_SHARED_DATA, else ../shared/data.
SHARED_DATA_DIR = (Path(os.environ[SHARED_DATA_ENV]).expanduser().resolve() if os.environ.get(SHARED_DATA_ENV)
                   else PROJECT_ROOT.parent / "shared" / "data")
# COCO-caption-format folder in the repository (images/, annotations/captions_{train,val}.json): 64 train and
# 10 val photos, 64 px on the short side, all CC BY 2.0 (ATTRIBUTION.md); rebuilt by make_coco_cc_by.py beside it.
COCO_CC_BY_FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "coco-cc-by"


def project_path(path: str | Path) -> Path:
    """`path` made absolute: a relative one is taken relative to PROJECT_ROOT."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()
