"""Triton implicit-GEMM convolution for a partially fused Conv2d (DESIGN §7). Import as
``pyfusion.triton_kernels.partial_conv2d``.

The same block structure as the partial linear layer, on channels: shared output channels read every input channel,
branch k output channels read the shared input channels and branch k's (or, in the masked-segment format, output
segment o reads input segment i iff their member masks intersect). One launch computes

    y[n, o, ho, wo] = act(b[o] + sum_{allowed c} sum_{r, s} w[o, c, r, s] x[n, c, ho SH - PH + r DH, wo SW - PW + s DW])

as a GEMM with M = N * HO * WO output pixels, the output channels as columns, and a K-loop over (tap, allowed input
channel), zero padding by masked loads. No im2col buffer, no zero block read.

Weights are read tap-major: for each weight block (O_b, C_b, kh, kw) the launcher makes the (O_b, kh, kw, C_b) copy
once per call (channels contiguous, so a BLOCK_K x BLOCK_O weight tile is BLOCK_O contiguous runs). Range table:
per output segment ``out_size, out_start, first_range, end_range``; per range ``x_chan, length, buffer, w_offset,
w_row_stride, w_tap_stride``: output row r, tap t, channel j read ``buffer[w_offset + r * w_row_stride + t *
w_tap_stride + j]`` against input channel x_chan + j. Grid, grouped ordering, epilogue and dtypes as
:mod:`pyfusion.triton_kernels.partial_linear`, except that float32 follows ``torch.backends.cudnn.allow_tf32`` (as
F.conv2d does; True by default) rather than the matmul flag. x may have any strides (NCHW, channels_last,
slices); y is a new contiguous NCHW tensor. groups = 1 only.

Formats accepted:
* the 3-buffer format of ``pyfusion.nn.PartialConv2d``: ``weight_shared`` (O_s, I_total, kh, kw), ``weight_cross``
  (O_B, I_s, kh, kw), ``weight_diag`` flat, blocks (O_k, I_k, kh, kw) concatenated — :func:`partial_conv2d_fwd`;
* the masked-segment storage format: per output segment o, (O_o, K_o, kh, kw) on its allowed input channels
  concatenated in order, all segments in one flat buffer — :func:`partial_conv2d_segments_fwd`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._layout import masked_ranges

__all__ = [
    "ConvMeta",
    "autotune_configs",
    "conv_output_size",
    "conv_segment_meta",
    "masked_conv_segment_meta",
    "partial_conv2d_fwd",
    "partial_conv2d_segments_fwd",
]

ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
SEG_FIELDS = 4
RANGE_FIELDS = 6  # x_chan, length, buffer, w_offset, w_row_stride, w_tap_stride


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def autotune_configs() -> list[triton.Config]:
    """One small config under the interpreter or with ``PYFUSION_TRITON_AUTOTUNE=0``; Hopper tiles otherwise (not
    timed on a GPU in this session; the autotuner picks per (M, O, channels x taps) key)."""
    if _interpreting() or os.environ.get("PYFUSION_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_O": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 32, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bo, bk, w, s in shapes
    ]


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _conv_range(
    acc,
    x_ptr,
    w_ptr,
    n_idx,
    ho,
    wo,
    mask_m,
    offs_o,
    mask_o,
    x_chan,
    n_ch,
    w_off,
    w_row,
    w_tap,
    H,
    W,
    KW,
    TAPS,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    sxn,
    sxc,
    sxh,
    sxw,
    DOT_IEEE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += sum over taps and the n_ch channels of one range (n_ch = 0: nothing, not even the tap loop)."""
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_off + offs_o.to(tl.int64) * w_row
    n_taps = tl.where(n_ch > 0, TAPS, 0)
    for t in range(0, n_taps):
        r = t // KW
        s = t - r * KW
        hi = ho * SH - PH + r * DH
        wi = wo * SW - PW + s * DW
        valid = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_base = n_idx * sxn + hi * sxh + wi * sxw
        w_base = w_rows + t * w_tap
        for c0 in range(0, n_ch, BLOCK_K):
            cc = c0 + offs_k
            mc = cc < n_ch
            a = tl.load(
                x_ptr + x_base[:, None] + (x_chan + cc)[None, :].to(tl.int64) * sxc,
                mask=valid[:, None] & mc[None, :],
                other=0.0,
            )
            b = tl.load(w_ptr + w_base[None, :] + cc[:, None], mask=mc[:, None] & mask_o[None, :], other=0.0)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(configs=autotune_configs(), key=["M", "O_TOTAL", "CK", "NSEG"])
