"""Linear assignment: exact, batched, with the partial (sink) forms that partial fusion needs.

The solve step is the op ``pyfusion::linear_assignment`` (``torch.library`` ``custom_op``, forward only, with
a fake kernel), whose outputs have a static shape: a (B, max_n) int64 map "column of each row" (-1 for an
unmatched row) and (B,) float64 totals. Its body is the dispatcher (``cpp`` > ``reference``).
:func:`linear_assignment` validates the arguments (numpy inputs become tensors at this boundary, without a
copy when they already are contiguous float32/float64), runs the op (:mod:`pyfusion.ops._registry`) and turns
the map into per-problem ``row_ind`` / ``col_ind`` / unmatched lists, numpy for numpy input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pyfusion import _ext
from pyfusion.backends import cpp_reasons, cuda_reasons
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops._registry import LazyOp
from pyfusion.ops.reference import linear_assignment_ref

__all__ = ["DISPATCHER", "OP", "AssignmentResult", "linear_assignment"]


@dataclass(frozen=True)
class AssignmentResult:
    """Result of :func:`linear_assignment`.

    For a single problem, ``row_ind`` / ``col_ind`` are int64 arrays of the matched pairs sorted by row,
    ``cost`` the sum of the matched entries, ``unmatched_rows`` / ``unmatched_cols`` the rest. For a
    batch, each field is a list with one entry per problem (``cost`` an array of shape (B,)).
    Arrays are numpy when the input was numpy (or a list of arrays), torch tensors on the input's device when it
    was a tensor (or a list of tensors).
    """

    row_ind: Any
    col_ind: Any
    cost: Any
    unmatched_rows: Any
    unmatched_cols: Any
    batched: bool

    def __iter__(self):  # scipy-style unpacking: rows, cols = linear_assignment(c)
        return iter((self.row_ind, self.col_ind))


# ----------------------------------------------------------------------------------------------------------
# Backends: list of (n_b, m_b) costs -> (B, max n_b) column-per-row map and (B,) totals, on the costs' device
# ----------------------------------------------------------------------------------------------------------


def _engine(
    arrays: list[np.ndarray], maximize: bool, num_matches: list[int], unmatched_cost: float | None, num_threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """The C++ engine on C-contiguous float32 or float64 numpy arrays (all of one dtype)."""
    solve = _ext._C.lsap_solve_f32 if arrays[0].dtype == np.float32 else _ext._C.lsap_solve_f64
    return solve(arrays, list(num_matches), bool(maximize), unmatched_cost, int(num_threads))


def _solve_cpp(
    costs: list[torch.Tensor], maximize: bool, num_matches: list[int], unmatched_cost: float | None, num_threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ engine (csrc/assignment). CUDA inputs are copied to host, solved there, returned on the device."""
    device = costs[0].device
    if device.type == "cpu":  # the public function hands over contiguous CPU tensors: views, no copies
        arrays = [
            c.numpy() if c.is_contiguous() and not c.requires_grad else c.detach().contiguous().numpy() for c in costs
        ]
    else:
        arrays = [c.detach().to("cpu").contiguous().numpy() for c in costs]
    cols, totals = _engine(arrays, maximize, num_matches, unmatched_cost, num_threads)
    if device.type == "cpu":
        return torch.from_numpy(cols), torch.from_numpy(totals)
    return torch.from_numpy(cols).to(device), torch.from_numpy(totals).to(device)


