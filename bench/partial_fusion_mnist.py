"""The partial-fusion paper's core sweep on MNIST (Morelli & Eckstein 2026, ``partial_fusion_sweep.py``).

MLP 784-100-100-100-10, GELU, no bias, Adam 1e-3, batch 128. Two pairs: (i) two members from different seeds on
the full training set, (ii) the "specialist" pair: member A on 90% of the images of the digits other than 4,
member B on all 4s plus the other 10%. For alpha in {0, .2, .4, .5, .6, .8, 1} and lambda .5 (and {0, 1} for
(ii)): test accuracy and effective parameters (pyfusion.cost) of partial fusion (weights / activations / pcd
features), vanilla averaging, generalized pruning (clustering to n (1 + alpha)) and structured pruning of the
ensemble (activation std) at the effective parameter count of partial fusion at the same alpha.

Writes bench/results/partial_fusion_mnist.md and .png. ``--quick``: 1 epoch, 3 alphas, small subsets.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import Report, output_path

import pyfusion
from pyfusion import models
from pyfusion.data import load_mnist, make_loader, subset
from pyfusion.train import ensemble_accuracy, evaluate, train

HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [os.path.join(HERE, "..", "..", "shared", "data"), os.path.join(HERE, "..", "..", "..", "shared", "data")]
DATA = os.environ.get("PYFUSION_DATA") or next(
    (p for p in _CANDIDATES if os.path.isdir(os.path.join(p, "mnist"))), _CANDIDATES[0]
)
N = 100


def make_member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.mlp([784, N, N, N, 10], activation="gelu", bias=False)


def specialist_split(y: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(general, specific) index sets: 90% of non-4 images / all 4s + the other 10% of non-4 images."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    fours = np.flatnonzero(yn == 4)
    rest = rng.permutation(np.flatnonzero(yn != 4))
    cut = int(0.9 * len(rest))
    return np.sort(rest[:cut]), np.sort(np.concatenate([fours, rest[cut:]]))


def matched_prune(members, data, lam, target_params, lo, hi):
    """The widest ensemble pruning (activation std) with effective params <= target (bisection on the width)."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        f = pyfusion.fuse(members, data, method="prune", width=mid, criterion="activation_std", lambdas=lam)
        p = pyfusion.cost(f, (1, 28, 28)).params
        if p <= target_params:
            best, lo = (f, p, mid), mid + 1
        else:
            hi = mid - 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch, 3 alphas, subsets (a smoke test)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=200, help="clustering restarts per group")
    ap.add_argument(
        "--out",
        help="output prefix (.md, .png; default: bench/results/partial_fusion_mnist; quick: a temporary folder)",
    )
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("TQDM_DISABLE", "1")
    epochs = 1 if args.quick else args.epochs
    alphas = [0.0, 0.5, 1.0] if args.quick else [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]
    mnist = os.path.join(DATA, "mnist")
    xtr, ytr = load_mnist(mnist, "train")
    xte, yte = load_mnist(mnist, "test")
    if args.quick:
        xtr, ytr, xte, yte = xtr[:6000], ytr[:6000], xte[:2000], yte[:2000]
    test = make_loader(xte, yte, batch_size=1000)
    n_cal = 2000 if args.quick else 10000  # the paper's 10,000 training images for activation features
    cal = [xtr[i : i + 1000] for i in range(0, n_cal, 1000)]
    t0 = time.perf_counter()
    seed_pair = []
    for s in (0, 1):
        m = make_member(s)
        train(m, make_loader(xtr, ytr, 128, shuffle=True, seed=s), epochs=epochs, lr=1e-3, seed=s)
        seed_pair.append(m.eval())
    gen_idx, spec_idx = specialist_split(ytr)
    spec_pair = []
    for s, idx in ((2, gen_idx), (3, spec_idx)):
        m = make_member(s)
        xs, ys = subset(xtr, ytr, idx)
        train(m, make_loader(xs, ys, 128, shuffle=True, seed=s), epochs=epochs, lr=1e-3, seed=s)
        spec_pair.append(m.eval())
    t_train = time.perf_counter() - t0
    configs = [("seeds", seed_pair, 0.5), ("specialist", spec_pair, 0.5)]
    if not args.quick:
        configs += [("specialist", spec_pair, 0.0), ("specialist", spec_pair, 1.0)]
    rows = []
    t0 = time.perf_counter()
    for pair_name, pair, lb in configs:
        lam = [1.0 - lb, lb]
        one_hot = lb in (0.0, 1.0)
        for k, m in enumerate(pair):
            rows.append((pair_name, lb, f"member {'AB'[k]}", None, evaluate(m, test), pyfusion.cost(m, (1, 28, 28))))
        ens_acc = ensemble_accuracy(pair, test, weights=lam)
        ens = pyfusion.fuse(pair, method="partial", alpha=1.0, lambdas=lam)
        rows.append((pair_name, lb, "ensemble", 1.0, ens_acc, pyfusion.cost(ens, (1, 28, 28))))
        avg = pyfusion.fuse(pair, method="average", lambdas=lam)
        rows.append((pair_name, lb, "vanilla averaging", 0.0, evaluate(avg, test), pyfusion.cost(avg, (1, 28, 28))))
        for alpha in alphas:
            targets = {}
            for feat in ("weights", "activations", "pcd"):
                opts = {"point": "pre"} if feat == "activations" else {}  # GELU: the paper's pre-activations
                f = pyfusion.fuse(pair, cal, method="partial", alpha=alpha, features=feat, lambdas=lam, **opts)
                c = pyfusion.cost(f, (1, 28, 28))
                targets[feat] = c.params
                rows.append((pair_name, lb, f"partial ({feat})", alpha, evaluate(f, test), c))
            if one_hot:
                continue
            f = pyfusion.fuse(pair, cal, method="cluster", alpha=alpha, lambdas=lam, n_restarts=args.restarts)
            rows.append((pair_name, lb, "cluster", alpha, evaluate(f, test), pyfusion.cost(f, (1, 28, 28))))
            best = matched_prune(pair, cal[:2], lam, targets["activations"], 1, 2 * N)
            if best is not None:
                rows.append((pair_name, lb, "prune (act. std, matched)", alpha, evaluate(best[0], test),
                             pyfusion.cost(best[0], (1, 28, 28))))  # fmt: skip
    t_sweep = time.perf_counter() - t0
    out = str(output_path(args.out, "partial_fusion_mnist", args.quick))
    report = Report("Partial fusion on MNIST (MLP 784-100-100-100-10, GELU, no bias)", quick=args.quick)
    report.text(
        f"torch threads {torch.get_num_threads()}. "
        f"Training: {epochs} epoch(s) of Adam (lr 1e-3, batch 128) per member ({t_train:.0f} s for four members); "
        f"sweep {t_sweep:.0f} s. Activation features and clustering use {n_cal} training images; accuracy on "
        f"{len(yte)} test images. Clustering: {args.restarts} randomized-Ward + k-means restarts per group. "
        "Pruning: structured pruning of the ensemble by activation std (lambda-weighted), widest width whose "
        "effective parameters do not exceed partial fusion (activations) at the same alpha."
    )
    report.table(
        "sweep",
        ["pair", "lambda_B", "method", "alpha", "test acc. (%)", "effective params", "dense params"],
        [[pn, lb, meth, alpha, 100 * acc, c.params, c.dense_params] for pn, lb, meth, alpha, acc, c in rows],
        formats={"lambda_B": "g", "alpha": "g", "test acc. (%)": ".2f", "effective params": ",",
                 "dense params": ","},
    )  # fmt: skip
    report.write(out + ".md")
    print(report.markdown())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    panels = sorted({(r[0], r[1]) for r in rows}, key=lambda t: (t[0] != "seeds", t[1] != 0.5, t[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (pn, lb) in zip(axes[0], panels):
        sub = [r for r in rows if r[0] == pn and r[1] == lb]
        for meth in dict.fromkeys(r[2] for r in sub):
            pts = sorted((r[5].params, 100 * r[4]) for r in sub if r[2] == meth)
            style = "o-" if len(pts) > 1 else "*"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=meth, ms=8 if len(pts) == 1 else 4)
        ax.set_title(f"{pn}, lambda_B = {lb:g}")
        ax.set_xlabel("effective parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    print(f"wrote {out}.png")


if __name__ == "__main__":
    main()
