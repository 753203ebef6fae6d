"""pyfusion.nn.PartialConv1d (a partially fused nn.Conv1d: Whisper's and wav2vec2's input convolutions, 1-D CNNs)
against the float64 reference ``F.conv1d`` with the dense zero-block weight, on every segment layout of the partial
ops (K = 1..5, member-subset shared slots, gaps, empty segments), strides / padding / dilation, batched and
unbatched input, float32 and float64; autograd of the stored blocks only; packing, configs, state dicts and files;
and fusion of a 1-D CNN whose widened convolutions now run as PartialConv1d (they ran their zero blocks before:
alpha = 1 cost more than the ensemble and was capped to the members)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _audit import random_model, rel, run
from _segments import LAYOUTS, assert_close, dense_of, make_weight
from torch import nn

import pyfusion
from pyfusion.nn import PartialConv1d
from pyfusion.ops.layout import as_segments
from pyfusion.testing import permuted_copy

F64 = torch.float64
# (kernel, stride, padding, dilation)
GEOMS = [(3, 1, 0, 1), (3, 2, 1, 1), (5, 1, 4, 2), (1, 1, 0, 1)]


def _module(ins, outs, geom, dtype, bias=True, seed=0):
    k, s, p, d = geom
    w, b = make_weight(ins, outs, dtype, taps=(k,), seed=seed)
    m = PartialConv1d(ins, outs, k, s, p, d, bias=bias, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias:
            m.bias.copy_(b)
    return m, w, b if bias else None


@pytest.mark.parametrize("geom", GEOMS, ids=[f"k{g[0]}s{g[1]}p{g[2]}d{g[3]}" for g in GEOMS])
@pytest.mark.parametrize("ins,outs", LAYOUTS, ids=[f"L{i}" for i in range(len(LAYOUTS))])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_matches_float64_conv1d_reference(ins, outs, geom, dtype):
    m, w, b = _module(ins, outs, geom, dtype)
    plan_i = sum(n for n, _ in as_segments(ins, "in"))
    x = torch.randn(3, plan_i, 19, generator=torch.Generator().manual_seed(1), dtype=dtype)
    dense = dense_of(w.double(), ins, outs, (geom[0],))
    if dense.shape[0] == 0:
        ref = torch.zeros(3, 0, (19 + 2 * geom[2] - geom[3] * (geom[0] - 1) - 1) // geom[1] + 1, dtype=F64)
        same = None
    else:
        ref = F.conv1d(x.double(), dense, None if b is None else b.double(), *geom[1:])
        same = F.conv1d(x, dense.to(dtype), b, *geom[1:])
    with torch.no_grad():
        y = m(x)
        assert_close(y, ref, same)
        assert_close(m(x[1]), ref[1], None if same is None else same[1])  # unbatched (C, L), as nn.Conv1d
    assert m.dense_weight().shape == dense.shape and torch.equal(m.dense_weight().double(), dense)


def test_exact_on_structured_inputs():
    """Small integers (exact products in float64) and a unit impulse: the response is the kernel of every allowed
    block, zero on the skipped ones."""
    ins, outs = [(2, 0b11), (3, 0b01), (3, 0b10)], [(2, 0b11), (2, 0b01), (2, 0b10)]
    w, b = make_weight(ins, outs, F64, taps=(3,), integer=True)
    m = PartialConv1d(ins, outs, 3, padding=1, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    dense = dense_of(w, ins, outs, (3,))
    x = torch.randint(-3, 4, (2, 8, 11), generator=torch.Generator().manual_seed(0)).to(F64)
    with torch.no_grad():
        assert torch.equal(m(x), F.conv1d(x, dense, b, 1, 1))
        impulse = torch.zeros(8, 8, 5, dtype=F64)
        impulse[torch.arange(8), torch.arange(8), 2] = 1.0  # channel c carries a delta at position 2
        y = m(impulse) - b[None, :, None]
    # y[c, o, 1:4] is the kernel W[o, c] reversed in time (cross-correlation of a delta)
    assert torch.equal(y[:, :, 1:4].permute(1, 0, 2), dense.flip(-1))


def test_gradients_are_the_dense_ones_on_stored_blocks():
    ins, outs = [(3, 0b11), (2, 0b01), (2, 0b10)], [(2, 0b11), (3, 0b01), (3, 0b10)]
    m, w, _b = _module(ins, outs, (3, 2, 1, 1), F64)
    x = torch.randn(4, 7, 10, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    m(x).square().sum().backward()
    dense = dense_of(w, ins, outs, (3,)).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.conv1d(x2, dense, m.bias.detach(), 2, 1).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    grad_dense = dense_of(m.weight.grad, ins, outs, (3,))
    allowed = dense_of(torch.ones_like(w), ins, outs, (3,)) != 0
    torch.testing.assert_close(grad_dense, dense.grad * allowed, rtol=1e-12, atol=1e-12)


def test_from_dense_to_dense_config_and_state_dict_round_trip():
    ins, outs = [(2, 0b11), (3, 0b01), (3, 0b10)], [(4, 0b11), (2, 0b01), (2, 0b10)]
    m, w, b = _module(ins, outs, (3, 2, 1, 2), F64)
    dense = m.to_dense()
    assert type(dense) is nn.Conv1d and dense.stride == (2,) and dense.dilation == (2,)
    x = torch.randn(2, 8, 13, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), m(x), rtol=1e-12, atol=1e-12)
        again = PartialConv1d.from_dense(dense.weight, dense.bias, ins, outs, 2, 1, 2)
        assert torch.equal(again.weight, m.weight) and torch.equal(again(x), m(x))
        rebuilt = PartialConv1d.from_config(m.get_config()).to(F64)
        rebuilt.load_state_dict(m.state_dict())
        assert torch.equal(rebuilt(x), m(x)) and rebuilt.get_config() == m.get_config()
        loaded = PartialConv1d.from_state_dict(m.state_dict(), kernel_size=3, stride=2, padding=1, dilation=2)
        assert torch.equal(loaded(x), m(x))
    cfg = m.get_config()
    assert cfg["kernel_size"] == [3] and cfg["stride"] == [2] and cfg["padding"] == [1] and cfg["dilation"] == [2]
    assert m.effective_flops(2, (13,)) == 2 * 2 * ((13 + 2 * 1 - 2 * (3 - 1) - 1) // 2 + 1) * m.weight.numel()
    assert m.dense_params() == 8 * 8 * 3 + 8 and m.effective_params() < m.dense_params()


def test_bad_input_is_named():
    ins, outs = [(2, 0b11), (3, 0b01), (3, 0b10)], [(2, 0b11), (2, 0b01), (2, 0b10)]
    m, w, b = _module(ins, outs, (3, 1, 0, 1), F64)
    with pytest.raises(ValueError, match=r"expects \(N, C, L\) or \(C, L\) input; got \(2, 8, 5, 5\)"):
        m(torch.zeros(2, 8, 5, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"weight must have shape \(O, I, k\)"):
        PartialConv1d.from_dense(torch.zeros(6, 8, 3, 3), None, ins, outs)
    dense = m.to_dense().weight.detach().clone()
    dense[2, 6, 1] = 1.0  # member 0's branch output reading member 1's branch input: a skipped block
    with pytest.raises(ValueError, match="non-zero"):
        PartialConv1d.from_dense(dense, None, ins, outs)
    with pytest.raises(ValueError, match="kernel_size must be an int or a 1-tuple"):
        PartialConv1d(ins, outs, (3, 3))
    with pytest.raises(ValueError, match="kernel_size is required"):
        PartialConv1d.from_state_dict(m.state_dict())


class Seq1d(nn.Module):
    """A 1-D CNN on sequences (B, C, L): two convolutions with a stride, a residual, a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 16, 5, stride=2, padding=2)
        self.c3, self.head = nn.Conv1d(16, 16, 3, padding=2, dilation=2), nn.Linear(16, 3)

    def forward(self, x):
        h = F.gelu(self.c2(F.relu(self.c1(x))))
        h = h + F.relu(self.c3(h))
        return self.head(h.mean(-1))


