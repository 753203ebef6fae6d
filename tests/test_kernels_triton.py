"""The Triton kernels of triton_kernels/ called through their launchers, in the CPU interpreter (TRITON_INTERPRET=1,
set by conftest.py without a GPU) and on a GPU when one is present (``gpu`` tests, float16 / bfloat16 / float32).

Compared with float64 references on random inputs and on exact-arithmetic ones (small integers: every product and
partial sum is exact in float32, so the result must equal the float64 one bit for bit), with non-contiguous inputs,
ragged tiles (sizes not multiples of the blocks), both weight formats (the 3-buffer blocks and the masked segments of
K >= 3 fusions), and guard values around every weight buffer (a read outside the stored blocks would show as NaN).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not HAS_TRITON or not (INTERPRET or ON_GPU), reason="needs triton (GPU or interpreter)")

ACTS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 with IEEE products in the kernels (and in nothing else here): the tolerances are float32's."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def kmods():
    from pyfusion.triton_kernels import partial_conv2d, partial_linear

    return partial_linear, partial_conv2d


def std_masks(k):
    return [(1 << k) - 1] + [1 << j for j in range(k)]


def guarded(t: torch.Tensor, pad: int = 67) -> torch.Tensor:
    """A copy of t (flattened order kept) inside a NaN-filled buffer: reads past either end would show."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype, device=t.device)
    buf[pad : pad + t.numel()] = t.reshape(-1)
    return buf[pad : pad + t.numel()].view(t.shape)


def blocks_of(w: torch.Tensor, il, ol):
    """3-buffer blocks of a dense (O, I[, kh, kw]) weight, as nn.PartialLinear / PartialConv2d store them."""
    i_s, o_s = il[0], ol[0]
    ws = w[:o_s].contiguous()
    wc = w[o_s:, :i_s].contiguous()
    parts, r, c = [], o_s, i_s
    for o_k, i_k in zip(ol[1:], il[1:]):
        parts.append(w[r : r + o_k, c : c + i_k].reshape(-1))
        r, c = r + o_k, c + i_k
    wd = torch.cat(parts) if parts else w.new_zeros(0)
    return ws, wc, wd


def allowed(in_sizes, in_masks, out_sizes, out_masks) -> torch.Tensor:
    m = torch.zeros(sum(out_sizes), sum(in_sizes), dtype=torch.bool)
    r = 0
    for osz, om in zip(out_sizes, out_masks):
        c = 0
        for isz, im in zip(in_sizes, in_masks):
            if om & im:
                m[r : r + osz, c : c + isz] = True
            c += isz
        r += osz
    return m


def storage(w: torch.Tensor, in_sizes, in_masks, out_sizes, out_masks) -> torch.Tensor:
    """Masked-segment storage format of a dense (O, I[, kh, kw]) weight."""
    starts = [0]
    for n in in_sizes:
        starts.append(starts[-1] + n)
    parts, r = [], 0
    for osz, om in zip(out_sizes, out_masks):
        cols = [
            w[r : r + osz, starts[i] : starts[i] + n] for i, (n, im) in enumerate(zip(in_sizes, in_masks)) if om & im
        ]
        if cols and osz:
            parts.append(torch.cat(cols, dim=1).reshape(-1))
        r += osz
    return torch.cat(parts) if parts else w.new_zeros(0)


def dense_weight(shape_o, shape_i, mask, dtype, integer, g, taps=()):
    shape = (shape_o, shape_i, *taps)
    if integer:
        w = torch.randint(-3, 4, shape, generator=g).to(dtype)
    else:
        w = (torch.randn(shape, generator=g, dtype=torch.float64) / max(shape_i, 1) ** 0.5).to(dtype)
    return w * mask.view(shape_o, shape_i, *([1] * len(taps))).to(dtype)


def tol(dtype, ref):
    scale = 1.0 + ref.abs().max().item() if ref.numel() else 1.0
    return {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype] * scale


