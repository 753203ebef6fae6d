"""pyfusion.ops.partial_conv2d on member-mask segments: the torch backend, the Triton implicit-GEMM kernel in the
interpreter and the float64 reference (dense zero-block weight), autograd of the stored blocks only, validation,
and PartialConv2d running through it.

Tolerances are earned: the op's error must stay within max(TOL[dtype], 2 * error of torch's dense F.conv2d with
the zero-block weight in the same dtype); exact on small integers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _segments import K3_IN, K3_OUT, K4_IN, K4_OUT, assert_close, dense_of, make_weight
from _segments import pack as pack_dense

from pyfusion.backends import triton_interpreter_reasons
from pyfusion.dispatch import NoBackendError
from pyfusion.nn import PartialConv2d
from pyfusion.ops import partial_conv2d
from pyfusion.ops.layout import as_segments, segment_plan
from pyfusion.ops.partial_conv2d import DISPATCHER, conv_geom
from pyfusion.ops.partial_conv2d import backends as PC
from pyfusion.ops.reference import partial_conv2d_ref

LAYOUTS = [
    ([3, 2], [4, 3]),  # K = 1
    ([4, 3, 3], [5, 2, 2]),  # K = 2, uniform
    ([0, 3, 3], [2, 4, 4]),  # no shared input
    ([2, 2, 2, 2], [0, 3, 3, 3]),  # K = 3, no shared output
    ([2, 0, 3], [1, 2, 0]),  # empty branch segments, non-uniform
    ([3, 1, 2, 1, 3, 2], [2, 1, 3, 2, 1, 1]),  # K = 5, odd non-uniform sizes
    ([4, 0, 0], [3, 2, 2]),  # branches read only the shared input (first layer): one convolution
    ([0, 2, 2], [0, 3, 3]),  # pure ensemble (block diagonal)
    ([3, 2, 2], [0, 0, 0]),  # no outputs
    (K3_IN, K3_OUT),  # K = 3, subset shared slots
    (K4_IN, K4_OUT),  # K = 4, subsets in any order, a gap
]
CONV = [((3, 3), (1, 1), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 2), (2, 1), (0, 1), (1, 2)),
        ((1, 1), (1, 1), (0, 0), (1, 1))]  # fmt: skip


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def check(fn, x, ins, outs, conv, act="none", integer=False, bias=True):
    kernel = conv[0]
    w, b = make_weight(ins, outs, x.dtype, taps=kernel, integer=integer)
    b = b if bias else None
    plan, geom = plan_of(ins, outs), conv_geom(*conv)
    y = fn(x, w, b, plan, geom, act)
    ref = partial_conv2d_ref(x, w, b, ins, outs, *conv, activation=act)
    same = F.conv2d(x, dense_of(w, ins, outs, kernel), b, *conv[1:]) if plan.o_total else None
    if same is not None and act != "none":
        same = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](same)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_close(y, ref, same, exact=integer)


@pytest.mark.parametrize("ins,outs", LAYOUTS, ids=[f"L{i}" for i in range(len(LAYOUTS))])
@pytest.mark.parametrize("conv", CONV, ids=["3x3", "s2p1", "3x2", "1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_reference(ins, outs, conv, dtype):
    x = torch.randn(2, plan_of(ins, outs).i_total, 7, 6, dtype=dtype)
    check(PC._torch_fn, x, ins, outs, conv)
    check(PC._torch_fn, x, ins, outs, conv, act="relu", bias=False)


@pytest.mark.parametrize("ins,outs", [LAYOUTS[1], LAYOUTS[5], (K3_IN, K3_OUT), (K4_IN, K4_OUT)])
def test_torch_backend_exact_on_integers(ins, outs):
    for dtype in (torch.float32, torch.float64):
        x = torch.randint(-3, 4, (2, plan_of(ins, outs).i_total, 6, 6)).to(dtype)
        check(PC._torch_fn, x, ins, outs, CONV[1], act="relu", integer=True)


def test_channels_last_and_strided_inputs():
    ins, outs = K3_IN, K3_OUT
    c = plan_of(ins, outs).i_total
    for x in (
        torch.randn(2, c, 7, 7).to(memory_format=torch.channels_last),
        torch.randn(2, 2 * c, 7, 7)[:, ::2],
        torch.randn(2, c, 9, 9)[:, :, 1:8, 2:9],
    ):
        check(PC._torch_fn, x, ins, outs, CONV[1])


def test_runs_merge_outputs_that_read_the_same_inputs():
    # a first layer (one input segment): every output segment reads it, so one convolution
    runs, idle = PC.conv_runs(plan_of([4, 0, 0], [3, 2, 2]))
    assert len(runs) == 1 and runs[0].n_out == 7 and not idle
    # the standard layout: shared outputs over every input, branch k over [shared | branch_k]
    runs, _ = PC.conv_runs(plan_of([4, 3, 3], [5, 2, 2]))
    assert [(r.n_out, r.ranges) for r in runs] == [(5, ((0, 10),)), (2, ((0, 7),)), (2, ((0, 4), (7, 3)))]


needs_interp = pytest.mark.skipif(bool(triton_interpreter_reasons()), reason="; ".join(triton_interpreter_reasons()))


@needs_interp
@pytest.mark.parametrize("ins,outs", [LAYOUTS[1], LAYOUTS[4], LAYOUTS[6], (K3_IN, K3_OUT), (K4_IN, K4_OUT)])
def test_triton_interpreter_matches_reference(ins, outs):
    c = plan_of(ins, outs).i_total
    for conv in (CONV[1], CONV[2]):
        x = torch.randn(2, c, 6, 5)
        check(PC._interp_fn, x, ins, outs, conv, act="relu")
        check(PC._interp_fn, x, ins, outs, conv, bias=False)
    x = torch.randint(-3, 4, (2, c, 6, 5)).float()
    check(PC._interp_fn, x, ins, outs, CONV[1], integer=True)
    check(PC._interp_fn, x.to(memory_format=torch.channels_last), ins, outs, CONV[0], integer=True)


@needs_interp
def test_triton_tap_major_weight_is_derived_once_per_version(monkeypatch):
    from pyfusion.ops import _weight_cache

    ins, outs = K3_IN, K3_OUT
    mod = PartialConv2d(ins, outs, 3, padding=1).eval()
    x = torch.randn(1, mod.in_channels, 5, 5)
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_conv2d:triton_interpret")
    built = []
    orig = PC._tap_major
    monkeypatch.setattr(PC, "_tap_major", lambda *a: built.append(1) or orig(*a))
    with torch.no_grad():
        y0 = mod(x)
        mod(x)
        assert len(built) == 1
        mod.weight.mul_(2)
        y1 = mod(x)
    assert len(built) == 2
    torch.testing.assert_close(y1 - mod.bias.view(1, -1, 1, 1), 2 * (y0 - mod.bias.view(1, -1, 1, 1)), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert _weight_cache.entries() >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_gpu_matches_reference(dtype):
    for ins, outs in (LAYOUTS[1], (K3_IN, K3_OUT), ([64, 32, 32], [64, 32, 32])):
        c = plan_of(ins, outs).i_total
        x = torch.randn(4, c, 16, 16, dtype=dtype, device="cuda")
        w, b = make_weight(ins, outs, dtype, taps=(3, 3))
        w, b = w.cuda(), b.cuda()
        plan, geom = plan_of(ins, outs), conv_geom(3, 1, 1)
        assert DISPATCHER.select(x, w, b, plan, geom, "none").name == "triton"
        y = partial_conv2d(x, w, b, ins, outs, 3, 1, 1, activation="relu")
        same = F.relu(F.conv2d(x, dense_of(w, ins, outs, (3, 3)), b, 1, 1))
        assert_close(y, partial_conv2d_ref(x, w, b, ins, outs, 3, 1, 1, activation="relu"), same)


@pytest.mark.parametrize("ins,outs", [([3, 2, 2], [2, 3, 1]), (K3_IN[:4] + [(2, 1)], K3_OUT[:3] + [(2, 2)])])
def test_gradcheck(ins, outs):
    w, b = make_weight(ins, outs, torch.float64, taps=(2, 2), requires_grad=True)
    x = torch.randn(1, plan_of(ins, outs).i_total, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return partial_conv2d(x, w, b, ins, outs, (2, 2), stride=(1, 2), padding=1)

    # fast mode (random projections of the Jacobian): the full numerical Jacobian is one op call per input entry
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


def test_gradients_equal_dense_restricted_to_stored_blocks():
    for ins, outs in ([3, 2, 2], [4, 3, 3]), (K4_IN, K4_OUT):
        w, b = make_weight(ins, outs, torch.float64, taps=(3, 3), requires_grad=True)
        plan = plan_of(ins, outs)
        x = torch.randn(2, plan.i_total, 6, 6, dtype=torch.float64, requires_grad=True)
        y = partial_conv2d(x, w, b, ins, outs, 3, padding=1, activation="gelu")
        g = torch.randn_like(y)
        y.backward(g)
        dense = dense_of(w.detach(), ins, outs, (3, 3)).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        b2 = b.detach().clone().requires_grad_(True)
        F.gelu(F.conv2d(x2, dense, b2, 1, 1)).backward(g)
        torch.testing.assert_close(w.grad, pack_dense(dense.grad, ins, outs, check_zero=False))
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(b.grad, b2.grad)


def test_validation_errors_name_the_argument():
    ins, outs = [3, 2, 2], [4, 3, 3]
    w, b = make_weight(ins, outs, taps=(3, 3))
    x = torch.randn(1, 7, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, I_total = 7, H, W\)"):
        partial_conv2d(torch.randn(1, 8, 5, 5), w, b, ins, outs, 3)
    with pytest.raises(ValueError, match=r"weight must be the packed flat weight of \(522,\) entries"):
        partial_conv2d(x, w[:-1], b, ins, outs, 3)
    with pytest.raises(ValueError, match=r"kernel \(2, 2\)"):
        partial_conv2d(x, w, b, ins, outs, 2)
    with pytest.raises(ValueError, match="must have x's dtype"):
        partial_conv2d(x.double(), w, b.double(), ins, outs, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(O_total,\) = \(10,\)"):
        partial_conv2d(x, w, b[:-1], ins, outs, 3)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1"):
        partial_conv2d(x, w, b, ins, outs, 3, stride=0)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints >= 0"):
        partial_conv2d(x, w, b, ins, outs, 3, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair of ints >= 1"):
        partial_conv2d(x, w, b, ins, outs, 0)


def test_module_runs_the_op_and_honours_forced_backends(monkeypatch):
    ins, outs = K3_IN, K3_OUT
    mod = PartialConv2d(ins, outs, 3, stride=2, padding=1).eval()
    x = torch.randn(2, mod.in_channels, 9, 8)
    with torch.no_grad():
        y = mod(x)
        assert torch.equal(y, partial_conv2d(x, mod.weight, mod.bias, ins, outs, 3, 2, 1))
        monkeypatch.setenv("PYFUSION_BACKEND", "partial_conv2d:reference")
        y_ref = mod(x)
    torch.testing.assert_close(y_ref, partial_conv2d_ref(x, mod.weight, mod.bias, ins, outs, 3, 2, 1).float())
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_conv2d:cpp")
    with pytest.raises(NoBackendError, match=r"backend 'cpp' does not exist for op 'partial_conv2d'"):
        mod(x)
    monkeypatch.delenv("PYFUSION_BACKEND")
    assert DISPATCHER.select(x, mod.weight, mod.bias, mod._plan, mod._geom, "none").name == "torch"
