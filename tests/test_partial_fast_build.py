"""The fast partial-fusion build (pending weights packed straight from the members, recorded map selections, the
meta-device FLOP count) against the general path on fresh random models: bit-equal packed weights and logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.fuse import builder, fast
from pyfusion.fuse.cost import cost
from pyfusion.fuse.partial import assignment_group_plan
from pyfusion.graph import trace_groups
from pyfusion.match.partial import slots_from_matches
from pyfusion.nn import PartialConv2d, PartialLinear
from pyfusion.testing import randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ARCHS = {
    "mlp": (lambda: models.mlp([12, 10, 10, 5]), (12,)),
    "vgg": (lambda: models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10), (2, 8, 8)),
    "resnet": (lambda: models.resnet20(1, blocks=1, num_classes=5), (3, 8, 8)),
}


def _members(arch: str, k: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [randomize_batchnorm(ARCHS[arch][0]()).double().eval() for _ in range(k)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,k", [("mlp", 2), ("mlp", 3), ("vgg", 2), ("vgg", 3), ("resnet", 2), ("resnet", 3)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("fast_modules", ["always", True])
def test_pending_build_equals_the_dense_build(monkeypatch, arch, k, alpha, fast_modules):
    members = _members(arch, k, seed=17 * k + int(alpha * 10))
    lam = list(np.random.default_rng(k).dirichlet(np.ones(k)))
    kw = dict(method="partial", alpha=alpha, features="weights", lambdas=lam, fast_modules=fast_modules)
    quick = pyfusion.fuse(members, **kw).eval()
    assert not builder.pending_weights(quick)  # every pending weight was packed or written
    with monkeypatch.context() as mp:
        mp.setattr(builder, "_deferrable", lambda mod: False)  # the general path: dense build, then from_dense
        general = pyfusion.fuse(members, **kw).eval()
    dense = pyfusion.fuse(members, **{**kw, "fast_modules": False}).eval()
    assert quick.fusion_info["fast_modules"] == general.fusion_info["fast_modules"]
    if fast_modules == "always" and 0 < alpha < 1:
        assert quick.fusion_info["fast_modules"], "nothing was swapped: the packed path was not exercised"
    for path in quick.fusion_info["fast_modules"]:
        assert isinstance(quick.get_submodule(path), (PartialLinear, PartialConv2d))
    sq, sg = _state(quick), _state(general)
    assert sq.keys() == sg.keys()
    for key in sq:
        assert sq[key].dtype == sg[key].dtype and torch.equal(sq[key], sg[key]), key
    x = torch.randn(5, *ARCHS[arch][1], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(quick(x), general(x), rtol=0, atol=0)
        torch.testing.assert_close(quick(x), dense(x), rtol=0, atol=1e-12)
    assert quick.fusion_info["effective_flops"] == general.fusion_info["effective_flops"]


def test_packed_gather_equals_packing_the_dense_tensor():
    members = _members("vgg", 3, seed=5)
    graph = trace_groups(members[0], torch.randn(2, 2, 8, 8, dtype=torch.float64))
    lam = [0.2, 0.5, 0.3]
    plan = pyfusion.fuse(members, graph=graph, method="partial", alpha=0.5, lambdas=lam, fast_modules=False).fusion_plan
    model = builder.build(members, graph, plan, defer=True)
    pending = builder.pending_weights(model)
    assert pending
    general = builder.build(members, graph, plan)
    from pyfusion.ops.layout import pack_segment_weight

    for key, pw in list(pending.items()):
        path = key.rpartition(".")[0]
        ins, outs = fast.module_segments(model, model.fusion_module_layouts, path, 3)
        want = general.get_submodule(path).weight.detach()
        assert torch.equal(pw.dense(), want), key
        assert torch.equal(pw.packed(ins, outs), pack_segment_weight(want, ins, outs)), key
        # through a reused scratch (garbage in it: every entry read is written first, the pads are zeroed)
        scratch = torch.full((builder.pad_numel(pw.states, key) + 3,), float("nan"), dtype=torch.float64)
        assert torch.equal(pw.packed(ins, outs, scratch), pack_segment_weight(want, ins, outs)), key
        assert torch.equal(pw.dense(scratch), want), key
        assert model.get_submodule(path).weight.is_meta  # nothing runs on an unwritten weight
    builder.materialize(model)
    assert not builder.pending_weights(model)
    for key, t in _state(general).items():
        assert torch.equal(_state(model)[key], t), key


def test_recorded_selections_equal_the_computed_ones():
    rng = np.random.default_rng(0)
    for trial in range(30):
        k_all, n = int(rng.integers(2, 5)), int(rng.integers(1, 16))
        s = int(rng.integers(0, n + 1))
        matches = {k: (rng.permutation(n)[:s], rng.permutation(n)[:s]) for k in range(1, k_all)}
        lam = rng.random(k_all)
        if trial % 3 == 0:
            lam[1] = 0.0  # zero coefficients: not non-zeros of A
        gp = assignment_group_plan(slots_from_matches(n, k_all, 0, matches), list(lam))
        for k in range(k_all):
            for consumer in (False, True):
                got = builder._map_selection(gp, k, consumer)
                want = builder._selection(gp.B[k].T if consumer else gp.A[k])
                for a, b in zip(got[:3], want[:3]):
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert a.dtype == b.dtype and torch.equal(a, b)
                assert got[3] == want[3]
    a = gp.A[0]
    assert builder._recorded_selection(a) is not None
    a.mul_(2.0)  # modified in place: the record is stale and ignored
    assert builder._recorded_selection(a) is None


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) >= 0 else -self.fc(x)  # needs real values: not on meta


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_meta_cost_equals_the_real_forward(arch):
    members = _members(arch, 2, seed=3)
    ex = torch.randn(1, *ARCHS[arch][1], dtype=torch.float64)
    fused = pyfusion.fuse(members, method="partial", alpha=0.5, features="weights", fast_modules=False)
    for model in (members[0], fused):
        shapes: dict = {}
        assert fast._cost(model, ex, shapes) == cost(model, ex)
        assert shapes == fast._input_shapes(model, ex)
    odd = _DataDependent().double()
    x = torch.ones(2, 4, dtype=torch.float64)
    assert fast._cost(odd, x) == cost(odd, x)  # falls back to the real forward
