"""The driver shared by ``method="hf"``, ``"kf"`` and ``"kf_gradient"``: level by level, group, fit, train.

See the package docstring (:mod:`pyfusion.fuse.interp`) for the methods. The options are one config per method
(:class:`~pyfusion.fuse.config.HFConfig`, :class:`~pyfusion.fuse.config.KFConfig`,
:class:`~pyfusion.fuse.config.KFGradientConfig`, fields in :class:`~pyfusion.fuse.config.InterpConfig`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.fuse.config import HFConfig, InterpConfig, KFConfig, KFGradientConfig
from pyfusion.fuse.interp.fitting import fit_level, maps_from_labels, mix_targets, set_linear, solve_ls
from pyfusion.fuse.interp.levels import Level, interp_levels, run_chunked
from pyfusion.fuse.interp.statistics import activation_gram, check_producer, ls_statistics
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.match import linear_assignment, weighted_kmeans
from pyfusion.match.importance import neuron_importance
from pyfusion.match.interp import hf_pair_cost, slot_alignment_cost

__all__ = ["fuse_hf", "fuse_interp", "fuse_kf", "fuse_kf_gradient"]

_METHODS = ((HFConfig, "hf"), (KFConfig, "kf"), (KFGradientConfig, "kf_gradient"))


def _method_of(config: InterpConfig) -> str:
    for cls, name in _METHODS:
        if isinstance(config, cls):
            return name
    raise ValueError(
        f"config must be an HFConfig, KFConfig or KFGradientConfig (it names the method); got {type(config).__name__}"
    )


def _calibration(data: Iterable[Any], max_samples: int | None) -> tuple[Tensor, Tensor | None]:
    """All calibration inputs (N, ...) and labels (N,) (None unless every batch has them), held in memory."""
    xs, ys = [], []
    for batch in data:
        if isinstance(batch, (tuple, list)):
            xs.append(batch[0])
            ys.append(batch[1] if len(batch) > 1 else None)
        else:
            xs.append(batch)
            ys.append(None)
    x = torch.cat(xs)
    y = None if any(v is None for v in ys) else torch.cat(ys)
    if max_samples is not None:
        x = x[:max_samples]
        y = None if y is None else y[:max_samples]
    if x.shape[0] == 0:
        raise ValueError("data is empty: the calibration data yielded no sample")
    return x, y


def _importance(
    members: Sequence[nn.Module], x: Tensor, y: Tensor | None, levels: list[Level], method: str, n_steps: int
) -> list[dict[str, Tensor]]:
    points = [lv.out_point for lv in levels if not lv.last]
    if method == "uniform":
        return [{} for _ in members]
    data = [(x[s : s + 256], None if y is None else y[s : s + 256]) for s in range(0, x.shape[0], 256)]
    if y is None:
        data = [(b[0],) for b in data]
    return [neuron_importance(m, data, points, method=method, n_steps=n_steps) for m in members]


def _check_levels(members: Sequence[nn.Module], levels: list[Level], method: str) -> None:
    """What the config cannot check: closed-form methods need Linear / Conv2d levels, producers must be supported."""
    if method != "kf_gradient":
        for lv in levels:
            if lv.kind != "linear":
                raise ValueError(
                    f"method {method!r} fits Linear/Conv2d chains in closed form; level {lv.name!r} is a residual "
                    "block (use method='kf_gradient' for ResNets)"
                )
    mods0 = dict(members[0].named_modules())
    for lv in levels:
        if lv.producer is not None:
            check_producer(lv.producer, mods0[lv.producer])


def _class_weights(config: InterpConfig, k_members: int) -> Tensor | None:
    """The class weights as float64 (K, C) (the config checked they are a finite non-negative 2-D array)."""
    if config.class_weights is None:
        return None
    cw = torch.as_tensor(config.class_weights, dtype=torch.float64)
    if cw.shape[0] != k_members:
        raise ValueError(f"class_weights must be a non-negative finite ({k_members}, C) array; got {tuple(cw.shape)}")
    return cw


def _closed_form_level(
    fused: nn.Module,
    lv: Level,
    li: int,
    fused_in: Tensor,
    outs: list[Tensor],
    w: list[Tensor],
    method: str,
    config: InterpConfig,
    info: dict[str, Any],
    times: dict[str, float],
) -> tuple[list[Tensor], list[Tensor]]:
    """HF / KF on a Linear / Conv2d level: LS weights of every member neuron from the fused inputs, the grouping
    (HF pairs, KF clusters, or class c with class c at the logits), the fused weights written into ``fused``."""
    k_members, n = len(outs), outs[0].shape[1]
    prod = dict(fused.named_modules())[lv.producer]
    t1 = time.perf_counter()
    u = run_chunked(fused, lv.pre, fused_in) if lv.pre else fused_in
    g, cs, ns = ls_statistics(prod, u, outs, dtype=config.stats_torch_dtype)
    times["stats_s"] += time.perf_counter() - t1
    t1 = time.perf_counter()
    ws, rel = solve_ls(g, cs, config.ridge)
    times["solve_s"] += time.perf_counter() - t1
    info["ridge"] = rel
    t1 = time.perf_counter()
    if lv.last:
        labels = torch.arange(n).repeat(k_members)
    elif method == "hf":
        c = hf_pair_cost(g, cs, ns, ws, w[0], w[1], config.cost)
        rows, cols = linear_assignment(c, dtype="float64")
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        lab1 = torch.empty(n, dtype=torch.long)
        lab1[cols] = rows
        labels = torch.cat([torch.arange(n), lab1])
        info["cost"] = float(c[rows, cols].sum())
    else:
        wcat = torch.cat(ws, 1)
        gk = wcat.T @ g @ wcat
        res = weighted_kmeans(
            gram=0.5 * (gk + gk.T), weights=torch.cat(w), num_clusters=n, n_restarts=config.n_restarts,
            init=config.init, seed=config.seed + li,
        )  # fmt: skip
        labels = torch.as_tensor(res.labels)
        info["inertia"] = res.inertia
    maps_a, maps_b = maps_from_labels(labels, w, n)
    wf = sum(ws[k] @ maps_a[k].T for k in range(k_members))
    times["group_s"] += time.perf_counter() - t1
    set_linear(fused, lv, wf)
    return maps_a, maps_b


def _activation_grouping(
    lv: Level, li: int, outs: list[Tensor], w: list[Tensor], config: InterpConfig, info: dict[str, Any]
) -> tuple[list[Tensor], list[Tensor]]:
    """Group on the members' activations (k-means of their Gram), slots put in member 0's neuron order (exact
    assignment), so that the level can start from member 0's weights (ResNet blocks, kf_gradient's default)."""
    k_members, n = len(outs), outs[0].shape[1]
    if lv.last:
        labels = torch.arange(n).repeat(k_members)
    else:
        gk = activation_gram(outs)
        res = weighted_kmeans(
            gram=gk, weights=torch.cat(w), num_clusters=n, n_restarts=config.n_restarts, init=config.init,
            seed=config.seed + li,
        )  # fmt: skip
        labels = torch.as_tensor(res.labels)
        info["inertia"] = res.inertia
    maps_a, maps_b = maps_from_labels(labels, w, n)
    if not lv.last:
        c = slot_alignment_cost(maps_a, gk)
        rows, cols = linear_assignment(c, dtype="float64")
        order = torch.empty(n, dtype=torch.long)
        order[torch.as_tensor(cols)] = torch.as_tensor(rows)  # slot i (member-0 neuron i) <- cluster
        maps_a = [a[order] for a in maps_a]
        maps_b = [b[:, order] for b in maps_b]
    return maps_a, maps_b


def _level_target(lv: Level, outs: list[Tensor], maps_a: list[Tensor], lam: Tensor, cw: Tensor | None) -> Tensor:
    """kf_gradient's training target: the slot targets, or at the logits the (class-weighted) lambda mean."""
    if not lv.last:
        return mix_targets(maps_a, outs)
    k_members, n = len(outs), outs[0].shape[1]
    q = lam[:, None].expand(k_members, n).clone()
    if cw is not None:
        if cw.shape[1] != n:
            raise ValueError(f"class_weights must have shape ({k_members}, {n}); got {tuple(cw.shape)}")
        q = lam[:, None] * cw
        q = q / q.sum(0, keepdim=True).clamp_min(1e-300)
    return sum(outs[k] * q[k].to(outs[k].dtype) for k in range(k_members))


