"""The CPU execution strategies of partial_linear / partial_conv2d (panel engine, BLAS steps, one GEMM per output
run, shared + grouped conv, dense zero-block weight) and the measured choice among them (ops.partial_linear.tuning).

Every strategy is compared with the float64 reference on random and small-integer (exact) inputs, on the
structured cases (alpha 0, alpha 1, K = 2, 3, 4, batch 1, subset shared slots), in float32 and float64.
"""

from __future__ import annotations

import importlib
import time
import weakref

import pytest
import torch
from _segments import K3_IN, K3_OUT, K4_IN, K4_OUT, LAYOUTS, assert_close, make_weight

from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear
from pyfusion.ops import _weight_cache
from pyfusion.ops.layout import as_segments, segment_plan
from pyfusion.ops.partial_conv2d import conv_geom
from pyfusion.ops.partial_linear import tuning
from pyfusion.ops.reference import partial_conv2d_ref, partial_linear_ref

PL = importlib.import_module("pyfusion.ops.partial_linear.backends")
PC = importlib.import_module("pyfusion.ops.partial_conv2d.backends")

# alpha 0 (one dense block), alpha 1 (block diagonal), K = 2, 3, 4 standard layouts, a first layer, subset slots
STRUCTURED = [
    ([6, 0, 0], [5, 0, 0]),
    ([0, 4, 4], [0, 3, 3]),
    ([0, 3, 3, 3, 3], [0, 2, 2, 2, 2]),
    ([5, 3, 3], [4, 2, 2]),
    ([4, 2, 2, 2], [3, 2, 2, 2]),
    ([3, 2, 2, 2, 2], [2, 3, 3, 3, 3]),
    ([7, 0, 0, 0], [2, 3, 3, 3]),
    (K3_IN, K3_OUT),
    (K4_IN, K4_OUT),
]


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def _linear_strategies(plan):
    names = ["blas", "segments", "dense"]
    if PL.member_layout(plan) is not None:
        names.append("members")
    if not PL._cpp_available():
        names += ["cpp", "cpp_threads"]
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ins,outs", STRUCTURED + LAYOUTS)
def test_linear_strategies_match_reference(ins, outs, dtype):
    plan = plan_of(ins, outs)
    for integer in (False, True):
        w, b = make_weight(ins, outs, dtype, integer=integer, seed=3)
        for rows in (1, 5, 33):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, plan.i_total, generator=g, dtype=torch.float64)
            x = (x * 2).round() if integer else x
            x = x.to(dtype)
            for act in ("none", "relu", "gelu"):
                ref = partial_linear_ref(x, w, b, ins, outs, act)
                for name in _linear_strategies(plan):
                    with torch.no_grad():
                        y = PL.STRATEGIES[name](x, w, b, plan, act)
                    assert y.dtype == dtype, name
                    assert_close(y, ref, exact=integer and act == "none")
            no_bias = PL.STRATEGIES["segments"](x, w, None, plan, "none")
            assert_close(no_bias, partial_linear_ref(x, w, None, ins, outs, "none"), exact=integer)
            assert_close(
                PL.dense_forward(x, w, None, plan, "none"), partial_linear_ref(x, w, None, ins, outs), exact=integer
            )


def test_linear_strategies_nd_and_strided_inputs():
    ins, outs = [5, 3, 3], [4, 2, 2]
    plan = plan_of(ins, outs)
    w, b = make_weight(ins, outs, torch.float64)
    x3 = torch.randn(2, 3, plan.i_total, dtype=torch.float64)
    xs = torch.randn(plan.i_total, 6, dtype=torch.float64).t()  # column stride 6
    for x in (x3, xs):
        ref = partial_linear_ref(x, w, b, ins, outs, "silu")
        for name in _linear_strategies(plan):
            assert_close(PL.STRATEGIES[name](x, w, b, plan, "silu"), ref)


def test_dense_weight_is_a_view_when_the_layer_is_one_block():
    plan = plan_of([6, 0, 0], [5, 0, 0])
    w, _b = make_weight([6, 0, 0], [5, 0, 0])
    assert PL.dense_is_view(plan) and PL.dense_weight_of(w, plan).data_ptr() == w.data_ptr()
    plan2 = plan_of([5, 3, 3], [4, 2, 2])
    assert not PL.dense_is_view(plan2)
    # a dense copy only where it is small or not much larger than the stored weights
    assert PL.dense_candidate(plan2)
    wide = plan_of([0] + [1024] * 4, [0] + [1024] * 4)  # alpha = 1, K = 4: the dense matrix is 4x the stored
    assert not PL.dense_candidate(wide)


