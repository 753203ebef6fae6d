"""The solver calls of the matching methods: assignment, partial assignment, optimal transport, coordinate descent.

The engines are ops (:func:`pyfusion.ops.linear_assignment`) or POT; these functions are the one place where the
methods call them: they check the costs (a NaN cost is an error naming the problem, never a silent guess), batch
the problems, and time the solver for ``fusion_info``. The k-means engine, :func:`pyfusion.ops.weighted_kmeans`,
takes a Gram matrix and weights directly and needs no wrapper (``pyfusion.match.weighted_kmeans`` is that op).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pyfusion._finite import all_finite
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.transform import permuted_state
from pyfusion.match.align import Permutation, aligned_features
from pyfusion.match.units import neuron_perms, tie_set_costs
from pyfusion.ops.assignment import linear_assignment

__all__ = [
    "SINKHORN_LOG_BELOW",
    "SinkhornResult",
    "align_weights",
    "assignments",
    "check_finite",
    "entropic_transport",
    "partial_assignments",
    "single_thread",
    "sorted_rows_start",
    "transport",
    "weight_alignment_objective",
]


def check_finite(cost: Tensor, what: str) -> None:
    """Raise ``ValueError(f"{what} has NaN or inf values")`` unless every entry of ``cost`` is finite.

    The test is :func:`pyfusion._finite.all_finite` (one sum; the elementwise test only when the sum is not
    finite), so a good cost is read once, without the full-size boolean temporary of ``isfinite(cost).all()``.
    """
    if not all_finite(cost):
        raise ValueError(f"{what} has NaN or inf values")


def assignments(costs: Sequence[Tensor]) -> tuple[list[np.ndarray], float]:
    """Exact minimum-cost permutations of square costs, all problems in one batched solver call.

    Args:
        costs: B float64 (n_b, n_b) cost matrices (already checked finite).

    Returns:
        (B column-index arrays: row i is matched to column ``cols[i]``, seconds in the solver).
    """
    t0 = time.perf_counter()
    res = linear_assignment([c.numpy() for c in costs])
    return [np.asarray(c) for c in res.col_ind], time.perf_counter() - t0


def partial_assignments(
    costs: Sequence[Tensor], num_matches: Sequence[int]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Partial assignment (DESIGN §4): the ``num_matches[b]`` disjoint pairs of minimum total cost of each problem.

    With uniform masses this is exactly partial OT with a sink (the unmatched neurons go to the sink); all
    problems are one batched call of :func:`pyfusion.ops.linear_assignment` (``num_matches=``), whose C++ engine
    solves the k-cardinality problem directly (successive shortest paths, Dell'Amico & Martello 1997) and the
    reference the sink-padded square problem with scipy: the same optimal objective (the pairs may differ on ties).

    Args:
        costs: B (n, m) float64 costs.
        num_matches: B pair counts.

    Returns:
        (B (rows, cols) index arrays of the matched pairs, seconds in the solver).

    Raises:
        ValueError: a cost with NaN or inf values (naming its index).
    """
    if not costs:
        return [], 0.0
    for i, c in enumerate(costs):
        check_finite(c, f"partial fusion: cost matrix {i}")
    t0 = time.perf_counter()
    res = linear_assignment([c.numpy() for c in costs], num_matches=list(num_matches))
    dt = time.perf_counter() - t0
    return [(np.asarray(r), np.asarray(c)) for r, c in zip(res.row_ind, res.col_ind)], dt


def _emd(a: Tensor, b: Tensor, cost: Tensor) -> Tensor:
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - POT is installed in the dev environment
        raise ImportError("non-uniform masses need POT: pip install pot") from exc
    t = ot.emd(a.numpy(), b.numpy(), cost.numpy(), numItermax=10_000_000)
    return torch.as_tensor(np.asarray(t), dtype=torch.float64)


