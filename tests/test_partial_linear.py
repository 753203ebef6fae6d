"""pyfusion.ops.partial_linear on member-mask segments: every CPU backend (panel engine, torch's BLAS, the
Triton kernel in the interpreter), autograd, registration, errors, the packed format.

Every result is compared with the float64 reference (ops.reference.partial_linear_ref, the dense matrix with
zero blocks), on random operands (error within max(TOL, 2 x torch's dense F.linear error in the same dtype)) and
on small integers (exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _segments import ACT_FNS, ACTS, K3_IN, K3_OUT, K4_IN, K4_OUT, LAYOUTS, assert_close, dense_of, make_weight
from _segments import pack as pack_dense

from pyfusion.backends import triton_interpreter_reasons
from pyfusion.dispatch import NoBackendError
from pyfusion.ops import partial_linear
from pyfusion.ops.layout import as_segments, segment_plan
from pyfusion.ops.partial_linear import DISPATCHER, OP, partial_linear_flops
from pyfusion.ops.partial_linear import backends as PL
from pyfusion.ops.reference import partial_linear_ref

CPP_OK = not PL._cpp_available()
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="; ".join(PL._cpp_available()) or "-")
needs_interp = pytest.mark.skipif(bool(triton_interpreter_reasons()), reason="; ".join(triton_interpreter_reasons()))


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def check(fn, x, ins, outs, act, dtype=None, integer=False, bias=True, seed=0):
    w, b = make_weight(ins, outs, x.dtype, integer=integer, seed=seed)
    b = b if bias else None
    y = fn(x, w, b, plan_of(ins, outs), act)
    ref = partial_linear_ref(x, w, b, ins, outs, act)
    same = ACT_FNS[act](F.linear(x, dense_of(w, ins, outs), b))
    assert y.dtype == x.dtype
    assert_close(y, ref, same, dtype, exact=integer)


BACKENDS = {"torch": PL.torch_forward, "reference": PL._reference_fn}
if CPP_OK:
    BACKENDS["cpp"] = PL.cpp_forward


@pytest.mark.parametrize("ins,outs", LAYOUTS, ids=[f"L{i}" for i in range(len(LAYOUTS))])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_match_reference(ins, outs, backend, dtype):
    fn = BACKENDS[backend]
    i_total = plan_of(ins, outs).i_total
    for rows in (1, 3, 13, 70):  # GEMV loop, small, batched and multi-tile paths
        x = torch.randn(rows, i_total, dtype=dtype)
        for act in ACTS:
            check(fn, x, ins, outs, act)
        check(fn, x, ins, outs, "none", bias=False)


@pytest.mark.parametrize("ins,outs", [LAYOUTS[1], LAYOUTS[5], (K3_IN, K3_OUT), (K4_IN, K4_OUT)])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backends_exact_on_integers(ins, outs, backend):
    i_total = plan_of(ins, outs).i_total
    for dtype in (torch.float32, torch.float64):
        for rows in (1, 9, 40):
            x = torch.randint(-4, 5, (rows, i_total)).to(dtype)
            for act in ("none", "relu"):
                check(BACKENDS[backend], x, ins, outs, act, integer=True)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_noncontiguous_and_nd_inputs(backend):
    fn = BACKENDS[backend]
    for ins, outs in ([6, 5, 5, 5], [4, 7, 7, 7]), (K3_IN, K3_OUT):
        i = plan_of(ins, outs).i_total
        cases = {
            "transposed": torch.randn(i, 10).t(),
            "column slice": torch.randn(10, 2 * i)[:, ::2],
            "row slice": torch.randn(30, i)[::3],
            "3-D (B, T, C)": torch.randn(2, 5, i),
            "3-D permuted": torch.randn(5, 2, i).transpose(0, 1),
            "3-D channel-strided": torch.randn(2, i, 5).transpose(1, 2),
        }
        for name, x in cases.items():
            w, b = make_weight(ins, outs)
            y = fn(x, w, b, plan_of(ins, outs), "silu")
            assert y.shape == (*x.shape[:-1], plan_of(ins, outs).o_total), name
            assert_close(y, partial_linear_ref(x, w, b, ins, outs, "silu"), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_blas(dtype):
    ins, outs = K3_IN, K3_OUT
    w, b = make_weight(ins, outs, dtype)
    x = torch.randn(9, plan_of(ins, outs).i_total, dtype=dtype)
    assert DISPATCHER.select(x, w, b, plan_of(ins, outs), "gelu").name == "torch"
    y = partial_linear(x, w, b, ins, outs, "gelu")
    same = F.gelu(F.linear(x, dense_of(w, ins, outs), b))
    assert_close(y, partial_linear_ref(x, w, b, ins, outs, "gelu"), same)


def test_empty_batch():
    for backend in BACKENDS.values():
        w, b = make_weight(K3_IN, K3_OUT)
        plan = plan_of(K3_IN, K3_OUT)
        assert backend(torch.randn(0, plan.i_total), w, b, plan, "relu").shape == (0, plan.o_total)


def test_blas_path_reads_input_in_place_and_merges_gemms():
    # The standard layout is 3 BLAS calls (shared rows; all branch rows on the shared input; the diagonal blocks
    # as one batched GEMM), reading x through views (no copy of the input).
    ins, outs = [8, 4, 4], [6, 5, 5]
    w, b = make_weight(ins, outs)
    x = torch.randn(32, 16)
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        PL.torch_forward(x, w, b, plan_of(ins, outs), "none")
    assert not any("copy" in f or "clone" in f or "contiguous" in f or "cat" in f for f in seen), seen
    assert sum("mm" in f for f in seen) == 3, seen
    steps, idle = PL.blas_steps(plan_of(ins, outs))
    assert [type(s).__name__ for s in steps] == ["GemmStep", "GemmStep", "BatchedStep"] and not idle


def test_blas_steps_cover_every_stored_block_once():
    for ins, outs in LAYOUTS:
        plan = plan_of(ins, outs)
        cover = torch.zeros(plan.o_total, plan.i_total, dtype=torch.int64)
        steps, idle = PL.blas_steps(plan)
        for st in steps:
            count = getattr(st, "count", 1)
            for b in range(count):
                cover[
                    st.o0 + b * st.n_out : st.o0 + (b + 1) * st.n_out, st.col + b * st.n_in : st.col + (b + 1) * st.n_in
                ] += 1  # noqa: E501
        assert torch.equal(cover.bool(), plan.dense_block_mask()) and (cover.numel() == 0 or int(cover.max()) <= 1)
        for o in idle:
            assert plan.k_of_out[o] == 0


# ---------------------------------------------------------------- the packed format


def test_masks_decide_the_stored_blocks():
    plan = plan_of(K3_IN, K3_OUT)
    mask = plan.dense_block_mask()
    ins, outs = K3_IN, K3_OUT
    r = 0
    for n_o, m_o in outs:
        c = 0
        for n_i, m_i in ins:
            assert bool(mask[r : r + n_o, c : c + n_i].all()) == bool(m_o & m_i)
            assert bool(mask[r : r + n_o, c : c + n_i].any()) == bool(m_o & m_i)
            c += n_i
        r += n_o
    # (shared {0,1} out) x (branch 2 in) and (branch 2 out) x (shared {0,1} in) are not stored
    assert not mask[4:6, 20:24].any() and not mask[16:19, 5:8].any()
    assert plan.stored == int(mask.sum())
    assert partial_linear_flops(ins, outs, rows=10) == 2 * 10 * int(mask.sum())


def test_standard_layout_is_the_special_case_of_masks():
    il, ol = [4, 2, 2], [3, 5, 5]
    segs_in = as_segments(il, "in")
    assert segs_in == ((4, 0b11), (2, 0b01), (2, 0b10))
    plan = plan_of(il, ol)
    assert plan.standard == ((4, 2, 2), (3, 5, 5))
    # shared rows read 8 inputs, branch rows read 4 + 2
    assert plan.stored == 3 * 8 + 10 * 4 + 5 * 2 + 5 * 2
    assert plan_of([(4, 3), (2, 1), (2, 2)], [(3, 3), (5, 1), (5, 2)]) is plan  # same segments, same cached plan


def test_pack_rejects_nonzero_skipped_block_and_roundtrips():
    for ins, outs in ([2, 3, 2], [1, 2, 4]), (K3_IN, K3_OUT), (K4_IN, K4_OUT):
        w, _ = make_weight(ins, outs, torch.float64)
        dense = dense_of(w, ins, outs)
        assert torch.equal(pack_dense(dense, ins, outs), w)
        plan = plan_of(ins, outs)
        holes = (~plan.dense_block_mask()).nonzero()
        r, c = (int(v) for v in holes[len(holes) // 2])
        bad = dense.clone()
        bad[r, c] = 1e-30
        with pytest.raises(ValueError, match=r"must be exactly zero: the member masks .* do not intersect"):
            pack_dense(bad, ins, outs)
        assert torch.equal(pack_dense(bad, ins, outs, check_zero=False), w)  # the skipped entry is not stored


def test_segment_validation_names_the_argument():
    with pytest.raises(ValueError, match=r"in_segments\[1\]: member_mask is 0 for a segment of 2 slots"):
        as_segments([(3, 1), (2, 0)], "in_segments")
    with pytest.raises(ValueError, match=r"out_segments\[0\]: size must be >= 0"):
        as_segments([(-1, 1)], "out_segments")
    with pytest.raises(ValueError, match=r"member_mask must be in \[0, 2\^63\)"):
        as_segments([(1, 1 << 63)], "x")
    with pytest.raises(ValueError, match="K >= 1"):
        as_segments([7], "in_segments")
    with pytest.raises(ValueError, match=r"\(size, member_mask\) pair"):
        as_segments([(1, 2, 3)], "in_segments")
    assert as_segments([(0, 0), (2, 1)], "ok") == ((0, 0), (2, 1))  # an empty segment may have no member


# ---------------------------------------------------------------- Triton kernel in the interpreter


@needs_interp
@pytest.mark.parametrize("ins,outs", [LAYOUTS[1], LAYOUTS[3], LAYOUTS[4], LAYOUTS[5], (K3_IN, K3_OUT), (K4_IN, K4_OUT)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter_matches_reference(ins, outs, dtype):
    from pyfusion.triton_kernels import partial_linear as kmod

    assert len(kmod.autotune_configs()) == 1  # tests run a single config in the interpreter
    x = torch.randn(37, plan_of(ins, outs).i_total, dtype=dtype)
    for act in ["none", "gelu"] if dtype == torch.float16 else ACTS:
        check(PL._interp_fn, x, ins, outs, act)
    check(PL._interp_fn, x, ins, outs, "relu", bias=False)
    if dtype == torch.float32:
        check(PL._interp_fn, torch.randint(-3, 4, x.shape).float(), ins, outs, "relu", integer=True)


@needs_interp
def test_triton_interpreter_strided_inputs_and_cached_table():
    ins, outs = K3_IN, K3_OUT
    plan = plan_of(ins, outs)
    w, b = make_weight(ins, outs)
    x = torch.randn(2, plan.i_total, 9).transpose(1, 2)  # (B, T, C), C stride 9
    assert_close(PL._interp_fn(x, w, b, plan, "silu"), partial_linear_ref(x, w, b, ins, outs, "silu"))
    xt = torch.randn(plan.i_total, 33).t()  # column-major 2-D
    assert_close(PL._interp_fn(xt, w, b, plan, "none"), partial_linear_ref(xt, w, b, ins, outs, "none"))
    assert PL._triton_meta(plan, xt.device) is PL._triton_meta(plan, xt.device)  # one table per layout


@needs_interp
def test_dispatcher_forcing_the_interpreter(monkeypatch):
    w, b = make_weight(K4_IN, K4_OUT)
    x = torch.randn(5, plan_of(K4_IN, K4_OUT).i_total)
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:triton_interpret")
    assert DISPATCHER.select(x, w, b, plan_of(K4_IN, K4_OUT), "none").name == "triton_interpret"
    assert_close(partial_linear(x, w, b, K4_IN, K4_OUT), partial_linear_ref(x, w, b, K4_IN, K4_OUT))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ins,outs", [LAYOUTS[1], LAYOUTS[5], (K3_IN, K3_OUT), ([384, 192, 192], [1024, 512, 512])])
def test_triton_gpu_matches_reference(ins, outs, dtype):
    w, b = make_weight(ins, outs, dtype)
    w, b = w.cuda(), b.cuda()
    x = torch.randn(300, plan_of(ins, outs).i_total, dtype=dtype, device="cuda")
    assert DISPATCHER.select(x, w, b, plan_of(ins, outs), "none").name == "triton"
    for act in ACTS:
        y = partial_linear(x, w, b, ins, outs, act)
        same = ACT_FNS[act](F.linear(x, dense_of(w, ins, outs), b))
        assert_close(y, partial_linear_ref(x, w, b, ins, outs, act), same)
    xi = torch.randint(-3, 4, (64, plan_of(ins, outs).i_total), device="cuda").to(dtype)
    wi, bi = make_weight(ins, outs, dtype, integer=True)
    assert_close(partial_linear(xi, wi.cuda(), bi.cuda(), ins, outs, "relu"),
                 partial_linear_ref(xi, wi, bi, ins, outs, "relu").cuda(), exact=True)  # fmt: skip


# ---------------------------------------------------------------- dispatcher


def test_dispatcher_explains_and_forces(monkeypatch):
    ins, outs = [4, 3, 3], [5, 2, 2]
    w, b = make_weight(ins, outs)
    plan = plan_of(ins, outs)
    x = torch.randn(PL.cpp_max_rows(plan) + 1, 10)  # more rows than the panel engine's crossover
    text = DISPATCHER.explain(x, w, b, plan, "none")
    assert "triton" in text and "torch      ok" in text and "measured crossover" in text
    if not torch.cuda.is_available():
        assert DISPATCHER.select(x, w, b, plan, "none").name == "torch"
        monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:triton")
        with pytest.raises(NoBackendError, match="triton"):
            partial_linear(x, w, b, ins, outs)
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:reference")
    assert_close(partial_linear(x, w, b, ins, outs, "gelu"), partial_linear_ref(x, w, b, ins, outs, "gelu"))


# ---------------------------------------------------------------- autograd


GRAD_CASES = [
    ([3, 2, 2], [2, 3, 1]),
    ([0, 2, 3, 1], [2, 1, 0, 2]),
    ([(2, 7), (1, 3), (2, 5), (1, 1), (2, 4)], [(1, 6), (2, 3), (1, 1), (2, 2)]),
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("ins,outs", GRAD_CASES)
def test_gradcheck(ins, outs, act):
    w, b = make_weight(ins, outs, torch.float64, requires_grad=True)
    x = torch.randn(4, plan_of(ins, outs).i_total, dtype=torch.float64, requires_grad=True)
    if act == "relu":  # keep pre-activations away from the kink at 0
        with torch.no_grad():
            z = partial_linear_ref(x, w, b, ins, outs)
            b += torch.where(z.abs().min(0).values < 1e-3, 0.1, 0.0)

    def f(x, w, b):
        return partial_linear(x, w, b, ins, outs, act)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradients_equal_dense_restricted_to_stored_blocks():
    # dL/dW of the dense zero-block layer, restricted to the allowed blocks, is what the op returns; the
    # skipped blocks get no gradient at all (they are not stored).
    for ins, outs in ([5, 3, 4], [6, 2, 5]), (K3_IN, K3_OUT):
        w, b = make_weight(ins, outs, torch.float64, requires_grad=True)
        plan = plan_of(ins, outs)
        x = torch.randn(2, 3, plan.i_total, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, plan.o_total, dtype=torch.float64)
        partial_linear(x, w, b, ins, outs, "silu").backward(g)
        dense = dense_of(w.detach(), ins, outs).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        b2 = b.detach().clone().requires_grad_(True)
        F.silu(F.linear(x2, dense, b2)).backward(g)
        torch.testing.assert_close(w.grad, pack_dense(dense.grad, ins, outs, check_zero=False))
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(b.grad, b2.grad)


def test_opcheck():
    # (opcheck compiles through AOT autograd: ~3 s a call here; three cases cover forward-only, autograd, GELU)
    for (ins, outs), act, rg in (
        (([0, 2, 3], [2, 1, 0]), "none", False),
        (([3, 2, 2], [4, 3, 3]), "gelu", True),
        ((K3_IN, K3_OUT), "relu", True),
    ):
        plan = plan_of(ins, outs)
        (i_s, i_m), (o_s, o_m) = zip(*plan.in_segments), zip(*plan.out_segments)
        w, b = make_weight(ins, outs, requires_grad=rg)
        x = torch.randn(3, 4, plan.i_total, requires_grad=rg)
        torch.library.opcheck(OP.op(), (x, w, b, list(i_s), list(i_m), list(o_s), list(o_m), act))


# ---------------------------------------------------------------- validation


def test_validation_errors_name_the_argument():
    ins, outs = [3, 2, 2], [4, 3, 3]
    w, b = make_weight(ins, outs)
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal the input segments' total 7"):
        partial_linear(torch.randn(5, 8), w, b, ins, outs)
    with pytest.raises(ValueError, match=r"weight must be the packed flat weight of \(58,\) stored entries"):
        partial_linear(x, w[:-1], b, ins, outs)
    with pytest.raises(ValueError, match=r"weight must be the packed flat weight"):
        partial_linear(x, w.view(2, 29), b, ins, outs)
    with pytest.raises(ValueError, match="activation must be one of"):
        partial_linear(x, w, b, ins, outs, "tanh")
    with pytest.raises(ValueError, match="must have x's dtype"):
        partial_linear(x.double(), w, b.double(), ins, outs)
    with pytest.raises(ValueError, match="x must be float32"):
        partial_linear(x.long(), w, b, ins, outs)
    with pytest.raises(ValueError, match=r"bias must have shape \(O_total,\) = \(10,\)"):
        partial_linear(x, w, b[:-1], ins, outs)
    with pytest.raises(ValueError, match="K >= 1"):
        partial_linear(x, w, b, [7], [10])
    with pytest.raises(ValueError, match=">= 0"):
        partial_linear(x, w, b, [3, 5, -1], outs)
