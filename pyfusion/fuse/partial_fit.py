"""``method="partial_fit"``: partial fusion whose shared slots are fitted to the members' targets by least squares.

Construction (combining partial fusion, Morelli & Eckstein 2026, with the least-squares step of neuron
interpolation, Luenam et al. 2025, papers.md B.3). Partial fusion (:mod:`pyfusion.fuse.partial`) gives the layout
``[shared | branch_1 | ... | branch_K]`` and maps ``A_k``: a shared slot s is built from its contributors' neurons,
its weights being their lambda-renormalised average ``W0_s = sum_k A_k[s] W_k B_k``. Here the shared slots'
incoming weights are instead *fitted*, layer by layer in forward order, so that on calibration data the fused
layer reproduces the slot targets (as neuron interpolation fits a fused level to its slot targets from the fused
inputs, so later layers correct earlier errors)::

    T_s = sum_k A_k[s, :] a_k             (a_k: member k's output of the same layer, (N, n_k))
    W_s = argmin_W ||X W - T_s||^2 + r ||W - W0_s||^2 = (X^T X + r I)^{-1} (X^T T_s + r W0_s)

with X the fused model's inputs of the layer (all of them: a shared row reads every input slot, so the fitted rows
keep the layout's block structure and the cost of partial fusion at the same alpha), plus a ones column for the
bias, and ``r = ridge * mean(diag X^T X)``. The ridge pulls towards the averaged weights ``W0`` rather than
towards zero, so ``ridge -> inf`` is plain partial fusion, and where the average already reproduces the targets
(a member fused with a neuron-permuted copy of itself) the fit returns it, for any ridge. The Gram statistics and
the Cholesky solve are neuron interpolation's (:func:`pyfusion.fuse.interp.ls_statistics`,
:func:`pyfusion.fuse.interp.solve_ls`); branch slots keep their members' weights. The output layer (logits: a
Linear / Conv2d whose outputs are no neuron group) is fitted the same way to the ensemble's outputs
``sum_k lambda_k z_k`` (all its rows), or with ``output_target="probs"`` to the log of the probability
ensemble ``log sum_k lambda_k softmax(z_k)`` (then alpha = 1 is no longer the logit ensemble: it is the fit of the
probability ensemble by the ensemble's features).

A producer followed directly by a BatchNorm is fitted through it: the target is the members' BatchNorm output and
``W0`` the fused producer with the fused BatchNorm folded in; the BatchNorm of the fitted slots then becomes the
identity (running mean 0, variance 1, weight sqrt(1 + eps), the fitted bias as its bias), as in neuron
interpolation. The fused module carries ``fusion_weights_fitted``, so ``pyfusion.fuse`` does not recalibrate
BatchNorm afterwards by default (branch slots keep their members' statistics).

Fitted: producers that are ``nn.Linear``, ``nn.Conv2d`` (groups 1, integer zero padding) or Hugging Face ``Conv1D``
(GPT-2: ``y = x W + b`` with W (in, out), fitted as the Linear of ``W^T``, its output axis being the weight's axis
1), called once per forward pass, whose output axis is a sequence of group segments, each holding the group's
neurons in order, every neuron on ``rep`` consecutive rows (``rep`` = 1, or a flatten, or the q / k rows of a
rotary attention head group, e.g. Llama's q / k group of key-value heads with inner dims pinned: a slot owns
``n_rep * head_dim`` q rows and ``head_dim`` k rows, each taking the slot's map entry, so its target rows are
``sum_k (A_k kron I_rep) a_k``). Packed projections (GPT-2's ``c_attn`` writing q | k | v) fit each segment's
shared rows.

``nn.MultiheadAttention`` computes its packed q | k | v (``in_proj_weight``, 3E x E) and its ``out_proj`` inside its
forward, from the weights (no hook sees either layer), so it is fitted as one step at its place in the call order
(:mod:`pyfusion.fuse.mha_fit` captures its inputs with a forward pre-hook and recomputes its attention context).
in_proj: the rows are cut at E and 2E (member) / E' and 2E' (fused); block j (q, k, v) is the linear map of the
call's query, key or value, so its shared rows (whole heads: the head groups' layouts are in units of head_dim)
are fitted on the fused module's inputs of that block to ``sum_k A_k[:shared] y_kj``, ``y_kj`` member k's block
output from its own inputs and in_proj (self-attention: one design for the three blocks; cross-attention: the
query for q, the key / value for k / v). out_proj: then fitted on the fused module's attention context
(per-head ``softmax(q k^T / sqrt(d) + masks) v``, heads concatenated, recomputed with the just-fitted in_proj on
the fused model's inputs, with the call's own masks / ``is_causal`` / layout) to ``sum_k A_k[:shared] o_k``,
``o_k`` member k's attention output. torch's MHA / encoder-layer inference fast paths (which call no submodule)
are switched off while the fit runs the models. Left averaged with a reason: subclasses of
``nn.MultiheadAttention``, ``kdim`` / ``vdim`` != ``embed_dim`` (no packed in_proj), ``bias_k`` / ``bias_v`` and
``add_zero_attn`` (none of which the builder resizes today), a module called more than once per forward.

Producers left averaged are listed with the reason in ``fusion_info["fit"]["skipped"]`` (modules called twice,
grouped / non-zero-padded convolutions, output rows not in group order, layers never called as modules, other layer
types, the ``nn.MultiheadAttention`` configurations above).
Embedding tables (``nn.Embedding``, axis-1 producers of a residual stream) are not fitted and not skipped: a
token's output is its row, so the averaged row ``sum_k A_k[s] W_k`` already *is* the target ``sum_k A_k[s] a_k``
(the fit's solution, for any ridge); they are listed in ``fusion_info["fit"]["exact"]`` with that reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.fuse import partial as _partial  # noqa: F401 - registers method 'partial'
from pyfusion.fuse.builder import build
from pyfusion.fuse.config import PartialConfig
from pyfusion.fuse.interp import ls_statistics, solve_ls
from pyfusion.fuse.mha_fit import attention_context, capture_calls, in_proj_outputs, mha_unfit_reason, run_hooked
from pyfusion.fuse.mha_fit import sources as mha_sources
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import get_method, register_method
from pyfusion.graph.groups import AxisRef, FusionGraph, NeuronGroup
from pyfusion.stats.collect import batch_inputs

__all__ = ["OUTPUT_TARGETS", "PartialFitConfig", "fit_shared_slots", "partial_fit"]

OUTPUT_TARGETS = ("logits", "probs")
_LOG_FLOOR = -30.0  # log-probability floor of the "probs" target (exp(-30) ~ 1e-13: no class is that certain)


@dataclass(frozen=True)
class PartialFitConfig(PartialConfig):
    """``method="partial_fit"``: the options of :class:`~pyfusion.fuse.config.PartialConfig` and

    Attributes:
        ridge: r / mean(diag X^T X) of the fit towards the averaged weights (module docstring). Default 1e-2:
            on 4 digits MLPs (64-64, 200 calibration samples) at alpha 0 / 0.25 / 0.5, test accuracy was
            95.3 / 95.6 / 95.8% at ridge 1e-4, 95.6 / 96.0 / 95.8% at 1e-2 and 92.7 / 95.1 / 96.0% at 1
            (plain partial fusion: 86.9 / 93.3 / 95.1%); one measurement, not a sweep over the zoo.
        max_samples: calibration samples used for the fit (held in memory with one layer's activations).
        fit_output: also fit the output layer to the ensemble's outputs.
        output_target: the output layer's target: "logits" (``sum_k lambda_k z_k``, the ensemble partial fusion
            reaches at alpha = 1) or "probs" (``log sum_k lambda_k softmax(z_k)``, the probability ensemble, much
            better than the logit average when the members saw different classes; (N, C) outputs only).
    """

    ridge: float = 1e-2
    max_samples: int | None = 2048
    fit_output: bool = True
    output_target: str = "logits"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fit_options(self)


def check_fit_options(config: Any) -> None:
    """The checks of the least-squares fit's options (ridge, max_samples, fit_output, output_target), shared by
    :class:`PartialFitConfig` and ``ClusterFitConfig``."""
    config._check_real("ridge", 0.0)
    config._check_int("max_samples", 1, optional=True)
    if not isinstance(config.fit_output, bool):
        config._fail("fit_output", "a bool", config.fit_output)
    config._check_choice("output_target", OUTPUT_TARGETS)


def _inputs(data: Any, max_samples: int | None) -> Tensor:
    xs, n = [], 0
    for batch in data:
        x = batch_inputs(batch)
        if not isinstance(x, Tensor):
            raise ValueError(f"partial_fit needs tensor model inputs in the data batches; got {type(x).__name__}")
        xs.append(x)
        n += x.shape[0]
        if max_samples is not None and n >= max_samples:
            break
    x = torch.cat(xs)
    return x if max_samples is None else x[:max_samples]


def _run(model: nn.Module, x: Tensor, modules: dict[str, nn.Module], pre: bool, chunk: int = 256) -> dict[str, Tensor]:
    """Inputs (``pre``) or outputs of ``modules`` (path -> module) over the samples ``x``, concatenated.

    Each captured tensor is cloned: the forward may change it in place after the hook (``nn.ReLU(inplace=True)``
    on a layer's output, ``out += shortcut``), and the fit needs the value the layer saw or produced."""
    got: dict[str, list[Tensor]] = {p: [] for p in modules}
    handles = []
    for path, mod in modules.items():
        if pre:
            handles.append(mod.register_forward_pre_hook(lambda m, a, p=path: got[p].append(a[0].detach().clone())))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, p=path: got[p].append(o.detach().clone())))
    run_hooked(model, x, handles, chunk)
    return {p: torch.cat(v) for p, v in got.items()}


