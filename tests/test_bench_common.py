"""bench/common.py: machine detection, where results go, the Markdown + CSV table writer, and its use by
``pyfusion bench`` (quick runs never touch bench/results)."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_common", None)


def test_machine_detection(common):
    import torch

    m = common.Machine.detect()
    assert m.cores == os.cpu_count() and m.cpu and m.torch == torch.__version__
    assert m.cuda == (torch.version.cuda or "none")
    assert (m.gpu == "none") == (not torch.cuda.is_available())
    assert m.triton != ""  # from package metadata: detection never imports triton
    assert m.cpu in m.summary() and f"torch {m.torch}" in m.summary()


def test_output_path(common, tmp_path, monkeypatch):
    assert common.output_path(tmp_path / "x.md", "a.md", quick=True) == tmp_path / "x.md"
    assert common.output_path(None, "a.md", quick=False) == common.RESULTS / "a.md"
    monkeypatch.setenv(common.OUT_ENV, str(tmp_path))
    assert common.output_path(None, "a.md", quick=True) == tmp_path / "a.md"
    monkeypatch.delenv(common.OUT_ENV)
    p = common.output_path(None, "a.md", quick=True)
    try:
        assert p.name == "a.md" and p.parent.name.startswith("pyfusion-bench-") and common.RESULTS not in p.parents
    finally:
        shutil.rmtree(p.parent, ignore_errors=True)


def test_report_writes_markdown_and_csv_with_machine_columns(common, tmp_path, capsys):
    r = common.Report("Demo benchmark", quick=True, command="python bench/bench_demo.py --quick")
    r.text("Some prose.")
    r.table("speed", ["shape", "ms", "x"], [["tiny", 1.23456, 2.0], ["big", 10.0, None]], formats={"ms": ".2f"})
    r.table("other", ["name"], [["a"]])
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        r.table("bad", ["a", "b"], [[1]])
    with pytest.raises(ValueError, match="already exists"):
        r.table("speed", ["a"], [[1]])
    written = r.write(tmp_path / "demo.md")
    assert [p.name for p in written] == ["demo.md", "demo.speed.csv", "demo.other.csv"]
    assert capsys.readouterr().out.splitlines() == [f"wrote {p}" for p in written]
    md = (tmp_path / "demo.md").read_text()
    assert md.startswith("# Demo benchmark\n") and "QUICK MODE" in md and "`python bench/bench_demo.py --quick`" in md
    assert f"- machine: {r.machine.summary()}" in md and "load average (1/5/15 min) at start" in md
    assert "| shape | ms | x |\n|---|---:|---:|\n| tiny | 1.23 | 2.0 |\n| big | 10.00 |  |" in md
    rows = list(csv.DictReader(open(tmp_path / "demo.speed.csv")))
    assert [row["shape"] for row in rows] == ["tiny", "big"]
    assert rows[0]["ms"] == "1.23456"  # raw values in the CSV
    for col in ("cpu", "cores", "gpu", "torch", "cuda", "triton", "load_start", "load_end"):
        assert rows[0][col] != "", col
    assert rows[0]["cores"] == str(os.cpu_count())


def test_pyfusion_bench_quick_leaves_committed_results_alone(tmp_path, capsys):
    from pyfusion.cli import main

    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "common.py", bench / "common.py")
    committed = bench / "results" / "demo.md"
    committed.write_text("committed full run\n")
    (bench / "bench_demo.py").write_text(
        "import argparse\n"
        "from common import Report, output_path\n"
        "ap = argparse.ArgumentParser(); ap.add_argument('--quick', action='store_true'); ap.add_argument('--out')\n"
        "args = ap.parse_args()\n"
        "r = Report('Demo', quick=args.quick)\n"
        "r.table('t', ['mode', 'ms'], [['quick' if args.quick else 'full', 1.5]])\n"
        "r.write(output_path(args.out, 'demo.md', args.quick))\n"
    )
    assert main(["bench", "demo", "--bench-dir", str(bench)]) == 0
    out = capsys.readouterr().out
    assert "| quick | 1.5 |" in out and "QUICK MODE" in out
    assert committed.read_text() == "committed full run\n"
    assert sorted(p.name for p in (bench / "results").iterdir()) == ["demo.md"]
