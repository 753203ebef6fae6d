"""Runs bench/transformers_fusion.py and bench/support_matrix.py in quick mode (tiny zoo members, tiny test models),
so that the scripts behind bench/results/transformers.md, support_matrix.md and the README's matrix keep working."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyfusion import _ext

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("transformers")
needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=f"compiled extension missing: {_ext.EXT_SKIP_REASON}")


def _run(script: str, out: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@needs_ext
def test_transformers_fusion_quick(tmp_path):
    out = tmp_path / "transformers.md"
    _run("transformers_fusion.py", out, {"PYFUSION_ZOO": str(tmp_path / "zoo")})  # trains the tiny members
    text = out.read_text()
    assert "QUICK MODE" in text and "Every method ran on every case." in text
    assert "characters" in text  # the text corpus is named with its size
    for table, metric in (("digits_vit_iid_K2_tiny", "accuracy %"), ("text_gpt2_K2_tiny", "perplexity")):
        rows = _rows(tmp_path / f"transformers.{table}.csv")
        by = {(r["method"], r["setting"]): r for r in rows}
        ens, full = by[("ensemble (logits)", "-")], by[("partial", "alpha 1")]
        # alpha = 1 is exactly the ensemble (logits averaged): the same metric, at no less than the ensemble's cost
        # (more where layers stay dense with zero blocks: attention projections, GPT-2's Conv1D)
        assert abs(float(full[metric]) - float(ens[metric])) <= 1e-4 * abs(float(ens[metric])), (table, full, ens)
        assert float(ens["FLOPs/ens (all)"]) == 1.0 and float(full["FLOPs/ens (all)"]) >= 1.0 - 1e-9, full
        for column in ("FLOPs/ens (all)", "FLOPs/ens (pyfusion.cost)"):  # alpha 0: one network, half the ensemble
            assert abs(float(by[("partial", "alpha 0")][column]) - 0.5) < 1e-9, by[("partial", "alpha 0")]
        assert all(r[metric] != "" for r in rows), [r for r in rows if r[metric] == ""]


@pytest.mark.slow
@needs_ext
def test_support_matrix_quick(tmp_path):
    out = tmp_path / "support_matrix.md"
    _run("support_matrix.py", out)
    rows = {r["family"]: r for r in _rows(tmp_path / "support_matrix.matrix.csv")}
    core = ["average", "weight_matching", "activation_matching", "ot", "partial", "cluster", "prune"]
    for family in ("MLP", "HF GPT-2"):
        assert all(rows[family][m] == "✓" for m in core), rows[family]
    assert all(rows["MLP"][m] == "✓" for m in ("repair", "fast_modules", "save/load", "hf", "kf")), rows["MLP"]


def test_readme_support_matrix_is_the_generated_table():
    """The README's matrix is the one bench/support_matrix.py pastes: every family a row, every method a column."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import support_matrix as sm
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = (ROOT / "README.md").read_text()
    block = text.split(sm.BEGIN)[1].split(sm.END)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(["family", *sm.METHODS]) + " |"
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert rows == list(sm.families()), rows
    assert all(set(line.strip("| ").split(" | ")[1:]) <= {"✓", "✗"} for line in lines[2:])
