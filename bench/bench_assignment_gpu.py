"""GPU benchmark of the batched exact assignment solver (``pyfusion._C.lsap_solve_cuda``) against the CPU solver.

Batches of B problems of n x n (uniform U[0, 1) costs and integer costs), float64. Ours: one call on device
tensors (includes the stream synchronisation and status check); CPU: ``lsap_solve_f64`` (csrc/assignment/lsap.cpp,
OpenMP over problems with every host thread) on host copies. Wall-clock medians. Objectives are checked equal
(integer costs: exactly; uniform: to 1e-12 relative). Target (issue 15): the GPU >= 5x the CPU solver on batches.

Usage: ``python bench/bench_assignment_gpu.py [--quick] [--out bench/results/assignment_gpu.md]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyfusion import _ext  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def run(b: int, n: int, kind: str, repeats: int):
    rng = np.random.default_rng(0)
    if kind == "integer":
        costs = [rng.integers(0, 1000, (n, n)).astype(np.float64) for _ in range(b)]
    else:
        costs = [rng.random((n, n)) for _ in range(b)]
    dev = [torch.from_numpy(c).cuda() for c in costs]
    out = torch.full((b, n), -1, dtype=torch.int64, device="cuda")
    totals = torch.empty(b, dtype=torch.float64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    ptrs = [t.data_ptr() for t in dev]

    def gpu():
        _ext._C.lsap_solve_cuda(ptrs, [n] * b, [n] * b, [-1] * b, 1, False, None, out.data_ptr(), n,
                                totals.data_ptr(), stream)  # fmt: skip

    threads = os.cpu_count() or 1

    def cpu():
        return _ext._C.lsap_solve_f64(costs, [-1] * b, False, None, threads)

    t_gpu = median_time(gpu, repeats)
    t_cpu = median_time(cpu, repeats)
    ref = cpu()[1]
    got = totals.cpu().numpy()
    if kind == "integer":
        ok = bool(np.array_equal(got, ref))
    else:
        ok = bool(np.allclose(got, ref, rtol=1e-12, atol=0))
    if not ok:
        raise AssertionError(f"B={b} n={n} {kind}: GPU objectives differ from the CPU solver's (max diff "
                             f"{np.abs(got - ref).max():.3e})")  # fmt: skip
    return t_gpu, t_cpu, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    if not hasattr(_ext._C, "lsap_solve_cuda"):
        raise SystemExit(f"the extension was built without CUDA: {_ext.build_info().get('cuda_error')}")
    if args.quick:
        cases, repeats = [(64, 128, "uniform")], 3
    else:
        cases = [(b, n, kind) for kind in ("uniform", "integer") for b, n in ((1024, 64), (256, 256), (64, 512),
                                                                             (16, 1024), (8, 2048))]  # fmt: skip
        repeats = 3
    rows = []
    t0 = time.time()
    for b, n, kind in cases:
        t_gpu, t_cpu, threads = run(b, n, kind, repeats)
        rows.append((b, n, kind, t_gpu, t_cpu, threads))
        print(f"B={b} n={n} {kind}: GPU {t_gpu * 1e3:.2f} ms  CPU ({threads} threads) {t_cpu * 1e3:.2f} ms  "
              f"speedup {t_cpu / t_gpu:.2f}x", flush=True)  # fmt: skip
    if args.out:
        p = torch.cuda.get_device_properties(0)
        lines = [
            "# Batched exact assignment: GPU vs the CPU solver",
            "",
            f"- GPU: {torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs); host: {os.cpu_count()} logical "
            f"CPUs; torch {torch.__version__}",
            f"- command: `python bench/bench_assignment_gpu.py{' --quick' if args.quick else ''}` "
            f"({time.time() - t0:.0f} s); wall-clock medians; float64; objectives equal to the CPU solver's",
            "- GPU: lsap_solve_cuda (a warp per problem up to 1024 columns, a 256-thread block above); CPU: "
            "lsap_solve_f64 with all host threads",
            "",
            "| B | n | costs | GPU ms | CPU ms | CPU threads | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for b, n, kind, t_gpu, t_cpu, threads in rows:
            lines.append(f"| {b} | {n} | {kind} | {t_gpu * 1e3:.2f} | {t_cpu * 1e3:.2f} | {threads} | "
                         f"{t_cpu / t_gpu:.2f}x |")  # fmt: skip
        best = max(r[4] / r[3] for r in rows)
        worst = min(r[4] / r[3] for r in rows)
        lines += ["", f"Target (>= 5x the CPU solver on batches): best {best:.2f}x, worst {worst:.2f}x."]
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