LINEAR_LAYOUTS = [
    ([37, 70, 70], [33, 17, 17]),  # K = 2, ragged tiles
    ([0, 19, 19], [5, 6, 6]),  # no shared input
    ([6, 5, 5, 5], [0, 7, 7, 7]),  # K = 3, no shared output
    ([11, 3, 1, 4, 2, 5], [9, 2, 5, 1, 3, 4]),  # K = 5, odd sizes
    ([40, 0, 0], [8, 35, 35]),  # first layer: branches read only the shared input
]
MASKED = [
    ([20, 9, 7, 5, 6, 4], [7, 3, 6, 1, 2, 4], [18, 8, 6, 6, 5, 7], [7, 3, 6, 1, 2, 4]),
    ([10, 6, 3, 3, 3], [7, 5, 1, 2, 4], [12, 5, 4, 2, 2, 2], [7, 3, 6, 1, 2, 4]),
]


def dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


# ---------------------------------------------------------------------------------------------------- linear


def run_linear_blocks(x, w, bias, il, ol, act):
    pl, _ = kmods()
    ws, wc, wd = (guarded(b) for b in blocks_of(w, il, ol))
    meta = pl.segment_meta(il, ol, x.device)
    return pl.partial_linear_fwd(x, ws, wc, wd, None if bias is None else guarded(bias), il, ol, act, meta)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("il,ol", LINEAR_LAYOUTS)
def test_linear_blocks_random_against_float64(dtype, il, ol):
    g = torch.Generator().manual_seed(sum(il) + sum(ol))
    k = len(il) - 1
    mask = allowed(il, std_masks(k), ol, std_masks(k))
    w = dense_weight(sum(ol), sum(il), mask, torch.float64, False, g)
    bias = torch.randn(sum(ol), generator=g, dtype=torch.float64)
    for rows, act in ((1, "none"), (45, "gelu"), (70, "silu")):
        x = torch.randn(rows, sum(il), generator=g, dtype=torch.float64)
        ref = ACTS[act](x @ w.T + bias)
        y = run_linear_blocks(x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE), il, ol, act)
        assert y.shape == ref.shape and y.dtype == dtype and not y.isnan().any()
        assert (y.double().cpu() - ref).abs().max().item() <= tol(dtype, ref)


@pytest.mark.parametrize("dtype", dtypes())
def test_linear_integer_operands_are_exact(dtype):
    """Small integers (|sums| < 2^11): exact in float16 inputs with float32 accumulation, so y equals float64."""
    il, ol = [37, 30, 30], [33, 40, 40]
    g = torch.Generator().manual_seed(1)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(2), ol, std_masks(2)), torch.float64, True, g)
    bias = torch.randint(-4, 5, (sum(ol),), generator=g).double()
    x = torch.randint(-2, 3, (50, sum(il)), generator=g).double()
    y = run_linear_blocks(x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE), il, ol, "relu")
    assert torch.equal(y.double().cpu(), F.relu(x @ w.T + bias))


def test_linear_non_contiguous_inputs():
    il, ol = [20, 12, 12], [16, 9, 9]
    g = torch.Generator().manual_seed(2)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(2), ol, std_masks(2)), torch.float32, False, g)
    base = torch.randn(3 * sum(il), 40, generator=g)
    views = [base.t()[:, : sum(il)], torch.randn(40, 2 * sum(il), generator=g)[:, ::2]]
    for x in views:
        assert not x.is_contiguous()
        y = run_linear_blocks(x.to(DEVICE), w.to(DEVICE), None, il, ol, "none")
        ref = x.double() @ w.double().T
        assert (y.double().cpu() - ref).abs().max().item() <= tol(torch.float32, ref)


def test_linear_grouped_order_covers_every_tile():
    """More row tiles than one group (GROUP_M = 8 row tiles of 32 in the interpreter config)."""
    il, ol = [9, 5, 5], [40, 3, 3]
    g = torch.Generator().manual_seed(3)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(2), ol, std_masks(2)), torch.float32, True, g)
    x = torch.randint(-3, 4, (300, sum(il)), generator=g).float()
    y = run_linear_blocks(x.to(DEVICE), w.to(DEVICE), None, il, ol, "none")
    assert torch.equal(y.double().cpu(), x.double() @ w.double().T)


