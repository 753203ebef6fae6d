"""The compiled small-batch partial_linear kernel (csrc/partial_linear/, backend "cpp") and its dispatch.

Results are compared with the float64 reference (ops.reference.partial_linear_ref, the dense matrix with
zero blocks); the float32 tolerance is max(2e-5, 2 * the error of torch's dense F.linear in float32).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfusion import _ext
from pyfusion.dispatch import NoBackendError
from pyfusion.nn import PartialLinear
from pyfusion.ops import partial_linear
from pyfusion.ops.layout import block_shapes, unpack_partial_weight
from pyfusion.ops.reference import partial_linear_ref

PL = importlib.import_module("pyfusion.ops.partial_linear.backends")  # the backends (and their dispatcher)
DISPATCHER, CPP_MAX_ROWS = PL.DISPATCHER, PL.CPP_MAX_ROWS

pytestmark = pytest.mark.skipif(
    bool(PL._cpp_available()), reason="; ".join(PL._cpp_available()) or "compiled extension available"
)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
ACTS = ["none", "relu", "gelu", "silu"]
# K in {1, 2, 3, 5}, empty segments, odd sizes (tails of the 16-wide vector loop), a vector-sized layer.
LAYOUTS = [
    ([7, 5], [6, 3]),  # K = 1
    ([37, 70, 70], [33, 17, 17]),  # K = 2, uniform, vector loop + tail
    ([0, 19, 19], [5, 6, 6]),  # no shared input
    ([6, 5, 5, 5], [0, 7, 7, 7]),  # K = 3, no shared output
    ([3, 0, 4], [2, 3, 0]),  # empty branch segments
    ([11, 3, 1, 4, 2, 5], [9, 2, 5, 1, 3, 4]),  # K = 5, odd non-uniform sizes
    ([129, 0, 0], [4, 3, 3]),  # first layer: branches read only the shared input
    ([0, 4, 4], [0, 3, 3]),  # pure ensemble (block diagonal)
    ([9, 4, 4], [0, 0, 0]),  # no outputs
    ([0, 0], [3, 2]),  # no inputs: y = act(bias)
]


def make_blocks(il, ol, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in block_shapes(il, ol)]
    return blocks, torch.randn(sum(ol), generator=g, dtype=torch.float64).to(dtype)


def assert_close_to_ref(y, x, blocks, bias, il, ol, act):
    ref = partial_linear_ref(x, blocks, bias, il, ol, act)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if y.numel() == 0:
        return
    dense = unpack_partial_weight(*blocks, il, ol)
    same = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](F.linear(x, dense, bias))
    scale = ref.abs().max().item() + 1.0
    err = (y.double() - ref).abs().max().item() / scale
    err_torch = (same.double() - ref).abs().max().item() / scale
    assert err <= max(TOL[x.dtype], 2 * err_torch), (err, err_torch)


@pytest.mark.parametrize("il,ol", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference(il, ol, dtype):
    blocks, bias = make_blocks(il, ol, dtype)
    for rows in range(1, CPP_MAX_ROWS + 1):
        x = torch.randn(rows, sum(il), dtype=dtype)
        for act in ACTS:
            assert_close_to_ref(PL.cpp_forward(x, *blocks, bias, il, ol, act), x, blocks, bias, il, ol, act)
    x = torch.randn(3, sum(il), dtype=dtype)
    assert_close_to_ref(PL.cpp_forward(x, *blocks, None, il, ol, "gelu"), x, blocks, None, il, ol, "gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_strided_and_nd_inputs(dtype):
    il, ol = [21, 18, 18], [10, 9, 9]
    blocks, bias = make_blocks(il, ol, dtype)
    base = torch.randn(5, 2 * sum(il) + 3, dtype=dtype)
    inputs = {
        "row stride > I_total": base[:, 3 : 3 + sum(il)],
        "column stride 2": base[:, 3::2][:, : sum(il)],
        "transposed": torch.randn(sum(il), 4, dtype=dtype).t(),
        "3-D": torch.randn(2, 3, sum(il), dtype=dtype),
        "3-D sliced": torch.randn(2, 4, sum(il), dtype=dtype)[:, 1:3],
        "stride-0 rows": torch.randn(1, sum(il), dtype=dtype).expand(6, sum(il)),
        "1-D": torch.randn(sum(il), dtype=dtype),
    }
    for name, x in inputs.items():
        before = x.clone()
        y = PL.cpp_forward(x, *blocks, bias, il, ol, "silu")
        assert torch.equal(x, before), name
        assert_close_to_ref(y, x, blocks, bias, il, ol, "silu")
        assert y.is_contiguous(), name


def test_cpp_noncontiguous_weights():
    il, ol = [6, 5, 5], [7, 4, 4]
    blocks, bias = make_blocks(il, ol, torch.float32)
    ws = torch.randn(sum(il), ol[0]).t()  # (O_s, I_total) transposed view
    wd = torch.randn(2 * blocks[2].numel())[::2]
    b = torch.randn(2 * sum(ol))[::2]
    x = torch.randn(2, sum(il))
    blk = [ws, blocks[1], wd]
    assert_close_to_ref(PL.cpp_forward(x, *blk, b, il, ol, "relu"), x, blk, b, il, ol, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_openmp_region_matches_reference(dtype):
    # parallel_min_macs = 0 on a private plan: the output rows are split between 2 threads (16-row shares).
    il, ol = [40, 23, 23], [50, 31, 31]
    blocks, bias = make_blocks(il, ol, dtype)
    plan = _ext._C.PartialLinearPlan(il, ol, 2)
    assert plan.parallel_min_macs == _ext._C.PARTIAL_LINEAR_PARALLEL_MIN_MACS
    plan.parallel_min_macs = 0
    run = plan.forward_f32 if dtype == torch.float32 else plan.forward_f64
    for rows in (1, 6):
        x = torch.randn(rows, sum(il) + 5, dtype=dtype)[:, 5:]
        y = torch.full((rows, sum(ol)), float("nan"), dtype=dtype)
        ptrs = [b.data_ptr() for b in blocks]
        run(x.data_ptr(), rows, x.stride(0), *ptrs, bias.data_ptr(), y.data_ptr(), 2)
        assert_close_to_ref(y, x, blocks, bias, il, ol, "gelu")


def test_plan_validates_arguments():
    with pytest.raises(ValueError, match="activation"):
        _ext._C.PartialLinearPlan([2, 1], [1, 1], 7)
    with pytest.raises(ValueError, match="same"):
        _ext._C.PartialLinearPlan([2, 1, 1], [1, 1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        _ext._C.PartialLinearPlan([2, -1], [1, 1], 0)
    plan = _ext._C.PartialLinearPlan([3, 2, 2], [4, 1, 1], 0)
    assert (plan.i_total, plan.o_total, plan.macs_per_row) == (7, 6, 4 * 7 + 2 * 5)
    with pytest.raises(ValueError, match="rows"):
        plan.forward_f32(0, -1, 7, 0, 0, 0, 0, 0, 1)


# ---------------------------------------------------------------- dispatch


def _args(rows, dtype=torch.float32, requires_grad=False, device="cpu"):
    il, ol = [4, 3, 3], [5, 2, 2]
    blocks, bias = make_blocks(il, ol, dtype)
    blocks = [b.to(device).requires_grad_(requires_grad) for b in blocks]
    x = torch.randn(rows, sum(il), dtype=dtype, device=device)
    return (x, *blocks, bias.to(device), il, ol, "relu")


def test_dispatcher_chooses_cpp_only_where_it_should(monkeypatch):
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    assert DISPATCHER.select(*_args(1)).name == "cpp"
    assert DISPATCHER.select(*_args(CPP_MAX_ROWS, torch.float64)).name == "cpp"
    assert DISPATCHER.select(*_args(0)).name == "cpp"
    x3 = torch.randn(2, 2, 10)  # 4 rows after flattening
    assert DISPATCHER.select(x3, *_args(1)[1:]).name == "cpp"
    x3 = torch.randn(CPP_MAX_ROWS, 2, 10)
    assert "rows" in DISPATCHER.explain(x3, *_args(1)[1:])
    assert DISPATCHER.select(x3, *_args(1)[1:]).name == "torch"
    assert DISPATCHER.select(*_args(CPP_MAX_ROWS + 1)).name == "torch"
    for dtype in (torch.float16, torch.bfloat16):
        assert DISPATCHER.select(*_args(1, dtype)).name == "torch"
    assert "meta" in DISPATCHER.explain(*_args(1, device="meta"))
    args = _args(1, requires_grad=True)
    assert DISPATCHER.select(*args).name == "torch"
    assert "autograd" in DISPATCHER.explain(*args)
    with torch.no_grad():
        assert DISPATCHER.select(*args).name == "cpp"
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:cpp")
    with pytest.raises(NoBackendError, match="CPP_MAX_ROWS"):
        partial_linear(torch.randn(CPP_MAX_ROWS + 1, 10), [*_args(1)[1:4]], None, [4, 3, 3], [5, 2, 2])


@pytest.fixture
def plan_calls(monkeypatch):
    """Counts calls into the compiled kernel (every call looks its plan up)."""
    calls = []
    orig = PL._cpp_plan

    def spy(*a):
        calls.append(a)
        return orig(*a)

    monkeypatch.setattr(PL, "_cpp_plan", spy)
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    return calls


def test_module_uses_cpp_for_small_batch_inference_and_torch_otherwise(plan_calls):
    il, ol = [12, 5, 5], [8, 6, 6]
    mod = PartialLinear(il, ol, activation="gelu")
    blocks = [p.detach() for p in mod.weight_blocks]
    x = torch.randn(3, sum(il))
    with torch.no_grad():
        y = mod(x)
    assert len(plan_calls) == 1
    assert_close_to_ref(y, x, blocks, mod.bias.detach(), il, ol, "gelu")
    with torch.no_grad():
        mod(torch.randn(CPP_MAX_ROWS + 1, sum(il)))
    assert len(plan_calls) == 1  # BLAS path
    # Autograd still runs through the op and its backward (the kernel is forward-only).
    xg = x.clone().requires_grad_(True)
    y = mod(xg)
    assert len(plan_calls) == 1 and y.requires_grad
    y.square().sum().backward()
    x64 = x.double().requires_grad_(True)
    ref_blocks = [b.double().requires_grad_(True) for b in blocks]
    ref_bias = mod.bias.detach().double().requires_grad_(True)
    partial_linear_ref(x64, ref_blocks, ref_bias, il, ol, "gelu").square().sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for p, r in zip(mod.weight_blocks, ref_blocks):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_module_sees_replaced_moved_and_updated_parameters(plan_calls):
    il, ol = [6, 4, 4], [5, 3, 3]
    mod = PartialLinear(il, ol, activation="relu").eval()
    x = torch.randn(2, sum(il))

    def check(m, xin):
        with torch.no_grad():
            y = m(xin)
        blk = [p.detach() for p in m.weight_blocks]
        assert_close_to_ref(y, xin, blk, m.bias.detach(), il, ol, "relu")
        return y

    y0 = check(mod, x)
    with torch.no_grad():
        mod.weight_diag.mul_(3.0)  # in place: same data_ptr, new values
        mod.bias.add_(0.5)
    y1 = check(mod, x)
    assert not torch.equal(y0, y1)
    mod.weight_shared = nn.Parameter(torch.randn(mod.weight_shared.shape))  # replaced
    check(mod, x)
    mod.load_state_dict(PartialLinear(il, ol, activation="relu").state_dict())  # copied in place
    check(mod, x)
    mod.double()  # new storages (data_ptr changes)
    y64 = check(mod, x.double())
    assert y64.dtype == torch.float64
    assert len(plan_calls) == 5


def test_tensors_without_storage_fall_back_to_blas(plan_calls):
    # torch.func.vmap hands the module BatchedTensors (CPU device, no data pointer): the functional BLAS form
    # runs them (the in-place BLAS path has no batching rule for addmm.out).
    il, ol = [5, 4, 4], [6, 3, 3]
    mod = PartialLinear(il, ol, activation="silu").eval()
    x = torch.randn(3, 1, sum(il))
    with torch.no_grad():
        y = torch.func.vmap(mod)(x)
        blk = [p.detach() for p in mod.weight_blocks]
    assert_close_to_ref(y, x, blk, mod.bias.detach(), il, ol, "silu")


def test_module_parameter_access_paths(plan_calls):
    # forward reads _parameters directly; functional_call, parametrize and bias=False must still be honoured.
    il, ol = [4, 3, 3], [5, 2, 2]
    x = torch.randn(2, sum(il))
    mod = PartialLinear(il, ol, bias=False).eval()
    with torch.no_grad():
        y = mod(x)
    assert_close_to_ref(y, x, [p.detach() for p in mod.weight_blocks], None, il, ol, "none")
    swap = {"weight_diag": torch.randn_like(mod.weight_diag), "weight_cross": torch.randn_like(mod.weight_cross)}
    with torch.no_grad():
        y = torch.func.functional_call(mod, swap, (x,))
    blk = [mod.weight_shared.detach(), swap["weight_cross"], swap["weight_diag"]]
    assert_close_to_ref(y, x, blk, None, il, ol, "none")

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(mod, "weight_shared", Double())
    assert "weight_shared" not in mod._parameters
    with torch.no_grad():
        y = mod(x)
    blk = [
        2 * mod.parametrizations.weight_shared.original.detach(),
        mod.weight_cross.detach(),
        mod.weight_diag.detach(),
    ]
    assert_close_to_ref(y, x, blk, None, il, ol, "none")


def test_parallel_threshold_env_override(monkeypatch):
    PL._cpp_plan.cache_clear()
    monkeypatch.setenv("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "123")
    try:
        assert PL._cpp_plan((3, 2, 2), (4, 1, 1), "relu").parallel_min_macs == 123
        monkeypatch.setenv("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "many")
        with pytest.raises(ValueError, match="PARALLEL_MIN_MACS"):
            PL._cpp_plan((3, 2, 1), (4, 1, 1), "relu")
    finally:
        PL._cpp_plan.cache_clear()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_every_simd_variant_matches_reference(isa):
    best = _ext._C.partial_linear_isa()
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(best):
        with pytest.raises(ValueError, match="supports up to"):
            _ext._C.partial_linear_set_isa(isa)
        pytest.skip(f"this CPU runs up to the {best} variant")
    il, ol = [37, 21, 21], [19, 18, 18]
    try:
        _ext._C.partial_linear_set_isa(isa)
        assert _ext._C.partial_linear_isa() == isa
        for dtype in (torch.float32, torch.float64):
            blocks, bias = make_blocks(il, ol, dtype)
            for rows in (1, 3, 4, 7):
                x = torch.randn(rows, sum(il), dtype=dtype)
                y = PL.cpp_forward(x, *blocks, bias, il, ol, "gelu")
                assert_close_to_ref(y, x, blocks, bias, il, ol, "gelu")
    finally:
        _ext._C.partial_linear_set_isa("auto")
    assert _ext._C.partial_linear_isa() == best
    with pytest.raises(ValueError, match="name must be"):
        _ext._C.partial_linear_set_isa("sse9")
