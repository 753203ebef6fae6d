"""Readable float64 references for every op. They are the spec: tests and benchmarks compare against them,
and the ops fall back to them when no faster backend accepts the inputs. No performance work here."""

from __future__ import annotations

import numpy as np

__all__ = [
    "accumulate_moments_ref",
    "augment_partial_cost",
    "correlation_ref",
    "hf_cost_ref",
    "linear_assignment_ref",
    "partial_conv2d_ref",
    "partial_linear_ref",
    "weighted_kmeans_ref",
]


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


def partial_linear_ref(x, weight, bias, in_segments, out_segments, activation=None):
    """Float64 reference of :func:`pyfusion.ops.partial_linear`: builds the dense (O_total, I_total) matrix with
    zero blocks (output segment o x input segment i where the member masks do not intersect) from the packed
    weight and applies ``act(x W^T + b)``.

    Args:
        x: (..., I_total) tensor; weight: the packed flat weight (:mod:`pyfusion.ops.layout`); bias: (O_total,) or
            None; in_segments / out_segments: standard layouts ``[shared, branch_1, ...]`` or ``[(size, mask),
            ...]``; activation: None/"none", "relu", "gelu" (torch's exact erf GELU), "silu".

    Returns:
        (..., O_total) float64 tensor.
    """
    import torch
    import torch.nn.functional as F

    from pyfusion.ops.layout import as_segments, unpack_segment_weight

    ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
    dense = unpack_segment_weight(weight.to(torch.float64), ins, outs)
    z = F.linear(x.to(torch.float64), dense, None if bias is None else bias.to(torch.float64))
    act = activation or "none"
    return {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z)


def partial_conv2d_ref(
    x, weight, bias, in_segments, out_segments, kernel_size, stride=1, padding=0, dilation=1, activation=None
):
    """Float64 reference of :func:`pyfusion.ops.partial_conv2d`: builds the dense (O_total, I_total, kh, kw) weight
    with zero blocks from the packed weight and applies ``F.conv2d`` in float64 (then the activation).

    Args:
        x: (N, I_total, H, W); weight: the packed flat weight, blocks (O_o, K_o, kh, kw); bias: (O_total,) or None;
            segments as :func:`partial_linear_ref`; kernel_size (kh, kw); stride / padding / dilation: as
            ``nn.Conv2d``.

    Returns:
        (N, O_total, H', W') float64 tensor.
    """
    import torch
    import torch.nn.functional as F

    from pyfusion.ops.layout import as_segments, unpack_segment_weight

    ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
    kh, kw = (int(kernel_size), int(kernel_size)) if isinstance(kernel_size, int) else map(int, kernel_size)
    dense = unpack_segment_weight(weight.to(torch.float64), ins, outs, (kh, kw))
    b = None if bias is None else bias.to(torch.float64)
    if dense.shape[0] == 0:  # F.conv2d rejects a weight with no output channels: one zero channel, then none
        one = torch.zeros(1, dense.shape[1], kh, kw, dtype=torch.float64, device=x.device)
        return F.conv2d(x.to(torch.float64), one, None, stride, padding, dilation)[:, :0]
    z = F.conv2d(x.to(torch.float64), dense, b, stride, padding, dilation)
    act = activation or "none"
    return {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z)


def accumulate_moments_ref(x, shift, s1, s2, rects=None):
    """Float64 reference of :func:`pyfusion.ops.accumulate_moments`, in place:
    ``s1 += sum_n (x_n - c)`` (D,) and ``s2 += sum_n (x_n - c)(x_n - c)^T`` (D, D), c = ``shift``.

    The full s2 is written (the engines write only its lower triangle, or its requested ``rects`` and diagonal;
    readers use only those), so ``rects`` changes nothing here.
    """
    import torch

    v = x.to(torch.float64) - shift
    s1 += v.sum(0)
    s2 += v.T @ v


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


def _centered_gram_ref(points: np.ndarray | None, gram: np.ndarray | None, w: np.ndarray) -> np.ndarray:
    """Weighted-centred Gram matrix (D, D): the inertia is translation invariant, and centring keeps the
    kernel formula ``G_ii - 2 T_ic / W_c + P_c / W_c^2`` away from cancellation."""
    v = w / w.sum()
    if points is not None:
        xc = points - v @ points
        return xc @ xc.T
    a = gram @ v
    return gram - a[:, None] - a[None, :] + v @ a


