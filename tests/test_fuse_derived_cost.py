"""The fused model's FLOP count taken from the members' cached meta count (fast._derived_fused_count) equals the
meta-device count of the fused model itself, and its input shapes equal a forward's, on K = 2 / 3 linear and conv
networks at alpha 0 / 0.5 / 1; anything outside the provable case falls back to the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion.fuse import fast


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def _spy(monkeypatch) -> list:
    seen: list = []
    real = fast._derived_fused_count
    real_members = fast._member_costs

    def members_spied(members, example):
        _EXAMPLE[0] = example  # the example the fusion counts on
        return real_members(members, example)

    monkeypatch.setattr(fast, "_member_costs", members_spied)

    def spied(fused, members, member_cost):
        got = real(fused, members, member_cost)
        seen.append((got, fused))
        if got is not None:  # the reference: the meta count and a forward's shapes, on the same fused model
            want_shapes: dict = {}
            want = fast._cost(fused, _EXAMPLE[0], want_shapes)  # the code path the derivation replaces
            assert want_shapes and got == (want.flops, want_shapes)
        return got

    monkeypatch.setattr(fast, "_derived_fused_count", spied)
    return seen


_EXAMPLE: list = [None]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("net,shape", [(_mlp, (12,)), (_cnn, (3, 8, 8))])
def test_derived_count_equals_the_meta_count(monkeypatch, net, shape, k, alpha):
    seen = _spy(monkeypatch)
    members = [net(s).eval() for s in range(k)]
    fused = pyfusion.fuse(members, method="partial", alpha=alpha, features="weights")
    assert seen and seen[0][0] is not None  # the provable case was taken
    info = fused.fusion_info
    assert info["effective_flops"] == seen[0][0][0] and info["ensemble_cap"]["checked"]


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.flatten(1))))


def test_not_provable_falls_back_to_the_forward(monkeypatch):
    seen = _spy(monkeypatch)
    members = [_Custom() for _ in range(2)]
    fused = pyfusion.fuse(members, method="partial", alpha=0.5, features="weights")
    assert seen[0][0] is None  # a custom module class: counted by the meta forward
    assert fused.fusion_info["effective_flops"] > 0


def fused_like(members):
    import copy

    other = copy.deepcopy(members[0])
    other[3].stride = (2, 2)
    return other


def test_hook_or_differing_stride_is_not_derived(monkeypatch):
    members = [_cnn(s).eval() for s in range(2)]
    example = torch.zeros(2, 3, 8, 8)
    costs = fast._member_costs(members, example)
    fused = pyfusion.fuse(members, method="partial", alpha=0.5, features="weights")
    assert fast._derived_fused_count(members[0], members, fast._member_costs(members, example)) is not None
    h = members[1][0].register_forward_hook(lambda *a: None)
    assert fast._derived_fused_count(members[0], members, fast._member_costs(members, example)) is None
    h.remove()
    members[1][3].stride = (1, 1)  # member 1 counts differently: not derived from member 0
    assert fast._derived_fused_count(members[0], members, fast._member_costs(members, example)) is None
    members[1][3].stride = (2, 2)
    members[0][3].stride = (1, 1)
    members[1][3].stride = (1, 1)  # equal counts, but the "fused" model's stride differs from the members'
    assert fast._derived_fused_count(fused_like(members), members, fast._member_costs(members, example)) is None
    del costs, fused
