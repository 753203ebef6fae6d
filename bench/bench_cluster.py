"""Benchmark: the clustering of generalized pruning, pyfusion's C++ engine against the reference approach.

Problem (the paper's ensemble pruning of one hidden layer): two members with 100 neurons each, so
D = 200 points, clustered to k = n (1 + alpha) = 150 slots (alpha = 0.5), member weights lambda = 0.5.
Features: the neurons' GELU activations on F = 1000 samples (members share a latent code, so neurons of
the two members pair up, with noise), divided by the global Frobenius norm as in the reference.

Contenders, all at 1000 restarts:
* pyfusion ``weighted_kmeans`` (randomized Ward top_k = 5 + Lloyd + Hartigan), from the features and from
  the Gram matrix, 1 and 2 OpenMP threads;
* the reference approach (Morelli & Eckstein's ``StochHierarchical``), reimplemented directly: a Python
  loop of randomized-Ward merges in numpy (row-minimum cache, Lance-Williams updates), then
  ``sklearn.cluster.KMeans(init=centroids, n_init=1, max_iter=1000, tol=1e-5)`` per restart;
* ``sklearn.cluster.KMeans(n_init=1000)`` (k-means++ starts).
The two scikit-learn contenders are timed on fewer restarts (default 50) and extrapolated linearly to
1000 (restarts are independent, so time is linear in their number); the table says so. scikit-learn
runs with 1 thread (threadpoolctl) for the per-thread comparison; the reference ran its restarts with
joblib, which on this machine could at best divide its time by the number of cores.

Usage: python bench/bench_cluster.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import Report, output_path  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from pyfusion import _ext  # noqa: E402
from pyfusion.ops import weighted_kmeans  # noqa: E402


def make_features(rng: np.random.Generator, n: int, samples: int, latent: int = 64) -> np.ndarray:
    """(2n, samples) GELU activations of two members whose neurons are noisy permuted copies."""
    from scipy.special import erf

    z = rng.standard_normal((samples, latent))
    m = rng.standard_normal((latent, n)) / np.sqrt(latent)
    mb = m[:, rng.permutation(n)] + 0.5 * rng.standard_normal((latent, n)) / np.sqrt(latent)
    pre = np.concatenate([z @ m, z @ mb], axis=1)
    act = 0.5 * pre * (1.0 + erf(pre / np.sqrt(2.0)))
    act = act.T
    return np.ascontiguousarray(act / np.linalg.norm(act))


def stoch_ward_labels(d2: np.ndarray, w: np.ndarray, k: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """One randomized-Ward agglomeration in numpy (the reference's algorithm), returns labels."""
    d = d2.shape[0]
    d2 = d2.copy()
    wc = w.astype(np.float64).copy()
    active = np.ones(d, dtype=bool)
    owner = np.arange(d)
    idx = np.arange(d)

    def row(a: int) -> np.ndarray:
        c = np.sqrt(2.0 * wc[a] * wc / (wc[a] + wc) * d2[a])
        c[~active | (idx <= a)] = np.inf
        return c

    rows = np.stack([row(a) for a in range(d)])
    row_min = rows.min(1)
    row_arg = rows.argmin(1)
    for _ in range(d - k):
        valid = np.flatnonzero(np.isfinite(row_min))
        cand = valid[np.argpartition(row_min[valid], top_k - 1)[:top_k]] if valid.size > top_k else valid
        cost = row_min[cand]
        scale = np.mean(cost - cost.min())
        p = np.exp(-(cost - cost.min()) / scale) if scale > 0 else np.ones(cand.size)
        i = int(rng.choice(cand, p=p / p.sum()))
        j = int(row_arg[i])
        i, j = min(i, j), max(i, j)
        wi, wj = wc[i], wc[j]
        wn = wi + wj
        new = np.maximum((wi * d2[i] + wj * d2[j]) / wn - wi * wj * d2[i, j] / wn**2, 0.0)
        d2[i], d2[:, i] = new, new
        wc[i] = wn
        active[j] = False
        owner[owner == j] = i
        row_min[j] = np.inf
        r = row(i)
        row_min[i], row_arg[i] = r.min(), r.argmin()
        dirty = np.flatnonzero(active & ((row_arg == i) | (row_arg == j)) & (idx != i))
        for a in dirty:
            r = row(a)
            row_min[a], row_arg[a] = r.min(), r.argmin()
        # rows above i may now prefer the merged cluster
        lower = np.flatnonzero(active & (idx < i))
        ci = np.sqrt(2.0 * wc[lower] * wn / (wc[lower] + wn) * d2[lower, i])
        better = ci < row_min[lower]
        row_min[lower[better]], row_arg[lower[better]] = ci[better], i
    _, labels = np.unique(owner, return_inverse=True)
    return labels


def reference_restart(x: np.ndarray, d2: np.ndarray, w: np.ndarray, k: int, seed: int) -> float:
    labels = stoch_ward_labels(d2, w, k, 5, np.random.default_rng(seed))
    onehot = np.zeros((x.shape[0], k))
    onehot[np.arange(x.shape[0]), labels] = 1.0
    centroids = (onehot * w[:, None]).T @ x / (w @ onehot)[:, None]
    km = KMeans(k, init=centroids, n_init=1, max_iter=1000, tol=1e-5).fit(x, sample_weight=w)
    return float(km.inertia_)


def timed(fn, *args, **kwargs):
    """(wall seconds, process CPU seconds, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny problem, seconds (keeps the script from rotting)")
    ap.add_argument("--ref-restarts", type=int, default=50, help="restarts actually timed for the sklearn contenders")
    ap.add_argument("--out", help="Markdown file (default: bench/results/cluster_cpu.md; quick: a temporary folder)")
    args = ap.parse_args()
    if not _ext.EXT_AVAILABLE:
        sys.exit(f"the compiled extension is required: {_ext.EXT_SKIP_REASON}")

    n, samples, restarts, ref_restarts = (20, 100, 20, 3) if args.quick else (100, 1000, 1000, args.ref_restarts)
    d = 2 * n
    rng = np.random.default_rng(0)
    x = make_features(rng, n, samples)
    w = np.full(d, 0.5)
    gram = x @ x.T
    ca = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(ca[:, None] + ca[None, :] - 2.0 * gram, 0.0)
    report = Report(
        "Clustering for generalized pruning: pyfusion C++ engine vs the reference approach", quick=args.quick
    )
    report.text(
        "The machine is shared with other jobs (load average above).",
        f"Problem: D = {d} points (2 members x {n} neurons), F = {samples} features (GELU activations, "
        f"Frobenius-normalised), weights 0.5, top_k = 5, k = n (1 + alpha). {'QUICK MODE. ' if args.quick else ''}",
        "Wall = elapsed time; CPU = process CPU time (all threads), less sensitive to other jobs on the machine.",
    )
    summary = []
    for alpha in (0.5,) if args.quick else (0.5, 0.0):
        k = int(round((1 + alpha) * n))
        rows: list[tuple[str, int, str, float, float, float]] = []  # name, restarts, threads, wall, cpu, inertia
        for threads in (1, 2):
            for form in ("points", "gram"):
                kw = {"points": x} if form == "points" else {"gram": gram}
                weighted_kmeans(**kw, weights=w, num_clusters=k, n_restarts=2, num_threads=threads)  # warm-up
                t, c, res = timed(
                    weighted_kmeans, **kw, weights=w, num_clusters=k, n_restarts=restarts, seed=0, num_threads=threads
                )
                rows.append((f"pyfusion weighted_kmeans ({form})", restarts, str(threads), t, c, res.inertia))
        t, c, res = timed(
            weighted_kmeans, x, weights=w, num_clusters=k, n_restarts=restarts, refine="lloyd", seed=0, num_threads=1
        )
        rows.append(("pyfusion weighted_kmeans (points, refine=lloyd)", restarts, "1", t, c, res.inertia))
        with threadpool_limits(limits=1):
            t, c, ref = timed(lambda kk=k: [reference_restart(x, d2, w, kk, s) for s in range(ref_restarts)])
            rows.append(("reference: numpy randomized Ward + sklearn KMeans", ref_restarts, "1", t, c, min(ref)))
            t, c, km = timed(KMeans(k, n_init=ref_restarts, random_state=0).fit, x, sample_weight=w)
            rows.append(("sklearn KMeans (k-means++)", ref_restarts, "1", t, c, float(km.inertia_)))
        per = {(name, th): (wall / r, cpu / r) for name, r, th, wall, cpu, _ in rows}
        ref_w, ref_c = per[("reference: numpy randomized Ward + sklearn KMeans", "1")]
        o1w, o1c = per[("pyfusion weighted_kmeans (points)", "1")]
        o2w, _ = per[("pyfusion weighted_kmeans (points)", "2")]
        report.text(f"## alpha = {alpha}: k = {k} clusters")
        full = f"wall at {restarts} restarts (s)"
        report.table(
            f"alpha{alpha}",
            ["method", "restarts run", "threads", "wall (s)", "CPU (s)", full, "extrapolated", "best inertia"],
            [[nm, r, th, wall, cpu, wall / r * restarts, r != restarts, inert] for nm, r, th, wall, cpu, inert in rows],
            formats={"wall (s)": ".4f", "CPU (s)": ".4f", full: ".3f", "best inertia": ".7g",
                     "extrapolated": lambda v: "yes" if v else ""},
            align={"threads": "left"},
        )  # fmt: skip
        msg = (
            f"alpha = {alpha}: speed-up at {restarts} restarts over the reference approach (one process, features): "
            f"{ref_w / o1w:.0f}x wall ({ref_c / o1c:.0f}x CPU) with 1 thread, {ref_w / o2w:.0f}x wall with 2 threads "
            f"({ref_w / 2 / o2w:.0f}x against an ideal 2-process joblib run of the reference)."
        )
        report.text(msg)
        summary.append(msg)
    report.text(
        "Notes: the reference and scikit-learn contenders run the restarts shown and are extrapolated "
        "linearly to the full count (restarts are independent); their inertias are the best of the restarts "
        "actually run. scikit-learn and numpy run single-threaded (threadpoolctl). The reference refines with "
        "Lloyd only; pyfusion adds Hartigan moves by default (the refine=lloyd row: without). The pyfusion "
        "(points) rows include the centred Gram matrix computation from the features.",
    )
    report.write(output_path(args.out, "cluster_cpu.md", args.quick))
    print(report.markdown())


if __name__ == "__main__":
    main()
