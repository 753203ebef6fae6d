"""Fusion plans (DESIGN §3): per neuron group and member k, the maps A_k (slots x n_k) and B_k (n_k x slots).

The fused layer is ``W' = sum_k A_k^{out} W_k B_k^{in}``, ``b' = sum_k A_k b_k``. Vanilla averaging is
``A_k = lambda_k I, B_k = I``; permutation alignment is ``A_k = lambda_k P_k, B_k = P_k^T``; OT fusion uses soft
transport maps; partial fusion uses more slots than neurons with the layout ``[shared | branch_1 | ... | branch_K]``.
Maps are stored densely in float64: exact, and small next to the weights they act on (n x slots per group); the
permutation maps of :meth:`Plan.from_permutations` are made on first read (:class:`PermutationMaps`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pyfusion._finite import all_finite
from pyfusion.graph.groups import FusionGraph, Normalizer

__all__ = [
    "GroupPlan",
    "PermutationMaps",
    "Plan",
    "SlotMaps",
    "lazy_map",
    "map_shape",
    "permute_only",
    "refuse_width_pin",
    "refuse_widening",
    "width_pin",
    "unit_map",
    "zero_hint",
]


class _LazyMaps(MutableSequence):
    """A list of dense maps, each made on first read by ``_make(k)`` (``_dense[k]`` None until then): the list
    behaviour :class:`PermutationMaps` and :class:`SlotMaps` share. Any change of length makes every map dense."""

    _dense: list[Tensor | None]

    @abstractmethod
    def _make(self, k: int) -> Tensor:
        """The dense map k (called once, on its first read)."""

    def __len__(self) -> int:
        return len(self._dense)

    def __getitem__(self, k):  # noqa: ANN001, ANN204 - int or slice, as a list's
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        k = range(len(self))[k]  # negative indices; IndexError out of range
        m = self._dense[k]
        if m is None:
            m = self._dense[k] = self._make(k)
        return m

    def __setitem__(self, k, value) -> None:  # noqa: ANN001
        if isinstance(k, slice):
            items = self[:]  # every map dense: a slice assignment may change the length
            items[k] = value
            self._reset(items)
            return
        self._dense[range(len(self))[k]] = value

    def __delitem__(self, k) -> None:  # noqa: ANN001
        items = self[:]
        del items[k]
        self._reset(items)

    def insert(self, index: int, value: Tensor) -> None:
        items = self[:]
        items.insert(index, value)
        self._reset(items)

    def __add__(self, other: Sequence[Tensor]) -> list[Tensor]:  # as a list's: gp.A + gp.B
        return list(self) + list(other)

    def __radd__(self, other: Sequence[Tensor]) -> list[Tensor]:
        return list(other) + list(self)

    def _reset(self, items: list[Tensor]) -> None:
        """Every entry the given dense tensor (nothing lazy is left)."""
        self._dense = list(items)


class PermutationMaps(_LazyMaps):
    """The K dense maps of one side of a permutation plan's group, each made on its first read:
    ``A_k = coefs[k] P_k`` (side "A", (n, n)) or ``B_k = P_k^T`` (side "B"), with ``P_k[s, perms[k][s]] = 1``.

    :meth:`Plan.from_permutations` writes its maps this way: a plan that is only built never forms them (12 dense
    float64 (1024, 1024) maps of an MLP-1024 pair: 0.09 s to write, and 0.05 s more for the builder to check them
    and the plan validation to read them, of a 0.9 s activation matching). A map that was never read is provably
    the permutation (:meth:`pristine`): the builder's permutation path then reads ``perms`` and ``coefs`` directly.
    A map that was read (or replaced by assignment) is an ordinary dense tensor from then on, which may be changed
    in place: the maps are the truth, so the builder checks it as it checks any dense map.
    """

    def __init__(self, perms: Sequence[Tensor], coefs: Sequence[float], side: str):
        if side not in ("A", "B"):
            raise ValueError(f"side must be 'A' or 'B'; got {side!r}")
        if len(perms) != len(coefs):
            raise ValueError(f"perms and coefs must have one entry per member; got {len(perms)} and {len(coefs)}")
        self._perms = list(perms)
        self._coefs = [float(c) for c in coefs]
        self._side = side
        self._dense: list[Tensor | None] = [None] * len(self._perms)

    def _make(self, k: int) -> Tensor:
        idx = self._perms[k]
        n = idx.numel()
        ar = torch.arange(n)
        m = torch.zeros(n, n, dtype=torch.float64)
        if self._side == "A":
            m[ar, idx] = self._coefs[k]
        else:
            m[idx, ar] = 1.0
        return m

    def _reset(self, items: list[Tensor]) -> None:
        super()._reset(items)
        self._perms = [torch.empty(0, dtype=torch.long)] * len(items)
        self._coefs = [0.0] * len(items)

    def pristine(self, k: int) -> bool:
        """Whether map k was never read nor replaced: it is then exactly the permutation map of ``perm(k)``."""
        return self._dense[k] is None

    def perm(self, k: int) -> Tensor:
        """Member k's neuron in each slot (n,) (the map's own permutation only while :meth:`pristine`)."""
        return self._perms[k]

    def coef(self, k: int) -> float:
        """The value of the non-zeros of map k while :meth:`pristine` (lambda_k for side "A", 1 for "B")."""
        return self._coefs[k] if self._side == "A" else 1.0

    def shape(self, k: int) -> tuple[int, int]:
        """The shape of map k without making it."""
        m = self._dense[k]
        if m is not None:
            return tuple(m.shape)  # type: ignore[return-value]
        n = self._perms[k].numel()
        return (n, n)

    def __repr__(self) -> str:
        made = sum(m is not None for m in self._dense)
        return f"PermutationMaps(side={self._side!r}, members={len(self)}, dense={made})"


class SlotMaps(_LazyMaps):
    """The K dense maps of one side of a partial-assignment group, each made on its first read: every member neuron j
    in its own slot ``slot_of[k][j]``, ``A_k[slot_of[k][j], j] = coef[k][j]`` (side "A", (slots, n)) or
    ``B_k[j, slot_of[k][j]] = 1`` (side "B", (n, slots)).

    ``pyfusion.fuse.partial`` writes its maps this way, with their selections (:func:`pyfusion.graph.transform.
    selection`'s form: non-zeros in row-major order of ``A_k`` / ``B_k^T``): the builder reads :meth:`selection` and
    :meth:`shape` of a map never made, and the plan validation checks the coefficients (n values) instead of a pass
    over each dense map. Forming the dense maps (page faults on fresh zero pages: four (640, 512) float64 maps per
    VGG11 group at alpha 0.25) and reading them back was ~3 ms of a VGG11 pair's partial fusion (1 thread). A map
    that was read (or replaced) is an ordinary dense tensor from then on, with the same recorded selection (valid
    until it is changed in place), as :func:`pyfusion.fuse.partial.assignment_group_plan` made them before.
    """

    def __init__(self, side: str, slots: int, slot_of: Sequence[Tensor], coefs: Sequence[Tensor | None]):
        if side not in ("A", "B"):
            raise ValueError(f"side must be 'A' or 'B'; got {side!r}")
        if len(slot_of) != len(coefs):
            raise ValueError(f"slot_of and coefs must have one entry per member; got {len(slot_of)} and {len(coefs)}")
        self._side = side
        self._slots = int(slots)
        self._slot_of = list(slot_of)
        self._coefs = list(coefs)
        self._sel: list[Any] = []
        for sk, vals in zip(self._slot_of, self._coefs):
            order = torch.argsort(sk)  # sk is injective: the order is unique
            if side == "A":
                keep = vals[order] != 0
                v = vals[order][keep]
                self._sel.append((sk[order][keep], order[keep], None if bool((v == 1).all()) else v, True))
            else:
                self._sel.append((sk[order], order, None, True))
        self._dense: list[Tensor | None] = [None] * len(self._slot_of)

    def _make(self, k: int) -> Tensor:
        import numpy as np

        sk = self._slot_of[k]
        n = sk.numel()
        ar = torch.arange(n)
        # numpy's zeros come from calloc: the kernel's zero pages, not a memset of every page as torch.zeros does
        # (a (1280, 1024) A_k and B_k of an MLP-1024 group at alpha 0.25: 7.4 -> 1.7 ms the pair, 1 thread); only
        # the pages holding a non-zero are written
        if self._side == "A":
            m = torch.from_numpy(np.zeros((self._slots, n), dtype=np.float64))
            m[sk, ar] = self._coefs[k]
        else:
            m = torch.from_numpy(np.zeros((n, self._slots), dtype=np.float64))
            m[ar, sk] = 1.0
        m._pyfusion_selection = (m._version, self._sel[k])  # type: ignore[attr-defined] # builder.attach_selection
        return m

    def pristine(self, k: int) -> bool:
        """Whether map k was never read nor replaced (then :meth:`selection` and :meth:`shape` describe it)."""
        return k < len(self._slot_of) and self._dense[k] is None

    def selection(self, k: int) -> Any:
        """(rows, cols, vals or None, True): the non-zeros of ``A_k`` (side "A") or of ``B_k^T`` (side "B")."""
        return self._sel[k]

    def shape(self, k: int) -> tuple[int, int]:
        """The shape of map k without making it."""
        m = self._dense[k]
        if m is not None:
            return tuple(m.shape)  # type: ignore[return-value]
        n = self._slot_of[k].numel()
        return (self._slots, n) if self._side == "A" else (n, self._slots)

    def finite(self, k: int) -> bool:
        """Whether the never-made map k has only finite entries (its coefficients; side "B" holds ones)."""
        return self._side == "B" or all_finite(self._coefs[k])

    def __repr__(self) -> str:
        made = sum(m is not None for m in self._dense)
        return f"SlotMaps(side={self._side!r}, members={len(self)}, slots={self._slots}, dense={made})"


def lazy_map(maps: Sequence[Tensor], k: int) -> SlotMaps | None:
    """``maps`` when map k is a :class:`SlotMaps` entry never made, else None."""
    return maps if isinstance(maps, SlotMaps) and maps.pristine(k) else None


def map_shape(maps: Sequence[Tensor], k: int) -> tuple[int, int]:
    """The shape of map k of ``maps``, without making a lazy one."""
    if isinstance(maps, (SlotMaps, PermutationMaps)):
        return maps.shape(k)
    return tuple(maps[k].shape)  # type: ignore[return-value]


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


def pristine_map(maps: Sequence[Tensor], k: int) -> bool:
    """Whether map k of ``maps`` is a :class:`PermutationMaps` entry that was never made (see there)."""
    return isinstance(maps, PermutationMaps) and maps.pristine(k)


@dataclass
class GroupPlan:
    """The maps of one neuron group.

    Attributes:
        A: K tensors (slots, n_k), float64: how member k's neurons build each slot's incoming weights (a list, or
            for a plan of :meth:`Plan.from_permutations` a :class:`PermutationMaps`, a mutable sequence that makes
            each map on first read: ``list(gp.A)`` where a list is needed, e.g. for ``torch.stack``).
        B: K tensors (n_k, slots), float64: where member k's input neurons are found among the slots (as ``A``).
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
        if isinstance(self.A, (PermutationMaps, SlotMaps)):  # without making the map
            return int(self.A.shape(0)[0])
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
        for i, n in enumerate(sizes):
            if pristine_map(self.A, i) and pristine_map(self.B, i):
                # permutation maps not made yet: (n, n) and finite by construction (a checked permutation, a
                # finite lambda), so only the size is compared (no dense pass)
                got = self.A.shape(i)  # type: ignore[attr-defined]
                if got != (self.slots, n):
                    raise ValueError(f"plan for group {name!r}: A[{i}] must have shape ({self.slots}, {n}); got {got}")
                if not math.isfinite(self.A.coef(i)):  # type: ignore[attr-defined]
                    raise ValueError(f"plan for group {name!r}: A[{i}] or B[{i}] contains NaN or inf")
                continue
            la, lb = lazy_map(self.A, i), lazy_map(self.B, i)
            if la is not None and lb is not None:  # partial-assignment maps not made yet: shapes and coefficients
                if la.shape(i) != (self.slots, n) or lb.shape(i) != (n, self.slots):
                    raise ValueError(
                        f"plan for group {name!r}: A[{i}] / B[{i}] must have shapes ({self.slots}, {n}) / "
                        f"({n}, {self.slots}); got {la.shape(i)} / {lb.shape(i)}"
                    )
                if not (la.finite(i) and lb.finite(i)):
                    raise ValueError(f"plan for group {name!r}: A[{i}] or B[{i}] contains NaN or inf")
                continue
            a, b = self.A[i], self.B[i]
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

        ``A_k = lambda_k P_k`` and ``B_k = P_k^T`` with ``P_k[s, perms[g][k][s]] = 1``, as
        :class:`PermutationMaps` (each map made when first read). Groups missing from ``perms`` get the identity
        permutation.
        """
        groups = {}
        for name, g in graph.groups.items():
            idxs = []
            p = perms.get(name)
            n = g.size
            ar = torch.arange(n)
            for k in range(len(lambdas)):
                idx = ar if p is None else torch.as_tensor(p[k], dtype=torch.long).cpu()
                ok = idx.shape == (n,) and (n == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n))
                if not ok or not bool((torch.bincount(idx, minlength=n) == 1).all()):
                    raise ValueError(f"perms[{name!r}][{k}] must be a permutation of range({n}); got {idx.tolist()}")
                idxs.append(idx.clone())
            # A_k = lambda_k P_k and B_k = P_k^T, each made when first read (PermutationMaps): the builder's
            # permutation path reads the permutations themselves
            groups[name] = GroupPlan(
                PermutationMaps(idxs, lambdas, "A"),  # type: ignore[arg-type]
                PermutationMaps(idxs, [1.0] * len(lambdas), "B"),  # type: ignore[arg-type]
                (n,) + (0,) * len(lambdas),
                perms=[i.clone() for i in idxs],
            )
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


def width_pin(graph: FusionGraph, names: Sequence[str]) -> tuple[str, str] | None:
    """The first group of ``names`` (a tie set) that may not be widened, with why
    (:attr:`~pyfusion.graph.NeuronGroup.width_pins`: a parameter broadcast over its units, its units contracted
    against another activation), or None. Such a tie set may be permuted or merged but not widened: alpha = 1 could
    not be the ensemble."""
    for name in names:
        for why in graph.groups[name].width_pins:
            return name, why
    return None


def refuse_width_pin(method: str, hit: tuple[str, str], fix: str) -> ValueError:
    """The error of a method that would widen a group that may not be widened (:func:`width_pin`)."""
    name, why = hit
    return ValueError(
        f"method {method!r}: group {name!r} cannot be widened: {why}; the fused model cannot keep each member's "
        f"branch units apart and alpha = 1 would not be the ensemble; {fix}"
    )


def zero_hint(names: Sequence[str], option: str, value: Any, keep: float = 0.0) -> str:
    """How to keep a tie set at full width with the dict form of ``option`` (alpha 0, or width 1.0)."""
    rest = value.get("*", value) if isinstance(value, Mapping) else value
    zero = ", ".join(f"{n!r}: {keep}" for n in names)
    return f"give it {option} {keep} with the dict form, e.g. {option}={{{zero}, '*': {rest!r}}}"


def refuse_widening(method: str, hit: tuple[str, Normalizer], fix: str) -> ValueError:
    """The error of a method that would widen or mix a group that may only be permuted (:func:`permute_only`)."""
    name, nz = hit
    return ValueError(
        f"method {method!r}: group {name!r} {nz.describe()}, so the group may be permuted but not widened or mixed; "
        f"{fix}"
    )