def _conv_cases():
    return STRUCTURED + [
        ([3, 2, 2], [4, 3, 3]),
        ([2, 3, 3, 3], [1, 2, 2, 2]),
        ([3, 1, 4], [2, 3, 0]),
        ([0, 4, 4], [2, 3, 3]),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ins,outs", _conv_cases())
def test_conv_strategies_match_reference(ins, outs, dtype):
    plan = plan_of(ins, outs)
    for geom_args, hw in (((3, 1, 1, 1), (5, 6)), (((3, 1), 2, (1, 0), 1), (7, 5)), ((1, 1, 0, 1), (3, 3))):
        geom = conv_geom(*geom_args)
        for integer in (False, True):
            w, b = make_weight(ins, outs, dtype, taps=geom.kernel, integer=integer, seed=5)
            for n in (1, 3):
                x = torch.randn(n, plan.i_total, *hw, dtype=torch.float64)
                x = ((x * 2).round() if integer else x).to(dtype)
                for act in ("none", "relu"):
                    ref = partial_conv2d_ref(x, w, b, ins, outs, geom.kernel, geom.stride, geom.padding, geom.dilation,
                                             act)  # fmt: skip
                    names = ["runs", "dense"] + (["grouped"] if PC.grouped_layout(plan) is not None else [])
                    names += ["members", "members_split"] if PC.member_layout(plan) is not None else []
                    names += ["im2col"]
                    for name in names:
                        with torch.no_grad():
                            y = PC.STRATEGIES[name](x, w, b, plan, geom, act)
                        assert y.is_contiguous() and y.dtype == dtype, name
                        assert_close(y, ref, exact=integer and act == "none")
                    if PC.grouped_layout(plan) is not None:
                        y = PC.STRATEGIES["grouped"](x, w, None, plan, geom, "none")
                        ref0 = partial_conv2d_ref(x, w, None, ins, outs, geom.kernel, geom.stride, geom.padding,
                                                  geom.dilation)  # fmt: skip
                        assert_close(y, ref0, exact=integer)
                    if PC.member_layout(plan) is not None:
                        y = PC.STRATEGIES["members"](x, w, None, plan, geom, "none")
                        ref0 = partial_conv2d_ref(x, w, None, ins, outs, geom.kernel, geom.stride, geom.padding,
                                                  geom.dilation)  # fmt: skip
                        assert_close(y, ref0, exact=integer)


@pytest.mark.parametrize("name", ["runs", "grouped", "members", "members_split", "im2col", "dense"])
def test_conv_strategies_on_channels_last_and_strided_inputs(name):
    """Every strategy on a channels-last input and on a channel-sliced view: the reference values, a contiguous
    output."""
    ins, outs = [3, 2, 2], [4, 3, 3]
    plan = plan_of(ins, outs)
    geom = conv_geom(3, 1, 1, 1)
    w, b = make_weight(ins, outs, torch.float64, taps=geom.kernel, seed=4)
    base = torch.randn(2, plan.i_total + 3, 6, 5, dtype=torch.float64)
    for x in (
        base[:, :7].contiguous(memory_format=torch.channels_last),
        base[:, 2:9],
        base[:, :7, :, ::1].transpose(2, 3),
    ):
        ref = partial_conv2d_ref(x, w, b, ins, outs, geom.kernel, geom.stride, geom.padding, geom.dilation, "relu")
        with torch.no_grad():
            y = PC.STRATEGIES[name](x, w, b, plan, geom, "relu")
        assert y.is_contiguous()
        assert_close(y, ref)


@pytest.mark.parametrize(
    "geom_args", [(3, 1, 1, 1), ((3, 2), (2, 1), (0, 2), (2, 1)), (5, 3, 2, 2), (1, 1, 0, 1), ((2, 3), 1, 0, (1, 3))]
)
def test_unfold_equals_torch_unfold(geom_args):
    """The im2col strategy's unfold (a strided view of the padded input, copied once) is F.unfold exactly, on
    strided, dilated, padded, asymmetric geometries and a non-contiguous input."""
    geom = conv_geom(*geom_args)
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)[:, 1:4]
    from pyfusion.ops.partial_conv2d.backends import conv_out_hw

    ho, wo = conv_out_hw(11, 9, geom.kernel, geom.stride, geom.padding, geom.dilation)
    want = torch.nn.functional.unfold(x, geom.kernel, geom.dilation, geom.padding, geom.stride)
    assert torch.equal(PC._unfold(x, geom, ho, wo), want)


