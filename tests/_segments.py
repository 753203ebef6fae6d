"""Shared cases and checks for the partial layer ops: member-mask segments (K = 1..5, subset shared slots for
K = 3 and 4, gaps, empty segments, any order) and the comparison with the float64 reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfusion.ops.layout import as_segments, pack_segment_weight, segment_plan, unpack_segment_weight

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ACTS = ["none", "relu", "gelu", "silu"]
ACT_FNS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# K = 3 with shared slots of member subsets, sorted by subset: {0,1,2} | {0,1} | {0,2} | {1,2} | b0 | b1 | b2
K3_IN = [(5, 0b111), (3, 0b011), (2, 0b101), (2, 0b110), (4, 0b001), (4, 0b010), (4, 0b100)]
K3_OUT = [(4, 0b111), (2, 0b011), (3, 0b101), (1, 0b110), (3, 0b001), (3, 0b010), (3, 0b100)]
# K = 4, subsets in no particular order, a gap (all members: a raw input column block) in the middle
K4_IN = [(3, 0b0011), (2, 0b1000), (4, 0b1111), (2, 0b0110), (3, 0b0100), (1, 0b1001), (2, 0b0001), (3, 0b0010)]
K4_OUT = [(2, 0b1000), (3, 0b0111), (2, 0b0001), (4, 0b1111), (1, 0b1100), (2, 0b0010), (3, 0b0100)]

LAYOUTS = [
    ([7, 5], [6, 3]),  # K = 1
    ([20, 13, 13], [33, 17, 17]),  # K = 2, uniform branches (batched path)
    ([0, 8, 8], [5, 6, 6]),  # no shared input (alpha = 1 for the inputs)
    ([6, 5, 5, 5], [0, 7, 7, 7]),  # K = 3, no shared output
    ([3, 0, 4], [2, 3, 0]),  # empty branch segments, non-uniform
    ([11, 3, 1, 4, 2, 5], [9, 2, 5, 1, 3, 4]),  # K = 5, odd non-uniform sizes
    ([5, 0, 0], [4, 3, 3]),  # branches read only the shared input
    ([0, 4, 4], [0, 3, 3]),  # alpha = 1: pure ensemble (block diagonal)
    ([9, 4, 4], [0, 0, 0]),  # no outputs at all
    (K3_IN, K3_OUT),  # K = 3, subset shared slots
    (K4_IN, K4_OUT),  # K = 4, subsets in any order
    ([(6, 0b11), (5, 0b01), (5, 0b10)], [(4, 0b01), (3, 0b11), (4, 0b10)]),  # K = 2, outputs out of order
]


def make_weight(ins, outs, dtype=torch.float32, taps=(), requires_grad=False, seed=0, integer=False):
    """(packed weight, bias) with random entries, or small integers (exact in every dtype's products)."""
    plan = segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))
    g = torch.Generator().manual_seed(seed)
    n = plan.stored * int(torch.Size(taps).numel())
    if integer:
        w = torch.randint(-3, 4, (n,), generator=g).to(torch.float64)
        b = torch.randint(-3, 4, (plan.o_total,), generator=g).to(torch.float64)
    else:
        w = torch.randn(n, generator=g, dtype=torch.float64) / max(1, plan.i_total) ** 0.5
        b = torch.randn(plan.o_total, generator=g, dtype=torch.float64)
    return w.to(dtype).requires_grad_(requires_grad), b.to(dtype).requires_grad_(requires_grad)


def dense_of(weight, ins, outs, taps=()):
    return unpack_segment_weight(weight, as_segments(ins, "in"), as_segments(outs, "out"), taps)


def pack(dense, ins, outs, check_zero=True):
    return pack_segment_weight(dense, as_segments(ins, "in"), as_segments(outs, "out"), check_zero=check_zero)


def assert_close(y, ref, same=None, dtype=None, exact=False):
    """y vs the float64 reference: relative error within max(TOL, 2 x torch's own error in y's dtype)."""
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    if y.numel() == 0:
        return
    if exact:
        assert torch.equal(y.double(), ref), (y.double() - ref).abs().max()
        return
    scale = ref.abs().max().item() + 1.0
    err = (y.double() - ref).abs().max().item() / scale
    err_torch = 0.0 if same is None else (same.double() - ref).abs().max().item() / scale
    assert err <= max(TOL[dtype or y.dtype], 2 * err_torch), (err, err_torch)
