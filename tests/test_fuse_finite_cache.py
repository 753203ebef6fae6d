"""The cross-call cache of the members' finite check (validate._FINITE): a member whose tensors keep their identity,
storage and version is not re-read; every change torch tracks (an in-place write, a replaced parameter, a ``.data``
swap, a buffer) is re-checked, so a NaN written after a first successful fusion is still caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion.fuse import validate
from pyfusion.fuse.validate import MemberMismatchError, check_members, tensor_state


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()


def _reads(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = validate.all_finite

    def counted(t):
        calls.append(1)
        return real(t)

    monkeypatch.setattr(validate, "all_finite", counted)
    return calls


def _fuse(a: nn.Module, b: nn.Module) -> nn.Module:
    return pyfusion.fuse([a, b], method="partial", alpha=0.5, features="weights")


def test_repeat_check_reads_nothing(monkeypatch):
    calls = _reads(monkeypatch)
    a, b = _net(0), _net(1)
    check_members([a, b])
    n = len(calls)
    assert n == 2 * sum(1 for t in [*a.parameters(), *a.buffers()] if torch.is_floating_point(t))
    check_members([a, b])
    assert len(calls) == n  # both members cached
    with torch.no_grad():
        b[0].weight.mul_(2.0)  # member 1 changed in place: it alone is read again
    check_members([a, b])
    assert len(calls) == n + n // 2


@pytest.mark.parametrize(
    "poison",
    [
        "setitem",
        "fill",
        "mul_inf",
        "bias_inf",
        "buffer",
        "data_swap",
        "replaced",
    ],
)
def test_nonfinite_written_after_a_successful_fusion_is_caught(poison):
    a, b = _net(0), _net(1)
    x = torch.randn(5, 6)
    _fuse(a, b)  # members found finite and cached
    fused = _fuse(a, b)  # a cached repeat still fuses
    assert torch.isfinite(fused(x)).all()
    lin = b[2]
    with torch.no_grad():
        if poison == "setitem":
            lin.weight[1, 2] = float("nan")
        elif poison == "fill":
            lin.weight.fill_(float("nan"))
        elif poison == "mul_inf":
            lin.weight.mul_(float("inf"))  # zeros become NaN, the rest +-inf
        elif poison == "bias_inf":
            lin.bias[0] = -float("inf")
        elif poison == "buffer":
            b[3].running_var[4] = float("nan")
        elif poison == "data_swap":  # same Parameter object, same version counter, new storage
            w = lin.weight.clone()
            w[0, 0] = float("nan")
            lin.weight.data = w
        elif poison == "replaced":
            lin.weight = nn.Parameter(torch.full_like(lin.weight, float("nan")))
    with pytest.raises(MemberMismatchError, match=r"models\[1\].*NaN or inf") as err:
        _fuse(a, b)
    assert err.value.kind == "nonfinite" and err.value.member == 1


def test_repeated_data_swaps_never_hit_a_stale_entry():
    """``p.data = new`` keeps ``id(p)`` and ``p._version``; a freed storage's address can be reused by the next
    allocation. The state pins the storages it names, so no swap can reproduce a cached key."""
    m = _net(2)
    p = m[0].weight
    for i in range(20):
        check_members([m], 1)
        fresh = torch.randn_like(p)
        if i % 4 == 3:
            fresh[0, 0] = float("nan")
            p.data = fresh
            with pytest.raises(MemberMismatchError):
                check_members([m], 1)
            p.data = torch.randn_like(p)
        else:
            p.data = fresh


def test_state_equality_follows_identity_storage_and_version():
    m = _net(3)
    s0 = tensor_state(m)
    assert s0 == tensor_state(m) and hash(s0) == hash(tensor_state(m))
    with torch.no_grad():
        m[4].bias.add_(1.0)
    s1 = tensor_state(m)
    assert s1 != s0
    m[4].bias.data = m[4].bias.detach().clone()
    assert tensor_state(m) != s1
    m[4].bias = nn.Parameter(m[4].bias.detach().clone())
    assert tensor_state(m) != s1


def test_cache_does_not_keep_a_member_alive():
    import gc
    import weakref

    a = _net(4)
    check_members([a], 1)
    assert a in validate._FINITE
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None  # the entry's pins (tensors, storages) hold no reference to the module
