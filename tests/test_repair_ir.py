"""REPAIR on widened fused models of traced families (attention blocks, Hugging Face models): the fused model's
statistics come from its own re-traced graph, and every corrected group ends at its targets.

REPAIR in one pass (all calibration samples as one batch, each group corrected by a forward hook on its module)
gives the networks of the pass per group (forced by a zero memory budget), on MLP, VGG + BatchNorm and ResNet
pairs (partial fusion at alpha 0 and 0.5, weight matching) and on the traced families."""

import warnings

import pytest
import torch
from _ir_families import randomize
from _ir_models import EncoderNet, MHANet, hf_models

import pyfusion
from pyfusion import models
from pyfusion.fuse import repair as repair_mod
from pyfusion.fuse.builder import fused_groups
from pyfusion.fuse.repair import RepairSkippedWarning, repair_targets
from pyfusion.graph import trace_groups
from pyfusion.stats.groups import group_statistics
from pyfusion.testing import randomize_batchnorm

F64 = torch.float64


def _families():
    x = torch.randn(8, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = {"mha": (MHANet, x), "encoder": (EncoderNet, x)}
    for name, (factory, args) in hf_models().items():
        if name in ("vit", "bert", "gpt2"):
            out[name] = (factory, args[0])
    return out


def _batch_like(x: torch.Tensor) -> torch.Tensor:
    """Eight fresh samples shaped like the example ``x`` (token ids, or float64 values)."""
    gen = torch.Generator().manual_seed(1)
    if not torch.is_floating_point(x):
        return torch.randint(0, 100, (8, 6), generator=gen)
    return torch.randn((8,) + tuple(x.shape[1:]), dtype=F64, generator=gen)


@pytest.mark.parametrize("family", sorted(_families()))
def test_repair_on_a_widened_fused_model_reaches_its_targets(family):
    factory, x = _families()[family]
    x = _batch_like(x)
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


# one pass against the pass per group ------------------------------------------------------------------------------

ARCHS = {
    "mlp": (lambda: models.mlp([12, 16, 16, 5]), (12,)),
    "vgg_bn": (lambda: models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10), (2, 8, 8)),
    "resnet": (lambda: models.resnet20(1, blocks=1, num_classes=5), (3, 8, 8)),
}
FUSIONS = {
    "partial_a0": {"method": "partial", "alpha": 0.0},
    "partial_a05": {"method": "partial", "alpha": 0.5},
    "weight_matching": {"method": "weight_matching"},
}


def _fuse_both_ways(members, data, monkeypatch, plain=True, **kw):
    """(one pass, pass per group, no REPAIR or None): the same fusion, the second with ONE_PASS_BYTES = 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepairSkippedWarning)  # the ResNet's residual streams
        one = pyfusion.fuse(members, data, repair=True, fast_modules=False, **kw)
        with monkeypatch.context() as mp:
            mp.setattr(repair_mod, "ONE_PASS_BYTES", 0)
            per_group = pyfusion.fuse(members, data, repair=True, fast_modules=False, **kw)
        without = pyfusion.fuse(members, data, fast_modules=False, **kw) if plain else None
    return one, per_group, without


def _assert_same_networks(one, per_group, x, rtol=1e-10):
    a, b = one.state_dict(), per_group.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, b[k], rtol=rtol, atol=rtol * 1e-2, msg=k)
        else:
            assert torch.equal(v, b[k]), k
    with torch.no_grad():
        torch.testing.assert_close(one.eval()(x), per_group.eval()(x), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_one_pass_equals_the_pass_per_group(arch, fusion, monkeypatch):
    factory, shape = ARCHS[arch]
    torch.manual_seed(0)
    members = [randomize_batchnorm(factory()).double().eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(12, *shape, generator=g, dtype=F64) for _ in range(3)]  # three batches: pieces in order
    one, per_group, plain = _fuse_both_ways(members, data, monkeypatch, **FUSIONS[fusion])
    info, per_info = one.fusion_info["repair"], per_group.fusion_info["repair"]
    assert info["repaired"] and info["repaired"] == per_info["repaired"] and info["skipped"] == per_info["skipped"]
    assert info["passes"] == 1 and "one_pass_refused" not in info
    assert per_info["passes"] == len(per_info["repaired"]) > 1
    assert "ONE_PASS_BYTES = 0" in per_info["one_pass_refused"]
    x = torch.randn(5, *shape, generator=g, dtype=F64)
    _assert_same_networks(one, per_group, x)
    # the comparison has teeth: REPAIR changed the weights of every repaired group's module
    changed = {
        k for k, v in one.state_dict().items() if v.is_floating_point() and not torch.equal(v, plain.state_dict()[k])
    }
    assert changed


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["bert", "gpt2", "mha"])  # (each family fuses twice: a few seconds each)
def test_one_pass_on_widened_traced_families(family, monkeypatch):
    """The widened fused model measured through its re-traced graph: the one pass hooks the same module outputs;
    GPT-2's ``Conv1D`` pre-activation is a traced ``addmm`` node no module outputs (the module returns a view of
    it), so its groups take a pass each, and say why."""
    factory, x = _families()[family]
    x = _batch_like(x)
    members = [randomize(factory(), 1), randomize(factory(), 2)]
    graph = trace_groups(members[0], x)
    data = [x[:5], x[5:]]
    one, per_group, _ = _fuse_both_ways(
        members, data, monkeypatch, plain=False, method="partial", alpha=0.5, graph=graph
    )
    info, per_info = one.fusion_info["repair"], per_group.fusion_info["repair"]
    assert info["repaired"] and info["repaired"] == per_info["repaired"]
    if family == "gpt2":
        assert info["passes"] == len(info["repaired"])
        assert "is not measured at the output of" in info["one_pass_refused"]
    else:
        assert info["passes"] == 1, info.get("one_pass_refused")
    _assert_same_networks(one, per_group, x)
