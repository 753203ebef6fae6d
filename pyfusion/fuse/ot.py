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
masses use POT's exact network simplex ``ot.emd`` (optional dependency: ``pip install pot``); both in
:func:`pyfusion.match.solvers.transport`. With ``reg`` (a float > 0) every group is solved by entropic OT instead
(Cuturi 2013, POT's Sinkhorn; the log-domain iteration for small reg), on the ground cost divided by its largest
entry so that reg means the same in every layer (:func:`pyfusion.match.solvers.entropic_transport`); the maps are
then soft even with uniform masses, and tend to an exact plan's as reg -> 0. ``fusion_info`` records the solver of
every group ("linear_assignment", "emd", "sinkhorn" or "sinkhorn_log"), reg and the Sinkhorn iterations.
The costs and masses are :mod:`pyfusion.match` functions
(:func:`~pyfusion.match.activations.activation_costs`, :func:`~pyfusion.match.weights.ot_weight_cost`,
:func:`~pyfusion.match.weights.neuron_masses`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.fuse.config import OTConfig
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.fuse.validate import check_reference
from pyfusion.graph.groups import FusionGraph
from pyfusion.match.activations import activation_costs
from pyfusion.match.align import SoftMap
from pyfusion.match.solvers import check_finite, entropic_transport, transport
from pyfusion.match.weights import neuron_masses, ot_weight_cost
from pyfusion.stats.groups import group_statistics

__all__ = ["ot_plan"]


@register_method(
    "ot", config=OTConfig, needs_data="optional", summary="OT fusion (exact or entropic transport; importance masses)"
)
def ot_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: OTConfig,
) -> Plan:
    """OT fusion plan with soft maps ``A_k = lambda_k diag(1/a) T_k``, ``B_k = A_k^T / lambda_k`` (options:
    :class:`OTConfig`: ``cost``, ``masses``, ``point``, ``reference``, ``max_batches``, ``reg``, ``max_iter``,
    ``tol``)."""
    k_all = len(members)
    reference = check_reference(config.reference, k_all)
    masses = config.masses
    cost = config.cost
    if cost is None:
        cost = "activations" if data is not None else "weights"
    if cost != "weights" and data is None:
        raise ValueError(f"cost={cost!r} needs calibration data")
    states = [{n: t.detach().to("cpu", torch.float64) for n, t in m.named_parameters()} for m in members]
    full = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
    t_stats = 0.0
    stats = None
    if cost != "weights":
        t0 = time.perf_counter()
        stats = group_statistics(members, graph, data, point=config.point, max_batches=config.max_batches)
        t_stats = time.perf_counter() - t0
    uniform = isinstance(masses, str) and masses == "uniform"
    maps: dict[str, list[Tensor]] = {}  # group -> K maps M_k = diag(1/a) T_k (slots x n)
    solver_of: dict[str, list[str]] = {}  # group -> the solver of each non-reference member
    iterations: dict[str, list[int]] = {}  # group -> Sinkhorn iterations per non-reference member
    unconverged: list[str] = []
    t_solve = 0.0
    by_key = graph.refs_by_key()
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
        if stats is not None:
            costs = activation_costs(
                stats[name], full, graph, name, reference, "sqdist" if cost == "activations" else "correlation"
            )
        mk = []
        for k in range(k_all):
            if k == reference:
                mk.append(torch.eye(g.size, dtype=torch.float64))
                continue
            if stats is not None:
                c = costs[k]
            else:
                aligned = {gname: SoftMap(m[k]) for gname, m in maps.items()}
                c = ot_weight_cost(states[reference], states[k], graph, name, aligned, by_key=by_key)
            check_finite(c, f"group {name!r}: OT ground cost against member {k}")
            if config.reg is None:
                t, dt = transport(a, mass[k], c, uniform)
                solver_of.setdefault(name, []).append("linear_assignment" if uniform and c.shape[0] == c.shape[1]
                                                      else "emd")  # fmt: skip
            else:
                t, dt, res = entropic_transport(a, mass[k], c, float(config.reg), max_iter=config.max_iter,
                                                tol=config.tol)  # fmt: skip
                solver_of.setdefault(name, []).append(res.solver)
                iterations.setdefault(name, []).append(res.iterations)
                if not res.converged:
                    unconverged.append(f"{name} (member {k}): marginal error {res.marginal_error:.3g}")
            t_solve += dt
            mk.append((t / a[:, None]).contiguous())
        maps[name] = mk
    # B_k is handed over as the transposed view of the contiguous (slots, n) map M_k: the builder contracts
    # B_k^T, and a consumer after a flatten expands it as B_k^T kron I_e, which torch.kron refuses for a
    # non-contiguous (transposed) matrix ("view size is not compatible with input tensor's size and stride").
    groups = {
        name: GroupPlan(
            [lam * m for lam, m in zip(lambdas, mk)],
            [m.T for m in mk],
            (graph.groups[name].size,) + (0,) * k_all,
        )
        for name, mk in maps.items()
    }
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    solvers = sorted({s for v in solver_of.values() for s in v})
    plan.info.update(method="ot", cost=cost, masses=masses if isinstance(masses, str) else "custom",
                     solver=solvers[0] if len(solvers) == 1 else solvers, solver_by_group=solver_of, reg=config.reg,
                     time_stats_s=t_stats, time_solve_s=t_solve)  # fmt: skip
    if config.reg is not None:
        plan.info.update(sinkhorn_iterations=iterations, sinkhorn_unconverged=unconverged)
    return plan
