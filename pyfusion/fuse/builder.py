"""The one builder (DESIGN §3): ``W' = sum_k A_k^{out} W_k B_k^{in}``, ``b' = sum_k A_k b_k``, per-neuron params by A_k.

Every tensor of the members (parameters and floating-point buffers, under every name a tied tensor has) is
transformed along each axis segment a neuron group indexes, through the segment's factor pattern
(:mod:`pyfusion.graph.transform`): the tensor's output axis (its lowest producer / per-neuron axis) by ``A_k``
(which carries lambda_k), every other referenced axis by ``B_k^T`` (expanded as ``B_k kron I_e`` after a flatten
of ``e`` spatial positions); gaps keep their values (scaled by lambda_k on the output axis). A tensor with no
output axis (the last layer, whose outputs are the logits) is weighted by lambda_k instead.

The fused module is a deep copy of member 0 in which every module whose tensors change shape is re-created
(Linear, Conv1d / Conv2d, BatchNorm, LayerNorm, Embedding) or resized in place (any other module: its
parameters are replaced, and the size attributes its forward reads are updated by an adapter registered for its
class: Hugging Face ``Conv1D``, GPT-2 / BERT / ViT attention, ``nn.MultiheadAttention``, ...). Normalized groups
(a LayerNorm / RMSNorm over a stream) whose maps are not permutations of the full width get their normalizer
replaced by :class:`pyfusion.nn.norm.MemberViewNorm` (``y = sum_k A_k norm_k(B_k x)``, exact at alpha = 1).
Tied parameters stay tied when their fused values are equal (permutation fusion) and are untied otherwise
(Hugging Face ``config.tie_word_embeddings`` is then set to False). The members are never modified.

Each group's layout is recorded on the result in ``fusion_layouts`` (group -> segment sizes) and
``fusion_module_layouts`` (module path -> {"out", "in", "in_expand"} for modules whose axes are whole simple groups,
and for every module with referenced tensors ``"segments"``: per parameter the member-mask segments of each axis,
:func:`member_segments`), so that execution modules (pyfusion.nn.PartialLinear, ...) can be swapped in for every
widened layer, heads, packed projections and concatenations included (pyfusion.fuse.fast).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion._modcopy import deepcopy_module
from pyfusion.fuse.plan import GroupPlan, Plan, lazy_map, map_shape, pristine_map
from pyfusion.graph.groups import AxisRef, FusionGraph
from pyfusion.graph.transform import apply_map, axis_plan, member_tensor, selection
from pyfusion.nn.norm import MemberViewNorm

__all__ = [
    "DeferredWidthCheck",
    "build",
    "deferred_width_checks",
    "fused_tensors",
    "register_adapter",
    "is_permutation_plan",
]

# kept under their historical names (tests and benchmarks call them)
_selection = selection
_apply = apply_map


ScatterPlans = list[list[tuple[int, Tensor, Tensor | None, int]]]  # per member, per ref: (axis, dest, values, e)


def _scatter_fused(
    states: Sequence[dict[str, Tensor]],
    key: str,
    refs: list[tuple[str, AxisRef]],
    maps: dict[str, GroupPlan],
    selection,  # noqa: ANN001 - (group, member, consumer) -> _selection result
    lambdas: Sequence[float],
    has_out: bool,
) -> Tensor | None:
    """The fused tensor ``key`` by scatters (:func:`_scatter_plans`, :func:`_scatter_dense`), or None when that
    fast path does not apply."""
    got = _scatter_plans(states, key, refs, maps, selection)
    return None if got is None else _scatter_dense(states, key, got[0], got[1], lambdas, has_out)


def _scatter_plans(
    states: Sequence[dict[str, Tensor]],
    key: str,
    refs: list[tuple[str, AxisRef]],
    maps: dict[str, GroupPlan],
    selection,  # noqa: ANN001 - (group, member, consumer) -> _selection result
) -> tuple[ScatterPlans, list[int]] | None:
    """Per member and axis, where member k's entries go in the fused tensor ``key`` (and its new shape), or None
    when the scatter path does not apply.

    Applies when every map of the tensor's axes is an injective selection for every member (permutations,
    partial-fusion slot maps) and those axes are distinct and consecutive. Member k's tensor, scaled by the map
    values exactly as :func:`_apply` scales it (same products, same order), is scattered in one pass into the
    slots it occupies: ``out[new_0(i), new_1(j), ...] += v(i) w(j) t_k[i, j, ...]``; the first member is a plain
    put into a zero tensor and later members add, so every entry is the same sum as the general path's (0 + x
    where a member does not reach). The general path moves the fused-size tensor 6-7 times per member
    (index_select, index_copy, index_fill per axis, then the sum); here it is written about twice: 95 -> 48 ms
    for a 512 -> 512 3x3 float64 convolution at alpha 0.75 (K = 2, 1 thread, 2-core EPYC VM).
    """
    if not refs:
        return None
    axes = sorted(r.axis for _, r in refs)
    if len(set(axes)) != len(axes) or axes != list(range(axes[0], axes[0] + len(axes))):
        return None
    if any(not r.is_simple for _, r in refs) or sum(r.role != "consumer" for _, r in refs) > 1:
        return None  # segments / unit patterns, or a second per-neuron axis (B_k^T there): the general path
    plans: ScatterPlans = []
    new_shape = list(states[0][key].shape)
    for k in range(len(states)):
        per_ref = []
        for gname, r in refs:
            consumer = r.role == "consumer"
            sel = selection(gname, k, consumer)
            if sel is None or not sel[3]:
                return None
            rows, cols, vals = sel[0], sel[1], sel[2]
            n_old = states[k][key].shape[r.axis] // r.expand
            m_shape = map_shape(maps[gname].B, k)[::-1] if consumer else map_shape(maps[gname].A, k)
            if int(m_shape[1]) != n_old or cols.numel() != n_old:  # a dropped old neuron: general path
                return None
            dest = torch.empty(n_old, dtype=torch.long)
            dest[cols] = rows
            v_old = None
            if vals is not None:
                v_old = torch.empty(n_old, dtype=vals.dtype)
                v_old[cols] = vals
            if r.expand > 1:
                ar = torch.arange(r.expand)
                dest = (dest[:, None] * r.expand + ar).reshape(-1)
                v_old = None if v_old is None else v_old.repeat_interleave(r.expand)
            new_shape[r.axis] = int(m_shape[0]) * r.expand
            per_ref.append((r.axis, dest, v_old, r.expand))
        plans.append(per_ref)
    return plans, new_shape


def _scatter_source(t: Tensor, plan_k: list[tuple[int, Tensor, Tensor | None, int]], lam: float, has_out: bool,
                    out: Tensor | None = None) -> Tensor:  # fmt: skip
    """Member k's float64 tensor scaled by its map values along every axis (in the refs' order), then by lambda_k
    when the tensor has no output axis: the same products in the same order as :func:`_scatter_fused`'s. Written
    into ``out`` (a view of the source's shape) when given."""
    src = t.detach().to(torch.float64)
    if out is not None:
        out.copy_(src)
        src = out
    for axis, _dest, v, _e in plan_k:
        if v is not None:
            shape = [1] * t.dim()
            shape[axis] = -1
            vv = v.to(device=t.device, dtype=torch.float64).reshape(shape)
            src = src.mul_(vv) if out is not None else src * vv
    if not has_out:
        src = src.mul_(lam) if out is not None else src * lam
    return src


def _scatter_dense(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: list[int],
    lambdas: Sequence[float],
    has_out: bool,
) -> Tensor:
    """The dense fused tensor of :func:`_scatter_fused` from its per-member scatter plans."""
    out = None
    for k, st in enumerate(states):
        t = st[key].detach()
        if out is None:
            out = torch.zeros(new_shape, dtype=torch.float64, device=t.device)
        src = _scatter_source(t, plans[k], lambdas[k], has_out)
        # the inner axes scattered one at a time into zeros, then the first axis written (k = 0) or added
        # (index_add_ is out + x elementwise, the same sum as out[idx] += x): one advanced-index put over all axes
        # at once was 1.4x slower (512 -> 896 slots, 3x3 float64, 1 thread)
        order = sorted(plans[k], key=lambda p: p[0])
        for axis, dest, _v, _e in order[:0:-1]:
            shape = list(src.shape)
            shape[axis] = new_shape[axis]
            src = torch.zeros(shape, dtype=src.dtype, device=src.device).index_copy_(axis, dest.to(t.device), src)
        axis0, dest0 = order[0][0], order[0][1].to(t.device)
        if k == 0:
            out.index_copy_(axis0, dest0, src)
        else:
            out.index_add_(axis0, dest0, src)
    return out


def _scatter_packed(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: list[int],
    lambdas: Sequence[float],
    has_out: bool,
    in_segments: Any,
    out_segments: Any,
    scratch: Tensor | None = None,
) -> Tensor:
    """``pack_segment_weight(_scatter_dense(...), in_segments, out_segments)`` (the flat packed weight of
    :class:`pyfusion.nn.PartialLinear` / ``PartialConv2d``, float64) gathered from the members without the dense
    tensor: per output segment, each member's scaled tensor (zero-padded by one row and column: the pad is where a
    member does not reach) is gathered at the segment's rows and at the columns of its stored input ranges, and the
    members that reach it are added in member order, so every entry is the dense path's sum (where a member does
    not reach, the dense path adds 0). Axes 0 (output) and 1 (input) only.

    The dense zero-block tensor of a VGG11 layer at alpha 0.75 is 3x a member's, and the packed one 2x: building
    it, then packing it and checking its zero blocks, was most of the fusion's time (see bench_partial_fusion).
    ``scratch`` (float64, at least :func:`pad_numel` entries, on the members' device) holds the padded copies: only
    their pad row and column are zeroed (fresh zero tensors cost their page faults on every layer)."""
    from pyfusion.ops.layout import segment_plan

    plan = segment_plan(in_segments, out_segments)
    if tuple(new_shape[:2]) != (plan.o_total, plan.i_total):
        raise ValueError(f"{key}: segments for ({plan.o_total}, {plan.i_total}); the fused tensor is {new_shape}")
    fast = _scatter_packed_kernel(states, key, plans, new_shape, lambdas, has_out, plan, out_segments)
    if fast is not None:
        return fast
    taps_shape = tuple(new_shape[2:])
    taps = int(torch.Size(taps_shape).numel())
    srcs, invs = [], []
    need = pad_numel(states, key)
    use_scratch = scratch is not None and scratch.device == states[0][key].device and scratch.numel() >= need
    at = 0
    for k, st in enumerate(states):
        t = st[key].detach()
        n0, n1 = int(t.shape[0]), int(t.shape[1])
        pad_shape = (n0 + 1, n1 + 1, *t.shape[2:])
        if use_scratch:
            size = int(torch.Size(pad_shape).numel())
            pad = scratch[at : at + size].view(pad_shape)
            at += size
            pad[n0].zero_()
            pad[:n0, n1].zero_()
        else:
            pad = torch.zeros(pad_shape, dtype=torch.float64, device=t.device)
        _scatter_source(t, plans[k], lambdas[k], has_out, out=pad[:n0, :n1])
        inv = []
        for axis, n_old in ((0, n0), (1, n1)):
            entry = next((p for p in plans[k] if p[0] == axis), None)
            if entry is None:
                inv.append(torch.arange(n_old, device=t.device))
            else:
                ia = torch.full((new_shape[axis],), n_old, dtype=torch.long)
                ia[entry[1]] = torch.arange(n_old)
                inv.append(ia.to(t.device))
        srcs.append(pad)
        invs.append((inv[0], inv[1], n0, n1))
    out = torch.empty(plan.stored * taps, dtype=torch.float64, device=srcs[0].device)
    for o, ranges in enumerate(plan.ranges):
        n_o, r0 = out_segments[o][0], plan.out_starts[o]
        if n_o == 0 or not ranges:
            continue
        k_o = plan.k_of_out[o]
        seg = out[plan.offsets[o] * taps : plan.offsets[o + 1] * taps].view(n_o, k_o, *taps_shape)
        cols = torch.empty(k_o, dtype=torch.long, device=out.device)
        for col, n, q in ranges:
            cols[q : q + n] = torch.arange(col, col + n, device=out.device)
        first = True
        for k in range(len(states)):
            inv0, inv1, n0, n1 = invs[k]
            ro, co = inv0[r0 : r0 + n_o], inv1[cols]
            if not (bool((ro < n0).any()) and bool((co < n1).any())):
                continue  # member k reaches no entry of this segment's stored blocks: it adds exact zeros
            # one dim-0 gather of (row, column) pairs from the (rows x columns, taps) view: 4.5x faster than
            # index_select on the rows then on the columns (512 -> 896 slots, 3x3 float64; 2x for a Linear)
            flat = srcs[k].view(-1, taps)
            pairs = (ro[:, None] * (n1 + 1) + co[None, :]).reshape(-1)
            if first:
                torch.index_select(flat, 0, pairs, out=seg.view(-1, taps))
                first = False
            else:
                seg.add_(flat.index_select(0, pairs).view(seg.shape))
        if first:
            seg.zero_()
    return out


def pad_numel(states: Sequence[dict[str, Tensor]], key: str) -> int:
    """Entries of the K padded member copies of :func:`_scatter_packed` for tensor ``key`` (its scratch size)."""
    return sum(
        (int(st[key].shape[0]) + 1) * (int(st[key].shape[1]) + 1) * int(torch.Size(st[key].shape[2:]).numel())
        for st in states
    )


def _scatter_dense_direct(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: list[int],
    lambdas: Sequence[float],
    has_out: bool,
    scratch: Tensor | None = None,
) -> Tensor:
    """The dense fused tensor of :func:`_scatter_fused` (axes 0 and 1 mapped) by one scatter per member: member
    k's scaled tensor, seen as (rows x columns, taps), is written (k = 0, into zeros) or added (``index_add_`` is
    ``out + x`` elementwise) at the (slot row, slot column) pairs its neurons go to. Every entry is the sum of the
    members that reach it in member order, as in the packed path; no padded copy, gather or temporary per member
    (VGG11 at alpha 0.25, the nine dense layers of a pair: 1.3-1.6x faster than the packing with one segment).
    ``scratch`` (float64, at least a member tensor's size, on its device) holds each member's scaled copy: fresh
    memory for every copy cost more in page faults than the copy itself (19 MB for a 512 x 512 3x3 layer)."""
    fast = _scatter_dense_kernel(states, key, plans, new_shape, lambdas, has_out)
    if fast is not None:
        return fast
    taps = int(torch.Size(new_shape[2:]).numel())
    out = None
    for k, st in enumerate(states):
        t = st[key].detach()
        n0, n1 = int(t.shape[0]), int(t.shape[1])
        buf = None
        if scratch is not None and scratch.device == t.device and scratch.numel() >= t.numel():
            buf = scratch[: t.numel()].view(t.shape)
        src = _scatter_source(t, plans[k], lambdas[k], has_out, out=buf).reshape(n0 * n1, taps)
        dest = {axis: d for axis, d, _v, _e in plans[k]}
        d0 = dest.get(0, torch.arange(n0)).to(t.device)
        d1 = dest.get(1, torch.arange(n1)).to(t.device)
        pairs = (d0[:, None] * new_shape[1] + d1[None, :]).reshape(-1)
        if out is None:
            out = torch.zeros(new_shape[0] * new_shape[1], taps, dtype=torch.float64, device=t.device)
            out.index_copy_(0, pairs, src)
        else:
            out.index_add_(0, pairs, src)
    assert out is not None
    return out.view(new_shape)


def _kernel_members(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: Sequence[int],
    lambdas: Sequence[float],
    has_out: bool,
) -> tuple[Any, list[tuple], list[Tensor]] | None:
    """(extension, member records, buffers to keep alive) for ``pyfusion._C.scatter_blocks_f64`` (csrc/scatter),
    or None where the engine does not apply: no extension, a tensor off the CPU, an axis past 1 mapped."""
    from pyfusion import _ext

    ext = _ext._C
    if ext is None or not hasattr(ext, "scatter_blocks_f64") or len(new_shape) < 2:
        return None
    if any(st[key].device.type != "cpu" for st in states) or any(p[0] > 1 for plan in plans for p in plan):
        return None
    taps = int(torch.Size(new_shape[2:]).numel())
    keep: list[Tensor] = []
    members = []
    for k, st in enumerate(states):
        t = st[key].detach().to(torch.float64).contiguous()  # the cast is exact, as in _scatter_source
        n0, n1 = int(t.shape[0]), int(t.shape[1])
        if t.dim() != len(new_shape) or n0 * n1 * taps != t.numel():
            return None
        dest = {0: torch.arange(n0), 1: torch.arange(n1)}
        vals: dict[int, Tensor] = {}
        order = []
        for axis, d, v, _e in plans[k]:
            dest[axis] = d.to(torch.long).contiguous()
            if v is not None:
                vals[axis] = v.to(torch.float64).contiguous()
                order.append(axis)
        keep += [t, dest[0], dest[1], *vals.values()]
        v0, v1 = vals.get(0), vals.get(1)
        members.append(
            (t.data_ptr(), n0, n1, dest[0].data_ptr(), dest[1].data_ptr(), 0 if v0 is None else v0.data_ptr(),
             0 if v1 is None else v1.data_ptr(), order[0] if order else 0, float(lambdas[k]), not has_out)
        )  # fmt: skip
    return ext, members, keep


def _scatter_dense_kernel(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: list[int],
    lambdas: Sequence[float],
    has_out: bool,
) -> Tensor | None:
    """:func:`_scatter_dense_direct`'s tensor from the C++ engine (``pyfusion._C.scatter_blocks_f64``,
    csrc/scatter), or None where it does not apply (:func:`_kernel_members`).

    One pass writes every fused entry once, with the torch path's operations in its order (0, then member 0
    written, later members added; each value ``((t * v_a) * v_b) * lambda`` as :func:`_scatter_source` scales
    it): bit-equal to it (tested), without the zero fill of the fused tensor, the scaled copy of each member and
    the ``index_add_`` pass (VGG11 pair at alpha 0.25, nine dense layers: ~150 -> ~50 ms, 1 thread)."""
    got = _kernel_members(states, key, plans, new_shape, lambdas, has_out)
    if got is None:
        return None
    ext, members, keep = got
    n0, n1, taps = int(new_shape[0]), int(new_shape[1]), int(torch.Size(new_shape[2:]).numel())
    out = torch.empty(new_shape, dtype=torch.float64)
    cols = torch.arange(n1)
    ext.scatter_blocks_f64(members, n0, n1, taps, [(0, n0, cols.data_ptr(), n1, out.data_ptr())], False,
                           torch.get_num_threads())  # fmt: skip
    del keep
    return out


def _scatter_packed_kernel(
    states: Sequence[dict[str, Tensor]],
    key: str,
    plans: ScatterPlans,
    new_shape: list[int],
    lambdas: Sequence[float],
    has_out: bool,
    plan: Any,
    out_segments: Any,
) -> Tensor | None:
    """:func:`_scatter_packed`'s flat packed weight from the C++ engine, one block per output segment (its rows at
    the columns of its stored input ranges), with that path's sums: the members reaching a segment, in member order,
    each adding its value or +0 (its zero pad); bit-equal to it (tested). None where the engine does not apply."""
    got = _kernel_members(states, key, plans, new_shape, lambdas, has_out)
    if got is None:
        return None
    ext, members, keep = got
    taps = int(torch.Size(new_shape[2:]).numel())
    out = torch.empty(plan.stored * taps, dtype=torch.float64)
    blocks = []
    for o, ranges in enumerate(plan.ranges):
        n_o, r0 = out_segments[o][0], plan.out_starts[o]
        if n_o == 0 or not ranges:
            continue
        cols = torch.empty(plan.k_of_out[o], dtype=torch.long)
        for col, n, q in ranges:
            cols[q : q + n] = torch.arange(col, col + n)
        keep.append(cols)
        seg = out[plan.offsets[o] * taps : plan.offsets[o + 1] * taps]
        blocks.append((int(r0), int(n_o), cols.data_ptr(), int(cols.numel()), seg.data_ptr()))
    ext.scatter_blocks_f64(members, int(new_shape[0]), int(new_shape[1]), taps, blocks, True,
                           torch.get_num_threads())  # fmt: skip
    del keep
    return out


class PendingWeight:
    """A fused weight the builder did not materialise (``build(defer=...)``): the scatter plans of
    :func:`_scatter_plans`, from which :meth:`dense` gives the dense zero-block tensor (exactly what
    :func:`fused_tensors` returns) and :meth:`packed` the packed weight of an execution module. The module holds a
    meta-device parameter of the fused shape until one of them is written (running it before raises)."""

    def __init__(self, states, key, plans, new_shape, lambdas, has_out):  # noqa: ANN001
        self.states, self.key, self.plans = states, key, plans
        self.shape, self.lambdas, self.has_out = tuple(new_shape), tuple(lambdas), has_out

    def dense(self, scratch: Tensor | None = None) -> Tensor:
        # one flat scatter per member (_scatter_dense_direct): 1.3-1.6x faster than the packing with one segment
        # read and written by every member (VGG11 pair, 640 slots, 3x3, float64, 1 thread), which was 2-3x faster
        # than _scatter_dense's per-axis zero-fills and index_copy_ / index_add_
        if len(self.shape) < 2 or any(p[0] > 1 for plan in self.plans for p in plan):
            every = (1 << len(self.states)) - 1
            return self.packed(((self.shape[1], every),), ((self.shape[0], every),)).view(self.shape)
        return _scatter_dense_direct(
            self.states, self.key, self.plans, list(self.shape), self.lambdas, self.has_out, scratch
        )

    def packed(self, in_segments: Any, out_segments: Any, scratch: Tensor | None = None) -> Tensor:
        return _scatter_packed(self.states, self.key, self.plans, list(self.shape), self.lambdas, self.has_out,
                               in_segments, out_segments, scratch)  # fmt: skip


# fused model -> {tensor key: PendingWeight} (weak keys: a dropped model takes its records with it)
_PENDING: weakref.WeakKeyDictionary[nn.Module, dict[str, PendingWeight]] = weakref.WeakKeyDictionary()


def pending_weights(model: nn.Module) -> dict[str, PendingWeight]:
    """The weights of ``model`` that ``build(defer=...)`` left unmaterialised (key -> :class:`PendingWeight`); the
    dict is the live record (pop an entry when writing the weight yourself)."""
    return _PENDING.get(model, {})


def materialize(model: nn.Module, keys: Sequence[str] | None = None) -> None:
    """Write the dense fused tensor of every pending weight of ``model`` (or of ``keys``) into its module."""
    pending = _PENDING.get(model)
    if not pending:
        return
    todo = [k for k in dict.fromkeys(pending if keys is None else keys) if k in pending]
    # one float64 scratch for every member's scaled copy (see _scatter_dense_direct), on the CPU
    sizes = [st[k].numel() for k in todo for st in pending[k].states if st[k].device.type == "cpu"]
    scratch = torch.empty(max(sizes), dtype=torch.float64) if sizes else None
    for key in todo:
        pw = pending.pop(key)
        mpath, _, pname = key.rpartition(".")
        mod = model.get_submodule(mpath) if mpath else model
        old = getattr(mod, pname)
        dense = pw.dense(scratch)
        setattr(mod, pname, nn.Parameter(dense.to(old.dtype), requires_grad=old.requires_grad))
    if not pending:
        _PENDING.pop(model, None)


def _deferrable(mod: nn.Module) -> bool:
    """Layers whose ``weight`` may be left pending: the ones pyfusion.fuse.fast can swap (exact torch classes)."""
    if type(mod) is nn.Linear:
        return True
    conv = type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
    return conv and not isinstance(mod.padding, str)


def attach_selection(m: Tensor, sel: Any) -> None:
    """Record on the map ``m`` (an A_k, or a B_k for its transpose) the :func:`selection` of ``m`` (A_k) or of
    ``m.T`` (B_k) computed by whoever built it from its slot assignment, so that the builder does not re-derive it
    from the dense matrix (``np.nonzero`` over every (slots, n) map: 0.15 s of an MLP-1024 pair's partial fusion).
    Valid while ``m`` is not modified in place (its version counter is recorded and checked)."""
    m._pyfusion_selection = (m._version, sel)  # type: ignore[attr-defined]


def _recorded_selection(m: Tensor) -> Any:
    rec = getattr(m, "_pyfusion_selection", None)
    if rec is None or rec[0] != m._version:
        return None
    return rec[1]


def _map_selection(gp: GroupPlan, k: int, consumer: bool) -> Any:
    """:func:`selection` of ``A_k`` (or of ``B_k^T`` for a consumer axis), recorded or computed."""
    lazy = lazy_map(gp.B if consumer else gp.A, k)
    if lazy is not None:  # a partial-assignment map never made: its selection without the dense map
        return lazy.selection(k)
    m = gp.B[k] if consumer else gp.A[k]
    rec = _recorded_selection(m)
    if rec is not None:
        return rec
    return _selection(m.T if consumer else m)


def _group_maps(graph: FusionGraph, plan: Plan) -> dict[str, GroupPlan]:
    maps: dict[str, GroupPlan] = {}
    lambdas = plan.lambdas
    for name, g in graph.groups.items():
        gp = plan.groups.get(name)
        if gp is None:
            eye = torch.eye(g.size, dtype=torch.float64)
            gp = GroupPlan([lam * eye for lam in lambdas], [eye] * len(lambdas), (g.size,) + (0,) * len(lambdas))
        maps[name] = gp
    return maps


def fused_tensors(
    states: Sequence[dict[str, Tensor]], graph: FusionGraph, plan: Plan, defer: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Compute every fused tensor in float64.

    Args:
        states: K state dicts (parameters and buffers) of the members (tied tensors under each of their names).
        graph: the members' neuron groups.
        plan: maps per group (groups missing from the plan are averaged: A_k = lambda_k I, B_k = I).
        defer: keys (weights of at least 2 dimensions) to return as :class:`PendingWeight` instead of tensors where
            the scatter path applies.

    Returns:
        key -> fused float64 tensor (non-floating buffers such as ``num_batches_tracked`` are taken from member 0),
        or :class:`PendingWeight` for deferred keys.
    """
    by_key = graph.refs_by_key()
    lambdas = plan.lambdas
    out: dict[str, Tensor] = {}
    maps = _group_maps(graph, plan)
    sel_cache: dict[tuple[str, int, bool], tuple[Tensor, Tensor, Tensor | None, bool] | None] = {}

    def sel_of(gname: str, k: int, consumer: bool) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
        # one analysis per (group, member, side), not per tensor: a group's map is shared by all its tensors
        ck = (gname, k, consumer)
        if ck not in sel_cache:
            sel_cache[ck] = _map_selection(maps[gname], k, consumer)
        return sel_cache[ck]

    class _MemberSel(dict):
        def __init__(self, k: int):
            super().__init__()
            self.k = k

        def get(self, key, default=None):  # noqa: ANN001, ANN202 - (group, uses_B) -> selection
            return sel_of(key[0], self.k, key[1])

    member_sel = [_MemberSel(k) for k in range(len(states))]
    for key, t0 in states[0].items():
        if not torch.is_floating_point(t0):
            out[key] = t0.clone()
            continue
        refs: list[tuple[str, AxisRef]] = by_key.get(key, [])
        has_out = any(r.role in ("producer", "neuron") for _, r in refs)
        if key in defer and t0.dim() >= 2:
            got = _scatter_plans(states, key, refs, maps, sel_of)
            if got is not None and all(p[0] in (0, 1) for per in got[0] for p in per):
                out[key] = PendingWeight(states, key, got[0], got[1], lambdas, has_out)
                continue
        fast = _scatter_fused(states, key, refs, maps, sel_of, lambdas, has_out)
        if fast is not None:
            out[key] = fast
            continue
        ax = axis_plan(refs, graph.groups)
        acc = None
        for k, st in enumerate(states):
            t = st[key].detach().to(torch.float64)
            mk = {g: (maps[g].A[k].to(t.device), maps[g].B[k].to(t.device)) for g, _ in refs}
            t = member_tensor(t, ax, mk, lambdas[k], member_sel[k])
            # t is always a new tensor here (member_tensor allocates), so the sum can accumulate in place
            acc = t if acc is None else acc.add_(t)
        out[key] = acc
    return out


# ---- module re-creation and adapters --------------------------------------------------------------------
Adapter = Callable[[nn.Module, str, nn.Module], None]
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(class_name: str) -> Callable[[Adapter], Adapter]:
    """Register ``fn(module, path, original)`` to update the size attributes a module class's forward reads after
    the builder changed the shapes of its (or its children's) tensors; ``original`` is member 0's module at the
    same path (before fusion), so sizes can be scaled (e.g. ``heads = original.heads * new_width // old_width``).
    Keyed by class name, so that pyfusion does not import the libraries defining the classes. Raise
    ``ValueError`` for sizes the class cannot express. A module whose forward reads a size no adapter updates is
    caught by the re-trace check of :func:`build`.

    Example::

        @register_adapter("MyAttention")
        def _(mod, path, original):
            mod.n_heads = mod.qkv.out_features // 3 // (original.qkv.out_features // 3 // original.n_heads)
    """

    def deco(fn: Adapter) -> Adapter:
        _ADAPTERS[class_name] = fn
        return fn

    return deco


@register_adapter("Conv1D")
def _adapt_hf_conv1d(mod: nn.Module, path: str, original: nn.Module) -> None:
    # transformers.pytorch_utils.Conv1D: weight (nx, nf), forward reads nf
    mod.nx, mod.nf = int(mod.weight.shape[0]), int(mod.weight.shape[1])


@register_adapter("GPT2Attention")
def _adapt_gpt2_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    if getattr(mod, "is_cross_attention", False):
        raise ValueError(f"{path}: resizing GPT-2 cross attention is not supported")
    split = int(mod.c_attn.weight.shape[1]) // 3  # c_attn writes q | k | v, split by split_size
    mod.split_size = split
    mod.embed_dim = split
    mod.num_heads = split // int(mod.head_dim)


def _adapt_bert_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """BERT-style self attention views q / k / v as ``(..., -1, attention_head_size)`` and merges the heads back
    with ``view(..., all_head_size)``: ``all_head_size`` and ``num_attention_heads`` follow the fused projections.
    The projections are ``query`` / ``key`` / ``value`` (BERT, RoBERTa, MobileViT) or ``q`` / ``k`` / ``v`` (MPNet,
    whose output projection ``o`` is part of the module)."""
    names = ("query", "key", "value") if hasattr(mod, "query") else ("q", "k", "v")
    hd = int(mod.attention_head_size)
    q, k, v = (_rows(getattr(mod, n)) for n in names)
    out = getattr(mod, "o", None)
    if not q == k == v or q % hd or (out is not None and _cols(out) != q):
        reads = "" if out is None else f" and o reads {_cols(out)}"
        raise ValueError(
            f"{path}: the fused {' / '.join(names)} projections write {q} / {k} / {v} rows{reads}: not the same whole "
            f"heads of {hd} dims"
        )
    mod.all_head_size = q
    mod.num_attention_heads = q // hd


for _name in (
    "BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention", "MPNetSelfAttention",
    "MobileViTSelfAttention",
):  # fmt: skip
    register_adapter(_name)(_adapt_bert_attention)


@register_adapter("ViTSelfAttention")
def _adapt_vit_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    proj = getattr(mod, "q_proj", None) or getattr(mod, "query", None)
    head_dim = int(getattr(mod, "head_dim", 0) or getattr(mod, "attention_head_size", 0))
    mod.num_attention_heads = int(proj.weight.shape[0]) // head_dim
    if hasattr(mod, "all_head_size"):
        mod.all_head_size = int(proj.weight.shape[0])


@register_adapter("OPTAttention")
def _adapt_opt_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    # OPT views q / k / v as (batch, -1, num_heads, head_dim): a stale num_heads folds the extra heads into the
    # sequence axis
    mod.num_heads = int(mod.q_proj.weight.shape[0]) // int(mod.head_dim)
    mod.embed_dim = int(mod.out_proj.weight.shape[0])


def _rows(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])


def _cols(linear: nn.Module) -> int:
    return int(linear.weight.shape[1])


@register_adapter("FalconAttention")
def _adapt_falcon_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """Falcon's attention views its fused ``query_key_value`` output through ``num_heads`` / ``num_kv_heads``
    (``head_dim`` is fixed): three layouts, chosen by the config flags the module copies at construction.

    * new decoder architecture: rows ``[kv group: its g queries, key, value]`` per group, read as
      ``view(..., num_kv_heads, -1, head_dim)``: whole groups may widen, the queries per group ``g`` stay;
    * multi-query: ``[queries | one key | one value]``, split by ``[num_heads, 1, 1]``: queries may widen, the
      shared key / value head cannot (two members' keys would need two key heads);
    * otherwise ``[head: query, key, value]`` per head, ``unflatten(num_heads, 3)``.

    ``num_key_value_groups`` (queries per key head, read by the attention interface's ``repeat_kv``) is recomputed.
    """
    hd = int(mod.head_dim)
    rows, q_cols = _rows(mod.query_key_value), _cols(mod.dense)
    if q_cols % hd:
        raise ValueError(f"{path}: the fused output projection reads {q_cols} features, not whole heads of {hd}")
    heads = q_cols // hd
    if mod.new_decoder_architecture:
        per_group = int(original.num_heads) // int(original.num_kv_heads)
        group_rows = (per_group + 2) * hd
        if rows % group_rows or heads != rows // group_rows * per_group:
            raise ValueError(
                f"{path}: Falcon's new decoder architecture packs query_key_value per key / value group ({per_group} "
                f"queries, a key and a value of {hd} dims each: {group_rows} rows); the fused layout ({rows} rows, "
                f"{heads} query heads) would need groups of unequal sizes"
            )
        mod.num_kv_heads = rows // group_rows
    elif mod.multi_query:
        if rows != (heads + 2) * hd:
            raise ValueError(
                f"{path}: multi-query Falcon has one key / value head shared by all query heads; the fused "
                f"query_key_value ({rows} rows for {heads} query heads of {hd} dims) would need "
                f"{(rows - heads * hd) // (2 * hd)} of them"
            )
        mod.num_kv_heads = 1
    else:
        if rows != 3 * heads * hd:
            raise ValueError(
                f"{path}: Falcon's query_key_value packs query, key and value per head ({3 * hd} rows each); the fused "
                f"one has {rows} rows for {heads} heads"
            )
        mod.num_kv_heads = heads * int(original.num_kv_heads) // int(original.num_heads)
    mod.num_heads = heads
    mod.num_key_value_groups = heads // int(mod.num_kv_heads)
    mod.hidden_size = mod.split_size = _rows(mod.dense)


@register_adapter("Phi3Attention")
def _adapt_phi3_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """Phi-3 splits its fused ``qkv_proj`` rows ``[queries | keys | values]`` at ``self.config.num_attention_heads *
    head_dim`` and ``self.num_key_value_heads * head_dim``. The config is shared by every layer, the rotary embedding
    (its head dim) and ``set_attn_implementation``: the module gets its own view of it
    (:class:`pyfusion._module_config.ModuleConfig`) with its head counts; every other key still reads the shared
    config. The queries per key / value head stay the member's (grouped-query heads widen by whole groups)."""
    from pyfusion._module_config import ModuleConfig

    hd = int(mod.head_dim)
    rows, q_cols = _rows(mod.qkv_proj), _cols(mod.o_proj)
    per_group = int(original.num_key_value_groups)
    if q_cols % (hd * per_group) or (rows - q_cols) % (2 * hd):
        raise ValueError(
            f"{path}: the fused o_proj reads {q_cols} features and qkv_proj writes {rows} rows: not whole key / value "
            f"groups of {per_group} query heads of {hd} dims"
        )
    heads, kv = q_cols // hd, (rows - q_cols) // (2 * hd)
    if heads != kv * per_group:
        raise ValueError(
            f"{path}: the fused qkv_proj has {heads} query heads for {kv} key / value heads; Phi-3 needs "
            f"{per_group} query heads per key / value head (its config's ratio)"
        )
    mod.num_key_value_heads = kv
    mod.num_key_value_groups = per_group
    mod.config = ModuleConfig(mod.config, {"num_attention_heads": heads, "num_key_value_heads": kv})


@register_adapter("StableLmAttention")
def _adapt_stablelm_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """StableLM views queries by ``self.num_heads`` and keys / values by ``self.num_key_value_heads`` (``head_dim``
    fixed); ``repeat_kv`` reads ``num_key_value_groups``, which stays the member's (grouped-query heads widen by
    whole groups). The optional per-head q / k LayerNorms (``qk_layernorm``) are one module per head: a widened
    head count is refused there."""
    hd = int(mod.head_dim)
    q, k, v, o = _rows(mod.q_proj), _rows(mod.k_proj), _rows(mod.v_proj), _cols(mod.o_proj)
    per_group = int(original.num_key_value_groups)
    if q % hd or k % hd or k != v or o != q or q // hd != k // hd * per_group:
        raise ValueError(
            f"{path}: the fused q / k / v projections write {q} / {k} / {v} rows and o_proj reads {o}: not whole key "
            f"/ value groups of {per_group} query heads of {hd} dims"
        )
    if getattr(mod, "qk_layernorm", False) and q != _rows(original.q_proj):
        raise ValueError(
            f"{path}: StableLM's qk_layernorm holds one LayerNorm per head ({original.num_heads}); pyfusion does not "
            "add or merge them, so the head count must stay (alpha 0 for the attention's groups)"
        )
    mod.num_heads, mod.num_key_value_heads, mod.num_key_value_groups = q // hd, k // hd, per_group


@register_adapter("LevitAttention")
@register_adapter("LevitAttentionSubsample")
def _adapt_levit_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """LeViT views its packed projection as ``(..., num_attention_heads, -1)`` and splits each head into
    ``[key_dim (queries), key_dim, attention_ratio * key_dim]`` (the subsampling block: keys and values packed, queries
    their own Linear); the attention output is reshaped to ``out_dim_projection``. Heads widen whole. In eval mode
    ``get_attention_biases`` caches the gathered per-head biases by device: the copy's cache holds the member's, so it
    is emptied."""
    kd, ratio = int(mod.key_dim), int(mod.attention_ratio)
    sub = hasattr(mod, "keys_values")
    packed = mod.keys_values if sub else mod.queries_keys_values
    per_head = (1 if sub else 2) * kd + ratio * kd
    rows, proj_in = _rows(packed.linear), _cols(mod.projection.linear)
    heads = rows // per_head
    q_heads = _rows(mod.queries.linear) // kd if sub else heads
    if rows % per_head or proj_in != ratio * kd * heads or q_heads != heads:
        raise ValueError(
            f"{path}: the fused packed projection writes {rows} rows (heads of {per_head}) and the output projection "
            f"reads {proj_in} (heads of {ratio * kd}): not the same whole heads"
        )
    mod.num_attention_heads = heads
    mod.out_dim_projection = ratio * kd * heads
    if not sub:
        mod.out_dim_keys_values = rows
    mod.attention_bias_cache = {}


@register_adapter("WhisperAttention")
def _adapt_whisper_attention(mod: nn.Module, path: str, original: nn.Module) -> None:
    """Whisper's attention views keys and values as ``(batch, -1, num_heads, head_dim)`` (queries by ``-1``)."""
    hd = int(mod.head_dim)
    q, k, v = _rows(mod.q_proj), _rows(mod.k_proj), _rows(mod.v_proj)
    if not q == k == v or q % hd or _cols(mod.out_proj) != q:
        raise ValueError(
            f"{path}: the fused q / k / v projections write {q} / {k} / {v} rows and out_proj reads "
            f"{_cols(mod.out_proj)}: not the same whole heads of {hd} dims"
        )
    mod.num_heads = q // hd
    mod.embed_dim = _rows(mod.out_proj)


@register_adapter("SegformerForImageClassification")
def _adapt_segformer_classifier(mod: nn.Module, path: str, original: nn.Module) -> None:
    """Segformer's classification model flattens the last stage to tokens with ``reshape(batch, -1,
    self.config.hidden_sizes[-1])`` before pooling: a widened last stage would be folded into more tokens of the
    member's width. The model gets its own view of the config (:class:`pyfusion._module_config.ModuleConfig`) whose
    ``hidden_sizes`` ends with the classifier's fused input width; the stages keep reading the shared config (they
    read it only when built). Without a classifier (``num_labels=0``: the pooled stream is returned, so it keeps the
    member's width) nothing changes."""
    from pyfusion._module_config import ModuleConfig

    head = mod.classifier
    if getattr(head, "weight", None) is None:
        return
    sizes = list(mod.config.hidden_sizes)
    width = _cols(head)
    if width == sizes[-1]:
        return
    mod.config = ModuleConfig(mod.config, {"hidden_sizes": [*sizes[:-1], width]})


@register_adapter("MultiheadAttention")
def _adapt_mha(mod: nn.Module, path: str, original: nn.Module) -> None:
    if not mod._qkv_same_embed_dim:
        raise ValueError(f"{path}: resizing nn.MultiheadAttention with kdim / vdim != embed_dim is not supported")
    heads = int(mod.in_proj_weight.shape[0]) // 3
    stream = int(mod.in_proj_weight.shape[1])
    if heads != stream or int(mod.out_proj.weight.shape[0]) != stream:
        raise ValueError(
            f"{path}: nn.MultiheadAttention needs its heads ({heads} = in_proj rows / 3) as wide as its input and "
            f"output ({stream}); fuse the stream and the heads with the same layout (e.g. the same alpha)"
        )
    mod.embed_dim = mod.kdim = mod.vdim = stream
    mod.num_heads = heads // int(mod.head_dim)


@register_adapter("TransformerEncoderLayer")
def _adapt_encoder_layer(mod: nn.Module, path: str, original: nn.Module) -> None:
    if isinstance(mod.norm1, MemberViewNorm) or isinstance(mod.norm2, MemberViewNorm):
        # the fused C++ fast path reads norm1.weight / eps directly; the Python path calls the modules
        mod.activation_relu_or_gelu = False


def _depthwise(mod: nn.Module) -> bool:
    """A depthwise convolution of the members (``groups == in_channels == out_channels``, one filter per channel,
    the only grouped convolution the tracer accepts): a fused width keeps one group per channel."""
    return mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def _builtin_attrs(mod: nn.Module) -> None:
    """Size attributes of torch's own layers after their tensors were replaced in place."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if _depthwise(mod):  # one filter per channel: as many groups as channels at any width
            mod.groups = int(mod.weight.shape[0])
        mod.out_channels = int(mod.weight.shape[0])
        mod.in_channels = int(mod.weight.shape[1]) * mod.groups
    elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = int(ref.shape[0])
    elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = int(mod.weight.shape[0]), int(mod.weight.shape[1])
    elif isinstance(mod, getattr(nn, "RMSNorm", ())) and mod.weight is not None:
        mod.normalized_shape = tuple(mod.weight.shape)


def _recreate(mod: nn.Module, shapes: dict[str, tuple[int, ...]], path: str) -> nn.Module | None:
    """A new module of exactly ``type(mod)`` with the new sizes (torch's own layers), or None (resize in place)."""
    p = next(iter(mod.parameters()), None)
    if p is None:
        p = next(iter(mod.buffers()))
    kw = {"dtype": p.dtype}
    t = type(mod)
    if t is nn.Linear:
        out_f, in_f = shapes["weight"]
        return nn.Linear(in_f, out_f, bias=mod.bias is not None, **kw)
    if t in (nn.Conv1d, nn.Conv2d):
        out_c, in_c = shapes["weight"][:2]
        groups = out_c if _depthwise(mod) else mod.groups
        return t(
            in_c * groups, out_c, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
            mod.bias is not None, mod.padding_mode, **kw,
        )  # fmt: skip
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        n = next(iter(shapes.values()))[0]
        return t(n, mod.eps, mod.momentum, mod.affine, mod.track_running_stats, **kw)
    if t is nn.LayerNorm and len(mod.normalized_shape) == 1:
        n = next(iter(shapes.values()))[0]
        return nn.LayerNorm((n,), mod.eps, mod.elementwise_affine, bias=mod.bias is not None, **kw)
    if t is nn.Embedding:
        num, dim = shapes["weight"]
        return nn.Embedding(
            num, dim, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq, mod.sparse, **kw
        )
    return None


def _resize_in_place(mod: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name in mod._parameters and mod._parameters[name] is not None:
            old = mod._parameters[name]
            if tuple(old.shape) != tuple(shape):
                mod._parameters[name] = nn.Parameter(
                    torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
        elif name in mod._buffers and mod._buffers[name] is not None:
            old = mod._buffers[name]
            if tuple(old.shape) != tuple(shape):
                mod._buffers[name] = torch.empty(shape, dtype=old.dtype, device=old.device)


def _shell_copy(member: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A deep copy of ``member`` whose tensors named in ``tensors`` (all of them overwritten by :func:`_assign`, or
    inside a module that is replaced) are uninitialised storage of the same shape, dtype and device instead of
    clones: cloning member 0's weights only to throw them away was 20-60 ms of a VGG11 pair's partial fusion."""
    memo: dict[int, Any] = {}
    for name, p in member.named_parameters(remove_duplicate=False):
        if name in tensors and id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
    for name, b in member.named_buffers(remove_duplicate=False):
        if name in tensors and id(b) not in memo:
            memo[id(b)] = torch.empty_like(b)
    return deepcopy_module(member, memo)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def is_permutation_plan(gp: GroupPlan, lambdas: Sequence[float], tol: float = 1e-12) -> bool:
    """Whether every member's maps are ``A_k = lambda_k P_k``, ``B_k = P_k^T`` with ``P_k`` a permutation of the
    full width (full fusion by permutations: a normalizer then keeps its usual form with combined parameters)."""
    for k, lam in enumerate(lambdas[: len(gp.A)]):
        if pristine_map(gp.A, k) and pristine_map(gp.B, k):  # made by Plan.from_permutations, never read: no pass
            if abs(gp.A.coef(k) - lam) > tol:  # type: ignore[attr-defined]
                return False
            continue
        a, b = gp.A[k], gp.B[k]
        n, slots = b.shape
        if slots != n:
            return False
        if not (bool(((b == 0) | (b == 1)).all()) and bool((b.sum(0) == 1).all()) and bool((b.sum(1) == 1).all())):
            return False
        if float((a - lam * b.T).abs().max()) > tol:
            return False
    return True


def _normalizer_modules(graph: FusionGraph, plan: Plan, maps: dict[str, GroupPlan]) -> dict[str, tuple[str, int, int]]:
    """module path -> (group, the group's axis, copies), for the normalizers to replace by member-view modules.

    Raises:
        ValueError: a normalized group whose maps widen or mix it while its normalizer is functional code.
    """
    out: dict[str, tuple[str, int, int]] = {}
    for name, g in graph.groups.items():
        if not g.normalizers or name not in plan.groups:
            continue
        if is_permutation_plan(maps[name], plan.lambdas):
            continue
        for nz in g.normalizers:
            if not nz.wrappable:
                raise ValueError(
                    f"group {name!r} {nz.describe()}: the group may be permuted but not widened, clustered "
                    "or softly mapped (use a permutation method, or alpha = 0, for this group)"
                )
            out[nz.module] = (name, nz.dim, nz.copies)
    return out


def build(
    members: Sequence[nn.Module], graph: FusionGraph, plan: Plan, *, check: bool | None = None, defer: bool = False
) -> nn.Module:
    """Build the fused module of a plan.

    Args:
        members: K networks of one architecture (not modified).
        graph: their neuron groups.
        plan: maps per group; ``plan.lambdas`` weights tensors with no group on their output axis.
        check: re-trace the fused model and check that its groups have the widths the plan says (catches
            attention code that hard-codes a head count). Default: when the graph was traced and has unit
            groups, segments, normalizers that were replaced, tied parameters or modules resized through adapters
            (plain Linear / Conv / BatchNorm / LayerNorm re-creation needs no check).
        defer: leave the weights of plain ``nn.Linear`` / ``nn.Conv2d`` layers that the scatter path builds
            unmaterialised (:func:`pending_weights`: a meta-device parameter of the fused shape, and the recipe):
            :func:`pyfusion.fuse.fast.finish` packs them straight into execution modules or writes them dense
            (:func:`materialize`). For :func:`pyfusion.fuse`, which calls ``finish`` next; the re-trace check
            materialises them first.

    Returns:
        A new module (a deep copy of member 0 with re-created layers where sizes change), with attributes
        ``fusion_layouts`` and ``fusion_module_layouts``.

    Raises:
        ValueError: a plan for another number of members or other group sizes, a module that cannot take the new
            sizes, a normalized group that cannot be widened, or a fused model whose re-traced widths differ.
    """
    if len(members) != plan.num_members:
        raise ValueError(f"plan is for {plan.num_members} members; got {len(members)} models")
    plan.validate(graph)
    for name, gp in plan.groups.items():
        g = graph.groups.get(name)
        if g is not None and g.width_pins and gp.slots > g.size:
            raise ValueError(
                f"plan widens group {name!r} to {gp.slots} slots (members: {g.size}), but {g.width_pins[0]}: the "
                "fused model cannot keep each member's branch units apart (alpha = 1 would not be the ensemble); keep "
                "the group at its width"
            )
    maps = _group_maps(graph, plan)
    wrap = _normalizer_modules(graph, plan, maps)
    states = [
        dict(list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)))
        for m in members
    ]
    from pyfusion.fuse.permuted import permutation_maps, permutation_segments, permutation_tensors

    perm_maps = permutation_maps(graph, plan)  # pure permutations: gathers, bit for bit the general path's sums
    tensors = None if perm_maps is None else permutation_tensors(states, graph, plan, perm_maps)
    if tensors is None:
        perm_maps = None
        deferred: frozenset[str] = frozenset()
        if defer:
            tied = {k for keys in graph.tied_params for k in keys}
            deferred = (
                frozenset(f"{path}.weight" for path, mod in members[0].named_modules() if path and _deferrable(mod))
                - tied
            )
        tensors = fused_tensors(states, graph, plan, deferred)
    pending = {k: v for k, v in tensors.items() if isinstance(v, PendingWeight)}
    for k, v in pending.items():
        tensors[k] = torch.empty(v.shape, dtype=torch.float64, device="meta")
    fused = _shell_copy(members[0], tensors)
    own = dict(list(fused.named_parameters(remove_duplicate=False)) + list(fused.named_buffers(remove_duplicate=False)))
    # the normalizers replaced by member-view modules keep their members' own tensors: not fused
    inside_wrapped = {key for key in tensors for path in wrap if path and key.startswith(path + ".")}
    # re-create or resize the modules whose tensors change shape
    changed: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        if key in inside_wrapped:
            continue
        if tuple(own[key].shape) != tuple(t.shape):
            mpath, _, pname = key.rpartition(".")
            changed.setdefault(mpath, {})[pname] = tuple(t.shape)
    resized: list[str] = []
    for mpath, shapes in changed.items():
        mod = fused.get_submodule(mpath)
        for pname, _t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{mpath}.{pname}" if mpath else pname
            if key in tensors:
                shapes.setdefault(pname, tuple(tensors[key].shape))
        dev = next(iter(list(mod.parameters()) + list(mod.buffers()))).device
        # built on the meta device, then given uninitialised storage: every tensor is overwritten below, so the
        # default random initialisation (0.5 s for a VGG11 pair) would be wasted
        with torch.device("meta"):
            new = _recreate(mod, shapes, mpath)
        if new is None:
            _resize_in_place(mod, shapes)
            resized.append(mpath)
            continue
        new = new.to_empty(device=dev)
        new.train(mod.training)
        _set_module(fused, mpath, new)
    _assign(fused, tensors, graph, inside_wrapped)
    pending = {k: v for k, v in pending.items() if k not in inside_wrapped}
    if pending:
        _PENDING[fused] = pending
    for mpath in resized:
        _builtin_attrs(fused.get_submodule(mpath))
    for mpath, (gname, gdim, copies) in wrap.items():
        gp = maps[gname]
        norms = [copy.deepcopy(m.get_submodule(mpath)) for m in members]
        a_maps, b_maps = list(gp.A), list(gp.B)
        if copies > 1:  # the axis is [group | group | ...]: each copy read and written with the group's maps
            a_maps = [torch.block_diag(*[a] * copies) for a in a_maps]
            b_maps = [torch.block_diag(*[b] * copies) for b in b_maps]
        new = MemberViewNorm(norms, a_maps, b_maps, dim=gdim)
        new.train(fused.get_submodule(mpath).training)
        _set_module(fused, mpath, new)
    originals = dict(members[0].named_modules())
    for mpath, mod in fused.named_modules():
        fn = _ADAPTERS.get(type(mod).__name__)
        if fn is not None and mpath in originals:
            fn(mod, mpath, originals[mpath])
    layouts = {name: tuple(gp.layout) for name, gp in plan.groups.items()}
    for name, g in graph.groups.items():
        layouts.setdefault(name, (g.size,) + (0,) * plan.num_members)
    module_layouts: dict[str, dict[str, object]] = {}
    complex_modules = {r.module for g in graph.groups.values() for r in g.refs if not r.is_simple}
    complex_modules |= {r.module for g in graph.groups.values() if g.unit_size > 1 for r in g.refs}
    for name, g in graph.groups.items():
        for r in g.refs:
            entry = module_layouts.setdefault(
                r.module, {"out": None, "in": None, "in_expand": 1, "out_group": None, "in_group": None}
            )
            if r.module in complex_modules:
                continue
            if r.role == "consumer":
                entry.update(**{"in": layouts[name], "in_expand": r.expand, "in_group": name})
            else:
                entry.update(out=layouts[name], out_group=name)
    segments = None if perm_maps is None else permutation_segments(members[0], graph, plan, perm_maps)
    for mpath, segs in (member_segments(members[0], graph, plan, maps) if segments is None else segments).items():
        module_layouts.setdefault(
            mpath, {"out": None, "in": None, "in_expand": 1, "out_group": None, "in_group": None}
        )["segments"] = segs
    fused.fusion_layouts = layouts
    fused.fusion_module_layouts = module_layouts
    if check is None:
        check = graph.source == "export" and bool(
            wrap or graph.tied_params or resized or not graph.is_simple
            or any(g.unit_size > 1 for g in graph.groups.values())
        )  # fmt: skip
    if check:
        materialize(fused)
        deferred = _DEFERRED_CHECKS.get()
        if deferred is not None:  # the caller runs the check later, on a twin of the model as it is now
            deferred.append(DeferredWidthCheck(fused, graph, plan))
        else:
            check_fused_widths(fused, graph, plan)
    # pyfusion.save describes a fused user class as member architecture + changes: keep the member's (meta, no memory)
    from pyfusion.serialization import record_member_architecture

    record_member_architecture(fused, members[0])
    return fused


def _axis_member_masks(
    n_member: int, refs: list[tuple[str, AxisRef]], graph: FusionGraph, maps: dict[str, GroupPlan], k_all: int
) -> list[int]:
    """Member mask of every index of one axis of a fused tensor: bit k is set when member k's neurons reach the
    index through the maps (``A_k`` on the output axis, ``B_k^T`` on an input axis; gaps are read by every member).

    Computed by the builder's own code path (:func:`member_tensor` on a 1-D probe of ones with the maps' supports,
    ``|A_k| > 0`` and ``|B_k| > 0``), so the positions agree with the fused tensor's exactly. An axis that is one
    whole simple segment of a neuron-level group (MLP / VGG layers) takes a shortcut with the same result (tested
    against the probe on every test family): the probe there is ``support(A_k) 1`` (``support(B_k)^T 1`` on an
    input axis) repeated ``expand`` times, non-zero exactly where a row of ``A_k`` (column of ``B_k``) has a
    non-zero (0.27 s of 0.72 s of an MLP-1024 pair's partial fusion went to the probe)."""
    fast = _whole_axis_masks(n_member, refs, graph, maps, k_all) if _FAST_MASKS else None
    if fast is not None:
        return fast
    from dataclasses import replace

    probe_refs = [(g, replace(r, axis=0)) for g, r in refs]
    ax = axis_plan(probe_refs, graph.groups)
    masks: list[int] | None = None
    for k in range(k_all):
        support = {g: ((maps[g].A[k] != 0).double(), (maps[g].B[k] != 0).double()) for g, _ in refs}
        reach = member_tensor(torch.ones(n_member, dtype=torch.float64), ax, support, 1.0)
        if masks is None:
            masks = [0] * int(reach.numel())
        bit = 1 << k
        for i in torch.nonzero(reach != 0).flatten().tolist():
            masks[i] |= bit
    return masks or []


# the shortcut of _axis_member_masks (tests switch it off to compare with the probe)
_FAST_MASKS = True


def _whole_axis_masks(
    n_member: int, refs: list[tuple[str, AxisRef]], graph: FusionGraph, maps: dict[str, GroupPlan], k_all: int
) -> list[int] | None:
    """:func:`_axis_member_masks` for an axis that is exactly one simple segment of a neuron-level group, else None."""
    if len(refs) != 1:
        return None
    gname, r = refs[0]
    g = graph.groups[gname]
    if not r.is_simple or g.unit_size != 1 or n_member != g.size * r.expand:
        return None
    masks = None
    for k in range(k_all):
        consumer = r.role == "consumer"
        side = maps[gname].B if consumer else maps[gname].A
        lazy = lazy_map(side, k)
        m = None if lazy is not None else side[k]
        rec = lazy.selection(k) if lazy is not None else _recorded_selection(m)
        if rec is not None:  # the rows of the recorded selection are exactly the slots with a non-zero
            shape = map_shape(side, k)
            reach = torch.zeros(shape[1] if consumer else shape[0], dtype=torch.bool)
            reach[rec[0]] = True
        elif consumer:
            reach = (m != 0).any(dim=0)
        else:
            reach = (m != 0).any(dim=1)
        bits = reach.to(torch.int64) << k
        masks = bits if masks is None else masks | bits
    if masks is None:
        return []
    if r.expand > 1:
        masks = masks.repeat_interleave(r.expand)
    return masks.tolist()


def _runs(masks: list[int]) -> list[list[int]]:
    """Run-length segments ``[[size, mask], ...]`` of per-index masks; an index no member reaches (its weights are
    exactly zero on that side) joins the neighbouring segment, as any mask is exact for it."""
    out: list[list[int]] = []
    pending = 0
    for m in masks:
        if m == 0:
            if out:
                out[-1][0] += 1
            else:
                pending += 1
            continue
        if out and out[-1][1] == m:
            out[-1][0] += 1
        else:
            out.append([1 + pending, m])
            pending = 0
    if pending:  # no index is reached at all: one segment read by every member
        out.append([pending, -1])
    return out


def member_segments(
    member: nn.Module, graph: FusionGraph, plan: Plan, maps: dict[str, GroupPlan]
) -> dict[str, dict[str, dict[str, object]]]:
    """Per module and parameter, the member-mask segments (:mod:`pyfusion.ops.layout`) of every referenced axis of
    the fused tensor: ``{module: {param: {"axes": {axis: [[size, mask], ...]}, "out_axis": a | None}}}``.

    The fused weight ``W' = sum_k A_k W_k B_k`` is exactly zero in every block whose output and input masks do not
    intersect, so these segments are what an execution module (:class:`pyfusion.nn.PartialLinear`, ...) stores:
    any order, heads as units, packed q | k | v rows, concatenated inputs and gaps included (an axis without a
    reference, e.g. a first layer's input, is one segment of every member). Shared slots to which only some members
    contribute get their subset's mask.
    """
    k_all = plan.num_members
    every = (1 << k_all) - 1

    def axis_segments(size: int, arefs: list[tuple[str, AxisRef]]) -> list[list[int]]:
        runs = _runs(_axis_member_masks(size, arefs, graph, maps, k_all))
        return [[n, every if m < 0 else m] for n, m in runs]

    return segments_by_parameter(member, graph, axis_segments)


def segments_by_parameter(
    member: nn.Module, graph: FusionGraph, axis_segments: Callable[[int, list[tuple[str, AxisRef]]], list[list[int]]]
) -> dict[str, dict[str, dict[str, object]]]:
    """The :func:`member_segments` layout of every referenced parameter of ``member`` (2-D and up), with
    ``axis_segments(size, refs)`` giving one axis' ``[[size, mask], ...]`` from the (group, ref) pairs on it; the
    output axis is the lowest axis a non-consumer ref names."""
    tensors = dict(member.named_parameters(remove_duplicate=False))
    tensors.update(dict(member.named_buffers(remove_duplicate=False)))
    out: dict[str, dict[str, dict[str, object]]] = {}
    for key, refs in graph.refs_by_key().items():
        t = tensors.get(key)
        if t is None or t.dim() < 2:
            continue
        mpath, _, pname = key.rpartition(".")
        per_axis: dict[int, list[tuple[str, AxisRef]]] = {}
        for g, r in refs:
            per_axis.setdefault(r.axis, []).append((g, r))
        out_axes = [r.axis for _g, r in refs if r.role != "consumer"]
        axes = {str(axis): axis_segments(int(t.shape[axis]), arefs) for axis, arefs in sorted(per_axis.items())}
        out.setdefault(mpath, {})[pname] = {"axes": axes, "out_axis": min(out_axes) if out_axes else None}
    return out


def _assign(fused: nn.Module, tensors: dict[str, Tensor], graph: FusionGraph, skip: set[str]) -> None:
    """Write the fused tensors into ``fused``; tied tensors stay one tensor when their fused values agree."""
    tied_sets = [tuple(k for k in keys if k in tensors and k not in skip) for keys in graph.tied_params]
    in_tie = {k for keys in tied_sets for k in keys}
    own = dict(list(fused.named_parameters(remove_duplicate=False)) + list(fused.named_buffers(remove_duplicate=False)))
    untied = False
    with torch.no_grad():
        for key, t in tensors.items():
            if key in skip or key in in_tie:
                continue
            _write(fused, own, key, t)
        for keys in tied_sets:
            if not keys:
                continue
            first = tensors[keys[0]]
            same = all(
                tensors[k].shape == first.shape and bool(torch.allclose(tensors[k], first, rtol=1e-12, atol=1e-14))
                for k in keys[1:]
            )
            if same:
                ref = own[keys[0]]
                param = nn.Parameter(first.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
                for k in keys:
                    mpath, _, pname = k.rpartition(".")
                    setattr(fused.get_submodule(mpath) if mpath else fused, pname, param)
            else:
                untied = True
                for k in keys:
                    ref = own[k]
                    mpath, _, pname = k.rpartition(".")
                    mod = fused.get_submodule(mpath) if mpath else fused
                    setattr(mod, pname, nn.Parameter(tensors[k].to(ref.dtype).contiguous(), ref.requires_grad))
    cfg = getattr(fused, "config", None)
    if untied and cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        cfg.tie_word_embeddings = False
    fused.fusion_untied_params = [keys for keys in tied_sets if keys] if untied else []


def _write(fused: nn.Module, own: dict[str, Tensor], key: str, t: Tensor) -> None:
    dst = own[key]
    if t.is_meta:  # a pending weight (build(defer=True)): a meta parameter of the fused shape until written
        mpath, _, pname = key.rpartition(".")
        mod = fused.get_submodule(mpath) if mpath else fused
        dst = getattr(mod, pname)
        setattr(mod, pname, nn.Parameter(torch.empty(t.shape, dtype=dst.dtype, device="meta"), dst.requires_grad))
        return
    if tuple(dst.shape) != tuple(t.shape):
        # a tensor of a re-created module: look it up again
        mpath, _, pname = key.rpartition(".")
        mod = fused.get_submodule(mpath) if mpath else fused
        dst = getattr(mod, pname)
        if tuple(dst.shape) != tuple(t.shape):  # pragma: no cover - guarded by _recreate / _resize_in_place
            raise ValueError(f"fused tensor {key} has shape {tuple(t.shape)}, module expects {tuple(dst.shape)}")
    if t.dtype == dst.dtype and t.device == dst.device and t.is_contiguous():
        # fused_tensors allocates every tensor it returns: adopting its storage saves a copy of the whole
        # fused network (~60 ms of 0.45 s for a VGG11-sized pair at alpha 0.75)
        dst.data = t
    else:
        dst.copy_(t.to(dst.dtype))


def fused_groups(fused: nn.Module, graph: FusionGraph) -> tuple[FusionGraph, dict[str, Any]]:
    """Re-trace ``fused`` on the graph's example inputs and pair each member group with the fused model's group
    at the same place (same tensor, axis and role, same segment index along that axis: offsets change with the
    widths).

    Returns:
        ``(fused_graph, {member group name: fused NeuronGroup or None})``.

    Raises:
        ValueError: the fused model does not run / trace (a module's forward reads a size attribute no adapter
            updated), or the graph has no example inputs.
    """
    from pyfusion.graph import trace_groups

    if graph.example_inputs is None:
        raise ValueError("the graph has no example inputs to re-trace the fused model with")
    try:
        new = trace_groups(fused, graph.example_inputs, allow_walk=False, verify=False)
    except Exception as exc:
        raise ValueError(
            f"the fused {type(fused).__name__} does not run / trace with the fused widths ({type(exc).__name__}: "
            f"{exc}); a forward probably hard-codes a width the plan changed (a channel count in a view / reshape, "
            "a slice bound, a size attribute no adapter updated: see pyfusion.fuse.builder.register_adapter)"
        ) from exc

    def segments(gr: FusionGraph) -> dict[tuple, Any]:
        # (key, axis, role, index of the segment on that axis) -> group: offsets change with the widths
        per_axis: dict[tuple, list[tuple[int, Any]]] = {}
        for g in gr.groups.values():
            for r in g.refs:
                per_axis.setdefault((r.key, r.axis, r.role), []).append((r.offset, g))
        out = {}
        for k, segs in per_axis.items():
            for i, (_off, g) in enumerate(sorted(segs, key=lambda s: s[0])):
                out[k + (i,)] = g
        return out

    old_segs, new_segs = segments(graph), segments(new)
    pairs: dict[str, Any] = {}
    for name, g in graph.groups.items():
        r = next((r for r in g.refs if r.role == "producer"), g.refs[0])
        idx = next(k for k, v in old_segs.items() if v is g and k[:3] == (r.key, r.axis, r.role))
        pairs[name] = new_segs.get(idx)
    return new, pairs


def check_fused_widths(fused: nn.Module, graph: FusionGraph, plan: Plan) -> None:
    """Re-trace ``fused`` on the graph's example inputs and check every group has the width the plan gives it.

    Raises:
        ValueError: naming the group, the expected and the traced width (e.g. attention code that hard-codes a
            head count, or a size attribute no adapter updated).
    """
    if graph.example_inputs is None:
        return
    _new, pairs = fused_groups(fused, graph)
    for name, g in graph.groups.items():
        slots = plan.groups[name].slots if name in plan.groups else g.size
        r = next((r for r in g.refs if r.role == "producer"), g.refs[0])
        ng = pairs[name]
        # one unit left (attention pruned to one head): a re-trace that sees no structure in it (units of 1) may
        # just not see the one head (a layout the size-1 head units do not cover); another unit size is a forward
        # that splits the head by a hard-coded count (view(B, 2, -1) of one head of 8: softmax over two halves)
        units_differ = ng is not None and ng.unit_size != g.unit_size and (slots != g.unit_size or ng.unit_size != 1)
        if ng is None or ng.size != slots or units_differ:
            got = "no group" if ng is None else f"{ng.size} neurons in units of {ng.unit_size}"
            raise ValueError(
                f"group {name!r}: the plan gives it {slots} slots in units of {g.unit_size}, but the fused model "
                f"traces to {got} at {r.key} axis {r.axis}; a module's forward probably hard-codes a size (see "
                "pyfusion.fuse.builder.register_adapter)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Deferred width checks (the budget search: only the candidates whose check decides something are checked)
# ---------------------------------------------------------------------------------------------------------------

_DEFERRED_CHECKS: contextvars.ContextVar[list[DeferredWidthCheck] | None] = contextvars.ContextVar(
    "pyfusion_deferred_width_checks", default=None
)


class DeferredWidthCheck:
    """The re-trace check of :func:`build` (:func:`check_fused_widths`), left for later.

    Holds a *shape twin* of the fused model as it was at the check's place in :func:`build`: a deep copy whose
    parameters and buffers are meta tensors (no storage) of the same shapes, strides, dtypes and ``requires_grad``,
    tied exactly as in the model (one meta tensor per distinct tensor); modules, their attributes, hooks and
    non-parameter tensor attributes are copied as they are. :meth:`run` gives every meta tensor uninitialised
    storage on its original device and runs :func:`check_fused_widths` on that twin. The check reads only the
    structure: the export is non-strict on fake tensors and its cache (:func:`pyfusion.graph.export.fingerprint`)
    already returns one program for every model of the same module classes / attributes, tensor names / shapes /
    dtypes / devices / ties and input signature, which the twin shares with the model (tested equal). So the
    outcome is the one the check would have had in :func:`build`, whatever happens to the model meanwhile (the
    fast-module swap makes it untraceable), and the pending check costs one module tree, no tensor memory.
    """

    def __init__(self, fused: nn.Module, graph: FusionGraph, plan: Plan) -> None:
        memo: dict[int, Any] = {}
        self._devices: dict[int, torch.device] = {}
        tensors = list(fused.named_parameters(remove_duplicate=False)) + list(
            fused.named_buffers(remove_duplicate=False)
        )
        for _n, t in tensors:
            if id(t) in memo:
                continue
            meta = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
            twin = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
            memo[id(t)] = twin
            self._devices[id(twin)] = t.device
        self.shell: nn.Module | None = deepcopy_module(fused, memo)
        self.graph, self.plan = graph, plan

    def twin(self) -> nn.Module:
        """The shell with uninitialised storage on each tensor's original device (ties kept); the shell is used up."""
        shell = self.shell
        if shell is None:
            raise RuntimeError("this deferred width check was already run")
        self.shell = None
        real: dict[int, Tensor] = {}

        def swap(t: Tensor) -> Tensor:
            hit = real.get(id(t))
            if hit is None:
                dev = self._devices.get(id(t), t.device)
                new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=dev)
                hit = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
                real[id(t)] = hit
            return hit

        for mod in shell.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = swap(p)  # type: ignore[assignment]
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = swap(b)
        return shell

    def run(self) -> None:
        """Run the check on the twin (once). Raises what :func:`check_fused_widths` raises."""
        check_fused_widths(self.twin(), self.graph, self.plan)


@contextlib.contextmanager
def deferred_width_checks() -> Iterator[list[DeferredWidthCheck]]:
    """Within the block, :func:`build` appends its re-trace check to the yielded list instead of running it (every
    build in the block, including those a method or the ensemble cap runs); the caller must run them
    (:meth:`DeferredWidthCheck.run`) before it uses or returns the model."""
    records: list[DeferredWidthCheck] = []
    token = _DEFERRED_CHECKS.set(records)
    try:
        yield records
    finally:
        _DEFERRED_CHECKS.reset(token)
