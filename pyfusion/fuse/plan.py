"""Fusion plans (DESIGN §3): per neuron group and member k, the maps A_k (slots x n_k) and B_k (n_k x slots).

The fused layer is ``W' = sum_k A_k^{out} W_k B_k^{in}``, ``b' = sum_k A_k b_k``. Vanilla averaging is
``A_k = lambda_k I, B_k = I``; permutation alignment is ``A_k = lambda_k P_k, B_k = P_k^T``; OT fusion uses soft
transport maps; partial fusion uses more slots than neurons with the layout ``[shared | branch_1 | ... | branch_K]``.
Maps are stored densely in float64: exact, and small next to the weights they act on (n x slots per group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyfusion.fuse.validate import all_finite
from pyfusion.graph.groups import FusionGraph, Normalizer

__all__ = ["GroupPlan", "Plan", "permute_only", "refuse_widening", "unit_map", "zero_hint"]


def _unit_blocks_problem(m: Tensor, d: int) -> str:
    """'' when every (d x d) block of ``m`` (slots x n) is zero or ``coef * P`` with P a permutation, else why not."""
    s, n = m.shape
    blocks = m.reshape(s // d, d, n // d, d).permute(0, 2, 1, 3)  # (slot unit, member unit, d, d)
    nz = blocks != 0
    rows, cols = nz.sum(3), nz.sum(2)  # non-zeros per row / column inside each block
    used = nz.any(3).any(2)
    bad = used & ~((rows == 1).all(2) & (cols == 1).all(2))
    if bool(bad.any()):
        su, mu = (int(i) for i in bad.nonzero()[0])
        return f"block (slot unit {su}, member unit {mu}) is not a scaled permutation"
    vals = blocks.sum(3)  # each row's single entry
    spread = (vals.amax(2) - vals.amin(2)).abs()
    if bool((spread[used] > 1e-12 * vals.abs().amax().clamp_min(1)).any()):
        return "a block mixes different coefficients"
    return ""


def unit_map(m: Tensor, unit_size: int) -> Tensor:
    """Unit-level map of a neuron-level map of a unit group: block (s, u) summed and divided by ``unit_size``
    (the coefficient ``coef`` of a block ``coef * P_{s,u}``). ``m`` is (slots, n); returns (slots/D, n/D)."""
    if unit_size == 1:
        return m
    s, n = m.shape
    return m.reshape(s // unit_size, unit_size, n // unit_size, unit_size).sum((1, 3)) / unit_size


@dataclass
class GroupPlan:
    """The maps of one neuron group.

    Attributes:
        A: K tensors (slots, n_k), float64: how member k's neurons build each slot's incoming weights.
        B: K tensors (n_k, slots), float64: where member k's input neurons are found among the slots.
        layout: segment sizes ``(shared, branch_1, ..., branch_K)`` summing to ``slots``; full fusion is
            ``(n, 0, ..., 0)``.
        perms: for a plan made by :meth:`Plan.from_permutations`, member k's neuron in each slot (n,) per member: a
            hint that lets the builder's permutation path check the maps (two non-zero counts and a gather per map)
            instead of searching them (a ``nonzero`` pass: 0.1 s of an MLP-1024 pair's build). Only a hint: the
            maps are the truth, and a hint they contradict is ignored.
    """

    A: list[Tensor]
    B: list[Tensor]
    layout: tuple[int, ...]
    perms: list[Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def slots(self) -> int:
        return int(self.A[0].shape[0])

    def validate(self, name: str, sizes: Sequence[int]) -> None:
        """Check shapes, finiteness and the layout against member widths ``sizes``.

        Raises:
            ValueError: naming the group, the map and expected vs actual shape.
        """
        k = len(sizes)
        if len(self.A) != k or len(self.B) != k:
            raise ValueError(f"plan for group {name!r}: expected {k} A and B maps; got {len(self.A)} and {len(self.B)}")
        if len(self.layout) != k + 1 or any(s < 0 for s in self.layout) or sum(self.layout) != self.slots:
            raise ValueError(
                f"plan for group {name!r}: layout must be {k + 1} non-negative segment sizes summing to slots="
                f"{self.slots}; got {self.layout}"
            )
        for i, (a, b, n) in enumerate(zip(self.A, self.B, sizes)):
            if tuple(a.shape) != (self.slots, n):
                raise ValueError(
                    f"plan for group {name!r}: A[{i}] must have shape ({self.slots}, {n}); got {tuple(a.shape)}"
                )
            if tuple(b.shape) != (n, self.slots):
                raise ValueError(
                    f"plan for group {name!r}: B[{i}] must have shape ({n}, {self.slots}); got {tuple(b.shape)}"
                )
            if not (all_finite(a) and all_finite(b)):
                raise ValueError(f"plan for group {name!r}: A[{i}] or B[{i}] contains NaN or inf")


@dataclass
class Plan:
    """A complete fusion plan: member weights and one :class:`GroupPlan` per neuron group.

    Attributes:
        lambdas: member weights (non-negative, summing to 1).
        groups: group name -> maps. A group of the graph missing here is treated as vanilla averaging.
        info: method diagnostics (e.g. iterations, costs, per-stage times).
    """

    lambdas: tuple[float, ...]
    groups: dict[str, GroupPlan]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_members(self) -> int:
        return len(self.lambdas)

    @classmethod
    def identity(cls, graph: FusionGraph, lambdas: Sequence[float]) -> Plan:
        """Vanilla averaging: ``A_k = lambda_k I``, ``B_k = I`` for every group."""
        groups = {}
        for name, g in graph.groups.items():
            eye = torch.eye(g.size, dtype=torch.float64)
            groups[name] = GroupPlan(
                [lam * eye for lam in lambdas], [eye.clone() for _ in lambdas], (g.size,) + (0,) * len(lambdas)
            )
        return cls(tuple(float(x) for x in lambdas), groups)

    @classmethod
    def from_permutations(
        cls, graph: FusionGraph, perms: Mapping[str, Sequence[Tensor]], lambdas: Sequence[float]
    ) -> Plan:
        """Full fusion from permutations: ``perms[g][k][s]`` is member k's neuron in slot s of group g.

        ``A_k = lambda_k P_k`` and ``B_k = P_k^T`` with ``P_k[s, perms[g][k][s]] = 1``. Groups missing from
        ``perms`` get the identity permutation.
        """
        groups = {}
        for name, g in graph.groups.items():
            maps_a, maps_b, idxs = [], [], []
            p = perms.get(name)
            n = g.size
            ar = torch.arange(n)
            for k, lam in enumerate(lambdas):
                idx = ar if p is None else torch.as_tensor(p[k], dtype=torch.long).cpu()
                ok = idx.shape == (n,) and (n == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n))
                if not ok or not bool((torch.bincount(idx, minlength=n) == 1).all()):
                    raise ValueError(f"perms[{name!r}][{k}] must be a permutation of range({n}); got {idx.tolist()}")
                # A_k = lambda_k P_k and B_k = P_k^T written directly (no dense product or transposed copy: 3 dense
                # (n, n) passes per map were 0.1 s of an MLP-1024 pair's activation matching)
                a = torch.zeros(n, n, dtype=torch.float64)
                a[ar, idx] = float(lam)
                b = torch.zeros(n, n, dtype=torch.float64)
                b[idx, ar] = 1.0
                maps_a.append(a)
                maps_b.append(b)
                idxs.append(idx.clone())
            groups[name] = GroupPlan(maps_a, maps_b, (n,) + (0,) * len(lambdas), perms=idxs)
        return cls(tuple(float(x) for x in lambdas), groups)

    @classmethod
    def ensemble(cls, graph: FusionGraph, lambdas: Sequence[float]) -> Plan:
        """The ensemble as a plan: every group's slots are ``[branch_1 | ... | branch_K]`` (layout
        ``(0, n, ..., n)``), ``A_k`` and ``B_k`` the 0/1 maps of member k's neurons into its own branch; the
        outputs carry lambda_k, so the built network computes ``sum_k lambda_k f_k(x)`` (DESIGN §8, alpha = 1)."""
        k_all = len(lambdas)
        groups = {}
        for name, g in graph.groups.items():
            n = g.size
            maps_a, maps_b = [], []
            for k in range(k_all):
                a = torch.zeros(k_all * n, n, dtype=torch.float64)
                a[k * n + torch.arange(n), torch.arange(n)] = 1.0
                maps_a.append(a)
                maps_b.append(a.T.contiguous())
            groups[name] = GroupPlan(maps_a, maps_b, (0,) + (n,) * k_all)
        return cls(tuple(float(x) for x in lambdas), groups)

    def validate(self, graph: FusionGraph) -> None:
        """Check every group's maps against the graph's group sizes (all members have the same width), whole
        units for unit groups, and equal unit-level maps for tied groups.

        Raises:
            ValueError: naming the group and what is wrong.
        """
        for name, gp in self.groups.items():
            if name not in graph.groups:
                raise ValueError(
                    f"plan has group {name!r}, which the graph does not have (groups: {list(graph.groups)})"
                )
            g = graph.groups[name]
            gp.validate(name, [g.size] * self.num_members)
            d = g.unit_size
            if d > 1 and (gp.slots % d or any(s % d for s in gp.layout)):
                raise ValueError(
                    f"plan for group {name!r}: slots {gp.slots} and layout {gp.layout} must be whole units of {d}"
                )
            if d > 1:
                for k in range(self.num_members):
                    for side, m in (("A", gp.A[k]), ("B", gp.B[k].T)):
                        why = _unit_blocks_problem(m, d)
                        if why:
                            raise ValueError(
                                f"plan for group {name!r} (units of {d}): {side}[{k}] must map whole units, each "
                                f"block (slot unit, member unit) a multiple of a permutation of the inner dims; {why}"
                            )
        for tie, names in graph.ties().items():
            planned = [n for n in names if n in self.groups]
            if not planned:
                continue
            if len(planned) != len(names):
                raise ValueError(f"plan maps tied groups {planned} but not {sorted(set(names) - set(planned))}")
            ref_name = planned[0]
            ref = self.groups[ref_name]
            d0 = graph.groups[ref_name].unit_size
            for other in planned[1:]:
                gp, d1 = self.groups[other], graph.groups[other].unit_size
                for k in range(self.num_members):
                    for side, m0, m1 in (("A", ref.A[k], gp.A[k]), ("B", ref.B[k].T, gp.B[k].T)):
                        u0, u1 = unit_map(m0, d0), unit_map(m1, d1)
                        if u0.shape != u1.shape or float((u0 - u1).abs().max()) > 1e-9:
                            raise ValueError(
                                f"tied groups {ref_name!r} and {other!r} (tie {tie!r}) need the same unit-level map; "
                                f"{side}[{k}] differs"
                            )


def permute_only(graph: FusionGraph, names: Sequence[str]) -> tuple[str, Normalizer] | None:
    """The first group of ``names`` (a tie set) that is normalized by functional code, with that normalizer, or
    None. A LayerNorm / RMSNorm / softmax over a group written inside a bigger module cannot be replaced by the
    builder's member-view normalizer, so such a group (and its tie set) may be permuted but never widened or mixed:
    its plan must be a permutation plan (``A_k = lambda_k P_k``, ``B_k = P_k^T``)."""
    for name in names:
        for nz in graph.groups[name].normalizers:
            if not nz.wrappable:
                return name, nz
    return None


def zero_hint(names: Sequence[str], option: str, value: Any, keep: float = 0.0) -> str:
    """How to keep a tie set at full width with the dict form of ``option`` (alpha 0, or width 1.0)."""
    rest = value.get("*", value) if isinstance(value, Mapping) else value
    zero = ", ".join(f"{n!r}: {keep}" for n in names)
    return f"give it {option} {keep} with the dict form, e.g. {option}={{{zero}, '*': {rest!r}}}"


def refuse_widening(method: str, hit: tuple[str, Normalizer], fix: str) -> ValueError:
    """The error of a method that would widen or mix a group that may only be permuted (:func:`permute_only`)."""
    name, nz = hit
    return ValueError(
        f"method {method!r}: group {name!r} is normalized by {nz.kind} in module {nz.module!r} (node {nz.node!r}), "
        f"functional code inside that module, so the group may be permuted but not widened or mixed; {fix}"
    )
