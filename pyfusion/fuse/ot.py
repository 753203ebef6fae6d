"""OT fusion (Singh & Jaggi, NeurIPS 2020, "Model Fusion via Optimal Transport").

Every member k is aligned to the reference member by an optimal transport plan ``T_k`` (n_ref x n_k) per group,
between the neuron masses ``a`` (reference) and ``b_k`` (member k), for a ground cost between neurons:

* ``cost="activations"`` (needs data): mean squared distance of activations (pyfusion.stats), or
  ``1 - correlation`` with ``cost="correlation"``;
* ``cost="weights"``: squared distance of incoming weight rows, with the member's input axes already aligned
  by the maps of earlier groups, as in OTFusion's layer-wise procedure. Groups are processed in forward order;
  a producer whose input group is not aligned yet (a residual stream's later blocks) is left out of the
  ground cost, and if no producer is ready all are used unaligned.

Maps (DESIGN §3): ``A_k = lambda_k diag(1/a) T_k`` (each slot a barycentric combination of member k's neurons),
``B_k = (diag(1/a) T_k)^T``. Masses: "uniform", or importance "l1" / "l2" (norm of each neuron's incoming weight
rows, all producers of the group, normalised to sum 1), or a dict group -> K mass vectors. With uniform masses
an optimal plan is a permutation / n (Birkhoff), solved exactly by pyfusion.ops.linear_assignment; general
masses use POT's exact network simplex ``ot.emd`` (optional dependency: ``pip install pot``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.activation_matching import activation_cost, neuron_features
from pyfusion.fuse.activations import group_statistics
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.ops import linear_assignment

__all__ = ["ot_plan", "neuron_masses"]


def _producer_rows(state: Mapping[str, Tensor], graph: FusionGraph, name: str) -> Tensor:
    g = graph.groups[name]
    return torch.cat([state[r.key].movedim(r.axis, 0).reshape(g.size, -1) for r in g.producers], dim=1)


def neuron_masses(state: Mapping[str, Tensor], graph: FusionGraph, name: str, kind: str) -> Tensor:
    """Neuron masses of one member in one group: "uniform", "l1" or "l2" importance (float64, sums to 1)."""
    n = graph.groups[name].size
    if kind == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    rows = _producer_rows(state, graph, name)
    if kind == "l1":
        w = rows.abs().sum(1)
    elif kind == "l2":
        w = rows.norm(dim=1)
    else:
        raise ValueError(f"masses must be 'uniform', 'l1', 'l2' or a dict of mass vectors; got {kind!r}")
    w = w + 1e-12 * float(w.max().clamp_min(1e-300))  # a dead neuron keeps a tiny mass: marginals stay positive
    return w / w.sum()


def _emd(a: Tensor, b: Tensor, cost: Tensor) -> Tensor:
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - POT is installed in the dev environment
        raise ImportError("non-uniform masses need POT: pip install pot") from exc
    t = ot.emd(a.numpy(), b.numpy(), cost.numpy(), numItermax=10_000_000)
    return torch.as_tensor(np.asarray(t), dtype=torch.float64)


def _transport(a: Tensor, b: Tensor, cost: Tensor, uniform: bool) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    n, m = cost.shape
    if uniform and n == m:
        _, cols = linear_assignment(cost)
        t = torch.zeros(n, m, dtype=torch.float64)
        t[torch.arange(n), torch.as_tensor(cols, dtype=torch.long)] = 1.0 / n
    else:
        t = _emd(a, b, cost)
    return t, time.perf_counter() - t0


def _sqdist_rows(x: Tensor, y: Tensor) -> Tensor:
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


@register_method("ot", needs_data="optional", summary="OT fusion (exact transport; importance masses)")
def ot_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any = None,
    *,
    cost: str | None = None,
    masses: str | Mapping[str, Sequence[Tensor]] = "uniform",
    point: str = "post",
    reference: int = 0,
    max_batches: int | None = None,
) -> Plan:
    """OT fusion plan with soft maps ``A_k = lambda_k diag(1/a) T_k``, ``B_k = A_k^T / lambda_k``.

    Args:
        cost: "activations" (squared distance; default when data is given), "correlation" or "weights".
        masses: "uniform", "l1", "l2", or group -> K mass vectors (each positive, summing to 1).
        point: activation point for the activation costs ("post" or "pre").
        reference: the member whose neurons define the slots.
        max_batches: calibration batches to use.
    """
    k_all = len(members)
    if not 0 <= reference < k_all:
        raise ValueError(f"reference must be a member index in [0, {k_all}); got {reference}")
    if cost is None:
        cost = "activations" if data is not None else "weights"
    if cost not in ("activations", "correlation", "weights"):
        raise ValueError(f"cost must be 'activations', 'correlation' or 'weights'; got {cost!r}")
    if cost != "weights" and data is None:
        raise ValueError(f"cost={cost!r} needs calibration data")
    states = [{n: t.detach().to("cpu", torch.float64) for n, t in m.named_parameters()} for m in members]
    full = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
    t_stats = 0.0
    stats = None
    if cost != "weights":
        t0 = time.perf_counter()
        stats = group_statistics(members, graph, data, point=point, max_batches=max_batches)
        t_stats = time.perf_counter() - t0
    uniform = isinstance(masses, str) and masses == "uniform"
    maps: dict[str, list[Tensor]] = {}  # group -> K maps M_k = diag(1/a) T_k (slots x n)
    t_solve = 0.0
    consumer_group = {r.module: gname for gname, g in graph.groups.items() for r in g.consumers}
    for name, g in graph.groups.items():
        if isinstance(masses, str):
            mass = [neuron_masses(st, graph, name, masses) for st in states]
        else:
            if name not in masses or len(masses[name]) != k_all:
                raise ValueError(f"masses[{name!r}] must hold {k_all} mass vectors")
            mass = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in masses[name]]
            for k, v in enumerate(mass):
                if v.numel() != g.size or bool((v < 0).any()) or abs(float(v.sum()) - 1) > 1e-6:
                    raise ValueError(f"masses[{name!r}][{k}] must be {g.size} non-negative values summing to 1")
        a = mass[reference]
        mk = []
        for k in range(k_all):
            if k == reference:
                mk.append(torch.eye(g.size, dtype=torch.float64))
                continue
            if stats is not None:
                feats = (neuron_features(full[reference], graph, name), neuron_features(full[k], graph, name))
                c = activation_cost(
                    stats[name], reference, k, "sqdist" if cost == "activations" else "correlation", feats
                )
            else:
                c = _weight_cost(states[reference], states[k], graph, name, maps, consumer_group, k)
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"group {name!r}: OT ground cost against member {k} has NaN or inf values")
            t, dt = _transport(a, mass[k], c, uniform)
            t_solve += dt
            mk.append(t / a[:, None])
        maps[name] = mk
    groups = {
        name: GroupPlan(
            [lam * m for lam, m in zip(lambdas, mk)],
            [m.T.contiguous() for m in mk],
            (graph.groups[name].size,) + (0,) * k_all,
        )
        for name, mk in maps.items()
    }
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    plan.info.update(method="ot", cost=cost, masses=masses if isinstance(masses, str) else "custom",
                     time_stats_s=t_stats, time_solve_s=t_solve)  # fmt: skip
    return plan


def _weight_cost(
    ref: Mapping[str, Tensor],
    mem: Mapping[str, Tensor],
    graph: FusionGraph,
    name: str,
    maps: Mapping[str, list[Tensor]],
    consumer_group: Mapping[str, str],
    k: int,
) -> Tensor:
    """Squared distance of incoming weight rows, member inputs aligned by the maps of earlier groups."""
    g = graph.groups[name]
    feats_r, feats_m, feats_r_all, feats_m_all = [], [], [], []
    for r in g.producers + g.per_neuron:
        if r.key not in ref:
            continue
        wr, wm = ref[r.key], mem[r.key]
        src = consumer_group.get(r.module) if r.param == "weight" else None
        ready = src is None or src in maps
        if src is not None and src in maps:
            cref = next(c for c in graph.groups[src].consumers if c.module == r.module)
            m_in = maps[src][k]
            if cref.expand > 1:
                m_in = torch.kron(m_in, torch.eye(cref.expand, dtype=torch.float64))
            wm = torch.tensordot(m_in, wm.movedim(cref.axis, 0), dims=([1], [0])).movedim(0, cref.axis)
        fr, fm = wr.movedim(r.axis, 0).reshape(g.size, -1), wm.movedim(r.axis, 0).reshape(g.size, -1)
        feats_r_all.append(fr)
        feats_m_all.append(fm)
        if ready:
            feats_r.append(fr)
            feats_m.append(fm)
    if not feats_r:
        feats_r, feats_m = feats_r_all, feats_m_all
    return _sqdist_rows(torch.cat(feats_r, 1), torch.cat(feats_m, 1))
