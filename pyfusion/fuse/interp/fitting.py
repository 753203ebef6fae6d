"""Fitting of neuron-interpolation fusion: least-squares weights, the maps of a grouping, and level training.

* :func:`solve_ls`: ``W_k = (G + r I)^{-1} C_k`` from the statistics of :mod:`.statistics`;
* :func:`set_linear`: write fitted weights into a level's producer;
* :func:`maps_from_labels` / :func:`mix_targets`: the plan maps of a grouping and the slot targets they define;
* :func:`fit_level`: train a level to its slot targets (KF-Gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyfusion.fuse.interp.levels import FLATTEN, Level, run_calls, run_chunked

__all__ = ["fit_level", "maps_from_labels", "mix_targets", "set_linear", "solve_ls"]


def solve_ls(g: Tensor, cs: Sequence[Tensor], ridge: float = 1e-6) -> tuple[list[Tensor], float]:
    """``W_k = (G + r I)^{-1} C_k`` through a Cholesky factor, ``r = ridge * mean(diag G)``.

    If the factorisation fails (G singular and ``ridge`` 0 or too small), r grows 100x (from 1e-12 relative when
    ``ridge`` is 0) until it succeeds.

    Returns:
        (the K solutions (p, n), the relative ridge used).
    """
    scale = float(torch.diagonal(g).mean()) or 1.0
    rel = float(ridge)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(g + rel * scale * eye)
        if int(info) == 0:
            return [torch.cholesky_solve(c, chol) for c in cs], rel
        rel = 1e-12 if rel == 0 else rel * 100
    raise ValueError("the input Gram matrix X^T X could not be factorised (NaN in the activations?)")


def set_linear(fused: nn.Module, level: Level, w: Tensor) -> None:
    """Write LS weights (p, n) into the producer (and make its BatchNorm the identity)."""
    mods = dict(fused.named_modules())
    prod = mods[level.producer]
    with torch.no_grad():
        p_w = prod.weight[0].numel()
        prod.weight.copy_(w[:p_w].T.reshape(prod.weight.shape).to(prod.weight.dtype))
        if prod.bias is not None:
            prod.bias.copy_(w[p_w].to(prod.bias.dtype))
        if level.norm is not None:
            bn = mods[level.norm]
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            if bn.weight is not None:
                bn.weight.fill_(math.sqrt(1.0 + bn.eps))
                bn.bias.zero_()


def maps_from_labels(labels: Tensor, weights: Sequence[Tensor], n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Plan maps of a grouping: ``A_k[c, j] = s_kj / S_c`` for j in c, ``B_k[j, c] = 1`` (cluster indicator)."""
    k_members = len(weights)
    w = torch.cat([x.double() for x in weights])
    lab = labels.long()
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, w)
    maps_a, maps_b = [], []
    for k in range(k_members):
        sl = slice(k * n, (k + 1) * n)
        a = torch.zeros(n, n, dtype=torch.float64)
        a[lab[sl], torch.arange(n)] = w[sl] / tot[lab[sl]]
        b = torch.zeros(n, n, dtype=torch.float64)
        b[torch.arange(n), lab[sl]] = 1.0
        maps_a.append(a)
        maps_b.append(b)
    return maps_a, maps_b


def mix_targets(maps_a: Sequence[Tensor], outs: Sequence[Tensor]) -> Tensor:
    """Slot targets ``T = sum_k A_k a_k`` along the neuron axis (dim 1) of the member outputs."""
    t = None
    for a, o in zip(maps_a, outs):
        part = torch.einsum("cj,nj...->nc...", a.to(o.dtype), o)
        t = part if t is None else t + part
    assert t is not None
    return t


def fit_level(model: nn.Module, level: Level, x: Tensor, t: Tensor, opts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train the level's parameters to map ``x`` to ``t`` (MSE), 80/20 split, early stopping, best state kept."""
    mods = dict(model.named_modules())
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for c in level.calls:
        if c == FLATTEN:
            continue
        for p in mods[c].parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        return {"epochs": 0}
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(opts["val_fraction"] * n)) if n >= 5 else 0
    val, tr = perm[:n_val], perm[n_val:]
    if opts["optimizer"] == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=opts["lr"], momentum=0.9, weight_decay=opts["weight_decay"])
    epochs = opts["last_epochs"] if level.last else opts["epochs"]
    bs = opts["batch_size"]
    model.eval()  # BatchNorm uses its running statistics: the level is a fixed function of its parameters

    def val_loss() -> float:
        idx = val if n_val else tr
        with torch.no_grad():
            return float(F.mse_loss(run_chunked(model, level.calls, x[idx]), t[idx]))

    best = val_loss()
    best_state = [p.detach().clone() for p in params]
    bad, done = 0, 0
    for _ in range(epochs):
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for s in range(0, order.numel(), bs):
            idx = order[s : s + bs]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when fuse() is called under torch.no_grad()
                loss = F.mse_loss(run_calls(model, level.calls, x[idx]), t[idx])
                loss.backward()
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
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    return {"epochs": done, "val_mse": best}