def transport(a: Tensor, b: Tensor, cost: Tensor, uniform: bool) -> tuple[Tensor, float]:
    r"""An optimal transport plan between the neuron masses ``a`` (n,) and ``b`` (m,) for ``cost`` (n, m).

    .. math:: T = \arg\min_{T \geq 0,\ T 1 = a,\ T^\top 1 = b} \langle T, C \rangle

    With uniform masses and n = m an optimal plan is a permutation / n (Birkhoff), solved exactly by
    :func:`pyfusion.ops.linear_assignment`; otherwise POT's exact network simplex ``ot.emd`` (Bonneel et al.
    2011; optional dependency, ``pip install pot``).

    Returns:
        (T (n, m) float64, seconds in the solver).
    """
    t0 = time.perf_counter()
    n, m = cost.shape
    if uniform and n == m:
        _, cols = linear_assignment(cost)
        t = torch.zeros(n, m, dtype=torch.float64)
        t[torch.arange(n), torch.as_tensor(cols, dtype=torch.long)] = 1.0 / n
    else:
        t = _emd(a, b, cost)
    return t, time.perf_counter() - t0


# Below this (relative) regularisation the log-domain Sinkhorn is used. The plain iteration scales the Gibbs kernel
# K = exp(-C / reg) with C normalised to max 1: once 1 / reg passes ~745, exp(-1 / reg) underflows to 0 in float64
# and a neuron whose cost row is near the maximum (an outlier) gets an all-zero kernel row. Measured with POT 0.9.7
# (64 x 64, uniform masses, one outlier row at cost 0.986-1): the plain plan equals the log-domain one to 2e-16 up to
# 1 / reg = 714 and is wrong (POT warns "numerical errors"; 3e-3 off) from 1 / reg = 741; random costs without an
# outlier last down to 1 / reg = 1000-2000. The log-domain iteration is 10-20x slower (0.33 s against 0.025 s for
# 730 iterations at n = 64, 1 thread), so it is kept for the range that needs it, with a factor ~2 of margin:
# exp(-1 / 3e-3) = 3e-145, whose reciprocal and products with the masses stay far from over/underflow.
SINKHORN_LOG_BELOW = 3e-3


@dataclass(frozen=True)
class SinkhornResult:
    """How one entropic transport problem was solved (for ``fusion_info``).

    Attributes:
        solver: "sinkhorn" (POT's ``sinkhorn_knopp``) or "sinkhorn_log" (log-domain, for small ``reg``).
        reg: the regularisation, relative to the largest ground cost.
        iterations: Sinkhorn iterations run.
        marginal_error: L2 violation of the column marginal at the last check (the row marginal is exact: the
            iteration ends with the row scaling).
        converged: ``marginal_error < tol``.
        cost_scale: the largest ground cost, by which the cost was divided.
    """

    solver: str
    reg: float
    iterations: int
    marginal_error: float
    converged: bool
    cost_scale: float