def test_fused_1d_cnn_runs_partial_conv1d_at_effective_cost(tmp_path):
    a, b = random_model(Seq1d(), 1), random_model(Seq1d(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 4, 24, dtype=F64, generator=gen) for _ in range(2)]
    x = torch.randn(5, 4, 24, dtype=F64, generator=gen)
    twin = permuted_copy(a, torch.Generator().manual_seed(1), example_inputs=data[0])
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.5, fast_modules="always")
    assert rel(run(fused, x), run(a, x)) < 1e-10
    ens = 0.5 * (run(a, x) + run(b, x))
    for alpha in (0.5, 1.0):
        fused = pyfusion.fuse([a, b], data, method="partial", alpha=alpha, fast_modules="always")
        assert type(fused) is Seq1d and not fused.fusion_info["ensemble_cap"]["capped"]
        kinds = {p: type(m).__name__ for p, m in fused.named_modules() if p in ("c1", "c2", "c3")}
        assert kinds == {"c1": "Conv1d", "c2": "PartialConv1d", "c3": "PartialConv1d"}, kinds  # c1: shared input
        cost = pyfusion.cost(fused, x, members=[a, b])
        assert cost.flops <= cost.ensemble_flops and cost.flops < cost.dense_flops
        dense = pyfusion.fuse([a, b], data, method="partial", alpha=alpha, fast_modules=False)
        assert rel(run(fused, x), run(dense, x)) < 1e-12
        if alpha == 1.0:
            assert rel(run(fused, x), ens) < 1e-10
    loaded = pyfusion.load(pyfusion.save(fused, tmp_path / "seq1d.safetensors"), factory=Seq1d)
    assert isinstance(loaded.c2, PartialConv1d) and torch.equal(run(loaded, x), run(fused, x))
