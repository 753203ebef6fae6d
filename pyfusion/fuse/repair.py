"""REPAIR (Jordan et al., ICLR 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging aligned neurons shrinks their activation variance ("variance collapse"). REPAIR rescales every fused
neuron so that its pre-activation mean and standard deviation on calibration data equal those of the members'
neurons it was built from: ``target_mu = sum_k A_k mu_k`` and ``target_sd = sum_k A_k sd_k`` (A_k from the
plan, rows weighted by lambda; for a permutation plan this is the lambda-weighted mean of the matched neurons).

The correction ``y -> (y - mu_fused) * target_sd / sd_fused + target_mu`` is folded into the last affine map of
the neuron: the BatchNorm / LayerNorm after the producer (weight and bias), or the producer's weight rows and
bias when there is no normalisation. Groups are processed in forward order, so that a group's statistics are
measured after all earlier groups were corrected.
Skipped, listed in the result (``fusion_info["repair"]["skipped"]``: group -> the modules and the reason) and
announced by one :class:`RepairSkippedWarning`: residual streams (several producers add into one value, so no
single affine map owns the sum), groups whose producer has no bias and no normalisation after it (the mean
cannot be moved), normalisations without affine parameters, and groups the plan leaves out. Neurons that are
constant on the data (standard deviation 0) are shifted but not scaled.
Groups with units or segments (attention heads, packed projections: their pre-activations feed the
attention, not a per-neuron activation) are skipped the same way. The correction is applied along each tensor's
axis of the group (``Conv1D`` rows are inputs: its outputs are axis 1).

Cost: one eval pass per member (the targets), then the fused network. When the calibration samples fit as one batch
(:data:`ONE_PASS_BYTES`, estimated from the members' pre-activation sizes before any batch is held), that is one
pass (``fusion_info["repair"]["passes"] == 1``): all samples run as one batch in eval mode, and a forward hook on
each corrected group's module (the normalisation, or the producer) measures the group's statistics on its output,
folds the correction into the module's weight and bias and hands on the module's output recomputed with the folded
weights, so every later group is measured after the earlier ones were corrected. Eval-mode layers treat each sample
(row of dim 0) alone, so this is the pass per group side by side; the output is fed to the statistics in the
calibration batches' pieces, in their order, so the statistics are those of the per-group passes (the same float64
accumulation of the same batches), up to the rounding of the forward on a larger batch (none measured: MLP, VGG + BN
and ResNet-20 pairs, float32 and float64, gave bit-identical weights on CPU). Recomputing costs the corrected
modules once more (a BatchNorm / LayerNorm: elementwise; a producer without normalisation: its layer twice), and
keeps the forward exactly that of the folded weights (``y * scale + shift`` on the output differs from it by a
rounding, 1e-6 relative in the later float32 weights). Otherwise one full pass per corrected group (``passes`` = the
number of corrected groups; ``one_pass_refused`` says why): with several processes (torch.distributed), batches of
different shapes or non-tensor inputs, a module with ``batch_first=False`` (the batches are joined along dim 0,
which must be the samples), a group measured at a point that is not its module's output (a traced capture of part of
a tensor), modules shared by several groups, a module that runs more than once per forward or out of the groups'
order (found during the pass: the weights are restored and the per-group passes run), or more than
:data:`ONE_PASS_BYTES`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pyfusion.fuse.bn import concat_batches, sequence_first_module
from pyfusion.fuse.builder import fused_groups
from pyfusion.fuse.plan import Plan
from pyfusion.graph.groups import AxisRef, FusionGraph
from pyfusion.stats.collect import as_samples, batch_inputs
from pyfusion.stats.distributed import current_group
from pyfusion.stats.groups import group_points, group_statistics

if TYPE_CHECKING:
    from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["ONE_PASS_BYTES", "RepairSkippedWarning", "repair", "repair_targets"]

# all calibration samples run as one batch (one pass of the fused network for every group) when the largest corrected
# pre-activation of all samples, times 4 (the output, the corrected output, the samples view and a temporary live at
# once), fits in this many bytes; else one pass per group (the budget of pyfusion.fuse.bn.ONE_PASS_BYTES)
ONE_PASS_BYTES = 1 << 30


class RepairSkippedWarning(UserWarning):
    """REPAIR left some groups uncorrected (the message and ``fusion_info["repair"]["skipped"]`` say which
    modules and why)."""


def _member_statistics(
    members: Sequence[nn.Module], graph: FusionGraph, data: Iterable[Any], max_batches: int | None
) -> dict[str, ActivationStats]:
    """The members' pre-activation means and variances per group (block k = member k)."""
    return group_statistics(members, graph, data, point="pre", max_batches=max_batches, pairs="diag", fallback=False)


