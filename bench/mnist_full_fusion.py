"""Full fusion on MNIST: two MLPs 784-512-512-512-10 trained from different seeds, fused by every method.

Writes bench/results/full_fusion_mnist.md: test accuracy of each member, the logit ensemble, vanilla averaging and
each full-fusion method (with REPAIR where it applies), plus a small VGG-style CNN with BatchNorm where the
BatchNorm reset matters (with and without it).

Usage: PYTHONPATH=. python bench/mnist_full_fusion.py [--data ../shared/data/mnist] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import Report, output_path

import pyfusion
from pyfusion import data as pdata
from pyfusion import models
from pyfusion.train import ensemble_accuracy, evaluate, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "..", "shared", "data", "mnist")

# (label, method, options)
METHODS = [
    ("vanilla averaging", "average", {}),
    ("vanilla averaging + REPAIR", "average", {"repair": True}),
    ("weight matching", "weight_matching", {}),
    ("weight matching + REPAIR", "weight_matching", {"repair": True}),
    ("activation matching (1 - corr, post-act)", "activation_matching", {}),
    ("activation matching (1 - corr, pre-act)", "activation_matching", {"point": "pre"}),
    ("activation matching (sq. dist, post-act)", "activation_matching", {"cost": "sqdist"}),
    ("activation matching + REPAIR", "activation_matching", {"repair": True}),
    ("OT fusion (acts, uniform masses)", "ot", {}),
    ("OT fusion (acts, l2 importance masses)", "ot", {"masses": "l2"}),
    ("OT fusion (weights, uniform)", "ot", {"cost": "weights"}),
    ("OT fusion (acts, uniform) + REPAIR", "ot", {"repair": True}),
]


def _train_members(make, xtr, ytr, epochs, lr, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        m = make()
        t0 = time.perf_counter()
        train(m, pdata.make_loader(xtr, ytr, 128, shuffle=True, seed=s), epochs=epochs, lr=lr, seed=s)
        out.append((m, time.perf_counter() - t0))
    return out


def _run(report, name, title, make, xtr, ytr, test, calib, epochs, lr, methods, bn_variants):
    members = _train_members(make, xtr, ytr, epochs, lr, (0, 1))
    ms = [m for m, _ in members]
    rows = [
        (f"member {k} (seed {k}, {epochs} epochs, {t:.0f} s)", evaluate(m, test), None)
        for k, (m, t) in enumerate(members)
    ]
    rows.append(("logit ensemble (K = 2, uniform)", ensemble_accuracy(ms, test), None))
    for label, method, opts in methods:
        variants = [(label, opts)]
        if bn_variants:
            variants = [
                (label + " (BN reset)", {**opts, "reset_bn": True}),
                (label + " (no BN reset)", {**opts, "reset_bn": False}),
            ]
            if opts.get("repair"):
                variants = variants[:1]
        for lab, o in variants:
            t0 = time.perf_counter()
            fused = pyfusion.fuse(ms, calib, method=method, **o)
            dt = time.perf_counter() - t0
            rows.append((lab, evaluate(fused, test), dt))
    report.text(f"### {title}")
    report.table(
        name,
        ["model", "test accuracy", "fusion time (s)"],
        [[r[0], 100 * r[1], r[2]] for r in rows],
        formats={"test accuracy": "{:.2f}%".format, "fusion time (s)": ".2f"},
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.environ.get("PYFUSION_MNIST", DEFAULT_DATA))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib", type=int, default=5000, help="calibration samples (from the training set)")
    ap.add_argument("--cnn-train", type=int, default=60000, help="training images for the CNN (1 epoch)")
    ap.add_argument("--quick", action="store_true", help="784-128-128-10 on 10k samples, 1 epoch, no CNN")
    ap.add_argument(
        "--out", help="Markdown file (default: bench/results/full_fusion_mnist.md; quick: a temporary folder)"
    )
    args = ap.parse_args()
    threads = torch.get_num_threads()
    xtr, ytr = pdata.load_mnist(args.data, "train")
    xte, yte = pdata.load_mnist(args.data, "test")
    test = pdata.make_loader(xte, yte, 1000)
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(xtr.shape[0], generator=g)[: args.calib]
    calib = pdata.make_loader(xtr[idx], ytr[idx], 500)
    sizes = [784, 128, 128, 10] if args.quick else [784, 512, 512, 512, 10]
    if args.quick:
        xtr, ytr, args.epochs = xtr[:10000], ytr[:10000], 1
    t_all = time.perf_counter()
    out = output_path(args.out, "full_fusion_mnist.md", args.quick)
    report = Report("Full fusion on MNIST", quick=args.quick)
    report.text(
        f"torch {threads} threads. Calibration: "
        f"{args.calib} training images (batches of 500) for statistics, BatchNorm reset and REPAIR. Test set: "
        "the 10,000 MNIST test images."
    )
    _run(
        report, "mlp", f"MLP {'-'.join(map(str, sizes))} (Adam lr 1e-3, batch 128; no BatchNorm, so no BN reset)",
        lambda: models.mlp(sizes), xtr, ytr, test, calib, args.epochs, 1e-3, METHODS, False,
    )  # fmt: skip
    report.write(out, quiet=True)  # the MLP part first: survives an interrupted CNN part
    if not args.quick:
        cnn_methods = [
            m
            for m in METHODS
            if m[1] in ("average", "weight_matching", "activation_matching") and "pre" not in m[0] and "sq." not in m[0]
        ]
        _run(
            report,
            "cnn",
            f"VGG-style CNN with BatchNorm (conv 16-M-32-M, hidden 64; 1 epoch on {args.cnn_train} images, "
            "Adam lr 1e-3)",
            lambda: models.vgg((16, "M", 32, "M"), in_channels=1, image_size=28, hidden=64),
            xtr[: args.cnn_train], ytr[: args.cnn_train], test, calib, 1, 1e-3, cnn_methods, True,
        )  # fmt: skip
    report.text(f"Total wall time {time.perf_counter() - t_all:.0f} s.")
    report.write(out)
    print(report.markdown())


if __name__ == "__main__":
    main()