@pytest.mark.parametrize("case", MASKED)
@pytest.mark.parametrize("dtype", dtypes())
def test_linear_masked_segments(case, dtype):
    pl, _ = kmods()
    in_sizes, in_masks, out_sizes, out_masks = case
    g = torch.Generator().manual_seed(4)
    mask = allowed(*case)
    w = dense_weight(sum(out_sizes), sum(in_sizes), mask, torch.float64, False, g)
    bias = torch.randn(sum(out_sizes), generator=g, dtype=torch.float64)
    meta = pl.masked_segment_meta(*case, torch.device(DEVICE))
    flat = storage(w, *case)
    assert meta.storage_size == flat.numel() == int(mask.sum())
    x = torch.randn(37, sum(in_sizes), generator=g, dtype=torch.float64)
    y = pl.partial_linear_segments_fwd(
        x.to(dtype).to(DEVICE), guarded(flat.to(dtype).to(DEVICE)), bias.to(dtype).to(DEVICE), meta, "relu"
    )
    ref = F.relu(x @ w.T + bias)
    assert (y.double().cpu() - ref).abs().max().item() <= tol(dtype, ref)


def test_linear_masked_meta_errors():
    pl, _ = kmods()
    with pytest.raises(ValueError, match="in_masks"):
        pl.masked_segment_meta([3, 2], [3, 0], [2], [1], torch.device("cpu"))
    meta = pl.masked_segment_meta(*MASKED[0], torch.device("cpu"))
    with pytest.raises(ValueError, match="storage format"):
        pl.partial_linear_segments_fwd(torch.zeros(2, meta.i_total), torch.zeros(3), None, meta, "none")


# ---------------------------------------------------------------------------------------------------- conv2d

CONV_CASES = [
    # in_layout, out_layout, kernel, stride, padding, dilation, H, W
    ([6, 5, 5], [7, 4, 4], (3, 3), (1, 1), (1, 1), (1, 1), 6, 5),
    ([4, 6, 6], [5, 6, 6], (3, 3), (2, 2), (0, 0), (1, 1), 7, 7),
    ([3, 2, 4, 3], [0, 5, 3, 4], (1, 1), (1, 1), (0, 0), (1, 1), 5, 4),  # K = 3, no shared output, 1x1
    ([0, 4, 4], [3, 4, 4], (3, 2), (1, 2), (2, 1), (2, 1), 6, 7),  # no shared input, rectangular kernel, dilation
    ([5, 0, 3], [2, 3, 0], (2, 2), (1, 1), (0, 1), (1, 1), 4, 5),  # empty branch segments
]


def conv_ref(x, w, bias, stride, padding, dilation, act):
    return ACTS[act](
        F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), stride, padding, dilation)
    )


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_blocks_against_float64(dtype, case):
    _, pc = kmods()
    il, ol, ks, st, pd, dl, h, wd = case
    k = len(il) - 1
    g = torch.Generator().manual_seed(sum(il) * 7 + h)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(k), ol, std_masks(k)), torch.float64, False, g, ks)
    bias = torch.randn(sum(ol), generator=g, dtype=torch.float64)
    x = torch.randn(3, sum(il), h, wd, generator=g, dtype=torch.float64)
    ws, wc, wdg = (guarded(b.to(dtype).to(DEVICE)) for b in blocks_of(w, il, ol))
    for act in ("none", "gelu"):
        y = pc.partial_conv2d_fwd(
            x.to(dtype).to(DEVICE), ws, wc, wdg, guarded(bias.to(dtype).to(DEVICE)), il, ol, ks, st, pd, dl, act
        )
        ref = conv_ref(x.to(dtype), w.to(dtype), bias.to(dtype), st, pd, dl, act)
        assert y.shape == ref.shape and y.is_contiguous() and not y.isnan().any()
        assert (y.double().cpu() - ref).abs().max().item() <= tol(dtype, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_integer_operands_are_exact(dtype):
    _, pc = kmods()
    il, ol, ks, st, pd, dl, h, wd = CONV_CASES[0]
    g = torch.Generator().manual_seed(5)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(2), ol, std_masks(2)), torch.float64, True, g, ks)
    x = torch.randint(-2, 3, (2, sum(il), h, wd), generator=g).double()
    bias = torch.randint(-3, 4, (sum(ol),), generator=g).double()
    blocks = [b.to(dtype).to(DEVICE) for b in blocks_of(w, il, ol)]
    y = pc.partial_conv2d_fwd(
        x.to(dtype).to(DEVICE), *blocks, bias.to(dtype).to(DEVICE), il, ol, ks, st, pd, dl, "relu"
    )
    assert torch.equal(y.double().cpu(), conv_ref(x, w, bias, st, pd, dl, "relu"))