def _targets_of(
    stats: dict[str, ActivationStats], graph: FusionGraph, plan: Plan, num_members: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """group -> (target mean, target std) per slot: ``sum_k A_k mu_k`` and ``sum_k A_k sd_k``."""
    out = {}
    for name in graph.groups:
        gp = plan.groups.get(name)
        if gp is None:
            continue
        st = stats[name]
        mu = sum(gp.A[k] @ st.mean(k) for k in range(num_members))
        sd = sum(gp.A[k] @ st.var(k).sqrt() for k in range(num_members))
        out[name] = (mu, sd)
    return out


def repair_targets(
    members: list[nn.Module], graph: FusionGraph, plan: Plan, data: Iterable[Any], *, max_batches: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """group -> (target mean, target std) per slot, from the members' pre-activation statistics and the plan."""
    return _targets_of(_member_statistics(members, graph, data, max_batches), graph, plan, len(members))


@dataclass
class _Correction:
    """A group to correct: its name in the graph and in the fused model's graph, the module whose weight and bias
    take the correction, and those two parameters' references (neuron axis, copies per neuron)."""

    name: str
    fused_name: str
    path: str
    owner: nn.Module
    weight: AxisRef
    bias: AxisRef


def _scale_shift(
    stats: ActivationStats, target: tuple[Tensor, Tensor], eps: float
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The correction ``y -> y * scale + shift`` (both (slots,), float64) that moves the fused neurons' mean and
    std (``stats``, block 0) to ``target``: ``scale = t_sd / sd_f``, ``shift = t_mu - mu_f * scale``; a neuron with
    ``sd_f <= eps`` is only shifted (``scale = 1``)."""
    f_mu, f_sd = stats.mean(0), stats.var(0).sqrt()
    t_mu, t_sd = target
    live = f_sd > eps
    scale = torch.where(live, t_sd / f_sd.clamp_min(eps), torch.ones_like(f_sd))
    shift = torch.where(live, t_mu - f_mu * scale, t_mu - f_mu)
    return scale, shift


def _fold(c: _Correction, scale: Tensor, shift: Tensor) -> None:
    """Fold ``y -> y * scale + shift`` into the owner's weight (rows along the neuron axis times scale) and bias."""
    with torch.no_grad():
        w, b = c.owner.weight, c.owner.bias
        rw, rb = c.weight, c.bias
        sw = scale.to(w.dtype).repeat_interleave(rw.expand)
        w.mul_(sw.view([-1 if i == rw.axis else 1 for i in range(w.ndim)]))
        b.mul_(scale.to(b.dtype).repeat_interleave(rb.expand)).add_(shift.to(b.dtype).repeat_interleave(rb.expand))


def repair(
    fused: nn.Module,
    members: list[nn.Module],
    graph: FusionGraph,
    plan: Plan | None,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    eps: float = 1e-8,
) -> dict[str, Any]:
    """Apply REPAIR to ``fused`` in place.

    Args:
        fused: the fused network (built from ``plan``; BatchNorm statistics already reset).
        members: the K members (not modified).
        graph: neuron groups of the architecture.
        plan: the plan the fused network was built from.
        data: calibration batches (read once per member, then once, or once per corrected group: module docstring).
        max_batches: per pass.
        eps: a fused neuron whose standard deviation is below ``eps`` is not rescaled.

    Returns:
        ``{"repaired": [group, ...], "skipped": {group: {"modules": [module path, ...], "reason": str}},
        "passes": forward passes of the fused network}``, and ``"one_pass_refused": why`` when the corrected groups
        took a pass each; when something is skipped a :class:`RepairSkippedWarning` lists the same.
    """
    if plan is None:
        raise ValueError("repair needs the fusion plan (the method returned no plan)")
    members = list(members)
    member_stats = _member_statistics(members, graph, data, max_batches)
    targets = _targets_of(member_stats, graph, plan, len(members))
    # the fused model's statistics: its own traced graph when fusion changed widths (the members' exported program
    # has their shapes baked in), each member group paired with the fused group at the same place
    fused_graph, fused_name = graph, {name: name for name in graph.groups}
    widened = any(gp.slots != graph.groups[name].size for name, gp in plan.groups.items() if name in graph.groups)
    if widened and graph.traced is not None:
        fused_graph, pairs = fused_groups(fused, graph)
        by_id = {id(g): n for n, g in fused_graph.groups.items()}
        fused_name = {name: by_id[id(ng)] for name, ng in pairs.items() if ng is not None}
    todo: list[_Correction] = []
    skipped: dict[str, dict[str, Any]] = {}
    for name, g in graph.groups.items():
        producers = sorted({r.module for r in g.producers})
        norms = sorted({r.module for r in g.per_neuron})
        if name not in targets:
            skipped[name] = {"modules": producers, "reason": "not in the plan (averaged, nothing to match)"}
            continue
        if not g.is_simple:
            skipped[name] = {
                "modules": producers,
                "reason": "units / segments (attention heads, packed projections feed the attention, not a neuron)",
            }
            continue
        if len(producers) != 1 or len(norms) > 1:
            skipped[name] = {
                "modules": producers + norms,
                "reason": "residual stream: several producers add into it, no single affine map owns the sum",
            }
            continue
        path = norms[0] if norms else producers[0]
        own = {r.param: r for r in (g.per_neuron if norms else g.producers) if r.module == path}
        owner = fused.get_submodule(path)
        if (
            getattr(owner, "weight", None) is None
            or getattr(owner, "bias", None) is None
            or "weight" not in own
            or "bias" not in own
        ):
            kind = type(owner).__name__
            if norms:
                why = f"{kind} without affine weight and bias: nothing to fold the correction into"
            else:
                why = f"{kind} without bias and no BatchNorm / LayerNorm after it: the mean cannot be moved"
            skipped[name] = {"modules": [path], "reason": why}
            continue
        if name not in fused_name:
            skipped[name] = {"modules": producers, "reason": "no group at its place in the re-traced fused model"}
            continue
        todo.append(_Correction(name, fused_name[name], path, owner, own["weight"], own["bias"]))
    passes, refused = 0, None
    if todo:
        refused = _one_pass_refusal(fused, todo, fused_graph, member_stats, targets)
        batches: list[Any] = []
        whole = None
        if refused is None:  # the same batches as every pass of group_statistics
            batches = [batch_inputs(b) for b in (data if max_batches is None else islice(data, max_batches))]
            whole = concat_batches(batches)
            if whole is None:
                refused = "the calibration inputs are not tensors of one shape, dtype and device"
        if whole is not None:
            passes = 1
            refused = _repair_in_one_pass(fused, todo, whole, [int(x.shape[0]) for x in batches], targets, eps)
        if refused is not None:
            for c in todo:
                st = group_statistics(
                    [fused],
                    fused_graph,
                    data,
                    point="pre",
                    groups=[c.fused_name],
                    max_batches=max_batches,
                    pairs="diag",
                    fallback=False,
                )[c.fused_name]
                _fold(c, *_scale_shift(st, targets[c.name], eps))
                passes += 1
    done = [c.name for c in todo]
    if skipped:
        listed = "; ".join(f"{name} ({', '.join(v['modules'])}): {v['reason']}" for name, v in skipped.items())
        warnings.warn(
            f"REPAIR corrected {len(done)} of {len(graph.groups)} neuron groups and skipped {len(skipped)}: {listed}",
            RepairSkippedWarning,
            stacklevel=2,
        )
    info: dict[str, Any] = {"repaired": done, "skipped": skipped, "passes": passes}
    if refused is not None:
        info["one_pass_refused"] = refused
    return info


def _one_pass_refusal(
    fused: nn.Module, todo: Sequence[_Correction], fused_graph: FusionGraph,
    member_stats: dict[str, ActivationStats], targets: dict[str, tuple[Tensor, Tensor]],
) -> str | None:  # fmt: skip
    """Why the groups cannot be corrected in one pass of all samples (module docstring), known before any batch is
    held; None when they can."""
    if current_group() is not None:  # every rank runs its own batches; the statistics are all-reduced per group
        return "several processes (torch.distributed)"
    # batches are joined along dim 0, which must hold independent samples
    seq_first = sequence_first_module(fused)
    if seq_first is not None:
        return f"{seq_first or type(fused).__name__} has batch_first=False: dim 0 of the inputs is not the samples"
    points = group_points(fused_graph, "pre")
    owners: set[str] = set()
    tensors: set[int] = set()
    largest = 0
    for c in todo:
        nodes, paths = points[c.fused_name]
        whole_node = fused_graph.traced is None or (len(nodes) == 1 and isinstance(nodes[0], str))
        if paths != [c.path] or not whole_node:
            return f"group {c.name} is not measured at the output of {c.path} alone"
        if c.weight.expand != 1 or c.bias.expand != 1:
            return f"group {c.name}: {c.path}'s parameters hold several entries per neuron"
        ids = {id(c.owner.weight), id(c.owner.bias)}
        if c.path in owners or ids & tensors:
            return f"{c.path} (or its parameters) belongs to several groups"
        owners.add(c.path)
        tensors |= ids
        # the members' sample rows (every batch, every position) times the fused slots: the whole pre-activation
        rows, slots = member_stats[c.name].count, int(targets[c.name][0].numel())
        largest = max(largest, rows * slots * max(c.owner.weight.element_size(), 4))
    if 4 * largest > ONE_PASS_BYTES:
        return f"the largest pre-activation of all samples takes {largest} bytes (ONE_PASS_BYTES = {ONE_PASS_BYTES})"
    return None


class _Refused(Exception):
    """The one pass met what the per-group passes handle differently (a module twice, out of order, ...)."""


def _repair_in_one_pass(
    fused: nn.Module, todo: Sequence[_Correction], x: Tensor, sizes: list[int],
    targets: dict[str, tuple[Tensor, Tensor]], eps: float,
) -> str | None:  # fmt: skip
    """Correct every group of ``todo`` in one eval-mode forward of all calibration samples ``x`` (the batches of
    ``sizes`` samples, concatenated): a forward hook on each group's module measures the group's statistics on its
    output (fed in the batches' pieces, in order, as the per-group passes feed them), folds the correction into the
    module's weight and bias and returns the module's output recomputed with the folded weights (what the
    per-group passes compute, bit for bit), so the modules after it see the corrected values. Returns None, or why
    the per-group passes must run instead (the weights are then restored)."""
    from pyfusion.stats.activation_stats import ActivationStats  # the engine loads on first use

    total = int(x.shape[0])
    state = {"next": 0}  # the index in todo of the group whose module must run next

    def hook(i: int, c: _Correction):
        def fn(_mod: nn.Module, _args: tuple, kwargs: dict, out: Any) -> Tensor:
            if state["next"] != i:
                raise _Refused(f"{c.path} runs more than once per forward or out of the groups' order")
            if not isinstance(out, Tensor) or out.dim() not in (2, 3, 4) or out.shape[0] != total:
                raise _Refused(f"{c.path} does not output one (samples, ...) tensor of all samples")
            axis = 2 if out.dim() == 3 else 1  # the neuron axis of as_samples (what the per-group passes measure)
            y = out.detach()
            if y.shape[axis] != targets[c.name][0].numel():
                raise _Refused(f"{c.path}'s output does not hold the group's neurons along axis {axis}")
            stats = None
            for piece in y.split(sizes):
                samples = as_samples(piece)
                if stats is None:
                    stats = ActivationStats([samples.shape[1]], device=samples.device, pairs="diag")
                stats.update([samples])
            assert stats is not None
            scale, shift = _scale_shift(stats, targets[c.name], eps)
            _fold(c, scale, shift)
            state["next"] = i + 1
            return _mod.forward(*_args, **kwargs)  # (calling forward itself: no hook again)

        return fn

    saved = [(c.owner.weight.detach().clone(), c.owner.bias.detach().clone()) for c in todo]
    modes = {m: m.training for m in fused.modules()}
    handles = []
    refused = None
    try:
        fused.eval()
        for i, c in enumerate(todo):
            handles.append(c.owner.register_forward_hook(hook(i, c), with_kwargs=True))
        with torch.no_grad():
            try:
                fused(x)
            except _Refused as e:
                refused = str(e)
        if refused is None and state["next"] != len(todo):
            refused = f"{todo[state['next']].path} did not run in the forward"
    except BaseException:
        refused = "error"
        raise
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        if refused is not None:
            with torch.no_grad():
                for c, (w, b) in zip(todo, saved):
                    c.owner.weight.copy_(w)
                    c.owner.bias.copy_(b)
    return refused
