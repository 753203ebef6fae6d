"""The cross-call cache of the members' FLOP counts (fast._MEMBER_COSTS): a hit only when nothing a count can
depend on has changed; every change (weights in place, a replaced weight, a conv's stride, a custom flag, the
example) recounts, and the result always equals a fresh pyfusion.cost."""

from __future__ import annotations

import torch
from torch import nn

from pyfusion.fuse import fast
from pyfusion.fuse.cost import cost


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = fast._cost

    def counted(model, example, shapes=None, *, meta_flag=None):
        calls.append(1)
        return real(model, example, shapes, meta_flag=meta_flag)

    monkeypatch.setattr(fast, "_cost", counted)
    return calls


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def test_hit_on_repeat_and_equal_to_fresh_count(monkeypatch):
    calls = _counting(monkeypatch)
    m = _net()
    ex = torch.zeros(2, 3, 8, 8)
    first = fast._member_costs([m], ex)
    second = fast._member_costs([m], ex)
    assert len(calls) == 1
    assert first == second == [cost(m, ex)]


def test_weights_changed_in_place_or_replaced_recount(monkeypatch):
    calls = _counting(monkeypatch)
    m = _net()
    ex = torch.zeros(2, 3, 8, 8)
    fast._member_costs([m], ex)
    with torch.no_grad():
        m[0].weight.mul_(2.0)  # in place: the version counter moves
    fast._member_costs([m], ex)
    assert len(calls) == 2
    m[3].weight = nn.Parameter(torch.randn(4, 8 * 8 * 8))  # same shape, new tensor
    fast._member_costs([m], ex)
    assert len(calls) == 3
    m[3] = nn.Linear(8 * 8 * 8, 4, bias=False)  # a parameter dropped: another structure
    got = fast._member_costs([m], ex)
    assert len(calls) == 4
    assert got == [cost(m, ex)]


def test_stride_flag_and_example_changes_recount(monkeypatch):
    calls = _counting(monkeypatch)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    ex = torch.zeros(2, 3, 8, 8)
    before = fast._member_costs([m], ex)[0]
    m[0].stride = (2, 2)  # same weights and shapes, a quarter of the output positions
    after = fast._member_costs([m], ex)[0]
    assert len(calls) == 2
    assert after == cost(m, ex) and after.flops < before.flops
    bigger = fast._member_costs([m], torch.zeros(2, 3, 16, 16))[0]
    assert len(calls) == 3 and bigger == cost(m, torch.zeros(2, 3, 16, 16))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.twice = False

    def forward(self, x):
        x = self.a(x)
        return self.b(x) if self.twice else x


def test_custom_attribute_recounts(monkeypatch):
    calls = _counting(monkeypatch)
    m = _Gated()
    once = fast._member_costs([m], (6,))[0]
    m.twice = True
    twice = fast._member_costs([m], (6,))[0]
    assert len(calls) == 2
    assert twice == cost(m, (6,)) and twice.flops > once.flops


class _ValueDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        return self.b(x) if bool(self.a.bias.sum() > 0) else x  # needs real values: no meta count


def test_count_from_the_real_forward_is_not_cached(monkeypatch):
    calls = _counting(monkeypatch)
    m = _ValueDependent()
    fast._member_costs([m], (4,))
    fast._member_costs([m], (4,))
    assert len(calls) == 2
    assert m not in fast._MEMBER_COSTS


class _Residual(nn.Module):
    """A ReLU whose input is read again afterwards (in place on real values this would change the sum)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.act(h) + h)


def test_meta_count_with_in_place_relus_equals_the_real_count():
    """The meta shell runs its nn.ReLU in place (no Python decomposition); the count, the recorded input shapes and
    the member itself (its ReLUs still out of place, its output unchanged) stay as on the real model."""
    torch.manual_seed(0)
    for m, ex in ((_net(), torch.randn(2, 3, 8, 8)), (_Residual(), torch.randn(5, 6))):
        before = m(ex)
        flag: list[bool] = []
        shapes: dict = {}
        got = fast._cost(m, ex, shapes, meta_flag=flag)
        assert flag == [True]
        assert got == cost(m, ex)
        assert shapes
        assert all(not mod.inplace for mod in m.modules() if isinstance(mod, nn.ReLU))
        assert torch.equal(m(ex), before)
        shell = fast._meta_shell(m)
        assert all(mod.inplace for mod in shell.modules() if type(mod) is nn.ReLU)
