"""pyfusion._modcopy.deepcopy_module against copy.deepcopy: the same tree, tensors, attributes, aliasing and memo."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyfusion._modcopy import deepcopy_module


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.tied = self.lin  # the same submodule twice
        self.widths = [4, 3]
        self.table = {"a": (1, 2), "b": [nn.Linear(2, 2)]}
        self.names = {"x", "y"}
        self.extra = torch.arange(3.0)  # a plain tensor attribute
        self.register_buffer("buf", torch.randn(3))

    def forward(self, x):
        return self.tied(x) + self.buf


class WithDeepcopy(nn.Linear):
    copies = 0

    def __deepcopy__(self, memo):
        WithDeepcopy.copies += 1
        new = nn.Linear(self.in_features, self.out_features)
        memo[id(self)] = new
        return new


def _check_like_deepcopy(model: nn.Module, memo_of=None) -> None:
    want = copy.deepcopy(model, memo_of() if memo_of else {})
    got = deepcopy_module(model, memo_of() if memo_of else {})
    assert type(got) is type(want)
    assert [(p, type(m)) for p, m in got.named_modules(remove_duplicate=False)] == [
        (p, type(m)) for p, m in want.named_modules(remove_duplicate=False)
    ]
    gs, ws = got.state_dict(keep_vars=True), want.state_dict(keep_vars=True)
    assert gs.keys() == ws.keys()
    for k in gs:
        assert type(gs[k]) is type(ws[k]) and gs[k].shape == ws[k].shape and gs[k].device == ws[k].device
        assert gs[k].requires_grad == ws[k].requires_grad
        if gs[k].device.type != "meta":
            assert torch.equal(gs[k], ws[k])
    for (_, mg), (_, mw), (_, mo) in zip(got.named_modules(), want.named_modules(), model.named_modules()):
        assert mg is not mo
        assert set(vars(mg)) == set(vars(mw))
        for key, val in vars(mw).items():
            if key not in ("_parameters", "_buffers", "_modules") and not isinstance(val, (nn.Module, torch.Tensor)):
                if isinstance(val, set):
                    assert vars(mg)[key] == val, key
                elif not isinstance(val, dict) or key == "table":
                    assert repr(vars(mg)[key]) == repr(val), key
        for name, p in mo.named_parameters(recurse=False):
            assert getattr(mg, name) is not p


def test_sequential_conv_net_like_deepcopy():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 5)
    ).double()
    _check_like_deepcopy(model)
    y = deepcopy_module(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(y.eval()(x), model.eval()(x))


def test_memo_replaces_tensors_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    params = list(model.parameters())

    def memo():
        return {id(params[0]): nn.Parameter(torch.empty_like(params[0], device="meta"))}

    _check_like_deepcopy(model, memo)
    m = memo()
    new = m[id(params[0])]
    got = deepcopy_module(model, m)
    assert got[0].weight is new
    assert got[0].bias is not params[1] and torch.equal(got[0].bias, params[1])


def test_custom_attributes_aliasing_and_hooks():
    model = Custom()
    calls = []
    model.lin.register_forward_hook(lambda mod, a, out: calls.append(1))
    _check_like_deepcopy(model)
    got = deepcopy_module(model)
    assert got.tied is got.lin and got.lin is not model.lin
    assert got.widths == [4, 3] and got.widths is not model.widths
    assert got.table["b"][0] is not model.table["b"][0] and isinstance(got.table["b"][0], nn.Linear)
    assert got.names == {"x", "y"} and got.names is not model.names
    assert torch.equal(got.extra, model.extra) and got.extra is not model.extra
    got.widths.append(9)
    assert model.widths == [4, 3]
    got(torch.randn(2, 4))
    assert calls == [1]  # the hook dict copied as deepcopy copies it


def test_shared_parameter_stays_shared():
    a = nn.Linear(3, 3, bias=False)
    b = nn.Linear(3, 3, bias=False)
    b.weight = a.weight
    got = deepcopy_module(nn.Sequential(a, b))
    assert got[0].weight is got[1].weight and got[0].weight is not a.weight


def test_class_with_own_deepcopy_is_left_to_it():
    WithDeepcopy.copies = 0
    got = deepcopy_module(nn.Sequential(WithDeepcopy(2, 2), nn.ReLU()))
    assert WithDeepcopy.copies == 1 and type(got[0]) is nn.Linear
