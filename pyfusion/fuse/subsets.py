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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.nn.ensemble import SubEnsemble

__all__ = ["fuse_subsets", "similar_groups"]


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
