"""Generalized pruning (Morelli & Eckstein 2026, A.6): cluster the neurons of the concatenated ensemble (or of one
network) per group to a target width, and the structured-pruning baselines.

``method="cluster"``: for every group, the K*n neurons of the members (member k's neurons weighted by lambda_k;
members with lambda_k = 0 are left out, they never reach the output) are clustered into ``width`` clusters by
weighted k-means refined from randomized-Ward starts (:func:`pyfusion.ops.weighted_kmeans`, C++, parallel over
restarts, the best inertia of ``n_restarts`` kept). The points are the neurons' activations on calibration data,
given to the kernel as the Gram matrix ``G = X X^T`` from the statistics engine, divided by its trace (the squared
Frobenius norm of the activation matrix, the paper's global normalisation; post-activation by default, which for
ReLU equals normalising then applying the activation). A cluster c is one slot: its incoming weights are the sum
of its members' (``A_k`` = cluster indicators) and its outgoing weights the mean (``B_k`` = indicators / |c|),
exact for clusters of identical neurons under a positively homogeneous activation. Slots are laid out
``[clusters with neurons of >= 2 members | clusters of member 0 only | ... | member K-1 only]``, so the
blocks between different members' own clusters are exactly zero and the fast modules skip them.

``method="prune"``: keep the ``width`` neurons of the concatenated ensemble (or one network) with the largest
score, ``criterion="activation_std"`` (standard deviation on calibration data) or ``"weight_norm"`` (L2 norm of
the incoming weights, all producer tensors), each times lambda_k; pruned neurons are deleted (zero rows and
columns in the maps). Kept neurons of member k are its branch slots (a pruned ensemble shares nothing).

Target width per group (one of): ``width`` an int (slots) or a float in (0, 1] (fraction of one member's width
n, rounded half up), or ``alpha`` giving ``n + (K - 1) * floor(alpha * n + 0.5)``, the slot count of partial
fusion at the same alpha (``n (1 + alpha)`` for K = 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pyfusion.fuse.config import ClusterConfig, PruneConfig
from pyfusion.fuse.partial import isolated_count, resolve_alpha
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.match import weighted_kmeans
from pyfusion.stats.groups import group_statistics

__all__ = ["cluster_plan", "prune_plan", "target_widths", "labels_group_plan"]


def target_widths(graph: FusionGraph, k_active: int, width: Any, alpha: Any) -> dict[str, int]:
    """Slots per group from ``width`` (int, or float fraction of n) or ``alpha`` (see module docstring).

    Raises:
        ValueError: both or neither given, or a width outside [1, K * n].
    """
    if (width is None) == (alpha is None):
        raise ValueError("give exactly one of width= (int or fraction of one network's width) and alpha=")
    out = {}
    if alpha is not None:
        alphas = resolve_alpha(alpha, graph)
        for name, g in graph.groups.items():
            out[name] = g.size + (k_active - 1) * isolated_count(alphas[name], g.size)
    else:
        for name, g in graph.groups.items():
            w = width[name] if isinstance(width, dict) else width
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
                raise ValueError(f"width must be an int or a float fraction; got {type(w).__name__} {w!r}")
            if isinstance(w, (float, np.floating)):
                if not math.isfinite(w) or w <= 0:
                    raise ValueError(f"width (a fraction of n) must be > 0; got {w}")
                s = int(math.floor(w * g.size + 0.5))
            else:
                s = int(w)
            if not 1 <= s <= k_active * g.size:
                raise ValueError(
                    f"width for group {name!r} must give between 1 and K * n = {k_active * g.size} slots; got {s}"
                )
            out[name] = s
    return out


def labels_group_plan(labels: np.ndarray, n: int, k_all: int, active: Sequence[int]) -> GroupPlan:
    """Maps of one group from cluster labels of the active members' concatenated neurons.

    Args:
        labels: (len(active) * n,) cluster of each neuron (member-major).
        n: group width.
        k_all: K (inactive members get zero maps).
        active: the members whose neurons were clustered.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num = int(labels.max()) + 1
    owner = np.repeat(np.asarray(active, dtype=np.int64), n)
    members_of = [set() for _ in range(num)]
    for c, k in zip(labels.tolist(), owner.tolist()):
        members_of[c].add(k)
    first = np.full(num, labels.size, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(labels.size))
    multi = len(active) > 1
    seg = np.array([-1 if (len(m) > 1 or not multi) else next(iter(m)) for m in members_of])
    order = []
    for s in [-1, *range(k_all)]:
        cs = np.flatnonzero(seg == s)
        order.extend(cs[np.argsort(first[cs], kind="stable")].tolist())
    slot = np.empty(num, dtype=np.int64)
    slot[np.asarray(order, dtype=np.int64)] = np.arange(num)
    layout = (int((seg == -1).sum()), *(int((seg == k).sum()) for k in range(k_all)))
    size = np.bincount(labels, minlength=num).astype(np.float64)
    maps_a = [torch.zeros(num, n, dtype=torch.float64) for _ in range(k_all)]
    maps_b = [torch.zeros(n, num, dtype=torch.float64) for _ in range(k_all)]
    ar = torch.arange(n)
    for i, k in enumerate(active):
        lab = labels[i * n : (i + 1) * n]
        sl = torch.as_tensor(slot[lab])
        maps_a[k][sl, ar] = 1.0
        maps_b[k][ar, sl] = torch.as_tensor(1.0 / size[lab])
    return GroupPlan(maps_a, maps_b, layout)


