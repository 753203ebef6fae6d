"""Fusion time of neuron interpolation (hf, kf) against the authors' approach, on a VGG, a ResNet and a ViT pair.

The authors' code (papers.md B.3, B.4, B.9) fits every layer with ``P = pinv(X)`` of the whole unfolded fused input
(rows = samples x output positions), ``w = P a``; HF builds the pair cost in 8 x 8 chunks that materialise the
(m, 8, 8) predictions of every pair and solves it with scipy; KF clusters the K*n activation vectors with
k-means (here scikit-learn's ``KMeans``, n_init=10). Ours: Gram statistics ``X^T X``, ``X^T A`` accumulated chunk by
chunk, a Cholesky solve, the cost epilogue from Gram products (C++), the exact assignment engine, and weighted
k-means on the (Kn, Kn) Gram of the LS predictions (C++).

Both run through the same driver (:class:`pyfusion.fuse.interp.driver._Interp`) on the same levels of the IR, so
the ResNet's residual levels and the ViT's transformer levels (heads matched as units) are handled identically;
the authors' side swaps in, per fitted step, the materialised design + ``pinv`` + pair loops + scipy assignment +
scikit-learn k-means (:class:`AuthorsInterp`). Shared by both sides (and so not part of the speed-up): the
forward passes of members and fused model, the grouping of residual streams on activations (one cost per stream,
from Gram products), the final fused solve of each fit, and writing the weights. The authors' time excludes our
Gram statistics, which its final solve reuses (measured and subtracted).

Members: two VGG + BN CNNs trained here (as before), and the zoo's ``mnist/resnet/iid/K2`` (ResNet-8) and
``mnist/vit/iid/K2`` (Hugging Face ViT) members (``--quick``: the zoo's tiny digits cases and random data).

Usage: ``python bench/bench_interp.py [--quick] [--samples 1000] [--out bench/results/interp_time.md]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, output_path  # noqa: E402

from pyfusion.fuse.config import HFConfig, KFConfig  # noqa: E402
from pyfusion.fuse.interp import driver, fitting, grouping  # noqa: E402
from pyfusion.fuse.interp.statistics import design, target_rows  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.models import vgg  # noqa: E402
from pyfusion.ops.assignment import AssignmentResult  # noqa: E402
from pyfusion.train import train  # noqa: E402


class _Authors:
    """Per-run side tables of the authors' pipeline: the materialised design, its pinv and targets per fit."""

    def __init__(self) -> None:
        self.fits: dict[str, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        self.shared_s = 0.0


_STATE = _Authors()
_ours_fit_statistics = driver._fit_statistics


def _authors_fit_statistics(fit, fused_vals, member_vals, state, n, chunk, dtype):
    """Our Gram statistics (timed, for the shared final solve), then the authors' whole design and ``pinv``."""
    t0 = time.perf_counter()
    st = _ours_fit_statistics(fit, fused_vals, member_vals, state, n, chunk, dtype)
    _STATE.shared_s += time.perf_counter() - t0
    xs = []
    for site in fit.fitted:
        u = fused_vals[site.input]
        xs.append(design(site.kind, u, state[site.weight].shape, site.conv).float())
    x = torch.cat(xs, 1)
    if st.bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    p = torch.linalg.pinv(x)
    a = [target_rows(v, fit.dim).float() for v in member_vals]
    _STATE.fits[fit.target] = (x, p, a)
    return st


def _scipy_assignment(cost, dtype=None, **_):
    """scipy's ``linear_sum_assignment`` with our result type (one problem or a batch)."""
    c = torch.as_tensor(cost).double().numpy()
    if c.ndim == 2:
        r, k = scipy.optimize.linear_sum_assignment(c)
        return AssignmentResult(torch.as_tensor(r), torch.as_tensor(k), float(c[r, k].sum()), None, None, False)
    rows, cols, tot = [], [], []
    for m in c:
        r, k = scipy.optimize.linear_sum_assignment(m)
        rows.append(torch.as_tensor(r))
        cols.append(torch.as_tensor(k))
        tot.append(float(m[r, k].sum()))
    return AssignmentResult(rows, cols, np.asarray(tot), None, None, True)


def _sklearn_kmeans(points, weights, n, *, n_restarts, init, seed):
    """scikit-learn ``KMeans(n_init=10)`` on activation vectors (given as ``("vectors", (D, m))``); our Gram
    k-means otherwise (residual streams grouped on activations: shared code)."""
    if not isinstance(points, tuple):
        return _ours_kmeans(points, weights, n, n_restarts=n_restarts, init=init, seed=seed)
    from sklearn.cluster import KMeans

    v = points[1].numpy()
    km = KMeans(n_clusters=n, n_init=10, random_state=seed).fit(v, sample_weight=weights.double().numpy())
    return torch.as_tensor(km.labels_).long(), float(km.inertia_)


_ours_kmeans = grouping.kmeans_labels
_ours_pair_cost = driver.pair_cost


def _pair_cost(parts, s0, s1, cost="l2"):
    return parts if isinstance(parts, torch.Tensor) else _ours_pair_cost(parts, s0, s1, cost)


def _pair_loop_cost(x, w0, w1, a0, a1, s0, s1) -> torch.Tensor:
    """The authors' HF cost: for 8 x 8 blocks of pairs, materialise the (m, 8, 8, R) predictions of the weighted
    mean weights and the L2 distances to both members' targets. w: (p, n, R), a: (m, n, R)."""
    n0, n1 = w0.shape[1], w1.shape[1]
    out = torch.empty(n0, n1, dtype=torch.float64)
    for i0 in range(0, n0, 8):
        for j0 in range(0, n1, 8):
            si, sj = s0[i0 : i0 + 8].float(), s1[j0 : j0 + 8].float()
            tot = si[:, None] + sj[None, :]
            comb = si[None, :, None, None] * w0[:, i0 : i0 + 8, None]
            comb = comb + sj[None, None, :, None] * w1[:, None, j0 : j0 + 8]
            comb = comb / tot[None, :, :, None]
            pred = torch.einsum("mp,pijr->mijr", x, comb)
            d0 = (pred - a0[:, i0 : i0 + 8, None]).square().sum((0, 3)).sqrt()
            d1 = (pred - a1[:, None, j0 : j0 + 8]).square().sum((0, 3)).sqrt()
            out[i0 : i0 + 8, j0 : j0 + 8] = (si[:, None] * d0 + sj[None, :] * d1).double()
    return out


class AuthorsInterp(driver._Interp):
    """The driver with the authors' statistics, costs, assignment and k-means (see the module docstring)."""

    def ls_ingredients(self, ts, step, stats, cache):
        t0 = time.perf_counter()
        parts, points = {}, {}
        groups = [self.graph.groups[g] for g in ts]
        pairwise = self.method == "hf" or len(ts) > 1 or any(g.unit_size > 1 for g in groups)
        for f in step.fits:
            if not any(s.group in ts for s in f.segments):
                continue
            x, p, a = _STATE.fits[f.target]
            w = [p @ ak for ak in a]
            for seg in f.segments:
                if seg.group not in ts:
                    continue
                idx = fitting.columns(self.graph, seg)
                g = seg.group
                if pairwise:
                    wv, av = [wk[:, idx] for wk in w], [ak[:, idx] for ak in a]
                    pk = [_pair_loop_cost(x, wv[0], wv[k], av[0], av[k], self.weights[g][0], self.weights[g][k])
                          for k in range(1, self.k)]  # fmt: skip
                    parts[g] = pk if g not in parts else [u + v for u, v in zip(parts[g], pk)]
                else:
                    vec = torch.cat([ak[:, idx].permute(1, 0, 2).reshape(idx.shape[0], -1) for ak in a])
                    points[g] = ("vectors", vec if g not in points else torch.cat([points[g][1], vec], 1))
        self.times["solve_s"] += time.perf_counter() - t0
        return parts, points


def authors_run(members, graph, data, config):
    """One fusion through :class:`AuthorsInterp` (patched engines restored afterwards); (model, seconds)."""
    _STATE.fits.clear()
    _STATE.shared_s = 0.0
    patches = [
        (driver, "_fit_statistics", _authors_fit_statistics),
        (driver, "pair_cost", _pair_cost),
        (grouping, "linear_assignment", _scipy_assignment),
        (grouping, "kmeans_labels", _sklearn_kmeans),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        t0 = time.perf_counter()
        fused = AuthorsInterp(members, graph, [0.5, 0.5], data, config).run()
        dt = time.perf_counter() - t0 - _STATE.shared_s
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        _STATE.fits.clear()
    return fused, dt


def ours_run(members, graph, data, config):
    t0 = time.perf_counter()
    fused = driver._Interp(members, graph, [0.5, 0.5], data, config).run()
    return fused, time.perf_counter() - t0


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
    return float((logits.argmax(-1) == y).float().mean())


def _pairs(args):
    """(name, members, calibration x, y, test x, y) of every model pair."""
    out = []
    torch.manual_seed(0)
    if "vgg" not in args.pairs:
        pass
    elif args.quick:
        widths, hidden, side, samples = (4, "M", 8, "M"), 16, 12, 64
        x, y = torch.randn(samples, 1, side, side), torch.randint(0, 10, (samples,))
        vgg_members = [vgg(widths, in_channels=1, num_classes=10, image_size=side, hidden=hidden).eval() for _ in "ab"]
        out.append((f"VGG {widths} + BN, random init", vgg_members, x, y, x, y))
    else:
        from pyfusion.data import load_mnist

        widths, hidden, side = (16, "M", 32, "M"), 64, 28
        xs, ys = load_mnist(os.path.join(args.data, "mnist"), "train")
        x = xs[: args.samples].float()
        y = ys[: args.samples]
        members = []
        for s in range(2):
            torch.manual_seed(s)
            m = vgg(widths, in_channels=1, num_classes=10, image_size=side, hidden=hidden).eval()
            train(m, [(x[i : i + 64], y[i : i + 64]) for i in range(0, x.shape[0], 64)], epochs=2, lr=1e-3)
            members.append(m.eval())
        out.append((f"VGG {widths} + BN (MNIST, 2 epochs on the calibration set)", members, x, y, x, y))
    from zoo import get_case

    for arch in [a for a in ("resnet", "vit") if a in args.pairs]:
        name = f"digits/{arch}/iid/K2/tiny" if args.quick else f"mnist/{arch}/iid/K2"
        case = get_case(name, verbose=True)
        n = 64 if args.quick else args.samples
        out.append((f"zoo {name}", case.members, case.calib[0][:n], case.calib[1][:n], *case.test))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for the smoke test")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
    ap.add_argument("--out", help="Markdown file (default: bench/results/interp_time.md; quick: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads for both sides")
    ap.add_argument("--pairs", default="vgg,resnet,vit", help="comma-separated subset of vgg, resnet, vit")
    args = ap.parse_args()
    args.pairs = args.pairs.split(",")
    torch.set_num_threads(args.threads)
    report = Report("Neuron-interpolation fusion time: ours vs the authors' approach", quick=args.quick)
    rows = []
    for name, members, x, y, xt, yt in _pairs(args):
        data = [(x[i : i + 250], y[i : i + 250]) for i in range(0, x.shape[0], 250)]
        graph = trace_groups(members[0], x[:8])
        for method, cls in (("hf", HFConfig), ("kf", KFConfig)):
            cfg = cls(n_restarts=10)
            # warm-up on one batch: the first call of a process exports the program for its chunk size and loads
            # the kernels (about 1.2 s, measured in quick mode), which is not fusion time
            ours_run(members, graph, data[:1], cfg)
            authors_run(members, graph, data[:1], cfg)
            t_ours, t_auth = [], []
            for _ in range(args.repeats):
                ours, dt = ours_run(members, graph, data, cfg)
                t_ours.append(dt)
                auth, dt = authors_run(members, graph, data, cfg)
                t_auth.append(dt)
            a_o, a_a = _accuracy(ours.eval(), xt, yt), _accuracy(auth.eval(), xt, yt)
            rows.append((name, method, min(t_auth), min(t_ours), min(t_auth) / min(t_ours), a_a, a_o))
            print(rows[-1], flush=True)
    report.text(
        f"torch threads {args.threads}; other jobs shared the cores (load average above): treat the times as upper "
        "bounds, the ratio as indicative. Calibration: "
        f"{64 if args.quick else args.samples} samples; best of {args.repeats} run(s); uniform importance; both "
        "sides run the same driver on the same levels (module docstring of bench/bench_interp.py: what is swapped, "
        "what is shared). Accuracy: VGG on its calibration samples (a sanity check), zoo pairs on the test set.",
    )
    report.table(
        "methods",
        ["pair", "method", "authors' approach (s)", "ours (s)", "speed-up", "acc. authors", "acc. ours"],
        [list(r) for r in rows],
        formats={"authors' approach (s)": ".3f", "ours (s)": ".3f", "speed-up": "{:.1f}x".format,
                 "acc. authors": ".4f", "acc. ours": ".4f"},
    )  # fmt: skip
    print(report.markdown())
    report.write(output_path(args.out, "interp_time.md", args.quick))


if __name__ == "__main__":
    main()