@triton.jit
def _partial_conv2d_kernel(
    x_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    b_ptr,
    y_ptr,
    meta_ptr,
    M,
    O_TOTAL,
    CK,
    NSEG,
    RANGE_BASE,
    H,
    W,
    HO,
    WO,
    KW,
    TAPS,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # int64 from the start: the loop-carried scalars below accumulate int64 table entries, and a loop-carried
    # variable may not change type in compiled Triton (the interpreter would not notice).
    pid = tl.program_id(0).to(tl.int64)
    tiles_o = pid * 0
    for s in range(0, NSEG):
        tiles_o += (tl.load(meta_ptr + s * 4) + BLOCK_O - 1) // BLOCK_O
    num_pid_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tiles_o
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_o = (pid % in_group) // group_m

    seg = pid * 0
    local = pid * 0
    t0 = pid * 0
    for s in range(0, NSEG):
        nt = (tl.load(meta_ptr + s * 4) + BLOCK_O - 1) // BLOCK_O
        hit = (pid_o >= t0) & (pid_o < t0 + nt)
        seg = tl.where(hit, s, seg)
        local = tl.where(hit, pid_o - t0, local)
        t0 += nt
    o_size = tl.load(meta_ptr + seg * 4)
    o_start = tl.load(meta_ptr + seg * 4 + 1)
    r_begin = tl.load(meta_ptr + seg * 4 + 2)
    r_end = tl.load(meta_ptr + seg * 4 + 3)

    offs_o = local * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < o_size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    hw = HO * WO
    n_idx = offs_m // hw
    rem = offs_m - n_idx * hw
    ho = rem // WO
    wo = rem - ho * WO
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r in range(r_begin, r_end):
        rp = meta_ptr + RANGE_BASE + r * 6
        x_chan = tl.load(rp)
        n = tl.load(rp + 1)
        buf = tl.load(rp + 2)
        w_off = tl.load(rp + 3)
        w_row = tl.load(rp + 4)
        w_tap = tl.load(rp + 5)
        acc = _conv_range(acc, x_ptr, w0_ptr, n_idx, ho, wo, mask_m, offs_o, mask_o, x_chan, tl.where(buf == 0, n, 0),
                          w_off, w_row, w_tap, H, W, KW, TAPS, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw, DOT_IEEE,
                          BLOCK_K)  # fmt: skip
        acc = _conv_range(acc, x_ptr, w1_ptr, n_idx, ho, wo, mask_m, offs_o, mask_o, x_chan, tl.where(buf == 1, n, 0),
                          w_off, w_row, w_tap, H, W, KW, TAPS, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw, DOT_IEEE,
                          BLOCK_K)  # fmt: skip
        acc = _conv_range(acc, x_ptr, w2_ptr, n_idx, ho, wo, mask_m, offs_o, mask_o, x_chan, tl.where(buf == 2, n, 0),
                          w_off, w_row, w_tap, H, W, KW, TAPS, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw, DOT_IEEE,
                          BLOCK_K)  # fmt: skip

    cols = o_start + offs_o
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=mask_o, other=0.0).to(tl.float32)
        acc += bias[None, :]
    acc = _activation(acc, ACT)
    y_row = n_idx * syn + ho * syh + wo * syw
    y_ptrs = y_ptr + y_row[:, None] + cols[None, :].to(tl.int64) * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Tables and launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvMeta:
    """Range table (int64, on device) and the host-side sizes the launcher needs."""

    table: torch.Tensor
    out_sizes: tuple[int, ...]
    in_total: int
    taps: int
    ck: int  # allowed (channel, tap) pairs summed over output segments: the autotune key's size of the K-loop
    k_of_out: tuple[int, ...] = ()
    storage_size: int = 0


