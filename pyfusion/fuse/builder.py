"""The one builder (DESIGN §3): ``W' = sum_k A_k^{out} W_k B_k^{in}``, ``b' = sum_k A_k b_k``, per-neuron params by A_k.

Every tensor of the members (parameters and floating-point buffers) is transformed along each axis a neuron
group indexes: producer and per-neuron axes (axis 0) by ``A_k`` (which carries lambda_k), consumer axes by
``B_k`` (expanded as ``B_k kron I_e`` after a flatten of ``e`` spatial positions). A tensor with no producer or
per-neuron axis (the last layer, whose outputs are the logits) is weighted by lambda_k instead. The fused module
is a deep copy of member 0 in which every Linear / Conv2d / BatchNorm / LayerNorm whose size changes is
re-created; the members are never modified. Each group's layout is recorded on the result in
``fusion_layouts`` (group -> segment sizes) and ``fusion_module_layouts`` (module path -> {"out", "in",
"in_expand"}) so that execution modules (pyfusion.nn.PartialLinear.from_dense, ...) can be swapped in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.graph.groups import AxisRef, FusionGraph

__all__ = ["build", "fused_tensors"]


def _selection(m: Tensor) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
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


def _apply(
    t: Tensor,
    m: Tensor,
    axis: int,
    expand: int = 1,
    sel: tuple[Tensor, Tensor, Tensor | None, bool] | None | str = "compute",
) -> Tensor:
    """Contract ``m kron I_expand`` (new, old) with axis ``axis`` of ``t``.

    Maps with at most one non-zero per column (permutations, partial-fusion slot maps, cluster indicators: each
    old neuron goes to one slot) take a gather / scatter path, O(size of t) instead of a dense product: the dense
    products would be about 90 GFLOP (float64) for a VGG11-sized pair at alpha = 0.5, the copies move a few
    hundred MB. The result is the same sum (each product with a zero entry is skipped). ``expand`` > 1 is a
    flatten into a Linear: each neuron covers ``expand`` consecutive columns (channel-major). Dense maps (OT)
    use tensordot. ``sel`` is ``_selection(m)`` when the caller has it already.
    """
    if isinstance(sel, str):
        sel = _selection(m)
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


def _scatter_fused(
    states: Sequence[dict[str, Tensor]],
    key: str,
    refs: list[tuple[str, AxisRef]],
    maps: dict[str, GroupPlan],
    selection,  # noqa: ANN001 - (group, member, consumer) -> _selection result
    lambdas: Sequence[float],
    has_out: bool,
) -> Tensor | None:
    """The fused tensor ``key`` written in place, or None when the fast path does not apply.

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
    plans: list[list[tuple[int, Tensor, Tensor | None, int]]] = []
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
            m_shape = maps[gname].B[k].shape[::-1] if consumer else maps[gname].A[k].shape
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
    out = None
    for k, st in enumerate(states):
        t = st[key].detach().to(torch.float64)
        if out is None:
            out = torch.zeros(new_shape, dtype=torch.float64, device=t.device)
        src = t
        for axis, _dest, v, _e in plans[k]:
            if v is not None:
                shape = [1] * t.dim()
                shape[axis] = -1
                src = src * v.to(device=t.device, dtype=t.dtype).reshape(shape)
        if not has_out:
            src = src * lambdas[k]
        idx: list[Any] = [slice(None)] * t.dim()
        order = sorted(plans[k], key=lambda p: p[0])
        for i, (axis, dest, _v, _e) in enumerate(order):
            shape = [1] * len(order)
            shape[i] = -1
            idx[axis] = dest.to(t.device).reshape(shape)
        if k == 0:
            out[tuple(idx)] = src
        else:
            out[tuple(idx)] += src
    return out


def fused_tensors(states: Sequence[dict[str, Tensor]], graph: FusionGraph, plan: Plan) -> dict[str, Tensor]:
    """Compute every fused tensor in float64.

    Args:
        states: K state dicts (parameters and buffers) of the members.
        graph: the members' neuron groups.
        plan: maps per group (groups missing from the plan are averaged: A_k = lambda_k I, B_k = I).

    Returns:
        key -> fused float64 tensor (non-floating buffers such as ``num_batches_tracked`` are taken from member 0).
    """
    by_key = graph.refs_by_key()
    lambdas = plan.lambdas
    out: dict[str, Tensor] = {}
    maps: dict[str, GroupPlan] = {}
    for name, g in graph.groups.items():
        gp = plan.groups.get(name)
        if gp is None:
            eye = torch.eye(g.size, dtype=torch.float64)
            gp = GroupPlan([lam * eye for lam in lambdas], [eye] * len(lambdas), (g.size,) + (0,) * len(lambdas))
        maps[name] = gp
    sel_cache: dict[tuple[str, int, bool], tuple[Tensor, Tensor, Tensor | None, bool] | None] = {}

    def selection(gname: str, k: int, consumer: bool) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
        # one analysis per (group, member, side), not per tensor: a group's map is shared by all its tensors
        ck = (gname, k, consumer)
        if ck not in sel_cache:
            gp = maps[gname]
            sel_cache[ck] = _selection(gp.B[k].T if consumer else gp.A[k])
        return sel_cache[ck]

    for key, t0 in states[0].items():
        if not torch.is_floating_point(t0):
            out[key] = t0.clone()
            continue
        refs: list[tuple[str, AxisRef]] = by_key.get(key, [])
        has_out = any(r.role in ("producer", "neuron") for _, r in refs)
        fast = _scatter_fused(states, key, refs, maps, selection, lambdas, has_out)
        if fast is not None:
            out[key] = fast
            continue
        acc = None
        for k, st in enumerate(states):
            t = st[key].detach().to(torch.float64)
            for gname, r in refs:
                gp = maps[gname]
                if r.role == "consumer":
                    t = _apply(t, gp.B[k].to(t.device).T, r.axis, r.expand, selection(gname, k, True))
                else:
                    t = _apply(t, gp.A[k].to(t.device), r.axis, 1, selection(gname, k, False))
            if not has_out:
                t = t * lambdas[k]
            # t is always a new tensor here (every path above allocates), so the sum can accumulate in place
            acc = t if acc is None else acc.add_(t)
        out[key] = acc
    return out


