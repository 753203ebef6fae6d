"""pyfusion.nn.norm.MemberViewNorm: ``y = sum_k A_k norm_k(B_k x)`` against the float64 formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfusion.nn.norm import MemberViewNorm

F64 = torch.float64


class _RMS(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dtype=F64))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _reference(norms, A, B, x):
    return sum(torch.einsum("sn,...n->...s", a, m(torch.einsum("ns,...s->...n", b, x))) for m, a, b in zip(norms, A, B))


@pytest.mark.parametrize("kind", ["layernorm", "rms"])
@pytest.mark.parametrize("maps", ["selection", "dense"])
def test_member_view_equals_formula(kind, maps):
    gen = torch.Generator().manual_seed(0)
    n, k_all, shared = 6, 3, 2
    br = n - shared
    slots = shared + k_all * br
    norms, A, B = [], [], []
    for k in range(k_all):
        m = nn.LayerNorm(n, dtype=F64) if kind == "layernorm" else _RMS(n)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(generator=gen)
        norms.append(m)
        if maps == "selection":
            a = torch.zeros(slots, n, dtype=F64)
            p = torch.randperm(n, generator=gen)
            a[torch.arange(shared), p[:shared]] = 1.0 / k_all
            a[shared + k * br + torch.arange(br), p[shared:]] = 1.0
            b = (a != 0).to(F64).T.contiguous()
        else:
            a = torch.rand(slots, n, generator=gen, dtype=F64)
            b = torch.rand(n, slots, generator=gen, dtype=F64)
        A.append(a)
        B.append(b)
    mod = MemberViewNorm(norms, A, B)
    assert mod._gather == [maps == "selection"] * k_all and mod._scatter == [maps == "selection"] * k_all
    x = torch.randn(4, 5, slots, generator=gen, dtype=F64)
    torch.testing.assert_close(mod(x), _reference(norms, A, B, x), rtol=1e-12, atol=1e-12)


def test_permutation_maps_equal_one_norm_with_combined_parameters():
    """Full fusion by permutations: the member view equals the usual LayerNorm with ``sum_k A_k w_k``."""
    gen = torch.Generator().manual_seed(1)
    n, lams = 8, (0.3, 0.7)
    norms, A, B = [], [], []
    for lam in lams:
        m = nn.LayerNorm(n, dtype=F64)
        with torch.no_grad():
            m.weight.normal_(generator=gen)
            m.bias.normal_(generator=gen)
        p = torch.eye(n, dtype=F64)[torch.randperm(n, generator=gen)]
        norms.append(m)
        A.append(lam * p)
        B.append(p.T.contiguous())
    combined = nn.LayerNorm(n, dtype=F64)
    with torch.no_grad():
        combined.weight.copy_(sum(a @ m.weight for a, m in zip(A, norms)))
        combined.bias.copy_(sum(a @ m.bias for a, m in zip(A, norms)))
    x = torch.randn(3, n, generator=gen, dtype=F64)
    torch.testing.assert_close(MemberViewNorm(norms, A, B)(x), combined(x), rtol=1e-12, atol=1e-12)


class _LayerNorm2d(nn.Module):
    """A channels-first LayerNorm as ConvNeXt's reference code writes it: statistics over dim 1."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dtype=F64))
        self.bias = nn.Parameter(torch.randn(n, dtype=F64))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        v = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(v + 1e-6) + self.bias[:, None, None]


@pytest.mark.parametrize("maps", ["selection", "dense"])
def test_channels_first_member_view_equals_formula(maps):
    """``dim=-3``: the maps act on the channels of ``(N, C, H, W)`` maps, each member's norm sees its own
    channels-first view: the formula with the channels moved last, the norms moved back around."""
    gen = torch.Generator().manual_seed(2)
    n, k_all, shared = 5, 2, 2
    slots = shared + k_all * (n - shared)
    norms, A, B = [], [], []
    for k in range(k_all):
        norms.append(_LayerNorm2d(n))
        if maps == "selection":
            a = torch.zeros(slots, n, dtype=F64)
            p = torch.randperm(n, generator=gen)
            a[torch.arange(shared), p[:shared]] = 0.5
            a[shared + k * (n - shared) + torch.arange(n - shared), p[shared:]] = 1.0
            b = (a != 0).to(F64).T.contiguous()
        else:
            a = torch.rand(slots, n, generator=gen, dtype=F64)
            b = torch.rand(n, slots, generator=gen, dtype=F64)
        A.append(a)
        B.append(b)
    mod = MemberViewNorm(norms, A, B, dim=-3)
    x = torch.randn(3, slots, 4, 2, generator=gen, dtype=F64)
    last = [_Last(m) for m in norms]
    want = _reference(last, A, B, x.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(mod(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=rf"expects {slots} features in dim -3"):
        mod(x.movedim(1, -1))


class _Last(nn.Module):
    """A channels-first norm called on channels-last values (for the reference)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.movedim(-1, 1)).movedim(1, -1)


def test_bad_maps_and_inputs():
    ln = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="one entry per member"):
        MemberViewNorm([ln], [], [])
    with pytest.raises(ValueError, match=r"A must be \(slots, n\) and B \(n, slots\)"):
        MemberViewNorm([ln], [torch.zeros(6, 4)], [torch.zeros(6, 4)])
    mod = MemberViewNorm([ln], [torch.eye(4)], [torch.eye(4)])
    with pytest.raises(ValueError, match="expects 4 features"):
        mod(torch.zeros(2, 5))
    for dim in (0, 1, -1.0, True):
        with pytest.raises(ValueError, match="dim must be a negative integer"):
            MemberViewNorm([ln], [torch.eye(4)], [torch.eye(4)], dim=dim)
    with pytest.raises(ValueError, match="expects 4 features in dim -3"):
        MemberViewNorm([ln], [torch.eye(4)], [torch.eye(4)], dim=-3)(torch.zeros(4, 4))
