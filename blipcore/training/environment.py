"""What a run records about the code and machine that trained it (run.json): versions, the device and its
measured matmul speed, and the git revision of the code this process imported.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..speed import cpu_model, matmul_gflops


def environment_info(device: torch.device) -> dict[str, Any]:
    import numpy
    import transformers

    from .. import __version__

    versions = {
        "blipcore": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.machine()}, {os.cpu_count()} cores"
    described = {"type": device.type, "name": device_name, "cpu_model": cpu_model(),
                 # what a run's minutes are read against: machines differ several-fold in it
                 "matmul_fp32_gflops": round(matmul_gflops(device.type), 1)}
    return {"versions": versions, "device": described, "git_revision": git_revision()}


def _checkout_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# Read when this module is imported, with the code it runs: a study process lives for hours, and a checkout moved
# meanwhile must not stamp its later runs with a revision whose code they never ran.
_REVISION_AT_IMPORT = _checkout_revision()


def git_revision() -> str | None:
    """The git revision of the code this process imported (None outside a git checkout)."""
    return _REVISION_AT_IMPORT
