"""Pattern-aware application of neuron-level maps to member tensors (the core of ``W' = sum_k A_k W_k B_k``).

One tensor axis may hold several segments (see :class:`pyfusion.graph.AxisRef`): each segment is transformed by
its group's map through its factor pattern (reshape into factors, bring unit and inner together, apply the
``slots x n`` map, reshape back with the new unit count), and the gaps between segments stay as they are
(scaled by lambda_k on the output axis, as every output index that no group owns, like the logits).

Axis roles (one rule for every tensor): the lowest axis holding a producer / per-neuron reference is the
tensor's *output axis* and is transformed by ``A_k`` (which carries lambda_k); every other referenced axis is
transformed by ``B_k^T`` (consumer axes, and further per-neuron axes of the same tensor, so that lambda_k enters
once). A tensor without an output axis (the last layer, an output embedding) is weighted by lambda_k.

The builder (:mod:`pyfusion.fuse.builder`) and the verification (:mod:`pyfusion.graph.verify`) both go through
:func:`member_tensor`, so a tracing mistake and a builder mistake are caught by the same check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pyfusion.graph.groups import AxisRef, Factor, FusionGraph, NeuronGroup

__all__ = [
    "selection", "apply_map", "apply_segment", "member_tensor", "axis_plan", "neuron_view", "permuted_state"
]  # fmt: skip

Selection = tuple[Tensor, Tensor, Tensor | None, bool]


def selection(m: Tensor) -> Selection | None:
    """(rows, cols, values or None when all 1, injective) if ``m`` has at most one non-zero per column, else None.

    Analysed in numpy: torch's column reductions on small bool matrices cost ~100 ms each with 2 threads on a
    loaded 2-core machine (thread barriers), numpy's ~1 ms.
    """
    if m.dim() != 2 or m.shape[1] == 0:
        return None
    mn = m.detach().cpu().numpy()
    r, c = np.nonzero(mn != 0)  # on a bool copy: 0.65 ms instead of 1.5-1.8 ms for a (896, 512) float64 map
    if c.size and np.bincount(c, minlength=mn.shape[1]).max() > 1:
        return None
    vals = mn[r, c]
    injective = not r.size or np.bincount(r, minlength=mn.shape[0]).max() <= 1
    v = None if bool((vals == 1).all()) else torch.from_numpy(vals)
    return torch.from_numpy(r), torch.from_numpy(c), v, bool(injective)


def apply_map(
    t: Tensor,
    m: Tensor,
    axis: int,
    expand: int = 1,
    sel: Selection | None | str = "compute",
) -> Tensor:
    """Contract ``m kron I_expand`` (new, old) with axis ``axis`` of ``t``.

    Maps with at most one non-zero per column (permutations, partial-fusion slot maps, cluster indicators: each
    old neuron goes to one slot) take a gather / scatter path, O(size of t) instead of a dense product: the dense
    products would be about 90 GFLOP (float64) for a VGG11-sized pair at alpha = 0.5, the copies move a few
    hundred MB. The result is the same sum (each product with a zero entry is skipped). ``expand`` > 1 is a
    flatten into a Linear: each neuron covers ``expand`` consecutive columns (channel-major). Dense maps (OT)
    use tensordot. ``sel`` is ``selection(m)`` when the caller has it already.
    """
    if isinstance(sel, str):
        sel = selection(m)
    if sel is not None:
        rows, cols, vals, injective = sel
        n_new = m.shape[0] * expand
        if expand > 1:
            ar = torch.arange(expand)
            rows = (rows[:, None] * expand + ar).reshape(-1)
            cols = (cols[:, None] * expand + ar).reshape(-1)
            vals = None if vals is None else vals.repeat_interleave(expand)
        src = t.movedim(axis, 0).index_select(0, cols.to(t.device))
        if vals is not None:
            src = src * vals.to(device=src.device, dtype=src.dtype).reshape(-1, *([1] * (src.dim() - 1)))
        if injective:  # a copy per row (index_add_ is ~5x slower here); only the rows nobody maps to are zeroed
            out = src.new_empty((n_new, *src.shape[1:]))
            out.index_copy_(0, rows.to(t.device), src)
            hit = np.zeros(n_new, dtype=bool)
            hit[rows.numpy()] = True
            if not hit.all():
                out.index_fill_(0, torch.from_numpy(np.flatnonzero(~hit)).to(t.device), 0)
        else:
            out = src.new_zeros((n_new, *src.shape[1:]))
            out.index_add_(0, rows.to(t.device), src)
        return out.movedim(0, axis)
    if expand > 1:
        m = torch.kron(m, torch.eye(expand, dtype=m.dtype, device=m.device))
    return torch.tensordot(m, t.movedim(axis, 0), dims=([1], [0])).movedim(0, axis)


def _legacy_expand(factors: Sequence[Factor]) -> int | None:
    """The rep count when the factors are ``[unit, (inner), rep...]`` (neuron index first, copies last)."""
    kinds = [k for k, _ in factors]
    head = 2 if len(kinds) > 1 and kinds[1] == "inner" else 1
    if kinds[0] != "unit" or any(k != "rep" for k in kinds[head:]):
        return None
    return math.prod(s for _, s in factors[head:])


def apply_segment(t: Tensor, m: Tensor, axis: int, factors: Sequence[Factor], sel: Selection | None | str) -> Tensor:
    """Transform the whole axis ``axis`` of ``t`` (one segment with row-major ``factors``) by the neuron-level map
    ``m`` (slots x n, n = unit * inner): the unit and inner factors are brought together as the neuron index,
    rep factors ride along, and the unit factor comes back with ``slots / inner`` units."""
    if t.shape[axis] != math.prod(s for _, s in factors):
        raise ValueError(f"axis {axis} of a tensor of shape {tuple(t.shape)} does not match the pattern {factors}")
    e = _legacy_expand(factors)
    if e is not None:
        return apply_map(t, m, axis, e, sel)
    kinds = [k for k, _ in factors]
    sizes = [s for _, s in factors]
    iu = kinds.index("unit")
    ii = kinds.index("inner") if "inner" in kinds else None
    inner = sizes[ii] if ii is not None else 1
    if m.shape[0] % inner:
        raise ValueError(f"a map with {m.shape[0]} slots cannot hold whole units of {inner} inner neurons")
    x = t.movedim(axis, 0)
    rest = tuple(x.shape[1:])
    x = x.reshape(*sizes, *rest)
    reps = [i for i, k in enumerate(kinds) if k == "rep"]
    neuron = [iu] + ([ii] if ii is not None else [])
    order = reps + neuron
    nf = len(factors)
    x = x.permute(*order, *range(nf, nf + len(rest)))
    rep_sizes = [sizes[i] for i in reps]
    x = x.reshape(math.prod(rep_sizes), sizes[iu] * inner, *rest)
    x = apply_map(x, m, 1, 1, sel)
    new_units = m.shape[0] // inner
    new_sizes = list(sizes)
    new_sizes[iu] = new_units
    x = x.reshape(*rep_sizes, new_units, *([inner] if ii is not None else []), *rest)
    inv = [0] * nf
    for pos, src in enumerate(order):
        inv[src] = pos
    x = x.permute(*inv, *range(nf, nf + len(rest)))
    return x.reshape(math.prod(new_sizes), *rest).movedim(0, axis)


def axis_plan(
    refs: Sequence[tuple[str, AxisRef]], groups: Mapping[str, NeuronGroup]
) -> tuple[dict[int, list[tuple[int, int, str, AxisRef]]], int | None, list[int]]:
    """How one tensor is transformed: axis -> sorted segments (offset, length, group, ref), the output axis (or
    None) and the axes in the order their references appear (the legacy order of application).

    Raises:
        ValueError: an axis holding both output (producer / per-neuron) and consumer segments.
    """
    per_axis: dict[int, list[tuple[int, int, str, AxisRef]]] = {}
    order: list[int] = []
    out_axes: set[int] = set()
    in_axes: set[int] = set()
    for gname, r in refs:
        g = groups[gname]
        per_axis.setdefault(r.axis, []).append((r.offset, r.length(g), gname, r))
        if r.axis not in order:
            order.append(r.axis)
        (in_axes if r.role == "consumer" else out_axes).add(r.axis)
    both = out_axes & in_axes
    if both:
        key = refs[0][1].key
        raise ValueError(f"{key} axis {min(both)} holds both producer / per-neuron and consumer segments")
    for segs in per_axis.values():
        segs.sort(key=lambda s: s[0])
    return per_axis, (min(out_axes) if out_axes else None), order


def member_tensor(
    t: Tensor,
    plan: tuple[dict[int, list[tuple[int, int, str, AxisRef]]], int | None, list[int]],
    maps: Mapping[str, tuple[Tensor, Tensor]],
    lam: float,
    sel: Mapping[tuple[str, bool], Selection | None] | None = None,
) -> Tensor:
    """Member k's contribution ``A_k W_k B_k`` to one fused tensor.

    Args:
        t: member k's tensor (float64).
        plan: :func:`axis_plan` of the tensor's references.
        maps: group -> (A_k (slots, n), B_k (n, slots)) of member k.
        lam: lambda_k (for gaps on the output axis, and tensors without an output axis).
        sel: optional cache (group, uses_B) -> :func:`selection` of the applied map.

    Returns:
        A new tensor (never a view of ``t``).
    """
    per_axis, out_axis, order = plan
    fresh = False
    for axis in order:
        use_b = axis != out_axis
        pieces: list[Tensor] = []
        pos = 0
        n_axis = t.shape[axis]
        segs = per_axis[axis]
        for offset, length, gname, r in segs:
            a, b = maps[gname]
            m = b.T if use_b else a
            s = "compute" if sel is None else sel.get((gname, use_b), "compute")
            if offset > pos:
                gap = t.narrow(axis, pos, offset - pos)
                pieces.append(gap * lam if not use_b else gap)
            piece = t if (offset == 0 and length == n_axis) else t.narrow(axis, offset, length)
            pieces.append(apply_segment(piece, m.to(t.device), axis, _factors(r, length, m), s))
            pos = offset + length
        if pos < n_axis:
            gap = t.narrow(axis, pos, n_axis - pos)
            pieces.append(gap * lam if not use_b else gap)
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
        fresh = True
    if out_axis is None:
        t = t * lam
        fresh = True
    return t if fresh else t.clone()


def _factors(r: AxisRef, length: int, m: Tensor) -> tuple[Factor, ...]:
    """The segment's factors; a legacy reference is ``[unit n, rep expand]`` with n the map's neuron count."""
    if r.pattern is not None:
        return r.pattern
    n = int(m.shape[1])
    if n * r.expand != length:
        raise ValueError(f"{r.key} axis {r.axis}: segment of {length} indices for a map of {n} neurons")
    return (("unit", n),) + ((("rep", r.expand),) if r.expand > 1 else ())


def neuron_view(t: Tensor, ref: AxisRef, group: NeuronGroup) -> Tensor:
    """The entries of ``t`` that ``ref`` assigns to each of ``group``'s neurons, as a ``(group.size, -1)`` matrix
    (row ``u * unit_size + d`` for unit u, inner index d): the segment of the axis, split into its factors, with
    the unit and inner factors first; rep factors and the other axes are the row's features. This is how a method
    reads a group's incoming / outgoing weights whatever the layout (segments, heads, GQA reps, flattens)."""
    length = ref.length(group)
    seg = t.narrow(ref.axis, ref.offset, length).movedim(ref.axis, 0)
    factors = ref.factors(group)
    kinds = [k for k, _ in factors]
    sizes = [s for _, s in factors]
    x = seg.reshape(*sizes, *seg.shape[1:])
    front = [kinds.index("unit")] + ([kinds.index("inner")] if "inner" in kinds else [])
    rest = [i for i in range(len(kinds)) if i not in front]
    x = x.permute(*front, *rest, *range(len(kinds), x.dim()))
    return x.reshape(group.size, -1)


