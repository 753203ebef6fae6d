"""OT fusion (Singh & Jaggi, NeurIPS 2020, "Model Fusion via Optimal Transport").

Every member k is aligned to the reference member by an optimal transport plan ``T_k`` (n_ref x n_k) per group,
between the neuron masses ``a`` (reference) and ``b_k`` (member k), for a ground cost between neurons:

* ``cost="activations"`` (needs data): mean squared distance of activations (pyfusion.stats), or
  ``1 - correlation`` with ``cost="correlation"``;
* ``cost="weights"``: squared distance of incoming weight rows, with the member's input axes already aligned
  by the maps of earlier groups, as in OTFusion's layer-wise procedure. Groups are processed in forward order;
  a producer whose input group is not aligned yet (a residual stream's later blocks) is left out of the
  ground cost, and if no producer is ready all are used unaligned.

Units and ties (attention heads): a tie set is transported at unit level. The ground cost between two units is the
sum over the tie set's groups of the best inner matching cost (within-head dims) of the pair's block of the neuron
cost, the masses are per unit (uniform, or the unit's share of the incoming-weight norms over the tie set,
:func:`~pyfusion.match.weights.unit_masses`), and the neuron-level map's block (slot unit s, member unit u) is
``T[s, u] / a[s]`` times the inner permutation of the pair (a scaled permutation, :mod:`pyfusion.match.units`).
A ``masses`` dict gives each tie set's K unit-mass vectors under any of its groups' names.

Normalized groups: soft maps (non-uniform masses) widen nothing but mix neurons, so a stream normalized by a
LayerNorm / RMSNorm module gets the builder's member-view normalizer (``y = sum_k A_k norm_k(B_k x)``); a stream
normalized by functional code inside a bigger module can only be permuted: such a group needs a permutation plan
(uniform masses), and other masses raise naming the module.

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
from pyfusion.fuse.plan import GroupPlan, Plan, permute_only, refuse_widening
from pyfusion.fuse.registry import register_method
from pyfusion.fuse.validate import check_reference
from pyfusion.graph.groups import FusionGraph
from pyfusion.match.activations import activation_costs
from pyfusion.match.align import SoftMap
from pyfusion.match.solvers import check_finite, entropic_transport, transport
from pyfusion.match.units import neuron_map, tie_set_costs
from pyfusion.match.weights import ot_weight_cost, unit_masses
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
    states = [
        {n: t.detach().to("cpu", torch.float64) for n, t in m.named_parameters(remove_duplicate=False)} for m in members
    ]
    full = [
        dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        for m in members
    ]
    t_stats = 0.0
    stats = None
    if cost != "weights":
        t0 = time.perf_counter()
        stats = group_statistics(members, graph, data, point=config.point, max_batches=config.max_batches)
        t_stats = time.perf_counter() - t0
    uniform = isinstance(masses, str) and masses == "uniform"
    soft = not uniform or config.reg is not None  # soft maps mix neurons
    for names in graph.tie_sets() if soft else []:
        hit = permute_only(graph, names)
        if hit is not None:
            raise refuse_widening(
                "ot", hit, "entropic OT (reg=) and non-uniform masses give soft maps; use masses='uniform' and reg=None"
            )
    maps: dict[str, list[Tensor]] = {}  # group -> K maps M_k = diag(1/a) T_k (slots x n)
    solver_of: dict[str, list[str]] = {}  # group -> the solver of each non-reference member
    iterations: dict[str, list[int]] = {}  # group -> Sinkhorn iterations per non-reference member
    unconverged: list[str] = []
    t_solve = 0.0
    by_key = graph.refs_by_key()
    for names in graph.tie_sets():
        units = graph.groups[names[0]].units
        if isinstance(masses, str):
            mass = [unit_masses(st, graph, names, masses) for st in states]
        else:
            mass = _given_masses(masses, names, units, k_all)
        a = mass[reference]
        costs: dict[int, dict[str, Tensor]] = {k: {} for k in range(k_all) if k != reference}
        for name in names:
            if stats is not None:
                kind = "sqdist" if cost == "activations" else "correlation"
                for k, c in activation_costs(stats[name], full, graph, name, reference, kind).items():
                    costs[k][name] = c
            else:
                for k in costs:
                    aligned = {gname: SoftMap(m[k]) for gname, m in maps.items()}
                    costs[k][name] = ot_weight_cost(states[reference], states[k], graph, name, aligned, by_key=by_key)
            for k in costs:
                check_finite(costs[k][name], f"group {name!r}: OT ground cost against member {k}")
        unit_costs, dt = tie_set_costs(graph, list(costs.values()))
        t_solve += dt
        for name in names:
            eye = torch.eye(graph.groups[name].size, dtype=torch.float64)
            maps[name] = [eye if k == reference else None for k in range(k_all)]  # type: ignore[misc]
        for k, uc in zip(costs, unit_costs):
            c = uc.cost
            if config.reg is None:
                t, dt = transport(a, mass[k], c, uniform)
                solver = "linear_assignment" if uniform and c.shape[0] == c.shape[1] else "emd"
            else:
                t, dt, res = entropic_transport(a, mass[k], c, float(config.reg), max_iter=config.max_iter,
                                                tol=config.tol)  # fmt: skip
                solver = res.solver
                for name in names:
                    iterations.setdefault(name, []).append(res.iterations)
                if not res.converged:
                    unconverged.append(f"{names[0]} (member {k}): marginal error {res.marginal_error:.3g}")
            t_solve += dt
            for name in names:
                solver_of.setdefault(name, []).append(solver)
                # contiguous (slots, n): the builder contracts B_k = M_k^T, and a consumer after a flatten expands
                # it as B_k^T kron I_e, which torch.kron refuses for a non-contiguous (transposed) matrix
                maps[name][k] = neuron_map(graph, uc, name, t / a[:, None]).contiguous()
    groups = {
        name: GroupPlan(
            [lam * m for lam, m in zip(lambdas, mk)],
            [m.T for m in mk],
            (graph.groups[name].size,) + (0,) * k_all,
        )
        for name, mk in maps.items()
    }
    groups = {name: groups[name] for name in graph.groups}  # graph order
    plan = Plan(tuple(float(x) for x in lambdas), groups)
    solvers = sorted({s for v in solver_of.values() for s in v})
    plan.info.update(method="ot", cost=cost, masses=masses if isinstance(masses, str) else "custom",
                     solver=solvers[0] if len(solvers) == 1 else solvers, solver_by_group=solver_of, reg=config.reg,
                     time_stats_s=t_stats, time_solve_s=t_solve)  # fmt: skip
    if config.reg is not None:
        plan.info.update(sinkhorn_iterations=iterations, sinkhorn_unconverged=unconverged)
    return plan


def _given_masses(masses: Any, names: list[str], units: int, k_all: int) -> list[Tensor]:
    """The K unit-mass vectors of one tie set from a ``masses`` dict (under any of its groups' names; all the
    entries given for one tie set must agree)."""
    given = [n for n in names if n in masses]
    if not given:
        tied = f" (or another group of its tie set {names})" if len(names) > 1 else ""
        raise ValueError(f"masses[{names[0]!r}]{tied} must hold {k_all} mass vectors; the dict has no entry")
    out = None
    for n in given:
        vecs = masses[n]
        if len(vecs) != k_all:
            raise ValueError(f"masses[{n!r}] must hold {k_all} mass vectors")
        mass = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in vecs]
        for k, v in enumerate(mass):
            if v.numel() != units or bool((v < 0).any()) or abs(float(v.sum()) - 1) > 1e-6:
                raise ValueError(
                    f"masses[{n!r}][{k}] must be {units} non-negative values summing to 1 (one per neuron; one per "
                    "unit for attention-head groups)"
                )
        if out is not None and any(not torch.allclose(x, y) for x, y in zip(out, mass)):
            raise ValueError(f"masses of the tied groups {given} differ: a tie set has one unit-mass vector per member")
        out = mass
    return out  # type: ignore[return-value]
