"""Partial fusion by partial assignment (Morelli & Eckstein, ICML 2026; DESIGN §4), for K >= 2 members.

Per neuron group of width n and fusion level alpha, ``iso = floor(alpha * n + 0.5)`` neurons of each member stay
isolated (round half up; Python's ``round`` would round half to even, so alpha * n = 2.5 would give 2 but 3.5
would give 4) and ``s = n - iso`` are fused. Which neurons to fuse and how to pair them come from ONE partial
assignment per (group, member) pair: the ``s`` disjoint pairs of minimum total cost between the reference
member's neurons and member k's (``pyfusion.ops.linear_assignment(num_matches=s)``). With uniform masses this is
exactly the paper's partial OT with a sink (mass alpha/(1+alpha), point-sink cost 0, sink-sink forbidden): a
neuron sent to the sink is isolated.

K members (the rule, reducing exactly to the two-member construction at K = 2): member ``reference`` (default 0)
is the reference. Every other member k is partially matched to it with ``num_matches = s``. A *shared* slot is a
reference neuron matched by at least one member; it is built from the reference neuron and every member
neuron matched to it, with the lambdas renormalised over these contributors (``A_k = lambda_k / sum_{c in
contributors} lambda_c``; if that sum is 0 the contributors share equally, which never reaches the output since
only zero-weight members read such a slot). The reference's unmatched neurons are its branch slots, and each
member's n - s unmatched neurons are its branch slots. So every non-reference member keeps exactly ``iso``
isolated neurons, the group has ``n + (K - 1) * iso`` slots, alpha = 1 is the lambda-weighted ensemble exactly,
alpha = 0 is activation / weight matching to the reference, and lambda one-hot on member m reproduces member m
(every slot member m reads is built from member m alone). For K = 2 the shared slots are exactly the matched
pairs with weights (lambda_0, lambda_1), the paper's construction.

Layout of every group: ``[shared (by reference neuron index) | branch_0 | ... | branch_{K-1}]`` (each branch by
neuron index). ``A_k`` carries the coefficients above, ``B_k`` is member k's 0/1 position map; the one builder
(``W' = sum_k A_k W_k B_k``) assembles the weights, so the blocks (branch_k out, branch_j in), j != k, are
exactly zero.

Neuron features (each gives an (n, n) cost between the reference's and member k's neurons):

* ``"weights"`` (no data): the incoming weights (producer rows and biases, concatenated over every layer that
  writes the group, e.g. all layers of a residual stream). The input axes are aligned through the input group's
  plan: only the shared input slots to which member k contributes enter (the paper restricts rows to fused
  inputs too); groups are planned in forward order and an input group not planned yet (the inner group of a
  later residual block) is left out of the features.
* ``"activations"``: statistics of the members' activations on calibration data (``point`` "pre" / "post"),
  cost ``"sqdist"`` (mean squared difference, the paper's) or ``"correlation"`` (1 - Pearson); shares the cost
  function (and dead-neuron tie-breaking) of ``activation_matching``. All groups' problems are independent and
  are solved in one batched assignment call.
* ``"pcd"``: incoming and outgoing weights (consumer columns, aligned through the consumer's output group), one
  squared-Euclidean cost for each side normalised to sum 1 and averaged, refined by coordinate descent: all
  plans start as the identity, then sweeps over the groups re-solve each group under its neighbours' current
  plans, until a sweep changes nothing (or ``sweeps``; the paper uses 10).

Units and ties (attention heads; notes/IR.md §1). In a group with ``unit_size = D > 1`` (a head group) alpha counts
*units*: ``floor(alpha * U + 0.5)`` of each member's U heads stay isolated, and every group of a tie set (the q/k
and v/o groups of one attention layer) gets the same count, so a head is shared or a branch as a whole, with its
q, k, v rows and its output-projection columns. Tied groups must be given the same alpha. The unit-level
matching is the rule above applied to units (:mod:`pyfusion.match.partial`: the cost between two heads is the
sum over the tie set's groups of the best inner matching of their within-head dims); inside a shared head the
members' inner dims are matched, so layouts in neurons are multiples of D, and block (slot head, member head) of
every map is a scaled permutation. A grouped-query unit is a key/value head with its query heads.

Normalized groups (a residual stream read by LayerNorm / RMSNorm modules). Widening a stream is not a per-neuron
operation, so the fused normalizer is the builder's member-view rule (:class:`pyfusion.nn.norm.MemberViewNorm`):
``y = sum_k A_k norm_k(B_k x)``. In the terms above: member k reads its own n neurons from the slots its
``B_k`` maps them to (its shared slots and its branch slots), normalizes them with its own module (its own
statistics over exactly its own neurons, its own weight and bias), and the results are written back with
``A_k``, so a shared slot of the stream receives ``sum_{k in contributors} A_k[s, j] norm_k(...)_j``, the
renormalised-lambda combination of the contributors' normalized values, and a branch slot of member k receives
member k's normalized value. Consequences: at alpha = 1 every member normalizes its own branch (the ensemble,
exactly); at alpha = 0 with permutation maps this is one normalizer with the combined parameters; and a model
fused with a neuron-permuted copy of itself is the model at every alpha (each member's view is then the model's
stream). A stream normalized by functional code inside a bigger module (not a module of its own) cannot be
wrapped: such a group may be permuted but not widened, and a non-zero alpha for it raises naming the module
(set it to 0 with the dict form, ``alpha={group: 0.0, "*": a}``).

The matching (costs, partial assignments, the slot rule) is :mod:`pyfusion.match.partial`; this module checks
the options, resolves alpha per group and turns the slot structure into the maps ``A_k``, ``B_k``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.config import PartialConfig, alpha_number
from pyfusion.fuse.plan import (
    GroupPlan,
    Plan,
    SlotMaps,
    permute_only,
    refuse_widening,
    refuse_width_pin,
    width_pin,
    zero_hint,
)
from pyfusion.fuse.registry import register_method
from pyfusion.fuse.validate import check_reference
from pyfusion.graph.groups import FusionGraph
from pyfusion.match.partial import PartialAssignment, partial_activation_assignments, partial_weight_assignments
from pyfusion.stats.groups import group_statistics

__all__ = ["assignment_group_plan", "isolated_count", "partial_plan", "resolve_alpha", "tie_set_alphas"]


def isolated_count(alpha: float, n: int) -> int:
    """Neurons of each member left isolated in a group of width n: ``floor(alpha * n + 0.5)`` (round half up)."""
    return int(math.floor(alpha * n + 0.5))


def resolve_alpha(alpha: Any, graph: FusionGraph) -> dict[str, float]:
    """Per-group alpha from a float, a list (one per group, graph order) or a dict by group name.

    A dict may hold the key ``"*"``: the value of every group it does not name; without it every group must be
    named.

    Raises:
        ValueError: values outside [0, 1] or not finite, a list of the wrong length, unknown or missing names
            (the message lists the graph's groups).
    """
    names = list(graph.groups)
    if isinstance(alpha, Mapping):
        unknown = [k for k in alpha if k != "*" and k not in graph.groups]
        if unknown:
            raise ValueError(f"alpha names unknown groups {unknown}; the groups are {names}")
        if "*" not in alpha:
            missing = [n for n in names if n not in alpha]
            if missing:
                raise ValueError(
                    f"alpha (a dict) misses groups {missing}; name every group of {names} or give a default "
                    "under the key '*'"
                )
        default = alpha.get("*")
        return {n: alpha_number(alpha[n] if n in alpha else default, f"alpha[{n!r}]") for n in names}
    if isinstance(alpha, (list, tuple, np.ndarray)) or (isinstance(alpha, Tensor) and alpha.ndim > 0):
        vals = list(alpha)
        if len(vals) != len(names):
            raise ValueError(f"alpha (a list) must have one value per group ({len(names)}: {names}); got {len(vals)}")
        return {n: alpha_number(v, f"alpha[{i}]") for i, (n, v) in enumerate(zip(names, vals))}
    x = alpha_number(alpha, "alpha")
    return dict.fromkeys(names, x)


def tie_set_alphas(alphas: Mapping[str, float], graph: FusionGraph) -> dict[str, float]:
    """Per-group alpha checked to be the same for every group of a tie set (a tie set has one unit-level layout).

    Raises:
        ValueError: tied groups given different alphas (naming them).
    """
    for names in graph.tie_sets():
        vals = {alphas[n] for n in names}
        if len(vals) > 1:
            got = ", ".join(f"{n!r}: {alphas[n]}" for n in names)
            raise ValueError(
                f"groups {names} are one tie set (the heads of one attention layer move together): they need the same "
                f"alpha; got {{{got}}}"
            )
    return dict(alphas)


def assignment_group_plan(asg: PartialAssignment, lambdas: Sequence[float]) -> GroupPlan:
    """The maps of one group: A_k (slots, n) with the renormalised lambdas on shared slots and 1 on branch slots;
    B_k = member k's 0/1 position map (see the module docstring)."""
    k_all = len(asg.slot_of)
    n = len(asg.slot_of[0])
    slots = sum(asg.layout)
    s = asg.shared
    contrib = np.zeros((k_all, s), dtype=bool)
    for k in range(k_all):
        sk = asg.slot_of[k]
        contrib[k, sk[sk < s]] = True
    lam = np.asarray(lambdas, dtype=np.float64)[:, None] * contrib
    tot = lam.sum(0)
    cnt = contrib.sum(0)
    coef = np.where(tot > 0, lam / np.where(tot > 0, tot, 1.0), contrib / np.maximum(cnt, 1))
    slot_of, coefs = [], []
    for k in range(k_all):
        sk = torch.as_tensor(asg.slot_of[k])
        vals = torch.ones(n, dtype=torch.float64)
        in_shared = sk < s
        vals[in_shared] = torch.as_tensor(coef[k])[sk[in_shared]]
        slot_of.append(sk)
        coefs.append(vals)
    # the dense maps are made on first read, with the builder's selections (SlotMaps): a plan that is only built
    # never forms them
    maps_a = SlotMaps("A", slots, slot_of, coefs)
    maps_b = SlotMaps("B", slots, slot_of, [None] * k_all)
    return GroupPlan(maps_a, maps_b, tuple(int(x) for x in asg.layout))  # type: ignore[arg-type]


@register_method(
    "partial",
    config=PartialConfig,
    needs_data="optional",
    summary="partial fusion: fuse the most similar neurons, keep the rest per member",
)
def partial_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: PartialConfig,
) -> Plan:
    """Partial fusion plan (module docstring; options: :class:`PartialConfig`: ``alpha``, ``features``, ``cost``,
    ``point``, ``reference``, ``sweeps``, ``max_batches``)."""
    t_start = time.perf_counter()
    k_all = len(members)
    alphas = resolve_alpha(config.alpha, graph)
    features = config.features
    if features is None:
        features = "activations" if data is not None else "weights"
    cost = "sqdist" if config.cost is None else config.cost
    ref = check_reference(config.reference, k_all)
    if features == "activations" and data is None:
        raise ValueError("features='activations' needs calibration data: pass data=DataLoader or a list of batches")
    unit_alphas = tie_set_alphas(alphas, graph)
    # per tie set: isolated units (neurons for ordinary groups), the same for all its groups
    iso_units = {name: isolated_count(unit_alphas[name], g.units) for name, g in graph.groups.items()}
    for names in graph.tie_sets():
        hit = permute_only(graph, names) if iso_units[names[0]] > 0 else None
        if hit is not None:
            raise refuse_widening("partial", hit, zero_hint(names, "alpha", config.alpha))
        pin = width_pin(graph, names) if iso_units[names[0]] > 0 else None
        if pin is not None:
            raise refuse_width_pin("partial", pin, zero_hint(names, "alpha", config.alpha))
    isolated = {name: iso_units[name] * g.unit_size for name, g in graph.groups.items()}
    matches_n = {name: graph.groups[name].units - iso_units[name] for name in graph.groups}
    info: dict[str, Any] = {"method": "partial", "features": features, "alpha": alphas, "isolated": isolated}
    t_stats = 0.0
    if features == "activations":
        t0 = time.perf_counter()
        pairs = [(ref, k) for k in range(len(members)) if k != ref]  # the costs read these cross blocks only
        stats = group_statistics(members, graph, data, point=config.point, max_batches=config.max_batches, pairs=pairs)
        t_stats = time.perf_counter() - t0
        states = [
            dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
            for m in members
        ]
        assigns, t_solve = partial_activation_assignments(stats, states, graph, ref, matches_n, cost)
        info["stat_rows"] = next(iter(stats.values())).count if stats else 0
    else:
        states = [
            {
                n: t.detach().to("cpu", torch.float64)
                for n, t in list(m.named_parameters(remove_duplicate=False))
                + list(m.named_buffers(remove_duplicate=False))
            }
            for m in members
        ]
        assigns, info["sweeps"], t_solve = partial_weight_assignments(
            states, graph, ref, matches_n, pcd=features == "pcd", sweeps=int(config.sweeps), cost=cost
        )
    groups = {name: assignment_group_plan(asg, lambdas) for name, asg in assigns.items()}
    info.update(
        layouts={name: asg.layout for name, asg in assigns.items()},
        time_stats_s=t_stats,
        time_solve_s=t_solve,
        time_match_s=time.perf_counter() - t_start,
    )
    return Plan(tuple(float(x) for x in lambdas), groups, info)