def test_conv_candidates():
    """The strategies the tuner measures per plan: members only with shared outputs (split where their zeros are
    large), im2col only at small batches
    and where some run reads several input ranges (else it is the runs' own work), one convolution for a dense
    view."""
    geom = conv_geom(3)

    def names(ins, outs, small):
        return list(PC._candidates(plan_of(ins, outs), geom, small)[0])

    # the shared x shared zeros of the members: 4 * 5 of 76 stored weights, so the split members replace them
    assert names([5, 3, 3], [4, 2, 2], True) == ["runs", "grouped", "members_split", "im2col", "dense"]
    assert names([5, 3, 3], [4, 2, 2], False) == ["runs", "grouped", "members_split", "dense"]
    assert names([2, 6, 6], [2, 6, 6], False) == ["runs", "grouped", "members", "dense"]  # 4 of 124: the members
    assert names([0, 4, 4], [0, 3, 3], True) == ["runs", "grouped", "dense"]  # alpha 1: the members' convolutions
    assert names([6, 0, 0], [5, 0, 0], True) == ["dense"]
    assert names(K3_IN, K3_OUT, True)[0] == "runs" and "members" not in names(K3_IN, K3_OUT, True)


def test_member_layout_only_for_standard_layouts_with_shared_outputs():
    assert PC.member_layout(plan_of([4, 2, 2, 2], [3, 2, 2, 2])) == (3, 4, (2, 2, 2), 3, (2, 2, 2))
    assert PC.member_layout(plan_of([3, 1, 4], [2, 3, 0])) == (2, 3, (1, 4), 2, (3, 0))  # non-uniform branches
    assert PC.member_layout(plan_of([0, 4, 4], [2, 3, 3])) == (2, 0, (4, 4), 2, (3, 3))  # no shared inputs
    assert PC.member_layout(plan_of([0, 4, 4], [0, 3, 3])) is None  # alpha 1: the output runs are the members
    assert PC.member_layout(plan_of([6, 0, 0], [5, 0, 0])) is None  # no branch inputs
    assert PC.member_layout(plan_of(K3_IN, K3_OUT)) is None  # subset slots
    assert PC.member_layout(plan_of([7, 5], [6, 3])) is None  # K = 1


def test_member_weights_are_the_members_convolutions():
    """Each member's weight is its rows [shared | branch k] on its inputs [shared | branch k] of the dense
    zero-block weight, with the shared x shared block in member 0's only (so that the shared outputs sum once)."""
    ins, outs = [3, 2, 4], [2, 3, 1]
    plan = plan_of(ins, outs)
    geom = conv_geom(3)
    w, _b = make_weight(ins, outs, torch.float64, taps=geom.kernel, integer=True, seed=2)
    dense = PartialConv2d.from_dense(torch.zeros(6, 9, 3, 3, dtype=torch.float64), None, ins, outs)
    with torch.no_grad():
        dense.weight.copy_(w)
    d = dense.dense_weight()
    w0, w1 = PC._member_weights(w, plan, geom)
    assert torch.equal(w0, d[[0, 1, 2, 3, 4]][:, [0, 1, 2, 3, 4]])
    want1 = d[[0, 1, 5]][:, [0, 1, 2, 5, 6, 7, 8]].clone()
    want1[:2, :3] = 0
    assert torch.equal(w1, want1)


def test_grouped_layout_only_for_uniform_standard_layouts():
    assert PC.grouped_layout(plan_of([4, 2, 2, 2], [3, 2, 2, 2])) == (3, 4, 2, 3, 2)
    assert PC.grouped_layout(plan_of([0, 4, 4], [0, 3, 3])) == (2, 0, 4, 0, 3)
    assert PC.grouped_layout(plan_of([6, 0, 0], [5, 0, 0])) is None  # no branch inputs
    assert PC.grouped_layout(plan_of([3, 0, 4], [2, 3, 0])) is None  # non-uniform
    assert PC.grouped_layout(plan_of(K3_IN, K3_OUT)) is None  # subset slots
    assert PC.grouped_layout(plan_of([7, 5], [6, 3])) is None  # K = 1


# ---- the measured choice ----


def test_tuner_keeps_the_fastest_and_runs_it_afterwards(monkeypatch):
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    tuner = tuning.StrategyTuner("test_op")
    calls = []

    def fast(v):
        calls.append("fast")
        return v + 1

    def slow(v):
        calls.append("slow")
        time.sleep(0.003)
        return v + 1

    dropped = []
    assert tuner.run("k", {"slow": slow, "fast": fast}, (1,), "slow", lambda n, a, kept: dropped.append((n, kept))) == 2
    assert tuner.chosen("k") == "fast" and dropped == [("slow", "fast")]
    assert "k" in tuning.choices()["test_op"]
    calls.clear()
    for _ in range(3):
        assert tuner.run("k", {"slow": slow, "fast": fast}, (1,), "slow") == 2
    assert calls == ["fast"] * 3
    # a default not beaten by the margin is kept
    assert tuner.run("k2", {"a": fast, "b": fast}, (0,), "b") == 1 and tuner.chosen("k2") in ("a", "b")
    tuning.clear()
    assert tuner.chosen("k") is None


