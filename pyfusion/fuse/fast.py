"""Execution of a fused network at its effective cost (DESIGN §7): slot order, module swap, and the ensemble cap.

The builder returns plain layers (``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D``, ...) whose weights are
exactly zero outside the blocks their member-mask segments allow, and records those segments per module and
parameter (``fusion_module_layouts[path]["segments"]``, :func:`pyfusion.fuse.builder.member_segments`).

* :func:`order_shared_slots` (before the build): shared slots built from different member subsets (K >= 3) are
  sorted by subset inside the shared segment, so that each subset is one segment instead of many interleaved ones
  (a permutation of the slots: the function is unchanged; units move whole, tied groups move together).
* :func:`swap_partial_modules` (after the build): every such layer whose segments skip a block is replaced by
  :class:`pyfusion.nn.PartialLinear` / :class:`pyfusion.nn.PartialConv2d` (``from_dense``, which checks that the
  skipped blocks are exactly zero): widened Linears anywhere in a model (transformer FFNs, q / k / v / o and packed
  q|k|v projections, classifier heads, user classes), convolutions, and Hugging Face ``Conv1D`` (transposed
  weight); an ``nn.MultiheadAttention`` (packed ``in_proj_weight``, read directly) as a whole by
  :class:`pyfusion.nn.PartialMultiheadAttention`. A ReLU / GELU / SiLU module right after the layer in an
  ``nn.Sequential`` is fused into the layer's epilogue. A layer stays dense where the dense zero-block layer is
  predicted to be faster (:func:`predict_time`, a cost model calibrated by measurement; ``always=True`` /
  ``fuse(fast_modules="always")`` skips it) or where the swap cannot be exact (tied weights, modules whose parent
  reads the weight directly). An ``nn.TransformerEncoderLayer`` holding a swapped module runs its Python path.
* :func:`finish` (the api's hook): the effective-FLOP cap of issue 14 (a fused point costing more than the
  ensemble is replaced by the exact ensemble, said in ``fusion_info``), counted on a meta-device copy of the model
  (shapes only; the real forward when that cannot run), then the swap.
* Pending weights (``build(defer=True)``, what :func:`pyfusion.fuse` asks for when nothing reads the weights
  before ``finish``): a widened ``nn.Linear`` / ``nn.Conv2d`` holds a meta parameter and its scatter plan; a layer
  that is swapped gets its packed weight gathered straight from the members
  (:meth:`pyfusion.fuse.builder.PendingWeight.packed`, equal to packing the dense weight, so no dense zero-block
  tensor is formed or checked), one that stays dense gets the dense tensor (:func:`pyfusion.fuse.builder.materialize`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion._modcopy import deepcopy_module
from pyfusion.fuse.plan import GroupPlan, Plan, pristine_map
from pyfusion.fuse.validate import tensor_key, tensor_state
from pyfusion.graph.groups import FusionGraph
from pyfusion.nn import PartialConv1d, PartialConv2d, PartialLinear, PartialMultiheadAttention, replace_
from pyfusion.ops.layout import ACTIVATIONS, Segments, as_segments, segment_plan, slice_segments

__all__ = [
    "DECISION_BATCH",
    "finish",
    "mha_segments",
    "module_segments",
    "order_shared_slots",
    "predict_time",
    "swap_partial_modules",
]


# ---------------------------------------------------------------------------------------------------------------
# Slot order
# ---------------------------------------------------------------------------------------------------------------


def _slot_masks(gp: GroupPlan) -> list[int]:
    """Member mask of every slot of a group: bit k when member k writes it (``A_k``) or reads it (``B_k``)."""
    slots = gp.slots
    masks = [0] * slots
    for k in range(len(gp.A)):
        if pristine_map(gp.B, k):
            # a never-read permutation map B_k = P_k^T reads every slot: no need to make the dense maps (K >= 3
            # activation matching would otherwise form every lazy map here)
            for s in range(slots):
                masks[s] |= 1 << k
            continue
        a, b = gp.A[k], gp.B[k]
        used = ((a != 0).any(1) | (b != 0).any(0)).tolist()
        for s in range(slots):
            if used[s]:
                masks[s] |= 1 << k
    return masks


def _slot_order(gp: GroupPlan, unit: int) -> list[int] | None:
    """A slot permutation that sorts the units of every layout segment by (more members first, mask), stable;
    None when the order is already sorted."""
    masks = _slot_masks(gp)
    units = gp.slots // unit
    umask = [0] * units
    for s, m in enumerate(masks):
        umask[s // unit] |= m
    order: list[int] = []
    start = 0
    for size in gp.layout:
        lo, hi = start // unit, (start + size) // unit
        seg = sorted(range(lo, hi), key=lambda u: (-bin(umask[u]).count("1"), umask[u]))
        order += seg
        start += size
    if order == list(range(units)):
        return None
    return [u * unit + d for u in order for d in range(unit)]


def order_shared_slots(plan: Plan, graph: FusionGraph) -> Plan:
    """The plan with every group's slots sorted by member subset inside each layout segment (see the module
    docstring): ``A_k <- P A_k``, ``B_k <- B_k P^T`` for one permutation P per group (per tie set: the groups of a
    tie move together, by the first group's masks, only when all of them have the same unit masks). Returns
    ``plan`` itself when nothing moves (K = 2, full fusion, sorted plans)."""
    if plan.num_members < 3:
        return plan
    groups = dict(plan.groups)
    changed = False
    for names in graph.tie_sets():
        names = [n for n in names if n in groups]
        if not names:
            continue
        unit = graph.groups[names[0]].unit_size
        perm = _slot_order(groups[names[0]], unit)
        if perm is None:
            continue
        base = _slot_masks(groups[names[0]])
        if any(_slot_masks(groups[n]) != base or groups[n].layout != groups[names[0]].layout for n in names[1:]):
            continue  # tied groups with other supports: keep their order (never break a tie)
        idx = torch.tensor(perm, dtype=torch.long)
        for n in names:
            gp = groups[n]
            groups[n] = GroupPlan([a[idx] for a in gp.A], [b[:, idx] for b in gp.B], gp.layout)
        changed = True
    if not changed:
        return plan
    info = dict(plan.info)
    info["slots_sorted_by_member_subset"] = True
    return Plan(plan.lambdas, groups, info)


# ---------------------------------------------------------------------------------------------------------------
# Segments of a module
# ---------------------------------------------------------------------------------------------------------------


# nn.Linear subclasses whose forward is exactly the affine map ``x W^T + b`` of their own weight and bias (keyed by
# class name: pyfusion does not import the libraries defining them). Falcon's FalconLinear computes
# ``input @ weight.T + bias``: without it, its zero blocks counted as work and every widened Falcon was capped to
# the ensemble.
AFFINE_LINEAR_SUBCLASSES = frozenset({"FalconLinear"})


def _axes_of(mod: nn.Module) -> tuple[str, int, int] | None:
    """(parameter, output axis, input axis) of the weight of a swappable layer, or None."""
    if isinstance(mod, nn.Linear) and (
        type(mod).forward is nn.Linear.forward or type(mod).__name__ in AFFINE_LINEAR_SUBCLASSES
    ):
        return "weight", 0, 1
    if (isinstance(mod, nn.Conv2d) and type(mod).forward is nn.Conv2d.forward) or (
        isinstance(mod, nn.Conv1d) and type(mod).forward is nn.Conv1d.forward
    ):
        if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return None
        return "weight", 0, 1
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None:
        if mod.weight.dim() == 2 and int(mod.weight.shape[1]) == int(mod.nf):  # HF Conv1D: y = x W + b, W (nx, nf)
            return "weight", 1, 0
    return None


def module_segments(
    model: nn.Module, layouts: Mapping[str, Mapping[str, Any]], path: str, num_members: int
) -> tuple[Segments, Segments] | None:
    """(in_segments, out_segments) of the weight of the Linear / Conv2d / Conv1D at ``path`` from the builder's
    records, or None (not recorded, not a swappable layer, or sizes that do not match the module)."""
    mod = model.get_submodule(path)
    axes = _axes_of(mod)
    entry = layouts.get(path)
    if axes is None or entry is None or "segments" not in entry:
        return None
    pname, out_axis, in_axis = axes
    rec = entry["segments"].get(pname)  # type: ignore[union-attr]
    if rec is None:
        return None
    w = getattr(mod, pname)
    every = (1 << num_members) - 1

    def side(axis: int) -> Segments:
        segs = rec["axes"].get(str(axis))
        if segs is None:  # no group on this axis (raw inputs, logits): every member reads / writes all of it
            return ((int(w.shape[axis]), every),)
        return as_segments([tuple(int(v) for v in s) for s in segs], f"{path}.{pname} axis {axis}")

    ins, outs = side(in_axis), side(out_axis)
    if sum(s for s, _ in ins) != int(w.shape[in_axis]) or sum(s for s, _ in outs) != int(w.shape[out_axis]):
        return None
    return ins, outs


def _mha_swappable(mod: nn.Module) -> bool:
    return (
        type(mod) is nn.MultiheadAttention and mod._qkv_same_embed_dim and mod.bias_k is None and not mod.add_zero_attn
    )


def mha_segments(
    model: nn.Module, layouts: Mapping[str, Mapping[str, Any]], path: str, num_members: int
) -> tuple[Segments, Segments, Segments, Segments] | None:
    """(in_proj input segments, in_proj row segments (q | k | v), out_proj input segments, out_proj output
    segments) of the ``nn.MultiheadAttention`` at ``path`` from the builder's records, or None."""
    mod = model.get_submodule(path)
    entry = layouts.get(path)
    if not _mha_swappable(mod) or entry is None or "segments" not in entry:
        return None
    rec = entry["segments"].get("in_proj_weight")  # type: ignore[union-attr]
    if rec is None:
        return None
    w = mod.in_proj_weight
    every = (1 << num_members) - 1

    def side(axis: int) -> Segments:
        segs = rec["axes"].get(str(axis))
        if segs is None:
            return ((int(w.shape[axis]), every),)
        return as_segments([tuple(int(v) for v in s) for s in segs], f"{path}.in_proj_weight axis {axis}")

    ins, rows = side(1), side(0)
    out_path = f"{path}.out_proj"
    out = module_segments(model, layouts, out_path, num_members)
    if out is None:
        e = int(mod.out_proj.weight.shape[0])
        out = (((int(mod.out_proj.weight.shape[1]), every),), ((e, every),))
    if sum(s for s, _ in ins) != int(w.shape[1]) or sum(s for s, _ in rows) != int(w.shape[0]):
        return None
    return ins, rows, out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# Cost model: partial module or dense zero-block layer
# ---------------------------------------------------------------------------------------------------------------

# Predicted time (seconds) of one forward, t = sum over BLAS / conv calls of (CALL + flops / RATE(n_out, k)) with
# RATE(n, k) = PEAK / ((1 + N0 / n) (1 + K0 / k)), n the call's output columns, k its reduction length (small GEMMs
# and convolutions run far below the machine's peak). Fitted by bench/bench_partial_linear.py --calibrate (median of
# 7 runs per shape, 1 thread, 2-core AMD EPYC VM under load ~6, float32): linear layers 10-3072 wide at 1-1024 rows,
# LeNet / VGG convolutions at batch 32: median absolute log error 0.28 (a factor 1.3), enough to tell tiny layers
# (where one dense GEMM beats several small ones) from the rest. The panel engine (rows <= its crossover) is one
# call at PANEL_RATE.
PEAK_FLOPS = 60e9
N0, K0 = 48.0, 48.0
GEMM_CALL_S = 6e-6  # one addmm / baddbmm from Python, views included
CONV_CALL_S = 25e-6  # one F.conv2d (oneDNN primitive lookup, reorders of a small weight)
PANEL_CALL_S = 3e-6
PANEL_RATE = 45e9
COPY_BYTES_PER_S = 4e9  # torch.cat of conv inputs / outputs (memory bound)
LAYER_CALL_S = 4e-6  # a module call (Python) around either form
# Batch (examples) at which the forms are compared: the decision is made once, at fusion time.
DECISION_BATCH = int(os.environ.get("PYFUSION_FAST_DECISION_BATCH", "32"))


def _rate(n: float, k: float) -> float:
    return PEAK_FLOPS / ((1.0 + N0 / max(n, 1.0)) * (1.0 + K0 / max(k, 1.0)))


def predict_time(kind: str, plan, rows: int, geom=None, positions: int = 1, dense: bool = False) -> float:
    """Predicted seconds of one forward of a layer (see the constants above).

    Args:
        kind: "linear" or "conv".
        plan: the layer's :class:`~pyfusion.ops.layout.SegmentPlan`.
        rows: input rows (linear: batch x tokens; conv: batch).
        geom: the convolution's :class:`~pyfusion.ops.partial_conv2d.ConvGeom`.
        positions: output positions H' W' of a convolution.
        dense: the dense zero-block layer instead of the partial module.
    """
    if kind == "linear":
        if dense:
            flops = 2.0 * rows * plan.o_total * plan.i_total
            return LAYER_CALL_S + GEMM_CALL_S + flops / _rate(plan.o_total, plan.i_total)
        from pyfusion.ops.partial_linear.backends import BatchedStep, blas_steps, cpp_max_rows

        if rows <= cpp_max_rows(plan):
            return LAYER_CALL_S + PANEL_CALL_S + 2.0 * rows * plan.stored / PANEL_RATE
        t = LAYER_CALL_S
        for st in blas_steps(plan)[0]:
            count = st.count if isinstance(st, BatchedStep) else 1
            t += GEMM_CALL_S + 2.0 * rows * st.n_out * st.n_in * count / _rate(st.n_out, st.n_in)
        return t
    taps = geom.taps
    m = rows * positions
    if dense:
        return (
            LAYER_CALL_S
            + CONV_CALL_S
            + 2.0 * m * plan.o_total * plan.i_total * taps / _rate(plan.o_total, plan.i_total * taps)
        )
    from pyfusion.ops.partial_conv2d.backends import conv_runs

    runs, _idle = conv_runs(plan)
    t = LAYER_CALL_S
    for r in runs:
        t += CONV_CALL_S + 2.0 * m * r.n_out * r.k_o * taps / _rate(r.n_out, r.k_o * taps)
        if len(r.ranges) > 1:  # gathered input channels
            t += 4.0 * rows * r.k_o * positions / COPY_BYTES_PER_S
    if len(runs) > 1:  # the outputs concatenated
        t += 4.0 * m * plan.o_total / COPY_BYTES_PER_S
    return t


# ---------------------------------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------------------------------

_FUSABLE_ACTS = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _fusable_activation(mod: nn.Module) -> str | None:
    if type(mod) in _FUSABLE_ACTS:
        return _FUSABLE_ACTS[type(mod)]
    if type(mod) is nn.GELU and mod.approximate == "none":
        return "gelu"
    return None


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module (or name) holds: a swap would untie them."""
    seen: dict[int, int] = {}
    for _n, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def _reads_child_weights(parent: nn.Module) -> bool:
    """Parents whose forward reads a child layer's weight directly (not by calling it)."""
    return isinstance(parent, nn.MultiheadAttention)


def _build_pending(
    mod: nn.Module, ins: Segments, outs: Segments, pending: Any, scratch: Tensor | None = None
) -> nn.Module:
    """The execution module of a layer whose weight the builder left pending: the packed weight gathered from the
    members (:meth:`pyfusion.fuse.builder.PendingWeight.packed`, equal to packing the dense weight), no dense
    weight and no zero-block check (no dense tensor exists: its zero blocks are never formed)."""
    packed = pending.packed(ins, outs, scratch).to(mod.weight.dtype)
    bias = None if mod.bias is None else mod.bias.detach()
    kw = {"bias": bias is not None, "device": packed.device, "dtype": mod.weight.dtype}
    if isinstance(mod, nn.Conv2d):
        new = torch.nn.utils.skip_init(PartialConv2d, ins, outs, mod.kernel_size, mod.stride, mod.padding,
                                       mod.dilation, **kw)  # fmt: skip
    else:
        new = torch.nn.utils.skip_init(PartialLinear, ins, outs, **kw)
    if tuple(new.weight.shape) != tuple(packed.shape):  # pragma: no cover - the packing uses the module's plan
        raise ValueError(
            f"packed weight has {tuple(packed.shape)} entries; the module stores {tuple(new.weight.shape)}"
        )
    with torch.no_grad():
        new.weight.data = packed
        if bias is not None:
            new.bias.copy_(bias)
        new._reset_buffers()
    return new


def _build(
    mod: nn.Module, ins: Segments, outs: Segments, path: str, pending: Any = None, scratch: Tensor | None = None
) -> nn.Module:
    """The execution module of a dense layer (from_dense checks that the skipped blocks are exactly zero), or of a
    layer whose weight is pending (:func:`_build_pending`)."""
    try:
        if pending is not None:
            new = _build_pending(mod, ins, outs, pending, scratch)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            cls = PartialConv1d if isinstance(mod, nn.Conv1d) else PartialConv2d
            new = cls.from_dense(mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                                 ins, outs, mod.stride, mod.padding, mod.dilation)  # fmt: skip
        else:
            w = mod.weight.detach()
            if type(mod).__name__ == "Conv1D":
                w = w.t()
            new = PartialLinear.from_dense(w, None if mod.bias is None else mod.bias.detach(), ins, outs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    new.train(mod.training)
    for p_new, p_old in zip(new.parameters(), mod.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    return new


def swap_partial_modules(
    model: nn.Module,
    num_members: int,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = DECISION_BATCH,
    fuse_activations: bool = True,
    decisions: dict[str, str] | None = None,
    always: bool = False,
) -> list[str]:
    """Replace (in place) the layers whose member-mask segments skip blocks by PartialLinear / PartialConv2d.

    Args:
        model: a built fused network with ``fusion_module_layouts`` (see :func:`pyfusion.fuse.build`).
        num_members: K.
        input_shapes: module path -> the shape of its input for one example (without the batch dimension), from
            one forward on example inputs (:func:`finish` records them). Convolutions need them for the cost model
            (output positions); without a shape a layer is predicted at one row (linear) / one position (conv).
        batch: examples per forward at which the partial module and the dense zero-block layer are compared.
        fuse_activations: fold a ReLU / GELU / SiLU module that follows the layer in an ``nn.Sequential`` into the
            partial module's epilogue (the activation module becomes ``nn.Identity``).
        decisions: filled with module path -> "partial", "dense (predicted faster: ...)" or "dense (why)".
        always: swap every block-sparse layer that can be swapped exactly, without asking the cost model (tests,
            and machines the cost model was not calibrated on).

    Returns:
        The module paths that were swapped.
    """
    from pyfusion.fuse.builder import materialize, pad_numel, pending_weights

    layouts = getattr(model, "fusion_module_layouts", None) or {}
    pending = pending_weights(model)  # weights the builder left for the swap to pack (build(defer=True))
    shared = _shared_params(model)
    shapes = dict(input_shapes or {})
    chosen: dict[str, tuple[Segments, Segments]] = {}
    why: dict[str, str] = {}
    parents = {name: mod for name, mod in model.named_modules()}
    chosen_mha: dict[str, tuple[Segments, Segments, Segments, Segments]] = {}
    for path, mod in model.named_modules():
        if path and isinstance(mod, nn.MultiheadAttention):
            _choose_mha(model, layouts, path, mod, num_members, shapes, batch, always, shared, chosen_mha, why)
            continue
        if path == "" or _axes_of(mod) is None:
            continue
        parent_path = path.rpartition(".")[0]
        if parent_path in chosen_mha:
            continue  # the attention module is replaced as a whole
        segs = module_segments(model, layouts, path, num_members)
        if segs is None:
            continue
        ins, outs = segs
        plan = segment_plan(ins, outs)
        if plan.stored == plan.o_total * plan.i_total:
            continue  # no block is skipped: the dense layer is the partial layer
        if _reads_child_weights(parents[parent_path]):
            why[path] = f"dense ({type(parents[parent_path]).__name__} reads the weight directly)"
            continue
        if any(id(p) in shared for p in mod.parameters()):
            why[path] = "dense (its weight is tied to another module's)"
            continue
        shape = shapes.get(path)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            from pyfusion.ops.partial_conv2d import conv_geom
            from pyfusion.ops.partial_conv2d.backends import conv_out_hw

            if isinstance(mod, nn.Conv1d):  # PartialConv1d runs the 2-D op on a height-1 map
                geom = conv_geom((1, *mod.kernel_size), (1, *mod.stride), (0, *mod.padding), (1, *mod.dilation))
                shape = None if shape is None or len(shape) < 2 else (1, 1, int(shape[-1]))
            else:
                geom = conv_geom(mod.kernel_size, mod.stride, mod.padding, mod.dilation)
            pos = 1
            if shape is not None and len(shape) >= 3:
                ho, wo = conv_out_hw(int(shape[-2]), int(shape[-1]), geom.kernel, geom.stride, geom.padding,
                                     geom.dilation)  # fmt: skip
                pos = max(1, ho * wo)
            t_part = predict_time("conv", plan, batch, geom, pos)
            t_dense = predict_time("conv", plan, batch, geom, pos, dense=True)
        else:
            rows = batch * (math.prod(int(v) for v in shape[:-1]) if shape is not None and len(shape) > 1 else 1)
            t_part = predict_time("linear", plan, rows)
            t_dense = predict_time("linear", plan, rows, dense=True)
        if t_part > t_dense and not always:
            why[path] = f"dense (predicted faster at batch {batch}: {t_dense * 1e6:.0f} vs {t_part * 1e6:.0f} us)"
            continue
        chosen[path] = segs

    swapped: list[str] = []
    # one float64 scratch for the padded member copies of every pending weight packed below (builder.pad_numel)
    sizes = [pad_numel(pw.states, pw.key) for p, pw in pending.items() if p.rpartition(".")[0] in chosen]
    sizes = [n for n in sizes if n > 0]
    scratch = torch.empty(max(sizes), dtype=torch.float64) if sizes else None

    def make(mod: nn.Module, fqn: str) -> nn.Module:
        swapped.append(fqn)
        why[fqn] = "partial"
        if fqn in chosen_mha:
            try:
                return PartialMultiheadAttention.from_dense(mod, *chosen_mha[fqn])
            except ValueError as exc:
                raise ValueError(f"{fqn}: {exc}") from exc
        ins, outs = chosen[fqn]
        return _build(mod, ins, outs, fqn, pending.pop(f"{fqn}.weight", None), scratch)

    replace_(model, make, lambda m, fqn: fqn in chosen or fqn in chosen_mha)
    materialize(model)  # the pending weights of the layers that stay dense
    if swapped:
        _no_fused_fast_path(model, swapped)
    if fuse_activations:
        _fuse_activations(model, swapped)
    if decisions is not None:
        decisions.update(why)
    return swapped


def _choose_mha(
    model: nn.Module,
    layouts: Mapping[str, Mapping[str, Any]],
    path: str,
    mod: nn.MultiheadAttention,
    num_members: int,
    shapes: Mapping[str, Sequence[int]],
    batch: int,
    always: bool,
    shared: set[int],
    chosen: dict[str, tuple[Segments, Segments, Segments, Segments]],
    why: dict[str, str],
) -> None:
    """Decide whether the nn.MultiheadAttention at ``path`` becomes a PartialMultiheadAttention."""
    segs = mha_segments(model, layouts, path, num_members)
    if segs is None:
        if not _mha_swappable(mod) and path in layouts:
            why[path] = "dense (nn.MultiheadAttention with kdim / vdim, bias_k / bias_v or add_zero_attn)"
        return
    ins, rows, o_in, o_out = segs
    e = int(mod.out_proj.weight.shape[0])
    plans = [segment_plan(ins, slice_segments(rows, j * e, (j + 1) * e)) for j in range(3)]
    plans.append(segment_plan(o_in, o_out))
    if all(p.stored == p.o_total * p.i_total for p in plans):
        return
    if any(id(p) in shared for p in mod.parameters()):
        why[path] = "dense (its weights are tied to another module's)"
        return
    shape = shapes.get(path)
    tokens = math.prod(int(v) for v in shape[:-1]) if shape is not None and len(shape) > 1 else 1
    r = batch * tokens
    t_part = sum(predict_time("linear", p, r) for p in plans)
    t_dense = predict_time("linear", segment_plan(((e, 1),), ((3 * e, 1),)), r, dense=True) + predict_time(
        "linear", plans[3], r, dense=True
    )
    if t_part > t_dense and not always:
        why[path] = f"dense (predicted faster at batch {batch}: {t_dense * 1e6:.0f} vs {t_part * 1e6:.0f} us)"
        return
    chosen[path] = segs


def _no_fused_fast_path(model: nn.Module, swapped: list[str]) -> None:
    """``nn.TransformerEncoderLayer``'s inference fast path (one C++ op) reads ``linear1.weight``,
    ``self_attn.in_proj_weight``, ... directly: a layer holding a swapped module runs its Python path (the same
    function, module calls), and an ``nn.TransformerEncoder`` above it no longer converts to nested tensors."""
    for path, mod in model.named_modules():
        inside = any(p.startswith(path + ".") for p in swapped) if path else bool(swapped)
        if not inside:
            continue
        if isinstance(mod, nn.TransformerEncoderLayer):
            mod.activation_relu_or_gelu = False  # the fast path's condition (the Python path uses .activation)
        elif isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False


def _fuse_activations(model: nn.Module, swapped: list[str]) -> None:
    counts: dict[int, int] = {}
    for _n, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    for path in swapped:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not isinstance(parent, nn.Sequential):
            continue
        keys = list(parent._modules)
        i = keys.index(name)
        if i + 1 >= len(keys):
            continue
        layer, nxt = parent._modules[name], parent._modules[keys[i + 1]]
        act = _fusable_activation(nxt)
        if act is None or counts.get(id(nxt), 0) > 1 or layer.activation != "none":
            continue
        layer.activation = act
        layer.activation_id.fill_(ACTIVATIONS.index(act))
        parent._modules[keys[i + 1]] = nn.Identity()


# ---------------------------------------------------------------------------------------------------------------
# The api hook: the ensemble cap, then the swap
# ---------------------------------------------------------------------------------------------------------------


def _members_run(members: Sequence[nn.Module], example: Any) -> bool:
    """Whether member 0 runs on the example inputs (asked only after the fused model failed on them)."""
    from pyfusion.fuse.cost import run_example

    try:
        with torch.no_grad():
            run_example(members[0], example)
    except Exception:
        return False
    return True


def _does_not_run(fused: nn.Module, exc: Exception) -> ValueError:
    """The error of a fused model that fails on inputs its members run on: the user's forward fixes a width the
    plan changed (a channel count in a ``view``, a slice bound) that no adapter updates."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ValueError(
        f"the fused {type(fused).__name__} does not run with the fused widths on inputs its members run on "
        f"({type(exc).__name__}: {first}); a forward probably hard-codes a width the plan changed (a channel count "
        "in a view / reshape, a slice bound, a size attribute no adapter updated: see "
        "pyfusion.fuse.builder.register_adapter): fuse at full width (alpha = 0) or declare the groups"
    )


def _input_shapes(model: nn.Module, example: Any) -> dict[str, tuple[int, ...]]:
    """Per swappable layer, the shape of its input for one example (one forward on the example inputs)."""
    from pyfusion.fuse.cost import run_example

    shapes: dict[str, tuple[int, ...]] = {}
    handles = _shape_hooks(model, shapes)
    try:
        run_example(model, example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _shape_hooks(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[Any]:
    """Forward pre-hooks that record into ``shapes`` what :func:`_input_shapes` returns, during any forward (the
    ensemble cap's cost pass on the fused model, so that the swap needs no forward of its own)."""
    handles = []
    for path, mod in model.named_modules():
        if _axes_of(mod) is None and not isinstance(mod, nn.MultiheadAttention):
            continue

        def hook(m: nn.Module, args: tuple, path: str = path) -> None:
            if args and isinstance(args[0], Tensor) and args[0].dim() >= 1:
                shape = tuple(int(v) for v in args[0].shape)
                if isinstance(m, nn.MultiheadAttention) and not m.batch_first and len(shape) == 3:
                    shape = (shape[1], shape[0], shape[2])  # (T, B, E): the batch is the second dimension
                shapes.setdefault(path, shape[1:])

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def _structure(model: nn.Module) -> tuple | None:
    """What :func:`pyfusion.cost` of a plain member depends on besides the example: module paths and classes,
    tensor names and shapes, a Hugging Face config. None for a model that carries fusion records (its cost reads
    them) - such a member is costed on its own."""
    if any(hasattr(model, a) for a in ("fusion_module_layouts", "fusion_layouts", "fusion_plan")):
        return None
    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    return (
        tuple((p, type(m)) for p, m in model.named_modules(remove_duplicate=False)),
        tuple((k, tuple(t.shape), t.dtype) for k, t in model.named_parameters(remove_duplicate=False)),
        tuple((k, tuple(t.shape), t.dtype) for k, t in model.named_buffers(remove_duplicate=False)),
        repr(to_dict()) if callable(to_dict) else None,
    )


def _meta_shell(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors of the same shapes and dtypes (no
    storage: copying and running it costs no memory traffic and no FLOPs)."""
    memo: dict[int, Any] = {}
    for _n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for _n, b in model.named_buffers(remove_duplicate=False):
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    shell = deepcopy_module(model, memo)
    # torch has no C++ meta kernel for the out-of-place relu: each nn.ReLU ran the Python decomposition of the
    # reference op, 0.2 ms (1.6 of a VGG11 member's 2.2 ms meta forward, 1 thread), while relu_ takes 1 us. On the
    # meta device in-place writes nothing: the same shapes, dtypes and calls for the count (relu is not counted).
    for m in shell.modules():
        if type(m) is nn.ReLU:
            m.inplace = True
    return shell


def _to_meta(example: Any) -> Any:
    """``example`` (a tensor, an input shape, or (args, kwargs)) with every tensor in it moved to the meta device."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: torch.empty_like(v, device="meta") if isinstance(v, Tensor) else v, example)


def _cost(
    model: nn.Module,
    example: Any,
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    meta_flag: list[bool] | None = None,
) -> Any:
    """:func:`pyfusion.cost` of ``model`` on ``example``, counted on a meta-device copy (:func:`_meta_shell`) when
    that runs, else on the model itself; ``shapes`` (when given) receives :func:`_input_shapes`'s records;
    ``meta_flag`` (when given) receives True if the meta copy gave the count, False if the model itself did.

    The counts depend only on shapes and on the fusion records, so the meta run gives the same :class:`Cost` (tested
    equal); it saves the real forward, which for a fused VGG11 pair at alpha 0.75 (a dense zero-block network 3x a
    member) was 60-130 ms of the fusion. A model whose forward needs real values (data-dependent control flow,
    tensors held outside parameters and buffers) raises on meta and is run for real."""
    from pyfusion.fuse.cost import cost

    try:
        shell, ex = _meta_shell(model), _to_meta(example)
    except Exception:  # an object deepcopy cannot copy: count on the model itself
        shell = None
    if shell is not None:
        recorded: dict[str, tuple[int, ...]] = {}
        handles = _shape_hooks(shell, recorded) if shapes is not None else []
        try:
            result = cost(shell, ex)
        except Exception:  # the forward needs real values
            result = None
        finally:
            for h in handles:
                h.remove()
        if result is not None:
            if shapes is not None:
                shapes.update(recorded)
            if meta_flag is not None:
                meta_flag.append(True)
            return result
    from pyfusion.fuse.builder import materialize

    materialize(model)  # a real forward needs the pending weights
    if meta_flag is not None:
        meta_flag.append(False)
    handles = _shape_hooks(model, shapes) if shapes is not None else []
    try:
        return cost(model, example)
    finally:
        for h in handles:
            h.remove()


def _member_costs(members: Sequence[nn.Module], example: Any) -> list[Any]:
    """:func:`pyfusion.cost` of every member, one forward per distinct structure (:func:`_structure`): the members
    share one architecture, so K - 1 of the K forwards were repeats (tested equal to costing each member).

    A count made on the meta device is also kept across calls (:data:`_MEMBER_COSTS`, keyed by
    :func:`_member_cost_key`): fusing the same members again (an alpha sweep, the bench) skips the meta forward,
    ~50 ms of a VGG11 member (its ReLUs run torch's Python meta decompositions)."""
    seen: dict[tuple, Any] = {}
    out = []
    for m in members:
        key = _structure(m)
        if key is None:
            out.append(_cost(m, example))
            continue
        if key not in seen:
            seen[key] = _cached_member_cost(m, example, key)
        out.append(seen[key])
    return out


# member -> (key, Cost, input shapes): the meta-device counts of :func:`_member_costs` (weak keys: a dropped
# member takes its entry with it; one entry per member, the latest example)
_MEMBER_COSTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any, dict]] = weakref.WeakKeyDictionary()

_PLAIN = (bool, int, float, str, type(None))


def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(_plain(x) for x in v))


def _member_cost_key(model: nn.Module, structure: tuple, example: Any) -> tuple | None:
    """Everything a meta-device :func:`pyfusion.cost` of ``model`` can depend on, or None (not cacheable).

    The count reads only shapes, so the structure (:func:`_structure`) and the example's tensor shapes / dtypes
    decide it; to be safe against anything else a forward may branch on, the key also holds every module's plain
    attributes (``stride``, ``padding``, a custom flag...), its forward function and hook ids, and every
    parameter's and buffer's identity and in-place version counter (a weight replaced or changed in place gives a
    new key: a stale count would be a silently wrong ensemble cap). An example with a non-plain, non-tensor leaf
    is not cached."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(example)
    ex = []
    for v in leaves:
        if isinstance(v, Tensor):
            ex.append(("T", tuple(v.shape), v.dtype, str(v.device)))
        elif _plain(v):
            ex.append(v)
        else:
            return None
    mods = []
    for p, m in model.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and _plain(v)))
        hooks = (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        own = m.__dict__.get("forward")  # a forward set on the instance (its function: no reference to m)
        mods.append((p, getattr(type(m), "forward", None), getattr(own, "__func__", own), attrs, hooks))
    tensors = tensor_state(model)  # identities, versions and storages (held by the key: no id reuse)
    if tensors is None:
        return None
    return (structure, str(spec), tuple(ex), tuple(mods), tensors)


def _cached_member_cost(model: nn.Module, example: Any, structure: tuple) -> Any:
    """:func:`_cost` of one member through :data:`_MEMBER_COSTS` (only meta-device counts are kept: a count that
    needed the real forward may depend on the values), and inside :func:`member_cost_scope` through the scope's
    record of real-forward counts (keyed also by the example's tensors themselves: :func:`_example_identity`)."""
    key = _member_cost_key(model, structure, example)
    if key is not None:
        hit = _MEMBER_COSTS.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
    scope = _REAL_MEMBER_COSTS.get()
    ekey = _example_identity(example) if scope is not None and key is not None else None
    if ekey is not None:
        got = scope.get(id(model))  # type: ignore[union-attr]
        if got is not None and got[0] is model and got[1] == key and got[2] == ekey[0]:
            return got[3]
    on_meta: list[bool] = []
    shapes: dict[str, tuple[int, ...]] = {}
    result = _cost(model, example, shapes, meta_flag=on_meta)
    if key is not None and on_meta == [True]:
        _MEMBER_COSTS[model] = (key, result, shapes)
    elif ekey is not None and on_meta == [False]:
        scope[id(model)] = (model, key, ekey[0], result, ekey[1])  # type: ignore[index]
    return result


# A dict while :func:`member_cost_scope` is open: id(member) -> (member, key, example identity, Cost, pins)
_REAL_MEMBER_COSTS: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar(
    "pyfusion_real_member_costs", default=None
)


def _example_identity(example: Any) -> tuple[tuple, tuple] | None:
    """(key, pins): every tensor leaf of ``example`` by identity, storage, version, shape, stride, dtype and device
    (the tensors are pinned by the caller, so an id is never reused), every other leaf by value; None when a leaf
    is neither a tensor nor a plain value."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(example)
    key: list[Any] = [str(spec)]
    pins = []
    for v in leaves:
        if isinstance(v, Tensor):
            try:
                k, pin = tensor_key(v)
            except Exception:  # no storage to name (a subclass, sparse): not cached
                return None
            key.append(("T", *k, str(v.device)))
            pins.append(pin)
        elif _plain(v):
            key.append(v)
        else:
            return None
    return tuple(key), tuple(pins)


@contextlib.contextmanager
def member_cost_scope(record: dict[int, tuple] | None = None) -> Iterator[dict[int, tuple]]:
    """Within the block, a member count that needed the real forward (a Hugging Face GPT-2 / Llama raises on the
    meta device: its mask code reads a value) is kept in ``record`` and reused for the same member on the same
    example: a hit needs the member's :func:`_member_cost_key` (its tensors' identities and versions, module
    attributes, forwards, hooks) and the example's tensor leaves (:func:`_example_identity`: the same tensor objects,
    unchanged) to be equal, so the forward that would run again is the one already run on the same values: the
    same number. For a caller that fuses the same members many times on the same calibration batches (the budget
    search: one count per member structure instead of one per fusion); ``record`` may be kept across blocks."""
    record = {} if record is None else record
    token = _REAL_MEMBER_COSTS.set(record)
    try:
        yield record
    finally:
        _REAL_MEMBER_COSTS.reset(token)


# The built-in modules whose forward calls no submodule conditionally and never branches on a channel / feature
# width: in an nn.Sequential of these, widening the channels (the builder's dense zero-block layers) leaves every
# weight layer's calls and output positions per example as they are in a member.
_WIDTH_BLIND = (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten,
    nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d,
)  # fmt: skip
_WIDTHS = frozenset({"in_features", "out_features", "in_channels", "out_channels", "num_features"})


def _widthless_attrs(m: nn.Module) -> tuple:
    return tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k not in _WIDTHS and _plain(v)))


def _derived_fused_count(
    fused: nn.Module, members: Sequence[nn.Module], member_cost: Sequence[Any]
) -> tuple[int, dict[str, tuple[int, ...]]] | None:
    """The fused model's effective FLOPs and its swappable layers' input shapes from the members' meta-device count
    (:data:`_MEMBER_COSTS`), without a forward of the fused model; None unless provably equal to :func:`_cost`.

    Provable when the fused model and every member are the same nn.Sequential of :data:`_WIDTH_BLIND` modules
    (paths, classes, and every plain attribute but the widths), with no hooks (module or global) and no forward set
    on an instance, the members' counts are equal, have no attention / norm-map products and were counted on the
    meta device with their input shapes: then every weight layer runs on the same positions P per example as in a
    member (``member FLOPs = 2 * weight.numel() * P``) and :func:`pyfusion.cost` counts ``2 * stored * P`` for it
    (``stored``: the blocks its recorded segments allow, as :func:`pyfusion.fuse.cost._recorded_stored`). The
    input shapes are the member's with the fused layer's input width (tested equal to the meta count and to
    :func:`_input_shapes` on K = 2 / 3 linear and conv networks at alpha 0 / 0.5 / 1)."""
    from torch.nn.modules import module as module_mod

    from pyfusion.fuse.cost import _recorded_stored

    if type(fused) is not nn.Sequential or any(
        getattr(module_mod, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")
    ):
        return None
    if any(c != member_cost[0] for c in member_cost) or member_cost[0].attention_flops:
        return None
    fused_mods = list(fused.named_modules(remove_duplicate=False))
    for m in (fused, *members):
        mods = fused_mods if m is fused else list(m.named_modules(remove_duplicate=False))
        if len(mods) != len(fused_mods):
            return None
        for (p, x), (fp, fx) in zip(mods, fused_mods, strict=True):
            if p != fp or type(x) is not type(fx) or type(x) not in _WIDTH_BLIND:
                return None
            if x._forward_hooks or x._forward_pre_hooks or "forward" in x.__dict__:
                return None
            if m is not fused and _widthless_attrs(x) != _widthless_attrs(fx):
                return None
    hit = _MEMBER_COSTS.get(members[0])
    if hit is None or hit[1] is not member_cost[0]:  # not this call's meta count (a real-forward count, a stale one)
        return None
    member_shapes = hit[2]
    layers = member_cost[0].layers
    flops = 0
    shapes: dict[str, tuple[int, ...]] = {}
    for path, mod in fused_mods:
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        if path in member_shapes:
            old = member_shapes[path]
            width = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            shapes[path] = (*old[:-1], width) if isinstance(mod, nn.Linear) else (width, *old[1:])
        if path not in layers:  # never called
            continue
        n_member, flops_member = layers[path][0], layers[path][1]
        if n_member <= 0 or flops_member % (2 * n_member):
            return None
        positions = flops_member // (2 * n_member)
        stored = _recorded_stored(fused, path, mod) if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) else None
        flops += 2 * (mod.weight.numel() if stored is None else stored) * positions
    return flops, shapes


def _members_as_ensemble(members: Sequence[nn.Module], lambdas: Sequence[float], example: Any) -> tuple[nn.Module, int]:
    """(the members' :class:`pyfusion.nn.SubEnsemble` of copies, its effective FLOPs on ``example``).

    Raises:
        TypeError: outputs a SubEnsemble cannot average (not a tensor, no ``.logits``).
    """
    from pyfusion.nn.ensemble import SubEnsemble

    sub = SubEnsemble([deepcopy_module(m).eval() for m in members], list(lambdas), "logits")
    return sub, _cost(sub, example).flops


def _member_ensemble(
    members: Sequence[nn.Module], lambdas: Sequence[float], example: Any, info: dict[str, Any], ens: int
) -> tuple[nn.Module, None]:
    """The ensemble as the members themselves (:class:`pyfusion.nn.SubEnsemble` of copies), where the built one
    costs more than ``ens``; a model whose outputs it cannot average is an error (never a costlier model)."""

    built = info["effective_flops"]
    try:
        sub, flops = _members_as_ensemble(members, lambdas, example)
    except TypeError as exc:
        raise ValueError(
            f"the fused point and the built ensemble cost more than the ensemble ({built:,} FLOPs per sample against "
            f"{ens:,}: dense layers that no execution module skips the zero blocks of), and the members' outputs "
            f"cannot be averaged as one ({exc}); fuse with a smaller alpha"
        ) from exc
    info["effective_flops"] = flops
    info["ensemble_cap"]["returned"] = (
        f"the members as a SubEnsemble: the built ensemble costs {built:,} FLOPs per sample (its dense layers run "
        "the zero blocks)"
    )
    return sub, None


def is_ensemble_plan(plan: Plan, graph: FusionGraph) -> bool:
    """Whether every group of the graph is widened to ``[branch_1 | ... | branch_K]`` (layout ``(0, n, ..., n)``):
    the plan whose built network claims to be the ensemble ``sum_k lambda_k f_k(x)``."""
    k = plan.num_members
    for name, g in graph.groups.items():
        gp = plan.groups.get(name)
        if gp is None or tuple(gp.layout) != (0,) + (g.size,) * k:
            return False
    return bool(graph.groups)


# relative error (max |fused - ensemble| / max |ensemble|) the built alpha = 1 network may have against the members'
# weighted outputs: the sums run in another order, nothing else (float64 builds measured at 1e-16 - 1e-15; float32
# transformers at ~1e-7; an output soft-cap tanh(z / 30) * 30 on random logits was 2.5e-3, a log_softmax 6.5e-2)
ENSEMBLE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _output_tensors(out: Any) -> list[Tensor]:
    """The floating tensors of a model output (a tensor, nested tuples / lists / dicts, a Hugging Face output), in
    order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def ensemble_error(fused: nn.Module, members: Sequence[nn.Module], lambdas: Sequence[float], example: Any) -> float:
    """max |fused(x) - sum_k lambda_k f_k(x)| / max |sum_k lambda_k f_k(x)| over the floating tensors of the
    outputs on ``example`` (eval mode, no autograd), or ``inf`` when the outputs do not have the same tensors."""
    from pyfusion.fuse.cost import run_example

    got = _output_tensors(run_example(fused, example))
    outs = [_output_tensors(run_example(m, example)) for m in members]
    if not got or any(len(o) != len(got) for o in outs):
        return math.inf
    err, scale = 0.0, 0.0
    for j, y in enumerate(got):
        if any(o[j].shape != y.shape for o in outs):
            return math.inf
        ref = sum(lam * o[j].double() for lam, o in zip(lambdas, outs))
        err = max(err, float((y.double() - ref).abs().max()) if y.numel() else 0.0)
        scale = max(scale, float(ref.abs().max()) if y.numel() else 0.0)
    return err / max(scale, 1e-30)


def _verify_ensemble(
    fused: nn.Module, plan: Plan, members: Sequence[nn.Module], lambdas: Sequence[float], example: Any,
    info: dict[str, Any],
) -> tuple[nn.Module, Plan | None]:  # fmt: skip
    """An alpha = 1 network must be the ensemble. The widened network computes ``phi(sum_k lambda_k z_k)`` where the
    members compute ``phi(z_k)``: when the model applies a non-linear ``phi`` after the layer that sums the members'
    contributions (Gemma-2's final logit soft-cap ``tanh(z / c) * c``, a ``log_softmax`` / sigmoid output, a
    product of two outputs), that is not the ensemble ``sum_k lambda_k phi(z_k)``. Checked on the example inputs;
    where it fails, the members' ensemble itself is returned (:class:`pyfusion.nn.SubEnsemble`, the same cost) and
    ``fusion_info["ensemble_check"]`` says why."""
    dtype = next((p.dtype for p in members[0].parameters() if p.is_floating_point()), torch.float32)
    tol = ENSEMBLE_RTOL.get(dtype, 1e-4)
    try:
        err = ensemble_error(fused, members, lambdas, example)
    except Exception as exc:  # the outputs cannot be formed on the example: no claim is checked, said so
        info["ensemble_check"] = {"checked": False, "reason": f"{type(exc).__name__}: {exc}"}
        return fused, plan
    info["ensemble_check"] = {"checked": True, "relative_error": err, "tolerance": tol, "exact": err <= tol}
    if err <= tol:
        return fused, plan
    if math.isinf(err):
        why = "its outputs do not have the members' tensors and shapes (a widened tensor among the outputs?)"
    else:
        why = (
            f"it is {err:.2e} (relative) off the members' weighted outputs on the example inputs (tolerance "
            f"{tol:.0e}): the model applies a non-linear function after the layer that sums the members (an output "
            "soft-cap, log_softmax, sigmoid, ...)"
        )
    info["ensemble_check"]["reason"] = (
        f"the widened alpha = 1 network is not the ensemble: {why}; the members' SubEnsemble is returned instead"
    )
    try:
        sub, info["effective_flops"] = _members_as_ensemble(members, lambdas, example)
    except TypeError as exc:  # outputs SubEnsemble cannot average: the widened network, with the finding
        info["ensemble_check"]["reason"] += f" -- but the outputs cannot be averaged as one ({exc}): not returned"
        raise ValueError(
            f"partial fusion at alpha = 1 cannot be the ensemble of these members: {info['ensemble_check']['reason']}"
        ) from exc
    return sub, None


def finish(
    fused: nn.Module,
    members: Sequence[nn.Module],
    graph: FusionGraph,
    plan: Plan | None,
    lambdas: Sequence[float],
    info: dict[str, Any],
    *,
    fast_modules: bool | str = True,
    example: Any = None,
    verify_ensemble: bool = True,
) -> tuple[nn.Module, Plan | None]:
    """The last step of :func:`pyfusion.fuse`: cap the effective FLOPs at the ensemble's, then swap in the
    execution modules.

    A fused point whose effective FLOPs (:func:`pyfusion.cost` on the graph's example inputs) exceed the
    ensemble's (K members run one after another; the few shared slots that read every branch's inputs can make
    alpha close to 1 cost 100.1-100.6 %) is never returned: the exact ensemble (``Plan.ensemble``, built by the same
    builder) is returned instead and ``fusion_info["ensemble_cap"]`` says so, with both counts. A point that claims
    to be the ensemble (every group widened to its members' branches: alpha = 1) is compared with the members'
    weighted outputs on the example inputs (:func:`_verify_ensemble`, ``fusion_info["ensemble_check"]``); when it
    is not the ensemble (a non-linear function after the layer that sums the members), the members' SubEnsemble is
    returned. ``verify_ensemble=False``: the weights are not the plan's alone (fitted to targets, BatchNorm
    statistics recomputed, REPAIR), so nothing claims to be the ensemble.

    Returns:
        (model, plan): the model to return and its plan (the ensemble's plan when capped).
    """
    from pyfusion.fuse.builder import build, materialize

    if not fast_modules:
        materialize(fused)  # nothing packs the pending weights: write them dense
    example = graph.example_inputs if example is None else example
    shapes: dict[str, tuple[int, ...]] | None = None
    if example is not None and plan is not None:
        recorded: dict[str, tuple[int, ...]] = {}
        try:
            member_cost = _member_costs(members, example)
            derived = _derived_fused_count(fused, members, member_cost)
            if derived is not None:  # no forward of the fused model (~25 ms of a VGG11 pair's meta pass)
                fused_flops, recorded = derived
            else:
                fused_flops = _cost(fused, example, recorded if fast_modules else None).flops
            shapes = recorded if fast_modules and recorded else None  # nothing recorded: one forward of its own
        except Exception as exc:  # a model that does not run on the example: no cap check, said so
            if _members_run(members, example):  # the members run on it: the fused widths broke the forward
                raise _does_not_run(fused, exc) from exc
            info["ensemble_cap"] = {"checked": False, "reason": f"{type(exc).__name__}: {exc}"}
        else:
            ens = sum(c.flops for c in member_cost)
            info["effective_flops"] = fused_flops
            info["ensemble_flops"] = ens
            if fused_flops > ens:
                ens_plan = Plan.ensemble(graph, lambdas)
                ens_plan.info.update({"capped_from": {"flops": fused_flops, "layouts": fused.fusion_layouts}})
                fused = build(members, graph, ens_plan)
                info["ensemble_cap"] = {
                    "checked": True,
                    "capped": True,
                    "fused_flops": fused_flops,
                    "ensemble_flops": ens,
                    "reason": f"the fused point costs {fused_flops / max(ens, 1):.4%} of the ensemble's "
                    "effective FLOPs (more than the ensemble): the exact ensemble is returned instead",
                }
                info["effective_flops"] = _cost(fused, example).flops
                plan = ens_plan
                shapes = None  # another model: its shapes are recorded below
                if info["effective_flops"] > ens:
                    # the built ensemble runs layers no execution module skips the zero blocks of (nn.Conv3d, a
                    # transposed convolution, ...): it would cost more than the members run one after another, so
                    # those run
                    fused, plan = _member_ensemble(members, lambdas, example, info, ens)
            else:
                info["ensemble_cap"] = {"checked": True, "capped": False}
    elif plan is not None:
        info["ensemble_cap"] = {"checked": False, "reason": "no example inputs to count FLOPs on"}
    if fast_modules:
        if shapes is None and example is not None:
            try:
                shapes = _input_shapes(fused, example)
            except Exception as exc:
                if not _members_run(members, example):
                    raise
                raise _does_not_run(fused, exc) from exc
        decisions: dict[str, str] = {}
        info["fast_modules"] = swap_partial_modules(
            fused, len(members), input_shapes=shapes, decisions=decisions, always=fast_modules == "always"
        )
        info["fast_decisions"] = {p: d for p, d in decisions.items() if d != "partial"}
    if verify_ensemble and example is not None and plan is not None and is_ensemble_plan(plan, graph):
        # after the swap: the builder may leave weights pending (meta) for it to pack
        fused, plan = _verify_ensemble(fused, plan, members, lambdas, example, info)
    return fused, plan
