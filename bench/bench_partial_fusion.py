"""Fusion time of pyfusion's partial fusion and clustering against a direct reimplementation of the reference.

1. Partial fusion of a VGG11-sized pair (widths 64-128-256-256-512-512-512-512, 3x3 convs without bias or BN,
   max pools, 32x32 inputs, a 512 -> 10 classifier; random weights) and of an MLP-1024 pair (784-1024-1024-1024-10,
   no bias), weight features, alpha in {.25, .5, .75}, lambda .5. Reference (Morelli & Eckstein's
   ``PartialFusion``, papers.md A.3-A.5): per layer, features =
   incoming weights with A's input side mapped through the previous backward kernel (fused inputs only),
   ``ot.dist`` squared Euclidean, POT ``ot.emd`` on the sink-augmented (n+1) x (n+1) problem with the mass
   vectors ``[(1-s)/n]*n + [s]``, ``s = alpha / (1 + alpha)``, sink-sink cost max(C)+1, kernels from the coupling,
   and the dense [fused | isoA | isoB] block assembly (float64), written competently: every kernel product is one
   BLAS matrix product on the weights reshaped to matrices (the bench's former reference contracted conv weights
   with ``np.einsum`` ellipsis subscripts, which numpy does without BLAS). pyfusion: the whole
   ``pyfusion.fuse(method="partial", features="weights")`` call (tracing, features, partial assignments, build,
   swap to PartialConv2d / PartialLinear). The two fused networks must give the same logits to 1e-12 (relative
   to the largest logit; the script stops otherwise). Times: median of ``--repeats`` interleaved runs;
   ``pyfusion.fuse s`` fuses members fused before (the per-member caches of their FLOP count and finite check
   warm, as in an alpha sweep or a budget search), ``first fusion of the members s`` with those caches emptied.
2. Clustering of one group of 2 x n neurons (activation features: N samples), k = n (1 + alpha) clusters, R
   restarts. Reference: the paper's ``StochHierarchical`` made direct: per restart, randomized Ward in Python /
   numpy (Lance-Williams updates, one of the top-5 cheapest pairs sampled with softmax-like probabilities), then
   scikit-learn ``KMeans(init=centroids, n_init=1)`` refinement with sample weights; best inertia kept. The
   reference's time per restart is measured on a few restarts and multiplied by R (it is a fixed amount of work
   per restart). pyfusion: :func:`pyfusion.ops.weighted_kmeans` from the Gram matrix with R restarts.

Writes bench/results/partial_fusion_time.md. ``--quick``: smaller widths and fewer restarts (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import ot
import torch
from common import Report, output_path
from torch import nn

import pyfusion

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg11(widths, seed: int, side: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.ReLU()]
            c = w
    layers += [nn.Flatten(), nn.Linear(c * side * side, 10, bias=False)]
    return nn.Sequential(*layers).double().eval()


def mlp1024(seed: int, width: int = 1024, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    c = 784
    for _ in range(depth):
        layers += [nn.Linear(c, width, bias=False), nn.ReLU()]
        c = width
    layers.append(nn.Linear(c, 10, bias=False))
    return nn.Sequential(*layers).double().eval()


def _map_in(w: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``einsum("oi...,if->of...", w, k)`` as one matrix product: w (o, i, *s), k (i, f) -> (o, f, *s)."""
    wm = np.moveaxis(w, 1, -1)
    out = wm.reshape(-1, w.shape[1]) @ k
    return np.moveaxis(out.reshape(*wm.shape[:-1], k.shape[1]), -1, 1)


