"""Low-level tests of the panel-packed partial linear engine ``pyfusion._C.PanelLinearPlan``
(csrc/partial_linear/panel_linear.{h,cpp}): formats (storage, panels, the 3-buffer blocks), the masked layouts of
K >= 3 fusions (no stored zero block), forward against float64 references on random and exact-arithmetic inputs,
every SIMD variant, threads, strides and bad arguments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyfusion import _ext

pytestmark = pytest.mark.skipif(
    not (_ext.EXT_AVAILABLE and hasattr(_ext._C, "PanelLinearPlan")), reason=_ext.EXT_SKIP_REASON or "no panel engine"
)

ACTS = {0: lambda t: t, 1: F.relu, 2: F.gelu, 3: F.silu}
EB = {torch.float32: 4, torch.float64: 8}


def std_masks(k: int) -> list[int]:
    return [(1 << k) - 1] + [1 << j for j in range(k)]


def plan_for(in_sizes, in_masks, out_sizes, out_masks, act=0):
    return _ext._C.PanelLinearPlan(list(in_sizes), list(in_masks), list(out_sizes), list(out_masks), act)


def allowed_mask(plan, in_sizes, out_sizes) -> torch.Tensor:
    """Dense (O_total, I_total) bool: True where a block is stored."""
    m = torch.zeros(sum(out_sizes), sum(in_sizes), dtype=torch.bool)
    r = 0
    for o, osz in enumerate(out_sizes):
        c = 0
        for i, isz in enumerate(in_sizes):
            if plan.allowed(o, i):
                m[r : r + osz, c : c + isz] = True
            c += isz
        r += osz
    return m


def storage_from_dense(plan, w: torch.Tensor, out_sizes) -> torch.Tensor:
    """The storage format (per output segment, its rows on the allowed input columns, concatenated)."""
    parts, r = [], 0
    for o, osz in enumerate(out_sizes):
        cols = [w[r : r + osz, s : s + n] for s, n in plan.ranges[o]]
        blk = torch.cat(cols, dim=1) if cols else w.new_zeros(osz, 0)
        parts.append(blk.reshape(-1))
        r += osz
    return torch.cat(parts) if parts else w.new_zeros(0)


def pack(plan, storage: torch.Tensor) -> torch.Tensor:
    eb = EB[storage.dtype]
    out = torch.full((max(plan.packed_size(eb), 1),), float("nan"), dtype=storage.dtype)  # padding must be written
    getattr(plan, f"pack_segments_f{eb * 8}")(storage.data_ptr(), out.data_ptr())
    return out


def forward(plan, x: torch.Tensor, packed, bias, threads=1, y=None) -> torch.Tensor:
    eb = EB[x.dtype]
    if y is None:
        y = torch.empty(x.shape[0], plan.o_total, dtype=x.dtype)
    getattr(plan, f"forward_f{eb * 8}")(
        x.data_ptr(), x.shape[0], x.stride(0), packed.data_ptr(), 0 if bias is None else bias.data_ptr(),
        y.data_ptr(), y.stride(0), threads,
    )  # fmt: skip
    return y


def random_case(in_sizes, in_masks, out_sizes, out_masks, dtype, act=0, seed=0, integer=False):
    plan = plan_for(in_sizes, in_masks, out_sizes, out_masks, act)
    g = torch.Generator().manual_seed(seed)
    shape = (sum(out_sizes), sum(in_sizes))
    if integer:
        w = torch.randint(-3, 4, shape, generator=g).to(dtype)
        bias = torch.randint(-5, 6, (shape[0],), generator=g).to(dtype)
    else:
        w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        bias = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    w = w * allowed_mask(plan, in_sizes, out_sizes)
    return plan, w, bias, pack(plan, storage_from_dense(plan, w, out_sizes))


STANDARD = [
    ([7, 5], [6, 3]),  # K = 1
    ([37, 70, 70], [33, 17, 17]),  # K = 2, panel tails (33 = 2 panels + 1)
    ([0, 19, 19], [5, 6, 6]),  # no shared input
    ([6, 5, 5, 5], [0, 7, 7, 7]),  # K = 3, no shared output
    ([3, 0, 4], [2, 3, 0]),  # empty branch segments
    ([11, 3, 1, 4, 2, 5], [9, 2, 5, 1, 3, 4]),  # K = 5, odd sizes
    ([129, 0, 0], [50, 3, 3]),  # first layer: branches read only the shared input
    ([0, 4, 4], [0, 3, 3]),  # pure ensemble
    ([9, 4, 4], [0, 0, 0]),  # no outputs
    ([0, 0], [3, 2]),  # no inputs: y = act(bias)
]

# K = 3 fusions whose shared slots come from member subsets: (sizes, masks) per side.
MASKED = [
    # shared {1,2,3} | shared {1,2} | shared {2,3} | branch 1 | branch 2 | branch 3
    ([20, 9, 7, 5, 6, 4], [7, 3, 6, 1, 2, 4], [18, 8, 6, 6, 5, 7], [7, 3, 6, 1, 2, 4]),
    # different input and output layouts (the previous layer had other subsets)
    ([10, 6, 3, 3, 3], [7, 5, 1, 2, 4], [12, 5, 4, 2, 2, 2], [7, 3, 6, 1, 2, 4]),
    # K = 4 with pairs only
    ([8, 8, 4, 4, 4, 4], [3, 12, 1, 2, 4, 8], [5, 7, 3, 3, 3, 3], [3, 12, 1, 2, 4, 8]),
]


def three_buffers(w: torch.Tensor, il, ol):
    """The 3-buffer format (w_shared, w_cross, w_diag) of a dense standard-layout weight."""
    ws, wc = w[: ol[0]].contiguous(), w[ol[0] :, : il[0]].contiguous()
    parts, r, c = [], ol[0], il[0]
    for o_k, i_k in zip(ol[1:], il[1:]):
        parts.append(w[r : r + o_k, c : c + i_k].reshape(-1))
        r, c = r + o_k, c + i_k
    return ws, wc, torch.cat(parts) if parts else w.new_zeros(0)


def reference(x, w, bias, act):
    return ACTS[act](x.double() @ w.double().T + (0 if bias is None else bias.double()))


def isas() -> list[str]:
    best = _ext._C.panel_linear_isa()
    return {"avx512": ["avx512", "avx2", "default"], "avx2": ["avx2", "default"]}.get(best, ["default"])


@pytest.fixture(params=isas())
def isa(request):
    _ext._C.panel_linear_set_isa(request.param)
    yield request.param
    _ext._C.panel_linear_set_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("il,ol", STANDARD)
def test_standard_layouts_match_float64(isa, dtype, il, ol):
    k = len(il) - 1
    for act in (0, 1, 2, 3):
        plan, w, bias, packed = random_case(il, std_masks(k), ol, std_masks(k), dtype, act, seed=act)
        for rows in (1, 2, 7, 8, 9, 23):
            x = torch.randn(rows, sum(il), dtype=torch.float64).to(dtype)
            y = forward(plan, x, packed, bias if act % 2 == 0 else None)
            ref = reference(x, w, bias if act % 2 == 0 else None, act)
            assert y.shape == ref.shape
            if y.numel():
                tol = 1e-12 if dtype == torch.float64 else 3e-5 * (1 + ref.abs().max().item())
                assert (y.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("il,ol", STANDARD)
def test_pack_blocks_equals_pack_segments(il, ol):
    """The 3-buffer format of ops.partial_linear packs to the same panels as the equivalent storage format."""
    k = len(il) - 1
    for dtype in (torch.float32, torch.float64):
        plan, w, _, packed = random_case(il, std_masks(k), ol, std_masks(k), dtype)
        blocks = three_buffers(w, il, ol)
        eb = EB[dtype]
        out = torch.full((max(plan.packed_size(eb), 1),), float("nan"), dtype=dtype)
        ptrs = [b.data_ptr() if b.numel() else out.data_ptr() for b in blocks]
        getattr(plan, f"pack_blocks_f{eb * 8}")(*ptrs, out.data_ptr())
        n = plan.packed_size(eb)
        assert torch.equal(out[:n], packed[:n])
        dense = torch.empty(sum(ol), sum(il), dtype=dtype)
        getattr(plan, f"unpack_dense_f{eb * 8}")(packed.data_ptr(), dense.data_ptr())
        assert torch.equal(dense, w)


@pytest.mark.parametrize("case", MASKED)
def test_masked_layouts_store_no_zero_block(isa, case):
    """Blocks whose masks do not intersect are neither stored nor multiplied; the result is the dense reference."""
    in_sizes, in_masks, out_sizes, out_masks = case
    plan, w, bias, packed = random_case(in_sizes, in_masks, out_sizes, out_masks, torch.float32, act=1)
    allowed = allowed_mask(plan, in_sizes, out_sizes)
    assert plan.macs_per_row == int(allowed.sum())
    # The same slots in the 3-buffer layout (every shared segment reads and is read by all members) store more.
    n_shared_in = sum(s for s, m in zip(in_sizes, in_masks) if bin(m).count("1") > 1)
    n_shared_out = sum(s for s, m in zip(out_sizes, out_masks) if bin(m).count("1") > 1)
    k = max(max(in_masks), max(out_masks)).bit_length()
    il = [n_shared_in] + [sum(s for s, m in zip(in_sizes, in_masks) if m == 1 << j) for j in range(k)]
    ol = [n_shared_out] + [sum(s for s, m in zip(out_sizes, out_masks) if m == 1 << j) for j in range(k)]
    assert plan_for(il, std_masks(k), ol, std_masks(k)).macs_per_row > plan.macs_per_row
    dense = torch.empty(plan.o_total, plan.i_total)
    plan.unpack_dense_f32(packed.data_ptr(), dense.data_ptr())
    assert torch.equal(dense, w) and not dense[~allowed].any()
    for rows in (1, 5, 8, 30):
        x = torch.randn(rows, plan.i_total)
        y = forward(plan, x, packed, bias)
        ref = reference(x, w, bias, 1)
        assert (y.double() - ref).abs().max().item() <= 3e-5 * (1 + ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40, 130])
def test_integer_operands_are_exact(isa, rows):
    """Small integers: every product and partial sum is exact in float32, so y equals the float64 result bit for
    bit (any blocking, any tile shape)."""
    in_sizes, in_masks, out_sizes, out_masks = MASKED[0]
    plan, w, bias, packed = random_case(in_sizes, in_masks, out_sizes, out_masks, torch.float32, integer=True)
    x = torch.randint(-4, 5, (rows, plan.i_total)).float()
    y = forward(plan, x, packed, bias)
    assert torch.equal(y.double(), reference(x, w, bias, 0))


def test_threads_are_bit_identical():
    """Each output tile and row group is computed by one thread in a fixed order."""
    il, ol = [300, 200, 200], [280, 150, 150]
    plan, w, bias, packed = random_case(il, std_masks(2), ol, std_masks(2), torch.float32, act=3)
    plan.parallel_min_macs = 0
    for rows in (1, 8, 200):
        x = torch.randn(rows, sum(il))
        y1 = forward(plan, x, packed, bias, threads=1)
        for t in (2, 3):
            assert torch.equal(forward(plan, x, packed, bias, threads=t), y1)


def test_strided_rows_and_output_stride():
    il, ol = [40, 30, 30], [20, 25, 25]
    plan, w, bias, packed = random_case(il, std_masks(2), ol, std_masks(2), torch.float64)
    big = torch.randn(17, 250, dtype=torch.float64)
    x = big[:, 7 : 7 + sum(il)]  # row stride 250, unit column stride
    ybig = torch.full((17, 200), 5.0, dtype=torch.float64)
    y = ybig[:, 10 : 10 + sum(ol)]
    forward(plan, x, packed, bias, y=y)
    torch.testing.assert_close(y, reference(x, w, bias, 0), rtol=0, atol=1e-12)
    assert (ybig[:, :10] == 5).all() and (ybig[:, 10 + sum(ol) :] == 5).all()  # nothing outside y's columns


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="in_masks"):
        plan_for([3, 2], [3, 0], [2], [1])
    with pytest.raises(ValueError, match="activation"):
        plan_for([3], [1], [2], [1], act=9)
    with pytest.raises(ValueError, match="equal length"):
        plan_for([3, 2], [3], [2], [1])
    with pytest.raises(ValueError, match="in_sizes must be >= 0"):
        plan_for([-1], [1], [2], [1])
    plan = plan_for(*MASKED[0])
    buf = torch.zeros(plan.packed_size(4))
    with pytest.raises(ValueError, match="3-buffer format needs masks"):
        plan.pack_blocks_f32(buf.data_ptr(), buf.data_ptr(), buf.data_ptr(), buf.data_ptr())
    with pytest.raises(ValueError, match="row strides"):
        x = torch.zeros(2, plan.i_total)
        y = torch.zeros(2, plan.o_total)
        plan.forward_f32(x.data_ptr(), 2, x.stride(0), buf.data_ptr(), 0, y.data_ptr(), 1, 1)
    with pytest.raises(ValueError, match="set_isa"):
        _ext._C.panel_linear_set_isa("sse9")


def test_large_batch_uses_a_temporary_packed_input():
    """A packed input above the 16 MiB kept per thread is allocated for the call: same results."""
    il, ol = [600, 200, 200], [4, 3, 3]
    plan, w, bias, packed = random_case(il, std_masks(2), ol, std_masks(2), torch.float32, integer=True)
    x = torch.randint(-3, 4, (4200, sum(il))).float()  # 4200 x 1000 floats packed: 16.8 MB
    y = forward(plan, x, packed, bias)
    assert torch.equal(y.double(), reference(x, w, bias, 0))
    small = forward(plan, x[:5], packed, bias)  # the kept buffer still works afterwards
    assert torch.equal(small, y[:5])
