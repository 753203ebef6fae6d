"""pyfusion.match: plans made directly give the same network as pyfusion.fuse, and the layout follows alpha."""

from __future__ import annotations

import torch

import pyfusion
from pyfusion.fuse.builder import build
from pyfusion.graph import trace_groups
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
