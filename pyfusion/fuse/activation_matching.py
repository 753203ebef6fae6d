"""Activation matching (Git Re-Basin §3.1; Jordan et al. 2023 "correlation matching").

For every group, the members' activations on calibration data are streamed into joint statistics
(:func:`pyfusion.stats.groups.group_statistics`); the cost between reference neuron i and member-k neuron j is
``1 - corr(i, j)`` (default) or the mean squared distance ``E[(x_i - y_j)^2]``
(:func:`pyfusion.match.activations.activation_costs`). Each (tie set, member) pair is one exact linear
assignment; all are solved in one batched call (:func:`pyfusion.match.solvers.assignments`). A tie set of unit
groups (attention heads: the q/k and v/o groups of a layer, observed at their projections' outputs through the
groups' capture points) is matched as whole units: the cost between two heads is the sum over the tie set's groups
of the best inner matching (within-head dims, one batched assignment call for all pairs of heads), and the
neuron-level permutations follow from the head assignment and the inner matchings of the matched heads
(:mod:`pyfusion.match.units`). Every member is aligned to the
reference member (``reference``, default 0), whose neuron order defines the slots. Groups do not interact
(activations do not depend on the other groups' permutations), so there is no iteration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyfusion.fuse.config import ActivationMatchingConfig
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import register_method
from pyfusion.fuse.validate import check_reference
from pyfusion.graph.groups import FusionGraph
from pyfusion.match.activations import activation_costs
from pyfusion.match.solvers import assignments, check_finite
from pyfusion.match.units import neuron_perms, tie_set_costs
from pyfusion.stats.groups import group_statistics

__all__ = ["activation_matching_plan"]


@register_method(
    "activation_matching",
    config=ActivationMatchingConfig,
    needs_data="yes",
    summary="match neurons by activation correlation",
)
def activation_matching_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: ActivationMatchingConfig,
) -> Plan:
    """Activation matching plan: ``A_k = lambda_k P_k``, ``B_k = P_k^T`` (options: :class:`ActivationMatchingConfig`:
    ``cost``, ``point``, ``reference``, ``max_batches``)."""
    k_all = len(members)
    reference = check_reference(config.reference, k_all)
    t0 = time.perf_counter()
    pairs = [(reference, k) for k in range(k_all) if k != reference]  # the costs read these cross blocks only
    stats = group_statistics(members, graph, data, point=config.point, max_batches=config.max_batches, pairs=pairs)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    states = [
        dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        for m in members
    ]
    dead = 0
    problems: list[dict[str, torch.Tensor]] = []
    keys: list[tuple[list[str], int]] = []
    for names in graph.tie_sets():
        per_member: dict[int, dict[str, torch.Tensor]] = {}
        for name in names:
            dead += int((stats[name].var() <= 0).sum())
            for k, c in activation_costs(stats[name], states, graph, name, reference, config.cost).items():
                check_finite(c, f"group {name!r}: activation cost against member {k}")
                per_member.setdefault(k, {})[name] = c
        for k, costs in per_member.items():
            problems.append(costs)
            keys.append((names, k))
    unit_costs, t_inner = tie_set_costs(graph, problems)
    t_cost = time.perf_counter() - t0
    cols_all, t_solve = assignments([uc.cost for uc in unit_costs])
    perms: dict[str, list[torch.Tensor]] = {
        name: [torch.arange(g.size) for _ in range(k_all)] for name, g in graph.groups.items()
    }
    for (_names, k), uc, cols in zip(keys, unit_costs, cols_all):
        for name, p in neuron_perms(graph, uc, cols).items():
            perms[name][k] = p
    plan = Plan.from_permutations(graph, perms, lambdas)
    plan.info.update(
        method="activation_matching",
        time_stats_s=t_stats,
        time_cost_s=t_cost,
        time_solve_s=t_solve + t_inner,
        stat_rows=next(iter(stats.values())).count if stats else 0,
        constant_neurons=dead,
    )
    return plan