def _call_structure(model: nn.Module, x: Tensor) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """(Linear / Conv2d / Hugging Face Conv1D / nn.MultiheadAttention paths in call order, calls per path, producer
    path -> the BatchNorm that reads its output directly)."""
    order: list[str] = []
    calls: dict[str, int] = {}
    out_ids: dict[int, str] = {}
    bn_of: dict[str, str] = {}
    handles = []
    for path, mod in model.named_modules():
        if _layer_kind(mod) in ("linear", "conv2d", "conv1d"):

            def hook(m: nn.Module, a: Any, o: Any, p: str = path) -> None:
                if p not in calls:
                    order.append(p)
                calls[p] = calls.get(p, 0) + 1
                out_ids[id(o)] = p

            handles.append(mod.register_forward_hook(hook))
        elif isinstance(mod, nn.MultiheadAttention):  # its in_proj / out_proj: fitted when it is called

            def mha_hook(m: nn.Module, a: Any, p: str = path) -> None:
                if p not in calls:
                    order.append(p)
                calls[p] = calls.get(p, 0) + 1

            handles.append(mod.register_forward_pre_hook(mha_hook))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):

            def bn_hook(m: nn.Module, a: Any, p: str = path) -> None:
                src = out_ids.get(id(a[0]))
                if src is not None:
                    bn_of[src] = p

            handles.append(mod.register_forward_pre_hook(bn_hook))
    run_hooked(model, x[:2], handles)
    return order, calls, bn_of


