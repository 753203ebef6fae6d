"""Partial matching (Morelli & Eckstein, ICML 2026; DESIGN §4): which neurons share a slot, for K >= 2 members.

Per group, every member k != reference is partially matched to the reference: the ``s`` disjoint pairs of
minimum total cost (:func:`pyfusion.match.solvers.partial_assignments`). A *shared* slot is a reference neuron
matched by at least one member; the reference's unmatched neurons and each member's unmatched neurons are branch
slots. :class:`PartialAssignment` records the result (the slot of every member's neuron and the layout
``[shared (by reference neuron index) | branch_0 | ... | branch_{K-1}]``); :mod:`pyfusion.fuse.partial` turns it into
the plan's maps.

Costs: activations (:func:`partial_activation_assignments`, one batched solve of all groups) or weights
(:func:`partial_weight_assignments`: groups in forward order, each aligned through the input groups already
decided; with ``pcd`` also the outgoing weights, refined by coordinate descent until a sweep changes nothing).

Units and ties (attention heads): the matching is done per tie set on whole units. The unit cost is the sum over
the tie set's groups of the best inner matching cost of each pair of units (:mod:`pyfusion.match.units`), the
partial assignment matches ``num_matches`` *units*, and the slots of every group of the tie set follow from the
unit slots: member k's unit v in slot unit s puts its inner neuron ``inner(v)[d]`` in slot ``s * D + d``, with
``inner(v)`` the inner matching to the reference unit it shares the slot with (the identity for the reference's
units and for branch units). So a tie set's groups have the same unit-level layout, a multiple of D in neurons.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from pyfusion.graph.groups import FusionGraph
from pyfusion.match.activations import activation_costs
from pyfusion.match.align import Alignment, MatchedPairs
from pyfusion.match.solvers import partial_assignments
from pyfusion.match.units import UnitCost, neuron_pairs, tie_set_costs
from pyfusion.match.weights import weight_cost
from pyfusion.stats.activation_stats import ActivationStats

__all__ = [
    "PartialAssignment",
    "expand_unit_assignment",
    "partial_activation_assignments",
    "partial_weight_assignments",
    "slots_from_matches",
    "weight_feature_costs",
]


@dataclass
class PartialAssignment:
    """The slot structure of one group: where every member's neurons sit.

    Attributes:
        slot_of: K (n,) int64 arrays: the slot of member k's neuron j.
        layout: segment sizes ``(shared, branch_0, ..., branch_{K-1})``.
    """

    slot_of: list[np.ndarray]
    layout: tuple[int, ...]

    @classmethod
    def identity(cls, n: int, k_all: int) -> PartialAssignment:
        """Full fusion without alignment (every member's neuron j in slot j)."""
        return cls([np.arange(n, dtype=np.int64) for _ in range(k_all)], (n,) + (0,) * k_all)

    @property
    def shared(self) -> int:
        return self.layout[0]

    def shared_pairs(self, k: int, ref: int) -> tuple[np.ndarray, np.ndarray]:
        """(reference neurons, member-k neurons) sharing a slot, by slot order."""
        sk = self.slot_of[k]
        jk = np.flatnonzero(sk < self.shared)
        order = np.argsort(sk[jk], kind="stable")
        jk = jk[order]
        inv = np.full(self.shared, -1, dtype=np.int64)
        sr = self.slot_of[ref]
        ir = np.flatnonzero(sr < self.shared)
        inv[sr[ir]] = ir
        return inv[sk[jk]], jk

    def matched_pairs(self, k: int, ref: int) -> MatchedPairs:
        """:meth:`shared_pairs` as the alignment of member k's axes in this group."""
        return MatchedPairs(*self.shared_pairs(k, ref))


def slots_from_matches(
    n: int, k_all: int, ref: int, matches: Mapping[int, tuple[np.ndarray, np.ndarray]]
) -> PartialAssignment:
    """Slots of one group from the partial matchings of every member k != ref to the reference.

    Args:
        n: group width.
        k_all: K.
        ref: the reference member.
        matches: k -> (reference neurons, member-k neurons) of the matched pairs.

    Returns:
        The :class:`PartialAssignment` of the module docstring's rule.
    """
    used = np.zeros(n, dtype=bool)
    for ri, _ in matches.values():
        used[np.asarray(ri, dtype=np.int64)] = True
    shared_ref = np.flatnonzero(used)
    s = len(shared_ref)
    slot_of_ref_shared = np.full(n, -1, dtype=np.int64)
    slot_of_ref_shared[shared_ref] = np.arange(s)
    slot_of = [np.full(n, -1, dtype=np.int64) for _ in range(k_all)]
    branch = []
    for k in range(k_all):
        if k == ref:
            slot_of[k][shared_ref] = np.arange(s)
        else:
            ri, ci = (np.asarray(x, dtype=np.int64) for x in matches[k])
            slot_of[k][ci] = slot_of_ref_shared[ri]
        branch.append(np.flatnonzero(slot_of[k] < 0))
    start = s
    for k in range(k_all):
        slot_of[k][branch[k]] = start + np.arange(len(branch[k]))
        start += len(branch[k])
    return PartialAssignment(slot_of, (s, *(len(b) for b in branch)))


def expand_unit_assignment(
    graph: FusionGraph,
    uc: Mapping[int, UnitCost],
    name: str,
    units: PartialAssignment,
    matches: Mapping[int, tuple[np.ndarray, np.ndarray]],
) -> PartialAssignment:
    """The neuron-level slots of one group of a tie set from its unit-level slots (module docstring).

    Args:
        graph: neuron groups.
        uc: member k (!= reference) -> the tie set's unit costs against the reference (for the inner matchings).
        name: the group.
        units: the unit-level assignment of the tie set.
        matches: k -> (reference units, member units) of the matched pairs.
    """
    g = graph.groups[name]
    d = g.unit_size
    if d == 1:
        return PartialAssignment([s.copy() for s in units.slot_of], tuple(units.layout))
    slot_of = []
    for k, su in enumerate(units.slot_of):
        frame = np.tile(np.arange(d, dtype=np.int64), (g.units, 1))  # member unit v: inner neurons in slot order
        if k in matches and len(matches[k][0]):
            ru, mu = (np.asarray(x, dtype=np.int64) for x in matches[k])
            _, mem = neuron_pairs(graph, uc[k], name, ru, mu)
            frame[mu] = mem.reshape(len(mu), d) - mu[:, None] * d
        slots = np.empty(g.size, dtype=np.int64)
        neurons = np.arange(g.units, dtype=np.int64)[:, None] * d + frame
        slots[neurons.reshape(-1)] = (np.asarray(su, dtype=np.int64)[:, None] * d + np.arange(d)).reshape(-1)
        slot_of.append(slots)
    return PartialAssignment(slot_of, tuple(int(x) * d for x in units.layout))


class _MemberMaps(Mapping[str, Alignment]):
    """group -> member k's matched pairs, computed on first access (a tensor touches only a few groups)."""

    def __init__(self, assigns: Mapping[str, PartialAssignment], k: int, ref: int):
        self._assigns, self._k, self._ref = assigns, k, ref
        self._cache: dict[str, Alignment] = {}

    def __getitem__(self, name: str) -> Alignment:
        if name not in self._cache:
            self._cache[name] = self._assigns[name].matched_pairs(self._k, self._ref)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._assigns)

    def __len__(self) -> int:
        return len(self._assigns)


