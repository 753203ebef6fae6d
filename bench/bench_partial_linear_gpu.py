"""GPU benchmark of the Triton partial linear kernel against cuBLAS (issue 15 item 4).

For each (member width n, K members, alpha, batch M, dtype): ours = one launch of
the Triton partial linear kernel as the op's "triton" backend runs it (member-mask segments, packed weight,
cached range table, autotuned), timed with ``triton.testing.do_bench``
(CUDA events, median); baselines, all cuBLAS through ``F.linear``: ``dense_eff`` = a dense GEMM with the same
effective FLOPs (M x O_total x K_eff, K_eff = effective weights / O_total rounded to 64), ``dense0`` = the dense
zero-block layer (M x O_total x I_total), ``members`` = the K member layers (n x n) one after another.
TFLOP/s count effective FLOPs for ours and each baseline's own FLOPs; target: ours >= 70% of dense_eff's TFLOP/s.
float32 runs with torch's default ``allow_tf32 = False`` for both (IEEE products in both).
Every configuration is checked against a float64 reference before it is timed.

Usage: ``python bench/bench_partial_linear_gpu.py [--quick] [--out bench/results/partial_linear_gpu.md]``.
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

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def layout(n: int, k: int, alpha: float) -> list[int]:
    b = int(round(alpha * n))
    return [n - b] + [b] * k


def device_line() -> str:
    import triton

    p = torch.cuda.get_device_properties(0)
    return (
        f"{torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
        f"sm_{p.major}{p.minor}); torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}"
    )


def run(n, k, alpha, m, dtype, check=True):
    from triton.testing import do_bench

    from pyfusion.ops.layout import segment_plan, segments_from_layout, unpack_segment_weight
    from pyfusion.ops.partial_linear import backends as plb

    g = torch.Generator(device="cuda").manual_seed(0)
    il = ol = layout(n, k, alpha)
    segs = segments_from_layout(il)
    plan = segment_plan(segs, segs)
    weight = (torch.randn(plan.stored, generator=g, device="cuda") / max(sum(il), 1) ** 0.5).to(dtype)
    bias = torch.randn(sum(ol), generator=g, device="cuda").to(dtype)
    x = torch.randn(m, sum(il), generator=g, device="cuda").to(dtype)

    def ours():
        return plb.triton_forward(x, weight, bias, plan, "relu")

    err = float("nan")
    if check:
        y = ours().double()
        ref = F.relu(x.double() @ unpack_segment_weight(weight.double(), segs, segs).T + bias.double())
        err = ((y - ref).abs().max() / (ref.abs().max() + 1)).item()
        limit = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        if not err <= limit:
            raise AssertionError(f"n={n} K={k} alpha={alpha} M={m} {dtype}: relative error {err:.2e} > {limit}")
    eff_params = weight.numel()
    o_total, i_total = sum(ol), sum(il)
    k_eff = max(64, int(round(eff_params / o_total / 64)) * 64)
    w_eff = torch.randn(o_total, k_eff, generator=g, device="cuda").to(dtype)
    x_eff = torch.randn(m, k_eff, generator=g, device="cuda").to(dtype)
    w0 = torch.randn(o_total, i_total, generator=g, device="cuda").to(dtype)
    wm = [torch.randn(n, n, generator=g, device="cuda").to(dtype) for _ in range(k)]
    xm = [torch.randn(m, n, generator=g, device="cuda").to(dtype) for _ in range(k)]
    t = {
        "ours": do_bench(ours),
        "dense_eff": do_bench(lambda: F.linear(x_eff, w_eff, bias)),
        "dense0": do_bench(lambda: F.linear(x, w0, bias)),
        "members": do_bench(lambda: [F.linear(xm[j], wm[j]) for j in range(k)]),
    }
    flops = {
        "ours": 2 * m * eff_params,
        "dense_eff": 2 * m * o_total * k_eff,
        "dense0": 2 * m * o_total * i_total,
        "members": 2 * m * k * n * n,
    }
    tflops = {key: flops[key] / (t[key] * 1e-3) / 1e12 for key in t}
    return t, tflops, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small shapes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    if args.quick:
        cases = [(1024, 2, 0.5, 256), (1024, 2, 1.0, 4096)]
        dtypes = ["fp16", "fp32"]
    else:
        cases = [(n, k, a, m) for n in (1024, 4096) for k in (2, 4) for a in (0.25, 0.5, 1.0) for m in (256, 4096)]
        cases += [(4096, 2, 0.5, 16)]
        dtypes = ["fp16", "bf16", "fp32"]
    rows = []
    t_start = time.time()
    for dname in dtypes:
        for n, k, a, m in cases:
            t, tf, err = run(n, k, a, m, DTYPES[dname])
            ratio = tf["ours"] / tf["dense_eff"]
            rows.append((dname, n, k, a, m, t, tf, ratio, err))
            print(
                f"{dname} n={n} K={k} a={a:.2f} M={m}: ours {t['ours']:.3f} ms {tf['ours']:.1f} TF/s | dense_eff "
                f"{tf['dense_eff']:.1f} TF/s | ours/dense_eff {ratio:.2f} | dense0 {t['dense0']:.3f} ms | members "
                f"{t['members']:.3f} ms | err {err:.1e}",
                flush=True,
            )
    if args.out:
        worst = {d: min(r[7] for r in rows if r[0] == d) for d in dtypes}
        lines = [
            "# Partial linear on the GPU: Triton kernel vs cuBLAS",
            "",
            f"- GPU: {device_line()}",
            f"- command: `python bench/bench_partial_linear_gpu.py{' --quick' if args.quick else ''}` "
            f"({time.time() - t_start:.0f} s); times: triton.testing.do_bench medians (ms); activation relu, bias",
            "- ours: one launch (3-buffer format, autotuned); dense_eff: cuBLAS GEMM with the same effective FLOPs; "
            "dense0: the dense zero-block layer; members: K n x n layers one after another",
            "- TF/s: effective FLOPs for ours, own FLOPs for the baselines; err: max relative error vs float64",
            "",
            "| dtype | n | K | alpha | M | ours ms | ours TF/s | dense_eff TF/s | ours / dense_eff | dense0 ms | "
            "members ms | err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for dname, n, k, a, m, t, tf, ratio, err in rows:
            lines.append(
                f"| {dname} | {n} | {k} | {a:.2f} | {m} | {t['ours']:.3f} | {tf['ours']:.1f} | {tf['dense_eff']:.1f} "
                f"| {ratio:.2f} | {t['dense0']:.3f} | {t['members']:.3f} | {err:.1e} |"
            )
        lines += ["", "Target (ours >= 0.70 x dense_eff TF/s, per dtype, worst case): " + ", ".join(
            f"{d} {'met' if w >= 0.7 else 'MISSED'} ({w:.2f})" for d, w in worst.items()
        ) + "."]  # fmt: skip
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