def _map_out(k: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``einsum("fa,a...->f...", k, w)`` as one matrix product: k (f, a), w (a, ...) -> (f, ...)."""
    return (k @ w.reshape(w.shape[0], -1)).reshape(k.shape[0], *w.shape[1:])


# ---------------------------------------------------------------------------------------------------------
# the reference partial fusion (two members, dense)
# ---------------------------------------------------------------------------------------------------------


def _sink_ot(c: np.ndarray, alpha: float) -> np.ndarray:
    n_a, n_b = c.shape
    s = alpha / (1 + alpha)
    a = np.r_[np.full(n_a, (1 - s) / n_a), s]
    b = np.r_[np.full(n_b, (1 - s) / n_b), s]
    cs = np.zeros((n_a + 1, n_b + 1))
    cs[:n_a, :n_b] = c
    cs[n_a, n_b] = c.max() + 1
    return ot.emd(a, b, cs)


def reference_partial_fusion(ma: nn.Sequential, mb: nn.Sequential, alpha: float, la: float = 0.5) -> nn.Sequential:
    lb = 1 - la
    layers_a = [m for m in ma if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers_b = [m for m in mb if isinstance(m, (nn.Conv2d, nn.Linear))]
    fused_w = []
    prev = None  # (fa, fb, ia, ib, k_back) of the previous layer (k_back: |fa| x |fb|)
    for li, (la_mod, lb_mod) in enumerate(zip(layers_a, layers_b)):
        wa = la_mod.weight.detach().numpy()
        wb = lb_mod.weight.detach().numpy()
        last = li == len(layers_a) - 1
        if wa.ndim == 2 and prev is not None and wa.shape[1] != layers_a[li - 1].weight.shape[0]:
            raise ValueError("flatten with spatial positions > 1 is not handled by this reference")
        if prev is None:
            xa, xb = wa, wb  # first layer: the raw inputs
        else:
            fa_in, fb_in, _, _, k_back = prev
            # A's rows on its fused inputs, mapped to B's fused order through the backward kernel
            xa = _map_in(wa[:, fa_in], k_back)
            xb = wb[:, fb_in]
        if last:
            n = wa.shape[0]
            fa = fb = np.arange(n)
            ia = ib = np.array([], dtype=np.int64)
            k_for = np.eye(n)
            k_back_out = np.eye(n)
        else:
            c = ot.dist(xa.reshape(len(xa), -1), xb.reshape(len(xb), -1), metric="sqeuclidean")
            p = _sink_ot(c, alpha)
            n_a, n_b = c.shape
            pi = p[:n_a, :n_b]
            mu_f, nu_f = pi.sum(1), pi.sum(0)
            fa, fb = np.flatnonzero(mu_f > 1e-8), np.flatnonzero(nu_f > 1e-8)
            ia = np.flatnonzero(p[:n_a, n_b] > 1e-8)
            ib = np.flatnonzero(p[n_a, :n_b] > 1e-8)
            pf = pi[np.ix_(fa, fb)]
            k_for = (pf / mu_f[fa, None]).T  # fb x fa
            k_back_out = pf / nu_f[None, fb]  # fa x fb
        # dense assembly, input order [fused | isoA | isoB], output order [fused | isoA | isoB]
        if prev is None:
            rows_f = lb * wb[fb] + _map_out(k_for, la * wa[fa])
            blocks = [[rows_f], [wa[ia]], [wb[ib]]]
        else:
            fa_in, fb_in, ia_in, ib_in, k_back = prev

            def cols(w, rows, c_idx, kb=None):
                blk = w[rows][:, c_idx]
                return blk if kb is None else _map_in(blk, kb)

            ff = lb * cols(wb, fb, fb_in) + _map_out(k_for, la * cols(wa, fa, fa_in, k_back))
            fia = _map_out(k_for, la * cols(wa, fa, ia_in))
            fib = lb * cols(wb, fb, ib_in)
            za = np.zeros((len(ia), len(ib_in), *wa.shape[2:]))
            zb = np.zeros((len(ib), len(ia_in), *wa.shape[2:]))
            blocks = [
                [ff, fia, fib],
                [cols(wa, ia, fa_in, k_back), wa[ia][:, ia_in], za],
                [wb[ib][:, fb_in], zb, wb[ib][:, ib_in]],
            ]
        if last:
            blocks = blocks[:1]
        fused_w.append(np.concatenate([np.concatenate(r, 1) for r in blocks], 0))
        prev = (fa, fb, ia, ib, k_back_out)
    out: list[nn.Module] = []
    it = iter(fused_w)
    for m in ma:
        if isinstance(m, nn.Conv2d):
            w = torch.from_numpy(next(it))
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False).double()
            conv.weight.data.copy_(w)
            out.append(conv)
        elif isinstance(m, nn.Linear):
            w = torch.from_numpy(next(it))
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
            lin.weight.data.copy_(w)
            out.append(lin)
        else:
            out.append(type(m)(*([2] if isinstance(m, nn.MaxPool2d) else [])))
    return nn.Sequential(*out).eval()


# ---------------------------------------------------------------------------------------------------------
# the reference clustering (StochHierarchical + sklearn k-means per restart)
# ---------------------------------------------------------------------------------------------------------


def randomized_ward(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator, top_k: int = 5) -> np.ndarray:
    """Weighted Ward agglomeration to k clusters; each merge samples one of the top_k cheapest pairs."""
    d = len(x)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    wt = w.copy()
    dist = 2 * sq * (wt[:, None] * wt[None, :]) / (wt[:, None] + wt[None, :])
    np.fill_diagonal(dist, np.inf)
    alive = np.ones(d, dtype=bool)
    labels = np.arange(d)
    for _ in range(d - k):
        flat = np.where(alive[:, None] & alive[None, :], dist, np.inf)
        iu = np.triu_indices(d, 1)
        vals = flat[iu]
        cand = np.argpartition(vals, min(top_k, len(vals) - 1))[:top_k]
        cand = cand[np.isfinite(vals[cand])]
        cv = vals[cand]
        z = cv - cv.min()
        p = np.exp(-z / (z.mean() if z.mean() > 0 else 1.0))
        pick = cand[rng.choice(len(cand), p=p / p.sum())]
        i, j = iu[0][pick], iu[1][pick]
        # Lance-Williams update for Ward
        wi, wj = wt[i], wt[j]
        new = ((wi + wt) * dist[i] + (wj + wt) * dist[j] - wt * dist[i, j]) / (wi + wj + wt)
        dist[i, :] = dist[:, i] = new
        dist[i, i] = np.inf
        dist[j, :] = dist[:, j] = np.inf
        wt[i] = wi + wj
        alive[j] = False
        labels[labels == j] = i
    _, lab = np.unique(labels, return_inverse=True)
    return lab


def reference_clustering(x: np.ndarray, w: np.ndarray, k: int, restarts: int, seed: int = 0) -> tuple[float, float]:
    """(best inertia, seconds) of ``restarts`` randomized-Ward + sklearn k-means runs."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    best = np.inf
    t0 = time.perf_counter()
    for _ in range(restarts):
        lab = randomized_ward(x, w, k, rng)
        cent = np.stack([(w[lab == c, None] * x[lab == c]).sum(0) / w[lab == c].sum() for c in range(k)])
        km = KMeans(n_clusters=k, init=cent, n_init=1).fit(x, sample_weight=w)
        best = min(best, km.inertia_)
    return best, time.perf_counter() - t0


def _forget_member_caches() -> None:
    """Empty pyfusion's per-member caches (the members' meta-device FLOP count, their finite check): the next fusion
    is timed as a user's first fusion of these members. The other timed calls fuse members already fused (as an alpha
    sweep or a budget search does), where the caches hold."""
    from pyfusion.fuse import fast, validate

    fast._MEMBER_COSTS.clear()
    validate._FINITE.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out", help="Markdown file (default: bench/results/partial_fusion_time.md; quick: a temporary folder)"
    )
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch and BLAS threads for both sides (1: on the shared, loaded 2-core VM, 2 threads made torch's "
        "small reductions 10-100x slower through thread barriers)",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration (median)")
    ap.add_argument("--skip-clustering", action="store_true", help="only the partial-fusion table")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    limits = threadpool_limits(args.threads)  # the reference's numpy / BLAS work gets the same threads
    os.environ.setdefault("TQDM_DISABLE", "1")
    widths = [8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"] if args.quick else VGG11
    width = 64 if args.quick else 1024
    pairs = {
        "VGG11": ((vgg11(widths, 0), vgg11(widths, 1)), torch.randn(4, 3, 32, 32, dtype=torch.float64)),
        f"MLP-{width}": ((mlp1024(0, width), mlp1024(1, width)), torch.randn(4, 784, dtype=torch.float64)),
    }
    repeats = 1 if args.quick else args.repeats
    report = Report("Fusion time: pyfusion vs a direct reimplementation of the reference", quick=args.quick)
    report.text(
        f"torch and BLAS threads {torch.get_num_threads()} for both sides in the partial-fusion part; clustering: "
        "both sides with their defaults (2 threads); the machine is shared with other jobs: times are noisy."
    )
    report.text(
        "## Partial fusion (weight features, lambda 0.5, float64): pyfusion vs ot.dist + ot.emd + numpy assembly"
    )
    report.text(
        "`pyfusion.fuse s`: members fused before (pyfusion's per-member caches of their FLOP count and finite check "
        "warm, as in an alpha sweep or a budget search); `first fusion of the members s`: those caches emptied first."
    )
    fusion_rows = []
    for pair, ((ma, mb), x) in pairs.items():
        pyfusion.fuse([ma, mb], method="partial", alpha=0.5, features="weights")  # warm-up (imports)
        reference_partial_fusion(ma, mb, 0.5)
        for alpha in (0.25, 0.5, 0.75):  # alpha * n integer for every width: no mass splitting
            rs, os_, stages, cold = [], [], [], []
            for _ in range(repeats):  # interleaved: load swings hit both sides alike
                t0 = time.perf_counter()
                ref = reference_partial_fusion(ma, mb, alpha)
                rs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ours = pyfusion.fuse([ma, mb], method="partial", alpha=alpha, features="weights")
                os_.append(time.perf_counter() - t0)
                inf = ours.fusion_info
                swap = os_[-1] - inf["time_method_s"] - inf["time_build_s"] - inf["time_graph_s"]
                stages.append((inf["time_graph_s"], inf["time_method_s"], inf["time_build_s"], swap))
                _forget_member_caches()  # a first fusion of these members: their FLOP count and finite check
                t0 = time.perf_counter()
                pyfusion.fuse([ma, mb], method="partial", alpha=alpha, features="weights")
                cold.append(time.perf_counter() - t0)
            with torch.no_grad():
                want, got = ref(x), ours.eval()(x)
            diff = float((want - got).abs().max())
            rel = diff / float(want.abs().max())
            if rel > 1e-12:
                raise SystemExit(f"{pair} alpha {alpha}: logits differ by {diff:.2e} ({rel:.1e} relative)")
            r, o, oc = float(np.median(rs)), float(np.median(os_)), float(np.median(cold))
            st = [float(np.median([s_[i] for s_ in stages])) for i in range(4)]
            fusion_rows.append([pair, alpha, r, o, *st, r / o, oc, r / oc, diff, rel])
            print(fusion_rows[-1], flush=True)
    report.table(
        "partial_fusion",
        ["pair", "alpha", "reference (ot.emd + numpy assembly) s", "pyfusion.fuse s", "trace s", "matching s",
         "build s", "swap s", "speed-up", "first fusion of the members s", "speed-up (first)",
         "max abs diff of logits", "relative"],
        fusion_rows,
        formats={"alpha": "g", "reference (ot.emd + numpy assembly) s": ".3f", "pyfusion.fuse s": ".3f",
                 "trace s": ".3f", "matching s": ".3f", "build s": ".3f", "swap s": ".3f",
                 "speed-up": "{:.2f}x".format, "first fusion of the members s": ".3f",
                 "speed-up (first)": "{:.2f}x".format, "max abs diff of logits": ".1e", "relative": ".1e"},
    )  # fmt: skip
    limits.restore_original_limits()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.skip_clustering:
        report.write(output_path(args.out, "partial_fusion_time.md", args.quick))
        return
    report.text("## Clustering one group (2 x n neurons, activation features), k = n (1 + alpha)")
    from pyfusion.ops import weighted_kmeans

    cluster_rows = []
    cases = [(32, 256, 0.5, 50)] if args.quick else [(100, 2000, 0.5, 1000), (256, 1000, 0.5, 1000)]
    for n, samples, alpha, restarts in cases:
        rng = np.random.default_rng(0)
        base = rng.standard_normal((n, samples))
        pts = np.concatenate([base + 0.7 * rng.standard_normal((n, samples)), rng.standard_normal((n, samples))])
        pts = np.maximum(pts, 0) / np.linalg.norm(np.maximum(pts, 0))
        w = np.full(2 * n, 0.5)
        k = int(n * (1 + alpha))
        measured = 3 if args.quick else 5
        ref_inertia, ref_s = reference_clustering(pts, w, k, measured)
        ref_total = ref_s / measured * restarts
        gram = torch.from_numpy(pts @ pts.T)
        t0 = time.perf_counter()
        res = weighted_kmeans(gram=gram, weights=torch.from_numpy(w), num_clusters=k, n_restarts=restarts, seed=0)
        ours_s = time.perf_counter() - t0
        cluster_rows.append(
            [n, samples, k, restarts, ref_total, ref_s / measured, ours_s, ref_total / ours_s, ref_inertia, measured,
             res.inertia]
        )  # fmt: skip
        print(cluster_rows[-1], flush=True)
    report.table(
        "clustering",
        ["n", "samples", "k", "restarts", "reference s (extrapolated)", "reference s per restart", "pyfusion s",
         "speed-up", "inertia ref", "ref restarts measured", "inertia pyfusion"],
        cluster_rows,
        formats={"reference s (extrapolated)": ".1f", "reference s per restart": ".3f", "pyfusion s": ".2f",
                 "speed-up": "{:.0f}x".format, "inertia ref": ".6g", "inertia pyfusion": ".6g"},
    )  # fmt: skip
    report.write(output_path(args.out, "partial_fusion_time.md", args.quick))
    print(report.markdown())


if __name__ == "__main__":
    main()
