"""Weighted k-means with randomized-Ward starts (csrc/cluster, pyfusion.ops.weighted_kmeans).

Checked against scikit-learn's KMeans (quality), scipy's Ward linkage (the agglomeration), the float64
numpy reference (the whole pipeline with top_k = 1) and direct computations from the points.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, ward
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_limits

from pyfusion import _ext
from pyfusion.ops import ClusterResult, weighted_kmeans
from pyfusion.ops.cluster import DISPATCHER as DISPATCH
from pyfusion.ops.cluster import OP
from pyfusion.ops.reference import weighted_kmeans_ref

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=f"compiled extension missing: {_ext.EXT_SKIP_REASON}")


def _direct_inertia(x: np.ndarray, w: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(labels):
        m = labels == c
        mu = np.average(x[m], axis=0, weights=w[m])
        total += float(w[m] @ ((x[m] - mu) ** 2).sum(1))
    return total


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the clusters."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _problem(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    d, f = int(rng.integers(25, 70)), int(rng.integers(2, 10))
    k = int(rng.integers(3, 12))
    if kind == "blobs":
        x, _ = make_blobs(d, n_features=f, centers=k, cluster_std=float(rng.uniform(0.8, 3.0)), random_state=seed)
    elif kind == "normal":
        x = rng.normal(size=(d, f))
    else:  # skewed, heavy-ish tails
        x = rng.uniform(size=(d, f)) ** 3
    return x, rng.uniform(0.2, 3.0, d), k


@needs_ext
@pytest.mark.parametrize("kind", ["blobs", "normal", "skewed"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_never_worse_than_sklearn(kind, seed):
    x, w, k = _problem(kind, seed)
    restarts = 10
    ours = weighted_kmeans(x, weights=w, num_clusters=k, n_restarts=restarts, seed=seed)
    with threadpool_limits(limits=1):  # scikit-learn's OpenMP threads crawl on a loaded 2-core machine
        sk = KMeans(k, n_init=restarts, random_state=seed).fit(x, sample_weight=w)
    assert ours.inertia <= sk.inertia_ * (1 + 1e-9), (ours.inertia, sk.inertia_)
    assert ours.inertia == pytest.approx(_direct_inertia(x, w, ours.labels), rel=1e-12)


@needs_ext
def test_matches_reference_with_greedy_ward():
    # top_k = 1 makes the Ward stage deterministic: the C++ engine must then give the reference's answer.
    for seed in range(3):
        x, w, k = _problem("normal", 10 + seed)
        for refine in ("lloyd", "hartigan"):
            res = weighted_kmeans(x, weights=w, num_clusters=k, n_restarts=1, top_k=1, refine=refine)
            labels, inertia = weighted_kmeans_ref(x, weights=w, num_clusters=k, refine=refine)
            np.testing.assert_array_equal(res.labels, labels)
            assert res.inertia == pytest.approx(inertia, rel=1e-10)
        res = weighted_kmeans(gram=x @ x.T, weights=w, num_clusters=k, n_restarts=1, top_k=1, max_iter=0)
        labels, _ = weighted_kmeans_ref(gram=x @ x.T, weights=w, num_clusters=k, max_iter=0)
        np.testing.assert_array_equal(res.labels, labels)


def test_reference_ward_is_scipy_ward(rng):
    x = rng.normal(size=(30, 4))
    for k in (2, 5, 11):
        labels, _ = weighted_kmeans_ref(x, num_clusters=k, max_iter=0)
        assert _same_partition(labels, fcluster(ward(x), k, "maxclust"))


@needs_ext
def test_weighted_ward_equals_ward_on_duplicated_points(rng):
    # Integer weight m on a point is the same as m copies of it for Ward (the copies merge first at cost 0).
    x = rng.normal(size=(25, 3))
    mult = rng.integers(1, 4, size=25)
    dup = np.repeat(x, mult, axis=0)
    origin = np.repeat(np.arange(25), mult)
    for k in (3, 7):
        res = weighted_kmeans(x, weights=mult.astype(float), num_clusters=k, n_restarts=1, top_k=1, max_iter=0)
        scipy_labels = fcluster(ward(dup), k, "maxclust")
        first = np.array([scipy_labels[np.flatnonzero(origin == i)[0]] for i in range(25)])
        assert _same_partition(res.labels, first)


@needs_ext
def test_gram_form_equals_feature_form(rng):
    x = rng.normal(size=(50, 300)) + 2.0  # offset: the uncentred Gram has a large common part
    w = rng.uniform(0.5, 2.0, 50)
    a = weighted_kmeans(x, weights=w, num_clusters=9, n_restarts=30, seed=4)
    b = weighted_kmeans(gram=x @ x.T, weights=w, num_clusters=9, n_restarts=30, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.inertia == pytest.approx(a.inertia, rel=1e-9)
    assert b.centroids is None and a.centroids.shape == (9, 300)
    np.testing.assert_allclose(a.cluster_weights, b.cluster_weights)


@needs_ext
def test_deterministic_and_thread_independent():
    x, w, k = _problem("normal", 7)
    runs = [_ext._C.weighted_kmeans(x, False, w, k, 40, "ward", 5, 100, "hartigan", 123, t) for t in (1, 2, 3)]
    for labels, inertia, best, per_restart in runs[1:]:
        np.testing.assert_array_equal(labels, runs[0][0])
        assert inertia == runs[0][1] and best == runs[0][2]
        np.testing.assert_array_equal(per_restart, runs[0][3])  # every restart, bit for bit
    other = _ext._C.weighted_kmeans(x, False, w, k, 40, "ward", 5, 100, "hartigan", 124, 2)
    assert not np.array_equal(other[3], runs[0][3])  # the seed matters
    # The randomized Ward really explores: restarts differ.
    assert np.unique(runs[0][3]).size > 1
    for init in ("ward", "kmeans++"):
        a = weighted_kmeans(x, weights=w, num_clusters=k, n_restarts=15, init=init, seed=5, num_threads=1)
        b = weighted_kmeans(x, weights=w, num_clusters=k, n_restarts=15, init=init, seed=5, num_threads=2)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.inertia == b.inertia


@needs_ext
def test_hartigan_never_worse_than_lloyd_per_restart():
    # Same seed: the same starts; Hartigan moves only lower the inertia of Lloyd's fixed point.
    x, w, k = _problem("skewed", 3)
    for init in ("ward", "kmeans++"):
        lloyd = _ext._C.weighted_kmeans(x, False, w, k, 25, init, 5, 100, "lloyd", 9, 2)[3]
        hart = _ext._C.weighted_kmeans(x, False, w, k, 25, init, 5, 100, "hartigan", 9, 2)[3]
        assert np.all(hart <= lloyd * (1 + 1e-12))
        assert np.any(hart < lloyd * (1 - 1e-9))


@needs_ext
def test_recovers_separated_weighted_blobs(rng):
    centers = rng.normal(scale=20.0, size=(6, 4))
    truth = rng.permutation(np.repeat(np.arange(6), [1, 3, 5, 8, 12, 20]))
    x = centers[truth] + rng.normal(scale=0.3, size=(truth.size, 4))
    w = rng.uniform(0.1, 10.0, truth.size)
    for init in ("ward", "kmeans++"):
        res = weighted_kmeans(x, weights=w, num_clusters=6, n_restarts=20, init=init, seed=1)
        assert _same_partition(res.labels, truth)
        for c in range(6):
            m = res.labels == c
            np.testing.assert_allclose(res.centroids[c], np.average(x[m], axis=0, weights=w[m]), rtol=1e-12)
            assert res.cluster_weights[c] == pytest.approx(w[m].sum())


@needs_ext
def test_edge_cases_k_equals_d_and_one(rng):
    x = rng.normal(size=(12, 3))
    w = rng.uniform(0.5, 2.0, 12)
    res = weighted_kmeans(x, weights=w, num_clusters=12, n_restarts=3)
    np.testing.assert_array_equal(res.labels, np.arange(12))
    assert res.inertia < 1e-25  # (w x) / w is x up to one rounding
    np.testing.assert_allclose(res.centroids, x)
    g = weighted_kmeans(gram=x @ x.T, weights=w, num_clusters=12, n_restarts=3)
    assert g.inertia < 1e-12
    one = weighted_kmeans(x, weights=w, num_clusters=1, n_restarts=3)
    assert np.all(one.labels == 0)
    mean = np.average(x, axis=0, weights=w)
    assert one.inertia == pytest.approx(float(w @ ((x - mean) ** 2).sum(1)), rel=1e-12)
    single = weighted_kmeans(x[:1], num_clusters=1, n_restarts=2)
    assert single.labels.tolist() == [0] and single.inertia == 0.0
    # Duplicated points and k > number of distinct points is still a valid partition.
    dup = np.repeat(x[:3], 4, axis=0)
    for init in ("ward", "kmeans++"):
        r = weighted_kmeans(dup, num_clusters=5, n_restarts=4, init=init)
        assert np.unique(r.labels).size == 5 and r.inertia == pytest.approx(0.0, abs=1e-12)


@needs_ext
def test_torch_input_and_opcheck(rng):
    x = rng.normal(size=(20, 5))
    t = torch.tensor(x, dtype=torch.float32)
    res = weighted_kmeans(t, num_clusters=4, n_restarts=5)
    assert isinstance(res, ClusterResult) and isinstance(res.labels, torch.Tensor)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (20,)
    ref = weighted_kmeans(t.double().numpy(), num_clusters=4, n_restarts=5)  # float32 is upcast exactly
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels)
    args = (torch.tensor(x), torch.ones(20, dtype=torch.float64), False, 4, 3, "ward", 5, 100, "hartigan", 0, 0)
    torch.library.opcheck(OP.op().default, args)


def test_forced_reference_backend(monkeypatch, rng):
    x = rng.normal(size=(20, 3))
    monkeypatch.setenv("PYFUSION_BACKEND", "weighted_kmeans:reference")
    res = weighted_kmeans(x, num_clusters=4, n_restarts=2)
    labels, inertia = weighted_kmeans_ref(x, num_clusters=4)
    np.testing.assert_array_equal(res.labels, labels)
    assert res.inertia == pytest.approx(inertia, rel=1e-12)
    assert "reference" in DISPATCH.explain(x, np.ones(20), False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_clusters=11), r"num_clusters must be in \[1, D = 10\]; got 11"),
        (dict(num_clusters=0), r"num_clusters must be in \[1, D = 10\]; got 0"),
        (dict(num_clusters=2, weights=-np.ones(10)), r"weights must be finite and > 0"),
        (dict(num_clusters=2, weights=np.ones(9)), r"weights must have shape \(10,\); got \(9,\)"),
        (dict(num_clusters=2, init="random"), r"init must be one of"),
        (dict(num_clusters=2, refine="elkan"), r"refine must be one of"),
        (dict(num_clusters=2, top_k=0), r"top_k must be an integer >= 1; got 0"),
        (dict(num_clusters=2, n_restarts=0), r"n_restarts must be an integer >= 1; got 0"),
        (dict(num_clusters=2, max_iter=-1), r"max_iter must be an integer >= 0; got -1"),
        (dict(num_clusters=2, seed=-3), r"seed must be an integer in \[0, 2\^63\)"),
        (dict(num_clusters=2, num_threads=0), r"num_threads must be None or an integer >= 1"),
    ],
)
def test_errors_points(kwargs, match):
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=match):
        weighted_kmeans(x, **kwargs)


def test_errors_inputs():
    x = np.random.default_rng(0).normal(size=(10, 3))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="points contains NaN or inf"):
        weighted_kmeans(bad, num_clusters=2)
    with pytest.raises(ValueError, match="exactly one of points"):
        weighted_kmeans(x, gram=x @ x.T, num_clusters=2)
    with pytest.raises(ValueError, match="exactly one of points"):
        weighted_kmeans(num_clusters=2)
    with pytest.raises(ValueError, match=r"gram must be square \(D, D\); got shape \(10, 3\)"):
        weighted_kmeans(gram=x, num_clusters=2)
    g = x @ x.T
    g[0, 1] += 1.0
    with pytest.raises(ValueError, match="gram must be symmetric"):
        weighted_kmeans(gram=g, num_clusters=2)
    with pytest.raises(ValueError, match=r"points must be 2-D \(\(D, F\)\); got shape \(10,\)"):
        weighted_kmeans(x[:, 0], num_clusters=2)
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_kmeans(x, weights=np.full(10, np.inf), num_clusters=2)
    with pytest.raises(ValueError, match="must hold real numbers"):
        weighted_kmeans(x.astype(complex), num_clusters=2)
    before = x.copy()
    with pytest.raises(ValueError):
        weighted_kmeans(x, num_clusters=20)
    np.testing.assert_array_equal(x, before)  # bad input changes nothing


@needs_ext
def test_engine_checks_its_own_inputs():
    # The C++ core validates too (it is reachable without the Python wrapper).
    x = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, D = 6\]; got 7"):
        _ext._C.weighted_kmeans(x, False, np.ones(6), 7, 1, "ward", 5, 10, "lloyd", 0, 1)
    with pytest.raises(ValueError, match="weights must be finite and > 0; weights\\[2\\]"):
        _ext._C.weighted_kmeans(x, False, np.array([1, 1, 0, 1, 1, 1.0]), 2, 1, "ward", 5, 10, "lloyd", 0, 1)
    with pytest.raises(ValueError, match="gram must be square"):
        _ext._C.weighted_kmeans(x, True, np.ones(6), 2, 1, "ward", 5, 10, "lloyd", 0, 1)
    with pytest.raises(ValueError, match="init must be 'ward' or 'kmeans\\+\\+'"):
        _ext._C.weighted_kmeans(x, False, np.ones(6), 2, 1, "pp", 5, 10, "lloyd", 0, 1)
