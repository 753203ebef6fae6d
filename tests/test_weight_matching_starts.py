"""Weight matching's starts (``WeightMatchingConfig.starts``): the descent from the identity stops in a bilinear
local optimum on some models (two adjacent groups each the other's best response); the sorted-rows start
(:func:`pyfusion.match.solvers.sorted_rows_start`) does not depend on other groups' permutations, and the start with
the highest objective is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _audit import random_model, rel, run, state, unchanged

import pyfusion
from pyfusion.graph import trace_groups
from pyfusion.match.solvers import align_weights, sorted_rows_start, weight_alignment_objective
from pyfusion.models import mlp
from pyfusion.testing import permuted_copy

F64 = torch.float64


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to(F64) for n, t in m.named_parameters(remove_duplicate=False)}


def _mobilenet_v2():
    tf = pytest.importorskip("transformers")
    cfg = tf.MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.25, num_labels=3)
    return random_model(tf.MobileNetV2ForImageClassification(cfg), 1)


def _undoes(perm: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], name: str) -> bool:
    """Whether aligning the permuted copy by ``perm`` gives the model's order back (slot s holds the copy's neuron
    whose original index is s)."""
    return torch.equal(truth[name][perm[name]], torch.arange(len(perm[name])))


@pytest.mark.parametrize("which", ["mlp", "mobilenet_v2"])
def test_sorted_rows_start_recovers_a_permuted_copy(which):
    torch.manual_seed(0)
    model = mlp([10, 16, 12, 3]).double() if which == "mlp" else _mobilenet_v2()
    x = torch.randn(4, 10, dtype=F64) if which == "mlp" else torch.randn(4, 3, 16, 16, dtype=F64)
    graph = trace_groups(model, x)
    twin, truth = permuted_copy(model, torch.Generator().manual_seed(3), graph=graph, return_permutations=True)
    start = sorted_rows_start(_params(model), _params(twin), graph)
    plain = [n for n, g in graph.groups.items() if g.unit_size == 1]
    assert plain and all(_undoes(start, truth, n) for n in plain)


def test_identity_start_alone_stops_in_a_local_optimum_that_the_sorted_start_avoids():
    """HF MobileNetV2 and its permuted copy: from the identity the descent stops with its last two groups wrong (a
    lower objective); with both starts the model comes back exactly, and fusion_info says which start was kept."""
    a = _mobilenet_v2()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=F64)
    graph = trace_groups(a, x)
    b = permuted_copy(a, torch.Generator().manual_seed(0), graph=graph)
    before = [state(a), state(b)]
    ident = {n: torch.arange(gr.size) for n, gr in graph.groups.items()}
    perm, _, _ = align_weights(_params(a), _params(b), graph, ident, np.random.default_rng(0), 100)
    assert weight_alignment_objective(_params(a), _params(b), graph, perm) < weight_alignment_objective(
        _params(a), _params(a), graph, ident
    )
    old = pyfusion.fuse([a, b], None, method="weight_matching", graph=graph, starts=("identity",))
    assert rel(run(old, x), run(a, x)) > 1e-3
    fused = pyfusion.fuse([a, b], None, method="weight_matching", graph=graph)
    assert rel(run(fused, x), run(a, x)) < 1e-10
    starts = fused.fusion_info["starts"]
    assert [(s["start"], s["kept"]) for s in starts] == [("identity", False), ("sorted_rows", True)]
    assert old.fusion_info["starts"][0]["objective"] == starts[0]["objective"]
    # the objective at the model itself is the largest possible: ||W||^2 summed over its tensors
    best = weight_alignment_objective(_params(a), _params(a), graph, ident)
    assert abs(starts[1]["objective"] - best) <= 1e-9 * best and starts[0]["objective"] < best
    assert unchanged(a, before[0]) and unchanged(b, before[1])


def test_the_kept_start_has_the_highest_objective_and_identity_alone_is_the_old_rule():
    """K = 3 independent random MLPs: each start runs the whole K-member rule; the kept one has the highest total
    objective sum_{j < k} <pi_j W_j, pi_k W_k>, and the identity start alone gives the fusion its run gives."""
    torch.manual_seed(0)
    members = [mlp([8, 24, 24, 3]).double() for _ in range(3)]
    x = torch.randn(16, 8, dtype=F64)
    fused = pyfusion.fuse(members, None, method="weight_matching")
    starts = fused.fusion_info["starts"]
    assert [s["start"] for s in starts] == ["identity", "sorted_rows"] and sum(s["kept"] for s in starts) == 1
    kept = next(s for s in starts if s["kept"])
    assert kept["objective"] >= max(s["objective"] for s in starts) * (1 - 1e-12)
    # the reported objective is the fused permutations' own: recompute it from the plan's permutations
    plan = fused.fusion_plan
    perms = [{n: plan.groups[n].perms[k] for n in plan.groups} for k in range(3)]
    states = [_params(m) for m in members]
    graph = trace_groups(members[0], x)
    permuted = [pyfusion.graph.permuted_state(st, graph, p) for st, p in zip(states, perms)]
    total = sum(float((permuted[j][t] * permuted[k][t]).sum()) for k in range(3) for j in range(k) for t in states[0])
    assert abs(total - kept["objective"]) <= 1e-9 * abs(total)
    alone = pyfusion.fuse(members, None, method="weight_matching", starts=("identity",))
    assert alone.fusion_info["starts"][0]["objective"] == starts[0]["objective"]
    if starts[0]["kept"]:
        assert rel(run(alone, x), run(fused, x)) == 0.0
    else:  # the sorted start won: a different, higher-objective alignment
        assert rel(run(alone, x), run(fused, x)) > 0.0
