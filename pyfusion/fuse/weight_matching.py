"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, Alg. 1): permutation coordinate descent over groups.

For one group g and member k aligned to a target ``T`` (in slot order), the permutation maximises
``sum_{refs r of g} <T_r, P W_{k,r} (other axes permuted)>``, a linear assignment on the similarity
``S = sum_r T_r W'_{k,r}^T`` (n x n; each tensor viewed with g's axis first, flattened per neuron). Groups are
visited in random order; a group's permutation only changes when it strictly improves the objective, and the
sweeps stop when a full sweep changes nothing (or after ``max_iter`` sweeps).

Units and ties (attention heads): the coordinates of the descent are the tie sets; a tie set's permutation is one
unit-level assignment on the sum over its groups of the best inner matchings (within-head dims) of each pair of
units, so q, k, v rows and the output projection's columns move with their head (:mod:`pyfusion.match.units`).
Weights are read through every segment and factor pattern (:func:`pyfusion.graph.neuron_view`): GPT-2's packed
``c_attn`` (q | k in the q/k group, v in the v/o group), grouped-query heads (a unit is a key/value head with its
query heads; rotary q/k dims are pinned reps), tied embeddings (both names of the tensor contribute).

K > 2 (MergeMany rule, documented): every member k >= 1 is first aligned to member 0 as above; then, in rounds,
each member (in random order) is re-aligned to the running average of the *other* members (each already
permuted into slot order), until a round changes no permutation (or ``max_rounds``). For K = 2 this is exactly
the pairwise algorithm (member 0 defines the slot order).
Only parameters enter the objective (BatchNorm running statistics do not; they are permuted along).

Starts (:attr:`WeightMatchingConfig.starts`): the rule above runs once per start -- the alignments to member 0 begin
at the identity, or at each group matched on its sorted weight rows (:func:`pyfusion.match.solvers.sorted_rows_start`)
-- and the permutations with the highest total objective ``sum_{j < k} <pi_j(W_j), pi_k(W_k)>`` are kept.

The coordinate descent itself is :func:`pyfusion.match.solvers.align_weights`; this module is the K-member rule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.config import WeightMatchingConfig
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.transform import permuted_state
from pyfusion.match.solvers import align_weights, sorted_rows_start

__all__ = ["weight_matching_plan"]


@register_method(
    "weight_matching",
    config=WeightMatchingConfig,
    needs_data="optional",
    summary="Git Re-Basin weight matching (coordinate descent)",
)
def weight_matching_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any,
    config: WeightMatchingConfig,
) -> Plan:
    """Weight matching plan: ``A_k = lambda_k P_k``, ``B_k = P_k^T`` with P_k from permutation coordinate descent
    (options: :class:`WeightMatchingConfig`: ``seed``, ``max_iter``, ``max_rounds``, ``starts``).

    The whole K-member rule runs once per start; the permutations with the highest total objective
    ``sum_{j < k} <pi_j(W_j), pi_k(W_k)>`` over the parameter tensors are kept (ties: the earlier start). For K = 2
    that is member 1's objective against member 0. ``plan.info["starts"]``: one entry per start (its objective,
    sweeps, rounds, and whether it was kept)."""
    seed, max_iter, max_rounds = config.seed, config.max_iter, config.max_rounds
    t_start = time.perf_counter()
    # every name of a tied tensor (GPT-2's wte / lm_head): each carries its own references
    states = [
        {n: t.detach().to("cpu", torch.float64) for n, t in m.named_parameters(remove_duplicate=False)} for m in members
    ]
    solve_s = 0.0
    best: tuple[float, list[dict[str, Tensor]], list[int], int] | None = None
    chosen: list[dict[str, Any]] = []
    for i, start in enumerate(config.starts):
        # the identity start draws from ``rng`` as before the starts existed; the others have their own stream
        rng = np.random.default_rng(seed if start == "identity" else (seed, i))
        perms, sweeps, rounds, s = _merge_many(states, graph, start, rng, max_iter, max_rounds)
        solve_s += s
        permuted = [permuted_state(st, graph, p) for st, p in zip(states, perms)]
        value = sum(
            float(sum((permuted[j][key] * permuted[k][key]).sum() for key in states[0]))
            for k in range(len(states)) for j in range(k)
        )  # fmt: skip
        if best is None or value > best[0] + 1e-12 * max(1.0, abs(best[0])):
            best = (value, perms, sweeps, rounds)
            for c in chosen:
                c["kept"] = False
        chosen.append(
            {"start": start, "objective": value, "sweeps": sweeps, "rounds": rounds, "kept": best[1] is perms}
        )
    assert best is not None  # the config has at least one start
    _, perms, sweeps, rounds = best
    plan = Plan.from_permutations(graph, {g: [p[g] for p in perms] for g in graph.groups}, lambdas)
    total = time.perf_counter() - t_start
    plan.info.update(
        method="weight_matching", sweeps=sweeps, rounds=rounds, starts=chosen, time_solve_s=solve_s, time_stats_s=0.0,
        time_match_s=total,
    )  # fmt: skip
    return plan


def _merge_many(
    states: list[dict[str, Tensor]], graph: FusionGraph, start: str, rng: np.random.Generator, max_iter: int,
    max_rounds: int,
) -> tuple[list[dict[str, Tensor]], list[int], int, float]:  # fmt: skip
    """The K-member rule (module docstring) from one start: (permutations, sweeps per alignment, rounds, seconds
    in the assignment solver)."""
    ident = {name: torch.arange(g.size) for name, g in graph.groups.items()}
    perms = [dict(ident) for _ in states]
    solve_s, sweeps = 0.0, []
    for k in range(1, len(states)):
        p0 = perms[k] if start == "identity" else sorted_rows_start(states[0], states[k], graph)
        perms[k], it, s = align_weights(states[0], states[k], graph, p0, rng, max_iter)
        solve_s += s
        sweeps.append(it)
    rounds = 0
    if len(states) > 2:
        for _ in range(max_rounds):
            rounds += 1
            changed = False
            for k in rng.permutation(len(states)):
                others = [permuted_state(states[j], graph, perms[j]) for j in range(len(states)) if j != k]
                target = {key: sum(o[key] for o in others) / len(others) for key in states[k]}
                new, it, s = align_weights(target, states[k], graph, perms[k], rng, max_iter)
                solve_s += s
                sweeps.append(it)
                if any(not torch.equal(new[g], perms[k][g]) for g in new):
                    changed = True
                perms[k] = new
            if not changed:
                break
    return perms, sweeps, rounds, solve_s