def test_tuner_confirms_the_winner_in_a_second_measurement(monkeypatch):
    """A candidate fastest only in the first measurement (a lucky minimum on a loaded machine) is not kept: the
    two best are measured again and must agree; otherwise the default (when one of the two) or the one faster over
    both measurements is kept."""
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    measured = []
    real_rounds = tuning._rounds

    def spy(*a):
        out = real_rounds(*a)
        measured.append(sorted(a[1]))
        return out

    monkeypatch.setattr(tuning, "_rounds", spy)

    def lucky(v):  # fast during the first measurement, slow from the second on
        time.sleep(0.003 if measured else 0.0)
        return v

    def steady(v):
        time.sleep(0.001)
        return v

    def slowest(v):
        time.sleep(0.005)
        return v

    tuner = tuning.StrategyTuner("test_confirm")
    tuner.run("k", {"steady": steady, "lucky": lucky}, (0,), "steady")
    assert measured == [["lucky", "steady"], ["lucky", "steady"]] and tuner.chosen("k") == "steady"
    measured.clear()
    tuner.run("k3", {"slowest": slowest, "steady": steady, "lucky": lucky}, (0,), "slowest")
    assert measured[1] == ["lucky", "steady"] and tuner.chosen("k3") == "steady"
    tuning.clear()


def test_tuner_measures_each_key_again_after_some_calls(monkeypatch):
    """The second measurement (at the key's _RECHECK_CALLS-th call) can replace a choice made while the machine
    stalled: the minimum per candidate over both measurements decides, and then the choice is final."""
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    monkeypatch.setattr(tuning, "_RECHECK_CALLS", 3)
    stalled = [True]

    def late(v):  # stalled during the first measurement only
        time.sleep(0.004 if stalled[0] else 0.0)
        return v + 1

    def steady(v):
        time.sleep(0.001)
        return v + 1

    tuner = tuning.StrategyTuner("test_recheck")
    fns = {"steady": steady, "late": late}
    assert tuner.run("k", fns, (0,), "steady") == 1
    assert tuner.chosen("k") == "steady" and tuner.final("k") is None
    stalled[0] = False
    for _ in range(2):  # the kept strategy runs until the recheck
        assert tuner.run("k", fns, (0,), "steady") == 1
    assert tuner.chosen("k") == "steady" and tuner.final("k") is None
    assert tuner.run("k", fns, (0,), "steady") == 1  # the 3rd call after the choice measures again
    assert tuner.final("k") == "late"
    tuning.clear()
    assert tuner.chosen("k") is None and tuner.final("k") is None


def test_tuning_off_runs_the_default_and_measures_nothing(monkeypatch):
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "0")
    tuner = tuning.StrategyTuner("test_off")
    calls = []
    fns = {"a": lambda v: calls.append("a") or v, "b": lambda v: calls.append("b") or v}
    for _ in range(3):
        tuner.run("k", fns, (0,), "b")
    assert calls == ["b"] * 3 and tuner.chosen("k") is None


