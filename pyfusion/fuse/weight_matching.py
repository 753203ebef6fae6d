"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, Alg. 1): permutation coordinate descent over groups.

For one group g and member k aligned to a target ``T`` (in slot order), the permutation maximises
``sum_{refs r of g} <T_r, P W_{k,r} (other axes permuted)>``, a linear assignment on the similarity
``S = sum_r T_r W'_{k,r}^T`` (n x n; each tensor viewed with g's axis first, flattened per neuron). Groups are
visited in random order; a group's permutation only changes when it strictly improves the objective, and the
sweeps stop when a full sweep changes nothing (or after ``max_iter`` sweeps).

K > 2 (MergeMany rule, documented): every member k >= 1 is first aligned to member 0 as above; then, in rounds,
each member (in random order) is re-aligned to the running average of the *other* members (each already
permuted into slot order), until a round changes no permutation (or ``max_rounds``). For K = 2 this is exactly
the pairwise algorithm (member 0 defines the slot order).
Only parameters enter the objective (BatchNorm running statistics do not; they are permuted along).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import AxisRef, FusionGraph
from pyfusion.ops import linear_assignment

__all__ = ["weight_matching_plan", "permute_state", "align_weights"]


def _index(ref: AxisRef, perm: Tensor) -> Tensor:
    if ref.expand == 1:
        return perm
    return (perm[:, None] * ref.expand + torch.arange(ref.expand)).reshape(-1)


def permute_state(
    state: Mapping[str, Tensor], graph: FusionGraph, perm: Mapping[str, Tensor], skip: str | None = None
) -> dict[str, Tensor]:
    """Member tensors moved into slot order: along every group axis, ``t' = t.index_select(axis, perm[g])``.

    Args:
        state: key -> tensor of one member.
        graph: neuron groups.
        perm: group -> (n,) long tensor, slot s holds neuron ``perm[g][s]``.
        skip: a group left unpermuted.
    """
    out = dict(state)
    for g in graph.groups.values():
        if g.name == skip or g.name not in perm:
            continue
        for r in g.refs:
            if r.key in out:
                out[r.key] = out[r.key].index_select(r.axis, _index(r, perm[g.name]))
    return out


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


def _flat(t: Tensor, axis: int, n: int) -> Tensor:
    return t.movedim(axis, 0).reshape(n, -1)


def align_weights(
    target: Mapping[str, Tensor],
    member: Mapping[str, Tensor],
    graph: FusionGraph,
    perm: dict[str, Tensor],
    rng: np.random.Generator,
    max_iter: int = 100,
) -> tuple[dict[str, Tensor], int, float]:
    """Coordinate descent aligning ``member`` to ``target`` (both key -> float64 tensor; target in slot order).

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
    names = list(graph.groups)
    perm = {k: v.clone() for k, v in perm.items()}
    solve_s = 0.0
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        changed = False
        for gi in rng.permutation(len(names)):
            g = graph.groups[names[gi]]
            moved = permute_state({r.key: member[r.key] for r in g.refs if r.key in target}, graph, perm, skip=g.name)
            sim = torch.zeros(g.size, g.size, dtype=torch.float64)
            for r in g.refs:
                if r.key not in target:
                    continue
                sim += _flat(target[r.key], r.axis, g.size) @ _flat(moved[r.key], r.axis, g.size).T
            t0 = time.perf_counter()
            _, cols = linear_assignment(sim, maximize=True)
            solve_s += time.perf_counter() - t0
            new = torch.as_tensor(cols, dtype=torch.long)
            ar = torch.arange(g.size)
            old_val, new_val = sim[ar, perm[g.name]].sum(), sim[ar, new].sum()
            if new_val > old_val + 1e-12 * max(1.0, abs(float(old_val))):
                perm[g.name] = new
                changed = True
        if not changed:
            break
    return perm, sweeps, solve_s


@register_method("weight_matching", needs_data="optional", summary="Git Re-Basin weight matching (coordinate descent)")
def weight_matching_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any = None,
    *,
    seed: int = 0,
    max_iter: int = 100,
    max_rounds: int = 20,
) -> Plan:
    """Weight matching plan: ``A_k = lambda_k P_k``, ``B_k = P_k^T`` with P_k from permutation coordinate descent.

    Args:
        seed: seed of the random group order.
        max_iter: sweeps per alignment.
        max_rounds: K > 2 only: running-average rounds.
    """
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    params = {n for n, _ in members[0].named_parameters()}
    states = [{n: t.detach().to("cpu", torch.float64) for n, t in m.named_parameters() if n in params} for m in members]
    ident = {name: torch.arange(g.size) for name, g in graph.groups.items()}
    perms = [dict(ident) for _ in members]
    solve_s, sweeps = 0.0, []
    for k in range(1, len(members)):
        perms[k], it, s = align_weights(states[0], states[k], graph, perms[k], rng, max_iter)
        solve_s += s
        sweeps.append(it)
    rounds = 0
    if len(members) > 2:
        for _ in range(max_rounds):
            rounds += 1
            changed = False
            for k in rng.permutation(len(members)):
                others = [permute_state(states[j], graph, perms[j]) for j in range(len(members)) if j != k]
                target = {key: sum(o[key] for o in others) / len(others) for key in states[k]}
                new, it, s = align_weights(target, states[k], graph, perms[k], rng, max_iter)
                solve_s += s
                sweeps.append(it)
                if any(not torch.equal(new[g], perms[k][g]) for g in new):
                    changed = True
                perms[k] = new
            if not changed:
                break
    plan = Plan.from_permutations(graph, {g: [p[g] for p in perms] for g in graph.groups}, lambdas)
    total = time.perf_counter() - t_start
    plan.info.update(
        method="weight_matching", sweeps=sweeps, rounds=rounds, time_solve_s=solve_s, time_stats_s=0.0,
        time_match_s=total,
    )  # fmt: skip
    return plan