def _layer_kind(mod: nn.Module) -> str | None:
    """The layer's kind for the fit: "linear", "conv2d", "conv1d" (Hugging Face ``Conv1D``: ``y = x W + b``, W (nx,
    nf), its outputs on axis 1), "embedding", or None (a layer the fit does not read)."""
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d):
        return "conv2d"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2 and int(w.shape[1]) == mod.nf:
        return "conv1d"
    return None


# the weight axis that indexes the layer's outputs (nn.MultiheadAttention: its in_proj_weight's rows, q | k | v)
_OUT_AXIS = {"linear": 0, "conv2d": 0, "conv1d": 1, "mha": 0}
EMBEDDING_REASON = "an embedding table: a lookup, its averaged rows are already the targets"


@dataclass(frozen=True)
class _Segment:
    """One group's part of a producer's output axis: member rows ``[member_offset, member_offset + n * rep)``, fused
    rows ``[fused_offset, fused_offset + shared * rep)`` fitted (the group's first ``shared`` slots), ``rep``
    consecutive rows per neuron (a flatten, or the q / k rows of a rotary attention head group: every row of a
    neuron takes its map entry)."""

    group: str
    shared: int
    member_offset: int
    n: int
    fused_offset: int
    rep: int = 1


def _rows_per_neuron(r: AxisRef, g: NeuronGroup) -> int | None:
    """Rows per neuron of a producer segment whose rows are the group's neurons in order, each repeated ``rep``
    times consecutively (factors ``[unit, inner?, rep?]``), or None for any other layout (a rep between unit and
    inner, a permuted order)."""
    factors = list(r.factors(g))
    rep = 1
    if factors and factors[-1][0] == "rep":
        rep = int(factors.pop()[1])
    whole = [("unit", g.units)] + ([("inner", g.unit_size)] if g.unit_size > 1 else [])
    return rep if factors == whole else None


