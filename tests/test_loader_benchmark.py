"""benchmarks/loader_throughput.py at a tiny size, so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from blipcore.paths import PROJECT_ROOT
from train.cli import main


def test_loader_benchmark_compares_shards_with_the_folder(shapes_root, tmp_path):
    shards = tmp_path / "shards"
    assert main(["data", "shards", "--from", str(shapes_root), "--out", str(shards)]) == 0
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/loader_throughput.py"), "--folder", str(shapes_root),
         "--shards", str(shards), "--preset", "demo", "--batch-size", "8", "--workers", "0", "--batches", "2",
         "--rounds", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert len(result["rounds"]) == 2 and all(r["folder"] > 0 and r["shards"] > 0 for r in result["rounds"])
    ratios = sorted(r["shards"] / r["folder"] for r in result["rounds"])
    assert result["ratio_median"] == (ratios[0] + ratios[1]) / 2
