"""GPU benchmark of the Triton partial conv2d kernel against cuDNN (issue 15 item 4).

For each (channels per member C, K, alpha, batch N, spatial H = W, dtype), 3 x 3 convolution, stride 1, padding 1:
ours = one launch of ``pyfusion.triton_kernels.partial_conv2d`` (3-buffer format, autotuned; the per-call
tap-major weight copy included), cuDNN baselines through ``F.conv2d``: ``dense0`` = the dense zero-block conv,
``split`` = today's PartialConv2d decomposition (a shared-input conv + a grouped conv over the branches + cat),
``members`` = the K member convs one after another. TF/s count effective FLOPs for ours and split, own FLOPs for
dense0 and members; target: ours >= 70% of dense0's TF/s per its FLOPs (the cuDNN efficiency on the same shape).
Inputs channels_last for every method (cuDNN's fast layout on tensor cores). float32 uses TF32 in both when
``torch.backends.cudnn.allow_tf32`` is set (torch's default). Checked against float64 first.

Usage: ``python bench/bench_partial_conv_gpu.py [--quick] [--out bench/results/partial_conv_gpu.md]``.
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
        f"{torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs, sm_{p.major}{p.minor}); torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), triton "
        f"{triton.__version__}"
    )


def run(c, k, alpha, n, hw, dtype, check=True):
    from pyfusion.triton_kernels import partial_conv2d as pc
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    il = ol = layout(c, k, alpha)
    i_s, i_tot, o_s, o_b = il[0], sum(il), ol[0], sum(ol[1:])
    scale = 1.0 / (9 * i_tot) ** 0.5

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    ws, wc = rnd(o_s, i_tot, 3, 3), rnd(o_b, i_s, 3, 3)
    wd = rnd(sum(o * i for o, i in zip(ol[1:], il[1:])) * 9)
    bias = rnd(sum(ol))
    x = torch.randn(n, i_tot, hw, hw, generator=g, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    meta = pc.conv_segment_meta(il, ol, (3, 3), x.device)
    dense = torch.zeros(sum(ol), i_tot, 3, 3, device="cuda", dtype=dtype)
    dense[:o_s] = ws
    dense[o_s:, :i_s] = wc
    r, col, d = o_s, i_s, 0
    for o_k, i_k in zip(ol[1:], il[1:]):
        dense[r : r + o_k, col : col + i_k] = wd[d : d + o_k * i_k * 9].view(o_k, i_k, 3, 3)
        r, col, d = r + o_k, col + i_k, d + o_k * i_k * 9

    def ours():
        return pc.partial_conv2d_fwd(x, ws, wc, wd, bias, il, ol, (3, 3), 1, 1, 1, "relu", meta)

    err = float("nan")
    if check:
        ref = F.relu(F.conv2d(x.double(), dense.double(), bias.double(), 1, 1))
        err = ((ours().double() - ref).abs().max() / (ref.abs().max() + 1)).item()
        tf32 = torch.backends.cudnn.allow_tf32  # both ours and cuDNN use TF32 for float32 when it is set
        limit = {torch.float32: 5e-3 if tf32 else 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        if not err <= limit:
            raise AssertionError(f"C={c} K={k} alpha={alpha} N={n} {dtype}: relative error {err:.2e} > {limit}")
    wdiag = wd.view(o_b, il[1], 3, 3) if len(set(il[1:])) == 1 and il[1] > 0 else None

    def split():
        parts = [F.conv2d(x, ws, bias[:o_s], 1, 1)] if o_s else []
        if o_b:
            yb = F.conv2d(x[:, :i_s], wc, bias[o_s:], 1, 1) if i_s else 0
            if wdiag is not None:
                yb = yb + F.conv2d(x[:, i_s:], wdiag, None, 1, 1, 1, k)
            parts.append(yb)
        return F.relu(torch.cat(parts, 1))

    wm = [rnd(c, c, 3, 3) for _ in range(k)]
    xm = [torch.randn(n, c, hw, hw, generator=g, device="cuda").to(dtype).to(memory_format=torch.channels_last)
          for _ in range(k)]  # fmt: skip
    t = {
        "ours": do_bench(ours),
        "dense0": do_bench(lambda: F.relu(F.conv2d(x, dense, bias, 1, 1))),
        "split": do_bench(split),
        "members": do_bench(lambda: [F.conv2d(xm[j], wm[j], None, 1, 1) for j in range(k)]),
    }
    pix = n * hw * hw
    eff = 2 * pix * 9 * (ws.numel() // 9 + wc.numel() // 9 + wd.numel() // 9)
    flops = {"ours": eff, "split": eff, "dense0": 2 * pix * 9 * sum(ol) * i_tot, "members": 2 * pix * 9 * k * c * c}
    tf = {key: flops[key] / (t[key] * 1e-3) / 1e12 for key in t}
    return t, tf, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    if args.quick:
        cases, dtypes = [(128, 2, 0.5, 32, 16)], ["fp16", "fp32"]
    else:
        cases = [(c, k, a, 64, hw) for c, hw in ((256, 32), (512, 16)) for k in (2, 4) for a in (0.25, 0.5, 1.0)]
        dtypes = ["fp16", "bf16", "fp32"]
    rows = []
    t_start = time.time()
    for dname in dtypes:
        for c, k, a, n, hw in cases:
            t, tf, err = run(c, k, a, n, hw, DTYPES[dname])
            ratio = tf["ours"] / tf["dense0"]
            rows.append((dname, c, k, a, n, hw, t, tf, ratio, err))
            print(
                f"{dname} C={c} K={k} a={a:.2f} N={n} HW={hw}: ours {t['ours']:.3f} ms {tf['ours']:.1f} TF/s | "
                f"dense0 {t['dense0']:.3f} ms {tf['dense0']:.1f} TF/s | split {t['split']:.3f} ms | members "
                f"{t['members']:.3f} ms | ours/dense0 TF/s {ratio:.2f} | err {err:.1e}",
                flush=True,
            )
    if args.out:
        worst = {d: min(r[8] for r in rows if r[0] == d) for d in dtypes}
        lines = [
            "# Partial conv2d on the GPU: Triton implicit GEMM vs cuDNN",
            "",
            f"- GPU: {device_line()}",
            f"- command: `python bench/bench_partial_conv_gpu.py{' --quick' if args.quick else ''}` "
            f"({time.time() - t_start:.0f} s); 3x3, stride 1, padding 1, channels_last inputs, bias + relu; "
            "triton.testing.do_bench medians (ms)",
            "- ours: one Triton launch; dense0: cuDNN dense zero-block conv; split: shared conv + grouped branch conv "
            "(today's PartialConv2d); members: K member convs",
            "",
            "| dtype | C | K | alpha | N | H=W | ours ms | ours TF/s | dense0 ms | dense0 TF/s | split ms | members ms "
            "| ours / dense0 TF/s | err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for dname, c, k, a, n, hw, t, tf, ratio, err in rows:
            lines.append(
                f"| {dname} | {c} | {k} | {a:.2f} | {n} | {hw} | {t['ours']:.3f} | {tf['ours']:.1f} | "
                f"{t['dense0']:.3f} | {tf['dense0']:.1f} | {t['split']:.3f} | {t['members']:.3f} | {ratio:.2f} | "
                f"{err:.1e} |"
            )
        lines += ["", "Target (ours >= 0.70 x cuDNN dense TF/s, worst case per dtype): " + ", ".join(
            f"{d} {'met' if w >= 0.7 else 'MISSED'} ({w:.2f})" for d, w in worst.items()
        ) + "."]  # fmt: skip
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
