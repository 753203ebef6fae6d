"""Fitting of neuron-interpolation fusion: least-squares solves, the slot targets of a grouping, the affine path of
a fit, writing fitted weights, and level training (KF-Gradient).

* :func:`solve_ls`: ``W = W0 + (G + r I)^{-1} (C - G W0)`` from the statistics of :mod:`.statistics` (ridge
  toward a prior ``W0``: the aligned average of the members' weights for the fused fits);
* :func:`mix`: the slot targets ``T = sum_k A_k a_k`` along a value's neuron dim, through the groups' segments and
  factor patterns (entries no group owns, such as the logits, take ``sum_k lambda_k a_k``): the same code the
  builder uses on weights (:func:`pyfusion.graph.transform.member_tensor`);
* :func:`chain_coefficients`: a fit's target as an affine function of its sites' outputs and passthroughs, read
  off the graph by evaluating the chain on probe values (per-neuron scales such as a layer-scale gamma, offsets
  such as position embeddings, the residual's own coefficient);
* :func:`train_level`: train a level's parameters to its cut targets (Adam / SGD, 80/20 split, early stopping,
  best state kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion.fuse.interp.levels import Fit, Level, Segment, Site
from pyfusion.fuse.interp.program import Runner, _rows
from pyfusion.graph.groups import AxisRef, FusionGraph
from pyfusion.graph.transform import axis_plan, member_tensor

__all__ = ["chain_coefficients", "design_weight", "mix", "solve_ls", "train_level", "write_site"]


def solve_ls(
    g: Tensor, cs: Sequence[Tensor], ridge: float = 1e-6, priors: Sequence[Tensor | None] | None = None
) -> tuple[list[Tensor], float]:
    """Ridge least squares from Gram statistics, through a Cholesky factor, ``r = ridge * mean(diag G)``:

    ``W_k = argmin ||X W - T_k||^2 + r ||W - W0_k||^2 = W0_k + (G + r I)^{-1} (C_k - G W0_k)``

    with ``G = X^T X`` (p, p), ``C_k = X^T T_k`` (p, n_k) and the prior ``W0_k`` (p, n_k) (``priors[k]``; None or
    absent: 0, the plain ridge ``(G + r I)^{-1} C_k``). The ridge only decides the directions the data do not
    determine (the null space of G when there are fewer independent design rows than columns): pulled to 0 they
    change the function on other inputs; pulled to a prior that already reproduces the targets (``X W0 = T``, so
    ``C = G W0``) they give back exactly ``W0``, whatever the number of samples. The form ``W0 + (G + rI)^{-1}
    (C - G W0)`` stays exact when r is grown below.

    If the factorisation fails (G singular and ``ridge`` 0 or too small), r grows 100x (from 1e-12 relative when
    ``ridge`` is 0) until it succeeds.

    Returns:
        (the solutions (p, n_k), the relative ridge used).
    """
    scale = float(torch.diagonal(g).mean()) or 1.0
    rel = float(ridge)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    pri = list(priors) if priors is not None else [None] * len(cs)
    if len(pri) != len(cs):
        raise ValueError(f"priors must give one (or None) per right-hand side ({len(cs)}); got {len(pri)}")
    for c, w0 in zip(cs, pri):
        if w0 is not None and tuple(w0.shape) != tuple(c.shape):
            raise ValueError(f"a prior must have the right-hand side's shape {tuple(c.shape)}; got {tuple(w0.shape)}")
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(g + rel * scale * eye)
        if int(info) == 0:
            out = []
            for c, w0 in zip(cs, pri):
                if w0 is None:
                    out.append(torch.cholesky_solve(c, chol))
                else:
                    w0 = w0.to(g.dtype)
                    out.append(w0 + torch.cholesky_solve(c - g @ w0, chol))
            return out, rel
        rel = 1e-12 if rel == 0 else rel * 100
    raise ValueError("the input Gram matrix X^T X could not be factorised (NaN in the activations?)")


def _axis_plan(graph: FusionGraph, segments: Sequence[Segment], axis: int) -> Any:
    refs = [(s.group, AxisRef("", "value", axis, "producer", 1, s.offset, tuple(s.factors))) for s in segments]
    return axis_plan(refs, graph.groups)


def mix(
    graph: FusionGraph,
    segments: Sequence[Segment],
    values: Sequence[Tensor],
    axis: int,
    maps: Mapping[str, tuple[Sequence[Tensor], Sequence[Tensor]]],
    lambdas: Sequence[float],
) -> Tensor:
    """``sum_k A_k values_k`` along ``axis`` (float64): each segment by its group's A_k through its pattern, the
    rest (no group: logits, pinned dims) by lambda_k."""
    axis = axis % values[0].dim()
    plan = _axis_plan(graph, segments, axis)
    out = None
    for k, v in enumerate(values):
        mk = {s.group: (maps[s.group][0][k], maps[s.group][1][k]) for s in segments}
        t = member_tensor(v.double(), plan, mk, float(lambdas[k])) if segments else v.double() * float(lambdas[k])
        out = t if out is None else out.add_(t)
    assert out is not None
    return out


def columns(graph: FusionGraph, seg: Segment) -> Tensor:
    """(n, R) indices into the value's neuron dim of each of the group's neurons (R copies: rep factors)."""
    from pyfusion.graph.transform import neuron_view

    g = graph.groups[seg.group]
    idx = torch.arange(seg.offset + seg.length)
    return neuron_view(idx, AxisRef("", "value", 0, "producer", 1, seg.offset, tuple(seg.factors)), g)


def _per_neuron(t: Tensor, dim: int, what: str, target: str) -> Tensor:
    rows = t.movedim(dim, -1).reshape(-1, t.shape[dim]).double()
    ref = rows[0]
    scale = float(ref.abs().max()) or 1.0
    if float((rows - ref).abs().max()) > 1e-6 * scale:
        raise _NotPerNeuron(f"the {what} of the path to {target!r} varies along the positions")
    return ref


class _NotPerNeuron(ValueError):
    pass


def chain_coefficients(
    runner: Runner, fit: Fit, state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """The target of ``fit`` as ``sum_p coef_p * z_p + const + sum_i coef_i * r_i`` (z_p the fitted sites' outputs,
    r_i the passthroughs), evaluated on probe values with the current ``state`` (absorbed BatchNorms already the
    identity).

    Returns:
        (site node -> (width,) coefficient, const (m, width) per sample, passthrough -> (width,) coefficient).

    Raises:
        ValueError (_NotPerNeuron): a coefficient that varies along positions, or a const that varies across
            samples (the path is not a per-neuron affine map).
    """
    prog = runner.prog
    sites = [s.node for s in fit.fitted]
    leaves = sites + list(fit.passthrough)
    if not fit.chain:
        return {s: torch.ones(fit.width, dtype=torch.float64) for s in sites}, torch.zeros(1, fit.width), {}
    b = prog.batch

    def probe(hot: str | None) -> Tensor:
        env = {}
        for leaf in leaves:
            val = prog.by_name[leaf].meta["val"]
            env[leaf] = (torch.ones if leaf == hot else torch.zeros)(val.shape, dtype=val.dtype)
        with torch.no_grad():
            return runner.evaluate(fit.chain, env, b, state=state)[fit.target]

    base = probe(None)
    rows = runner.to_stored(fit.target, base).movedim(fit.dim, -1).reshape(b, -1, fit.width).double()
    const = rows[0]
    if float((rows - const).abs().max()) > 1e-6 * (float(const.abs().max()) or 1.0):
        raise _NotPerNeuron(f"the offset of the path to {fit.target!r} varies across samples")
    coef = {s: _per_neuron(probe(s) - base, fit.dim, "scale", fit.target) for s in sites}
    pcoef = {p: _per_neuron(probe(p) - base, fit.dim, "residual scale", fit.target) for p in fit.passthrough}
    return coef, const, pcoef


def set_identity_norms(state: dict[str, Tensor], sites: Sequence[Site]) -> None:
    """Make the absorbed BatchNorms of fitted sites the identity (running mean 0, variance 1, weight
    sqrt(1 + eps), bias 0)."""
    for s in sites:
        for bn in s.norms:
            if bn.mean is not None:
                state[bn.mean] = torch.zeros_like(state[bn.mean])
            if bn.var is not None:
                state[bn.var] = torch.full_like(state[bn.var], 1.0 if bn.weight is not None else 1.0 - bn.eps)
            if bn.weight is not None:
                state[bn.weight] = torch.full_like(state[bn.weight], math.sqrt(1.0 + bn.eps))
            if bn.bias is not None:
                state[bn.bias] = torch.zeros_like(state[bn.bias])


def bias_slot(sites: Sequence[Site]) -> tuple[Site, str] | None:
    """Where a fit's intercept goes: the first fitted site's own bias, else the bias of a BatchNorm absorbed on a
    fitted site's path (None: the fit has no intercept)."""
    for s in sites:
        if s.bias is not None:
            return s, s.bias
    for s in sites:
        for bn in s.norms:
            if bn.bias is not None:
                return s, bn.bias
    return None


