"""Small-batch benchmark of partially fused linear layers: the compiled kernel against the BLAS path and the
K members run one after another.

Target (issue 6): at batch 1, ours no slower than the K members run one after another (K nn.Linear calls).

Providers (CPU, float32, torch.no_grad, eval modules, no activation):
  ours          PartialLinear(...)(x): the strategy measured fastest on the layer's first call
                (pyfusion.ops.partial_linear.tuning: panel engine, BLAS steps, one GEMM per output run, dense)
  static        the same module call through the dispatcher's static rule (the compiled "cpp" kernel for
                <= CPP_MAX_ROWS rows): the path before the measured choice
  torch_path    the static call with the "cpp" backend switched off (CPP_MAX_ROWS = 0 while it is timed):
                up to 3 BLAS calls into views of one output
  members_seq   the K unfused members as nn.Linear, called one after another

Timing: providers are interleaved (a fresh random order every round, one group of calls >= 100 us per provider
per round) and the table reports the median over rounds (min in brackets): under the heavy shared load of
the VM the median is the typical call, the min the least disturbed one.

Extra modes that measure the kernel's two tuned constants:
  --crossover   cpp vs torch_path for rows 1..32 (sets CPP_MAX_ROWS in pyfusion/ops/partial_linear/backends.py)
  --threshold   the kernel with 1 vs 2 OpenMP threads by work size (PARTIAL_LINEAR_PARALLEL_MIN_MACS)

Usage: python bench/bench_partial_linear_batch1.py [--quick] [--crossover] [--threshold]
       [--out bench/results/partial_linear_batch1.md]
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import Report, output_path  # noqa: E402

from pyfusion import _ext  # noqa: E402
from pyfusion.nn import PartialLinear  # noqa: E402
from pyfusion.ops.layout import segment_plan, segments_from_layout  # noqa: E402

_OPS = [importlib.import_module("pyfusion.ops.partial_linear")]
_TUNED = _OPS[0]._TUNED_DTYPES


def static_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through the dispatcher's static rule (the measured choice off for this call; ~0.2 us)."""
    _OPS[0]._TUNED_DTYPES = ()
    try:
        return module(x)
    finally:
        _OPS[0]._TUNED_DTYPES = _TUNED


PL = importlib.import_module("pyfusion.ops.partial_linear.backends")  # where the cpp backend reads CPP_MAX_ROWS


@dataclass(frozen=True)
class Shape:
    name: str
    n_in: int
    n_out: int
    first_layer: bool = False  # the input is raw data, shared by all members
    ks: tuple[int, ...] = (2, 4)


SHAPES = [
    Shape("mnist_mlp_fc1_784x100", 784, 100, first_layer=True, ks=(2,)),
    Shape("mnist_mlp_fc2_100x100", 100, 100, ks=(2,)),
    Shape("mnist_mlp_out_100x10", 100, 10, ks=(2,)),
    Shape("vgg11_cifar_fc_512x512", 512, 512),
    Shape("vit_s_mlp_fc1_384x1536", 384, 1536),
    Shape("bert_base_ffn_768x3072", 768, 3072),
]


def layouts(shape: Shape, k: int, alpha: float) -> tuple[list[int], list[int]]:
    """Member width n, alpha: shared n - round(alpha n), each branch round(alpha n) (first layer: all shared in)."""
    b_in, b_out = round(alpha * shape.n_in), round(alpha * shape.n_out)
    il = [shape.n_in] + [0] * k if shape.first_layer else [shape.n_in - b_in] + [b_in] * k
    return il, [shape.n_out - b_out] + [b_out] * k


Provider = tuple[Callable[[], None], Callable[[], object]]  # (setup before its group, call)


def _default_rows() -> None:
    PL.CPP_MAX_ROWS, PL.CPP_MAX_ROWS_WIDE = _CPP_MAX_ROWS, _CPP_MAX_ROWS_WIDE


def _no_cpp() -> None:
    PL.CPP_MAX_ROWS = PL.CPP_MAX_ROWS_WIDE = 0


_CPP_MAX_ROWS, _CPP_MAX_ROWS_WIDE = PL.CPP_MAX_ROWS, PL.CPP_MAX_ROWS_WIDE


