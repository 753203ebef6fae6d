"""What every benchmark script shares: the machine it ran on, where its results go, and one table writer.

* :class:`Machine` detects the CPU model, logical cores, GPU (if any), and the torch / CUDA / triton versions
  (triton from its package metadata: detection never imports it).
* :func:`output_path`: ``--out`` when given; in quick mode a temporary folder (``$PYFUSION_BENCH_OUT`` when
  the ``pyfusion bench`` command sets it, else a fresh ``pyfusion-bench-*`` folder), so that a smoke run never
  touches the committed tables; a full run writes ``bench/results/<name>``.
* :class:`Report` is the one writer: a Markdown document (title, how it was generated, the machine, the load
  average at start and end, then the script's text and tables) and one CSV per table whose columns are the
  table's plus the machine's (``cpu, cores, gpu, torch, cuda, triton, load_start, load_end``). Files are written
  atomically; each written path is printed as ``wrote <path>`` (what ``pyfusion bench --full`` reports).

Usage::

    report = Report("Linear assignment on CPU", quick=args.quick)
    report.text("Single thread, float64, median of fresh problems.")
    report.table("sizes", ["kind", "n", "pyfusion ms"], rows, formats={"pyfusion ms": ".2f"})
    report.write(output_path(args.out, "assignment_cpu.md", args.quick))
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.metadata
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT_ENV = "PYFUSION_BENCH_OUT"

__all__ = ["Machine", "OUT_ENV", "RESULTS", "ROOT", "Report", "output_path"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Machine:
    """The machine a benchmark ran on (what a reader needs to compare two tables)."""

    cpu: str
    cores: int
    gpu: str
    torch: str
    cuda: str
    triton: str
    python: str
    platform: str

    @classmethod
    @functools.cache
    def detect(cls) -> Machine:
        import torch

        gpu = "none"
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            gpu = torch.cuda.get_device_name(0) + (f" (x{n})" if n > 1 else "")
        return cls(
            cpu=_cpu_model(),
            cores=os.cpu_count() or 1,
            gpu=gpu,
            torch=torch.__version__,
            cuda=torch.version.cuda or "none",
            triton=_version("triton"),
            python=platform.python_version(),
            platform=platform.platform(),
        )

    def summary(self) -> str:
        return (
            f"{self.cpu}, {self.cores} logical cores, GPU: {self.gpu}; torch {self.torch}, CUDA {self.cuda}, "
            f"triton {self.triton}, Python {self.python} ({self.platform})"
        )


def output_path(out: str | os.PathLike[str] | None, name: str, quick: bool) -> Path:
    """Where a script writes ``name``: ``out`` if given; quick mode: a temporary folder; else bench/results/."""
    if out:
        return Path(out)
    if quick:
        folder = os.environ.get(OUT_ENV) or tempfile.mkdtemp(prefix="pyfusion-bench-")
        return Path(folder) / name
    return RESULTS / name


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - platforms without getloadavg
        return (float("nan"),) * 3


def _fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


@functools.cache
def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", script.as_posix(), *sys.argv[1:]])


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class _Table:
    name: str
    columns: list[str]
    rows: list[list[Any]]
    formats: dict[str, str | Callable[[Any], str]]
    align: dict[str, str]

    def cell(self, column: str, value: Any) -> str:
        fmt = self.formats.get(column)
        if value is None:
            return ""
        if callable(fmt):
            return fmt(value)
        if fmt is not None and isinstance(value, (int, float)):
            return format(value, fmt)
        return str(value)

    def markdown(self) -> list[str]:
        def numeric(c: int) -> bool:
            return all(isinstance(r[c], (int, float)) for r in self.rows if r[c] is not None) and bool(self.rows)

        aligns = []
        for c, col in enumerate(self.columns):
            a = self.align.get(col, "right" if numeric(c) else "left")
            aligns.append("---:" if a == "right" else "---")
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join(aligns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(self.cell(col, v) for col, v in zip(self.columns, row)) + " |")
        return lines


@dataclass
class Report:
    """One benchmark's results as Markdown (text and tables) and CSV (one file per table, machine columns added).

    Args:
        title: the document's heading.
        quick: a smoke run (marked in the document; its numbers are not results).
        command: how the run was started (default: the script and its arguments).
    """

    title: str
    quick: bool = False
    command: str | None = None
    machine: Machine = field(default_factory=Machine.detect)
    load_start: tuple[float, float, float] = field(default_factory=_load)
    load_end: tuple[float, float, float] | None = None
    _parts: list[str | _Table] = field(default_factory=list)

    def text(self, *lines: str) -> None:
        """Paragraph lines (Markdown), followed by a blank line."""
        self._parts.append("\n".join(lines))

    def table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        formats: dict[str, str | Callable[[Any], str]] | None = None,
        align: dict[str, str] | None = None,
    ) -> None:
        """A table: ``rows`` hold raw values (numbers stay numbers in the CSV); ``formats`` maps a column to a
        format spec (``".2f"``) or a function for its Markdown cells; ``align`` forces "left" / "right"."""
        cols = list(columns)
        body = [list(r) for r in rows]
        for r in body:
            if len(r) != len(cols):
                raise ValueError(f"table {name!r}: a row has {len(r)} cells for {len(cols)} columns: {r}")
        if any(isinstance(p, _Table) and p.name == name for p in self._parts):
            raise ValueError(f"table {name!r} already exists in this report")
        self._parts.append(_Table(name, cols, body, dict(formats or {}), dict(align or {})))

    def tables(self) -> list[_Table]:
        return [p for p in self._parts if isinstance(p, _Table)]

    def markdown(self) -> str:
        end = self.load_end or _load()
        command = self.command or _command()
        lines = [f"# {self.title}", ""]
        if self.quick:
            lines += ["QUICK MODE (a smoke run: small shapes, few repeats; not results).", ""]
        lines += [
            f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (commit {_commit()}).",
            "",
            f"- machine: {self.machine.summary()}",
            f"- load average (1/5/15 min) at start {_fmt_load(self.load_start)}, at end {_fmt_load(end)}",
            "",
        ]
        for part in self._parts:
            lines += part.markdown() if isinstance(part, _Table) else [part]
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def csv(self, table: _Table) -> str:
        end = self.load_end or _load()
        m = self.machine
        extra = {
            "cpu": m.cpu,
            "cores": m.cores,
            "gpu": m.gpu,
            "torch": m.torch,
            "cuda": m.cuda,
            "triton": m.triton,
            "load_start": f"{self.load_start[0]:.2f}",
            "load_end": f"{end[0]:.2f}",
        }
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*table.columns, *extra])
        for row in table.rows:
            w.writerow([*("" if v is None else v for v in row), *extra.values()])
        return buf.getvalue()

    def write(self, path: str | os.PathLike[str], *, quiet: bool = False) -> list[Path]:
        """Write ``path`` (Markdown) and ``<stem>.csv`` (one table) or ``<stem>.<table>.csv`` (several) beside it.

        Returns the written paths (each also printed as ``wrote <path>`` unless ``quiet``: partial results a
        script rewrites as it goes)."""
        self.load_end = _load()
        md = Path(path)
        written = [md]
        _write_atomic(md, self.markdown())
        tables = self.tables()
        for t in tables:
            name = f"{md.stem}.csv" if len(tables) == 1 else f"{md.stem}.{t.name}.csv"
            p = md.with_name(name)
            _write_atomic(p, self.csv(t))
            written.append(p)
        if not quiet:
            for p in written:
                print(f"wrote {p}", flush=True)
        return written


def calibration_bench_args(doc: str | None) -> tuple[argparse.Namespace, list[Any], int]:
    """The command line of the calibration-pass benches (``--quick``, ``--rounds``, ``--out``), one thread, and
    their data: 512 CIFAR-sized samples (3 x 32 x 32) in batches of 64 (64 in batches of 32 with ``--quick``).

    Returns:
        (arguments, batches, timed rounds).
    """
    import torch

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds); for the smoke test")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, bs = (64, 32) if args.quick else (512, 64)
    g = torch.Generator().manual_seed(0)
    return args, [torch.randn(bs, 3, 32, 32, generator=g) for _ in range(n // bs)], 1 if args.quick else args.rounds


def calibration_bench_pair(arch: str, quick: bool) -> list[Any]:
    """Two members (seed 0 then the next draws, BatchNorm statistics randomized, eval mode) for the calibration-pass
    benches: ``"resnet20"`` (width 1, 3 blocks / stage; quick: width 4, 1 block), ``"vgg11_bn"`` (VGG11 with
    BatchNorm, no hidden Linear; quick: 8-M-16-M) or ``"mlp"`` (3072-512-512-512-10 on flattened images; quick:
    widths 32)."""
    import torch

    from pyfusion import models
    from pyfusion.testing import randomize_batchnorm

    torch.manual_seed(0)
    widths = (8, "M", 16, "M") if quick else (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def make() -> torch.nn.Module:
        if arch == "resnet20":
            return models.resnet20(4 if quick else 1, blocks=1 if quick else 3, num_classes=10)
        if arch == "mlp":
            return torch.nn.Sequential(torch.nn.Flatten(), models.mlp([3072] + [32 if quick else 512] * 3 + [10]))
        return models.vgg(widths, in_channels=3, image_size=32, hidden=0)

    return [randomize_batchnorm(make()).eval() for _ in range(2)]