def _table(segs, device) -> torch.Tensor:
    seg_rows, range_rows = [], []
    for o_size, o_start, ranges in segs:
        first = len(range_rows) // RANGE_FIELDS
        seg_rows += [o_size, o_start, first, first + len(ranges)]
        for rg in ranges:
            range_rows += list(rg)
    return torch.tensor(seg_rows + range_rows, dtype=torch.int64, device=device)


def conv_segment_meta(
    in_layout: Sequence[int], out_layout: Sequence[int], kernel_size: tuple[int, int], device: torch.device
) -> ConvMeta:
    """Range table of the 3-buffer format (after the launcher's tap-major copies of the three weight buffers)."""
    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    taps = int(kernel_size[0]) * int(kernel_size[1])
    i_s, i_total = il[0], sum(il)
    segs = [(ol[0], 0, [(0, i_total, 0, 0, taps * i_total, i_total)] if i_total else [])]
    ck = i_total * taps if ol[0] else 0
    o_start, i0, c0, d0 = ol[0], i_s, 0, 0
    for o_k, i_k in zip(ol[1:], il[1:]):
        ranges = []
        if i_s:
            ranges.append((0, i_s, 1, c0 * taps * i_s, taps * i_s, i_s))
        if i_k:
            ranges.append((i0, i_k, 2, d0 * taps, taps * i_k, i_k))
        segs.append((o_k, o_start, ranges))
        ck += (i_s + i_k) * taps if o_k else 0
        o_start, i0, c0, d0 = o_start + o_k, i0 + i_k, c0 + o_k, d0 + o_k * i_k
    return ConvMeta(_table(segs, device), tuple(ol), i_total, taps, ck)


def masked_conv_segment_meta(
    in_sizes: Sequence[int],
    in_masks: Sequence[int],
    out_sizes: Sequence[int],
    out_masks: Sequence[int],
    kernel_size: tuple[int, int],
    device: torch.device,
) -> ConvMeta:
    """Range table of the masked-segment storage format on channels (see the module docstring).

    Raises:
        ValueError: mismatched lengths, negative sizes or a zero mask on a non-empty segment.
    """
    sr = masked_ranges(in_sizes, in_masks, out_sizes, out_masks)
    taps = int(kernel_size[0]) * int(kernel_size[1])
    segs, ck = [], 0
    for o, (o_size, o_start) in enumerate(zip(sr.out_sizes, sr.out_starts)):
        k_o, off = sr.k_of_out[o], sr.offsets[o] * taps
        segs.append((o_size, o_start, [(col, n, 0, off + q, taps * k_o, k_o) for col, n, q in sr.ranges[o]]))
        ck += k_o * taps if o_size else 0
    return ConvMeta(_table(segs, device), sr.out_sizes, sr.i_total, taps, ck, sr.k_of_out, sr.offsets[-1] * taps)


