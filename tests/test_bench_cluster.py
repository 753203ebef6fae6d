"""Runs bench/bench_cluster.py in quick mode once, so that the benchmark script keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyfusion import _ext

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=f"compiled extension missing: {_ext.EXT_SKIP_REASON}")
def test_bench_cluster_quick(tmp_path):
    out = tmp_path / "cluster.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_cluster.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "QUICK MODE" in text and "reference: numpy randomized Ward + sklearn KMeans" in text
    assert text.count("| pyfusion weighted_kmeans (points) |") == 2  # 1 and 2 threads