def _solve_cuda(
    costs: list[torch.Tensor], maximize: bool, num_matches: list[int], unmatched_cost: float | None, num_threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched exact assignment on the GPU (csrc/assignment/lsap_batch.h: one warp or one 256-thread block per
    problem on the caller's stream), on contiguous CUDA costs of one dtype; results stay on the device."""
    del num_threads
    device = costs[0].device
    costs = [c.detach().contiguous() for c in costs]
    max_n = max(int(c.shape[0]) for c in costs)
    cols = torch.full((len(costs), max_n), -1, dtype=torch.int64, device=device)
    totals = torch.zeros(len(costs), dtype=torch.float64, device=device)
    if max_n == 0:
        return cols, totals
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        _ext._C.lsap_solve_cuda(  # type: ignore[union-attr]
            [c.data_ptr() for c in costs], [int(c.shape[0]) for c in costs], [int(c.shape[1]) for c in costs],
            list(num_matches), 0 if costs[0].dtype == torch.float32 else 1, bool(maximize), unmatched_cost,
            cols.data_ptr(), max_n, totals.data_ptr(), stream,
        )  # fmt: skip
    return cols, totals


def _cuda_supports(costs, maximize, num_matches, unmatched_cost, num_threads) -> list[str]:
    why = []
    dev = costs[0].device.type if costs else "cpu"
    if dev != "cuda":
        why.append(f"the costs are on {dev}; the batched GPU solver takes CUDA tensors")
    elif not hasattr(_ext._C, "lsap_solve_cuda"):
        why.append("the extension was built without the CUDA assignment solver")
    dtypes = {c.dtype for c in costs}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) > 1:
        why.append(f"the costs must share one dtype, float32 or float64; got {sorted(str(d) for d in dtypes)}")
    return why


def _check_entries(cost: np.ndarray, name: str, maximize: bool) -> None:
    """Same checks and messages as the C++ engine (used by the reference backend)."""
    bad = np.isnan(cost) | (cost == (np.inf if maximize else -np.inf))
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        x = cost[i, j]
        if np.isnan(x):
            raise ValueError(f"{name} contains NaN at ({i}, {j}); costs must be numbers (+inf marks a forbidden pair)")
        if maximize:
            raise ValueError(
                f"{name} contains +inf at ({i}, {j}); when maximising only -inf (a forbidden pair) is allowed"
            )
        raise ValueError(f"{name} contains -inf at ({i}, {j}); when minimising only +inf (a forbidden pair) is allowed")


def _solve_reference(
    costs: list[torch.Tensor], maximize: bool, num_matches: list[int], unmatched_cost: float | None, num_threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 scipy reference, one problem at a time; same outputs as the cpp backend."""
    del num_threads
    B = len(costs)
    max_n = max(int(c.shape[0]) for c in costs)
    cols = np.full((B, max_n), -1, dtype=np.int64)
    totals = np.zeros(B, dtype=np.float64)
    for b, c in enumerate(costs):
        arr = c.detach().cpu().numpy().astype(np.float64)
        name = "cost" if B == 1 else f"cost[{b}]"
        _check_entries(arr, name, maximize)
        k = num_matches[b] if num_matches[b] >= 0 else None
        r, cc, tot = linear_assignment_ref(arr, maximize=maximize, num_matches=k, unmatched_cost=unmatched_cost)
        cols[b, r] = cc
        totals[b] = tot
    device = costs[0].device
    return torch.from_numpy(cols).to(device), torch.from_numpy(totals).to(device)


DISPATCHER = Dispatcher(
    "linear_assignment",
    [
        Backend(
            "cuda",
            _solve_cuda,
            available=cuda_reasons,
            supports=_cuda_supports,
            description="batched exact JV on the GPU (a warp or a block per problem), CUDA costs, results on device",
        ),
        Backend(
            "cpp",
            _solve_cpp,
            available=cpp_reasons,
            description="C++ Jonker-Volgenant + SIMD Dijkstra, OpenMP over problems (CUDA inputs solved on host)",
        ),
        Backend("reference", _solve_reference, description="scipy linear_sum_assignment, float64, one at a time"),
    ],
    arg_names=("costs", "maximize", "num_matches", "unmatched_cost", "num_threads"),
    # The backends' reasons depend on the device only (the public function casts every problem to one dtype,
    # float32 or float64): cache the choice per device type (small problems solve in ~10 us).
    cache_key=lambda costs, *_: costs[0].device.type,
)


def _register() -> None:
    @torch.library.custom_op("pyfusion::linear_assignment", mutates_args=())
    def _linear_assignment_op(
        costs: list[torch.Tensor],
        maximize: bool,
        num_matches: list[int],
        unmatched_cost: float | None,
        num_threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_n) int64 column of each row (-1: unmatched) and (B,) float64 totals; forward only."""
        return DISPATCHER(costs, maximize, num_matches, unmatched_cost, num_threads)

    @_linear_assignment_op.register_fake
    def _(costs, maximize, num_matches, unmatched_cost, num_threads):
        max_n = max(int(c.shape[0]) for c in costs)
        return (
            costs[0].new_empty((len(costs), max_n), dtype=torch.int64),
            costs[0].new_empty((len(costs),), dtype=torch.float64),
        )


OP = LazyOp("linear_assignment", DISPATCHER, _register)


# ----------------------------------------------------------------------------------------------------------
# Argument handling
# ----------------------------------------------------------------------------------------------------------


def _to_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    return arr


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(_to_array(x, name)))
    if t.dtype.is_complex:
        raise ValueError(f"{name} must hold real numbers; got dtype {t.dtype}")
    return t


def _solve_dtype(probs: list[Any], dtype: Any) -> str:
    """'float32' or 'float64'."""
    if dtype is None:

        def is_f32(p: Any) -> bool:
            return p.dtype == torch.float32 if isinstance(p, torch.Tensor) else p.dtype.char == "f"

        return "float32" if probs and all(is_f32(p) for p in probs) else "float64"
    key = str(dtype).replace("torch.", "").replace("<class 'numpy.", "").replace("'>", "")
    if key in ("float32", "float", "f4"):
        return "float32"
    if key in ("float64", "double", "f8"):
        return "float64"
    raise ValueError(f"dtype must be float32 or float64 (or None: float32 inputs stay float32); got {dtype!r}")


def _as_problems(cost: Any) -> tuple[list[Any], bool, bool]:
    """Returns (2-D tensors or 2-D numpy arrays, batched, torch_output)."""
    if isinstance(cost, torch.Tensor):
        if cost.dtype.is_complex:
            raise ValueError(f"cost must hold real numbers; got dtype {cost.dtype}")
        if cost.ndim == 2:
            return [cost.detach()], False, True
        if cost.ndim == 3:
            return list(cost.detach().unbind(0)), True, True
        raise ValueError(f"cost must have shape (n, m) or (B, n, m); got a tensor of shape {tuple(cost.shape)}")
    # A list whose first element is 1-D (or a scalar) is one nested-list matrix, scipy style.
    if isinstance(cost, (list, tuple)) and len(cost) > 0 and np.ndim(cost[0]) >= 2:
        torch_out = isinstance(cost[0], torch.Tensor)
        convert = _to_tensor if torch_out else _to_array
        probs = []
        for i, c in enumerate(cost):
            p = convert(c, f"cost[{i}]")
            if p.ndim != 2:
                raise ValueError(f"cost[{i}] must have shape (n, m); got shape {tuple(p.shape)}")
            probs.append(p)
        return probs, True, torch_out
    if isinstance(cost, (list, tuple)) and len(cost) == 0:
        return [], True, False
    a = _to_array(cost, "cost")
    if a.ndim == 2:
        return [a], False, False
    if a.ndim == 3:
        return list(a), True, False
    raise ValueError(f"cost must have shape (n, m) or (B, n, m); got shape {tuple(a.shape)}")


def _check_num_matches(num_matches: Any, shapes: list[tuple[int, int]], batched: bool) -> list[int]:
    B = len(shapes)
    if num_matches is None:
        return [-1] * B
    per_problem = isinstance(num_matches, (Sequence, np.ndarray)) and not isinstance(num_matches, str)
    if isinstance(num_matches, torch.Tensor):
        per_problem = num_matches.ndim > 0
    if per_problem:
        ks = list(num_matches)
        if len(ks) != B:
            raise ValueError(f"num_matches must have one entry per problem: expected length {B}, got {len(ks)}")
    else:
        ks = [num_matches] * B
    out = []
    for b, (k, (n, m)) in enumerate(zip(ks, shapes)):
        name = f"num_matches[{b}]" if per_problem else "num_matches"
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            if isinstance(k, torch.Tensor) and k.ndim == 0 and not k.dtype.is_floating_point:
                k = int(k)
            else:
                raise ValueError(f"{name} must be an int; got {type(k).__name__} {k!r}")
        k = int(k)
        if not 0 <= k <= min(n, m):
            where = f" for cost[{b}] of shape ({n}, {m})" if batched else f" for cost of shape ({n}, {m})"
            raise ValueError(f"{name} must be in [0, min(n, m)] = [0, {min(n, m)}]{where}; got {k}")
        out.append(k)
    return out


def linear_assignment(
    cost: Any,
    *,
    maximize: bool = False,
    num_matches: int | Sequence[int] | None = None,
    unmatched_cost: float | None = None,
    num_threads: int | None = None,
    dtype: Any = None,
) -> AssignmentResult:
    r"""Solve one or many linear assignment problems exactly.

    Full problem on an (n, m) cost C: a matching of size min(n, m) that minimises (or maximises)

    .. math:: \sum_{(i, j) \in M} C_{ij},

    i.e. every row matched when n <= m, every column matched when n > m (scipy's
    ``linear_sum_assignment`` semantics). Forbidden pairs are ``+inf`` (``-inf`` when maximising); NaN and
    infinities of the other sign are rejected.

    Partial forms (DESIGN §4), each equal to one square sink-augmented assignment (the scipy reference
    solves that one):

    * ``num_matches=k``: the k disjoint pairs of minimum total cost (append n - k zero-cost dummy
      columns and m - k dummy rows, dummy-dummy forbidden; size n + m - k);
    * ``unmatched_cost=u``: every row and column may stay unmatched at cost u each, so a pair (i, j) is
      used only when :math:`C_{ij} < 2u` helps the total; the objective is
      :math:`\sum_M C_{ij} + u\,(n + m - 2|M|)`. When maximising, u is the gain of leaving one unmatched.

    The C++ engine solves them directly on the n x m cost (k-cardinality assignment, Dell'Amico & Martello,
    Discrete Appl. Math. 76 (1997)): successive shortest augmenting paths from all free rows at once keep the
    matching optimal for its size after every augmentation, so ``num_matches=k`` stops after k of them and
    ``unmatched_cost=u`` at the first path that costs >= 2u (path costs never decrease). Each search relaxes a
    row only on the entries whose label could still be popped before the path's end (every row keeps its 32
    smallest entries sorted; the whole row when they do not suffice), with a heap in the full scan's order: the
    same paths as scanning every row in full, at a few entries per row on dense costs. For k > 0.9 min(n, m)
    it solves the padded problem instead, which is then faster (the measurement is in csrc/assignment/lsap.cpp).

    The engine is the C++ Jonker-Volgenant solver (column reduction, reduction transfer, augmenting row
    reduction, then Dijkstra shortest augmenting paths with a SIMD row scan), Jonker & Volgenant,
    Computing 38 (1987). Batches are solved in parallel over problems with OpenMP (largest first),
    with the GIL released. ``PYFUSION_BACKEND=linear_assignment:reference`` forces the scipy reference.

    Args:
        cost: (n, m) or (B, n, m) numpy array / torch tensor, or a list of 2-D arrays or tensors (sizes may
            differ). A list whose first element is 1-D is read as one nested-list matrix. Torch tensors
            may live on CUDA: with the extension's CUDA solver (``cuda`` backend) the batch is solved on the
            GPU, else the costs are copied to host memory and solved on the CPU; the indices are returned as
            tensors on the input device.
        maximize: maximise the total instead of minimising it.
        num_matches: k, or one k per problem, each in [0, min(n, m)].
        unmatched_cost: u >= 0, finite; at most one of ``num_matches`` and ``unmatched_cost``.
        num_threads: OpenMP threads over the problems of a batch (None: the OpenMP default).
        dtype: solve precision. None: float32 inputs are solved in float32 (half the memory traffic; the
            duals then carry float32 rounding, so near-ties may resolve differently from float64), every
            other dtype in float64. Pass ``"float64"`` (or ``torch.float64`` / ``np.float64``) to solve
            float32 inputs in float64. Totals are always accumulated in float64.

    Returns:
        :class:`AssignmentResult`: ``row_ind`` / ``col_ind`` (int64, sorted by row), ``cost`` (sum of the
        matched entries, unmatched costs excluded), ``unmatched_rows`` / ``unmatched_cols``. Batched
        inputs give lists (one per problem) and a (B,) float64 ``cost`` array.

    Raises:
        ValueError: wrong shapes or arguments (naming the argument, expected vs actual), NaN or an
            infinity of the wrong sign (naming the value and its position), or an infeasible problem.
    """
    probs, batched, torch_out = _as_problems(cost)
    if num_matches is not None and unmatched_cost is not None:
        raise ValueError(
            f"give at most one of num_matches and unmatched_cost; got num_matches={num_matches!r} "
            f"and unmatched_cost={unmatched_cost!r}"
        )
    if unmatched_cost is not None:
        try:
            u = float(unmatched_cost)
        except (TypeError, ValueError):
            raise ValueError(f"unmatched_cost must be a number; got {unmatched_cost!r}") from None
        if math.isnan(u) or u < 0 or math.isinf(u):
            raise ValueError(f"unmatched_cost must be finite and >= 0; got {u}")
        unmatched_cost = u
    bad_threads = isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0
    if num_threads is not None and bad_threads:
        raise ValueError(f"num_threads must be a non-negative int or None; got {num_threads!r}")
    shapes = [(int(t.shape[0]), int(t.shape[1])) for t in probs]
    ks = _check_num_matches(num_matches, shapes, batched)
    if torch_out and len({t.device for t in probs}) > 1:
        raise ValueError(f"cost tensors must all be on one device; got {sorted({str(t.device) for t in probs})}")
    sdtype = _solve_dtype(probs, dtype)
    if torch_out:
        probs = [t.to(getattr(torch, sdtype)).contiguous() for t in probs]
    else:  # numpy enters the op as tensors sharing its memory (a copy only to change dtype or layout)
        probs = [torch.from_numpy(np.ascontiguousarray(a, dtype=sdtype)) for a in probs]

    if probs:
        cols_t, totals_t = OP(probs, bool(maximize), ks, unmatched_cost, 0 if num_threads is None else num_threads)
        cols_np = (cols_t if cols_t.is_cpu else cols_t.cpu()).numpy()
        totals = (totals_t if totals_t.is_cpu else totals_t.cpu()).numpy()
    else:
        cols_np = np.zeros((0, 0), dtype=np.int64)
        totals = np.zeros(0, dtype=np.float64)

    device = probs[0].device if torch_out and probs else None
    conv = (lambda a: torch.as_tensor(a, device=device)) if torch_out else (lambda a: a)
    rows, cols, ur, uc = [], [], [], []
    for b, (n, m) in enumerate(shapes):
        cmap = cols_np[b, :n]
        if n <= m and ks[b] < 0 and unmatched_cost is None:  # a full problem with n <= m matches every row
            r, c, unr = np.arange(n, dtype=np.int64), cmap.copy(), np.zeros(0, dtype=np.int64)
        else:
            r = np.flatnonzero(cmap >= 0)
            c = cmap[r]
            unr = np.flatnonzero(cmap < 0)
        if len(c) == m:
            unc = np.zeros(0, dtype=np.int64)
        else:
            used = np.zeros(m, dtype=bool)
            used[c] = True
            unc = np.flatnonzero(~used)
        rows.append(conv(r))
        cols.append(conv(c))
        ur.append(conv(unr))
        uc.append(conv(unc))
    if batched:
        return AssignmentResult(rows, cols, totals, ur, uc, True)
    return AssignmentResult(rows[0], cols[0], float(totals[0]), ur[0], uc[0], False)
