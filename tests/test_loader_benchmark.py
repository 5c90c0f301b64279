"""benchmarks/loader_throughput.py at a tiny size, so that it cannot rot."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from blipcore.paths import PROJECT_ROOT
from tests.conftest import PHOTOS
from train.cli import main


def test_loader_benchmark_compares_the_cache_and_shards_with_the_folder(tmp_path):
    shards = tmp_path / "shards"
    assert main(["data", "shards", "--from", str(PHOTOS), "--out", str(shards), "--no-progress"]) == 0
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks/loader_throughput.py"), "--folder", str(PHOTOS),
         "--shards", str(shards), "--cache-dir", str(tmp_path / "cache"), "--preset", "coco-mini",
         "--batch-size", "8", "--workers", "0", "--batches", "2", "--rounds", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    rounds = result["rounds"]
    assert len(rounds) == 2 and all(r[name] > 0 for r in rounds for name in ("folder", "cache", "shards"))
    for name in ("cache", "shards"):
        assert result["median_ratios"][f"{name}/folder"] == statistics.median(r[name] / r["folder"] for r in rounds)
    assert result["cache"].startswith(str(tmp_path / "cache")) and "-144px-" in result["cache"]  # 1.5 x 96
