"""pyfusion.match: plans made directly give the same network as pyfusion.fuse, and the layout follows alpha."""

from __future__ import annotations

import torch

import pyfusion
from pyfusion.fuse.builder import build
from pyfusion.graph import permuted_state, trace_groups
from pyfusion.models import mlp


def _members(k: int = 2) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(mlp([12, 10, 10, 4]).double())
    return out


def test_partial_plan_builds_the_network_fuse_returns():
    members = _members()
    graph = trace_groups(members[0])
    plan = pyfusion.match.partial_plan(members, graph, (0.5, 0.5), None, alpha=0.4, features="weights")
    direct = build(members, graph, plan)
    fused = pyfusion.fuse(members, method="partial", alpha=0.4, features="weights", fast_modules=False)
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(direct(x), fused(x), rtol=0, atol=1e-12)
    for gp in plan.groups.values():
        iso = int(0.4 * 10 + 0.5)
        assert gp.layout == (10 - iso, iso, iso)


def test_weight_matching_plan_is_a_permutation_per_member():
    members = _members(3)
    graph = trace_groups(members[0])
    plan = pyfusion.match.weight_matching_plan(members, graph, (1 / 3, 1 / 3, 1 / 3))
    for gp in plan.groups.values():
        for a, b in zip(gp.A, gp.B):
            p = a * 3
            torch.testing.assert_close(p.sum(0), torch.ones(p.shape[1], dtype=p.dtype))
            torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype))
            torch.testing.assert_close(b, p.T)


# ---------------------------------------------------------------------------------------------------------------
# the match layer's building blocks against float64 references
# ---------------------------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pyfusion import match  # noqa: E402
from pyfusion.models import vgg  # noqa: E402


