"""Fusion time of neuron interpolation (hf, kf) against a direct reimplementation of the authors' approach.

The authors' code (papers.md B.3, B.4, B.9) fits every layer with ``P = pinv(X)`` of the unfolded fused inputs
(rows = samples x output positions), ``w = P a``; HF builds the pair cost in 8 x 8 chunks that materialise the
(m, 8, 8) predictions of every pair; KF clusters the K*n activation columns with k-means (here scikit-learn's
weighted ``KMeans``, n_init=10, on the activation vectors). Ours: Gram statistics ``X^T X``, ``X^T A`` accumulated
chunk by chunk, a Cholesky solve, the cost epilogue from Gram products (C++), the exact assignment engine, and
weighted k-means on the (Kn, Kn) Gram of the LS predictions (C++). Both walk the same levels and set the same
fused model, so the accuracy of the two is reported beside the time.

Usage: ``python bench/bench_interp.py [--quick] [--samples 1000] [--out bench/results/interp_time.md]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.fuse.interp.fitting import set_linear  # noqa: E402
from pyfusion.fuse.interp.levels import interp_levels, run_chunked  # noqa: E402
from pyfusion.fuse.interp.statistics import design, target_rows  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.models import vgg  # noqa: E402
from pyfusion.train import train  # noqa: E402


def authors_fuse(members, x, method: str):
    """The authors' pipeline on our levels: pinv of the unfolded inputs, 8 x 8 chunked pair loops, sklearn k-means.

    Uniform importance (s = 1 for every neuron), as in their uniform runs.
    """
    from sklearn.cluster import KMeans

    levels = interp_levels(members[0], trace_groups(members[0]))
    fused = copy.deepcopy(members[0]).eval()
    member_in = [x for _ in members]
    fused_in = x
    for lv in levels:
        outs = [run_chunked(m, lv.calls, member_in[k]) for k, m in enumerate(members)]
        n = outs[0].shape[1]
        prod = dict(fused.named_modules())[lv.producer]
        u = run_chunked(fused, lv.pre, fused_in) if lv.pre else fused_in
        X = design(prod, u).float()  # the whole unfolded matrix, as the authors build it
        P = torch.linalg.pinv(X)
        A = [target_rows(o).float() for o in outs]
        W = [P @ a for a in A]
        if lv.last:
            wf = sum(W) / len(W)
        elif method == "hf":
            cost = np.zeros((n, n))
            for i0 in range(0, n, 8):
                for j0 in range(0, n, 8):
                    wi, wj = W[0][:, i0 : i0 + 8], W[1][:, j0 : j0 + 8]
                    comb = 0.5 * (wi[:, :, None] + wj[:, None, :])  # (p, 8, 8), s = 1
                    pred = torch.einsum("mp,pij->mij", X, comb)  # (m, 8, 8) materialised
                    d0 = (pred - A[0][:, i0 : i0 + 8, None]).norm(dim=0)
                    d1 = (pred - A[1][:, None, j0 : j0 + 8]).norm(dim=0)
                    cost[i0 : i0 + 8, j0 : j0 + 8] = (d0 + d1).numpy()
            rows, cols = scipy.optimize.linear_sum_assignment(cost)
            wf = 0.5 * (W[0][:, rows] + W[1][:, cols])
        else:
            pts = torch.cat(A, 1).T.numpy()  # (K n, m) activation vectors
            km = KMeans(n_clusters=n, n_init=10, random_state=0).fit(pts, sample_weight=np.ones(pts.shape[0]))
            lab = torch.as_tensor(km.labels_).long()
            wcat = torch.cat(W, 1)
            onehot = F.one_hot(lab, n).float()
            wf = (wcat @ onehot) / onehot.sum(0).clamp_min(1)
        set_linear(fused, lv, wf.double())
        fused_in = run_chunked(fused, lv.calls, fused_in)
        member_in = outs
    return fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for the smoke test")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
    ap.add_argument("--out", help="Markdown file (default: bench/results/interp_time.md; quick: a temporary folder)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch / OpenMP threads for both sides (1: on the shared 2-core VM, 2 threads under a load of 8-10 "
        "were slower than 1, e.g. a (12544, 209) SYRK 153 ms vs 36 ms)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = Report("Neuron-interpolation fusion time: ours vs the authors' approach", quick=args.quick)
    if args.quick:
        widths, hidden, side, samples = (4, "M", 8, "M"), 16, 12, 64
    else:
        widths, hidden, side, samples = (16, "M", 32, "M"), 64, 28, args.samples
    mnist = os.path.join(args.data, "mnist")
    if not args.quick and os.path.isdir(mnist):
        from pyfusion.data import load_mnist

        xs, ys = load_mnist(mnist, "train")
        x = xs[:samples].float() / 255.0 if xs.dtype == torch.uint8 else xs[:samples].float()
        y = ys[:samples]
        source = f"MNIST train[:{samples}]"
    else:
        x = torch.randn(samples, 1, side, side)
        y = torch.randint(0, 10, (samples,))
        source = f"Gaussian noise ({samples} samples)"
    members = []
    for s in range(2):
        torch.manual_seed(s)
        m = vgg(widths, in_channels=1, num_classes=10, image_size=side, hidden=hidden).eval()
        if not args.quick and source.startswith("MNIST"):
            train(m, [(x[i : i + 64], y[i : i + 64]) for i in range(0, samples, 64)], epochs=2, lr=1e-3)
        members.append(m.eval())
    data = [(x[i : i + 250], y[i : i + 250]) for i in range(0, samples, 250)]
    rows = []
    for method in ("hf", "kf"):
        t_ours, t_auth = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours = pyfusion.fuse(members, data, method=method, n_restarts=10)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            auth = authors_fuse(members, x, method)
            t_auth.append(time.perf_counter() - t0)
        with torch.no_grad():
            acc_o = float((ours(x).argmax(1) == y).float().mean())
            acc_a = float((auth(x).argmax(1) == y).float().mean())
        rows.append((method, min(t_auth), min(t_ours), min(t_auth) / min(t_ours), acc_a, acc_o))
        print(rows[-1], flush=True)
    report.text(
        f"torch threads {torch.get_num_threads()} (other jobs shared the cores: treat the times as upper bounds, "
        "the ratio as indicative).",
        f"Members: two VGG-style CNNs `vgg({widths}, in_channels=1, image_size={side}, hidden={hidden})` "
        f"(BatchNorm, 10 classes); calibration data: {source}. Best of {args.repeats} runs. Uniform importance.",
        "Authors' approach (our reimplementation, `authors_fuse`): `pinv` of the whole unfolded input per layer, "
        "HF pair cost in 8 x 8 chunks materialising the (m, 8, 8) predictions + scipy assignment; KF with "
        "scikit-learn `KMeans(n_init=10)` on the K*n activation vectors. Ours: Gram statistics + Cholesky, "
        "C++ cost epilogue + C++ exact assignment (hf), C++ weighted k-means with 10 randomized-Ward restarts "
        "on the (Kn, Kn) Gram (kf).",
    )
    report.table(
        "methods",
        ["method", "authors' approach (s)", "ours (s)", "speed-up", "acc. authors (calib.)", "acc. ours (calib.)"],
        [list(r) for r in rows],
        formats={"authors' approach (s)": ".3f", "ours (s)": ".3f", "speed-up": "{:.1f}x".format,
                 "acc. authors (calib.)": ".3f", "acc. ours (calib.)": ".3f"},
    )  # fmt: skip
    report.text(
        "Accuracies are on the calibration samples themselves (a sanity check that both produce a working model, "
        "not a generalisation result; see interp_mnist.md for test accuracies)."
    )
    print(report.markdown())
    report.write(output_path(args.out, "interp_time.md", args.quick))


if __name__ == "__main__":
    main()
