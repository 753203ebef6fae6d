"""The ``members`` CPU strategy of partial_linear (backends.members_forward: the K members' GEMMs, the shared outputs
summed) next to the other strategies, every one forced and compared with the float64 reference over the alpha grid,
and its derived weights following the weight (in-place updates, ``.data`` swaps, measured losers freed).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _segments import K3_IN, K3_OUT, assert_close, make_weight

from pyfusion.nn import PartialLinear
from pyfusion.ops import _weight_cache
from pyfusion.ops.layout import as_segments, segment_plan, unpack_segment_weight
from pyfusion.ops.partial_linear import tuning
from pyfusion.ops.reference import partial_linear_ref

PL = importlib.import_module("pyfusion.ops.partial_linear.backends")


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def standard(n_in: int, n_out: int, k: int, alpha: float) -> tuple[list[int], list[int]]:
    """The benchmark's layout: per member round(alpha n) branch slots, the rest shared."""
    b_in, b_out = round(alpha * n_in), round(alpha * n_out)
    return [n_in - b_in] + [b_in] * k, [n_out - b_out] + [b_out] * k


GRID = [standard(n_in, n_out, k, a) for k in (2, 3, 4) for a in (0.0, 0.5, 0.75, 1.0) for n_in, n_out in
        ((8, 8), (7, 5))]  # fmt: skip
# non-uniform branches, no shared inputs, an empty branch output, more shared outputs than inputs, a member subset
IRREGULAR = [([3, 1, 4], [2, 3, 0]), ([0, 4, 4], [2, 3, 3]), ([3, 2, 2], [4, 3, 3]), ([2, 5, 1, 3], [1, 2, 4, 2]),
             (K3_IN, K3_OUT)]  # fmt: skip


