"""Accuracy of neuron-interpolation fusion (hf, kf, kf_gradient) against the baselines on MNIST / Fashion-MNIST.

Settings (papers.md B.7, scaled down to a 2-core CPU budget): members trained on non-IID Dirichlet splits
(``linspace(1, 5, K)`` concentrations shuffled per class) or sharded (disjoint classes) splits of a training subset;
MLP 784-256-10 and a small VGG-style CNN; K in {2, 4}; a class-balanced calibration set drawn from the union of the
members' data. Rows: each member, the ensemble (softmax probabilities weighted per class by each member's class
share, as the authors), vanilla averaging, OT fusion, activation matching (Git Re-Basin style on activations),
hf (K = 2), kf, kf_gradient; the importance-aware ones with uniform (U) and conductance (C) importance (OT: the
importance as transport masses).

Usage: ``python bench/interp_results.py [--quick] [--out bench/results/interp_mnist.md]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.data import class_shares, dirichlet_split, load_fashion_mnist, load_mnist, shard_split  # noqa: E402
from pyfusion.fuse.interp import interp_levels  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.match.importance import neuron_importance  # noqa: E402
from pyfusion.models import mlp, vgg  # noqa: E402
from pyfusion.train import ensemble_accuracy, evaluate, train  # noqa: E402


def balanced_subset(y: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(yn == c))[:per_class] for c in np.unique(yn)]))


def make_model(arch: str) -> torch.nn.Module:
    if arch == "mlp":
        return mlp([784, 256, 10])
    return vgg((8, "M", 16, "M"), in_channels=1, num_classes=10, image_size=28, hidden=32)


def run_setting(xtr, ytr, xte, yte, arch, k, split, args, seed=0):
    parts = dirichlet_split(ytr, k, seed=seed) if split == "dirichlet" else shard_split(ytr, k, seed=seed)
    members = []
    for i, idx in enumerate(parts):
        torch.manual_seed(1000 * seed + i)
        m = make_model(arch)
        xi, yi = xtr[idx], ytr[idx]
        loader = pyfusion.data.make_loader(xi, yi, batch_size=64, shuffle=True, seed=i)
        train(m, loader, epochs=args.epochs_mlp if arch == "mlp" else args.epochs_vgg, lr=1e-3, seed=i)
        members.append(m.eval())
    shares = torch.as_tensor(class_shares(ytr, parts, 10))
    cal_idx = balanced_subset(ytr, args.calib // 10, seed)
    calib = [(xtr[cal_idx][i : i + 100], ytr[cal_idx][i : i + 100]) for i in range(0, len(cal_idx), 100)]
    test = [(xte[i : i + 1000], yte[i : i + 1000]) for i in range(0, xte.shape[0], 1000)]
    res: dict[str, float] = {}
    for i, m in enumerate(members):
        res[f"member {i}"] = evaluate(m, test)
    res["ensemble (class-share weighted)"] = ensemble_accuracy(members, test, per_class_weights=shares, combine="probs")
    graph = trace_groups(members[0])
    levels = [lv for lv in interp_levels(members[0], graph) if not lv.last]
    cond = [neuron_importance(m, calib, [lv.out_point for lv in levels], method="conductance") for m in members]
    masses = {
        lv.group: [c[lv.out_point] / c[lv.out_point].sum() for c in cond] for lv in levels if lv.group is not None
    }
    kfg = {"epochs": args.level_epochs, "last_epochs": args.last_epochs, "lr": 1e-3, "patience": 5}
    jobs = [
        ("vanilla averaging", "average", {}),
        ("OT (U)", "ot", {"cost": "activations"}),
        ("OT (C)", "ot", {"cost": "activations", "masses": masses}),
        ("activation matching", "activation_matching", {}),
    ]
    if k == 2:
        jobs += [("HF (U)", "hf", {}), ("HF (C)", "hf", {"importance": "conductance"})]
    jobs += [
        ("KF (U)", "kf", {}),
        ("KF (C)", "kf", {"importance": "conductance"}),
        ("KF-Gradient (U)", "kf_gradient", kfg),
        ("KF-Gradient (C)", "kf_gradient", {**kfg, "importance": "conductance", "class_weights": shares}),
    ]
    times = {}
    for name, method, opts in jobs:
        t0 = time.perf_counter()
        try:
            fused = pyfusion.fuse(members, calib, method=method, **opts)
            res[name] = evaluate(fused, test)
        except ValueError as exc:  # not applicable here (e.g. hf with K > 2): shown as "-" in the table
            res[name] = float("nan")
            print(f"  {name}: {exc}", flush=True)
        times[name] = time.perf_counter() - t0
    return res, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MNIST, MLP, K=2, Dirichlet only, small subsets")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
    ap.add_argument("--train", type=int, default=10000, help="training subset size (split among the members)")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--calib", type=int, default=400, help="class-balanced calibration samples")
    ap.add_argument("--epochs-mlp", type=int, default=3)
    ap.add_argument("--epochs-vgg", type=int, default=2)
    ap.add_argument("--level-epochs", type=int, default=10)
    ap.add_argument("--last-epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="Markdown file (default: bench/results/interp_mnist.md; quick: a temporary folder)")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.calib = 2000, 500, 200
    datasets = [("MNIST", load_mnist, "mnist")] + (
        [] if args.quick else [("Fashion-MNIST", load_fashion_mnist, "fashion-mnist")]
    )
    archs = ["mlp"] if args.quick else ["mlp", "vgg"]
    settings = [(2, "dirichlet")] if args.quick else [(2, "dirichlet"), (2, "shard"), (4, "dirichlet"), (4, "shard")]
    t_start = time.perf_counter()
    # one thread: the 2 cores are shared by several jobs, and 2 threads under that load ran slower than 1
    torch.set_num_threads(args.threads)
    report = Report("Neuron-interpolation fusion: accuracy on MNIST / Fashion-MNIST", quick=args.quick)
    report.text(
        f"One seed. Training subset: {args.train} random training images split among the K members (Dirichlet "
        f"non-IID with concentrations linspace(1, 5, K) shuffled per class, or sharded: disjoint classes); test: "
        f"the first {args.test} test images; members trained with Adam 1e-3, batch 64, {args.epochs_mlp} epochs (MLP "
        f"784-256-10) / {args.epochs_vgg} epochs (VGG-style `vgg((8, 'M', 16, 'M'), hidden=32)`, BatchNorm). "
        f"Calibration: {args.calib} class-balanced training images. KF-Gradient: Adam 1e-3, batch 32, "
        f"{args.level_epochs} epochs per level, {args.last_epochs} for the head, patience 5, 80/20 split; its (C) "
        "variant also weights the head target per class by the members' class shares. OT uses activation costs; "
        "(C) = conductance importance as transport masses. Accuracies in %.",
    )
    summary = []
    for dname, loader, sub in datasets:
        xtr, ytr = loader(os.path.join(args.data, sub), "train")
        xte, yte = loader(os.path.join(args.data, sub), "test")
        sel = np.random.default_rng(0).permutation(xtr.shape[0])[: args.train]
        xtr, ytr = xtr[sel], ytr[sel]
        xte, yte = xte[: args.test], yte[: args.test]
        for arch in archs:
            cols, table, tcols = [], {}, {}
            for k, split in settings:
                t0 = time.perf_counter()
                res, times = run_setting(xtr, ytr, xte, yte, arch, k, split, args)
                col = f"K={k} {split}"
                cols.append(col)
                for name, acc in res.items():
                    table.setdefault(name, {})[col] = acc
                tcols[col] = times
                print(f"{dname} {arch} {col}: {time.perf_counter() - t0:.1f}s", flush=True)
                interp = {n: a for n, a in res.items() if n.startswith(("HF", "KF"))}
                base = {n: a for n, a in res.items() if n.startswith(("OT", "activation"))}
                bi, bb = max(interp, key=interp.get), max(base, key=lambda n: np.nan_to_num(base[n], nan=-1))
                summary.append((dname, arch, col, bi, interp[bi], bb, base[bb]))
            report.text(f"## {dname}, {'MLP 784-256-10' if arch == 'mlp' else 'VGG-style CNN'}")
            pct = {c: (lambda v: "-" if np.isnan(v) else f"{100 * v:.1f}") for c in cols}
            rows = [[name, *(row.get(c, float("nan")) for c in cols)] for name, row in table.items()]
            report.table(f"{sub}-{arch}", ["method", *cols], rows, formats=pct)
    report.text("## Best neuron-interpolation row vs best alignment baseline (OT / activation matching)")
    report.table(
        "best",
        ["data", "model", "setting", "best interp", "acc", "best baseline", "acc baseline", "difference"],
        [[d, a, c, bi, 100 * ai, bb, 100 * ab, 100 * (ai - ab)] for d, a, c, bi, ai, bb, ab in summary],
        formats={"acc": ".1f", "acc baseline": ".1f", "difference": "+.1f"},
    )
    report.text(f"Total run time {time.perf_counter() - t_start:.0f} s (the cores were shared with other jobs).")
    print(report.markdown())
    report.write(output_path(args.out, "interp_mnist.md", args.quick))


if __name__ == "__main__":
    main()
