"""Member tensors seen through other groups' maps: the one way pyfusion aligns weights before comparing them.

A weight tensor has one axis in the group being matched (its rows, say) and other axes in other groups (its
input columns). Comparing the reference's rows with member k's rows is only meaningful once those other axes are
in the same order, i.e. after they went through the maps already chosen for those groups. Three kinds of map
occur, one per family of methods:

* :class:`Permutation` (weight matching): member k's neuron ``perm[s]`` sits in slot s; the reference is already
  in slot order, so only the member's axis is permuted.
* :class:`MatchedPairs` (partial fusion): only the ``s`` matched pairs share a slot; both tensors keep just the
  matched indices, in slot order (the paper restricts the features to fused inputs).
* :class:`SoftMap` (OT fusion): the member's axis is mapped into slot space by a (slots, n) matrix
  ``M = diag(1/a) T``.

Each is a neuron-level map (slots x n) of one side; it is applied to every segment its group holds on an axis
through the segment's factor pattern (:func:`pyfusion.graph.transform.apply_segment`, the builder's code path:
packed q | k | v projections, heads, grouped-query reps, flattens), and the gaps between segments stay as they
are. :func:`aligned_pair` applies the maps to one tensor, :func:`aligned_features` reads the per-neuron feature
rows of one side of a group (producers, per-neuron tensors, consumers) with :func:`pyfusion.graph.neuron_view`.
A whole state dict is moved into slot order by :func:`pyfusion.graph.permuted_state` (the one implementation,
shared with the builder and the verification).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pyfusion.graph.groups import AxisRef, FusionGraph, NeuronGroup
from pyfusion.graph.transform import Selection, apply_segment, neuron_view

__all__ = [
    "Alignment",
    "MatchedPairs",
    "Permutation",
    "SideMap",
    "SoftMap",
    "aligned_features",
    "aligned_pair",
]

# (map (slots, n), its selection or "compute"): what apply_segment takes. For index maps the matrix is a zero-stride
# stand-in of the right shape: the selection path reads only its shape, so no n x n matrix is ever filled.
SideMap = tuple[Tensor, "Selection | str"]


def _index_map(idx: Tensor | np.ndarray, n: int) -> SideMap:
    """Slot s holds neuron ``idx[s]`` (distinct indices): a 0/1 selection map (len(idx), n)."""
    cols = torch.as_tensor(np.asarray(idx), dtype=torch.long).reshape(-1)
    rows = torch.arange(cols.numel())
    return torch.zeros((), dtype=torch.float64).expand(cols.numel(), n), (rows, cols, None, True)


class Alignment(Protocol):
    """A map of one group: the neuron-level maps of the reference's and the member's side."""

    def maps(self, n: int) -> tuple[SideMap | None, SideMap]:
        """(reference side or None for "already in slot order", member side), each a (slots, n) map."""
        ...


@dataclass(frozen=True)
class Permutation:
    """Slot s holds member neuron ``perm[s]``; the reference is already in slot order.

    Attributes:
        perm: (n,) long.
    """

    perm: Tensor

    def maps(self, n: int) -> tuple[SideMap | None, SideMap]:
        return None, _index_map(self.perm, n)


@dataclass(frozen=True)
class MatchedPairs:
    """The pairs (reference neuron ``ref_idx[s]``, member neuron ``member_idx[s]``) sharing slot s.

    Attributes:
        ref_idx: (s,) int.
        member_idx: (s,) int.
    """

    ref_idx: np.ndarray
    member_idx: np.ndarray

    def maps(self, n: int) -> tuple[SideMap | None, SideMap]:
        return _index_map(self.ref_idx, n), _index_map(self.member_idx, n)


@dataclass(frozen=True)
class SoftMap:
    """Member neurons mapped into slot space by ``m`` (slots, n): ``t' = m t`` along the axis.

    Attributes:
        m: (slots, n) float64 (for OT fusion ``diag(1/a) T_k``; each row a barycentric combination).
    """

    m: Tensor

    def maps(self, n: int) -> tuple[SideMap | None, SideMap]:
        return None, (self.m, "compute")


def _gather_index(m: Tensor, sel: Selection | str | None, factors: Sequence[tuple[str, int]]) -> Tensor | None:
    """The index ``g`` with ``apply_segment(t, m, axis, factors, sel) == t.index_select(axis, g)``, or None.

    It exists when every slot holds exactly one neuron with coefficient 1 (the index maps of :class:`Permutation`
    and :class:`MatchedPairs`) and the segment is ``[unit, rep...]`` (a plain axis or a flatten): then the map
    only picks entries, and one gather on the axis in place reads them. ``apply_segment`` moves the axis to the
    front, gathers, scatters into a new tensor and moves it back, and the feature rows then need a copy of their
    own: for a VGG11-sized pair at alpha 0.25 that was most of the features' 0.2 s (1 thread).
    """
    if not isinstance(sel, tuple):
        return None
    rows, cols, vals, injective = sel
    slots = int(m.shape[0])
    if vals is not None or not injective or rows.numel() != slots:
        return None
    if factors[0][0] != "unit" or any(kind != "rep" for kind, _ in factors[1:]):
        return None
    expand = math.prod(size for _, size in factors[1:])
    g = torch.empty(slots, dtype=torch.long)
    g[rows] = cols.to(torch.long)
    return g if expand == 1 else (g[:, None] * expand + torch.arange(expand)).reshape(-1)


def _gather_with_norms(t: Tensor, gather: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(t.index_select(1, gather), the rows' (axis 0) sums of squares of that copy)`` from the C++ engine
    (``pyfusion._C.gather_axis1_f64``, csrc/gather: the norms taken from each row while it is in L1), or None
    where it does not apply (no extension, not float64 / contiguous / CPU, autograd, fewer than 2 axes).

    Measured (1 thread, 2-core Xeon VM, AVX-512; 512 x 512 x 3 x 3 float64, 384 columns): index_select plus
    :func:`pyfusion.match.distance._row_sq_norms` 2.5-2.7 ms, this 1.3-1.9 ms (the gather alone 1.4-1.6: the same as
    index_select's)."""
    from pyfusion import _ext

    ext = _ext._C
    if ext is None or not hasattr(ext, "gather_axis1_f64") or t.dim() < 2:
        return None
    if t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous():
        return None
    if torch.is_grad_enabled() and t.requires_grad:
        return None
    idx = gather.to(torch.long).contiguous()
    outer, n_axis, inner = int(t.shape[0]), int(t.shape[1]), int(math.prod(t.shape[2:]))
    out = torch.empty(outer, idx.numel(), *t.shape[2:], dtype=torch.float64)
    sq = torch.empty(outer, dtype=torch.float64)
    ext.gather_axis1_f64(t.data_ptr(), outer, n_axis, inner, idx.data_ptr(), int(idx.numel()), out.data_ptr(),
                         sq.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out, sq


def _transform_axes(
    t: Tensor,
    entries: Sequence[tuple[str, AxisRef]],
    own_axis: int,
    groups: Mapping[str, NeuronGroup],
    side: Mapping[str, SideMap | None],
    sq: list[Tensor | None] | None = None,
) -> Tensor:
    """``t`` with every segment of every axis except ``own_axis`` transformed by its group's map in ``side`` (a
    group missing from ``side`` or mapped to None keeps its segment as it is; gaps stay).

    ``sq``, when a list, gets one entry appended: the sums of squares of the result's rows along axis 0 when the
    one transform was a single gather of the whole axis 1 (the usual case of partial fusion's incoming weights:
    the engine of :func:`_gather_with_norms` computes them during the copy), else None."""
    per_axis: dict[int, list[tuple[int, AxisRef, str]]] = {}
    for gname, r in entries:
        if r.axis != own_axis:
            per_axis.setdefault(r.axis, []).append((r.offset, r, gname))
    moved = [a for a, segs in per_axis.items() if any(side.get(gname) is not None for _, _, gname in segs)]
    norms = None
    for axis in sorted(per_axis):
        segs = sorted(per_axis[axis], key=lambda s: s[0])
        if all(side.get(gname) is None for _, _, gname in segs):
            continue
        pieces, pos = [], 0
        for offset, r, gname in segs:
            g = groups[gname]
            length = r.length(g)
            if offset > pos:
                pieces.append(t.narrow(axis, pos, offset - pos))
            piece = t.narrow(axis, offset, length)
            sm = side.get(gname)
            if sm is not None:
                m, sel = sm
                factors = r.factors(g)
                gather = _gather_index(m, sel, factors)
                whole = axis == 1 and own_axis == 0 and moved == [1] and len(segs) == 1 and length == t.shape[1]
                got = _gather_with_norms(piece, gather) if gather is not None and whole and sq is not None else None
                if got is not None:  # the same copy as index_select's, and the rows' norms
                    piece, norms = got
                elif gather is not None:  # the same entries as apply_segment's gather / scatter, in one gather
                    # index_select, not t[:, gather]: advanced indexing on an inner axis was 13 ms against 2.7 ms
                    # (512 x 512 x 3 x 3 float64, 384 columns, 1 thread; the same copy)
                    piece = piece.index_select(axis, gather.to(t.device))
                else:
                    piece = apply_segment(piece, m.to(t.device), axis, factors, sel)
            pieces.append(piece)
            pos = offset + length
        if pos < t.shape[axis]:
            pieces.append(t.narrow(axis, pos, t.shape[axis] - pos))
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
    if sq is not None:
        sq.append(norms)
    return t


def aligned_pair(
    ref: Tensor,
    member: Tensor,
    entries: Sequence[tuple[str, AxisRef]],
    own: tuple[str, int],
    maps: Mapping[str, Alignment],
    graph: FusionGraph,
    *,
    missing: str = "drop",
    sq: list[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor] | None:
    """One tensor of the reference and of a member with every axis except ``own``'s aligned through ``maps``.

    Args:
        ref: the reference's tensor.
        member: the member's tensor (same shape).
        entries: every (group, axis ref) on this tensor (``FusionGraph.refs_by_key()[key]``).
        own: (group, axis) being matched: that axis is left as is (whatever groups hold segments on it).
        maps: group -> alignment of the groups already decided.
        graph: the neuron groups (for the segments' factor patterns).
        missing: what to do with a segment whose group has no map: "drop" (return None: the tensor cannot be
            compared yet) or "keep" (leave that segment unaligned).
        sq: when a list, it gets the (ref, member) row norms of :func:`_transform_axes` (None each where it has
            none; nothing appended when the pair is None).

    Returns:
        (ref, member) aligned, or None (``missing="drop"`` and a segment without a map).
    """
    if missing not in ("drop", "keep"):
        raise ValueError(f"missing must be 'drop' or 'keep'; got {missing!r}")
    ref_side: dict[str, SideMap | None] = {}
    mem_side: dict[str, SideMap | None] = {}
    for gname, r in entries:
        if r.axis == own[1] or gname in mem_side:
            continue
        align = maps.get(gname)
        if align is None:
            if missing == "drop":
                return None
            ref_side[gname] = mem_side[gname] = None
            continue
        ref_side[gname], mem_side[gname] = align.maps(graph.groups[gname].size)
    if not mem_side:
        if sq is not None:
            sq += [None, None]
        return ref, member
    return (
        _transform_axes(ref, entries, own[1], graph.groups, ref_side, sq),
        _transform_axes(member, entries, own[1], graph.groups, mem_side, sq),
    )


def aligned_features(
    ref_state: Mapping[str, Tensor],
    member_state: Mapping[str, Tensor],
    graph: FusionGraph,
    name: str,
    refs: Sequence[AxisRef],
    maps: Mapping[str, Alignment],
    *,
    missing: str = "drop",
    by_key: Mapping[str, list[tuple[str, AxisRef]]] | None = None,
    sq_norms: list[tuple[Tensor, Tensor] | None] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per-neuron feature rows of group ``name`` from the tensors ``refs``, other axes aligned through ``maps``.

    Args:
        ref_state, member_state: key -> tensor of the reference and of member k (tensors missing from
            ``ref_state``, e.g. buffers when only parameters are compared, are skipped).
        graph: neuron groups.
        name: the group being matched.
        refs: which of its axis refs to use (``g.producers``, ``g.per_neuron``, ``g.consumers``, ``g.refs``).
        maps: see :func:`aligned_pair`.
        missing: see :func:`aligned_pair` ("drop" leaves such tensors out).
        by_key: ``graph.refs_by_key()``, when the caller already has it (the coordinate-descent loops do).
        sq_norms: when a list, it gets one entry per returned pair: (ref rows' sums of squares (n,), member rows'
            (n,)) where the gather engine computed them while copying the rows (:func:`_gather_with_norms`; equal
            to ``(x * x).sum(1)`` to rounding), else None (the caller computes them).

    Returns:
        One (ref rows (n, F_r), member rows (n, F_r)) pair per usable reference, in ``refs`` order: the rows of
        :func:`pyfusion.graph.neuron_view` (row ``u * unit_size + d`` is unit u's inner neuron d; rep factors and
        the other axes are the features).
    """
    g = graph.groups[name]
    by_key = graph.refs_by_key() if by_key is None else by_key
    out = []
    for r in refs:
        if r.key not in ref_state or r.key not in member_state:
            continue
        sq: list[Tensor | None] | None = None if sq_norms is None else []
        pair = aligned_pair(
            ref_state[r.key], member_state[r.key], by_key.get(r.key, []), (name, r.axis), maps, graph,
            missing=missing, sq=sq,
        )  # fmt: skip
        if pair is None:
            continue
        rows = (neuron_view(pair[0], r, g), neuron_view(pair[1], r, g))
        out.append(rows)
        if sq_norms is not None:
            assert sq is not None
            # the norms are of the tensor's rows along axis 0: they are the feature rows' when the view is that
            # tensor's memory with the same rows (a plain reshape of the whole tensor)
            same = all(
                x is not None and v.is_contiguous() and v.data_ptr() == t.data_ptr() and v.shape[0] == t.shape[0]
                and v.numel() == t.numel()
                for x, v, t in zip(sq, rows, pair)
            )  # fmt: skip
            sq_norms.append((sq[0], sq[1]) if same else None)  # type: ignore[arg-type]
    return out
