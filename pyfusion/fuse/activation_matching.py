"""Activation matching (Git Re-Basin §3.1; Jordan et al. 2023 "correlation matching").

For every group, the members' activations on calibration data are streamed into joint statistics
(pyfusion.stats); the cost between reference neuron i and member-k neuron j is ``1 - corr(i, j)`` (default) or
the mean squared distance ``E[(x_i - y_j)^2]``. Each (group, member) pair is one exact linear assignment; all are
solved in one batched call of pyfusion.ops.linear_assignment. Every member is aligned to the reference member
(``reference``, default 0), whose neuron order defines the slots. Groups do not interact (activations do not
depend on the other groups' permutations), so there is no iteration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pyfusion.fuse.activations import group_statistics
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.ops import linear_assignment
from pyfusion.stats import ActivationStats

__all__ = ["activation_matching_plan", "activation_cost"]


def neuron_features(state: Mapping[str, torch.Tensor], graph: FusionGraph, name: str) -> torch.Tensor:
    """Permutation-invariant per-neuron features of one member (n, F): the norm of each producer row, and the
    values of 1-D per-neuron tensors (biases, BatchNorm / LayerNorm parameters and running statistics). They do
    not depend on how the *input* neurons are ordered, so they can break ties between members' dead neurons."""
    g = graph.groups[name]
    cols = []
    for r in g.producers + g.per_neuron:
        if r.key not in state:
            continue
        t = state[r.key].detach().to("cpu", torch.float64).movedim(r.axis, 0).reshape(g.size, -1)
        cols.append(t[:, 0] if t.shape[1] == 1 else t.norm(dim=1))
    return torch.stack(cols, 1) if cols else torch.zeros(g.size, 1, dtype=torch.float64)


def activation_cost(
    st: ActivationStats,
    a: int,
    b: int,
    cost: str,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cost matrix (n_a, n_b) between blocks a and b: "correlation" (1 - Pearson) or "sqdist" (E[(x - y)^2]).

    Constant neurons (zero variance on the calibration data, e.g. dead ReLUs) carry no signal: every pair of
    constant neurons gets the same correlation cost. When ``features`` (from :func:`neuron_features`) are given,
    such ties are broken by adding ``1e-6 * scale * d / max(d)`` on the constant x constant block, with d the
    squared distance of the features (scale: the largest cost), so that a neuron-permuted copy is recovered
    exactly even where neurons are dead.
    """
    if cost == "correlation":
        c = 1.0 - st.corr(a, b)
    elif cost == "sqdist":
        c = st.sqdist(a, b)
    else:
        raise ValueError(f"cost must be 'correlation' or 'sqdist'; got {cost!r}")
    if features is not None:
        dead_a, dead_b = st.var(a) <= 0, st.var(b) <= 0
        if bool(dead_a.any()) and bool(dead_b.any()):
            fa, fb = features[0][dead_a], features[1][dead_b]
            d = ((fa[:, None, :] - fb[None, :, :]) ** 2).sum(-1)
            scale = float(c.abs().max().clamp_min(1e-12))
            blk = c[dead_a][:, dead_b] + 1e-6 * scale * d / float(d.max().clamp_min(1e-300))
            idx_a, idx_b = dead_a.nonzero().flatten(), dead_b.nonzero().flatten()
            c = c.clone()
            c[idx_a[:, None], idx_b[None, :]] = blk
    return c


@register_method("activation_matching", needs_data="yes", summary="match neurons by activation correlation")
def activation_matching_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    *,
    cost: str = "correlation",
    point: str = "post",
    reference: int = 0,
    max_batches: int | None = None,
) -> Plan:
    """Activation matching plan: ``A_k = lambda_k P_k``, ``B_k = P_k^T``.

    Args:
        cost: "correlation" (1 - Pearson correlation) or "sqdist" (mean squared distance).
        point: "post" (after the activation; default) or "pre" activation values.
        reference: the member all others are aligned to.
        max_batches: use at most this many calibration batches.
    """
    k_all = len(members)
    if not 0 <= reference < k_all:
        raise ValueError(f"reference must be a member index in [0, {k_all}); got {reference}")
    if cost not in ("correlation", "sqdist"):
        raise ValueError(f"cost must be 'correlation' or 'sqdist'; got {cost!r}")
    t0 = time.perf_counter()
    stats = group_statistics(members, graph, data, point=point, max_batches=max_batches)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems, keys = [], []
    states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
    dead = 0
    for name in graph.groups:
        feats = [neuron_features(st, graph, name) for st in states]
        dead += int((stats[name].var() <= 0).sum())
        for k in range(k_all):
            if k == reference:
                continue
            c = activation_cost(stats[name], reference, k, cost, (feats[reference], feats[k]))
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"group {name!r}: activation cost against member {k} has NaN or inf values")
            problems.append(c.numpy())
            keys.append((name, k))
    t_cost = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = linear_assignment(problems)
    t_solve = time.perf_counter() - t0
    perms: dict[str, list[torch.Tensor]] = {
        name: [torch.arange(g.size) for _ in range(k_all)] for name, g in graph.groups.items()
    }
    for (name, k), cols in zip(keys, res.col_ind):
        perms[name][k] = torch.as_tensor(cols, dtype=torch.long)
    plan = Plan.from_permutations(graph, perms, lambdas)
    plan.info.update(
        method="activation_matching",
        time_stats_s=t_stats,
        time_cost_s=t_cost,
        time_solve_s=t_solve,
        stat_rows=next(iter(stats.values())).count if stats else 0,
        constant_neurons=dead,
    )
    return plan