def weight_feature_costs(
    states: Sequence[Mapping[str, Tensor]],
    graph: FusionGraph,
    name: str,
    assigns: Mapping[str, PartialAssignment],
    ref: int,
    *,
    outgoing: bool,
    cost: str = "sqdist",
) -> dict[int, Tensor]:
    """Costs (n, n) between the reference's and each member's neurons of group ``name`` from their weights.

    :func:`pyfusion.match.weights.weight_cost` for every member k != ref, the other groups' axes aligned through
    their current :class:`PartialAssignment` (only the shared slots member k contributes to; a tensor with an axis
    in a group without an assignment is left out).

    Args:
        states: K float64 state dicts.
        assigns: group -> current assignment (groups without one are not aligned yet).
        cost: "sqdist" or "correlation".

    Returns:
        member k (!= ref) -> (n, n) float64 cost, rows = reference neurons.
    """
    by_key = graph.refs_by_key()
    out = {}
    for k in range(len(states)):
        if k != ref:
            maps = _MemberMaps(assigns, k, ref)
            out[k] = weight_cost(states[ref], states[k], graph, name, maps, outgoing=outgoing, cost=cost, by_key=by_key)
    return out


def _tie_set_partial(
    graph: FusionGraph,
    names: list[str],
    k_all: int,
    ref: int,
    unit_costs: Mapping[int, UnitCost],
    solutions: Mapping[int, tuple[np.ndarray, np.ndarray]],
) -> dict[str, PartialAssignment]:
    """Neuron-level assignments of the groups of one tie set from the unit-level partial matchings."""
    units = slots_from_matches(graph.groups[names[0]].units, k_all, ref, solutions)
    return {name: expand_unit_assignment(graph, unit_costs, name, units, solutions) for name in names}


