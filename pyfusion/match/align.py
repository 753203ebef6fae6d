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

:func:`aligned_pair` applies them to one tensor, :func:`aligned_features` to every tensor on one side of a group
(producers, per-neuron tensors, consumers) and returns per-neuron feature rows; :func:`permute_state` moves a
whole state dict into slot order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pyfusion.graph.groups import AxisRef, FusionGraph

__all__ = [
    "Alignment",
    "MatchedPairs",
    "Permutation",
    "SoftMap",
    "aligned_features",
    "aligned_pair",
    "expand_index",
    "flat_rows",
    "permute_state",
]


def expand_index(idx: Tensor | np.ndarray, expand: int) -> Tensor:
    """Neuron indices (m,) as axis indices (m * expand,): neuron j owns positions ``j*expand ... j*expand+expand-1``
    (a convolutional group read by a Linear after a flatten, channel-major)."""
    t = torch.as_tensor(idx, dtype=torch.long)
    if expand == 1:
        return t
    return (t[:, None] * expand + torch.arange(expand)).reshape(-1)


def flat_rows(t: Tensor, axis: int, n: int) -> Tensor:
    """``t`` as per-neuron feature rows (n, F): ``axis`` first, everything else flattened (neuron-major, so an axis
    of n * expand positions gives each neuron its ``expand`` consecutive positions)."""
    return t.movedim(axis, 0).reshape(n, -1)


class Alignment(Protocol):
    """A map of one group, applied to the axis of a (reference, member) tensor pair that this group indexes."""

    def apply(self, ref: Tensor, member: Tensor, axis: int, expand: int) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Permutation:
    """Slot s holds member neuron ``perm[s]``; the reference is already in slot order.

    Attributes:
        perm: (n,) long.
    """

    perm: Tensor

    def apply(self, ref: Tensor, member: Tensor, axis: int, expand: int) -> tuple[Tensor, Tensor]:
        return ref, member.index_select(axis, expand_index(self.perm, expand))


@dataclass(frozen=True)
class MatchedPairs:
    """The pairs (reference neuron ``ref_idx[s]``, member neuron ``member_idx[s]``) sharing slot s.

    Attributes:
        ref_idx: (s,) int.
        member_idx: (s,) int.
    """

    ref_idx: np.ndarray
    member_idx: np.ndarray

    def apply(self, ref: Tensor, member: Tensor, axis: int, expand: int) -> tuple[Tensor, Tensor]:
        return (
            ref.index_select(axis, expand_index(self.ref_idx, expand)),
            member.index_select(axis, expand_index(self.member_idx, expand)),
        )


@dataclass(frozen=True)
class SoftMap:
    """Member neurons mapped into slot space by ``m`` (slots, n): ``t' = m t`` along the axis.

    Attributes:
        m: (slots, n) float64 (for OT fusion ``diag(1/a) T_k``; each row a barycentric combination).
    """

    m: Tensor

    def apply(self, ref: Tensor, member: Tensor, axis: int, expand: int) -> tuple[Tensor, Tensor]:
        # kron needs a contiguous operand (a transposed view raises in torch.kron)
        m = self.m if expand == 1 else torch.kron(self.m.contiguous(), torch.eye(expand, dtype=self.m.dtype))
        return ref, torch.tensordot(m, member.movedim(axis, 0), dims=([1], [0])).movedim(0, axis)


def aligned_pair(
    ref: Tensor,
    member: Tensor,
    entries: Sequence[tuple[str, AxisRef]],
    own: tuple[str, int],
    maps: Mapping[str, Alignment],
    *,
    missing: str = "drop",
) -> tuple[Tensor, Tensor] | None:
    """One tensor of the reference and of a member with every axis except ``own`` aligned through ``maps``.

    Args:
        ref: the reference's tensor.
        member: the member's tensor (same shape).
        entries: every (group, axis ref) on this tensor (``FusionGraph.refs_by_key()[key]``).
        own: (group, axis) being matched: left as is.
        maps: group -> alignment of the groups already decided.
        missing: what to do with an axis whose group has no map: "drop" (return None: the tensor cannot be
            compared yet) or "keep" (leave that axis unaligned).

    Returns:
        (ref, member) aligned, or None (``missing="drop"`` and an axis without a map).
    """
    if missing not in ("drop", "keep"):
        raise ValueError(f"missing must be 'drop' or 'keep'; got {missing!r}")
    for gname, r in entries:
        if (gname, r.axis) == own:
            continue
        align = maps.get(gname)
        if align is None:
            if missing == "drop":
                return None
            continue
        ref, member = align.apply(ref, member, r.axis, r.expand)
    return ref, member


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

    Returns:
        One (ref rows (n, F_t), member rows (n, F_t)) pair per usable tensor, in ``refs`` order.
    """
    n = graph.groups[name].size
    by_key = graph.refs_by_key() if by_key is None else by_key
    out = []
    for r in refs:
        if r.key not in ref_state:
            continue
        pair = aligned_pair(
            ref_state[r.key], member_state[r.key], by_key.get(r.key, []), (name, r.axis), maps, missing=missing
        )
        if pair is not None:
            out.append((flat_rows(pair[0], r.axis, n), flat_rows(pair[1], r.axis, n)))
    return out


def permute_state(
    state: Mapping[str, Tensor], graph: FusionGraph, perm: Mapping[str, Tensor], skip: str | None = None
) -> dict[str, Tensor]:
    """Member tensors moved into slot order: along every group axis, ``t' = t.index_select(axis, perm[g])``.

    Args:
        state: key -> tensor of one member.
        graph: neuron groups.
        perm: group -> (n,) long tensor, slot s holds neuron ``perm[g][s]``.
        skip: a group left unpermuted.
    """
    out = dict(state)
    for g in graph.groups.values():
        if g.name == skip or g.name not in perm:
            continue
        for r in g.refs:
            if r.key in out:
                out[r.key] = out[r.key].index_select(r.axis, expand_index(perm[g.name], r.expand))
    return out
