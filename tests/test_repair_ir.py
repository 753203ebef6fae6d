"""REPAIR on widened fused models of traced families (attention blocks, Hugging Face models): the fused model's
statistics come from its own re-traced graph, and every corrected group ends at its targets."""

import pytest
import torch
from _ir_families import randomize
from _ir_models import EncoderNet, MHANet, hf_models

import pyfusion
from pyfusion.fuse.builder import fused_groups
from pyfusion.fuse.repair import repair_targets
from pyfusion.graph import trace_groups
from pyfusion.stats.groups import group_statistics

F64 = torch.float64


def _families():
    x = torch.randn(8, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = {"mha": (MHANet, x), "encoder": (EncoderNet, x)}
    for name, (factory, args) in hf_models().items():
        if name in ("vit", "bert", "gpt2"):
            out[name] = (factory, args[0])
    return out


@pytest.mark.parametrize("family", sorted(_families()))
def test_repair_on_a_widened_fused_model_reaches_its_targets(family):
    factory, x = _families()[family]
    if not torch.is_floating_point(x):
        x = torch.randint(0, 100, (8, 6), generator=torch.Generator().manual_seed(1))
    else:
        x = torch.randn((8,) + tuple(x.shape[1:]), dtype=F64, generator=torch.Generator().manual_seed(1))
    members = [randomize(factory(), 1), randomize(factory(), 2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    graph = trace_groups(members[0], x)
    with pytest.warns(pyfusion.fuse.repair.RepairSkippedWarning):  # residual streams / heads are listed
        fused = pyfusion.fuse(members, [x], method="partial", alpha=0.5, repair=True, graph=graph,
                              fast_modules=False)  # fmt: skip
    info = fused.fusion_info["repair"]
    assert info["repaired"], info  # the FFN groups (biased Linear / Conv1D producers) are corrected
    for m, sd in zip(members, before):  # the members are untouched
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    targets = repair_targets(members, graph, fused.fusion_plan, [x])
    fgraph, pairs = fused_groups(fused, graph)
    for name in info["repaired"]:
        fname = next(n for n, g in fgraph.groups.items() if g is pairs[name])
        st = group_statistics([fused], fgraph, [x], point="pre", groups=[fname])[fname]
        mu, sd = targets[name]
        torch.testing.assert_close(st.mean(0), mu, rtol=1e-7, atol=1e-7)
        live = sd > 1e-6
        torch.testing.assert_close(st.var(0).sqrt()[live], sd[live], rtol=1e-7, atol=1e-7)