def _fit_targets(
    graph: FusionGraph, plan: Plan, modules: dict[str, nn.Module]
) -> tuple[dict[str, list[_Segment]], dict[str, str], dict[str, str]]:
    """(producer path -> its output-axis segments with shared slots, path -> reason for producers left averaged,
    path -> reason for producers whose averaged weights already are the fit: embedding tables).

    A producer whose output axis several groups share (a layer read through ``torch.cat`` / a split, GPT-2's
    ``c_attn`` writing q | k | v, or written into a residual stream made of concatenated parts) has one segment per
    group reference: in the fused model the segments keep their order along the axis, each ``slots * rep`` wide
    (what :func:`pyfusion.fuse.builder.fused_groups` pairs). ``modules``: the fused model's modules (path -> module);
    the output axis is axis 0 of a Linear / Conv2d weight, axis 1 of a Hugging Face ``Conv1D``'s."""
    per_module: dict[str, list[tuple[int, str, NeuronGroup, AxisRef]]] = {}
    skipped: dict[str, str] = {}
    exact: dict[str, str] = {}
    for name, g in graph.groups.items():
        for r in g.refs:
            if r.role != "producer" or r.param.endswith("bias"):
                continue
            mod = modules.get(r.module)
            if r.param == "weight" or (r.param == "in_proj_weight" and isinstance(mod, nn.MultiheadAttention)):
                per_module.setdefault(r.module, []).append((r.offset, name, g, r))
            elif isinstance(mod, nn.MultiheadAttention):  # q / k / v_proj_weight (kdim / vdim != embed_dim), ...
                skipped[r.module] = mha_unfit_reason(mod) or f"an nn.MultiheadAttention's {r.param!r}"
            else:
                what = type(mod).__name__ if mod is not None else "no module"
                skipped[r.module] = (
                    f"a {what}'s {r.param!r}: the fit reads the weight of nn.Linear, nn.Conv2d and "
                    "Hugging Face Conv1D layers and nn.MultiheadAttention's in_proj_weight"
                )
    fit: dict[str, list[_Segment]] = {}
    for module, segs in per_module.items():
        kind = _layer_kind(modules[module]) if module in modules else None
        if isinstance(modules.get(module), nn.MultiheadAttention):
            kind = "mha"
        if kind == "embedding":
            exact[module] = EMBEDDING_REASON
            continue
        if kind is None:
            what = type(modules[module]).__name__ if module in modules else "no module"
            skipped[module] = f"a {what}: the fit reads nn.Linear, nn.Conv2d and Hugging Face Conv1D layers"
            continue
        out_axis = _OUT_AXIS[kind]
        segs.sort(key=lambda s: s[0])
        out: list[_Segment] = []
        fused_at, member_at = 0, 0
        for offset, name, g, r in segs:
            rep = _rows_per_neuron(r, g)
            if r.axis != out_axis or rep is None or offset != member_at:
                why = (
                    f"its weight's axis {r.axis} is not the layer's output axis {out_axis}"
                    if r.axis != out_axis
                    else "its output rows are not the group's neurons in order"
                    if rep is None
                    else f"a gap on the output axis before offset {offset} (rows from {member_at} belong to no group)"
                )
                skipped[module] = f"group {name!r}: {why} (offset {offset}, pattern {r.factors(g)})"
                break
            gp = plan.groups.get(name)
            shared = int(gp.layout[0]) if gp is not None else 0
            if shared > 0:
                out.append(_Segment(name, shared, offset, g.size, fused_at, rep))
            member_at += g.size * rep
            fused_at += (gp.slots if gp is not None else g.size) * rep
        else:
            if out:
                fit[module] = out
    return fit, skipped, exact


def _weight_rows(prod: nn.Module, rows: Tensor) -> Tensor:
    """The weights of output rows ``rows`` as a (rows, p) matrix (p: the design columns of :func:`_solve`)."""
    w = prod.weight.detach()
    if _layer_kind(prod) == "conv1d":
        return w[:, rows].T
    return w[rows].reshape(rows.numel(), -1)


def _write_rows(prod: nn.Module, rows: Tensor, w: Tensor) -> None:
    """Write (rows, p) weights ``w`` back into the output rows ``rows`` of ``prod``'s weight (in place)."""
    with torch.no_grad():
        if _layer_kind(prod) == "conv1d":
            prod.weight[:, rows] = w.T.to(prod.weight.dtype)
        else:
            prod.weight[rows] = w.reshape(prod.weight[rows].shape).to(prod.weight.dtype)