def _active(lambdas: Sequence[float]) -> list[int]:
    return [k for k, lam in enumerate(lambdas) if lam > 0]


@register_method(
    "cluster",
    config=ClusterConfig,
    needs_data="yes",
    min_members=1,
    summary="generalized pruning: cluster the ensemble's (or one network's) neurons to a target width",
)
def cluster_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: ClusterConfig,
) -> Plan:
    """Clustering plan (module docstring; options: :class:`ClusterConfig`: ``width`` or ``alpha``, ``n_restarts``,
    ``seed``, ``point``, ``top_k``, ``max_batches``, ``num_threads``)."""
    t_start = time.perf_counter()
    active = _active(lambdas)
    widths = target_widths(graph, len(active), config.width, config.alpha)
    act_members = [members[k] for k in active]
    t0 = time.perf_counter()
    stats = group_statistics(act_members, graph, data, point=config.point, max_batches=config.max_batches)
    t_stats = time.perf_counter() - t0
    groups, inertia, t_cluster = {}, {}, 0.0
    for name, g in graph.groups.items():
        gram = stats[name].gram()
        tr = float(torch.diagonal(gram).sum())
        if not math.isfinite(tr) or tr <= 0:
            raise ValueError(f"group {name!r}: the activations are all zero on the calibration data; cannot cluster")
        w = torch.repeat_interleave(torch.tensor([lambdas[k] for k in active], dtype=torch.float64), g.size)
        t0 = time.perf_counter()
        res = weighted_kmeans(
            gram=gram / tr,
            weights=w,
            num_clusters=widths[name],
            n_restarts=config.n_restarts,
            top_k=config.top_k,
            seed=config.seed,
            num_threads=config.num_threads,
        )
        t_cluster += time.perf_counter() - t0
        inertia[name] = res.inertia
        groups[name] = labels_group_plan(np.asarray(res.labels), g.size, len(members), active)
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    plan.info.update(
        method="cluster",
        widths=widths,
        inertia=inertia,
        layouts={n: gp.layout for n, gp in groups.items()},
        time_stats_s=t_stats,
        time_cluster_s=t_cluster,
        time_match_s=time.perf_counter() - t_start,
    )
    return plan


@register_method(
    "prune",
    config=PruneConfig,
    needs_data="optional",
    min_members=1,
    summary="structured pruning of the ensemble (or one network) by activation std or weight norm",
)
def prune_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: PruneConfig,
) -> Plan:
    """Structured pruning plan (module docstring; options: :class:`PruneConfig`: ``width`` or ``alpha``,
    ``criterion``, ``point``, ``max_batches``)."""
    criterion = config.criterion
    if criterion == "activation_std" and data is None:
        raise ValueError("criterion='activation_std' needs calibration data")
    t_start = time.perf_counter()
    active = _active(lambdas)
    widths = target_widths(graph, len(active), config.width, config.alpha)
    if criterion == "activation_std":
        stats = group_statistics(
            [members[k] for k in active], graph, data, point=config.point, max_batches=config.max_batches
        )
    states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
    groups = {}
    for name, g in graph.groups.items():
        scores = []
        for i, k in enumerate(active):
            if criterion == "activation_std":
                sc = stats[name].var(i).sqrt()
            else:
                sq = torch.zeros(g.size, dtype=torch.float64)
                for r in g.producers:
                    t = states[k][r.key].detach().to("cpu", torch.float64).movedim(r.axis, 0).reshape(g.size, -1)
                    sq += (t * t).sum(1)
                sc = sq.sqrt()
            scores.append(lambdas[k] * sc.cpu())
        allsc = torch.cat(scores).numpy()
        # stable order: ties keep the lower (member, neuron) index
        keep = np.sort(np.argsort(-allsc, kind="stable")[: widths[name]])
        owner = keep // g.size
        layout = [0] + [0] * len(members)
        maps_a = [torch.zeros(widths[name], g.size, dtype=torch.float64) for _ in members]
        maps_b = [torch.zeros(g.size, widths[name], dtype=torch.float64) for _ in members]
        slot = 0
        for i, k in enumerate(active):
            js = keep[owner == i] - i * g.size
            seg = 0 if len(active) == 1 else k + 1
            layout[seg] += len(js)
            for j in js.tolist():
                maps_a[k][slot, j] = 1.0
                maps_b[k][j, slot] = 1.0
                slot += 1
        groups[name] = GroupPlan(maps_a, maps_b, tuple(layout))
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    plan.info.update(
        method="prune",
        criterion=criterion,
        widths=widths,
        layouts={n: gp.layout for n, gp in groups.items()},
        time_match_s=time.perf_counter() - t_start,
    )
    return plan
