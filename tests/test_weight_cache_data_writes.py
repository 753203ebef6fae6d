"""Writes through ``param.data`` reach the partial layers' cached derived weights (pyfusion.ops._weight_cache).

``w.data`` is an alias with a version counter of its own, so before TrackedParameter an in-place write through it
(``w.data.mul_(2)``, ``w.data[i] = x``, ``w.data.copy_(new)``: hand-written optimizers, EMA updates, weight
surgery) left the packed / member-shaped / dense copies the layers cache stale: the layer kept computing with the
old weights, a silently wrong output (46 of 72 (K, alpha, width, batch) cases of a fused MLP on the old code).
Every case here compares the layer after the write with a float64 reference built from its current weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfusion
from pyfusion.models import mlp
from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear
from pyfusion.ops._weight_cache import TrackedParameter

WRITES = ("mul", "setitem", "copy", "held_alias", "bias", "reassigned")
BATCHES = (1, 33, 256)


def _layout(k: int, shared: int, branch: int) -> list[int]:
    return [shared] + [branch] * k


def _linear(k: int, alpha: float, width: int, seed: int) -> PartialLinear:
    torch.manual_seed(seed)
    branch = max(1, round(alpha * width))
    lay = _layout(k, width - branch, branch)
    return PartialLinear(lay, lay, activation="relu").eval()


def _ref_linear(m: PartialLinear, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x.double(), m.dense_weight().detach().double(), m.bias.detach().double())
    return torch.relu(y)


def _warm(m: nn.Module, xs: list[torch.Tensor]) -> None:
    """Enough calls at each batch for the strategy to be measured, settled and cached (hot path included)."""
    with torch.no_grad():
        for x in xs:
            for _ in range(8):
                m(x)


def _write(m: nn.Module, how: str, alias: torch.Tensor) -> None:
    w = m.weight
    with torch.no_grad():
        if how == "mul":
            w.data.mul_(-1.5)
        elif how == "setitem":
            w.data[: w.shape[0] // 2] = 0.25
        elif how == "copy":
            w.data.copy_(torch.randn_like(w))
        elif how == "held_alias":  # a .data alias taken before the first forward, written after the cache was built
            alias.mul_(3.0)
        elif how == "bias":
            m.bias.data.add_(1.0)
        elif how == "reassigned":  # replaced by a plain nn.Parameter after warm-up, warmed again, then written
            raise AssertionError("handled by the caller")


@pytest.mark.parametrize("how", WRITES)
@pytest.mark.parametrize(("k", "alpha", "width"), [(2, 0.5, 512), (3, 0.25, 64), (3, 0.75, 512), (4, 1.0, 64)])
def test_partial_linear_sees_writes_through_data(k, alpha, width, how):
    m = _linear(k, alpha, width, seed=k * 10 + width)
    alias = m.weight.data
    xs = [torch.randn(b, m.in_features) for b in BATCHES]
    _warm(m, xs)
    if how == "reassigned":
        m.weight = nn.Parameter(m.weight.detach().clone())
        _warm(m, xs)
        with torch.no_grad():
            m.weight.data.mul_(-2.0)
    else:
        _write(m, how, alias)
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(m(x).double(), _ref_linear(m, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["mul", "copy", "held_alias", "bias"])
def test_ensemble_linear_sees_writes_through_data(how):
    torch.manual_seed(5)
    m = EnsembleLinear(3, 48, 40).eval()
    alias = m.weight.data
    xs = [torch.randn(b, 3 * 48) for b in BATCHES]
    _warm(m, xs)
    _write(m, how, alias)
    w, b = m.weight.detach().double(), m.bias.detach().double()
    with torch.no_grad():
        for x in xs:
            ref = torch.einsum("nki,koi->nko", x.double().view(-1, 3, 48), w) + b
            torch.testing.assert_close(m(x).double(), ref.reshape(x.shape[0], -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["mul", "setitem", "held_alias", "bias"])
@pytest.mark.parametrize(("k", "alpha"), [(2, 0.5), (3, 0.25)])
def test_partial_conv2d_sees_writes_through_data(k, alpha, how):
    torch.manual_seed(7 + k)
    branch = max(1, round(alpha * 32))
    lay = _layout(k, 32 - branch, branch)
    m = PartialConv2d(lay, lay, 3, padding=1, activation="relu").eval()
    alias = m.weight.data
    xs = [torch.randn(b, m.in_channels, 8, 8) for b in (1, 16)]
    _warm(m, xs)
    _write(m, how, alias)
    with torch.no_grad():
        for x in xs:
            ref = torch.relu(F.conv2d(x.double(), m.dense_weight().double(), m.bias.double(), padding=1))
            torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_fused_model_sees_writes_through_data():
    """The user-level symptom: a partially fused MLP kept its old outputs after ``p.data.mul_``."""
    torch.manual_seed(0)
    members = [mlp([64, 256, 256, 10]).eval() for _ in range(3)]
    x = torch.rand(128, 64)
    fused = pyfusion.fuse(members, [x], method="partial", alpha=0.5)
    _warm(fused, [x[:1], x[:32], x])
    with torch.no_grad():
        for p in fused.parameters():
            p.data.mul_(1.5)
        for xb in (x[:1], x[:32], x):
            torch.testing.assert_close(fused(xb), copy.deepcopy(fused)(xb), rtol=1e-5, atol=1e-5)


def test_op_called_directly_tracks_a_parameter():
    """ops.partial_linear on a user's nn.Parameter: the parameter is tracked when its first cache entry is made."""
    torch.manual_seed(3)
    m = _linear(2, 0.5, 256, seed=3)
    w = nn.Parameter(m.weight.detach().clone())
    lay = m.in_layout
    xs = [torch.randn(b, m.in_features) for b in BATCHES]
    with torch.no_grad():
        for x in xs:
            for _ in range(8):
                pyfusion.ops.partial_linear(x, w, None, lay, lay)
        assert type(w) is TrackedParameter
        w.data.mul_(-1.0)
        for x in xs:
            ref = F.linear(x.double(), m.dense_weight().detach().double()) * -1.0
            torch.testing.assert_close(pyfusion.ops.partial_linear(x, w, None, lay, lay).double(), ref, rtol=1e-4,
                                       atol=1e-4)  # fmt: skip