def permuted_state(
    state: Mapping[str, Tensor], graph: FusionGraph, perms: Mapping[str, Tensor], *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """One member's tensors with the neurons of the given groups permuted: slot s of group g holds neuron
    ``perms[g][s]`` (a neuron-level index vector, see :meth:`NeuronGroup.neuron_permutation`).

    Applies ``A = P``, ``B = P^T`` (lambda = 1) through :func:`member_tensor`, the builder's code path, so a
    permuted copy is exactly what a one-member fusion with the permutation plan would build.
    """
    maps: dict[str, tuple[Tensor, Tensor]] = {}
    for name, g in graph.groups.items():
        p = perms.get(name)
        if p is None:
            continue
        idx = torch.as_tensor(p, dtype=torch.long).cpu()
        if sorted(idx.tolist()) != list(range(g.size)):
            raise ValueError(f"perms[{name!r}] must be a permutation of range({g.size}); got {idx.tolist()}")
        pm = torch.zeros(g.size, g.size, dtype=torch.float64)
        pm[torch.arange(g.size), idx] = 1.0
        maps[name] = (pm, pm.T.contiguous())
    out = dict(state)
    sub = {n: graph.groups[n] for n in maps}
    by_key: dict[str, list[tuple[str, AxisRef]]] = {}
    for name, g in sub.items():
        for r in g.refs:
            by_key.setdefault(r.key, []).append((name, r))
    for key, refs in by_key.items():
        if key not in out:
            continue
        t = out[key]
        plan = axis_plan(refs, sub)
        # permutation maps only move entries: the result is exact in the tensor's own dtype
        new = member_tensor(t.detach(), plan, maps, 1.0)
        out[key] = new.to(dtype or t.dtype)
    return out