def strategies(plan) -> list[str]:
    names = ["blas", "segments", "dense"]
    names += ["members"] if PL.member_layout(plan) is not None else []
    return names + ([] if PL._cpp_available() else ["cpp"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ins,outs", GRID + IRREGULAR)
def test_every_strategy_forced_matches_reference(ins, outs, dtype):
    """Every strategy the tuner may pick, called directly: the float64 reference on random inputs (within the
    dtype's tolerance) and exactly on small integers, at batch 1 and 33, with and without bias."""
    plan = plan_of(ins, outs)
    for integer in (False, True):
        w, b = make_weight(ins, outs, dtype, integer=integer, seed=11)
        for rows in (1, 33):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, plan.i_total, generator=g, dtype=torch.float64)
            x = ((x * 2).round() if integer else x).to(dtype)
            for bias in (b, None):
                for act in ("none", "relu"):
                    ref = partial_linear_ref(x, w, bias, ins, outs, act)
                    for name in strategies(plan):
                        with torch.no_grad():
                            y = PL.STRATEGIES[name](x, w, bias, plan, act)
                        assert y.dtype == dtype and y.is_contiguous(), name
                        assert_close(y, ref, exact=integer)


def test_members_on_nd_and_strided_inputs():
    ins, outs = standard(8, 6, 3, 0.5)
    plan = plan_of(ins, outs)
    w, b = make_weight(ins, outs, torch.float64, seed=2)
    x3 = torch.randn(2, 3, plan.i_total, dtype=torch.float64)
    xs = torch.randn(plan.i_total, 5, dtype=torch.float64).t()  # column stride 5
    xr = torch.randn(4, plan.i_total + 3, dtype=torch.float64)[:, 2:-1]  # row stride i_total + 3
    for x in (x3, xs, xr):
        assert_close(PL.members_forward(x, w, b, plan, "silu"), partial_linear_ref(x, w, b, ins, outs, "silu"))


def test_member_layout_and_candidates():
    """members: standard layouts with K >= 2, shared outputs and inputs in every branch; offered to the tuner
    there (its FLOPs are the stored weights exactly, so no FLOP bound excludes a layout)."""
    assert PL.member_layout(plan_of([4, 2, 2, 2], [3, 2, 2, 2])) == (3, 4, (2, 2, 2), 3, (2, 2, 2))
    assert PL.member_layout(plan_of([0, 4, 4], [2, 3, 3])) == (2, 0, (4, 4), 2, (3, 3))
    assert PL.member_layout(plan_of([0, 4, 4], [0, 3, 3])) is None  # alpha 1: the output runs are the members
    assert PL.member_layout(plan_of([6, 0, 0], [5, 0, 0])) is None  # alpha 0: one block
    assert PL.member_layout(plan_of([5, 0, 0], [4, 3, 3])) is None  # branches without inputs
    assert PL.member_layout(plan_of(K3_IN, K3_OUT)) is None  # member subsets
    assert PL.member_layout(plan_of([7, 5], [6, 3])) is None  # K = 1

    def names(ins, outs):
        return list(PL._candidates(plan_of(ins, outs), False)[0])

    assert "members" in names(*standard(100, 100, 2, 0.25)) and "members" in names(*standard(100, 100, 4, 0.75))
    assert "members" not in names(*standard(100, 100, 2, 1.0))
    assert names(*standard(100, 100, 2, 0.0)) == ["dense"]


@pytest.mark.parametrize("ins,outs", [standard(7, 5, 2, 0.5), standard(8, 8, 4, 0.75), ([0, 4, 4], [2, 3, 3])])
def test_member_weights_are_the_stored_blocks_once(ins, outs):
    """Member 1's weight is rows [shared | branch 1] on [x_s | x_1] of the dense weight, member k >= 2's rows
    [shared | branch k] on x_k, the cross weight branches 2..K on x_s: together the stored weights, each once."""
    plan = plan_of(ins, outs)
    k, i_s, i_b, o_s, o_b = PL.member_layout(plan)
    w, _b = make_weight(ins, outs, torch.float64, integer=True, seed=4)
    dense = unpack_segment_weight(w, plan.in_segments, plan.out_segments)
    ws, cross = PL.member_weights(w, plan)
    n0, c0 = o_s + o_b[0], i_s + i_b[0]
    assert torch.equal(ws[0].t(), torch.cat([dense[:o_s, :c0], dense[o_s:n0, :c0]]))
    i0, o0 = c0, n0
    for j in range(1, k):
        cols = slice(i0, i0 + i_b[j])
        assert torch.equal(ws[j].t(), torch.cat([dense[:o_s, cols], dense[o0 : o0 + o_b[j], cols]]))
        i0, o0 = i0 + i_b[j], o0 + o_b[j]
    if i_s:
        assert torch.equal(cross.t(), dense[n0:, :i_s])
    else:
        assert cross is None
    assert sum(t.numel() for t in ws) + (0 if cross is None else cross.numel()) == plan.stored


def _members_only(monkeypatch):
    """The tuner offered only the members strategy: settled at the first call (its hot entries deterministic)."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    members_only = ({"members": PL.members_forward}, "members")
    monkeypatch.setattr(PL, "_candidates", lambda plan, small, threads=False: members_only)
    PL._CANDIDATES.clear()
    tuning.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ins,outs", [standard(8, 8, 2, 0.75), standard(7, 5, 3, 0.5), ([0, 4, 4], [2, 3, 3])])
def test_module_follows_in_place_updates(monkeypatch, ins, outs, dtype):
    """A PartialLinear running ``members`` (from the modules' one-lookup entry after the first call): exact on
    integers after an in-place weight update (optimizer-style ``mul_`` / ``copy_``), a ``.data`` swap and an
    in-place bias update; the derived weights rebuilt, not reused."""
    _members_only(monkeypatch)
    lin = PartialLinear(ins, outs, activation="relu").to(dtype).eval()
    w, b = make_weight(ins, outs, dtype, integer=True, seed=6)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = (torch.randn(5, lin.in_features, dtype=torch.float64) * 2).round().to(dtype)

    def check():
        with torch.no_grad():
            y = lin(x)
        assert_close(y, partial_linear_ref(x, lin.weight, lin.bias, ins, outs, "relu"), exact=True)

    check()
    assert PL._HOT_CALLS[PL.hot_key(x, lin.weight, "relu")][5] is PL.members_forward
    check()
    before = PL.member_weights(lin.weight, lin._plan)[0][0].clone()
    with torch.no_grad():
        lin.weight.mul_(-2)
    check()
    assert torch.equal(PL.member_weights(lin.weight, lin._plan)[0][0], -2 * before)
    with torch.no_grad():
        lin.weight.copy_(make_weight(ins, outs, dtype, integer=True, seed=7)[0])
    check()
    lin.weight.data = lin.weight.data * 3  # a new storage, same version
    check()
    with torch.no_grad():
        lin.bias.add_(1)
    check()
    with torch.no_grad():  # the strategy itself, outside the module
        y = PL.members_forward(x, lin.weight, lin.bias, lin._plan, "none")
    assert_close(y, partial_linear_ref(x, lin.weight, lin.bias, ins, outs), exact=True)


def test_measured_loser_frees_the_member_weights(monkeypatch):
    """A measured ``members`` not kept leaves neither its derived weights nor its hot entry behind."""
    ins, outs = standard(8, 8, 2, 0.75)
    plan = plan_of(ins, outs)
    w, b = make_weight(ins, outs, torch.float32, seed=1)
    w = torch.nn.Parameter(w, requires_grad=False)
    _weight_cache.clear()
    PL._HOT.clear()
    with torch.no_grad():
        PL.members_forward(torch.randn(3, plan.i_total), w, b, plan, "none")
    assert _weight_cache.entries() == 1 and (id(w), "members") in PL._HOT
    PL._drop_derived("members", (None, w, b, plan, "none"))
    assert _weight_cache.entries() == 0 and (id(w), "members") not in PL._HOT


def test_inference_mode_weights_changed_in_place_are_seen(monkeypatch):
    """Inference-tensor weights (no version counter) changed in place inside inference mode: ``members`` derives
    its weights anew at every call, never a stale copy."""
    _members_only(monkeypatch)
    ins, outs = standard(8, 8, 3, 0.5)
    with torch.inference_mode():
        lin = PartialLinear(ins, outs).double()
        x = torch.randn(6, lin.in_features, dtype=torch.float64)
        for step in range(3):
            for _ in range(2):
                assert_close(lin(x), partial_linear_ref(x, lin.weight, lin.bias, ins, outs))
            lin.weight.mul_(1.5 + step)
