"""Readable float64 references for every op. They are the spec: tests and benchmarks compare against them,
and the ops fall back to them when no faster backend accepts the inputs. No performance work here."""

from __future__ import annotations

import numpy as np

__all__ = ["augment_partial_cost", "correlation_ref", "linear_assignment_ref", "partial_linear_ref"]


def augment_partial_cost(
    cost: np.ndarray, *, num_matches: int | None = None, unmatched_cost: float | None = None
) -> np.ndarray:
    """The square problem whose plain assignment solves the partial one (DESIGN §4).

    ``num_matches=k`` on an (n, m) cost: append ``n - k`` zero-cost dummy columns (a row matched to one
    stays unmatched) and ``m - k`` zero-cost dummy rows; dummy-dummy pairs are forbidden (+inf). The
    square size is ``n + m - k``, and every complete assignment pairs exactly k real rows and columns.

    ``unmatched_cost=u``: append n dummy columns (row i may go to its own dummy at cost u) and m dummy
    rows (column j likewise), with a zero dummy-dummy block; a real pair (i, j) is used only when it is
    cheaper than leaving both unmatched (2u).
    """
    n, m = cost.shape
    inf = np.inf
    if num_matches is not None:
        k = int(num_matches)
        size = n + m - k
        out = np.zeros((size, size), dtype=np.float64)
        out[:n, :m] = cost
        out[n:, m:] = inf
        return out
    assert unmatched_cost is not None
    u = float(unmatched_cost)
    out = np.full((n + m, m + n), inf, dtype=np.float64)
    out[:n, :m] = cost
    out[:n, m:][np.arange(n), np.arange(n)] = u
    out[n:, :m][np.arange(m), np.arange(m)] = u
    out[n:, m:] = 0.0
    return out


def linear_assignment_ref(
    cost: np.ndarray,
    *,
    maximize: bool = False,
    num_matches: int | None = None,
    unmatched_cost: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Float64 reference of :func:`pyfusion.ops.linear_assignment` for one (n, m) problem.

    Returns ``(row_ind, col_ind, total)``: the matched pairs sorted by row and the sum of
    ``cost[row_ind, col_ind]`` (matched pairs only). Solved with scipy's ``linear_sum_assignment``
    (Crouse 2016) on the sink-augmented problem of :func:`augment_partial_cost`.
    """
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(cost, dtype=np.float64)
    n, m = c.shape
    work = -c if maximize else c
    if num_matches is None and unmatched_cost is None:
        rows, cols = linear_sum_assignment(work)
    else:
        u = None if unmatched_cost is None else (-float(unmatched_cost) if maximize else float(unmatched_cost))
        aug = augment_partial_cost(work, num_matches=num_matches, unmatched_cost=u)
        if aug.size == 0:
            rows = cols = np.zeros(0, dtype=np.int64)
        else:
            r, c2 = linear_sum_assignment(aug)
            keep = (r < n) & (c2 < m)
            rows, cols = r[keep], c2[keep]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    return rows, cols, float(c[rows, cols].sum()) if rows.size else 0.0


def partial_linear_ref(x, weight_blocks, bias, in_layout, out_layout, activation=None):
    """Float64 reference of :func:`pyfusion.ops.partial_linear`: builds the dense (O_total, I_total) matrix
    with zero blocks (branch k outputs x branch j != k inputs) and applies ``act(x W^T + b)``.

    Args:
        x: (..., I_total) tensor; weight_blocks: ``(w_shared (O_s, I_total), w_cross (O_B, I_s),
            w_diag (sum_k O_k I_k,))``; bias: (O_total,) or None; layouts ``[shared, branch_1, ...]``;
            activation: None/"none", "relu", "gelu" (torch's exact erf GELU), "silu".

    Returns:
        (..., O_total) float64 tensor.
    """
    import torch
    import torch.nn.functional as F

    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    w_shared, w_cross, w_diag = (w.to(torch.float64) for w in weight_blocks)
    i_s, o_s, i_tot, o_tot = il[0], ol[0], sum(il), sum(ol)
    dense = torch.zeros(o_tot, i_tot, dtype=torch.float64, device=w_shared.device)
    dense[:o_s] = w_shared
    dense[o_s:, :i_s] = w_cross
    r, c, d = o_s, i_s, 0
    for o_k, i_k in zip(ol[1:], il[1:]):
        dense[r : r + o_k, c : c + i_k] = w_diag[d : d + o_k * i_k].reshape(o_k, i_k)
        r, c, d = r + o_k, c + i_k, d + o_k * i_k
    z = F.linear(x.to(torch.float64), dense, None if bias is None else bias.to(torch.float64))
    act = activation or "none"
    return {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z)


def correlation_ref(x, y):
    """Pearson correlation between the columns of x (N, Dx) and y (N, Dy) -> (Dx, Dy), float64, two-pass.

    Population moments; a pair involving a zero-variance column (std <= 1e-7 |mean|, or exactly 0) gives 0.
    """
    import torch

    xd, yd = x.detach().to(torch.float64), y.detach().to(torch.float64)
    mx, my = xd.mean(0), yd.mean(0)
    xc, yc = xd - mx, yd - my
    cov = xc.T @ yc / xd.shape[0]
    sx, sy = (xc * xc).mean(0).sqrt(), (yc * yc).mean(0).sqrt()
    cx = (sx == 0) | (sx <= 1e-7 * mx.abs())
    cy = (sy == 0) | (sy <= 1e-7 * my.abs())
    ok = ~(cx[:, None] | cy[None, :])
    denom = torch.where(ok, torch.outer(sx, sy), torch.ones_like(cov))
    return torch.where(ok, cov / denom, torch.zeros_like(cov)).clamp(-1.0, 1.0)
