"""Weighted k-means refined from randomized-Ward starts: the clustering of generalized pruning.

Generalized pruning (Morelli & Eckstein 2026, ``StochHierarchical``) clusters the neurons of a group
(of one network or of the concatenated ensemble) into s clusters, with the neurons as points
(activations on calibration data) weighted by their member's lambda. The objective is the weighted
inertia

    J(c) = sum_i w_i || x_i - mu_{c(i)} ||^2,     mu_c = sum_{i in c} w_i x_i / sum_{i in c} w_i,

minimised by many restarts of: randomized Ward agglomeration (at each merge one of the ``top_k``
cheapest pairs, with probabilities proportional to ``exp(-(c - c_min) / mean(c - c_min))`` on the
Ward distances c), then weighted Lloyd to a fixed point, then (``refine="hartigan"``) single-point
Hartigan moves, each of which strictly lowers J. The best restart wins.

Everything is computed from the Gram matrix ``G = X X^T`` (D, D): ``||x_i - mu_c||^2 = G_ii -
2 T_ic / W_c + P_c / W_c^2`` with ``T_ic = sum_{j in c} w_j G_ij`` and ``P_c = sum_{i in c} w_i T_ic``.
So the activations of many samples never need to be materialised: the statistics engine's Gram
matrices suffice (``gram=``), and with features (``points=``) each Lloyd step costs O(D^2), not O(D k F).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyfusion import _ext
from pyfusion.backends import cpp_reasons
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops._registry import LazyOp
from pyfusion.ops.reference import weighted_kmeans_ref

__all__ = ["DISPATCHER", "OP", "ClusterResult", "weighted_kmeans"]

_INITS = ("ward", "kmeans++")
_REFINES = ("lloyd", "hartigan")


@dataclass(frozen=True)
class ClusterResult:
    """Result of :func:`weighted_kmeans`.

    Attributes:
        labels: (D,) int64 cluster of each point, clusters numbered by first appearance (point 0 is in
            cluster 0). A torch tensor on the input's device for tensor input, else numpy.
        inertia: the weighted inertia J of ``labels`` (float64; from the points directly when given,
            else from the Gram matrix).
        centroids: (k, F) float64 weighted means of the clusters when ``points`` were given, else None.
        cluster_weights: (k,) float64 sum of the weights in each cluster.
    """

    labels: Any
    inertia: float
    centroids: Any
    cluster_weights: Any


_ARG_NAMES = (
    "data", "weights", "is_gram", "num_clusters", "n_restarts", "init", "top_k", "max_iter", "refine", "seed",
    "num_threads",
)  # fmt: skip


def _cpp_supports(data: torch.Tensor, weights: torch.Tensor, is_gram: bool, *_: Any) -> list[str]:
    if not hasattr(_ext._C, "weighted_kmeans"):
        return ["this build of pyfusion._C has no weighted_kmeans (rebuild the extension)"]
    return []


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())


def _results(labels: Any, inertia: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (D,) int64, inertia () float64) on ``like``'s device."""
    return (
        torch.as_tensor(np.asarray(labels, dtype=np.int64), device=like.device),
        torch.tensor(float(inertia), dtype=torch.float64, device=like.device),
    )