def conv_output_size(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _tap_major(w: torch.Tensor, rows: int, chans: int, kernel_size) -> torch.Tensor:
    """(rows, chans, kh, kw) (any flat view) -> (rows, kh, kw, chans) contiguous."""
    kh, kw = kernel_size
    return w.reshape(rows, chans, kh, kw).permute(0, 2, 3, 1).contiguous()


def _launch(x, w0, w1, w2, bias, meta: ConvMeta, kernel_size, stride, padding, dilation, activation, launcher):
    n, c, h, w = x.shape
    if c != meta.in_total:
        raise ValueError(f"x must have {meta.in_total} channels (the layout's input total); got shape {tuple(x.shape)}")
    ho, wo = conv_output_size(h, w, kernel_size, stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"the output would be empty ({ho} x {wo}) for input {h} x {w}, kernel {tuple(kernel_size)}, stride "
            f"{tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    o_total = sum(meta.out_sizes)
    y = torch.empty((n, o_total, ho, wo), dtype=x.dtype, device=x.device)
    M = n * ho * wo
    if M == 0 or o_total == 0:
        return y
    kernel = _partial_conv2d_kernel if launcher is None else launcher(_partial_conv2d_kernel)

    def grid(meta_params):
        bo, bm = meta_params["BLOCK_O"], meta_params["BLOCK_M"]
        return (sum(triton.cdiv(o, bo) for o in meta.out_sizes) * triton.cdiv(M, bm),)

    nseg = len(meta.out_sizes)
    kernel[grid](
        x, w0, w1, w2, bias if bias is not None else y, y, meta.table,
        M, o_total, meta.ck, nseg, nseg * SEG_FIELDS,
        h, w, ho, wo, kernel_size[1], meta.taps,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *y.stride(),
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        # float32 follows F.conv2d's setting (cuDNN: torch.backends.cudnn.allow_tf32, True by default).
        DOT_IEEE=x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32,
    )  # fmt: skip
    return y


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def partial_conv2d_fwd(
    x: torch.Tensor,
    weight_shared: torch.Tensor,
    weight_cross: torch.Tensor,
    weight_diag: torch.Tensor,
    bias: torch.Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    activation: str = "none",
    meta: ConvMeta | None = None,
    launcher=None,
) -> torch.Tensor:
    """The 3-buffer format of ``pyfusion.nn.PartialConv2d``: x (N, I_total, H, W), any strides -> (N, O_total, HO, WO).

    Args:
        weight_shared: (O_s, I_total, kh, kw); weight_cross: (O_B, I_s, kh, kw); weight_diag: (sum_k O_k I_k kh kw,).
        meta: :func:`conv_segment_meta` of the layouts (built here when None).
        launcher: ``torch.library.wrap_triton`` inside a ``triton_op``, or None to launch directly.
    """
    ks, st, pd, dl = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    if meta is None:
        meta = conv_segment_meta(il, ol, ks, x.device)
    i_s, i_total, o_s, o_b = il[0], sum(il), ol[0], sum(ol[1:])
    ws = _tap_major(weight_shared, o_s, i_total, ks) if weight_shared.numel() else None
    wc = _tap_major(weight_cross, o_b, i_s, ks) if weight_cross.numel() else None
    parts, d = [], 0
    area = ks[0] * ks[1]
    for o_k, i_k in zip(ol[1:], il[1:]):
        size = o_k * i_k * area
        if size:
            parts.append(_tap_major(weight_diag[d : d + size], o_k, i_k, ks).reshape(-1))
        d += size
    wd = torch.cat(parts) if parts else None
    fallback = x  # a valid pointer no range reads (empty buffers)
    return _launch(x, ws if ws is not None else fallback, wc if wc is not None else fallback,
                   wd if wd is not None else fallback, bias, meta, ks, st, pd, dl, activation, launcher)  # fmt: skip


def partial_conv2d_segments_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    meta: ConvMeta,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    activation: str = "none",
    launcher=None,
) -> torch.Tensor:
    """The masked-segment storage format: ``weight`` flat (meta.storage_size,), blocks (O_o, K_o, kh, kw) per output
    segment; x (N, I_total, H, W) -> (N, O_total, HO, WO).

    Raises:
        ValueError: if the weight does not have the size the table describes.
    """
    ks = _pair(kernel_size)
    if weight.dim() != 1 or weight.numel() != meta.storage_size:
        raise ValueError(
            f"weight must be flat with {meta.storage_size} elements (the masked-segment storage format); got shape "
            f"{tuple(weight.shape)}"
        )
    parts, off = [], 0
    for o_size, k_o in zip(meta.out_sizes, meta.k_of_out):
        size = o_size * k_o * meta.taps
        if size:
            parts.append(_tap_major(weight[off : off + size], o_size, k_o, ks).reshape(-1))
        off += size
    w = torch.cat(parts) if parts else x
    return _launch(x, w, w, w, bias, meta, ks, _pair(stride), _pair(padding), _pair(dilation), activation, launcher)
