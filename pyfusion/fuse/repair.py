"""REPAIR (Jordan et al., ICLR 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging aligned neurons shrinks their activation variance ("variance collapse"). REPAIR rescales every fused
neuron so that its pre-activation mean and standard deviation on calibration data equal those of the members'
neurons it was built from: ``target_mu = sum_k A_k mu_k`` and ``target_sd = sum_k A_k sd_k`` (A_k from the
plan, rows weighted by lambda; for a permutation plan this is the lambda-weighted mean of the matched neurons).

The correction ``y -> (y - mu_fused) * target_sd / sd_fused + target_mu`` is folded into the last affine map of
the neuron: the BatchNorm / LayerNorm after the producer (weight and bias), or the producer's weight rows and
bias when there is no normalisation. Groups are processed in forward order, each with its own pass over the
calibration data, so that a group's statistics are measured after all earlier groups were corrected.
Skipped, listed in the result (``fusion_info["repair"]["skipped"]``: group -> the modules and the reason) and
announced by one :class:`RepairSkippedWarning`: residual streams (several producers add into one value, so no
single affine map owns the sum), groups whose producer has no bias and no normalisation after it (the mean
cannot be moved), normalisations without affine parameters, and groups the plan leaves out. Neurons that are
constant on the data (standard deviation 0) are shifted but not scaled.
Groups with units or segments (attention heads, packed projections: their pre-activations feed the
attention, not a per-neuron activation) are skipped the same way. The correction is applied along each tensor's
axis of the group (``Conv1D`` rows are inputs: its outputs are axis 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pyfusion.fuse.builder import fused_groups
from pyfusion.fuse.plan import Plan
from pyfusion.graph.groups import FusionGraph
from pyfusion.stats.groups import group_statistics

__all__ = ["RepairSkippedWarning", "repair", "repair_targets"]


class RepairSkippedWarning(UserWarning):
    """REPAIR left some groups uncorrected (the message and ``fusion_info["repair"]["skipped"]`` say which
    modules and why)."""


def repair_targets(
    members: list[nn.Module], graph: FusionGraph, plan: Plan, data: Iterable[Any], *, max_batches: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """group -> (target mean, target std) per slot, from the members' pre-activation statistics and the plan."""
    stats = group_statistics(members, graph, data, point="pre", max_batches=max_batches, pairs="diag", fallback=False)
    out = {}
    for name in graph.groups:
        gp = plan.groups.get(name)
        if gp is None:
            continue
        st = stats[name]
        mu = sum(gp.A[k] @ st.mean(k) for k in range(len(members)))
        sd = sum(gp.A[k] @ st.var(k).sqrt() for k in range(len(members)))
        out[name] = (mu, sd)
    return out


def repair(
    fused: nn.Module,
    members: list[nn.Module],
    graph: FusionGraph,
    plan: Plan | None,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    eps: float = 1e-8,
) -> dict[str, list[str]]:
    """Apply REPAIR to ``fused`` in place.

    Args:
        fused: the fused network (built from ``plan``; BatchNorm statistics already reset).
        members: the K members (not modified).
        graph: neuron groups of the architecture.
        plan: the plan the fused network was built from.
        data: calibration batches.
        max_batches: per pass.
        eps: a fused neuron whose standard deviation is below ``eps`` is not rescaled.

    Returns:
        ``{"repaired": [group, ...], "skipped": {group: {"modules": [module path, ...], "reason": str}}}``; when
        something is skipped a :class:`RepairSkippedWarning` lists the same.
    """
    if plan is None:
        raise ValueError("repair needs the fusion plan (the method returned no plan)")
    targets = repair_targets(list(members), graph, plan, data, max_batches=max_batches)
    # the fused model's statistics: its own traced graph when fusion changed widths (the members' exported program
    # has their shapes baked in), each member group paired with the fused group at the same place
    fused_graph, fused_name = graph, {name: name for name in graph.groups}
    widened = any(gp.slots != graph.groups[name].size for name, gp in plan.groups.items() if name in graph.groups)
    if widened and graph.traced is not None:
        fused_graph, pairs = fused_groups(fused, graph)
        by_id = {id(g): n for n, g in fused_graph.groups.items()}
        fused_name = {name: by_id[id(ng)] for name, ng in pairs.items() if ng is not None}
    done: list[str] = []
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
        fname = fused_name[name]
        st = group_statistics(
            [fused],
            fused_graph,
            data,
            point="pre",
            groups=[fname],
            max_batches=max_batches,
            pairs="diag",
            fallback=False,
        )[fname]
        f_mu, f_sd = st.mean(0), st.var(0).sqrt()
        t_mu, t_sd = targets[name]
        live = f_sd > eps
        scale = torch.where(live, t_sd / f_sd.clamp_min(eps), torch.ones_like(f_sd))
        shift = torch.where(live, t_mu - f_mu * scale, t_mu - f_mu)
        with torch.no_grad():
            w, b = owner.weight, owner.bias
            rw, rb = own["weight"], own["bias"]
            sw = scale.to(w.dtype).repeat_interleave(rw.expand)
            w.mul_(sw.view([-1 if i == rw.axis else 1 for i in range(w.ndim)]))
            b.mul_(scale.to(b.dtype).repeat_interleave(rb.expand)).add_(shift.to(b.dtype).repeat_interleave(rb.expand))
        done.append(name)
    if skipped:
        listed = "; ".join(f"{name} ({', '.join(v['modules'])}): {v['reason']}" for name, v in skipped.items())
        warnings.warn(
            f"REPAIR corrected {len(done)} of {len(graph.groups)} neuron groups and skipped {len(skipped)}: {listed}",
            RepairSkippedWarning,
            stacklevel=2,
        )
    return {"repaired": done, "skipped": skipped}
