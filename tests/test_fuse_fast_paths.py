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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


@pytest.mark.parametrize("family", ["mlp", "vgg_bn", "resnet", "catnet", "mha", "gpt2"])
def test_member_costs_and_recorded_shapes_equal_separate_passes(family):
    from pyfusion.fuse import fast
    from pyfusion.fuse.cost import cost

    factory, inputs, _kind = FAMILIES[family]
    model = randomize(factory(), 1)
    x = inputs(torch.Generator().manual_seed(0))
    graph = trace_groups(model, x)
    twin, perms = permuted_twin(model, graph)
    members = [model, twin, randomize(factory(), 3)]
    example = graph.example_inputs
    assert fast._member_costs(members, example) == [cost(m, example) for m in members]
    fused = builder.build(members[:2], graph, partial_plan(graph, perms, frac=0.5))
    assert fast._structure(fused) is None  # a fused model carries its records: costed on its own
    recorded: dict = {}
    handles = fast._shape_hooks(fused, recorded)
    try:
        cost(fused, example)
    finally:
        for h in handles:
            h.remove()
    assert recorded and recorded == fast._input_shapes(fused, example)


def test_member_with_other_structure_is_costed_on_its_own():
    from torch import nn

    from pyfusion.fuse import fast
    from pyfusion.fuse.cost import cost

    a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))
    got = fast._member_costs([a, b, a], (4,))
    assert got == [cost(a, (4,)), cost(b, (4,)), cost(a, (4,))]
    assert got[0] != got[1]


@pytest.mark.parametrize("family", ["mlp", "vgg_bn", "resnet"])
def test_fuse_partial_equals_the_general_paths(family, monkeypatch):
    """pyfusion.fuse(method="partial") with every shortcut on and off: same weights, layouts and fusion_info (the
    swap forced: its timed decisions would differ from run to run)."""
    import pyfusion
    from pyfusion.fuse import fast
    from pyfusion.fuse.cost import cost

    factory, inputs, _kind = FAMILIES[family]
    members = [randomize(factory(), 1), randomize(factory(), 2)]
    x = inputs(torch.Generator().manual_seed(0))

    def run():
        out = pyfusion.fuse(members, method="partial", alpha=0.5, features="weights", fast_modules="always")
        info = {k: v for k, v in out.fusion_info.items() if not k.startswith("time")}
        return out, info

    fast_model, fast_info = run()
    monkeypatch.setattr(builder, "_FAST_MASKS", False)
    monkeypatch.setattr(fast, "_member_costs", lambda ms, ex: [cost(m, ex) for m in ms])
    monkeypatch.setattr(fast, "_shape_hooks", lambda model, shapes: [])  # the swap runs its own forward
    slow_model, slow_info = run()
    assert fast_info.keys() == slow_info.keys()
    assert repr(fast_info) == repr(slow_info)
    assert fast_model.fusion_module_layouts == slow_model.fusion_module_layouts
    fs, ss = fast_model.state_dict(), slow_model.state_dict()
    assert fs.keys() == ss.keys()
    for k in fs:
        assert torch.equal(fs[k], ss[k]), k
    with torch.no_grad():
        assert torch.equal(fast_model.eval()(x), slow_model.eval()(x))
