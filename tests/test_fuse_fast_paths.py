"""The shortcuts of the partial-fusion pipeline give what the general code gives (issue 15: same fused model, same
fusion_info keys): the builder's whole-axis member masks against the probe through member_tensor, on every IR test
family and on plans with zero, partial and full branches."""

from __future__ import annotations

import pytest
import torch
from _ir_families import families, partial_plan, permuted_twin, randomize

from pyfusion.fuse import builder
from pyfusion.fuse.plan import Plan
from pyfusion.graph import trace_groups

FAMILIES = families(samples=2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def segments_both_ways(member, graph, plan, monkeypatch):
    maps = builder._group_maps(graph, plan)
    fast = builder.member_segments(member, graph, plan, maps)
    monkeypatch.setattr(builder, "_FAST_MASKS", False)
    slow = builder.member_segments(member, graph, plan, maps)
    monkeypatch.setattr(builder, "_FAST_MASKS", True)
    return fast, slow


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_axis_masks_equal_the_probe(family, monkeypatch):
    factory, inputs, _kind = FAMILIES[family]
    model = randomize(factory(), 1)
    x = inputs(torch.Generator().manual_seed(0))
    graph = trace_groups(model, x)
    twin, perms = permuted_twin(model, graph)
    hits = 0
    for plan in (partial_plan(graph, perms, frac=0.5), partial_plan(graph, perms, frac=1.0),
                 Plan.ensemble(graph, (0.5, 0.5))):  # fmt: skip
        fast, slow = segments_both_ways(model, graph, plan, monkeypatch)
        assert fast == slow
        maps = builder._group_maps(graph, plan)
        hits += sum(
            builder._whole_axis_masks(int(t.shape[r.axis]), [(g, r)], graph, maps, 2) is not None
            for key, refs in graph.refs_by_key().items()
            for g, r in refs
            if (t := dict(model.named_parameters()).get(key)) is not None and t.dim() >= 2
        )
    if family in ("mlp", "vgg_bn", "resnet"):
        assert hits > 0  # the shortcut really ran on the legacy families