def _ward_labels_ref(d2: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Greedy weighted Ward: merge the pair of least cost ``2 w_a w_b / (w_a + w_b) ||mu_a - mu_b||^2``
    until k clusters remain (scipy's ``ward`` linkage for unit weights), with the Lance-Williams update
    for squared centroid distances. Returns labels numbered by cluster position."""
    d = d2.shape[0]
    d2 = d2.copy()
    wc = w.astype(np.float64).copy()
    active = np.ones(d, dtype=bool)
    owner = np.arange(d)
    upper = np.triu(np.ones((d, d), dtype=bool), 1)
    for _ in range(d - k):
        cost = 2.0 * np.outer(wc, wc) / np.add.outer(wc, wc) * d2
        cost[~(upper & np.outer(active, active))] = np.inf
        i, j = np.unravel_index(np.argmin(cost), cost.shape)  # i < j, ties: first in row-major order
        wi, wj = wc[i], wc[j]
        wn = wi + wj
        new = np.maximum((wi * d2[i] + wj * d2[j]) / wn - wi * wj * d2[i, j] / wn**2, 0.0)
        d2[i, :] = new
        d2[:, i] = new
        d2[i, i] = 0.0
        wc[i] = wn
        active[j] = False
        owner[owner == j] = i
    _, labels = np.unique(owner, return_inverse=True)
    return labels.astype(np.int64)


def _kmeanspp_labels_ref(d2: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted greedy k-means++ (D^2 sampling, 2 + floor(ln k) local trials), labels of the nearest center."""
    d = d2.shape[0]
    trials = 2 + int(np.log(k))
    centers = [int(rng.choice(d, p=w / w.sum()))]
    closest = d2[centers[0]].copy()
    for _ in range(1, k):
        mass = w * closest
        if mass.sum() <= 0:
            centers.append(int(rng.integers(d)))
        else:
            cands = rng.choice(d, size=trials, p=mass / mass.sum())
            pots = [(w * np.minimum(closest, d2[c])).sum() for c in cands]
            centers.append(int(cands[int(np.argmin(pots))]))
        closest = np.minimum(closest, d2[centers[-1]])
    return np.argmin(d2[centers], axis=0).astype(np.int64)


def _kernel_stats_ref(g: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int):
    onehot = np.zeros((labels.size, k))
    onehot[np.arange(labels.size), labels] = 1.0
    wk = w @ onehot  # (k,) cluster weights
    t = g @ (onehot * w[:, None])  # (D, k): T_ic = sum_{j in c} w_j G_ij
    pk = (onehot * w[:, None] * t).sum(0)  # (k,): P_c = sum_{i, j in c} w_i w_j G_ij
    return wk, t, pk, onehot.sum(0)


def _kernel_dist_ref(g: np.ndarray, wk: np.ndarray, t: np.ndarray, pk: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.diag(g)[:, None] - 2.0 * t / wk + pk / wk**2
    dist[:, cnt == 0] = np.inf
    return dist


def _lloyd_ref(g: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int, max_iter: int, tol: float) -> np.ndarray:
    """Weighted Lloyd in kernel form; a point moves to its nearest other centroid only when that is closer than
    its own by more than tol.
    Empty clusters take the point of largest weighted distance from a cluster of >= 2 points."""
    labels = labels.copy()
    d = labels.size
    for _ in range(max_iter):
        wk, t, pk, cnt = _kernel_stats_ref(g, w, labels, k)
        dist = _kernel_dist_ref(g, wk, t, pk, cnt)
        own = dist[np.arange(d), labels]
        other = dist.copy()
        other[np.arange(d), labels] = np.inf
        nearest = np.argmin(other, axis=1)  # nearest other centroid, lowest index on ties
        move = other[np.arange(d), nearest] < own - tol
        new = np.where(move, nearest, labels)
        best = np.where(move, other[np.arange(d), nearest], own)
        changed = int((new != labels).sum())
        labels = new
        cnt = np.bincount(labels, minlength=k)
        for c in range(k):
            if cnt[c] > 0:
                continue
            score = np.where(cnt[labels] > 1, w * best, -1.0)
            far = int(np.argmax(score))
            cnt[labels[far]] -= 1
            labels[far] = c
            cnt[c] = 1
            best[far] = -1.0
            changed += 1
        if changed == 0:
            break
    return labels


def _hartigan_ref(g: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int, max_iter: int, tol: float) -> np.ndarray:
    """Hartigan single-point moves, points in index order: move i from a to the b minimising
    ``w_i W_b / (W_b + w_i) d(i, b)`` when that is below ``w_i W_a / (W_a - w_i) d(i, a)`` (strict decrease)."""
    labels = labels.copy()
    for _ in range(max_iter):
        moved = 0
        for i in range(labels.size):
            wk, t, pk, cnt = _kernel_stats_ref(g, w, labels, k)
            a = labels[i]
            if cnt[a] <= 1:
                continue
            dist = _kernel_dist_ref(g, wk, t, pk, cnt)[i]
            remove = w[i] * wk[a] / (wk[a] - w[i]) * dist[a]
            with np.errstate(divide="ignore", invalid="ignore"):
                add = w[i] * wk / (wk + w[i]) * dist
            add[a] = np.inf
            add[cnt == 0] = np.inf
            b = int(np.argmin(add))
            if add[b] < remove - w[i] * tol:
                labels[i] = b
                moved += 1
        if moved == 0:
            break
    return labels


def _canonical_ref(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[np.unique(labels)[order]] = np.arange(order.size)
    return remap[labels]


def weighted_kmeans_ref(
    points: np.ndarray | None = None,
    *,
    gram: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    num_clusters: int,
    n_restarts: int = 1,
    init: str = "ward",
    max_iter: int = 100,
    refine: str = "hartigan",
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Float64 reference of :func:`pyfusion.ops.weighted_kmeans`: readable numpy, no speed.

    ``init="ward"`` is the deterministic greedy weighted Ward (the ``top_k = 1`` case of the randomized
    Ward; equal to scipy's ``ward`` linkage for unit weights), run once whatever ``n_restarts``;
    ``init="kmeans++"`` runs ``n_restarts`` weighted greedy k-means++ starts (numpy RNG, so its draws
    differ from the C++ engine's). Each start is refined by weighted Lloyd (then Hartigan moves when
    ``refine="hartigan"``), all in kernel form from the centred Gram matrix. Inputs are assumed valid.

    Returns:
        ``(labels (D,) int64 numbered by first appearance, weighted inertia)`` of the best start.
    """
    x = None if points is None else np.asarray(points, dtype=np.float64)
    gm = None if gram is None else np.asarray(gram, dtype=np.float64)
    d = x.shape[0] if x is not None else gm.shape[0]
    w = np.ones(d) if weights is None else np.asarray(weights, dtype=np.float64)
    g = _centered_gram_ref(x, gm, w)
    gd = np.diag(g)
    tol = 1e-12 * np.abs(gd).mean()
    d2 = np.maximum(gd[:, None] + gd[None, :] - 2.0 * g, 0.0)
    np.fill_diagonal(d2, 0.0)
    k = int(num_clusters)
    if init == "ward":
        starts = [_ward_labels_ref(d2, w, k)]
    else:
        starts = [_kmeanspp_labels_ref(d2, w, k, np.random.default_rng([seed, r])) for r in range(n_restarts)]
    best: tuple[np.ndarray, float] | None = None
    for labels in starts:
        labels = _lloyd_ref(g, w, labels, k, max_iter, tol)
        if refine == "hartigan":
            labels = _hartigan_ref(g, w, labels, k, max_iter, tol)
        labels = _canonical_ref(labels)
        wk, _, pk, cnt = _kernel_stats_ref(g, w, labels, k)
        within = np.bincount(labels, weights=w * gd, minlength=k)
        inertia = float(np.maximum(within[cnt > 0] - pk[cnt > 0] / wk[cnt > 0], 0.0).sum())
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    assert best is not None
    return best


def hf_cost_ref(M, Q01, Q10, d0, e0, n0, s0, d1, e1, n1, s1, *, squared=False):
    """HF interpolation cost (n0, n1) from Gram products, float64 torch (spec of ``pyfusion.ops.hf_cost``).

    ``u = s0_i / (s0_i + s1_j)``, ``v = 1 - u``;
    ``D0 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u e0_i - 2v Q10_ij + n0_i`` (= ||p_ij - a0_i||^2),
    ``D1 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u Q01_ij - 2v e1_j + n1_j`` (= ||p_ij - a1_j||^2), both clamped at 0;
    cost = ``s0_i D0 + s1_j D1`` (squared) or ``s0_i sqrt(D0) + s1_j sqrt(D1)``.
    """
    import torch

    f = [t.to(torch.float64) for t in (M, Q01, Q10, d0, e0, n0, s0, d1, e1, n1, s1)]
    M, Q01, Q10, d0, e0, n0, s0, d1, e1, n1, s1 = f
    tot = s0[:, None] + s1[None, :]
    u = s0[:, None] / tot
    v = s1[None, :] / tot
    common = u * u * d0[:, None] + v * v * d1[None, :] + 2 * u * v * M
    da = (common - 2 * u * e0[:, None] - 2 * v * Q10 + n0[:, None]).clamp_min(0)
    db = (common - 2 * u * Q01 - 2 * v * e1[None, :] + n1[None, :]).clamp_min(0)
    if not squared:
        da, db = da.sqrt(), db.sqrt()
    return s0[:, None] * da + s1[None, :] * db