def test_conv_non_contiguous_inputs():
    """channels_last, a channel slice of a wider tensor, and a spatially strided view."""
    _, pc = kmods()
    il, ol, ks, st, pd, dl, h, wd = CONV_CASES[0]
    g = torch.Generator().manual_seed(6)
    w = dense_weight(sum(ol), sum(il), allowed(il, std_masks(2), ol, std_masks(2)), torch.float32, False, g, ks)
    blocks = [b.to(DEVICE) for b in blocks_of(w, il, ol)]
    c = sum(il)
    views = [
        torch.randn(2, c, h, wd, generator=g).to(memory_format=torch.channels_last),
        torch.randn(2, c + 5, h, wd, generator=g)[:, 3 : 3 + c],
        torch.randn(2, c, 2 * h, 2 * wd, generator=g)[:, :, ::2, ::2],
    ]
    for x in views:
        assert not x.is_contiguous()
        y = pc.partial_conv2d_fwd(x.to(DEVICE), *blocks, None, il, ol, ks, st, pd, dl)
        ref = conv_ref(x, w, None, st, pd, dl, "none")
        assert (y.double().cpu() - ref).abs().max().item() <= tol(torch.float32, ref)


@pytest.mark.parametrize("dtype", dtypes())
def test_conv_masked_segments(dtype):
    _, pc = kmods()
    in_sizes, in_masks, out_sizes, out_masks = MASKED[1]
    ks, st, pd, dl = (3, 3), (1, 1), (1, 1), (1, 1)
    g = torch.Generator().manual_seed(7)
    mask = allowed(*MASKED[1])
    w = dense_weight(sum(out_sizes), sum(in_sizes), mask, torch.float64, False, g, ks)
    meta = pc.masked_conv_segment_meta(*MASKED[1], ks, torch.device(DEVICE))
    flat = storage(w, *MASKED[1])
    assert meta.storage_size == flat.numel() == int(mask.sum()) * 9
    x = torch.randn(2, sum(in_sizes), 5, 6, generator=g, dtype=torch.float64)
    y = pc.partial_conv2d_segments_fwd(x.to(dtype).to(DEVICE), guarded(flat.to(dtype).to(DEVICE)), None, meta, ks,
                                       st, pd, dl, "silu")  # fmt: skip
    ref = conv_ref(x.to(dtype), w.to(dtype), None, st, pd, dl, "silu")
    assert (y.double().cpu() - ref).abs().max().item() <= tol(dtype, ref)


def test_conv_bad_shapes_are_clear_errors():
    _, pc = kmods()
    il, ol = [3, 2, 2], [2, 2, 2]
    g = torch.Generator().manual_seed(8)
    w = dense_weight(6, 7, allowed(il, std_masks(2), ol, std_masks(2)), torch.float32, False, g, (3, 3))
    blocks = blocks_of(w, il, ol)
    with pytest.raises(ValueError, match="channels"):
        pc.partial_conv2d_fwd(torch.zeros(1, 6, 5, 5), *blocks, None, il, ol, (3, 3))
    with pytest.raises(ValueError, match="empty"):
        pc.partial_conv2d_fwd(torch.zeros(1, 7, 2, 2), *blocks, None, il, ol, (3, 3))
