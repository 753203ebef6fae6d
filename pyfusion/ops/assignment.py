"""Linear assignment: exact, batched, with the partial (sink) forms that partial fusion needs.

SKELETON: this version validates and solves with the float64 scipy reference. The C++ engine
(csrc/assignment) and the torch.library registration replace the solve step without changing the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyfusion.ops.reference import linear_assignment_ref

__all__ = ["AssignmentResult", "linear_assignment"]


@dataclass(frozen=True)
class AssignmentResult:
    """Result of :func:`linear_assignment`.

    For a single problem, ``row_ind`` / ``col_ind`` are int64 arrays of the matched pairs sorted by row,
    ``cost`` the sum of the matched entries, ``unmatched_rows`` / ``unmatched_cols`` the rest. For a
    batch, each field is a list with one entry per problem (``cost`` an array of shape (B,)).
    Arrays are numpy when the input was numpy or a list, torch tensors (on the input's device) otherwise.
    """

    row_ind: Any
    col_ind: Any
    cost: Any
    unmatched_rows: Any
    unmatched_cols: Any
    batched: bool

    def __iter__(self):  # scipy-style unpacking: rows, cols = linear_assignment(c)
        return iter((self.row_ind, self.col_ind))


def _as_problems(cost: Any) -> tuple[list[np.ndarray], bool, Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore[assignment]
    like = None
    if torch is not None and isinstance(cost, torch.Tensor):
        like = cost
        arr = cost.detach().to("cpu", torch.float64).numpy()
        if arr.ndim == 2:
            return [arr], False, like
        if arr.ndim == 3:
            return list(arr), True, like
        raise ValueError(f"cost must have shape (n, m) or (B, n, m); got a tensor of shape {tuple(cost.shape)}")
    if isinstance(cost, (list, tuple)):
        probs = [np.asarray(c, dtype=np.float64) for c in cost]
        for i, p in enumerate(probs):
            if p.ndim != 2:
                raise ValueError(f"cost[{i}] must have shape (n, m); got shape {p.shape}")
        return probs, True, None
    arr = np.asarray(cost, dtype=np.float64)
    if arr.ndim == 2:
        return [arr], False, None
    if arr.ndim == 3:
        return list(arr), True, None
    raise ValueError(f"cost must have shape (n, m) or (B, n, m); got shape {arr.shape}")


def linear_assignment(
    cost: Any,
    *,
    maximize: bool = False,
    num_matches: int | Sequence[int] | None = None,
    unmatched_cost: float | None = None,
) -> AssignmentResult:
    """Solve one or many linear assignment problems exactly.

    Args:
        cost: (n, m) or (B, n, m) numpy array / torch tensor, or a list of 2-D arrays (sizes may differ).
        maximize: maximise the total instead of minimising it.
        num_matches: k, or one k per problem: return the k disjoint pairs of minimum total cost.
        unmatched_cost: u: every row and column may stay unmatched at cost u each.
    """
    probs, batched, like = _as_problems(cost)
    if num_matches is not None and unmatched_cost is not None:
        raise ValueError("give at most one of num_matches and unmatched_cost")
    ks = list(num_matches) if isinstance(num_matches, Sequence) else [num_matches] * len(probs)
    rows, cols, totals, ur, uc = [], [], [], [], []
    for p, k in zip(probs, ks):
        r, c, t = linear_assignment_ref(p, maximize=maximize, num_matches=k, unmatched_cost=unmatched_cost)
        rows.append(r)
        cols.append(c)
        totals.append(t)
        ur.append(np.setdiff1d(np.arange(p.shape[0]), r))
        uc.append(np.setdiff1d(np.arange(p.shape[1]), c))
    conv = (lambda a: a) if like is None else (lambda a: __import__("torch").as_tensor(a, device=like.device))
    if batched:
        return AssignmentResult(
            [conv(r) for r in rows],
            [conv(c) for c in cols],
            np.asarray(totals),
            [conv(a) for a in ur],
            [conv(a) for a in uc],
            True,
        )
    return AssignmentResult(conv(rows[0]), conv(cols[0]), totals[0], conv(ur[0]), conv(uc[0]), False)
