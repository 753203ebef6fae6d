"""The solver calls of the matching methods: assignment, partial assignment, optimal transport, coordinate descent.

The engines are ops (:func:`pyfusion.ops.linear_assignment`) or POT; these functions are the one place where the
methods call them: they check the costs (a NaN cost is an error naming the problem, never a silent guess), batch
the problems, and time the solver for ``fusion_info``. The k-means engine, :func:`pyfusion.ops.weighted_kmeans`,
takes a Gram matrix and weights directly and needs no wrapper (``pyfusion.match.weighted_kmeans`` is that op).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pyfusion.graph.groups import FusionGraph
from pyfusion.match.align import Permutation, aligned_features
from pyfusion.match.units import neuron_perms, tie_set_costs
from pyfusion.ops.assignment import linear_assignment

__all__ = [
    "align_weights",
    "assignments",
    "check_finite",
    "partial_assignments",
    "single_thread",
    "transport",
]


def check_finite(cost: Tensor, what: str) -> None:
    """Raise ``ValueError(f"{what} has NaN or inf values")`` unless every entry of ``cost`` is finite."""
    if not bool(torch.isfinite(cost).all()):
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
    problems are one batched call of :func:`pyfusion.ops.linear_assignment` (``num_matches=``).

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
            inside = set(names)
            # every other group's axes through its current permutation; the tie set's own other axes (a tensor with
            # two axes in it) stay as they are, which keeps the objective linear in the tie set's permutation
            maps = {name: Permutation(p) for name, p in perm.items() if name not in inside}
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