def test_tracked_parameter_is_a_parameter_otherwise():
    m = _linear(2, 0.5, 64, seed=1)
    p = m.weight
    assert type(p) is TrackedParameter and isinstance(p, nn.Parameter) and p.requires_grad
    d = p.data
    assert type(d) is torch.Tensor and not d.requires_grad and d.data_ptr() == p.data_ptr()
    new = torch.randn_like(p)
    p.data = new  # the setter still swaps the storage, keeping the object
    assert m.weight is p and p.data_ptr() == new.data_ptr()
    c = copy.deepcopy(m)
    assert type(c.weight) is TrackedParameter and torch.equal(c.weight, p) and c.weight.data_ptr() != p.data_ptr()
    sd = m.state_dict()
    assert type(sd["weight"]) is torch.Tensor
    m2 = _linear(2, 0.5, 64, seed=2)
    m2.load_state_dict(sd)
    assert type(m2.weight) is TrackedParameter and torch.equal(m2.weight, p)
    m3 = m.double()
    assert type(m3.weight) in (TrackedParameter, nn.Parameter) and m3.weight.dtype is torch.float64
    x = torch.randn(4, m.in_features, dtype=torch.float64)
    torch.testing.assert_close(m3(x), _ref_linear(m3, x).to(torch.float64), rtol=1e-10, atol=1e-10)


def test_write_through_data_between_forward_and_backward_is_refused():
    """The one difference from ``.data``: autograd sees the write (instead of silently using the new values)."""
    m = _linear(2, 0.5, 64, seed=4).train()
    y = m(torch.randn(8, m.in_features)).sum()
    m.weight.data.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_derived_copy_of_any_parameter_sees_writes_through_data():
    """The op-level rule (what the convolution's member biases rely on): a Parameter an entry is derived from is
    tracked when the entry is made, so a later ``.data`` write rebuilds it."""
    from pyfusion.ops._weight_cache import derived_weight

    p = nn.Parameter(torch.arange(6.0))
    builds: list[int] = []

    def build(src: torch.Tensor) -> torch.Tensor:
        builds.append(1)
        return src * 10.0

    assert torch.equal(derived_weight(p, "x10", build), torch.arange(6.0) * 10)
    assert type(p) is TrackedParameter
    assert torch.equal(derived_weight(p, "x10", build), torch.arange(6.0) * 10) and len(builds) == 1  # cached
    p.data[2] = -1.0
    assert float(derived_weight(p, "x10", build)[2]) == -10.0 and len(builds) == 2
