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
        ensemble_latency_ms: the ensemble's median time per batch measured in the same loop as this row's
            (the two forward passes alternate), so ``latency_ms / ensemble_latency_ms`` is free of machine load.
        error: why this point failed (its numbers are then NaN); None for a measured point.
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
    ensemble_latency_ms: float | None = None
    error: str | None = None


def format_flops(v: float) -> str:
    """1234 -> '1.23k', 4.5e6 -> '4.50M' (three significant digits)."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def format_row(row: Row) -> tuple[str, ...]:
    """The table cells of ``row`` (the test compares them with report.json); a failed point reads "failed"."""
    if row.error is not None:
        return (row.method, "-" if row.alpha is None else f"{row.alpha:.2f}", "failed", "-", "-", "-", "-")
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
    """Accuracy against effective FLOPs per sample: members, the ensemble, one line per alpha-swept method, and
    the full-fusion methods as labelled points.

    The accuracy axis covers the members, the ensemble and the curves; a single point far below them (vanilla
    averaging, typically) is drawn on the lower edge with its value in the label, so that it does not squeeze
    the interesting range. Uses matplotlib's object API with the Agg canvas (no global backend change).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in rows if r.error is None]  # failed points have no numbers to draw
    members = [r for r in rows if r.kind == "member"]
    ensemble = [r for r in rows if r.kind == "ensemble"]
    methods: dict[str, list[Row]] = {}
    for r in rows:
        if r.kind == "fused":
            methods.setdefault(r.method, []).append(r)
    curves = {k: v for k, v in methods.items() if len(v) > 1}
    singles = [v[0] for v in methods.values() if len(v) == 1]
    # tab10 without its grey (index 7), which the members use
    colors = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    core = [100 * r.accuracy for r in [*members, *ensemble, *(p for v in curves.values() for p in v)]]
    core = [a for a in core if math.isfinite(a)] or [100 * r.accuracy for r in rows if math.isfinite(r.accuracy)]
    span = max(core) - min(core) if core else 1.0
    lo = min(core) - max(3.0, 0.5 * span) if core else 0.0
    hi = max(core) + max(1.0, 0.1 * span) if core else 100.0
    if members:  # hollow and on top: full-fusion points share the members' FLOPs
        ax.scatter(
            [r.flops for r in members],
            [100 * r.accuracy for r in members],
            marker="o",
            s=90,
            facecolors="none",
            edgecolors="0.35",
            linewidths=1.5,
            zorder=6,
            label="members",
        )
    for r in ensemble:
        ax.scatter([r.flops], [100 * r.accuracy], marker="*", s=200, color="black", zorder=4, label="ensemble")
    markers = "os^Dvp<>h"
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda r: (r.flops, r.alpha or 0.0))
        ax.plot(
            [r.flops for r in pts],
            [100 * r.accuracy for r in pts],
            marker=markers[i % len(markers)],
            ms=6,
            lw=1.8,
            color=colors[i % len(colors)],
            label=f"{name} (alpha = 0 ... 1)",
            zorder=2,
        )
        for r in pts:
            if r.alpha is not None:
                ax.annotate(
                    f"{r.alpha:g}", (r.flops, 100 * r.accuracy), textcoords="offset points", xytext=(4, -11), fontsize=7
                )
    xs = [r.flops for r in rows if math.isfinite(r.flops)]
    xspan = (max(xs) - min(xs)) if xs else 1.0
    gap = 0.055 * (hi - lo)
    placed: list[float] = []
    for j, r in enumerate(sorted(singles, key=lambda r: -r.accuracy)):
        color = colors[(len(curves) + j) % len(colors)]
        acc = 100 * r.accuracy
        y = acc if acc >= lo else lo - 0.6 * gap  # clipped: drawn below the range, value in the label
        ax.scatter([r.flops], [y], marker="D" if acc >= lo else "v", s=36, color=color, zorder=5)
        label_y = min(y, placed[-1] - gap) if placed else y
        placed.append(label_y)
        text = f"{r.method} {acc:.1f}%" + ("" if acc >= lo else " (off scale)")
        ax.annotate(
            text,
            (r.flops, y),
            xytext=(r.flops + 0.06 * xspan, label_y),
            textcoords="data",
            fontsize=7.5,
            color=color,
            va="center",
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6},
        )
    low_label = min(placed) if placed else lo
    ax.set_ylim(min(lo - gap, low_label - gap), hi)
    if xs:
        ax.set_xlim(min(xs) - 0.05 * xspan, max(xs) + 0.08 * xspan)
    ax.set_xlabel("effective FLOPs per sample (non-zero blocks)")
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
