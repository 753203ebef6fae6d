"""Units and ties (notes/IR.md §1): matching whole units (attention heads) and, inside matched units, inner neurons.

A group with ``unit_size = D > 1`` holds ``U = size / D`` units (heads) of D inner neurons (within-head dims); the
groups of one tie set (the q/k group and the v/o group of an attention layer: ``FusionGraph.tie_sets()``) share
one unit-level map. Every matching method reduces such a tie set to one problem over units:

* the cost between reference unit u and member unit v is the sum over the tie set's groups of the best inner
  matching cost of the (D x D) block ``C_g[u*D:(u+1)*D, v*D:(v+1)*D]`` of the group's neuron-level cost ``C_g``:
  an inner linear assignment per (u, v) where the inner factor is free (``D > 1``: within-head dims), the entry
  itself where it is pinned (``D = 1``: rotary q/k dims are rep factors, not inner neurons). All inner problems
  of all tie sets and members are solved in one batched call of :func:`pyfusion.ops.linear_assignment`;
* the methods solve one unit-level problem per tie set and member on that (U, U) cost (an assignment, a partial
  assignment, a transport plan, a clustering), the same for all its groups;
* the neuron-level maps follow from the unit-level solution and the inner matchings of the chosen pairs
  (:meth:`pyfusion.graph.NeuronGroup.neuron_permutation`): block (slot unit s, member unit u) of a group's map is
  ``coef * P_{s,u}`` with ``P_{s,u}`` the inner permutation of the pair, the shape ``Plan.validate`` checks.

For ordinary groups (D = 1, untied) the unit cost is the neuron cost and nothing else changes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pyfusion.graph.groups import FusionGraph, NeuronGroup
from pyfusion.ops.assignment import linear_assignment

__all__ = ["UnitCost", "neuron_map", "neuron_pairs", "neuron_perms", "tie_set_costs", "unit_frames"]


@dataclass
class UnitCost:
    """The unit-level problem of one tie set and member.

    Attributes:
        names: the tie set's groups.
        cost: (U, U) float64, rows = reference units: the sum over ``names`` of the best inner matching costs.
        inner: group -> (U, U, D) long, ``inner[u, v, d]`` = the member's inner neuron matched to the reference's
            inner neuron d when reference unit u is matched to member unit v; None for groups with D = 1.
    """

    names: list[str]
    cost: Tensor
    inner: dict[str, Tensor | None]

    @property
    def units(self) -> int:
        return int(self.cost.shape[0])


def _blocks(c: Tensor, g: NeuronGroup) -> Tensor:
    """(U * U, D, D) blocks of a neuron-level cost (n, n): block u * U + v is reference unit u x member unit v."""
    u, d = g.units, g.unit_size
    return c.reshape(u, d, u, d).permute(0, 2, 1, 3).reshape(u * u, d, d)


def tie_set_costs(
    graph: FusionGraph, problems: Sequence[Mapping[str, Tensor]], *, maximize: bool = False
) -> tuple[list[UnitCost], float]:
    """Unit-level costs of tie sets from the neuron-level costs of their groups (module docstring).

    Args:
        graph: the neuron groups.
        problems: one mapping per problem (a tie set and a member): group -> (n, n) float64 neuron cost (rows =
            reference neurons) for every group of the tie set.
        maximize: the costs are similarities (weight matching): the inner matchings maximise them.

    Returns:
        (one :class:`UnitCost` per problem, seconds in the solver).
    """
    blocks: list[np.ndarray] = []
    where: list[tuple[int, str, int]] = []  # (problem, group, first block)
    for p, costs in enumerate(problems):
        for name, c in costs.items():
            g = graph.groups[name]
            if tuple(c.shape) != (g.size, g.size):
                raise ValueError(f"group {name!r}: the neuron cost must be ({g.size}, {g.size}); got {tuple(c.shape)}")
            if g.unit_size > 1:
                where.append((p, name, len(blocks)))
                blocks.extend(np.ascontiguousarray(b) for b in _blocks(c.detach().cpu().double(), g).numpy())
    t0 = time.perf_counter()
    res = linear_assignment(blocks, maximize=maximize) if blocks else None
    dt = time.perf_counter() - t0
    solved: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for p, name, start in where:
        g = graph.groups[name]
        nb = g.units * g.units
        cols = torch.as_tensor(np.stack(res.col_ind[start : start + nb]), dtype=torch.long)
        tot = torch.as_tensor(np.asarray(res.cost[start : start + nb]), dtype=torch.float64)
        solved[(p, name)] = (tot.reshape(g.units, g.units), cols.reshape(g.units, g.units, g.unit_size))
    out = []
    for p, costs in enumerate(problems):
        names = list(costs)
        units = {graph.groups[n].units for n in names}
        if len(units) != 1:
            raise ValueError(f"groups {names} of one tie set have different unit counts {sorted(units)}")
        u = units.pop()
        total = torch.zeros(u, u, dtype=torch.float64)
        inner: dict[str, Tensor | None] = {}
        for name, c in costs.items():
            if graph.groups[name].unit_size > 1:
                tot, cols = solved[(p, name)]
                total += tot
                inner[name] = cols
            else:
                total += c.detach().cpu().double()
                inner[name] = None
        out.append(UnitCost(names, total, inner))
    return out, dt


def _inner_of(uc: UnitCost, g: NeuronGroup, ref_units: Tensor, member_units: Tensor) -> Tensor:
    """(len(pairs), D) member inner indices of the pairs (ref unit, member unit); the identity for D = 1."""
    inner = uc.inner.get(g.name)
    if inner is None:
        return torch.arange(g.unit_size).expand(len(ref_units), g.unit_size)
    return inner[ref_units, member_units]


def neuron_perms(graph: FusionGraph, uc: UnitCost, unit_cols: Tensor | np.ndarray) -> dict[str, Tensor]:
    """Neuron-level permutations of a unit assignment: slot unit s holds member unit ``unit_cols[s]``, and its
    inner neuron d the member's inner neuron matched to the reference's d.

    Returns:
        group -> (n,) long, slot -> member neuron (for :meth:`pyfusion.fuse.Plan.from_permutations`).
    """
    cols = torch.as_tensor(np.asarray(unit_cols), dtype=torch.long)
    rows = torch.arange(cols.numel())
    out = {}
    for name in uc.names:
        g = graph.groups[name]
        inner = None if uc.inner.get(name) is None else _inner_of(uc, g, rows, cols)
        out[name] = g.neuron_permutation(cols, inner)
    return out


def neuron_pairs(
    graph: FusionGraph, uc: UnitCost, name: str, ref_units: np.ndarray, member_units: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Neuron pairs of matched unit pairs: (reference neurons, member neurons), unit pair by unit pair, each unit's
    inner neurons in the reference's inner order."""
    g = graph.groups[name]
    d = g.unit_size
    ru = torch.as_tensor(np.asarray(ref_units), dtype=torch.long)
    mu = torch.as_tensor(np.asarray(member_units), dtype=torch.long)
    inner = _inner_of(uc, g, ru, mu)
    ref = (ru[:, None] * d + torch.arange(d)).reshape(-1)
    mem = (mu[:, None] * d + inner).reshape(-1)
    return ref.numpy(), mem.numpy()