def _cpp_impl(
    data: torch.Tensor,
    weights: torch.Tensor,
    is_gram: bool,
    num_clusters: int,
    n_restarts: int,
    init: str,
    top_k: int,
    max_iter: int,
    refine: str,
    seed: int,
    num_threads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    labels, inertia, _, _ = _ext._C.weighted_kmeans(
        _numpy64(data), is_gram, _numpy64(weights), num_clusters, n_restarts, init, top_k, max_iter, refine, seed,
        num_threads,
    )  # fmt: skip
    return _results(labels, inertia, data)


def _ref_impl(
    data: torch.Tensor,
    weights: torch.Tensor,
    is_gram: bool,
    num_clusters: int,
    n_restarts: int,
    init: str,
    top_k: int,
    max_iter: int,
    refine: str,
    seed: int,
    num_threads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _numpy64(data)
    labels, inertia = weighted_kmeans_ref(
        None if is_gram else x,
        gram=x if is_gram else None,
        weights=_numpy64(weights),
        num_clusters=num_clusters,
        n_restarts=n_restarts,
        init=init,
        max_iter=max_iter,
        refine=refine,
        seed=seed,
    )
    return _results(labels, inertia, data)


DISPATCHER = Dispatcher(
    "weighted_kmeans",
    [
        Backend(
            "cpp",
            _cpp_impl,
            available=cpp_reasons,
            supports=_cpp_supports,
            description="C++ engine: randomized Ward + Lloyd/Hartigan in kernel form, OpenMP over restarts",
        ),
        Backend(
            "reference",
            _ref_impl,
            description="float64 numpy: deterministic greedy Ward (one start) or k-means++ restarts",
        ),
    ],
    arg_names=_ARG_NAMES,
)


def _register() -> None:
    @torch.library.custom_op("pyfusion::weighted_kmeans", mutates_args=())
    def _weighted_kmeans_op(
        data: torch.Tensor,
        weights: torch.Tensor,
        is_gram: bool,
        num_clusters: int,
        n_restarts: int,
        init: str,
        top_k: int,
        max_iter: int,
        refine: str,
        seed: int,
        num_threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (D,) int64, inertia () float64) on the input's device; forward only."""
        return DISPATCHER(
            data, weights, is_gram, num_clusters, n_restarts, init, top_k, max_iter, refine, seed, num_threads
        )

    @_weighted_kmeans_op.register_fake
    def _(data, weights, is_gram, num_clusters, n_restarts, init, top_k, max_iter, refine, seed, num_threads):
        torch._check(data.dim() == 2, lambda: f"data must be 2-D; got {data.dim()}-D")
        return (
            data.new_empty((data.shape[0],), dtype=torch.int64),
            data.new_empty((), dtype=torch.float64),
        )


OP = LazyOp("weighted_kmeans", DISPATCHER, _register)


def _as_float64(name: str, value: Any) -> tuple[np.ndarray, Any]:
    """(float64 numpy copy on the CPU, the original tensor or None); rejects non-real dtypes.

    Validation runs in numpy: on a loaded 2-core machine torch's intra-op threads made one
    ``torch.allclose`` on a 200 x 200 matrix take 0.4 s, against microseconds in numpy.
    """
    if isinstance(value, torch.Tensor):
        if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real floating tensor; got dtype {value.dtype}")
        return value.detach().to("cpu", torch.float64).numpy().copy(), value
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64), None


def weighted_kmeans(
    points: Any = None,
    *,
    gram: Any = None,
    weights: Any = None,
    num_clusters: int,
    n_restarts: int = 100,
    init: str = "ward",
    top_k: int = 5,
    max_iter: int = 100,
    refine: str = "hartigan",
    seed: int = 0,
    num_threads: int | None = None,
) -> ClusterResult:
    """Weighted k-means, best of many restarts from randomized Ward (or k-means++) starts.

    Args:
        points: (D, F) features, one row per point (e.g. a neuron's activations over F samples). Give
            exactly one of ``points`` and ``gram``. float32 input is upcast: all work is float64.
        gram: (D, D) symmetric Gram matrix ``X X^T`` of the points (uncentred is fine; it is centred
            with the weights internally, which leaves J unchanged).
        weights: (D,) positive point weights w (default 1).
        num_clusters: k, in [1, D].
        n_restarts: number of restarts (>= 1); restart r draws from its own RNG seeded by (seed, r).
        init: "ward" (randomized Ward; ``top_k = 1`` is plain greedy Ward) or "kmeans++" (weighted greedy
            k-means++).
        top_k: number of cheapest candidate pairs sampled from at each Ward merge (>= 1).
        max_iter: cap on Lloyd iterations, and on Hartigan sweeps (>= 0).
        refine: "hartigan" (Lloyd, then Hartigan single-point moves) or "lloyd" (Lloyd only).
        seed: non-negative seed; the result is the same for any ``num_threads``.
        num_threads: OpenMP threads for the C++ engine (default: OpenMP's default, or 1 for tiny problems
            where starting threads costs more than it saves).

    Returns:
        :class:`ClusterResult` with labels (D,), inertia J, centroids (k, F) (points only) and
        cluster weights (k,).

    Raises:
        ValueError: bad shapes, NaN/inf, non-positive weights, asymmetric gram, k outside [1, D], bad
            options. Nothing is computed then.

    Memory: about 4 D^2 float64 plus D^2 per thread (D = 4096: about 0.7 GB with 2 threads). With
    ``max_iter=0`` and ``init="kmeans++"`` on duplicated points a cluster can stay empty (NaN centroid).

    The reference backend (used when the extension is missing) is deterministic greedy Ward, so it
    ignores ``top_k``, ``seed`` and, for ``init="ward"``, ``n_restarts``.
    """
    if (points is None) == (gram is None):
        raise ValueError("give exactly one of points (D, F) and gram (D, D)")
    is_gram = gram is not None
    name = "gram" if is_gram else "points"
    data, like = _as_float64(name, gram if is_gram else points)
    if data.ndim != 2:
        raise ValueError(f"{name} must be 2-D ({'(D, D)' if is_gram else '(D, F)'}); got shape {data.shape}")
    d = data.shape[0]
    if d == 0 or data.shape[1] == 0:
        raise ValueError(f"{name} must have at least one point and one feature; got shape {data.shape}")
    if is_gram and data.shape[1] != d:
        raise ValueError(f"gram must be square (D, D); got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or inf")
    if is_gram:
        scale = float(np.abs(data).max())
        if not np.allclose(data, data.T, rtol=1e-9, atol=1e-12 * scale):
            raise ValueError(f"gram must be symmetric; max |G - G^T| = {float(np.abs(data - data.T).max()):.3g}")
        data = 0.5 * (data + data.T)
    if weights is None:
        w = np.ones(d)
    else:
        w, _ = _as_float64("weights", weights)
        if w.shape != (d,):
            raise ValueError(f"weights must have shape ({d},); got {w.shape}")
        if not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError(f"weights must be finite and > 0; got min {float(w.min()):.3g}")
    for arg, val, lo in (("n_restarts", n_restarts, 1), ("top_k", top_k, 1), ("max_iter", max_iter, 0)):
        if int(val) != val or val < lo:
            raise ValueError(f"{arg} must be an integer >= {lo}; got {val}")
    if int(num_clusters) != num_clusters or not 1 <= num_clusters <= d:
        raise ValueError(f"num_clusters must be in [1, D = {d}]; got {num_clusters}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}; got {init!r}")
    if refine not in _REFINES:
        raise ValueError(f"refine must be one of {_REFINES}; got {refine!r}")
    if int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63); got {seed}")
    if num_threads is not None and (int(num_threads) != num_threads or num_threads < 1):
        raise ValueError(f"num_threads must be None or an integer >= 1; got {num_threads}")

    labels_t, inertia_t = OP(
        torch.from_numpy(data),
        torch.from_numpy(w),
        is_gram,
        int(num_clusters),
        int(n_restarts),
        init,
        int(top_k),
        int(max_iter),
        refine,
        int(seed),
        int(num_threads or 0),
    )
    labels = labels_t.cpu().numpy()
    k = int(num_clusters)
    wn = w
    cluster_weights = np.bincount(labels, weights=wn, minlength=k)
    centroids = None
    inertia = float(inertia_t)
    if not is_gram:
        x = data
        onehot = np.zeros((d, k))
        onehot[np.arange(d), labels] = 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            centroids = (onehot * wn[:, None]).T @ x / cluster_weights[:, None]
        # J straight from the points: exact for k = D, no kernel-formula cancellation.
        inertia = float((wn * ((x - centroids[labels]) ** 2).sum(1)).sum())
    if like is not None:
        dev = like.device
        return ClusterResult(
            torch.as_tensor(labels, device=dev),
            inertia,
            None if centroids is None else torch.as_tensor(centroids, device=dev),
            torch.as_tensor(cluster_weights, device=dev),
        )
    return ClusterResult(labels, inertia, centroids, cluster_weights)