def _fold(prod: nn.Module, bn: nn.Module | None, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The producer's output rows ``rows`` as (out, p) weights and (out,) bias, the BatchNorm after it folded in,
    float64 (a Hugging Face ``Conv1D``'s weight is (in, out): its columns, transposed)."""
    w = _weight_rows(prod, rows).double()
    b = prod.bias.detach()[rows].double() if prod.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = torch.rsqrt(bn.running_var[rows].double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach()[rows].double()
        shift = bn.bias.detach()[rows].double() if bn.bias is not None else 0.0
        b = (b - bn.running_mean[rows].double()) * scale + shift
        w = w * scale[:, None]
    return w, b


def _site(prod: nn.Module) -> dict[str, Any]:
    """The least-squares site of a fitted layer (:func:`pyfusion.fuse.interp.ls_statistics`'s kind / shape / conv)."""
    kind = _layer_kind(prod)
    if kind in ("linear", "conv1d"):
        shape = prod.weight.shape if kind == "linear" else prod.weight.shape[::-1]  # Conv1D: W^T is the Linear's
        return {"kind": "linear", "weight_shape": (int(shape[0]), int(shape[1])), "conv": None}
    return {
        "kind": "conv2d",
        "weight_shape": (prod.out_channels, prod.in_channels, *prod.kernel_size),
        "conv": (prod.stride, prod.padding, prod.dilation),
    }


def _solve(
    site: dict[str, Any],
    u: Tensor,
    t: Tensor,
    w0: Tensor,
    b0: Tensor,
    bias: bool,
    ridge: float,
    masks: tuple[Tensor, Tensor] | None = None,
):
    """(W (s, p), b (s,) or None, relative ridge used): ``(G + r I)^{-1} (X^T T + r W0)`` at ``site`` (:func:`_site`).

    ``masks``: (member masks of the s rows, of the p design columns): each row is fitted on the columns whose mask
    intersects its own only (K >= 3: a shared slot of a member subset reads no other member's branch inputs, so its
    weight blocks there stay exactly zero, as the execution modules require); the bias column is always free.
    """
    if site["kind"] == "linear" and u.dim() > 2:  # tokens are samples (the targets are (N * T, s) already)
        u = u.reshape(-1, u.shape[-1])
    g, cs, _ = ls_statistics(site["kind"], site["weight_shape"], u, [t], bias=bias, conv=site["conv"],
                             dtype=torch.float64)  # fmt: skip
    prior = torch.cat([w0.T, b0[None]], 0) if bias else w0.T  # (p [+1], s)
    p = g.shape[0]
    if masks is None:
        row_sets = [(torch.arange(prior.shape[1]), torch.arange(p))]
    else:
        row_mask, col_mask = masks
        free = torch.ones(p - col_mask.numel(), dtype=torch.bool)  # the bias column
        row_sets = []
        for m in torch.unique(row_mask).tolist():
            cols = torch.cat([(col_mask & int(m)) != 0, free]).nonzero().flatten()
            row_sets.append(((row_mask == m).nonzero().flatten(), cols))
    sol = torch.zeros_like(prior)
    rel_used = float(ridge)
    for rows, cols in row_sets:
        gs, rhs0, pr = g[cols][:, cols], cs[0][cols][:, rows], prior[cols][:, rows]
        # the prior form of solve_ls, W0 + (G + rI)^-1 (C - G W0) = (G + rI)^-1 (C + r W0), stays exact when it has
        # to grow r (G + rI singular), with r relative to this block's own diagonal
        (part,), rel = solve_ls(gs, [rhs0], float(ridge), priors=[pr])
        sol[cols.unsqueeze(1), rows.unsqueeze(0)] = part
        rel_used = max(rel_used, rel)
    w = sol[:-1].T if bias else sol.T
    b = sol[-1] if bias else None
    return w, b, rel_used


def _masks(fused: nn.Module, path: str, k_all: int, rows: Tensor, prod: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(member mask per fitted row, per design column) of the layer at ``path`` from the builder's member-mask
    segments, or None when every block is allowed (K = 2 shared rows, or no record)."""
    from pyfusion.fuse.fast import module_segments

    segs = module_segments(fused, getattr(fused, "fusion_module_layouts", None) or {}, path, k_all)
    if segs is None:
        return None
    ins, outs = segs
    row_mask, col_mask = _expand(outs)[rows], _expand(ins)
    if isinstance(prod, nn.Conv2d):  # design columns: (channel, kh, kw), channel-major (unfold order)
        col_mask = col_mask.repeat_interleave(int(prod.kernel_size[0]) * int(prod.kernel_size[1]))
    return _restricted(row_mask, col_mask)


def _expand(segments: Any) -> Tensor:
    """A member mask per row of ``((rows, mask), ...)`` segments."""
    return torch.cat([torch.full((int(n),), int(m), dtype=torch.int64) for n, m in segments])


def _restricted(row_mask: Tensor, col_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """The masks, or None when every (row, column) block is allowed."""
    if bool(((row_mask.unsqueeze(1) & col_mask.unsqueeze(0)) != 0).all()):
        return None
    return row_mask, col_mask


def _mha_masks(fused: nn.Module, path: str, k_all: int, rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """As :func:`_masks` for rows ``rows`` of the in_proj_weight of the nn.MultiheadAttention at ``path`` (its
    columns: the stream it reads)."""
    from pyfusion.fuse.fast import mha_segments

    segs = mha_segments(fused, getattr(fused, "fusion_module_layouts", None) or {}, path, k_all)
    if segs is None:
        return None
    return _restricted(_expand(segs[1])[rows], _expand(segs[0]))


def _segment_target(a_map: Tensor, a: Tensor, sg: _Segment) -> Tensor:
    """``A_k[:shared] a_k`` on one segment: ``a`` (N, out, ...) member k's outputs, ``a_map`` (slots, n) the group's
    map; each of a neuron's ``rep`` consecutive rows takes its map entry (``A kron I_rep``). Returns
    (N, shared * rep, ...)."""
    seg = a[:, sg.member_offset : sg.member_offset + sg.n * sg.rep]
    seg = seg.reshape(seg.shape[0], sg.n, sg.rep, *seg.shape[2:])
    t = torch.einsum("cj,njr...->ncr...", a_map[: sg.shared].to(seg.dtype), seg)
    return t.reshape(t.shape[0], sg.shared * sg.rep, *t.shape[3:])


def fit_shared_slots(
    fused: nn.Module,
    members: Sequence[nn.Module],
    graph: FusionGraph,
    plan: Plan,
    data: Any,
    *,
    ridge: float = 1e-2,
    max_samples: int | None = 2048,
    fit_output: bool = True,
    output_target: str = "logits",
) -> dict[str, Any]:
    """Fit (in place) the shared slots of a dense built partial fusion ``fused`` (module docstring).

    Args:
        fused: ``build(members, graph, plan)`` (dense layers: before the fast-module swap).
        members: the K members.
        graph, plan: the neuron groups and the partial-fusion plan ``fused`` was built from.
        data: calibration batches.
        ridge: relative ridge towards the averaged weights.
        max_samples: calibration samples used.
        fit_output: also fit the output layer to the ensemble's outputs.
        output_target: "logits" or "probs" (see :class:`PartialFitConfig`).

    Returns:
        ``{"fitted": {path: rows}, "skipped": {path: reason}, "exact": {path: reason}, "ridge": {path: relative
        ridge used}, "samples": N}``: "skipped" are producers left averaged that the fit cannot read; "exact" are
        producers left averaged because their averaged weights already are the fit's solution (embedding tables).
    """
    x = _inputs(data, max_samples)
    order, calls, bn_of = _call_structure(fused, x)
    mods = dict(fused.named_modules())
    targets, skipped, exact = _fit_targets(graph, plan, mods)
    consumer_only = set()
    if fit_output:
        produced = {r.module for g in graph.groups.values() for r in g.refs if r.role == "producer"}
        consumed = {r.module for g in graph.groups.values() for r in g.refs if r.role == "consumer"}
        consumer_only = consumed - produced
    fitted: dict[str, int] = {}
    ridges: dict[str, float] = {}
    lam = plan.lambdas
    mhas = {p for p, m in mods.items() if isinstance(m, nn.MultiheadAttention)}
    for p in mhas:  # what the fit cannot read of an nn.MultiheadAttention: its in_proj and its out_proj
        why = mha_unfit_reason(mods[p])
        out_p = f"{p}.out_proj"
        if why is not None and (p in targets or p in skipped):
            targets.pop(p, None)
            skipped[p] = why
        if why is not None and (out_p in targets or out_p in skipped):
            targets.pop(out_p, None)
            skipped[out_p] = f"the output projection of {p!r} (which reads its weight directly): {why}"
    for path in order:
        if path in mhas:
            out_path = f"{path}.out_proj"
            if path not in targets and out_path not in targets:
                continue
            if calls[path] != 1:
                for q in (path, out_path):
                    if q in targets:
                        skipped[q] = f"called {calls[path]} times per forward pass" + (
                            f" (as the output projection of {path!r})" if q == out_path else ""
                        )
                continue
            got = _fit_mha(fused, members, plan, x, path, targets.get(path), targets.get(out_path), ridge)
            for q, (n_rows, rel) in got.items():
                fitted[q], ridges[q] = n_rows, rel
            continue
        output_layer = path in consumer_only
        if path not in targets and not output_layer:
            continue
        prod = mods[path]
        if calls[path] != 1:
            skipped[path] = f"called {calls[path]} times per forward pass"
            continue
        if isinstance(prod, nn.Conv2d) and (prod.groups != 1 or isinstance(prod.padding, str)
                                            or prod.padding_mode != "zeros"):  # fmt: skip
            skipped[path] = "a grouped / non-zero-padded convolution"
            continue
        bn_path = bn_of.get(path)
        bn = mods[bn_path] if bn_path is not None else None
        segments = None if output_layer else targets[path]
        if segments is None:
            rows = torch.arange(prod.weight.shape[_OUT_AXIS[_layer_kind(prod) or "linear"]])
            bn = None  # the logits themselves
        else:
            rows = torch.cat([torch.arange(sg.fused_offset, sg.fused_offset + sg.shared * sg.rep) for sg in segments])
        # targets: T = sum_k A_k[:shared] a_k per segment (or sum_k lambda_k z_k), the members' outputs at the point
        point = bn_path if bn is not None else path
        t = None
        probs = output_layer and output_target == "probs"
        for k, m in enumerate(members):
            a = _run(m, x, {point: m.get_submodule(point)}, pre=False)[point].double()
            if _layer_kind(prod) != "conv2d":  # neurons on the last dim; every other dim (tokens) holds samples
                a = a.reshape(-1, a.shape[-1])
            if probs:
                if a.dim() != 2:
                    raise ValueError(f"output_target='probs' needs (N, C) outputs at {path!r}; got {tuple(a.shape)}")
                a = torch.softmax(a, 1)
            if segments is None:
                part = lam[k] * a
            else:
                part = torch.cat([_segment_target(plan.groups[sg.group].A[k], a, sg) for sg in segments], 1)
            t = part if t is None else t + part
        assert t is not None
        if probs:
            t = torch.log(t).clamp_min(_LOG_FLOOR)
        u = _run(fused, x, {path: prod}, pre=True)[path].double()
        w0, b0 = _fold(prod, bn, rows)
        bias = prod.bias is not None or bn is not None
        w, b, rel = _solve(_site(prod), u, t, w0, b0, bias, ridge, _masks(fused, path, len(members), rows, prod))
        _write_rows(prod, rows, w)
        with torch.no_grad():
            if bn is None:
                if b is not None and prod.bias is not None:
                    prod.bias[rows] = b.to(prod.bias.dtype)
            else:
                if prod.bias is not None:
                    prod.bias[rows] = 0.0
                bn.running_mean[rows] = 0.0
                bn.running_var[rows] = 1.0
                if bn.weight is not None:
                    bn.weight[rows] = math.sqrt(1.0 + bn.eps)
                if bn.bias is not None:
                    bn.bias[rows] = b.to(bn.bias.dtype)
                elif b is not None and prod.bias is not None:
                    prod.bias[rows] = b.to(prod.bias.dtype)
        fitted[path] = int(rows.numel())
        ridges[path] = rel
    for path in targets.keys() - calls.keys() - fitted.keys() - skipped.keys():
        parent = path.rpartition(".")[0]
        if path in mhas:
            skipped[path] = "an nn.MultiheadAttention never called in the forward pass"
        elif parent in mhas:  # an nn.MultiheadAttention's out_proj, its parent never called
            skipped[path] = f"the output projection of {parent!r}, which is never called in the forward pass"
        else:
            skipped[path] = "never called as a module: its parent reads the weight directly (no hook sees its inputs)"
    return {"fitted": fitted, "skipped": skipped, "exact": exact, "ridge": ridges, "samples": int(x.shape[0])}


def _fit_mha(
    fused: nn.Module,
    members: Sequence[nn.Module],
    plan: Plan,
    x: Tensor,
    path: str,
    in_segments: list[_Segment] | None,
    out_segments: list[_Segment] | None,
    ridge: float,
) -> dict[str, tuple[int, float]]:
    """Fit (in place) the shared rows of the in_proj (``in_segments``) and then of the out_proj (``out_segments``)
    of the nn.MultiheadAttention at ``path`` of ``fused`` (module docstring); returns {path: (rows, ridge used)}.

    in_proj: block j (0 q, 1 k, 2 v; rows cut at E and 2E, member and fused) is the linear map of the call's query /
    key / value, so its rows are fitted on the fused module's inputs of that block to ``sum_k A_k[:shared] y_kj``,
    ``y_kj`` member k's block-j output computed from member k's own inputs and in_proj; blocks reading one tensor
    (self-attention: all three) are one solve. out_proj: its inputs are the fused module's attention context,
    recomputed with the just-fitted in_proj (:func:`pyfusion.fuse.mha_fit.attention_context`), its targets
    ``sum_k A_k[:shared] o_k`` with ``o_k`` member k's attention output (its out_proj's output). Positions (tokens)
    are samples; a position whose context or target is not finite (a query whose keys are all masked) is left out
    of the out_proj fit."""
    mha = fused.get_submodule(path)
    k_all = len(members)
    calls_f = capture_calls(fused, x, path, outputs=False)
    calls_m = [capture_calls(m, x, path, outputs=out_segments is not None) for m in members]
    if any(len(c) != len(calls_f) for c in calls_m):
        raise RuntimeError(f"{path}: the members and the fused model call it a different number of times")
    done: dict[str, tuple[int, float]] = {}
    if in_segments:
        e_f = int(mha.in_proj_weight.shape[0]) // 3
        srcs = mha_sources(calls_f[0])
        if any(mha_sources(c) != srcs for c in calls_f):  # the aliasing changed between calls: every block on its own
            srcs = [("query", (0,)), ("key", (1,)), ("value", (2,))]
        n_rows, rel_used = 0, float(ridge)
        for name, blocks in srcs:
            segs: list[tuple[int, _Segment]] = []
            for sg in in_segments:
                j = sg.fused_offset // e_f
                if j in blocks:
                    segs.append((j, sg))
            if not segs:
                continue
            rows = torch.cat([torch.arange(sg.fused_offset, sg.fused_offset + sg.shared * sg.rep) for _, sg in segs])
            t = None
            for k, m in enumerate(members):
                mm = m.get_submodule(path)
                e_m = int(mm.in_proj_weight.shape[0]) // 3
                if any(sg.member_offset // e_m != j for j, sg in segs):
                    raise RuntimeError(f"{path}: an in_proj segment's member rows and fused rows are in other blocks")
                outs = {j: torch.cat([in_proj_outputs(mm, c, j) for c in calls_m[k]]) for j in {j for j, _ in segs}}
                part = torch.cat(
                    [
                        _segment_target(
                            plan.groups[sg.group].A[k], outs[j], replace(sg, member_offset=sg.member_offset - j * e_m)
                        )
                        for j, sg in segs
                    ],
                    1,
                )
                t = part if t is None else t + part
            assert t is not None
            u = torch.cat([c.args[name].reshape(-1, e_f) for c in calls_f]).double()
            w0 = mha.in_proj_weight.detach()[rows].double()
            has_bias = mha.in_proj_bias is not None
            b0 = mha.in_proj_bias.detach()[rows].double() if has_bias else torch.zeros(len(rows), dtype=torch.float64)
            site = {"kind": "linear", "weight_shape": (3 * e_f, e_f), "conv": None}
            w, b, rel = _solve(site, u, t, w0, b0, has_bias, ridge, _mha_masks(fused, path, k_all, rows))
            with torch.no_grad():
                mha.in_proj_weight[rows] = w.to(mha.in_proj_weight.dtype)
                if has_bias and b is not None:
                    mha.in_proj_bias[rows] = b.to(mha.in_proj_bias.dtype)
            n_rows += int(rows.numel())
            rel_used = max(rel_used, rel)
        done[path] = (n_rows, rel_used)
    if out_segments:
        out = mha.out_proj
        e_f = int(out.weight.shape[1])
        with torch.no_grad():
            u = torch.cat([attention_context(mha, **c.args).reshape(-1, e_f) for c in calls_f]).double()
        rows = torch.cat([torch.arange(sg.fused_offset, sg.fused_offset + sg.shared * sg.rep) for sg in out_segments])
        t = None
        for k in range(k_all):
            a = torch.cat([c.out.reshape(-1, c.out.shape[-1]) for c in calls_m[k]]).double()  # type: ignore[union-attr]
            part = torch.cat([_segment_target(plan.groups[sg.group].A[k], a, sg) for sg in out_segments], 1)
            t = part if t is None else t + part
        assert t is not None
        ok = torch.isfinite(u).all(1) & torch.isfinite(t).all(1)
        if not bool(ok.all()):
            u, t = u[ok], t[ok]
        w0, b0 = _fold(out, None, rows)
        bias = out.bias is not None
        out_path = f"{path}.out_proj"
        w, b, rel = _solve(_site(out), u, t, w0, b0, bias, ridge, _masks(fused, out_path, k_all, rows, out))
        _write_rows(out, rows, w)
        if b is not None and bias:
            with torch.no_grad():
                out.bias[rows] = b.to(out.bias.dtype)
        done[out_path] = (int(rows.numel()), rel)
    return done


@register_method(
    "partial_fit",
    config=PartialFitConfig,
    needs_data="yes",
    summary="partial fusion with the shared slots fitted to the members' targets by least squares",
)
def partial_fit(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: PartialFitConfig
) -> nn.Module:
    """Partial fusion (its plan), built, then :func:`fit_shared_slots` (module docstring)."""
    if data is None:
        raise ValueError("method 'partial_fit' needs calibration data: pass data=DataLoader or a list of batches")
    base = PartialConfig(**{f: getattr(config, f) for f in PartialConfig.field_names()})
    plan = get_method("partial").run(members, graph, lambdas, data, base)
    return build_and_fit(members, graph, plan, plan, data, config, "partial_fit")


def build_and_fit(
    members: Sequence[nn.Module], graph: FusionGraph, plan: Plan, fit_plan: Plan, data: Any, config: Any, method: str
) -> nn.Module:
    """Build ``plan`` and fit the slots of ``fit_plan``'s first segments (:func:`fit_shared_slots`, with
    ``config``'s ridge / max_samples / fit_output / output_target); the fused module carries ``plan`` (its info
    gains ``method``, the fit's report and both times) and ``fusion_weights_fitted`` (no BatchNorm reset after)."""
    t0 = time.perf_counter()
    fused = build(members, graph, plan)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit = fit_shared_slots(fused, members, graph, fit_plan, data, ridge=float(config.ridge),
                           max_samples=config.max_samples, fit_output=config.fit_output,
                           output_target=config.output_target)  # fmt: skip
    plan.info.update(method=method, fit=fit, time_build_s=t_build, time_fit_s=time.perf_counter() - t0)
    fused.fusion_plan = plan
    fused.fusion_weights_fitted = True
    return fused