def fuse_interp(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Iterable[Any],
    config: InterpConfig,
) -> nn.Module:
    """Neuron-interpolation fusion (see :mod:`pyfusion.fuse.interp`); returns the fused module with ``fusion_plan``.

    Args:
        members: K members (K = 2 for "hf").
        graph: neuron groups of the architecture.
        lambdas: member weights (scale the importance scores and average the logits).
        data: calibration batches ``(x, y)``; labels are the importance targets (else the member's prediction).
        config: an :class:`HFConfig`, :class:`KFConfig` or :class:`KFGradientConfig` (its type names the method).

    Raises:
        ValueError: hf with K != 2, residual blocks for hf / kf, unsupported architectures (named), empty data,
            class weights of the wrong shape.
    """
    method = _method_of(config)
    k_members = len(members)
    if method == "hf" and k_members != 2:
        raise ValueError(f"method 'hf' fuses exactly 2 members (use 'kf' for K > 2); got {k_members}")
    if data is None:
        raise ValueError(f"method {method!r} needs calibration data")
    levels = interp_levels(members[0], graph)
    _check_levels(members, levels, method)
    x, y = _calibration(data, config.max_samples)
    cw = _class_weights(config, k_members)
    lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
    train_opts = {
        "epochs": int(config.epochs),
        "last_epochs": int(config.last_epochs),
        "lr": float(config.lr),
        "optimizer": config.optimizer,
        "batch_size": int(config.batch_size),
        "patience": int(config.patience),
        "val_fraction": float(config.val_fraction),
        "weight_decay": float(config.weight_decay),
    }

    t0 = time.perf_counter()
    scores = _importance(members, x, y, levels, config.importance, config.n_steps)
    times = {"importance_s": time.perf_counter() - t0, "stats_s": 0.0, "solve_s": 0.0, "group_s": 0.0, "train_s": 0.0}
    fused = copy.deepcopy(members[0])
    fused.eval()
    members_eval = [copy.deepcopy(m).eval() for m in members]
    member_in = [x for _ in members]
    fused_in = x
    groups: dict[str, GroupPlan] = {}
    level_info: list[dict[str, Any]] = []
    for li, lv in enumerate(levels):
        info: dict[str, Any] = {"level": lv.name}
        outs = [run_chunked(m, lv.calls, member_in[k]) for k, m in enumerate(members_eval)]
        n = outs[0].shape[1]
        if lv.last:
            w = [lam[k] * torch.ones(n, dtype=torch.float64) for k in range(k_members)]
        elif config.importance == "uniform":
            w = [lam[k] * (torch.full((n,), 1.0 / n, dtype=torch.float64) + 1e-8) for k in range(k_members)]
        else:
            w = [lam[k] * scores[k][lv.out_point] for k in range(k_members)]
        w = [v.clamp_min(1e-12) for v in w]  # lambda_k = 0 members keep a tiny positive weight
        if lv.kind == "linear" and not (method == "kf_gradient" and config.level_init == "member0"):
            maps_a, maps_b = _closed_form_level(fused, lv, li, fused_in, outs, w, method, config, info, times)
        else:
            t1 = time.perf_counter()
            maps_a, maps_b = _activation_grouping(lv, li, outs, w, config, info)
            times["group_s"] += time.perf_counter() - t1
        if lv.group is not None:
            groups[lv.group] = GroupPlan(maps_a, maps_b, (n,) + (0,) * k_members)
        if method == "kf_gradient":
            t1 = time.perf_counter()
            target = _level_target(lv, outs, maps_a, lam, cw)
            info.update(fit_level(fused, lv, fused_in, target.detach(), train_opts, config.seed * 1000 + li))
            times["train_s"] += time.perf_counter() - t1
        fused_in = run_chunked(fused, lv.calls, fused_in)
        member_in = outs
        level_info.append(info)
    plan = Plan(
        tuple(float(v) for v in lambdas),
        groups,
        {"interp_levels": level_info, **{f"time_{k}": v for k, v in times.items()}},
    )
    fused.fusion_plan = plan
    fused.fusion_weights_fitted = True
    for p in fused.parameters():
        p.requires_grad_(True)
    return fused


@register_method(
    "hf",
    config=HFConfig,
    needs_data="yes",
    summary="Hungarian neuron-interpolation fusion of two members (least squares on the fused inputs)",
)
def fuse_hf(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: HFConfig
) -> nn.Module:
    """Hungarian neuron-interpolation fusion of two members (least squares on the fused inputs)."""
    return fuse_interp(members, graph, lambdas, data, config)


@register_method(
    "kf",
    config=KFConfig,
    needs_data="yes",
    summary="K-means neuron-interpolation fusion of K members (weighted k-means over LS predictions)",
)
def fuse_kf(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: KFConfig
) -> nn.Module:
    """K-means neuron-interpolation fusion of K members (weighted k-means over LS predictions)."""
    return fuse_interp(members, graph, lambdas, data, config)


@register_method(
    "kf_gradient",
    config=KFGradientConfig,
    needs_data="yes",
    summary="KF grouping, then every level trained to its targets (neuron interpolation, gradient)",
)
def fuse_kf_gradient(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: KFGradientConfig
) -> nn.Module:
    """KF grouping, then every level trained to its targets (neuron interpolation, gradient)."""
    return fuse_interp(members, graph, lambdas, data, config)
