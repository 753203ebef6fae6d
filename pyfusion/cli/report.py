"""Trade-off reports: the printed table, ``report.json``, ``report.csv`` and ``tradeoff.png``.

One :class:`Row` per point: each member, the ensemble, and each (method, alpha) that was fused. The
table printed on stdout is rendered from the same rows with :func:`format_row`, so the files and the
screen always agree.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["Row", "format_flops", "format_row", "format_table", "machine_info", "plot_tradeoff", "write_report"]

COLUMNS = ("method", "alpha", "accuracy", "flops", "params", "latency_ms", "fusion_s")
HEADERS = ("method", "alpha", "accuracy %", "eff. FLOPs/sample", "eff. params", "latency ms/batch", "fusion s")


@dataclass
class Row:
    """One point of the trade-off.

    Attributes:
        kind: "member", "ensemble" or "fused".
        method: "member 0", "ensemble", or the fusion method with its options (e.g. "partial").
        alpha: fraction of neurons kept per member (None for members; 1.0 for the ensemble).
        accuracy: top-1 accuracy in [0, 1] on the evaluation set.
        flops: effective FLOPs per sample (2 per multiply-add).
        params: effective parameters.
        latency_ms: median time of one forward pass over a batch, milliseconds.
        fusion_s: wall time of the fusion call, seconds (None for members and the ensemble).
        dense_flops: FLOPs of the dense layers, zero blocks included.
    """

    kind: str
    method: str
    alpha: float | None
    accuracy: float
    flops: float
    params: float
    latency_ms: float
    fusion_s: float | None = None
    dense_flops: float | None = None


def format_flops(v: float) -> str:
    """1234 -> '1.23k', 4.5e6 -> '4.50M' (three significant digits)."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def format_row(row: Row) -> tuple[str, ...]:
    """The table cells of ``row`` (the test compares them with report.json)."""
    return (
        row.method,
        "-" if row.alpha is None else f"{row.alpha:.2f}",
        f"{100.0 * row.accuracy:.2f}",
        format_flops(row.flops),
        format_flops(row.params),
        f"{row.latency_ms:.3f}",
        "-" if row.fusion_s is None else f"{row.fusion_s:.3f}",
    )


def format_table(rows: list[Row]) -> str:
    """A plain-text table with aligned columns."""
    cells = [HEADERS, *(format_row(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (latencies depend on it)."""
    import torch

    import pyfusion

    return {
        "pyfusion": pyfusion.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def plot_tradeoff(rows: list[Row], path: Path, title: str) -> None:
    """Accuracy against effective FLOPs per sample: members, the ensemble, and one line per method.

    Uses matplotlib's object API with the Agg canvas (no global backend change, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    members = [r for r in rows if r.kind == "member"]
    if members:
        ax.scatter(
            [r.flops for r in members],
            [100 * r.accuracy for r in members],
            marker="o",
            s=46,
            color="0.45",
            zorder=3,
            label="members",
        )
    for r in rows:
        if r.kind == "ensemble":
            ax.scatter([r.flops], [100 * r.accuracy], marker="*", s=180, color="black", zorder=4, label="ensemble")
    methods: dict[str, list[Row]] = {}
    for r in rows:
        if r.kind == "fused":
            methods.setdefault(r.method, []).append(r)
    markers = "os^Dvp<>h"
    for i, (name, pts) in enumerate(methods.items()):
        pts = sorted(pts, key=lambda r: (r.flops, r.alpha or 0.0))
        xs, ys = [r.flops for r in pts], [100 * r.accuracy for r in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], ms=6, lw=1.6, label=name, zorder=2, alpha=0.9)
        if len(pts) > 1:
            for r in pts:
                if r.alpha is not None:
                    ax.annotate(
                        f"{r.alpha:g}",
                        (r.flops, 100 * r.accuracy),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                    )
    ax.set_xlabel("effective FLOPs per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_report(out_dir: Path, rows: list[Row], meta: dict[str, Any], title: str) -> dict[str, Path]:
    """Write report.json, report.csv and tradeoff.png into ``out_dir`` (created if needed).

    Returns:
        name -> path of every file written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "csv": out_dir / "report.csv", "plot": out_dir / "tradeoff.png"}
    names = [f.name for f in fields(Row)]
    payload = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "machine": machine_info(),
        "columns": names,
        "rows": [{k: _clean(v) for k, v in asdict(r).items()} for r in rows],
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            w.writerow(["" if v is None else v for v in (getattr(r, n) for n in names)])
    plot_tradeoff(rows, paths["plot"], title)
    return paths