def partial_activation_assignments(
    stats: Mapping[str, ActivationStats],
    states: Sequence[Mapping[str, Tensor]],
    graph: FusionGraph,
    ref: int,
    num_matches: Mapping[str, int],
    cost: str,
) -> tuple[dict[str, PartialAssignment], float]:
    """Partial matching of every tie set on activation costs; all (tie set, member) problems in one solver call.

    Args:
        stats: group -> statistics (block k = member k).
        states: K state dicts (for the dead-neuron tie-break features).
        graph: neuron groups.
        ref: the reference member.
        num_matches: group -> units to match per member (neurons for ordinary groups; the same for every group
            of a tie set: the first one's is used).
        cost: "sqdist" or "correlation".

    Returns:
        (group -> assignment, seconds in the solver).
    """
    k_all = len(states)
    problems: list[dict[str, Tensor]] = []
    keys: list[tuple[int, int]] = []
    tie_sets = graph.tie_sets()
    for t, names in enumerate(tie_sets):
        per_member: dict[int, dict[str, Tensor]] = {}
        for name in names:
            for k, c in activation_costs(stats[name], states, graph, name, ref, cost).items():
                per_member.setdefault(k, {})[name] = c
        for k, costs in per_member.items():
            problems.append(costs)
            keys.append((t, k))
    unit_costs, t_inner = tie_set_costs(graph, problems)
    sol, t_solve = partial_assignments([uc.cost for uc in unit_costs], [num_matches[tie_sets[t][0]] for t, _ in keys])
    per_set: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    ucs: dict[int, dict[int, UnitCost]] = {}
    for (t, k), m, uc in zip(keys, sol, unit_costs):
        per_set.setdefault(t, {})[k] = m
        ucs.setdefault(t, {})[k] = uc
    assigns: dict[str, PartialAssignment] = {}
    for t, names in enumerate(tie_sets):
        assigns.update(_tie_set_partial(graph, names, k_all, ref, ucs.get(t, {}), per_set.get(t, {})))
    return {name: assigns[name] for name in graph.groups}, t_solve + t_inner


def partial_weight_assignments(
    states: Sequence[Mapping[str, Tensor]],
    graph: FusionGraph,
    ref: int,
    num_matches: Mapping[str, int],
    *,
    pcd: bool,
    sweeps: int,
    cost: str,
) -> tuple[dict[str, PartialAssignment], int, float]:
    """Partial matching of every tie set on weight costs.

    Without ``pcd``: one pass over the tie sets in forward order, each aligned through the groups before it (an
    input group not planned yet is left out of the features). With ``pcd``: every group starts as the identity and
    sweeps re-solve each tie set under its neighbours' current assignments (incoming and outgoing weights), until
    a sweep changes nothing or after ``sweeps`` sweeps (coordinate descent; the paper uses 10).

    Args:
        states: K float64 state dicts (parameters and buffers).
        graph: neuron groups.
        ref: the reference member.
        num_matches: group -> units to match per member (see :func:`partial_activation_assignments`).
        pcd: use the outgoing weights too, with coordinate descent.
        sweeps: the most sweeps (pcd).
        cost: "sqdist" or "correlation".

    Returns:
        (group -> assignment, sweeps done, seconds in the solver).
    """
    k_all = len(states)
    others = [k for k in range(k_all) if k != ref]
    assigns: dict[str, PartialAssignment] = {}
    if pcd:
        assigns = {name: PartialAssignment.identity(g.size, k_all) for name, g in graph.groups.items()}
    t_solve = 0.0
    done = 0
    for _ in range(sweeps if pcd else 1):
        done += 1
        changed = False
        for names in graph.tie_sets():
            per_group = {
                name: weight_feature_costs(states, graph, name, assigns, ref, outgoing=pcd, cost=cost) for name in names
            }
            unit_costs, dt = tie_set_costs(graph, [{name: per_group[name][k] for name in names} for k in others])
            t_solve += dt
            sol, dt = partial_assignments([uc.cost for uc in unit_costs], [num_matches[names[0]]] * len(others))
            t_solve += dt
            new = _tie_set_partial(graph, names, k_all, ref, dict(zip(others, unit_costs)), dict(zip(others, sol)))
            for name in names:
                old = assigns.get(name)
                if old is None or any(not np.array_equal(a, b) for a, b in zip(old.slot_of, new[name].slot_of)):
                    changed = True
                assigns[name] = new[name]
        if not changed:
            break
    return {name: assigns[name] for name in graph.groups}, done, t_solve
