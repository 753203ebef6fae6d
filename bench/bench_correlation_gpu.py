"""GPU benchmark of the CUDA correlation kernel (``pyfusion._C.corr_accumulate_cuda``) against torch's fp32 GEMM.

Cases: the joint Gram of two members side by side (D = 2 x 512, 2 x 1024, 2 x 2048) and N = 16384 / 65536 samples.
Ours: the kernel call (float64 state: lower triangle + s1; float32 products summed over <= 64 samples); torch:
``xc = x - x.mean(0); xc.T @ xc`` in float32 (cuBLAS SGEMM, the full Gram; TF32 off, torch's default). Times with
CUDA events (median of repeats after warm-up). Error: max |corr - float64 two-pass| on offset data (mean 1e3).
Target: ours no slower than the torch fp32 GEMM, at float64-grade error.

Usage: ``python bench/bench_correlation_gpu.py [--quick] [--out bench/results/correlation_gpu.md]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pyfusion import _ext  # noqa: E402


def cuda_time(fn, repeats: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def corr(c: torch.Tensor) -> torch.Tensor:
    sd = c.diagonal().clamp_min(1e-300).sqrt()
    return c / torch.outer(sd, sd)


def run(d: int, n: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, generator=g, device="cuda")
    z[:, 1::2] += 0.7 * z[:, ::2]
    x = 1e3 + z
    shift = x[:256].double().mean(0).float().double()
    s1 = torch.zeros(d, dtype=torch.float64, device="cuda")
    s2 = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def ours():
        s1.zero_()
        s2.zero_()
        _ext._C.corr_accumulate_cuda(x.data_ptr(), 0, n, d, x.stride(0), x.stride(1), shift.data_ptr(),
                                     s1.data_ptr(), s2.data_ptr(), stream)  # fmt: skip

    def composite():
        xc = x - x.mean(0)
        return xc.T @ xc

    t_ours, t_torch = cuda_time(ours), cuda_time(composite)
    ours()
    xd = x.double()
    ref = corr((xd - xd.mean(0)).T @ (xd - xd.mean(0)))
    low = torch.tril(s2)
    mine = corr(low + torch.tril(low, -1).T - torch.outer(s1, s1) / n)
    e_ours = (mine - ref).abs().max().item()
    e_torch = (corr(composite().double()) - ref).abs().max().item()
    return t_ours, t_torch, e_ours, e_torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    if not hasattr(_ext._C, "corr_accumulate_cuda"):
        raise SystemExit(f"the extension was built without CUDA: {_ext.build_info().get('cuda_error')}")
    cases = [(1024, 16384)] if args.quick else [(d, n) for d in (1024, 2048, 4096) for n in (16384, 65536)]
    rows = []
    t0 = time.time()
    for d, n in cases:
        t_o, t_t, e_o, e_t = run(d, n)
        rows.append((d, n, t_o, t_t, e_o, e_t))
        print(f"D={d} N={n}: ours {t_o:.3f} ms  torch fp32 {t_t:.3f} ms  speedup {t_t / t_o:.2f}x  err ours {e_o:.1e} "
              f"torch {e_t:.1e}", flush=True)  # fmt: skip
    if args.out:
        p = torch.cuda.get_device_properties(0)
        lines = [
            "# CUDA correlation kernel vs torch fp32 GEMM",
            "",
            f"- GPU: {torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs, sm_{p.major}{p.minor}); torch "
            f"{torch.__version__} (CUDA {torch.version.cuda})",
            f"- command: `python bench/bench_correlation_gpu.py{' --quick' if args.quick else ''}` "
            f"({time.time() - t0:.0f} s); CUDA-event medians; data: mean 1e3, correlated columns",
            "- ours: corr_accumulate_cuda (float64 state); torch: `xc = x - x.mean(0); xc.T @ xc` float32 (TF32 off)",
            "",
            "| D | N | ours ms | torch fp32 ms | speedup | err ours | err torch |",
            "|---|---|---|---|---|---|---|",
        ]
        for d, n, t_o, t_t, e_o, e_t in rows:
            lines.append(f"| {d} | {n} | {t_o:.3f} | {t_t:.3f} | {t_t / t_o:.2f}x | {e_o:.1e} | {e_t:.1e} |")
        worst = min(r[3] / r[2] for r in rows)
        lines += ["", f"Target (>= 1.0x torch fp32 at float64-grade error): {'met' if worst >= 1 else 'MISSED'} "
                  f"(worst {worst:.2f}x)."]  # fmt: skip
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