def design_weight(site: Site, weight: Tensor) -> Tensor:
    """A site's weight tensor in design layout (design columns, outputs): the inverse of :func:`write_site`."""
    if site.kind == "addmm":
        return weight.double()
    return weight.reshape(weight.shape[0], -1).T.double()


def write_site(state: dict[str, Tensor], site: Site, w: Tensor) -> None:
    """Write LS weights ``w`` (design columns, outputs) into a site's weight tensor (its own layout)."""
    old = state[site.weight]
    if site.kind == "addmm":
        new = w
    else:
        new = w.T.reshape(old.shape)
    state[site.weight] = new.to(old.dtype).contiguous()


def train_level(
    runner: Runner,
    level: Level,
    state: dict[str, Tensor],
    frontier: Mapping[str, Any],
    target: Tensor,
    opts: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Train the level's parameters so that the fused graph maps the frontier values at its start to ``target``
    (MSE) at its cut: 80/20 split, mini-batches, early stopping on the validation loss, best state kept.

    Args:
        runner: the fused model's runner (its program and batch examples).
        level: the level.
        state: the fused state dict (the level's parameters are replaced by the trained tensors).
        frontier: the input-dependent values the level reads, for all N samples.
        target: (N, ...) the value the level's cut should take.
        opts: epochs, last_epochs, lr, optimizer, batch_size, patience, val_fraction, weight_decay.
        seed: shuffling seed.
    """
    keys = [k for k in level.params if state[k].is_floating_point()]
    if not keys:
        return {"epochs": 0}
    params = [state[k].detach().clone().requires_grad_(True) for k in keys]
    for k, p in zip(keys, params):
        state[k] = p
    n = runner.n
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(opts["val_fraction"] * n)) if n >= 5 else 0
    val, tr = perm[:n_val], perm[n_val:]
    if opts["optimizer"] == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=opts["lr"], momentum=0.9, weight_decay=opts["weight_decay"])
    epochs = opts["last_epochs"] if level.last else opts["epochs"]
    bs = int(min(opts["batch_size"], max(1, tr.numel())))
    _order, reads = runner._range_plan(level.start, level.end)
    tgt = target.to(next(p for p in params).dtype)

    def take(v: Tensor, idx: Tensor) -> Tensor:
        m = v.shape[0] // n
        return v[(idx[:, None] * m + torch.arange(m)).reshape(-1)]

    def loss_of(idx: Tensor, size: int) -> tuple[Tensor, int]:
        sub = {r: take(frontier[r], idx) if isinstance(frontier[r], Tensor) else frontier[r] for r in reads}
        real = idx.numel()
        env = {}
        for r in reads:  # the selected samples, padded to the program's batch, in the graph's layout
            env[r] = runner.to_graph(r, _rows(sub[r], real, 0, real, size))
        out = runner.run_chunk(level.start, level.end, env, size, [level.target], state=state)
        y = runner.stored(level.target, out[level.target], real, size)
        return F.mse_loss(y, take(tgt, idx), reduction="sum"), y.numel()

    def val_loss() -> float:
        idx_all = val if n_val else tr
        total, count = 0.0, 0
        with torch.no_grad():
            for s in range(0, idx_all.numel(), runner.chunk):
                loss, cnt = loss_of(idx_all[s : s + runner.chunk], runner.chunk)
                total += float(loss)
                count += cnt
        return total / max(count, 1)

    best = val_loss()
    best_state = [p.detach().clone() for p in params]
    bad, done = 0, 0
    for _ in range(int(epochs)):
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for s in range(0, order.numel(), bs):
            idx = order[s : s + bs]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss, cnt = loss_of(idx, bs)
                (loss / cnt).backward()
            opt.step()
        done += 1
        cur = val_loss()
        if cur < best - 1e-12:
            best, bad = cur, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= opts["patience"]:
                break
    for k, b in zip(keys, best_state):
        state[k] = b
    return {"epochs": done, "val_mse": best}