def _recreate(mod: nn.Module, shapes: dict[str, tuple[int, ...]], path: str) -> nn.Module:
    p = next(iter(mod.parameters()), None)
    if p is None:
        p = next(iter(mod.buffers()))
    kw = {"dtype": p.dtype}
    if isinstance(mod, nn.Linear):
        out_f, in_f = shapes["weight"]
        return nn.Linear(in_f, out_f, bias=mod.bias is not None, **kw)
    if isinstance(mod, nn.Conv2d):
        out_c, in_c = shapes["weight"][:2]
        return nn.Conv2d(
            in_c, out_c, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups,
            mod.bias is not None, mod.padding_mode, **kw,
        )  # fmt: skip
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = next(iter(shapes.values()))[0]
        return type(mod)(n, mod.eps, mod.momentum, mod.affine, mod.track_running_stats, **kw)
    if isinstance(mod, nn.LayerNorm):
        n = next(iter(shapes.values()))[0]
        return nn.LayerNorm((n,), mod.eps, mod.elementwise_affine, bias=mod.bias is not None, **kw)
    raise ValueError(f"cannot re-create module {path!r} of type {type(mod).__name__} with new sizes {shapes}")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def build(members: Sequence[nn.Module], graph: FusionGraph, plan: Plan) -> nn.Module:
    """Build the fused module of a plan.

    Args:
        members: K networks of one architecture (not modified).
        graph: their neuron groups.
        plan: maps per group; ``plan.lambdas`` weights tensors with no group on their output axis.

    Returns:
        A new module (a deep copy of member 0 with re-created layers where sizes change), with attributes
        ``fusion_layouts`` and ``fusion_module_layouts``.
    """
    if len(members) != plan.num_members:
        raise ValueError(f"plan is for {plan.num_members} members; got {len(members)} models")
    plan.validate(graph)
    states = [dict(list(m.named_parameters()) + list(m.named_buffers())) for m in members]
    tensors = fused_tensors(states, graph, plan)
    fused = copy.deepcopy(members[0])
    own = dict(list(fused.named_parameters()) + list(fused.named_buffers()))
    # re-create modules whose tensors change shape
    changed: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        if tuple(own[key].shape) != tuple(t.shape):
            mpath, _, pname = key.rpartition(".")
            changed.setdefault(mpath, {})[pname] = tuple(t.shape)
    for mpath, shapes in changed.items():
        mod = fused.get_submodule(mpath)
        for pname, _t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            shapes.setdefault(pname, tuple(tensors[f"{mpath}.{pname}" if mpath else pname].shape))
        dev = next(iter(list(mod.parameters()) + list(mod.buffers()))).device
        # built on the meta device, then given uninitialised storage: every tensor is overwritten below, so the
        # default random initialisation (0.5 s for a VGG11 pair) would be wasted
        with torch.device("meta"):
            new = _recreate(mod, shapes, mpath)
        new = new.to_empty(device=dev)
        new.train(mod.training)
        _set_module(fused, mpath, new)
    own = dict(list(fused.named_parameters()) + list(fused.named_buffers()))
    with torch.no_grad():
        for key, t in tensors.items():
            dst = own[key]
            if tuple(dst.shape) != tuple(t.shape):  # pragma: no cover - guarded by _recreate
                raise ValueError(f"fused tensor {key} has shape {tuple(t.shape)}, module expects {tuple(dst.shape)}")
            if t.dtype == dst.dtype and t.device == dst.device and t.is_contiguous():
                # fused_tensors allocates every tensor it returns: adopting its storage saves a copy of the whole
                # fused network (~60 ms of 0.45 s for a VGG11-sized pair at alpha 0.75)
                dst.data = t
            else:
                dst.copy_(t.to(dst.dtype))
    layouts = {name: tuple(gp.layout) for name, gp in plan.groups.items()}
    for name, g in graph.groups.items():
        layouts.setdefault(name, (g.size,) + (0,) * plan.num_members)
    module_layouts: dict[str, dict[str, object]] = {}
    for name, g in graph.groups.items():
        for r in g.refs:
            entry = module_layouts.setdefault(
                r.module, {"out": None, "in": None, "in_expand": 1, "out_group": None, "in_group": None}
            )
            if r.role == "consumer":
                entry.update(**{"in": layouts[name], "in_expand": r.expand, "in_group": name})
            else:
                entry.update(out=layouts[name], out_group=name)
    fused.fusion_layouts = layouts
    fused.fusion_module_layouts = module_layouts
    return fused
