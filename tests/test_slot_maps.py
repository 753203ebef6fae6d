"""The lazy maps of a partial plan (pyfusion.fuse.plan.SlotMaps): made on first read equal to the dense maps of the
slot assignment, with the selection the builder would derive from them; a plan built without reading its maps gives
the same fused network as one whose maps were all made (and one whose maps are plain dense tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyfusion
from pyfusion.fuse.builder import _recorded_selection, build
from pyfusion.fuse.partial import assignment_group_plan
from pyfusion.fuse.plan import GroupPlan, Plan, SlotMaps, lazy_map, map_shape
from pyfusion.graph import trace_groups
from pyfusion.graph.transform import selection
from pyfusion.match.partial import PartialAssignment, slots_from_matches


def _assignment(n: int, k_all: int, matched: int, seed: int) -> PartialAssignment:
    rng = np.random.default_rng(seed)
    matches = {k: (rng.permutation(n)[:matched], rng.permutation(n)[:matched]) for k in range(1, k_all)}
    return slots_from_matches(n, k_all, 0, matches)


def _dense_reference(asg: PartialAssignment, lambdas) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The maps by their definition (DESIGN §4), float64: A_k[slot, j] = the renormalised lambda on shared slots
    (1 on branch slots), B_k[j, slot] = 1."""
    k_all, n, slots, s = len(asg.slot_of), len(asg.slot_of[0]), sum(asg.layout), asg.shared
    a_maps, b_maps = [], []
    contrib = np.zeros((k_all, s))
    for k in range(k_all):
        sk = asg.slot_of[k]
        contrib[k, sk[sk < s]] = 1
    for k in range(k_all):
        a = torch.zeros(slots, n, dtype=torch.float64)
        b = torch.zeros(n, slots, dtype=torch.float64)
        for j, slot in enumerate(asg.slot_of[k]):
            if slot < s:
                tot = sum(lambdas[q] * contrib[q, slot] for q in range(k_all))
                a[slot, j] = lambdas[k] / tot
            else:
                a[slot, j] = 1.0
            b[j, slot] = 1.0
        a_maps.append(a)
        b_maps.append(b)
    return a_maps, b_maps


@pytest.mark.parametrize("n,k_all,matched", [(7, 2, 5), (12, 3, 4), (9, 2, 0), (6, 4, 6), (1, 2, 1)])
def test_maps_equal_the_definition_and_selections_the_derived_ones(n, k_all, matched):
    asg = _assignment(n, k_all, matched, seed=n + k_all)
    lambdas = list(np.random.default_rng(1).dirichlet(np.ones(k_all)))
    gp = assignment_group_plan(asg, lambdas)
    assert isinstance(gp.A, SlotMaps) and isinstance(gp.B, SlotMaps)
    want_a, want_b = _dense_reference(asg, lambdas)
    for k in range(k_all):
        assert lazy_map(gp.A, k) is gp.A and lazy_map(gp.B, k) is gp.B
        assert map_shape(gp.A, k) == tuple(want_a[k].shape) and map_shape(gp.B, k) == tuple(want_b[k].shape)
        sel_a, sel_b = gp.A.selection(k), gp.B.selection(k)
        a, b = gp.A[k], gp.B[k]  # made now
        assert lazy_map(gp.A, k) is None and gp.A[k] is a
        torch.testing.assert_close(a, want_a[k], rtol=1e-15, atol=0)
        assert torch.equal(b, want_b[k])
        for got, ref in ((sel_a, selection(want_a[k])), (sel_b, selection(want_b[k].T))):
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
            assert (got[2] is None) == (ref[2] is None)
            if got[2] is not None:
                torch.testing.assert_close(got[2], ref[2], rtol=1e-15, atol=0)
            assert got[3] == ref[3]
        assert _recorded_selection(a) is sel_a and _recorded_selection(b) is sel_b
        a.mul_(2.0)  # changed in place: the recorded selection no longer holds
        assert _recorded_selection(a) is None
    assert gp.slots == sum(asg.layout)


def test_sequence_behaviour():
    gp = assignment_group_plan(_assignment(5, 3, 3, seed=0), [0.2, 0.3, 0.5])
    assert len(gp.A) == 3 and len(gp.A + gp.B) == 6
    made = list(gp.A)
    assert all(m is gp.A[k] for k, m in enumerate(made))
    gp.B[1] = torch.zeros(5, gp.slots, dtype=torch.float64)
    assert lazy_map(gp.B, 1) is None and not bool(gp.B[1].any())
    assert torch.stack(list(gp.B)).shape == (3, 5, gp.slots)
    with pytest.raises(ValueError, match="side"):
        SlotMaps("C", 3, [torch.arange(3)], [None])


def _vgg(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 5),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize("k_all,alpha", [(2, 0.25), (2, 0.75), (3, 0.5)])
def test_build_with_lazy_made_and_dense_maps_alike(k_all, alpha):
    members = [_vgg(s) for s in range(k_all)]
    fused = pyfusion.fuse(members, method="partial", alpha=alpha, features="weights")
    plan = fused.fusion_plan
    lazy = [gp for gp in plan.groups.values() if isinstance(gp.A, SlotMaps)]
    if k_all == 2:  # K >= 3: order_shared_slots permutes the slots of the dense maps (plain lists then)
        assert lazy and all(lazy_map(gp.A, k) is not None for gp in lazy for k in range(k_all))  # fused, no read
    dense = Plan(
        plan.lambdas,
        {
            name: GroupPlan([a.clone() for a in gp.A], [b.clone() for b in gp.B], gp.layout)
            for name, gp in plan.groups.items()
        },
        dict(plan.info),
    )  # plain lists of dense maps without recorded selections: the builder derives everything from them
    graph = trace_groups(members[0], torch.randn(2, 3, 8, 8, dtype=torch.float64))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = build(members, graph, dense).eval()(x)
        torch.testing.assert_close(fused.eval()(x), want, rtol=1e-12, atol=1e-12)
        made = build(members, graph, plan).eval()(x)  # the plan's maps were all made by the clone above
    torch.testing.assert_close(made, want, rtol=1e-12, atol=1e-12)