def test_sqdist_and_correlation_cost_match_float64_references():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3 + 100.0  # an offset: the GEMM form cancels
    b = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    ref = torch.tensor([[float(((x - y) ** 2).sum()) for y in b] for x in a], dtype=torch.float64)
    torch.testing.assert_close(match.sqdist(a, b), ref, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(match.sqdist(a, b, exact=True), ref, rtol=1e-13, atol=0)
    same = match.sqdist(a, a, exact=True)
    assert torch.equal(torch.diagonal(same), torch.zeros(7, dtype=torch.float64))  # identical rows: exactly 0
    assert bool((match.sqdist(a, a) >= 0).all())  # negative rounding clamped
    corr = np.corrcoef(np.concatenate([a.numpy(), b.numpy()]))[:7, 7:]
    torch.testing.assert_close(match.correlation_cost(a, b), torch.as_tensor(1 - corr), rtol=1e-12, atol=1e-12)
    const = torch.full((1, 5), 2.0, dtype=torch.float64)
    assert torch.equal(match.correlation_cost(const, b), torch.ones(1, 4, dtype=torch.float64))


def test_combine_costs_normalises_each_side():
    c1 = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    c2 = torch.tensor([[10.0, 30.0]], dtype=torch.float64)
    torch.testing.assert_close(match.combine_costs([c1, c2]), torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert match.combine_costs([c1]) is c1
    zero = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(match.combine_costs([zero, c1]), (zero + c1 / 4) / 2)
    with pytest.raises(ValueError, match="at least one"):
        match.combine_costs([])


def _vgg_pair():
    torch.manual_seed(4)
    m = vgg((3, "M", 4, "M"), in_channels=2, image_size=8, hidden=5).double()  # conv -> flatten (expand 4) -> fc
    graph = trace_groups(m)
    gen = torch.Generator().manual_seed(5)
    perm = {name: torch.randperm(g.size, generator=gen) for name, g in graph.groups.items()}
    state = {k: v.detach() for k, v in m.named_parameters()}
    inv = {name: torch.argsort(p) for name, p in perm.items()}
    member = permuted_state(state, graph, inv)  # member neuron inv[s] is reference neuron s ... slot s = perm
    return graph, state, member, perm


def test_the_three_alignments_agree_on_a_permutation():
    graph, ref, member, perm = _vgg_pair()
    # member's neuron perm[s] sits in slot s  <=>  pairs (s, perm[s])  <=>  soft map P with P[s, perm[s]] = 1
    as_perm = {g: match.Permutation(p) for g, p in perm.items()}
    as_pairs = {g: match.MatchedPairs(np.arange(len(p)), p.numpy()) for g, p in perm.items()}
    as_soft = {}
    for g, p in perm.items():
        m = torch.zeros(len(p), len(p), dtype=torch.float64)
        m[torch.arange(len(p)), p] = 1.0
        as_soft[g] = match.SoftMap(m.T.contiguous().T)  # a transposed (non-contiguous) map must work too
    for name, g in graph.groups.items():
        for refs in (g.producers, g.consumers, g.refs):
            views = [
                match.aligned_features(ref, member, graph, name, refs, maps) for maps in (as_perm, as_pairs, as_soft)
            ]
            assert len(views[0]) == len(views[1]) == len(views[2]) > 0
            for (r0, m0), (r1, m1), (r2, m2) in zip(*views):
                assert torch.equal(r0, r1) and torch.equal(r0, r2)
                assert torch.equal(m0, m1) and torch.equal(m0, m2)
            # aligned through the other groups, member rows are the reference rows in the member's order
            for r0, m0 in views[0]:
                assert torch.equal(m0[perm[name]], r0)


def test_missing_maps_drop_or_keep_the_tensor():
    graph, ref, member, perm = _vgg_pair()
    names = list(graph.groups)
    second = graph.groups[names[1]]  # its producer reads the first group
    none = match.aligned_features(ref, member, graph, names[1], second.producers, {}, missing="drop")
    kept = match.aligned_features(ref, member, graph, names[1], second.producers, {}, missing="keep")
    assert [r.shape for r, _ in none] == [r.shape for r, _ in kept if r.shape[1] == 1]  # only the bias survives
    assert len(kept) == len(second.producers)
    with pytest.raises(ValueError, match="missing must be"):
        match.aligned_features(ref, member, graph, names[1], second.producers, {}, missing="skip")


def test_weight_costs_and_partial_assignment_recover_a_permuted_copy():
    graph, ref, member, perm = _vgg_pair()
    states = [ref, member]
    num = {name: g.size for name, g in graph.groups.items()}
    for pcd in (False, True):
        assigns, sweeps, _ = match.partial_weight_assignments(states, graph, 0, num, pcd=pcd, sweeps=5, cost="sqdist")
        for name, asg in assigns.items():
            ri, ci = asg.shared_pairs(1, 0)
            assert asg.layout == (graph.groups[name].size, 0, 0)
            assert torch.equal(torch.as_tensor(ci)[torch.argsort(torch.as_tensor(ri))], perm[name])
    with pytest.raises(ValueError, match=r"partial fusion: cost matrix 0 has NaN or inf values"):
        match.partial_assignments([torch.full((2, 2), float("nan"), dtype=torch.float64)], [1])


def test_align_weights_recovers_a_permutation():
    graph, ref, member, perm = _vgg_pair()
    start = {name: torch.arange(g.size) for name, g in graph.groups.items()}
    got, sweeps, _ = match.align_weights(ref, member, graph, start, np.random.default_rng(0))
    assert sweeps >= 1
    for name in graph.groups:
        assert torch.equal(got[name], perm[name])


def test_transport_objective_equals_pot():
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(6)
    cost = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    u = torch.full((6,), 1 / 6, dtype=torch.float64)
    t, _ = match.transport(u, u, cost, uniform=True)
    assert torch.equal((t > 0).sum(0), torch.ones(6, dtype=torch.long))  # a permutation / n
    assert abs(float((t * cost).sum()) - ot.emd2(u.numpy(), u.numpy(), cost.numpy())) < 1e-12
    a = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(4, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    t, _ = match.transport(a, b, cost[:, :4].contiguous(), uniform=False)
    torch.testing.assert_close(t.sum(1), a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t.sum(0), b, rtol=1e-9, atol=1e-12)
    assert abs(float((t * cost[:, :4]).sum()) - ot.emd2(a.numpy(), b.numpy(), cost[:, :4].numpy())) < 1e-12


def test_slot_alignment_cost_is_the_squared_distance_of_slot_targets():
    from pyfusion.match.interp import slot_alignment_cost

    gen = torch.Generator().manual_seed(7)
    outs = [torch.randn(20, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    maps_a = [torch.rand(4, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    z = torch.cat(outs, 1)
    targets = sum(o @ a.T for o, a in zip(outs, maps_a))  # (N, slots)
    ref = [[float(((targets[:, c] - outs[0][:, j]) ** 2).sum()) for j in range(4)] for c in range(4)]
    ref = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(slot_alignment_cost(maps_a, z.T @ z), ref, rtol=1e-10, atol=1e-10)
