"""Fusion within member subsets: fuse groups of similar members separately and average the fused groups.

For K members split into groups G_1, ..., G_g, the model is ``y(x) = sum_j w_j F_j(x)`` with ``F_j`` the fusion
of the members of ``G_j`` (any method; partial fusion at alpha in the budget search) with their lambdas
renormalised, and ``w_j = sum_{k in G_j} lambda_k`` (a :class:`pyfusion.nn.SubEnsemble`). At alpha = 1 every
``F_j`` is its group's ensemble, so the whole is the K-member ensemble; at alpha = 0 the cost is g members'.
This is the "partial fusion within clusters of similar members" construction of the issue "Beat the trivial
baselines at every compute budget" (item 3): it sits between the best g-of-K sub-ensemble (same cost, but only g
members' information) and full fusion of all K, which loses more of the ensemble's accuracy as K grows and as
the members differ; grouping similar members (:func:`similar_groups`) keeps each fusion closer to its group's
ensemble. Measured against the other candidates by ``bench/frontier.py``.

Also here: the per-class member weights of a class-weighted :class:`~pyfusion.nn.SubEnsemble`
(``y[c] = log sum_k W[k, c] softmax(f_k)[c]``), fitted on labelled calibration outputs
(:func:`fit_class_weights`) or read from the members' training class counts (:func:`class_weights_from_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.nn.ensemble import SubEnsemble

__all__ = ["CLASS_WEIGHT_RIDGE", "class_weights_from_counts", "fit_class_weights", "fuse_subsets", "similar_groups"]

# The ridge of fit_class_weights, in pseudo-samples (the penalty is ridge / N * ||theta||^2 / 2 on the mean
# cross-entropy of N samples). Chosen on calibration data only: 2-fold cross-fitted error / cross-entropy of the
# full class-weighted ensemble on bench/frontier.py's calibration sets (never the test set), ridge 0.1 / 1 / 10 /
# 1e9 (= the plain probability ensemble): digits Dirichlet K=4 (200 samples) 11.0 / 9.0 / 9.5 / 10.5 % error,
# K=8 12.5 / 11.0 / 13.5 / 13.5 %; MNIST Dirichlet K=4 (2000) 5.80 / 6.00 / 6.35 / 6.35 %; Fashion-MNIST Dirichlet
# K=2 13.7 / 13.25 / 12.45 / 13.8 %; digits IID K=4 4.0 % at every ridge. 1 is the best or within 0.8 points of it
# on each, and its cross-entropy within 0.15 nats of the lowest (ridge 0.1 everywhere).
CLASS_WEIGHT_RIDGE = 1.0


def similar_groups(outputs: Tensor, size: int) -> list[list[int]]:
    """The K members in groups of ``size`` (the last group may be smaller), similar members together.

    Greedy agglomeration on the mean squared distance of the members' outputs: repeatedly, the unassigned member
    pair at the smallest distance starts a group, which grows by the unassigned member closest on average to the
    group, until it has ``size`` members.

    Args:
        outputs: (K, N, ...) the members' outputs on the same samples.
        size: group size >= 1.

    Returns:
        Groups of member indices (each sorted), in the order they were formed.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    k = outputs.shape[0]
    z = outputs.reshape(k, -1).double()
    d = torch.cdist(z, z).pow(2) / z.shape[1]
    left = list(range(k))
    groups: list[list[int]] = []
    while left:
        if len(left) <= size or size == 1:
            take = left[:size]
        else:
            sub = d[left][:, left].masked_fill(torch.eye(len(left), dtype=torch.bool), float("inf"))
            flat = int(torch.argmin(sub))
            take = [left[flat // len(left)], left[flat % len(left)]]
            while len(take) < size:
                rest = [i for i in left if i not in take]
                take.append(min(rest, key=lambda i: float(d[i, take].mean())))
        groups.append(sorted(take))
        left = [i for i in left if i not in take]
    return groups


def fuse_subsets(
    models: Sequence[nn.Module],
    data: Any,
    groups: Sequence[Sequence[int]],
    *,
    method: str = "partial",
    lambdas: Sequence[float] | None = None,
    **options: Any,
) -> SubEnsemble:
    """Fuse every group of members with ``pyfusion.fuse(..., method=method, **options)`` and average the fused
    groups (module docstring).

    Args:
        models: the K members.
        data: calibration data (as for ``pyfusion.fuse``).
        groups: a partition of ``range(K)`` (each group with >= 1 member; a single member is kept as it is).
        method: the fusion method of each group.
        lambdas: member weights (default uniform).
        **options: options of ``pyfusion.fuse`` (the method's, ``reset_bn``, ...).

    Returns:
        A :class:`~pyfusion.nn.SubEnsemble` of the fused groups, with ``fusion_info`` (groups, weights, each
        group's fusion_info).

    Raises:
        ValueError: groups that are not a partition of the members.
    """
    import copy

    from pyfusion.fuse.api import fuse
    from pyfusion.fuse.validate import check_lambdas, check_members

    members = check_members(models, 1)
    lam = check_lambdas(lambdas, len(members))
    flat = sorted(int(i) for g in groups for i in g)
    if flat != list(range(len(members))) or any(len(g) == 0 for g in groups):
        raise ValueError(
            f"groups must partition the members 0..{len(members) - 1} into non-empty groups; "
            f"got {list(map(list, groups))}"
        )
    fused, weights, infos = [], [], []
    for g in groups:
        w = [lam[i] for i in g]
        tot = sum(w)
        weights.append(tot)
        if len(g) == 1:
            fused.append(copy.deepcopy(members[g[0]]))
            infos.append({"method": "member", "member": int(g[0])})
            continue
        sub_lam = [v / tot for v in w] if tot > 0 else [1.0 / len(g)] * len(g)
        f = fuse([members[i] for i in g], data, method=method, lambdas=sub_lam, **options)
        fused.append(f)
        infos.append(getattr(f, "fusion_info", {}))
    total = sum(weights)
    wt = [v / total for v in weights] if total > 0 else [1.0 / len(groups)] * len(groups)
    out = SubEnsemble(fused, wt, "logits")
    out.fusion_info = {"method": "groups", "groups": [list(map(int, g)) for g in groups], "weights": wt,
                       "group_info": infos}  # fmt: skip
    return out


def _prior(lambdas: Sequence[float] | Tensor | None, k: int) -> Tensor:
    if lambdas is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lam.numel() != k or not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or float(lam.sum()) <= 0:
        raise ValueError(f"lambdas must be {k} finite non-negative weights with a positive sum; got {lam.tolist()}")
    return lam / lam.sum()


def fit_class_weights(
    outputs: Tensor,
    labels: Tensor,
    *,
    lambdas: Sequence[float] | Tensor | None = None,
    ridge: float = CLASS_WEIGHT_RIDGE,
    max_iter: int = 100,
) -> Tensor:
    """Per-class member weights W (K, C) of a class-weighted sub-ensemble, fitted on labelled samples.

    ``W[:, c] = softmax_k(theta[:, c] + log lambda)`` (every column on the simplex) with theta (K, C) minimising
    the mean cross-entropy of ``y_i[c] = log sum_k W[k, c] softmax(z_k,i)[c]`` against the labels plus
    ``ridge / N * ||theta||^2 / 2`` (shrinkage toward the plain probability ensemble ``W[:, c] = lambda``: with
    few samples per class the fitted weights stay near it), by L-BFGS in float64 from theta = 0. Deterministic
    and equivariant in the members: permuting the members permutes the rows of W (up to rounding).

    Args:
        outputs: (K, N, C) the members' logits on the samples.
        labels: (N,) integer labels in [0, C).
        lambdas: (K,) member weights of the prior (default uniform).
        ridge: shrinkage in pseudo-samples (>= 0; default :data:`CLASS_WEIGHT_RIDGE`).
        max_iter: L-BFGS iterations.

    Returns:
        (K, C) float64, non-negative, columns summing to 1.
    """
    if not isinstance(outputs, Tensor) or outputs.dim() != 3:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"outputs must be (K, N, C) member logits; got {shape}")
    k, n, c = outputs.shape
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be ({n},) integers (one per sample of outputs {tuple(outputs.shape)}); got {shape}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}); got [{int(labels.min())}, {int(labels.max())}]")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}")
    log_prior = torch.log(_prior(lambdas, k))[:, None]
    logp = torch.log_softmax(outputs.detach().double(), -1)  # (K, N, C)
    y = labels.long()
    theta = torch.zeros(k, c, dtype=torch.float64, requires_grad=True)
    if n == 0:
        return torch.softmax(log_prior.expand(k, c), 0)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=int(max_iter), line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        logw = torch.log_softmax(theta + log_prior, 0)
        z = torch.logsumexp(logp + logw[:, None, :], 0)
        loss = torch.nn.functional.cross_entropy(z, y) + float(ridge) / n * 0.5 * (theta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(theta + log_prior, 0).detach()


def class_weights_from_counts(
    class_counts: Tensor | Sequence[Sequence[float]],
    *,
    lambdas: Sequence[float] | Tensor | None = None,
    smoothing: float = 0.0,
) -> Tensor:
    """Per-class member weights W (K, C) from the members' training class counts:
    ``W[k, c] = lambda_k (n_kc + s) / sum_j lambda_j (n_jc + s)`` (with uniform lambdas and s = 0, member k's
    share of class c: the "class-share ensemble" of non-IID splits); a class no member saw gets ``lambda``.

    Args:
        class_counts: (K, C) non-negative counts (or any per-class amounts, e.g. shares).
        lambdas: (K,) member weights (default uniform).
        smoothing: pseudo-count s >= 0 added to every count.

    Returns:
        (K, C) float64, non-negative, columns summing to 1.
    """
    try:
        n = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"class_counts must be a (K, C) array of counts; got {type(class_counts).__name__}") from exc
    if n.dim() != 2 or n.shape[0] < 1 or n.shape[1] < 1:
        raise ValueError(f"class_counts must have shape (K, C) (one row per member); got {tuple(n.shape)}")
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
        raise ValueError("class_counts must be finite and non-negative")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not smoothing >= 0:
        raise ValueError(f"smoothing must be a number >= 0; got {smoothing!r}")
    lam = _prior(lambdas, n.shape[0])[:, None]
    w = lam * (n + float(smoothing))
    tot = w.sum(0, keepdim=True)
    return torch.where(tot > 0, w / tot.clamp_min(1e-300), lam.expand_as(w))
