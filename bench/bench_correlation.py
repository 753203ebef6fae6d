"""Benchmark: neuron correlation of N samples x D neurons (float32 input) -> (D, D) correlation.

Methods (all end with a float64 (D, D) correlation, or torch.corrcoef's float32 one):
  pyfusion          ActivationStats([D]).update(X).corr(): the C++ engine (lower-triangle SYRK of shifted data)
  ops.correlation   pyfusion.ops.correlation(X, X): the same engine through the op (the lower triangle of X alone)
  torch f32 comp.   X.T @ X and X.sum(0) in float32, then mean / covariance / correlation in float64
  torch f64 comp.   the same after X.double()
  torch.corrcoef    torch.corrcoef(X.T) (float32)
  numpy.corrcoef    numpy.corrcoef(X.T) (numpy computes in float64)

Time: best of --repeats interleaved rounds (2 for the float64 baselines; the machine is shared: the load is
printed). Peak extra memory: in a fresh
subprocess per (method, D), peak RSS of the call (VmHWM reset by /proc/self/clear_refs) minus the RSS before it.
Error: max |corr - float64 two-pass reference| on "offset" data X = 1e3 + 1e-2 * Z (Z correlated Gaussian)
and on "plain" data X = Z. FLOPs: the full Gram is 2 N D^2; the engine computes the lower triangle only.

Cross table (the case fusion computes: two members' activations X, Y of D neurons each, corr(X, Y) (D, D)):
``ops.correlation(X, Y)``, ``ActivationStats([D, D], pairs=[(0, 1)])`` (the cross block and the diagonal only) and
the float32 torch composite ``X.T @ Y`` + column sums and squares, float64 finalize.

Usage: python bench/bench_correlation.py [--quick] [--out bench/results/correlation_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import Report, output_path  # noqa: E402

METHODS = [
    "pyfusion",
    "ops.correlation",
    "torch f32 composite",
    "torch f64 composite",
    "torch.corrcoef",
    "numpy.corrcoef",
]


def make_data(n: int, d: int, offset: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    z = torch.randn(n, d, generator=g) @ mix  # correlated neurons
    return (1e3 + 1e-2 * z).float() if offset else z.float()


def _finalize64(g: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    m = s.double() / n
    cov = g.double() / n - torch.outer(m, m)
    sd = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(sd, sd)
    return torch.where(denom > 0, cov / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(cov))


def run_method(name: str, x: torch.Tensor):
    n = x.shape[0]
    if name == "pyfusion":
        from pyfusion.stats import ActivationStats

        return ActivationStats([x.shape[1]]).update(x).corr()
    if name == "ops.correlation":
        from pyfusion.ops import correlation

        return correlation(x, x)
    if name == "torch f32 composite":
        return _finalize64(x.T @ x, x.sum(0), n)
    if name == "torch f64 composite":
        xd = x.double()
        return _finalize64(xd.T @ xd, xd.sum(0), n)
    if name == "torch.corrcoef":
        return torch.corrcoef(x.T)
    if name == "numpy.corrcoef":
        return torch.from_numpy(np.corrcoef(x.numpy().T))
    raise ValueError(f"unknown method {name!r}")


CROSS_METHODS = ["ops.correlation(X, Y)", "ActivationStats pairs", "torch f32 composite"]


def run_cross(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if name == "ops.correlation(X, Y)":
        from pyfusion.ops import correlation

        return correlation(x, y)
    if name == "ActivationStats pairs":
        from pyfusion.stats import ActivationStats

        return ActivationStats([x.shape[1], y.shape[1]], pairs=[(0, 1)]).update([x, y]).corr(0, 1)
    if name == "torch f32 composite":
        mx, my = x.sum(0).double() / n, y.sum(0).double() / n
        cov = (x.T @ y).double() / n - torch.outer(mx, my)
        vx = ((x * x).sum(0).double() / n - mx * mx).clamp_min(0).sqrt()
        vy = ((y * y).sum(0).double() / n - my * my).clamp_min(0).sqrt()
        return cov / torch.outer(vx, vy).clamp_min(1e-300)
    raise ValueError(f"unknown method {name!r}")


def reference_cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return (xc.T @ yc) / torch.outer(xc.norm(dim=0), yc.norm(dim=0))


def reference(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    xc = xd - xd.mean(0)
    cov = xc.T @ xc / xd.shape[0]
    sd = cov.diagonal().sqrt()
    return cov / torch.outer(sd, sd)


def set_threads(t: int):
    torch.set_num_threads(t)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(t)


def time_methods(x: torch.Tensor, repeats: int, ref: torch.Tensor | None = None):
    """Best time of each method, and (with ``ref``) the max error of its first-round output against ``ref``.

    The methods take turns within every round so that load swings on the shared machine hit them alike;
    the slow float64 baselines get at most 2 rounds."""
    best = {m: float("inf") for m in METHODS}
    err = {}
    for r in range(repeats):
        for m in METHODS:
            if r >= 2 and m not in ("pyfusion", "ops.correlation", "torch f32 composite"):
                continue
            t0 = time.perf_counter()
            out = run_method(m, x)
            best[m] = min(best[m], time.perf_counter() - t0)
            if r == 0 and ref is not None:
                err[m] = (out.double() - ref).abs().max().item()
            del out
    return best, err


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, n: int, d: int) -> None:
    """Entry point of the memory subprocess: prints the peak extra bytes of one call as JSON.

    The input is generated first; writing 5 to /proc/self/clear_refs then resets the peak RSS (VmHWM, Linux
    >= 4.0), so the peak read after the call is that of the call alone, minus the RSS before it."""
    set_threads(1)
    x = make_data(n, d, offset=False)
    run_method(name, x[:64].contiguous())  # load libraries / first-call allocations outside the measurement
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _vm_kib("VmRSS")
    out = run_method(name, x)
    peak = _vm_kib("VmHWM")
    del out
    print(json.dumps({"peak_extra": max(0, peak - before) * 1024}))


def measure_memory(name: str, n: int, d: int) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, str(n), str(d)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_extra"] / 2**20


def engine_isa() -> str:
    from pyfusion import _ext

    return _ext._C.corr_best_isa() if _ext.EXT_AVAILABLE else "no extension"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, one thread, no memory subprocesses")
    ap.add_argument(
        "--out", help="Markdown file (default: bench/results/correlation_cpu.md; quick: a temporary folder)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dims", type=int, nargs="+", help="D values (default 256 1024 2048; quick: 64 128)")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2; quick: 1)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory column, printed as markdown")
    ap.add_argument("--memory-child", nargs=3, metavar=("METHOD", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        name, n, d = args.memory_child
        memory_child(name, int(n), int(d))
        return
    from pyfusion import _ext

    if not _ext.EXT_AVAILABLE:
        print(f"note: {_ext.EXT_SKIP_REASON}; 'pyfusion' runs the float64 torch path", file=sys.stderr)

    if args.quick:
        n, dims, threads, repeats, memory = 2048, [64, 128], [1], 1, False
    else:
        n, dims, threads, repeats, memory = 65536, [256, 1024, 2048], [1, 2], args.repeats, True
    dims = args.dims or dims
    threads = args.threads or threads

    if args.memory_only:
        print("| D | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS))
        for d in dims:
            print(f"| {d} | " + " | ".join(f"{measure_memory(m, n, d):.1f}" for m in METHODS) + " |", flush=True)
        return
    report = Report("Correlation engine benchmark (CPU)", quick=args.quick)
    rows = []
    for d in dims:
        x_off = make_data(n, d, True)
        ref_off = reference(x_off)
        err_off = {m: (run_method(m, x_off).double() - ref_off).abs().max().item() for m in METHODS}
        del x_off, ref_off
        x_plain = make_data(n, d, False)
        ref_plain = reference(x_plain)
        mem = {m: (measure_memory(m, n, d) if memory else float("nan")) for m in METHODS}
        err = {}
        for t in threads:
            with set_threads(t):
                times, e = time_methods(x_plain, repeats, ref_plain if not err else None)
            err = err or {m: (err_off[m], e[m]) for m in METHODS}
            base = times["torch f32 composite"]
            load = os.getloadavg()[0]
            for m in METHODS:
                rows.append((d, t, m, times[m], base / times[m], 2 * n * d * d / times[m] / 1e9, mem[m], *err[m], load))
                print(f"D={d} threads={t} {m:20s} {times[m]:.4f}s x{base / times[m]:.2f} err_off={err[m][0]:.2e}")

    report.text(
        f"numpy {np.__version__}; engine micro-kernel: {engine_isa()}. Shared with other jobs: the 1-minute load "
        "average at each row is in the table.",
        f"N = {n} samples, float32 input, D neurons; time = best of {repeats} interleaved rounds (float64 "
        f"baselines: best of {min(repeats, 2)}); speedup against the float32 torch "
        "composite (X.T @ X + column sums in float32, float64 finalize). GFLOP/s counts the full Gram (2 N D^2).",
        "Peak extra memory: fresh subprocess, 1 thread, peak RSS of the call (VmHWM reset via /proc/self/clear_refs) "
        "minus RSS before it (input excluded).",
        "Error: max |corr - float64 two-pass reference|; offset data X = 1e3 + 1e-2 Z, plain data X = Z "
        "(Z correlated Gaussian).",
    )
    report.table(
        "methods",
        ["D", "threads", "method", "time (s)", "speedup vs f32 composite", "eff. GFLOP/s", "peak extra MiB",
         "err offset", "err plain", "load"],
        [list(r) for r in rows],
        formats={"time (s)": ".4f", "speedup vs f32 composite": "{:.2f}x".format, "eff. GFLOP/s": ".0f",
                 "peak extra MiB": ".1f", "err offset": ".1e", "err plain": ".1e", "load": ".1f"},
        align={"D": "left", "threads": "left"},
    )  # fmt: skip
    cross_rows = []
    for d in dims:
        x, y = make_data(n, d, False, seed=1), make_data(n, d, False, seed=2)
        ref = reference_cross(x, y)
        with set_threads(threads[0]):
            best: dict[str, float] = {}
            errs: dict[str, float] = {}
            for _ in range(repeats):
                for m in CROSS_METHODS:
                    t0 = time.perf_counter()
                    out = run_cross(m, x, y)
                    best[m] = min(best.get(m, float("inf")), time.perf_counter() - t0)
                    errs[m] = (out.double() - ref).abs().max().item()
        for m in CROSS_METHODS:
            cross_rows.append([d, threads[0], m, best[m], best["torch f32 composite"] / best[m], errs[m]])
            print(f"cross D={d} {m:24s} {best[m]:.4f}s x{best['torch f32 composite'] / best[m]:.2f}")
    report.table(
        "cross (two members)",
        ["D each", "threads", "method", "time (s)", "speedup vs f32 composite", "err"],
        cross_rows,
        formats={"time (s)": ".4f", "speedup vs f32 composite": "{:.2f}x".format, "err": ".1e"},
        align={"D each": "left", "threads": "left"},
    )
    ok_speed = all(sp >= 1.2 for d, t, m, tm, sp, *_ in rows if m == "pyfusion")
    ok_err = all(eo <= 1e-6 for d, t, m, tm, sp, gf, mb, eo, *_ in rows if m == "pyfusion")
    report.text(
        f"Targets (pyfusion >= 1.2x the float32 composite at every D and thread count; offset-data error <= 1e-6): "
        f"speed {'met' if ok_speed else 'NOT met'}, error {'met' if ok_err else 'NOT met'}"
        + (" (quick mode: small shapes, not the target configuration)" if args.quick else "")
        + "."
    )
    report.write(output_path(args.out, "correlation_cpu.md", args.quick))


if __name__ == "__main__":
    main()