def entropic_transport(
    a: Tensor, b: Tensor, cost: Tensor, reg: float, *, max_iter: int = 10_000, tol: float = 1e-9
) -> tuple[Tensor, float, SinkhornResult]:
    r"""The entropic optimal transport plan between masses ``a`` (n,) and ``b`` (m,) (Cuturi 2013), by POT's Sinkhorn.

    .. math:: T = \arg\min_{T \geq 0,\ T 1 = a,\ T^\top 1 = b}
              \langle T, C / c_{max} \rangle - \mathrm{reg} \cdot H(T),\quad H(T) = -\sum_{ij} T_{ij} (\log T_{ij} - 1)

    The cost is divided by its largest entry ``c_max`` first, so ``reg`` is relative to the cost scale and one value
    means the same for every group and layer (OTFusion normalises its ground metric the same way). As reg -> 0 the
    plan tends to an exact (EMD) plan: ``0 <= <T, C> - OT(a, b, C) <= reg * c_max * min(H(a), H(b))`` (the
    entropy of a coupling lies between max(H(a), H(b)) and H(a) + H(b)). POT's plain
    iteration (``method="sinkhorn"``) runs for ``reg >= SINKHORN_LOG_BELOW``, the log-domain one
    (``"sinkhorn_log"``) below, where the plain kernel underflows (the constant's comment has the measurement).
    A result with non-finite entries (not seen with this threshold) is recomputed in the log domain.

    Args:
        a, b: non-negative masses, each summing to 1, float64.
        cost: (n, m) finite ground cost, float64.
        reg: > 0, relative to ``cost.max()``.
        max_iter: Sinkhorn iterations at most.
        tol: stop when the column-marginal violation (L2) is below this.

    Returns:
        (T (n, m) float64, seconds in the solver, :class:`SinkhornResult`). A run that hits ``max_iter`` before
        ``tol`` warns (its plan has exact row marginals and approximate column marginals) and says so in the result.

    Raises:
        ValueError: ``reg`` not a finite number > 0, ``max_iter`` < 1, ``tol`` not > 0.
    """
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg <= 0:
        raise ValueError(f"reg must be a finite number > 0 (or None for exact transport); got {reg!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1; got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}")
    try:
        import ot
    except ImportError as exc:  # pragma: no cover - POT is installed in the dev environment
        raise ImportError("entropic OT (reg=) needs POT: pip install pot") from exc
    t0 = time.perf_counter()
    scale = float(cost.max()) if cost.numel() else 0.0
    c = cost / scale if scale > 0 else cost
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    method = "sinkhorn" if reg >= SINKHORN_LOG_BELOW else "sinkhorn_log"

    def run(m: str) -> tuple[np.ndarray, dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT's own warnings: convergence is reported below, overflow rechecked
            plan, log = ot.sinkhorn(an, bn, cn, float(reg), method=m, numItermax=max_iter, stopThr=tol, log=True,
                                    warn=False)  # fmt: skip
        return np.asarray(plan, dtype=np.float64), log

    plan, log = run(method)
    if method == "sinkhorn" and not np.isfinite(plan).all():
        method = "sinkhorn_log"
        plan, log = run(method)
    errs = log.get("err") or [float("inf")]
    err = float(errs[-1])
    res = SinkhornResult(method, float(reg), int(log.get("niter", 0)) + 1, err, err < tol, scale)
    if not np.isfinite(plan).all():
        raise ValueError(f"entropic transport ({method}, reg={reg}) produced non-finite values")
    if not res.converged:
        warnings.warn(
            f"Sinkhorn ({method}, reg={reg}) did not converge in {max_iter} iterations: column-marginal error "
            f"{err:.3g} >= tol={tol:g}; raise max_iter or reg (the plan's row marginals are exact)",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.from_numpy(plan), time.perf_counter() - t0, res


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block, then restore the setting.

    Coordinate descent issues thousands of tiny matmuls (n <= a few thousand); intra-op threads only add
    synchronisation. Measured on the 2-core VM under load ~8: weight matching of three ResNet-20 (1 block per
    stage) took 12.6 s with 2 threads and 0.39 s with 1.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def align_weights(
    target: Mapping[str, Tensor],
    member: Mapping[str, Tensor],
    graph: FusionGraph,
    perm: dict[str, Tensor],
    rng: np.random.Generator,
    max_iter: int = 100,
) -> tuple[dict[str, Tensor], int, float]:
    r"""Permutation coordinate descent (Git Re-Basin, Ainsworth et al. 2023, Alg. 1) aligning ``member`` to
    ``target`` (both key -> float64 tensor; target in slot order).

    For group g the permutation maximises :math:`\sum_{r \in g} \langle T_r, P W_{k,r} \rangle` with the other
    groups' axes permuted by their current permutations: one linear assignment on the similarity
    ``S = sum_r T_r W'_{k,r}^T`` (n, n), each reference's rows read with :func:`pyfusion.graph.neuron_view`. The
    coordinates are the tie sets: a tie set of unit groups (attention heads) is one unit-level assignment on the
    sum over its groups of the best inner matchings of each (unit, unit) block (:mod:`pyfusion.match.units`),
    so heads move whole and within-head dims only inside matched heads. Tie sets are visited in random order; a
    tie set's permutation changes only when it strictly improves the objective; the sweeps stop when one changes
    nothing (or after ``max_iter``).

    Args:
        perm: group -> (n,) long, the starting permutations (not modified).
        rng: the random group order.
        max_iter: the most sweeps.

    Returns:
        (permutations, sweeps done, seconds spent in the assignment solver).
    """
    with single_thread():
        return _align_weights(target, member, graph, perm, rng, max_iter)


def sorted_rows_start(
    target: Mapping[str, Tensor], member: Mapping[str, Tensor], graph: FusionGraph
) -> dict[str, Tensor]:  # fmt: skip
    r"""A start for :func:`align_weights` that no other group's permutation can mislead: for each group of plain
    neurons (a tie set of one group of unit size 1), the linear assignment maximising
    :math:`\sum_r \langle \operatorname{sort}(T_{r,i}), \operatorname{sort}(W_{k,r,j}) \rangle` over neuron pairs
    (i, j), each neuron's reference rows with their entries sorted -- a row's sorted entries do not change when the
    other axes are permuted, so a permuted copy is recovered exactly, group by group. Groups of units (attention
    heads) and tied groups start at the identity.

    Why: the descent's first sweep compares each group through the other groups' *current* permutations; two
    adjacent groups that start wrong can each be the other's best response (a bilinear local optimum). HF
    MobileNetV2 fused with its own permuted copy stopped there after 3-4 sweeps, 0.25-0.32 off the model, its last
    two groups (80 and 1280 neurons) wrong.

    Returns:
        group -> (n,) long, slot s of the target holds neuron ``perm[s]`` of the member.
    """
    by_key = graph.refs_by_key()
    ident = {name: torch.arange(g.size) for name, g in graph.groups.items()}
    maps = {name: Permutation(p) for name, p in ident.items()}
    out = dict(ident)
    with single_thread():
        for names in graph.tie_sets():
            if len(names) != 1 or graph.groups[names[0]].unit_size != 1:
                continue
            name = names[0]
            g = graph.groups[name]
            sim = torch.zeros(g.size, g.size, dtype=torch.float64)
            for fr, fm in aligned_features(target, member, graph, name, g.refs, maps, missing="keep", by_key=by_key):
                sim += fr.sort(dim=1).values @ fm.sort(dim=1).values.T
            _, cols = linear_assignment(sim, maximize=True)
            out[name] = torch.as_tensor(cols, dtype=torch.long)
    return out


def weight_alignment_objective(
    target: Mapping[str, Tensor], member: Mapping[str, Tensor], graph: FusionGraph, perm: Mapping[str, Tensor]
) -> float:
    r"""The weight-matching objective :math:`\sum_{\text{tensors } t} \langle T_t, \pi(W)_t \rangle` of the
    member permuted by ``perm`` (over the tensors in both states), the quantity :func:`align_weights` increases."""
    permuted = permuted_state(member, graph, perm)
    return float(sum((target[k] * permuted[k]).sum() for k in target if k in permuted))


def _align_weights(
    target: Mapping[str, Tensor],
    member: Mapping[str, Tensor],
    graph: FusionGraph,
    perm: dict[str, Tensor],
    rng: np.random.Generator,
    max_iter: int,
) -> tuple[dict[str, Tensor], int, float]:
    tie_sets = graph.tie_sets()
    by_key = graph.refs_by_key()
    perm = {k: v.clone() for k, v in perm.items()}
    solve_s = 0.0
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        changed = False
        for ti in rng.permutation(len(tie_sets)):
            names = tie_sets[ti]
            # every other axis through its group's current permutation, the tie set's own included: a tensor with
            # two axes in the tie set (a layer applied to its own output, as in a weight-shared block or a
            # recurrence) is compared at the current permutation of its other axis, which keeps the objective linear
            # in the permutation being solved (the linearisation of <T, P W P^T> at the current P). Leaving that
            # axis unpermuted instead compared the member's columns in their own order with the target's in slot
            # order on every sweep, so the descent never moved from its first guess (a weight-shared block fused
            # with its permuted copy was 0.5 off)
            maps = {name: Permutation(p) for name, p in perm.items()}
            sims: dict[str, Tensor] = {}
            for name in names:
                g = graph.groups[name]
                sim = torch.zeros(g.size, g.size, dtype=torch.float64)
                feats = aligned_features(target, member, graph, name, g.refs, maps, missing="keep", by_key=by_key)
                for fr, fm in feats:
                    sim += fr @ fm.T
                sims[name] = sim
            t0 = time.perf_counter()
            if len(names) == 1 and graph.groups[names[0]].unit_size == 1:
                _, cols = linear_assignment(sims[names[0]], maximize=True)
                new = {names[0]: torch.as_tensor(cols, dtype=torch.long)}
            else:  # whole units, the best inner matching inside each pair (pyfusion.match.units)
                (uc,), _ = tie_set_costs(graph, [sims], maximize=True)
                _, cols = linear_assignment(uc.cost, maximize=True)
                new = neuron_perms(graph, uc, cols)
            solve_s += time.perf_counter() - t0
            old_val = sum(float(sims[n][torch.arange(len(perm[n])), perm[n]].sum()) for n in names)
            new_val = sum(float(sims[n][torch.arange(len(new[n])), new[n]].sum()) for n in names)
            if new_val > old_val + 1e-12 * max(1.0, abs(old_val)):
                perm.update(new)
                changed = True
        if not changed:
            break
    return perm, sweeps, solve_s