def time_interleaved(providers: dict[str, Provider], min_time: float, min_rounds: int = 15) -> dict[str, list[float]]:
    """Seconds per call of each provider, one sample per round; providers in a fresh random order each round."""
    groups = {}
    for name, (setup, fn) in providers.items():
        setup()
        fn()
        t0 = time.perf_counter()
        fn()
        groups[name] = max(1, int(100e-6 / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in providers}
    order, rng = list(providers), random.Random(0)
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time * len(providers) and rounds < 400):
        rng.shuffle(order)
        for name in order:
            setup, fn = providers[name]
            setup()
            t0 = time.perf_counter()
            for _ in range(groups[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / groups[name])
        rounds += 1
    _default_rows()
    return samples


def med(v: list[float]) -> float:
    return statistics.median(v)


def main_table(args, report: Report) -> None:
    shapes = SHAPES
    alphas, batches, min_time = [0.0, 0.5, 1.0], [1, 8], 0.25
    if args.quick:
        shapes = [s for s in SHAPES if s.name in ("mnist_mlp_fc2_100x100", "vgg11_cifar_fc_512x512")]
        alphas, batches, min_time = [0.5], [1], 0.01
    rows = []
    for shape in shapes:
        for k in shape.ks if not args.quick else (2,):
            for batch in batches:
                for alpha in alphas:
                    il, ol = layouts(shape, k, alpha)
                    ours = PartialLinear(il, ol).eval()
                    x = torch.randn(batch, sum(il))
                    members = [nn.Linear(shape.n_in, shape.n_out).eval() for _ in range(k)]
                    xs = [torch.randn(batch, shape.n_in) for _ in range(k)]

                    def seq(members=members, xs=xs):
                        return [m(xi) for m, xi in zip(members, xs)]

                    provs = {
                        "ours": (_default_rows, lambda m=ours, x=x: m(x)),
                        "static": (_default_rows, lambda m=ours, x=x: static_call(m, x)),
                        "torch_path": (_no_cpp, lambda m=ours, x=x: static_call(m, x)),
                        "members_seq": (_default_rows, seq),
                    }
                    with torch.no_grad():
                        s = time_interleaved(provs, min_time)
                    r = {"shape": shape.name, "K": k, "batch": batch, "alpha": alpha, "layout": f"{il}->{ol}"}
                    for n, v in s.items():
                        r[n], r[n + "_min"], r[n + "_n"] = med(v), min(v), len(v)
                    rows.append(r)
                    print(
                        f"{shape.name} K={k} B={batch} a={alpha}: ours {r['ours'] * 1e6:8.1f} static "
                        f"{r['static'] * 1e6:8.1f} torch_path "
                        f"{r['torch_path'] * 1e6:8.1f} seq {r['members_seq'] * 1e6:8.1f} us (load "
                        f"{os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    lines = ["## Batch 1 and 8: ours vs the previous BLAS path vs the members one after another", ""]
    for b in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == b]
        bad = [r for r in sel if r["ours"] > r["members_seq"]]
        tag = "target (batch 1)" if b == 1 else "for information (batch 8)"
        lines.append(
            f"- {tag}: ours no slower than members_seq (medians): {'met' if not bad else 'MISSED'}; "
            f"no slower in {len(sel) - len(bad)}/{len(sel)} cases"
            + ("; slower: " + ", ".join(f"{r['shape']} K={r['K']} a={r['alpha']}" for r in bad) if bad else "")
        )
    lines += [
        "",
        "Median us per call over the interleaved rounds (min in its own column); `x seq` = members_seq / ours, "
        "`x static` = static / ours, `x torch` = torch_path / ours (medians); `met` = ours <= members_seq.",
    ]
    report.text(*lines)
    us = ".1f"
    report.table(
        "batch",
        ["shape", "K", "batch", "alpha", "layout", "ours us", "ours min us", "static us", "torch_path us",
         "torch_path min us", "members_seq us", "members_seq min us", "x seq", "x static", "x torch", "met"],
        [
            [r["shape"], r["K"], r["batch"], r["alpha"], r["layout"], r["ours"] * 1e6, r["ours_min"] * 1e6,
             r["static"] * 1e6, r["torch_path"] * 1e6, r["torch_path_min"] * 1e6, r["members_seq"] * 1e6,
             r["members_seq_min"] * 1e6, r["members_seq"] / r["ours"], r["static"] / r["ours"],
             r["torch_path"] / r["ours"],
             "yes" if r["ours"] <= r["members_seq"] else "NO"]
            for r in rows
        ],
        formats={"alpha": ".1f", "ours us": us, "ours min us": us, "static us": us, "torch_path us": us,
                 "torch_path min us": us, "members_seq us": us, "members_seq min us": us, "x seq": ".2f",
                 "x static": ".2f", "x torch": ".2f"},
        align={"K": "left", "batch": "left"},
    )  # fmt: skip


def crossover_table(args, report: Report) -> None:
    """cpp vs torch_path by rows: where the compiled kernel stops paying (CPP_MAX_ROWS)."""
    cases = [("mnist_mlp_fc2_100x100", 100, 100, 2), ("vgg11_cifar_fc_512x512", 512, 512, 2)]
    cases += [("vit_s_mlp_fc1_384x1536", 384, 1536, 2), ("bert_base_ffn_768x3072", 768, 3072, 2)]
    row_counts = [1, 2, 4, 8, 12, 16, 32]
    if args.quick:
        cases, row_counts = cases[:1], [1, 16]
    report.text("## Crossover: compiled kernel vs BLAS path by rows (alpha 0.5, median us)")
    table = []
    for name, n_in, n_out, k in cases:
        il, ol = layouts(Shape(name, n_in, n_out), k, 0.5)
        mod = PartialLinear(il, ol).eval()
        a = (mod.weight.detach(), mod.bias.detach(), mod._plan, "none")
        cells = []
        for m in row_counts:
            x = torch.randn(m, sum(il))
            provs = {
                "cpp": (_default_rows, lambda x=x, a=a: PL.cpp_forward(x, *a)),
                "torch": (_default_rows, lambda x=x, a=a: PL.torch_forward(x, *a)),
            }
            with torch.no_grad():
                s = time_interleaved(provs, 0.01 if args.quick else 0.15)
            c, t = med(s["cpp"]) * 1e6, med(s["torch"]) * 1e6
            cells.append(f"{c:.0f} / {t:.0f} ({t / c:.2f}x)")
            print(f"crossover {name} rows={m}: cpp {c:.1f} torch {t:.1f}", flush=True)
        table.append([name, k, *cells])
    report.table("crossover", ["shape", "K", *(f"rows {m}" for m in row_counts)], table, align={"K": "left"})
    report.text("cells: cpp us / torch_path us (torch / cpp; > 1: the compiled kernel is faster).")


def threshold_table(args, report: Report) -> None:
    """The kernel on 1 vs 2 OpenMP threads by work size (PARTIAL_LINEAR_PARALLEL_MIN_MACS)."""
    widths = [64, 128, 256, 384, 512, 768, 1024]
    if args.quick:
        widths = [64, 256]
    report.text("## OpenMP threshold: compiled kernel, 1 row, 1 vs 2 threads (layout [n, n, n] -> [n, n, n])")
    table = []
    old = torch.get_num_threads()
    for n in widths:
        seg = segments_from_layout([n, n, n])
        plan_s = segment_plan(seg, seg)
        weight, bias = torch.randn(plan_s.stored), torch.randn(3 * n)
        plan, panels = PL.packed_panels(weight, plan_s, "none")
        x, y = torch.randn(1, 3 * n), torch.empty(1, 3 * n)
        ptrs = [x.data_ptr(), 1, x.stride(0), panels.data_ptr(), bias.data_ptr(), y.data_ptr(), 3 * n]
        plan.parallel_min_macs = 0

        def call(threads, plan=plan, ptrs=ptrs):
            return plan.forward_f32(*ptrs, threads)

        provs = {"1": (lambda: None, lambda c=call: c(1)), "2": (lambda: None, lambda c=call: c(2))}
        torch.set_num_threads(2)
        s = time_interleaved(provs, 0.01 if args.quick else 0.15)
        torch.set_num_threads(old)
        t1, t2 = med(s["1"]) * 1e6, med(s["2"]) * 1e6
        table.append([n, plan.macs_per_row, t1, t2, t1 / t2])
        print(f"threshold n={n} macs={plan.macs_per_row}: 1t {t1:.1f} 2t {t2:.1f}", flush=True)
    report.table(
        "threshold",
        ["n", "multiply-adds", "1 thread us", "2 threads us", "1t / 2t"],
        table,
        formats={"1 thread us": ".1f", "2 threads us": ".1f", "1t / 2t": ".2f"},
        align={"n": "left", "multiply-adds": "left"},
    )
    report.text(
        f"Constant in the build: PARTIAL_LINEAR_PARALLEL_MIN_MACS = {_ext._C.PARTIAL_LINEAR_PARALLEL_MIN_MACS}."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 shapes, K=2, alpha .5, batch 1, short timing")
    p.add_argument("--crossover", action="store_true", help="also time cpp vs torch_path for rows 1..32")
    p.add_argument("--threshold", action="store_true", help="also time the kernel on 1 vs 2 OpenMP threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", help="Markdown file (default: bench/results/partial_linear_batch1.md; quick: a temporary folder)"
    )
    args = p.parse_args(argv)
    if PL._cpp_available():
        raise SystemExit("the compiled kernel is not available: " + "; ".join(PL._cpp_available()))
    flags = " ".join(f for f in ("--quick", "--crossover", "--threshold") if getattr(args, f[2:]))
    report = Report(
        "partial_linear at small batch (CPU)",
        quick=args.quick,
        command=f"python bench/bench_partial_linear_batch1.py {flags}".rstrip(),
    )
    report.text(
        "- float32; no autograd; other jobs share the cores",
        f"- threads: torch.set_num_threads({args.threads}) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})"
        "; the --threshold table sets 1 and 2 itself",
        f"- CPP_MAX_ROWS = {_CPP_MAX_ROWS}",
    )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        main_table(args, report)
        if args.crossover:
            crossover_table(args, report)
        if args.threshold:
            threshold_table(args, report)
    finally:
        torch.set_num_threads(old_threads)
    report.write(output_path(args.out, "partial_linear_batch1.md", args.quick))


if __name__ == "__main__":
    main()


def test_quick(tmp_path):
    """Keeps the script from rotting (pytest collects bench_*.py; runs the quick mode on CPU)."""
    if PL._cpp_available():
        import pytest

        pytest.skip("; ".join(PL._cpp_available()))
    main(["--quick", "--crossover", "--threshold", "--out", str(tmp_path / "b1.md")])
    text = (tmp_path / "b1.md").read_text()
    assert "members_seq" in text and "Crossover" in text and "OpenMP threshold" in text
