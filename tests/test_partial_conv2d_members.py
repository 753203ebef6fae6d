"""PartialConv2d's split member convolutions (partial_conv2d.backends._members_split_forward): member 1 over
[x_s | x_1], member k >= 2 over x_k alone, one convolution of x_s with the branches 2..K rows. Every output is
compared with the float64 reference (F.conv2d on the dense zero-block weight, ops.reference.partial_conv2d_ref),
exactly on small-integer values."""

from __future__ import annotations

import importlib

import pytest
import torch
from _segments import assert_close, make_weight

from pyfusion.ops.layout import as_segments, segment_plan, unpack_segment_weight
from pyfusion.ops.partial_conv2d import conv_geom
from pyfusion.ops.reference import partial_conv2d_ref

PC = importlib.import_module("pyfusion.ops.partial_conv2d.backends")

GEOMS = [
    ((3, 1, 1, 1), (6, 5)),
    (((3, 1), 2, (1, 0), 1), (7, 5)),
    ((3, 1, 2, 2), (6, 6)),  # dilated
    ((1, 1, 0, 1), (3, 4)),
    (((2, 3), (2, 1), (0, 2), (2, 1)), (7, 6)),  # asymmetric kernel, stride, padding and dilation
]


def _layouts():
    """Standard layouts over K = 2..4 and alpha 0..1 (8 -> 6 channels per member), the non-uniform ones and one
    without shared inputs: those with a member layout (alpha 0 has no branch inputs, alpha 1 no shared outputs)."""
    out = []
    for k in (2, 3, 4):
        for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
            b_in, b_out = round(alpha * 8), round(alpha * 6)
            out.append(([8 - b_in] + [b_in] * k, [6 - b_out] + [b_out] * k))
    out += [([3, 1, 4], [2, 3, 0]), ([2, 3, 1, 2], [1, 2, 0, 3]), ([0, 4, 4], [2, 3, 3]), ([5, 3, 3], [4, 2, 2])]
    return out


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def _ref(x, w, b, ins, outs, geom, act="none"):
    return partial_conv2d_ref(x, w, b, ins, outs, geom.kernel, geom.stride, geom.padding, geom.dilation, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ins,outs", _layouts())
def test_members_split_matches_reference(ins, outs, dtype):
    plan = plan_of(ins, outs)
    if PC.member_layout(plan) is None:
        assert ins[1] == 0 or outs[0] == 0  # alpha 0 or 1: no member-shaped convolutions to split
        return
    for geom_args, hw in GEOMS:
        geom = conv_geom(*geom_args)
        for integer in (False, True):
            w, b = make_weight(ins, outs, dtype, taps=geom.kernel, integer=integer, seed=3)
            for n in (1, 3):
                x = torch.randn(n, plan.i_total, *hw, dtype=torch.float64)
                x = ((x * 2).round() if integer else x).to(dtype)
                for bias in (b, None):
                    for act in ("none", "relu"):
                        with torch.no_grad():
                            y = PC.STRATEGIES["members_split"](x, w, bias, plan, geom, act)
                        assert y.is_contiguous() and y.dtype == dtype
                        assert_close(y, _ref(x, w, bias, ins, outs, geom, act), exact=integer)


def test_members_split_after_in_place_weight_updates():
    """The derived weights are rebuilt when the packed weight changes in place (copy_, add_, a slice's fill_) and
    the bias is read at each call (its slices, no copy): every output is the updated layer's."""
    ins, outs = [4, 2, 2, 2], [3, 2, 2, 2]
    plan = plan_of(ins, outs)
    geom = conv_geom(3, 1, 1, 1)
    w, b = make_weight(ins, outs, torch.float64, taps=geom.kernel, integer=True, seed=1)
    x = (torch.randn(3, plan.i_total, 5, 5, dtype=torch.float64) * 2).round()
    w2, b2 = make_weight(ins, outs, torch.float64, taps=geom.kernel, integer=True, seed=2)
    steps = [
        lambda: w.copy_(w2),
        lambda: w.add_(1),
        lambda: w[: w.numel() // 3].fill_(-2),
        lambda: b.copy_(b2),
        lambda: b[2:].mul_(3),
    ]
    with torch.no_grad():
        for step in [lambda: None] + steps:
            step()
            y = PC.STRATEGIES["members_split"](x, w, b, plan, geom, "none")
            assert torch.equal(y, _ref(x, w, b, ins, outs, geom))


def test_members_split_on_channels_last_and_strided_inputs():
    ins, outs = [3, 2, 2], [4, 3, 3]
    plan = plan_of(ins, outs)
    geom = conv_geom(3, 1, 1, 1)
    w, b = make_weight(ins, outs, torch.float64, taps=geom.kernel, seed=4)
    base = torch.randn(2, plan.i_total + 3, 6, 5, dtype=torch.float64)
    for x in (base[:, :7].contiguous(memory_format=torch.channels_last), base[:, 2:9], base[:, :7].transpose(2, 3)):
        with torch.no_grad():
            y = PC.STRATEGIES["members_split"](x, w, b, plan, geom, "relu")
        assert y.is_contiguous()
        assert_close(y, _ref(x, w, b, ins, outs, geom, "relu"))


def test_member_split_weights_are_the_blocks():
    """Member 1's weight is the dense rows [shared | branch 1] on [shared | branch 1]; member k >= 2's its rows
    [shared | branch k] on branch k's inputs alone; the cross weight the branches 2..K rows on the shared inputs."""
    ins, outs = [3, 2, 4, 1], [2, 3, 1, 2]
    plan = plan_of(ins, outs)
    geom = conv_geom(3)
    w, _b = make_weight(ins, outs, torch.float64, taps=geom.kernel, integer=True, seed=2)
    d = unpack_segment_weight(w, plan.in_segments, plan.out_segments, geom.kernel)
    (w0, w1, w2), cross = PC._member_split_weights(w, plan, geom)
    assert torch.equal(w0, d[[0, 1, 2, 3, 4]][:, [0, 1, 2, 3, 4]])
    assert torch.equal(w1, d[[0, 1, 5]][:, [5, 6, 7, 8]])
    assert torch.equal(w2, d[[0, 1, 6, 7]][:, [9]])
    assert torch.equal(cross, d[[5, 6, 7]][:, [0, 1, 2]])
    assert all(t.is_contiguous() for t in (w0, w1, w2, cross))


def test_members_split_candidate():
    """Offered where the zeros that ``members`` multiplies are at least MEMBERS_SPLIT_MIN_ZEROS of the stored
    weights, never without shared inputs (nothing to split) nor without a member layout."""
    assert PC.members_split_candidate(plan_of([32, 32, 32], [32, 32, 32]))  # alpha 0.5, K = 2
    assert PC.members_split_candidate(plan_of([48] + [16] * 4, [48] + [16] * 4))  # alpha 0.25, K = 4
    assert not PC.members_split_candidate(plan_of([16, 48, 48], [16, 48, 48]))  # alpha 0.75: 1/31 zeros
    assert not PC.members_split_candidate(plan_of([0, 4, 4], [2, 3, 3]))  # no shared inputs
    assert not PC.members_split_candidate(plan_of([0, 4, 4], [0, 3, 3]))  # alpha 1
