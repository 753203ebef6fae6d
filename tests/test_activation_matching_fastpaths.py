"""Issue 15 item 1, activation matching end to end: the permutation maps of Plan.from_permutations are made on first
read (PermutationMaps), and the builder's permutation path reads the permutations of maps never made. Every fast
path is compared bit for bit with the dense maps it replaces."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _trained import family_pair

import pyfusion
import pyfusion.fuse.builder as builder
import pyfusion.fuse.permuted as permuted
import pyfusion.fuse.plan as plan_mod
from pyfusion import models
from pyfusion.fuse.plan import PermutationMaps, Plan, pristine_map
from pyfusion.graph.trace import trace_groups


def _family(name: str):
    return family_pair(name)


def _perms(graph, seed: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: [torch.randperm(gr.size, generator=g), torch.randperm(gr.size, generator=g)]
            for name, gr in graph.groups.items()}  # fmt: skip


def _dense_copy(plan: Plan) -> Plan:
    """The same plan with every map an ordinary dense tensor in a plain list (what from_permutations made before)."""
    out = copy.deepcopy(plan)
    for gp in out.groups.values():
        gp.A = [a.clone() for a in gp.A]
        gp.B = [b.clone() for b in gp.B]
    return out


def test_permutation_maps_are_made_on_first_read():
    m = models.mlp([5, 7, 3])
    graph = trace_groups(m, torch.randn(2, 5))
    perms = _perms(graph, 0)
    plan = Plan.from_permutations(graph, perms, (0.25, 0.75))
    name = next(iter(graph.groups))
    gp = plan.groups[name]
    p = perms[name][1]
    n = p.numel()
    assert isinstance(gp.A, PermutationMaps) and isinstance(gp.B, PermutationMaps) and len(gp.A) == 2
    assert gp.slots == n and gp.A.shape(1) == (n, n)
    plan.validate(graph)
    assert all(pristine_map(gp.A, k) and pristine_map(gp.B, k) for k in range(2))  # nothing read them
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.equal(gp.A[1], 0.75 * eye[p]) and torch.equal(gp.A[-1], gp.A[1])
    assert torch.equal(gp.B[1], eye[p].T)
    assert not pristine_map(gp.A, 1) and pristine_map(gp.A, 0)
    assert gp.A[1] is gp.A[1]  # made once: in-place edits stay
    assert [t.shape for t in gp.A[:]] == [(n, n), (n, n)]
    with pytest.raises(IndexError):
        gp.A[2]
    assert list(gp.A[0].argmax(1)) == list(perms[name][0])


@pytest.mark.parametrize("family", ["mlp", "vgg_bn", "resnet"])
def test_lazy_permutation_plan_builds_the_dense_plan_bit_for_bit(family):
    members, example = _family(family)
    graph = trace_groups(members[0], example)
    plan = Plan.from_permutations(graph, _perms(graph, 1), (0.3, 0.7))
    dense = _dense_copy(plan)
    lazy = builder.build(members, graph, plan)
    want = builder.build(members, graph, dense)
    got_sd, want_sd = lazy.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for key in want_sd:
        assert got_sd[key].dtype == want_sd[key].dtype and torch.equal(got_sd[key], want_sd[key]), key
    torch.testing.assert_close(lazy(example), want(example), rtol=0, atol=0)
    assert lazy.fusion_module_layouts == want.fusion_module_layouts
    if graph.is_simple:  # the permutation path read the permutations, the maps were never made
        assert all(pristine_map(gp.A, k) for gp in plan.groups.values() for k in range(2))


def test_maps_read_and_changed_in_place_are_the_truth():
    members, example = _family("mlp")
    graph = trace_groups(members[0], example)
    plan = Plan.from_permutations(graph, _perms(graph, 2), (0.5, 0.5))
    name = next(iter(graph.groups))
    a = plan.groups[name].A[1]
    a.mul_(0.5).add_(0.01)  # a soft map now: the permutation path must decline, the general path reads the map
    assert permuted.permutation_maps(graph, plan) is None
    assert not builder.is_permutation_plan(plan.groups[name], plan.lambdas)
    got = builder.build(members, graph, plan)
    want = builder.build(members, graph, _dense_copy(plan))
    for key, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], t), key
    # a map replaced by assignment is the truth too
    plan2 = Plan.from_permutations(graph, _perms(graph, 3), (0.5, 0.5))
    gp = plan2.groups[name]
    q = gp.perms[1].roll(1)
    n = q.numel()
    gp.A[1] = 0.5 * torch.eye(n, dtype=torch.float64)[q]
    gp.B[1] = torch.eye(n, dtype=torch.float64)[q].T.contiguous()
    assert torch.equal(permuted.permutation_maps(graph, plan2)[name][1][0], q)


def test_lazy_maps_are_validated():
    m = models.mlp([5, 7, 3])
    graph = trace_groups(m, torch.randn(2, 5))
    name = next(iter(graph.groups))
    bad = Plan.from_permutations(graph, _perms(graph, 0), (0.5, math.nan))
    with pytest.raises(ValueError, match="NaN or inf"):
        bad.validate(graph)
    other = trace_groups(models.mlp([5, 9, 3]), torch.randn(2, 5))
    wrong = Plan.from_permutations(other, _perms(other, 0), (0.5, 0.5))
    wrong.groups = {name: next(iter(wrong.groups.values()))}
    with pytest.raises(ValueError, match=r"A\[0\] must have shape \(9, 7\)"):
        wrong.validate(graph)


@pytest.mark.parametrize("family", ["mlp", "vgg_bn"])
def test_activation_matching_is_the_dense_maps_fusion_bit_for_bit(family, monkeypatch):
    members, example = _family(family)
    data = [torch.randn(32, *example.shape[1:]) for _ in range(3)]
    fused = pyfusion.fuse(members, data, method="activation_matching")
    # the dense maps as before: every map made at once, the builder checks them
    real = plan_mod.Plan.from_permutations.__func__

    def dense_from_permutations(cls, graph, perms, lambdas):
        return _dense_copy(real(cls, graph, perms, lambdas))

    monkeypatch.setattr(plan_mod.Plan, "from_permutations", classmethod(dense_from_permutations))
    want = pyfusion.fuse(members, data, method="activation_matching")
    assert not isinstance(next(iter(want.fusion_plan.groups.values())).A, PermutationMaps)
    got_sd = fused.state_dict()
    for key, t in want.state_dict().items():
        assert got_sd[key].dtype == t.dtype and torch.equal(got_sd[key], t), key
    torch.testing.assert_close(fused(example), want(example), rtol=0, atol=0)


def test_slot_order_of_k3_permutation_plans_makes_no_map_and_equals_the_dense_plans():
    """K >= 3: ordering the shared slots by member subset reads the masks of never-made permutation maps from their
    permutations (every slot is every member's), so it makes none, and moves nothing, as on the dense maps."""
    from pyfusion.fuse.fast import _slot_masks, order_shared_slots

    members, example = _family("mlp")
    members.append(copy.deepcopy(members[0]))
    graph = trace_groups(members[0], example)
    g = torch.Generator().manual_seed(3)
    perms = {n: [torch.randperm(gr.size, generator=g) for _ in range(3)] for n, gr in graph.groups.items()}
    plan = Plan.from_permutations(graph, perms, (0.2, 0.3, 0.5))
    dense = _dense_copy(plan)
    assert order_shared_slots(plan, graph) is plan
    assert order_shared_slots(dense, graph) is dense
    for name, gp in plan.groups.items():
        assert all(gp.A.pristine(k) and gp.B.pristine(k) for k in range(3)), name
        assert _slot_masks(gp) == _slot_masks(dense.groups[name]) == [0b111] * gp.slots


def test_permutation_maps_behave_as_lists():
    m = models.mlp([5, 7, 3])
    graph = trace_groups(m, torch.randn(2, 5))
    gp = next(iter(Plan.from_permutations(graph, _perms(graph, 4), (0.5, 0.5)).groups.values()))
    both = gp.A + gp.B
    assert isinstance(both, list) and len(both) == 4 and torch.equal(both[2], gp.B[0])
    assert len([torch.eye(7)] + gp.A) == 3
    gp.B.append(torch.zeros(7, 7, dtype=torch.float64))
    assert len(gp.B) == 3 and not pristine_map(gp.B, 0) and torch.equal(gp.B[0], both[2])
    del gp.B[2]
    assert len(gp.B) == 2
    stacked = torch.stack(list(gp.A))
    assert stacked.shape == (2, 7, 7) and torch.equal(stacked[1], gp.A[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_permutation_path_with_identity_perms_leaves_the_members_alone(dtype, monkeypatch):
    members, example = _family("vgg_bn")
    members = [m.to(dtype) for m in members]
    graph = trace_groups(members[0], example.to(dtype))
    before = [copy.deepcopy(m.state_dict()) for m in members]
    ident = {name: [torch.arange(gr.size), torch.arange(gr.size)] for name, gr in graph.groups.items()}
    mixed = {name: [torch.arange(gr.size), torch.randperm(gr.size)] for name, gr in graph.groups.items()}
    for perms in (ident, mixed):
        plan = Plan.from_permutations(graph, perms, (0.5, 0.5))
        fused = builder.build(members, graph, plan)
        with monkeypatch.context() as mp:  # the general path (the fast path made to decline)
            mp.setattr(permuted, "permutation_maps", lambda *a, **k: None)
            general = builder.build(members, graph, plan)
        for key, t in general.state_dict().items():
            assert torch.equal(fused.state_dict()[key], t), key
        for m, sd in zip(members, before):
            for key, t in m.state_dict().items():
                assert torch.equal(t, sd[key]), key


def test_a_non_finite_activation_cost_is_refused(monkeypatch):
    import pyfusion.fuse.activation_matching as am

    members, example = _family("mlp")
    data = [torch.randn(16, 12)]
    real = am.activation_costs

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        for c in out.values():
            c[1, 2] = math.nan
        return out

    monkeypatch.setattr(am, "activation_costs", poisoned)
    with pytest.raises(ValueError, match="activation cost against member 1 has NaN or inf"):
        pyfusion.fuse(members, data, method="activation_matching")


@pytest.mark.parametrize("sizes", [(24, 40), (7, 13), (1, 5), (30, 1)])
def test_mirrored_block_is_the_transposed_lower_block(sizes):
    from pyfusion.stats.activation_stats import ActivationStats

    da, db = sizes
    x = torch.randn(700, da + db, dtype=torch.float32) * 3 + 1
    st = ActivationStats([da, db], pairs=[(0, 1)])
    for blk in x.split(256):
        st.update([blk[:, :da], blk[:, da:]])
    got = st._sym(slice(0, da), slice(da, da + db))
    want = st._s2[da:, :da].T.clone(memory_format=torch.contiguous_format)  # the direct transposed copy
    assert got.is_contiguous() and torch.equal(got, want)
    got.fill_(12345.0)  # a copy: the state is not changed through it
    assert not bool((st._s2[da:, :da] == 12345.0).any())
    xd = x.double()
    cov = (xd[:, :da] - xd[:, :da].mean(0)).T @ (xd[:, da:] - xd[:, da:].mean(0)) / x.shape[0]
    torch.testing.assert_close(st.cov(0, 1), cov, rtol=0, atol=1e-5 * float(cov.abs().max()))
