"""CPU partial linear kernels against the baselines a competent user has, side by side.

Kernels (raw ``pyfusion._C`` calls, weights packed once beforehand, no Python dispatch):
  * ``panel``: ``PanelLinearPlan.forward_f32`` (csrc/partial_linear/panel_linear.cpp), the panel-packed engine;
  * ``gemv``: ``PartialLinearPlan.forward_f32`` (csrc/partial_linear/partial_linear.cpp), today's batch <= 8 kernel.
Baselines: ``members`` = K dense ``F.linear`` calls, one per member (n x n each), on K inputs; ``dense0`` = one
``F.linear`` with the dense zero-block weight of the partial layer (sum(out) x sum(in)).

Cases (issue 15 item 3): batch 1-8 on wide layers (3072 x 3072 per member, K = 2 and 4, alpha 0 .. 1, 1 and 2
threads: target panel <= members at every alpha), and 512 x 512 per member, K = 2, alpha 0.5, batch 32-256 at
2 threads (target panel <= dense0). Interleaved, min of the repeats, threads pinned.

Usage: ``python bench/bench_partial_linear_kernel.py [--quick] [--out bench/results/partial_linear_kernel_cpu.md]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyfusion import _ext  # noqa: E402


def layout(n: int, k: int, alpha: float) -> list[int]:
    b = int(round(alpha * n))
    return [n - b] + [b] * k


def block_shapes(il, ol):
    """Shapes of the 3-buffer format (w_shared, w_cross, w_diag) of a layout."""
    return (ol[0], sum(il)), (sum(ol[1:]), il[0]), (sum(o * i for o, i in zip(ol[1:], il[1:])),)


def std_masks(k: int) -> list[int]:
    return [(1 << k) - 1] + [1 << j for j in range(k)]


def run_case(n: int, k: int, alpha: float, rows: int, threads: int, repeats: int) -> dict[str, float]:
    il = ol = layout(n, k, alpha)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(*s, generator=g) for s in block_shapes(il, ol)]
    ptrs = [b.data_ptr() for b in blocks]
    panel = _ext._C.PanelLinearPlan(il, std_masks(k), ol, std_masks(k), 0)
    packed = torch.empty(max(panel.packed_size(4), 1))
    panel.pack_blocks_f32(*ptrs, packed.data_ptr())
    gemv = _ext._C.PartialLinearPlan(il, ol, 0)
    members = [torch.randn(n, n, generator=g) for _ in range(k)]
    dense0 = torch.randn(sum(ol), sum(il), generator=g)
    x = torch.randn(rows, sum(il), generator=g)
    xs = [torch.randn(rows, n, generator=g) for _ in range(k)]
    y = torch.empty(rows, sum(ol))
    fns = {
        "panel": lambda: panel.forward_f32(
            x.data_ptr(), rows, x.stride(0), packed.data_ptr(), 0, y.data_ptr(), y.stride(0), threads
        ),  # fmt: skip
        "members": lambda: [F.linear(xs[j], members[j]) for j in range(k)],
        "dense0": lambda: F.linear(x, dense0),
    }
    if rows <= 8:
        fns["gemv"] = lambda: gemv.forward_f32(x.data_ptr(), rows, x.stride(0), *ptrs, 0, y.data_ptr(), threads)
    best = {name: float("inf") for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    best["eff_gflop"] = 2 * rows * panel.macs_per_row / 1e9
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (checks that the script runs)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()
    if _ext._C is None or not hasattr(_ext._C, "PanelLinearPlan"):
        raise SystemExit(f"the compiled extension with the panel engine is needed: {_ext.EXT_SKIP_REASON}")
    if args.quick:
        cases = [(256, 2, a, r, t) for t in (1, 2) for a in (0.0, 1.0) for r in (1, 8)] + [(128, 2, 0.5, 64, 2)]
        repeats = 2
    else:
        cases = [
            (3072, k, a, r, t) for t in (1, 2) for k in (2, 4) for a in (0.0, 0.25, 0.5, 0.75, 1.0) for r in (1, 8)
        ]
        cases += [(512, 2, 0.5, r, t) for t in (2, 1) for r in (32, 64, 128, 256)]
        repeats = args.repeats
    rows_out = []
    for n, k, a, rows, t in cases:
        torch.set_num_threads(t)
        b = run_case(n, k, a, rows, t, repeats)
        load = os.getloadavg()[0]
        rows_out.append((n, k, a, rows, t, b, load))
        gemv = f"{b['gemv'] * 1e6:8.0f}" if "gemv" in b else "       -"
        print(
            f"n={n} K={k} a={a:.2f} rows={rows:3d} t={t}: panel {b['panel'] * 1e6:8.0f} us  gemv {gemv}  members "
            f"{b['members'] * 1e6:8.0f}  dense0 {b['dense0'] * 1e6:8.0f}  | members/panel "
            f"{b['members'] / b['panel']:.2f}  dense0/panel {b['dense0'] / b['panel']:.2f}  load {load:.1f}",
            flush=True,
        )
    if args.out:
        lines = [
            "# CPU partial linear kernels vs members run one after another and the dense zero-block layer",
            "",
            f"- command: `python bench/bench_partial_linear_kernel.py{' --quick' if args.quick else ''}`, min of "
            f"{repeats} interleaved repeats, threads pinned; float32; times in microseconds",
            "- panel: PanelLinearPlan.forward_f32 (weights pre-packed); gemv: PartialLinearPlan.forward_f32; members:"
            " K x F.linear (n x n); dense0: F.linear with the dense zero-block weight",
            "",
            "| n | K | alpha | rows | threads | panel | gemv | members | dense0 | members / panel | dense0 / panel "
            "| load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, k, a, rows, t, b, load in rows_out:
            gemv = f"{b['gemv'] * 1e6:.0f}" if "gemv" in b else "-"
            lines.append(
                f"| {n} | {k} | {a:.2f} | {rows} | {t} | {b['panel'] * 1e6:.0f} | {gemv} | {b['members'] * 1e6:.0f} | "
                f"{b['dense0'] * 1e6:.0f} | {b['members'] / b['panel']:.2f} | {b['dense0'] / b['panel']:.2f} | "
                f"{load:.1f} |"
            )
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