def neuron_map(graph: FusionGraph, uc: UnitCost, name: str, unit_map: Tensor) -> Tensor:
    """Neuron-level map (S * D, n) of a unit-level map (S, U) whose slot units are the reference's units (S = U):
    block (s, u) is ``unit_map[s, u] * P_{s,u}`` with ``P_{s,u}`` the inner matching of the pair (transport)."""
    g = graph.groups[name]
    u, d = g.units, g.unit_size
    if d == 1:
        return unit_map.to(torch.float64).clone()
    s_units = int(unit_map.shape[0])
    inner = uc.inner.get(name)
    out = torch.zeros(s_units, d, u, d, dtype=torch.float64)
    ss, uu, dd = torch.meshgrid(torch.arange(s_units), torch.arange(u), torch.arange(d), indexing="ij")
    ee = inner[ss, uu, dd] if inner is not None else dd
    out[ss, dd, uu, ee] = unit_map.to(torch.float64)[ss, uu]
    return out.reshape(s_units * d, u * d)


def unit_frames(graph: FusionGraph, uc: UnitCost, unit_cols: Tensor | np.ndarray) -> dict[str, Tensor]:
    """The inner frame of every member unit given its match to the reference: group -> (U, D) long, row v the
    member's inner neurons of unit v in the order of the reference unit it is matched to (``unit_cols[s] = v``
    for slot / reference unit s); the identity for D = 1."""
    cols = torch.as_tensor(np.asarray(unit_cols), dtype=torch.long)
    rows = torch.arange(cols.numel())
    out = {}
    for name in uc.names:
        g = graph.groups[name]
        frame = torch.arange(g.unit_size).repeat(g.units, 1)
        if uc.inner.get(name) is not None:
            frame[cols] = _inner_of(uc, g, rows, cols)
        out[name] = frame
    return out
