"""Generalized pruning (Morelli & Eckstein 2026, A.6): cluster the neurons of the concatenated ensemble (or of one
network) per group to a target width, and the structured-pruning baselines.

``method="cluster"``: for every group, the K*n neurons of the members (member k's neurons weighted by lambda_k;
members with lambda_k = 0 are left out, they never reach the output) are clustered into ``width`` clusters by
weighted k-means refined from randomized-Ward starts (:func:`pyfusion.ops.weighted_kmeans`, C++, parallel over
restarts, the best inertia of ``n_restarts`` kept). The points are the neurons' activations on calibration data,
given to the kernel as the Gram matrix ``G = X X^T`` from the statistics engine, divided by its trace (the squared
Frobenius norm of the activation matrix, the paper's global normalisation; post-activation by default, which for
ReLU equals normalising then applying the activation). Slots are laid out
``[clusters with neurons of >= 2 members | clusters of member 0 only | ... | member K-1 only]``, so the
blocks between different members' own clusters are exactly zero and the fast modules skip them.

The combination rule. A cluster c is one slot whose incoming weights (producer rows, biases, per-neuron
parameters such as BatchNorm's) are the *mean* of its members' (``A_k`` = cluster indicators / |c|) and whose
outgoing weights (consumer columns) are the *sum* (``B_k`` = indicators). For a cluster of identical neurons
(same incoming weights, hence the same activation ``a = f(z)``) this is exact under *any* elementwise activation
f (GELU, SiLU, tanh, CELU, ...): the slot computes ``f(z)`` and sends ``sum_{i in c} w_i f(z)``, what the |c|
neurons sent together; and it is exact for per-neuron affine maps (BatchNorm's running mean / variance of
identical neurons are identical, so their mean is the value itself). The earlier rule (incoming sum, outgoing
mean) computes ``f(|c| z) mean_i w_i``, equal only when ``f(|c| z) = |c| f(z)``, i.e. for positively homogeneous
activations (ReLU, LeakyReLU) and without BatchNorm; for ReLU the two rules give the same function for every
cluster (identical neurons or not: ``relu(sum z_i) mean w_i = relu(mean z_i) sum w_i``), so ReLU networks fuse
to the same network up to rounding (tests/test_methods_ir.py checks both claims).

Units and ties (attention heads): a tie set (the q/k and v/o groups of one attention layer) is clustered as whole
units, one clustering shared by its groups. With several members, every member's units are first matched to
the reference's (the first active member) on the tie set's activation costs (``sqdist``, the best inner matching
of the within-head dims for each pair of heads, :mod:`pyfusion.match.units`), which puts every unit's inner
neurons in the order of the reference unit it is matched to (its *frame*). A unit is then the point
``x_u = (x_{u,d})_d`` of its inner neurons' activations in that frame over every group of the tie set (each group's
Gram normalised by its trace, summed), and a cluster's slot unit combines its units' inner neurons d with the
rule above (block (slot unit, member unit) = ``P / |c|`` with ``P`` the unit's frame): the k-means centre of the
units is exactly what the slot computes. Widths count units for unit groups (a float fraction or alpha per tie
set, or an int number of slots, a multiple of the unit size); the groups of one tie set must get the same unit
count.

Normalized groups: the builder normalizes a widened stream with its member-view rule
(:class:`pyfusion.nn.norm.MemberViewNorm`, exact for clusters of identical neurons under the rule above). A group
normalized by functional code inside a bigger module can only be permuted: it must keep its width (alpha 0 in the
dict form, or width 1.0), and is then fused by the constrained clustering with one neuron (unit) of every member
per cluster, i.e. matched to the reference member by the minimum-cost assignment on the same activation costs
(for two members exactly the k-means optimum under that constraint); another width raises naming the module.

``method="prune"``: keep the ``width`` neurons of the concatenated ensemble (or one network) with the largest
score, ``criterion="activation_std"`` (standard deviation on calibration data) or ``"weight_norm"`` (L2 norm of
the incoming weights, all producer tensors), each times lambda_k; pruned neurons are deleted (zero rows and
columns in the maps). Kept neurons of member k are its branch slots (a pruned ensemble shares nothing). Units are
pruned whole, per tie set, by the root sum of squares of their neurons' scores over the tie set's groups.

Target width per group (one of): ``width`` an int (slots) or a float in (0, 1] (fraction of one member's width
n, rounded half up), or ``alpha`` giving ``n + (K - 1) * floor(alpha * n + 0.5)``, the slot count of partial
fusion at the same alpha (``n (1 + alpha)`` for K = 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.config import ClusterConfig, PruneConfig
from pyfusion.fuse.partial import isolated_count, resolve_alpha, tie_set_alphas
from pyfusion.fuse.plan import (
    GroupPlan,
    Plan,
    permute_only,
    refuse_widening,
    refuse_width_pin,
    width_pin,
    zero_hint,
)
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.transform import neuron_view
from pyfusion.match import weighted_kmeans
from pyfusion.match.activations import activation_costs
from pyfusion.match.solvers import assignments, check_finite
from pyfusion.match.units import UnitCost, tie_set_costs, unit_frames
from pyfusion.stats.groups import group_statistics

__all__ = ["cluster_plan", "prune_plan", "target_units", "target_widths", "labels_group_plan"]


def target_units(graph: FusionGraph, k_active: int, width: Any, alpha: Any) -> dict[str, int]:
    """Slot *units* per group (neurons for ordinary groups) from ``width`` (int slots, float fraction of a member's
    units, or a dict by group name) or ``alpha`` (see the module docstring); the same for every group of a tie set.

    Raises:
        ValueError: both or neither given, a width outside [1, K * units], an int width that is not whole units,
            or tied groups given different unit counts.
    """
    if (width is None) == (alpha is None):
        raise ValueError("give exactly one of width= (int or fraction of one network's width) and alpha=")
    out = {}
    if alpha is not None:
        alphas = tie_set_alphas(resolve_alpha(alpha, graph), graph)
        for name, g in graph.groups.items():
            out[name] = g.units + (k_active - 1) * isolated_count(alphas[name], g.units)
    else:
        for name, g in graph.groups.items():
            w = width[name] if isinstance(width, dict) else width
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
                raise ValueError(f"width must be an int or a float fraction; got {type(w).__name__} {w!r}")
            if isinstance(w, (float, np.floating)):
                if not math.isfinite(w) or w <= 0:
                    raise ValueError(f"width (a fraction of n) must be > 0; got {w}")
                u = int(math.floor(w * g.units + 0.5))
            else:
                if int(w) % g.unit_size:
                    raise ValueError(
                        f"width for group {name!r} must be whole units of {g.unit_size} neurons (attention heads); "
                        f"got {int(w)} slots"
                    )
                u = int(w) // g.unit_size
            if not 1 <= u <= k_active * g.units:
                raise ValueError(
                    f"width for group {name!r} must give between 1 and K * n = {k_active * g.size} slots; got "
                    f"{u * g.unit_size}"
                )
            out[name] = u
    for names in graph.tie_sets():
        if len({out[n] for n in names}) > 1:
            got = ", ".join(f"{n!r}: {out[n]}" for n in names)
            raise ValueError(
                f"groups {names} are one tie set (the heads of one attention layer): they need the same number of "
                f"slot units; the widths give {{{got}}} (use a float width or alpha)"
            )
    return out


def target_widths(graph: FusionGraph, k_active: int, width: Any, alpha: Any) -> dict[str, int]:
    """Slots per group (:func:`target_units` times the unit size)."""
    units = target_units(graph, k_active, width, alpha)
    return {name: units[name] * graph.groups[name].unit_size for name in graph.groups}


def labels_group_plan(
    labels: np.ndarray,
    n: int,
    k_all: int,
    active: Sequence[int],
    *,
    unit_size: int = 1,
    frames: Sequence[Tensor] | None = None,
) -> GroupPlan:
    """Maps of one group from cluster labels of the active members' concatenated units (the combination rule of
    the module docstring: incoming mean, outgoing sum).

    Args:
        labels: (len(active) * U,) cluster of each unit (member-major), U = n / unit_size.
        n: group width (neurons).
        k_all: K (inactive members get zero maps).
        active: the members whose units were clustered.
        unit_size: neurons per unit D.
        frames: per active member, (U, D) long: row u lists the member's inner neurons of unit u in slot order
            (the identity when None).
    """
    labels = np.asarray(labels, dtype=np.int64)
    d = int(unit_size)
    units = n // d
    num = int(labels.max()) + 1
    owner = np.repeat(np.asarray(active, dtype=np.int64), units)
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
    layout = (int((seg == -1).sum()) * d, *(int((seg == k).sum()) * d for k in range(k_all)))
    size = np.bincount(labels, minlength=num).astype(np.float64)
    maps_a = [torch.zeros(num * d, n, dtype=torch.float64) for _ in range(k_all)]
    maps_b = [torch.zeros(n, num * d, dtype=torch.float64) for _ in range(k_all)]
    inner = torch.arange(d)
    for i, k in enumerate(active):
        lab = labels[i * units : (i + 1) * units]
        frame = torch.arange(d).repeat(units, 1) if frames is None else torch.as_tensor(frames[i], dtype=torch.long)
        slots = (torch.as_tensor(slot[lab])[:, None] * d + inner).reshape(-1)
        neurons = (torch.arange(units)[:, None] * d + frame).reshape(-1)
        maps_a[k][slots, neurons] = torch.as_tensor(1.0 / size[lab]).repeat_interleave(d)
        maps_b[k][neurons, slots] = 1.0
    return GroupPlan(maps_a, maps_b, layout)


def _active(lambdas: Sequence[float]) -> list[int]:
    return [k for k, lam in enumerate(lambdas) if lam > 0]


def _keep_hint(names: Sequence[str], config: ClusterConfig | PruneConfig) -> str:
    if config.alpha is not None:
        return zero_hint(names, "alpha", config.alpha)
    return zero_hint(names, "width", config.width, keep=1.0)


def _frames(
    graph: FusionGraph,
    tie_sets: Sequence[Sequence[str]],
    stats: Mapping[str, Any],
    states: Sequence[Mapping[str, Tensor]],
) -> tuple[dict[int, list[UnitCost]], dict[int, list[np.ndarray]]]:
    """For the tie sets given by index: each active member's unit matching to the first (the reference), on the
    activation costs (``sqdist``), all inner and unit problems in two batched calls. Returns (tie set -> unit costs
    per member i >= 1, tie set -> unit assignment per member i >= 1)."""
    problems, keys = [], []
    for t, names in enumerate(tie_sets):
        per_member: dict[int, dict[str, Tensor]] = {}
        for name in names:
            for i, c in activation_costs(stats[name], states, graph, name, 0, "sqdist").items():
                check_finite(c, f"group {name!r}: activation cost against member {i}")
                per_member.setdefault(i, {})[name] = c
        for i in sorted(per_member):
            problems.append(per_member[i])
            keys.append(t)
    ucs, _ = tie_set_costs(graph, problems)
    cols, _ = assignments([uc.cost for uc in ucs])
    out_uc: dict[int, list[UnitCost]] = {}
    out_cols: dict[int, list[np.ndarray]] = {}
    for t, uc, c in zip(keys, ucs, cols):
        out_uc.setdefault(t, []).append(uc)
        out_cols.setdefault(t, []).append(c)
    return out_uc, out_cols


def _perm_group_plan(
    n: int,
    unit_size: int,
    frames: Sequence[Tensor],
    cols: Sequence[np.ndarray],
    lambdas: Sequence[float],
    active: Sequence[int],
) -> GroupPlan:
    """Full fusion by the reference matching (one unit of every active member per slot unit): ``A_k = lambda_k P_k``
    with the lambdas renormalised over the active members, ``B_k = P_k^T`` (identity for inactive members)."""
    k_all = len(lambdas)
    d = unit_size
    units = n // d
    tot = sum(lambdas[k] for k in active)
    maps_a, maps_b = [], []
    idx = {k: torch.arange(n) for k in range(k_all)}
    for i, k in enumerate(active):
        unit_of_slot = torch.arange(units) if i == 0 else torch.as_tensor(cols[i - 1], dtype=torch.long)
        frame = frames[i]
        idx[k] = (unit_of_slot[:, None] * d + frame[unit_of_slot]).reshape(-1)
    for k in range(k_all):
        p = torch.zeros(n, n, dtype=torch.float64)
        p[torch.arange(n), idx[k]] = 1.0
        maps_a.append((lambdas[k] / tot if k in active else 0.0) * p)
        maps_b.append(p.T.contiguous())
    return GroupPlan(maps_a, maps_b, (n,) + (0,) * k_all)


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
    k_all = len(members)
    units = target_units(graph, len(active), config.width, config.alpha)
    tie_sets = graph.tie_sets()
    for names in tie_sets:
        hit = permute_only(graph, names)
        if hit is not None and units[names[0]] != graph.groups[names[0]].units:
            raise refuse_widening("cluster", hit, _keep_hint(names, config))
        pin = width_pin(graph, names)
        if pin is not None and units[names[0]] > graph.groups[names[0]].units:
            raise refuse_width_pin("cluster", pin, _keep_hint(names, config))
    act_members = [members[k] for k in active]
    t0 = time.perf_counter()
    stats = group_statistics(act_members, graph, data, point=config.point, max_batches=config.max_batches)
    t_stats = time.perf_counter() - t0
    states = [
        dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        for m in act_members
    ]
    # members' units put into the reference's inner frames: needed for heads (inner dims) and for the groups
    # that may only be permuted (fused by the reference matching)
    framed = [
        t for t, names in enumerate(tie_sets)
        if len(active) > 1 and (permute_only(graph, names) or any(graph.groups[n].unit_size > 1 for n in names))
    ]  # fmt: skip
    ucs, cols = _frames(graph, [tie_sets[t] for t in framed], stats, states) if framed else ({}, {})
    frames_of: dict[str, list[Tensor]] = {}
    for j, t in enumerate(framed):
        for name in tie_sets[t]:
            frames_of[name] = [torch.arange(graph.groups[name].unit_size).repeat(graph.groups[name].units, 1)]
        for uc, c in zip(ucs[j], cols[j]):
            for name, fr in unit_frames(graph, uc, c).items():
                frames_of[name].append(fr)
    groups, inertia, t_cluster = {}, {}, 0.0
    for t, names in enumerate(tie_sets):
        g0 = graph.groups[names[0]]
        if permute_only(graph, names) is not None:
            for name in names:
                g = graph.groups[name]
                frames = frames_of.get(name, [torch.arange(g.unit_size).repeat(g.units, 1)])
                groups[name] = _perm_group_plan(
                    g.size, g.unit_size, frames, cols[framed.index(t)] if t in framed else [], lambdas, active
                )
                inertia[name] = float("nan")
            continue
        gram = torch.zeros(len(active) * g0.units, len(active) * g0.units, dtype=torch.float64)
        for name in names:
            g = graph.groups[name]
            gn = stats[name].gram()
            tr = float(torch.diagonal(gn).sum())
            if not math.isfinite(tr) or tr <= 0:
                raise ValueError(
                    f"group {name!r}: the activations are all zero on the calibration data; cannot cluster"
                )
            if g.unit_size > 1:
                d = g.unit_size
                idx = (
                    torch.cat(
                        [
                            i * g.size + (torch.arange(g.units)[:, None] * d + fr).reshape(-1)
                            for i, fr in enumerate(frames_of[name])
                        ]
                    )
                    if name in frames_of
                    else None
                )
                gn = gn if idx is None else gn[idx][:, idx]
                gn = gn.reshape(len(active) * g.units, d, len(active) * g.units, d).diagonal(dim1=1, dim2=3).sum(-1)
            gram += gn / tr
        w = torch.repeat_interleave(torch.tensor([lambdas[k] for k in active], dtype=torch.float64), g0.units)
        t0 = time.perf_counter()
        res = weighted_kmeans(
            gram=gram,
            weights=w,
            num_clusters=units[names[0]],
            n_restarts=config.n_restarts,
            top_k=config.top_k,
            seed=config.seed,
            num_threads=config.num_threads,
        )
        t_cluster += time.perf_counter() - t0
        for name in names:
            g = graph.groups[name]
            inertia[name] = res.inertia
            groups[name] = labels_group_plan(
                np.asarray(res.labels), g.size, k_all, active, unit_size=g.unit_size, frames=frames_of.get(name)
            )
    groups = {name: groups[name] for name in graph.groups}
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    plan.info.update(
        method="cluster",
        widths={n: units[n] * graph.groups[n].unit_size for n in graph.groups},
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
    units = target_units(graph, len(active), config.width, config.alpha)
    for names in graph.tie_sets():
        hit = permute_only(graph, names)
        if hit is not None and not (len(active) == 1 and units[names[0]] == graph.groups[names[0]].units):
            fix = "pruning the ensemble mixes members' neurons; prune one network at its full width (or use cluster)"
            raise refuse_widening("prune", hit, _keep_hint(names, config) if len(active) == 1 else fix)
    if criterion == "activation_std":
        stats = group_statistics(  # the scores read variances only
            [members[k] for k in active], graph, data, point=config.point, max_batches=config.max_batches, pairs="diag"
        )
    states = [
        dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        for m in members
    ]
    groups = {}
    for names in graph.tie_sets():
        g0 = graph.groups[names[0]]
        # per member, squared scores of the units summed over the tie set's groups and the units' neurons
        sq = [torch.zeros(g0.units, dtype=torch.float64) for _ in active]
        for name in names:
            g = graph.groups[name]
            for i, k in enumerate(active):
                if criterion == "activation_std":
                    sn = stats[name].var(i).cpu().to(torch.float64)
                else:
                    sn = torch.zeros(g.size, dtype=torch.float64)
                    for r in g.producers:
                        t = neuron_view(states[k][r.key].detach().to("cpu", torch.float64), r, g)
                        sn += (t * t).sum(1)
                sq[i] += sn.reshape(g.units, g.unit_size).sum(1)
        scores = [lambdas[k] * sq[i].sqrt() for i, k in enumerate(active)]
        allsc = torch.cat(scores).numpy()
        # stable order: ties keep the lower (member, unit) index
        keep = np.sort(np.argsort(-allsc, kind="stable")[: units[names[0]]])
        owner = keep // g0.units
        for name in names:
            g = graph.groups[name]
            d = g.unit_size
            slots = units[name] * d
            layout = [0] + [0] * len(members)
            maps_a = [torch.zeros(slots, g.size, dtype=torch.float64) for _ in members]
            maps_b = [torch.zeros(g.size, slots, dtype=torch.float64) for _ in members]
            slot = 0
            for i, k in enumerate(active):
                us = keep[owner == i] - i * g0.units
                seg = 0 if len(active) == 1 else k + 1
                layout[seg] += len(us) * d
                for u in us.tolist():
                    rows = slot + torch.arange(d)
                    cols = u * d + torch.arange(d)
                    maps_a[k][rows, cols] = 1.0
                    maps_b[k][cols, rows] = 1.0
                    slot += d
            groups[name] = GroupPlan(maps_a, maps_b, tuple(layout))
    groups = {name: groups[name] for name in graph.groups}
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    plan.info.update(
        method="prune",
        criterion=criterion,
        widths={n: units[n] * graph.groups[n].unit_size for n in graph.groups},
        layouts={n: gp.layout for n, gp in groups.items()},
        time_match_s=time.perf_counter() - t_start,
    )
    return plan