def test_row_bucket():
    assert [tuning.row_bucket(r) for r in (0, 1, 4, 5, 8, 9, 1000)] == [0, 1, 4, 8, 8, 16, 1024]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modules_through_the_measured_choice_match_reference(monkeypatch, dtype):
    """Module calls (the tuned path): equal to the reference at every batch; every call of a key rounds the same
    way (the first, measuring call included); only the kept strategy's derived weights stay cached."""
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    tuning.clear()
    for ins, outs in ([0, 4, 4], [0, 3, 3]), ([5, 3, 3, 3], [4, 2, 2, 2]), (K4_IN, K4_OUT), ([6, 0, 0], [5, 0, 0]):
        lin = PartialLinear(ins, outs, activation="relu").to(dtype).eval()
        conv = PartialConv2d(ins, outs, 3, padding=1).to(dtype).eval()
        for rows in (1, 2, 40):
            x = torch.randn(rows, lin.in_features, dtype=dtype)
            xc = torch.randn(min(rows, 3), conv.in_channels, 5, 5, dtype=dtype)
            with torch.no_grad():
                y1, y2 = lin(x), lin(x)
                c1, c2 = conv(xc), conv(xc)
            assert torch.equal(y1, y2) and torch.equal(c1, c2)
            assert_close(y1, partial_linear_ref(x, lin.weight, lin.bias, ins, outs, "relu"))
            assert_close(c1, partial_conv2d_ref(xc, conv.weight, conv.bias, ins, outs, (3, 3), (1, 1), (1, 1),
                                                 (1, 1)))  # fmt: skip
        kept = {v[0] for k, v in tuning.choices()["partial_linear"].items() if k[0][0] == id(lin._plan)}
        assert kept and kept <= set(PL.STRATEGIES)
    # autograd still runs the registered op (differentiable), whatever was chosen
    lin = PartialLinear([5, 3, 3], [4, 2, 2]).to(dtype)
    x = torch.randn(3, 11, dtype=dtype, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_measured_losers_free_their_derived_weights(monkeypatch):
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    tuning.clear()
    _weight_cache.clear()
    lin = PartialLinear([5, 3, 3], [4, 2, 2]).eval()
    with torch.no_grad():
        lin(torch.randn(2, 11))
    (kept,) = {v[0] for k, v in tuning.choices()["partial_linear"].items() if k[0][0] == id(lin._plan)}
    # the panels (cpp), the dense copy (dense) or the members' weights when one of them was kept, nothing for the
    # BLAS paths
    assert _weight_cache.entries() == (1 if kept in ("cpp", "dense", "members") else 0)


def test_module_fast_path_still_checks_input_and_reads_the_backend_each_call(monkeypatch):
    """The modules' eager-inference fast path: wrong inputs still raise the precise errors, and a PYFUSION_BACKEND
    set after a layer's strategy was kept applies at the next call (the variable is read at every call)."""
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    torch.manual_seed(0)
    lin = PartialLinear([3, 2, 2], [2, 3, 3])
    conv = PartialConv2d([3, 2, 2], [2, 3, 3], 3, padding=1)
    x, xc = torch.randn(4, 7), torch.randn(2, 7, 5, 5)
    with torch.no_grad():
        for mod, inp in ((lin, x), (conv, xc)):
            mod(inp)
            ref = mod.to_dense().double()(inp.double())
            assert_close(mod(inp), ref, dtype=torch.float32)
        with pytest.raises(ValueError, match="x.shape"):
            lin(torch.randn(4, 6))
        with pytest.raises(ValueError, match="dtype and device"):
            lin(x.double())
        with pytest.raises(ValueError, match=r"shape \(N, 7, H, W\)"):
            conv(torch.randn(2, 6, 5, 5))
        with pytest.raises(ValueError, match="dtype and device"):
            conv(xc.double())
        monkeypatch.setenv("PYFUSION_BACKEND", "no_such_backend")
        for mod, inp in ((lin, x), (conv, xc)):
            with pytest.raises(Exception, match="no_such_backend"):
                mod(inp)
        monkeypatch.setenv("PYFUSION_BACKEND", "reference")
        for mod, inp in ((lin, x), (conv, xc)):
            assert_close(mod(inp), mod.to_dense().double()(inp.double()), dtype=torch.float32)


def test_hot_derived_follows_the_weight(monkeypatch):
    """The batch-1 strategies' weight-identity cache (backends.hot_derived): in-place updates, ``.data`` swaps and
    a second layout of the same flat weight are seen at the next call (exact on integers); a view made anew per call
    is not kept; the entry goes with the weight."""
    import gc

    PL._HOT.clear()
    for ins, outs in (([6, 0, 0], [5, 0, 0]), ([5, 3, 3], [4, 2, 2])):  # the dense view, a dense copy
        plan = plan_of(ins, outs)
        w, b = make_weight(ins, outs, torch.float64, integer=True, seed=7)
        w = torch.nn.Parameter(w, requires_grad=False)
        x = (torch.randn(2, plan.i_total, dtype=torch.float64) * 2).round()
        names = ["dense"] + ([] if PL._cpp_available() else ["cpp"])
        for name in names:
            fn = PL.STRATEGIES[name]
            assert_close(fn(x, w, b, plan, "none"), partial_linear_ref(x, w, b, ins, outs), exact=True)
            assert (id(w), "dense" if name == "dense" else "panels_none") in PL._HOT
            with torch.no_grad():
                w.mul_(2)  # in place: the version changes
            assert_close(fn(x, w, b, plan, "none"), partial_linear_ref(x, w, b, ins, outs), exact=True)
            w.data = w.data * 3  # a new storage
            assert_close(fn(x, w, b, plan, "none"), partial_linear_ref(x, w, b, ins, outs), exact=True)
        if PL.dense_is_view(plan):  # the same 30 weights read as another one-block layout
            other = plan_of([5, 0, 0], [6, 0, 0])
            ref = partial_linear_ref(x[:, :5], w, None, [5, 0, 0], [6, 0, 0])
            assert_close(PL.dense_forward(x[:, :5], w, None, other, "none"), ref, exact=True)
        n = len(PL._HOT)
        PL.dense_forward(x, w.reshape(-1), b, plan, "none")  # a fresh view: not kept
        assert len(PL._HOT) == n
    # the entry goes with its weight
    PL._HOT.clear()
    for ins, outs in (([6, 0, 0], [5, 0, 0]), ([5, 3, 3], [4, 2, 2])):
        plan = plan_of(ins, outs)
        w, b = make_weight(ins, outs, torch.float64, seed=8)
        w = torch.nn.Parameter(w, requires_grad=False)
        PL.dense_forward(torch.randn(2, plan.i_total, dtype=torch.float64), w, b, plan, "none")
        assert (id(w), "dense") in PL._HOT
        del w
        gc.collect()
        assert not PL._HOT


def test_measured_losers_free_their_hot_entries(monkeypatch):
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    tuning.clear()
    PL._HOT.clear()
    lin = PartialLinear([5, 3, 3], [4, 2, 2]).eval()
    with torch.no_grad():
        lin(torch.randn(1, 11))
    (kept,) = {v[0] for k, v in tuning.choices()["partial_linear"].items() if k[0][0] == id(lin._plan)}
    tags = {k[1] for k in PL._HOT if k[0] == id(lin.weight)}
    assert tags == ({kept} if kept in ("dense", "members") else {"panels_none"} if kept == "cpp" else set())


def _dense_only(monkeypatch):
    """The tuner offered only the dense strategy: settled at the first call (deterministic hot entries)."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setattr(PL, "_candidates", lambda plan, small, threads=False: ({"dense": PL.dense_forward}, "dense"))
    PL._CANDIDATES.clear()
    tuning.clear()


@pytest.mark.parametrize("ins,outs", [([6, 0, 0], [5, 0, 0]), ([5, 3, 3], [4, 2, 2])])  # dense view, dense copy
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_module_hot_calls_follow_the_weight_and_the_threads(monkeypatch, ins, outs, activation):
    """The modules' one-lookup entries (backends._HOT_CALLS, holding the dense weight itself): installed once the
    strategy is settled, then missed (and the result still exact) after an in-place update, a ``.data`` swap and a
    ``torch.set_num_threads`` change; wrong inputs still raise; autograd still takes the registered op; the entries
    go with the weight."""
    import gc

    _dense_only(monkeypatch)
    w, b = make_weight(ins, outs, torch.float64, integer=True, seed=3)
    lin = PartialLinear(ins, outs, activation=activation).double().eval()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = (torch.randn(3, lin.in_features, dtype=torch.float64) * 2).round()

    def check():
        with torch.no_grad():
            y = lin(x)
        assert_close(y, partial_linear_ref(x, lin.weight, lin.bias, ins, outs, activation), exact=True)

    def hot():
        return PL.hot_key(x, lin.weight, activation)

    def hits() -> bool:
        with torch.no_grad():
            return PL.hot_forward(hot(), x, lin.weight, lin.bias, lin._plan, activation) is not None

    threads = torch.get_num_threads()
    check()
    assert hot() in PL._HOT_CALLS and hits()
    check()  # from the entry
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: the version changes
    assert not hits()
    check()
    assert hits()
    lin.weight.data = lin.weight.data * 3  # a new storage, same version
    assert not hits()
    check()
    assert hits()
    other = 1 if threads != 1 else 2
    try:
        torch.set_num_threads(other)
        assert hot()[-1] == other and not hits()  # the thread count is part of the key
        check()
        assert hits()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        with pytest.raises(ValueError, match="x.shape"):
            lin(torch.randn(3, lin.in_features + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="dtype and device"):
            lin(x.float())
    xg = x.clone().requires_grad_(True)
    lin(xg).sum().backward()  # grad enabled: the registered op, differentiable in x and the weight
    assert xg.grad is not None and lin.weight.grad is not None
    n = sum(1 for k in PL._HOT_CALLS if k[0] == id(lin.weight))
    assert n >= 2
    ref = weakref.ref(lin.weight)
    lin = None
    gc.collect()
    assert ref() is None
    assert not any(isinstance(k[1], torch.Size) and k[0] == id(ref) for k in PL._HOT_CALLS)
    assert not [v for k, v in PL._HOT_CALLS.items() if isinstance(k[1], torch.Size) and v[1]() is None]


@pytest.mark.skipif(bool(PL._cpp_available()), reason="the panel engine (pyfusion._C) is not built")
@pytest.mark.parametrize("strategy", ["cpp", "cpp_threads"])
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_hot_calls_run_the_panel_engine_from_the_entry(monkeypatch, activation, dtype, strategy):
    """A settled panel-engine layer on 2-D inputs calls the engine straight from its entry (its panels held there;
    the threaded strategy's engine plan, ``parallel_min_macs`` 0): exact on integers, and it follows in-place
    updates, ``.data`` swaps and thread counts; inputs with a column stride, a non-contiguous bias and N-D inputs
    take cpp_forward, exact too."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    fn = PL.STRATEGIES[strategy]
    monkeypatch.setattr(PL, "_candidates", lambda plan, small, threads=False: ({strategy: fn}, strategy))
    PL._CANDIDATES.clear()
    tuning.clear()
    ins, outs = [5, 3, 3], [4, 2, 2]
    w, b = make_weight(ins, outs, dtype, integer=True, seed=5)
    lin = PartialLinear(ins, outs, activation=activation).to(dtype).eval()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    x = (torch.randn(3, 11, dtype=torch.float64) * 2).round().to(dtype)

    def check(inp=x):
        with torch.no_grad():
            y = lin(inp)
        assert y.dtype == dtype
        assert_close(y, partial_linear_ref(inp, lin.weight, lin.bias, ins, outs, activation), exact=True)

    check()
    ent = PL._HOT_CALLS[PL.hot_key(x, lin.weight, activation)]
    assert ent[7] is not None  # the engine and its panels
    engine = ent[7][0].__self__
    assert (engine is PL._panel_plan_threaded(lin._plan, activation)) == (strategy == "cpp_threads")
    assert (engine.parallel_min_macs == 0) == (strategy == "cpp_threads")
    check()
    with torch.no_grad():
        lin.weight.mul_(-2)
    check()
    lin.weight.data = lin.weight.data * 3
    check()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        check()
        check()
    finally:
        torch.set_num_threads(threads)
    wide = (torch.randn(3, 22, dtype=torch.float64) * 2).round().to(dtype)
    check(wide[:, ::2])  # column stride 2: cpp_forward copies it
    check(wide[:, :11])  # row stride 22, unit column stride: the entry's direct call
    lin.bias.data = torch.stack([lin.bias.data, lin.bias.data], 1)[:, 0]  # a non-contiguous bias
    assert not lin.bias.is_contiguous()
    check()
    check(x.view(3, 1, 11).expand(3, 2, 11).contiguous())  # 3-D: no direct call in its entry
    assert PL._HOT_CALLS[PL.hot_key(x.view(3, 1, 11).expand(3, 2, 11), lin.weight, activation)][7] is None


@pytest.mark.skipif(bool(PL._cpp_available()), reason="the panel engine (pyfusion._C) is not built")
@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.float16])
def test_panel_engine_refuses_a_bias_of_another_dtype(monkeypatch, bias_dtype):
    """The engine reads the bias through its address as x's dtype: a bias of another dtype was read as garbage
    (float64 bias, float32 layer: errors of 1e19) or past its end. Now a ValueError naming the bias, from the
    module's one-lookup entry and from cpp_forward alike; the layer runs again once the bias is fixed."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setattr(PL, "_candidates", lambda plan, small, threads=False: ({"cpp": PL.cpp_forward}, "cpp"))
    PL._CANDIDATES.clear()
    tuning.clear()
    lin = PartialLinear([5, 3, 3], [4, 2, 2]).eval()
    x = torch.randn(2, 11)
    with torch.no_grad():
        lin(x)
        assert PL._HOT_CALLS[PL.hot_key(x, lin.weight, "none")][7] is not None
        good = lin.bias.data
        lin.bias.data = good.to(bias_dtype)
        for _ in range(2):
            with pytest.raises(ValueError, match="bias must have x's dtype"):
                lin(x)
        with pytest.raises(ValueError, match="bias must have x's dtype"):
            PL.cpp_forward(x, lin.weight, lin.bias, lin._plan, "none")
        lin.bias.data = good
        assert_close(lin(x), partial_linear_ref(x, lin.weight, lin.bias, [5, 3, 3], [4, 2, 2]), dtype=torch.float32)


def test_module_hot_calls_skip_views_and_inference_weights(monkeypatch):
    """No entry for a weight made anew at each call (EnsembleLinear's flat view) nor for an inference tensor (no
    version counter to see in-place updates by): those keep the checked path, and stay exact. (The checked path's
    own derived-weight caches do not see in-place updates of inference-tensor weights either: not tested here.)"""
    _dense_only(monkeypatch)
    PL._HOT_CALLS.clear()
    ens = EnsembleLinear(2, 4, 3).eval()
    x = torch.randn(2, ens._plan.i_total)
    with torch.no_grad():
        y = ens(x)
        ens(x)
        assert not [k for k in PL._HOT_CALLS if isinstance(k[1], torch.Size)]
        monkeypatch.setenv("PYFUSION_BACKEND", "reference")
        assert_close(y, ens(x), dtype=torch.float32)
    monkeypatch.delenv("PYFUSION_BACKEND")
    with torch.inference_mode():
        lin = PartialLinear([5, 3, 3], [4, 2, 2]).eval()
        xi = torch.randn(2, 11)
        lin(xi)
        lin(xi)
        y = lin(xi)
        assert not any(k[0] == id(lin.weight) for k in PL._HOT_CALLS if isinstance(k[1], torch.Size))
        assert_close(y, partial_linear_ref(xi, lin.weight, lin.bias, [5, 3, 3], [4, 2, 2]), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("rows", [1, 64])
def test_inference_mode_weights_changed_in_place_are_seen(kind, rows):
    """A module built inside torch.inference_mode() has inference-tensor weights: no version counter, and they can
    still be changed in place there. No derived weight (dense copy, panels, tap-major copy) may be reused after such
    a change: the output must follow the weight at every call (it was stale on main before this test)."""
    ins, outs = K3_IN, K3_OUT
    width = sum(n for n, _mask in ins)
    g = torch.Generator().manual_seed(rows)
    with torch.inference_mode():
        if kind == "linear":
            mod = PartialLinear(ins, outs).double()
            x = torch.randn(rows, width, generator=g, dtype=torch.float64)
        else:
            mod = PartialConv2d(ins, outs, 3, padding=1).double()
            x = torch.randn(max(1, rows // 32), width, 5, 5, generator=g, dtype=torch.float64)

        def ref():
            if kind == "linear":
                return partial_linear_ref(x, mod.weight, mod.bias, ins, outs)
            return partial_conv2d_ref(x, mod.weight, mod.bias, ins, outs, 3, padding=1)

        assert mod.weight.is_inference()
        for step in range(4):  # several calls per weight: the tuner measures, then settles on a strategy
            for _ in range(3):
                torch.testing.assert_close(mod(x), ref(), rtol=1e-10, atol=1e-10)
            mod.weight.mul_(1.5 + step)  # in place, inside inference mode: no version bump to see
            mod.weight[0] += 1.0


@pytest.mark.skipif(bool(PL._cpp_available()), reason="the panel engine (pyfusion._C) is not built")
def test_threaded_panel_engine_is_a_candidate_only_where_it_differs(monkeypatch):
    """``cpp_threads`` is measured only with more than one thread and a work size (rows x stored weights) between
    CPP_THREADS_MIN_MACS and the engine's own threshold (from it, ``cpp`` is threaded too); kept, it keeps the
    panels it shares with ``cpp`` (dropping the measured ``cpp`` must not free them), and the layer stays exact."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    ins, outs = [40, 60, 60], [30, 50, 50]
    plan = plan_of(ins, outs)
    threshold = PL._panel_plan(plan, "none").parallel_min_macs
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(PL, "CPP_THREADS_MIN_MACS", plan.stored)
        assert PL.cpp_threads_candidate(plan, "none", 1)
        assert not PL.cpp_threads_candidate(plan, "none", threshold // plan.stored + 1)  # cpp is threaded there
        monkeypatch.setattr(PL, "CPP_THREADS_MIN_MACS", plan.stored + 1)
        assert not PL.cpp_threads_candidate(plan, "none", 1) and PL.cpp_threads_candidate(plan, "none", 2)
        torch.set_num_threads(1)
        assert not PL.cpp_threads_candidate(plan, "none", 2)
    finally:
        torch.set_num_threads(threads)
    assert "cpp_threads" in PL._candidates(plan, True, True)[0]
    assert "cpp_threads" not in PL._candidates(plan, True, False)[0]
    assert "cpp_threads" not in PL._candidates(plan, False, True)[0]  # rows above the engine's crossover

    w, b = make_weight(ins, outs, torch.float32, integer=True, seed=9)
    x = (torch.randn(2, plan.i_total) * 2).round()
    _weight_cache.clear()
    PL._HOT.clear()
    with torch.no_grad():
        PL.cpp_forward(x, w, b, plan, "none")
        n = _weight_cache.entries()
        PL._drop_derived("cpp", (x, w, b, plan, "none"), "cpp_threads")
        assert _weight_cache.entries() == n and (id(w), PL._CPP_TAGS["none"]) in PL._HOT
        assert_close(PL.cpp_threads_forward(x, w, b, plan, "none"), partial_linear_ref(x, w, b, ins, outs), exact=True)
        PL._drop_derived("cpp_threads", (x, w, b, plan, "none"), "members")
        assert _weight_cache.entries() == n - 1 and (id(w), PL._CPP_TAGS["none"]) not in PL._HOT
