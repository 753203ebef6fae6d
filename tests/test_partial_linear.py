"""pyfusion.ops.partial_linear: CPU BLAS path, Triton kernel (interpreter), autograd, registration, errors.

Every result is compared with the float64 reference (ops.reference.partial_linear_ref), which builds the
dense matrix with zero blocks. Tolerances are earned: the kernel's error must stay within
max(TOL[dtype], 2 * error of torch's dense F.linear in the same dtype).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyfusion.backends import triton_interpreter_reasons
from pyfusion.dispatch import NoBackendError
from pyfusion.ops import partial_linear
from pyfusion.ops.layout import block_shapes, pack_partial_weight, partial_linear_flops, unpack_partial_weight
from pyfusion.ops.partial_linear import DISPATCHER, OP
from pyfusion.ops.partial_linear.backends import torch_forward as _partial_linear_cpu
from pyfusion.ops.partial_linear.backends import triton_forward as _triton_forward
from pyfusion.ops.reference import partial_linear_ref

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (in_layout, out_layout): K in {1, 2, 3, 5}, empty segments, odd sizes.
LAYOUTS = [
    ([7, 5], [6, 3]),  # K = 1
    ([20, 13, 13], [33, 17, 17]),  # K = 2, uniform branches (baddbmm path)
    ([0, 8, 8], [5, 6, 6]),  # no shared input (alpha = 1 for the inputs)
    ([6, 5, 5, 5], [0, 7, 7, 7]),  # K = 3, no shared output
    ([3, 0, 4], [2, 3, 0]),  # empty branch segments, non-uniform
    ([11, 3, 1, 4, 2, 5], [9, 2, 5, 1, 3, 4]),  # K = 5, odd non-uniform sizes
    ([5, 0, 0], [4, 3, 3]),  # branches read only the shared input
    ([0, 4, 4], [0, 3, 3]),  # alpha = 1: pure ensemble (block diagonal)
    ([9, 4, 4], [0, 0, 0]),  # no outputs at all
]
ACTS = ["none", "relu", "gelu", "silu"]


def make_blocks(il, ol, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(*s, generator=g, dtype=torch.float64) for s in block_shapes(il, ol)]
    bias = torch.randn(sum(ol), generator=g, dtype=torch.float64)
    out = [b.to(dtype).requires_grad_(requires_grad) for b in blocks]
    return out, bias.to(dtype).requires_grad_(requires_grad)


def assert_close_to_ref(y, x, blocks, bias, il, ol, act):
    ref = partial_linear_ref(x, blocks, bias, il, ol, act)
    assert y.shape == ref.shape and y.dtype == x.dtype
    dense = unpack_partial_weight(*blocks, il, ol)
    z_same = F.linear(x, dense, bias)  # torch in the same dtype
    same = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z_same)
    if y.numel() == 0:
        return
    scale = ref.abs().max().item() + 1.0
    err = (y.double() - ref).abs().max().item() / scale
    err_torch = (same.double() - ref).abs().max().item() / scale
    assert err <= max(TOL[x.dtype], 2 * err_torch), (err, err_torch)


@pytest.mark.parametrize("il,ol", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 13])  # 1: GEMV loop over branches; 13: one baddbmm
def test_cpu_matches_reference(il, ol, dtype, rows):
    blocks, bias = make_blocks(il, ol, dtype)
    x = torch.randn(rows, sum(il), dtype=dtype)
    for act in ACTS:
        assert_close_to_ref(partial_linear(x, blocks, bias, il, ol, act), x, blocks, bias, il, ol, act)
    assert_close_to_ref(partial_linear(x, blocks, None, il, ol), x, blocks, None, il, ol, "none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision(dtype):
    il, ol = [20, 13, 13], [33, 17, 17]
    blocks, bias = make_blocks(il, ol, dtype)
    x = torch.randn(9, sum(il), dtype=dtype)
    assert_close_to_ref(partial_linear(x, blocks, bias, il, ol, "gelu"), x, blocks, bias, il, ol, "gelu")


def test_cpu_noncontiguous_and_3d_inputs():
    il, ol = [6, 5, 5, 5], [4, 7, 7, 7]
    blocks, bias = make_blocks(il, ol)
    i = sum(il)
    cases = {
        "transposed": torch.randn(i, 10).t(),
        "column slice": torch.randn(10, 2 * i)[:, ::2],
        "row slice": torch.randn(30, i)[::3],
        "3-D (B, T, C)": torch.randn(2, 5, i),
        "3-D permuted": torch.randn(5, 2, i).transpose(0, 1),
        "3-D channel-strided": torch.randn(2, i, 5).transpose(1, 2),
    }
    for name, x in cases.items():
        y = partial_linear(x, blocks, bias, il, ol, "silu")
        assert y.shape == (*x.shape[:-1], sum(ol)), name
        assert_close_to_ref(y, x, blocks, bias, il, ol, "silu")
        assert_close_to_ref(partial_linear(x, blocks, bias, il, ol), x, blocks, bias, il, ol, "none")


def test_empty_batch():
    il, ol = [3, 2, 2], [4, 1, 1]
    blocks, bias = make_blocks(il, ol)
    y = partial_linear(torch.randn(0, 7), blocks, bias, il, ol, "relu")
    assert y.shape == (0, 6)


def test_cpu_reads_input_in_place():
    # The CPU path must not copy the whole input: the three BLAS calls read x through views. Count aten
    # copies while running on a 2-D strided input.
    il, ol = [8, 4, 4], [6, 5, 5]
    blocks, bias = make_blocks(il, ol)
    x = torch.randn(32, 16)
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        _partial_linear_cpu(x, *blocks, bias, il, ol, "none")  # the kernel registered for CPU
    assert not any("copy" in f or "clone" in f or "contiguous" in f or "cat" in f for f in seen), seen
    assert sum("mm" in f for f in seen) == 3, seen


# ---------------------------------------------------------------- Triton kernel in the interpreter


needs_interp = pytest.mark.skipif(bool(triton_interpreter_reasons()), reason="; ".join(triton_interpreter_reasons()))


@needs_interp
@pytest.mark.parametrize(
    "il,ol", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[3], LAYOUTS[4], LAYOUTS[5], ([40, 0, 0], [0, 35, 35])]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter_matches_reference(il, ol, dtype):
    from pyfusion.triton_kernels import partial_linear as kmod

    assert len(kmod.autotune_configs()) == 1  # tests run a single config in the interpreter
    blocks, bias = make_blocks(il, ol, dtype)
    x = torch.randn(37, sum(il), dtype=dtype)
    for act in ["none", "gelu"] if dtype == torch.float16 else ACTS:
        y = _triton_forward(x, *blocks, bias, il, ol, act)
        assert_close_to_ref(y, x, blocks, bias, il, ol, act)
    y = _triton_forward(x, *blocks, None, il, ol, "relu")
    assert_close_to_ref(y, x, blocks, None, il, ol, "relu")


@needs_interp
def test_triton_interpreter_strided_3d_input():
    il, ol = [6, 5, 5, 5], [4, 7, 7, 7]
    blocks, bias = make_blocks(il, ol)
    x = torch.randn(2, sum(il), 9).transpose(1, 2)  # (B, T, C), C stride 9
    y = _triton_forward(x[:, :, :], *blocks, bias, il, ol, "silu")
    assert_close_to_ref(y, x, blocks, bias, il, ol, "silu")
    xt = torch.randn(sum(il), 33).t()  # column-major 2-D
    assert_close_to_ref(_triton_forward(xt, *blocks, bias, il, ol, "none"), xt, blocks, bias, il, ol, "none")


@needs_interp
def test_dispatcher_forcing_the_interpreter(monkeypatch):
    il, ol = [4, 3, 3], [5, 2, 2]
    blocks, bias = make_blocks(il, ol)
    x = torch.randn(5, 10)
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:triton_interpret")
    assert DISPATCHER.select(x, *blocks, bias, il, ol, "none").name == "triton_interpret"
    assert_close_to_ref(partial_linear(x, blocks, bias, il, ol), x, blocks, bias, il, ol, "none")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("il,ol", [LAYOUTS[1], LAYOUTS[5], ([384, 192, 192], [1024, 512, 512])])
def test_triton_gpu_matches_reference(il, ol, dtype):
    blocks, bias = make_blocks(il, ol, dtype)
    blocks, bias = [b.cuda() for b in blocks], bias.cuda()
    x = torch.randn(300, sum(il), dtype=dtype, device="cuda")
    assert DISPATCHER.select(x, *blocks, bias, il, ol, "none").name == "triton"
    for act in ACTS:
        assert_close_to_ref(partial_linear(x, blocks, bias, il, ol, act), x, blocks, bias, il, ol, act)


# ---------------------------------------------------------------- dispatcher


def test_dispatcher_explains_and_forces(monkeypatch):
    il, ol = [4, 3, 3], [5, 2, 2]
    blocks, bias = make_blocks(il, ol)
    x = torch.randn(40, 10)  # more rows than the compiled small-batch kernel takes (CPP_MAX_ROWS)
    text = DISPATCHER.explain(x, *blocks, bias, il, ol, "none")
    assert "triton" in text and "torch      ok" in text
    if not torch.cuda.is_available():
        assert DISPATCHER.select(x, *blocks, bias, il, ol, "none").name == "torch"
        monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:triton")
        with pytest.raises(NoBackendError, match="triton"):
            partial_linear(x, blocks, bias, il, ol)
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:reference")
    assert_close_to_ref(partial_linear(x, blocks, bias, il, ol, "gelu"), x, blocks, bias, il, ol, "gelu")


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("il,ol", [([3, 2, 2], [2, 3, 1]), ([0, 2, 3, 1], [2, 1, 0, 2])])
def test_gradcheck(il, ol, act):
    blocks, bias = make_blocks(il, ol, torch.float64, requires_grad=True)
    x = torch.randn(4, sum(il), dtype=torch.float64, requires_grad=True)
    if act == "relu":  # keep pre-activations away from the kink at 0
        with torch.no_grad():
            z = partial_linear_ref(x, blocks, bias, il, ol)
            bias += torch.where(z.abs().min(0).values < 1e-3, 0.1, 0.0)

    def f(x, a, b, c, bias):
        return partial_linear(x, [a, b, c], bias, il, ol, act)

    assert torch.autograd.gradcheck(f, (x, *blocks, bias))


def test_gradients_equal_dense_restricted_to_stored_blocks():
    # dL/dW of the dense zero-block layer, restricted to the allowed blocks, is what the op returns; the
    # skipped blocks get no gradient at all (they are not inputs).
    il, ol = [5, 3, 4], [6, 2, 5]
    blocks, bias = make_blocks(il, ol, torch.float64, requires_grad=True)
    x = torch.randn(2, 3, sum(il), dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, sum(ol), dtype=torch.float64)
    partial_linear(x, blocks, bias, il, ol, "silu").backward(g)
    dense = unpack_partial_weight(*[b.detach() for b in blocks], il, ol).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    F.silu(F.linear(x2, dense, b2)).backward(g)
    for got, want in zip(blocks, pack_partial_weight(dense.grad, il, ol, check_zero=False)):
        torch.testing.assert_close(got.grad, want)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)


def test_opcheck():
    for il, ol in [([3, 2, 2], [4, 3, 3]), ([0, 2, 3], [2, 1, 0])]:
        for act in ("none", "gelu"):
            for rg in (False, True):
                blocks, bias = make_blocks(il, ol, requires_grad=rg)
                x = torch.randn(3, 4, sum(il), requires_grad=rg)
                torch.library.opcheck(OP.op(), (x, *blocks, bias, il, ol, act))
    blocks, _ = make_blocks([3, 2, 2], [4, 3, 3])
    torch.library.opcheck(OP.op(), (torch.randn(5, 7), *blocks, None, [3, 2, 2], [4, 3, 3], "relu"))


# ---------------------------------------------------------------- validation


def test_validation_errors_name_the_argument():
    il, ol = [3, 2, 2], [4, 3, 3]
    blocks, bias = make_blocks(il, ol)
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal sum\(in_layout\) = 7"):
        partial_linear(torch.randn(5, 8), blocks, bias, il, ol)
    with pytest.raises(ValueError, match=r"w_cross \(weight_blocks\[1\]\) must have shape \(6, 3\)"):
        partial_linear(x, [blocks[0], blocks[1][:, :2], blocks[2]], bias, il, ol)
    with pytest.raises(ValueError, match=r"w_diag .* must have shape \(12,\)"):
        partial_linear(x, [blocks[0], blocks[1], blocks[2][:-1]], bias, il, ol)
    with pytest.raises(ValueError, match="activation must be one of"):
        partial_linear(x, blocks, bias, il, ol, "tanh")
    with pytest.raises(ValueError, match="must have x's dtype"):
        partial_linear(x.double(), blocks, bias.double(), il, ol)
    with pytest.raises(ValueError, match="x must be float32"):
        partial_linear(x.long(), blocks, bias, il, ol)
    with pytest.raises(ValueError, match=r"bias must have shape \(sum\(out_layout\),\) = \(10,\)"):
        partial_linear(x, blocks, bias[:-1], il, ol)
    with pytest.raises(ValueError, match="same number of branches"):
        partial_linear(x, blocks, bias, [3, 2, 1, 1], ol)
    with pytest.raises(ValueError, match="K >= 1"):
        partial_linear(x, blocks, bias, [7], [10])
    with pytest.raises(ValueError, match=">= 0"):
        partial_linear(x, blocks, bias, [3, 5, -1], ol)
    with pytest.raises(ValueError, match="3 tensors"):
        partial_linear(x, blocks[:2], bias, il, ol)


def test_pack_rejects_nonzero_skipped_block_and_roundtrips():
    il, ol = [2, 3, 2], [1, 2, 4]
    blocks, _ = make_blocks(il, ol, torch.float64)
    dense = unpack_partial_weight(*blocks, il, ol)
    assert dense[1:3, 5:7].abs().sum() == 0 and dense[3:7, 2:5].abs().sum() == 0
    for got, want in zip(pack_partial_weight(dense, il, ol), blocks):
        assert torch.equal(got, want)
    bad = dense.clone()
    bad[4, 3] = 1e-30  # branch 2 output reads branch 1 input
    with pytest.raises(ValueError, match=r"output branch 2, input branch 1\) = weight\[3:7, 2:5\]"):
        pack_partial_weight(bad, il, ol)


def test_flops_formula():
    il, ol = [4, 2, 2], [3, 5, 5]
    # shared rows read 8 inputs, branch rows read 4 + 2
    assert partial_linear_flops(il, ol, rows=10) == 2 * 10 * (3 * 8 + 10 * 4 + 5 * 2 + 5 * 2)
