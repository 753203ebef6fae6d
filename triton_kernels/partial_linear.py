"""Triton grouped GEMM for a partially fused linear layer (DESIGN §7). Import as
``pyfusion.triton_kernels.partial_linear``.

One launch computes ``y = act(x @ W^T + b)`` for every output segment, where ``W`` is block sparse: output segment
o reads only its allowed input column ranges, so skipped blocks are never read or multiplied. Two weight formats:

* the 3-buffer format of :mod:`pyfusion.ops.partial_linear` (layout ``[shared | branch_1 | ... | branch_K]``):
  ``w_shared`` (O_s, I_total), ``w_cross`` (O_B, I_s), ``w_diag`` (sum_k O_k I_k,) — :func:`partial_linear_fwd`
  with the table of :func:`segment_meta`;
* the masked-segment storage format of csrc/partial_linear/panel_linear.h (K >= 3 fusions whose shared slots come
  from member subsets, no stored zero block): one flat buffer, output segment o's rows (O_o, K_o) on its allowed
  input columns concatenated — :func:`partial_linear_segments_fwd` with the table of :func:`masked_segment_meta`.

The kernel reads a range table: per output segment ``out_size, out_start, first_range, end_range``; per range
``x_col, length, buffer (0/1/2), w_offset, w_row_stride`` — output row r of the segment reads
``buffer[w_offset + r * w_row_stride + j]`` against ``x[:, x_col + j]`` for j < length. The K-loop for a range runs
once per weight buffer with a zero trip count on the two other buffers, so the loop body has no branch and pipelines.
Programs: a 1-D grid over (row tile, output tile) in grouped order (``GROUP_M`` row tiles share the output tiles
they sweep, so weight tiles are re-read from L2); each program finds its segment by scanning the (few) segments.
Bias and activation are fused in the epilogue; the accumulator is float32 for every input dtype; float32 inputs use
IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch's own matmul).

Set ``TRITON_INTERPRET=1`` before importing this module to run it on CPU (tests; float32/float16 only: the
interpreter has no bfloat16).
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
    "ACTIVATIONS",
    "MaskedMeta",
    "autotune_configs",
    "masked_segment_meta",
    "partial_linear_fwd",
    "partial_linear_segments_fwd",
    "segment_meta",
]

ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
SEG_FIELDS = 4  # out_size, out_start, first_range, end_range
RANGE_FIELDS = 5  # x_col, length, buffer, w_offset, w_row_stride


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def autotune_configs() -> list[triton.Config]:
    """The autotuned set. One small config under the interpreter or with ``PYFUSION_TRITON_AUTOTUNE=0``
    (tests shrink the set to one so they do not time every config)."""
    if _interpreting() or os.environ.get("PYFUSION_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_O": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
    # Hopper (H100/H200, sm_90) tiles: 128 x 128/256 x 64 with 8 warps and 3-4 stages are the large-GEMM shapes of
    # the Triton matmul tutorial for sm_90; BLOCK_M = 16/32 cover batch 1-32 (the weight stream dominates there).
    # Not timed on a GPU in this session (none was available); the autotuner picks per (M, O, I, segments) key.
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 128, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bo, bk, w, s in shapes
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop row tiles much taller than the batch (BLOCK_M > 2 * next_pow2(M), keeping at least the smallest)."""
    m = int(named_args["M"])
    cap = max(16, 2 * triton.next_power_of_2(max(m, 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[-1:]


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        # torch's default (exact) GELU: 0.5 z (1 + erf(z / sqrt(2))) (Hendrycks & Gimpel 2016).
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _accumulate_range(
    acc,
    x_ptr,
    w_ptr,
    offs_m,
    mask_m,
    offs_o,
    mask_o,
    x_col,
    n,
    w_off,
    w_stride,
    stride_xm,
    stride_xk,
    DOT_IEEE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += x[offs_m, x_col : x_col + n] @ W[offs_o, :n]^T with W row r at w_ptr + w_off + r * w_stride."""
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_off + offs_o.to(tl.int64) * w_stride
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(0, n, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < n
        a = tl.load(
            x_rows + (x_col + kk)[None, :].to(tl.int64) * stride_xk, mask=mask_m[:, None] & mk[None, :], other=0.0
        )
        b = tl.load(w_ptr + w_rows[None, :] + kk[:, None], mask=mk[:, None] & mask_o[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(
    configs=autotune_configs(),
    key=["M", "O_TOTAL", "I_TOTAL", "NSEG"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _partial_linear_kernel(
    x_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    b_ptr,
    y_ptr,
    meta_ptr,
    M,
    O_TOTAL,
    I_TOTAL,
    NSEG,
    RANGE_BASE,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yo,
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
    # Output tiles of all segments (the same count the launcher's grid used).
    tiles_o = pid * 0
    for s in range(0, NSEG):
        o_sz = tl.load(meta_ptr + s * 4)
        tiles_o += (o_sz + BLOCK_O - 1) // BLOCK_O
    # Grouped order: GROUP_M row tiles sweep the output tiles together.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tiles_o
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_o = (pid % in_group) // group_m

    # The segment that owns output tile pid_o.
    seg = pid * 0
    local = pid * 0
    t0 = pid * 0
    for s in range(0, NSEG):
        o_sz = tl.load(meta_ptr + s * 4)
        nt = (o_sz + BLOCK_O - 1) // BLOCK_O
        hit = (pid_o >= t0) & (pid_o < t0 + nt)
        seg = tl.where(hit, s, seg)
        local = tl.where(hit, pid_o - t0, local)
        t0 += nt
    o_size = tl.load(meta_ptr + seg * 4)
    o_start = tl.load(meta_ptr + seg * 4 + 1)
    r_begin = tl.load(meta_ptr + seg * 4 + 2)
    r_end = tl.load(meta_ptr + seg * 4 + 3)

    offs_o = local * BLOCK_O + tl.arange(0, BLOCK_O)  # row inside the segment
    mask_o = offs_o < o_size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r in range(r_begin, r_end):
        rp = meta_ptr + RANGE_BASE + r * 5
        x_col = tl.load(rp)
        n = tl.load(rp + 1)
        buf = tl.load(rp + 2)
        w_off = tl.load(rp + 3)
        w_stride = tl.load(rp + 4)
        # One loop per weight buffer; two of the three have a zero trip count (no branch in the loop bodies).
        acc = _accumulate_range(acc, x_ptr, w0_ptr, offs_m, mask_m, offs_o, mask_o, x_col, tl.where(buf == 0, n, 0),
                                w_off, w_stride, stride_xm, stride_xk, DOT_IEEE, BLOCK_K)  # fmt: skip
        acc = _accumulate_range(acc, x_ptr, w1_ptr, offs_m, mask_m, offs_o, mask_o, x_col, tl.where(buf == 1, n, 0),
                                w_off, w_stride, stride_xm, stride_xk, DOT_IEEE, BLOCK_K)  # fmt: skip
        acc = _accumulate_range(acc, x_ptr, w2_ptr, offs_m, mask_m, offs_o, mask_o, x_col, tl.where(buf == 2, n, 0),
                                w_off, w_stride, stride_xm, stride_xk, DOT_IEEE, BLOCK_K)  # fmt: skip

    cols = o_start + offs_o
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=mask_o, other=0.0).to(tl.float32)
        acc += bias[None, :]
    acc = _activation(acc, ACT)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Tables and launchers
# ----------------------------------------------------------------------------------------------------------------


def _table(segs: list[tuple[int, int, list[tuple[int, int, int, int, int]]]], device) -> torch.Tensor:
    """int64 [segments (out_size, out_start, first_range, end_range) | ranges (x_col, n, buf, w_off, w_stride)]."""
    seg_rows, range_rows = [], []
    for o_size, o_start, ranges in segs:
        seg_rows += [o_size, o_start, len(range_rows) // RANGE_FIELDS, len(range_rows) // RANGE_FIELDS + len(ranges)]
        for rg in ranges:
            range_rows += list(rg)
    return torch.tensor(seg_rows + range_rows, dtype=torch.int64, device=device)


def segment_meta(in_layout: Sequence[int], out_layout: Sequence[int], device: torch.device) -> torch.Tensor:
    """Range table of the 3-buffer format for layouts ``[shared, branch_1, ..., branch_K]`` (int64, on device).

    Shared outputs: one range over all I_total columns of ``w_shared`` (buffer 0, row stride I_total). Branch k
    outputs: the shared columns from ``w_cross`` (buffer 1, rows c0.., stride I_s), then branch k's columns from its
    ``w_diag`` block (buffer 2, offset d0, stride I_k).
    """
    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    i_s, i_total = il[0], sum(il)
    segs = [(ol[0], 0, [(0, i_total, 0, 0, i_total)] if i_total else [])]
    o_start, i0, c0, d0 = ol[0], i_s, 0, 0
    for o_k, i_k in zip(ol[1:], il[1:]):
        ranges = []
        if i_s:
            ranges.append((0, i_s, 1, c0 * i_s, i_s))
        if i_k:
            ranges.append((i0, i_k, 2, d0, i_k))
        segs.append((o_k, o_start, ranges))
        o_start, i0, c0, d0 = o_start + o_k, i0 + i_k, c0 + o_k, d0 + o_k * i_k
    return _table(segs, device)


@dataclass(frozen=True)
class MaskedMeta:
    """Range table of the masked-segment format plus the host-side sizes the launcher needs."""

    table: torch.Tensor
    out_sizes: tuple[int, ...]
    k_of_out: tuple[int, ...]  # allowed input columns of each output segment
    i_total: int
    storage_size: int  # elements of the flat weight buffer


def masked_segment_meta(
    in_sizes: Sequence[int],
    in_masks: Sequence[int],
    out_sizes: Sequence[int],
    out_masks: Sequence[int],
    device: torch.device,
) -> MaskedMeta:
    """Range table of the masked-segment storage format (csrc/partial_linear/panel_linear.h).

    Output segment o reads input segment i iff ``out_masks[o] & in_masks[i] != 0``; its rows (O_o, K_o) on the
    allowed columns (adjacent allowed segments merged into one range) start at ``sum_{o' < o} O_o' K_o'`` in the flat
    buffer (buffer 0, row stride K_o).

    Raises:
        ValueError: mismatched lengths, negative sizes or a zero mask on a non-empty segment.
    """
    sr = masked_ranges(in_sizes, in_masks, out_sizes, out_masks)
    segs = []
    for o, (o_size, o_start) in enumerate(zip(sr.out_sizes, sr.out_starts)):
        k_o, off = sr.k_of_out[o], sr.offsets[o]
        segs.append((o_size, o_start, [(col, n, 0, off + q, k_o) for col, n, q in sr.ranges[o]]))
    return MaskedMeta(_table(segs, device), sr.out_sizes, sr.k_of_out, sr.i_total, sr.offsets[-1])


def _launch(x2, w0, w1, w2, bias, y, table, out_sizes, i_total, activation, launcher):
    M = x2.shape[0]
    nseg = len(out_sizes)
    if M == 0 or sum(out_sizes) == 0:
        return y
    kernel = _partial_linear_kernel if launcher is None else launcher(_partial_linear_kernel)

    def grid(meta_params):
        bo, bm = meta_params["BLOCK_O"], meta_params["BLOCK_M"]
        return (sum(triton.cdiv(o, bo) for o in out_sizes) * triton.cdiv(M, bm),)

    kernel[grid](
        x2, w0, w1, w2, bias if bias is not None else y, y, table,
        M, sum(out_sizes), i_total, nseg, nseg * SEG_FIELDS,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        # float32 follows torch's matmul setting: full-precision products unless TF32 is allowed.
        DOT_IEEE=x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
    )  # fmt: skip
    return y


def partial_linear_fwd(
    x2: torch.Tensor,
    w_shared: torch.Tensor,
    w_cross: torch.Tensor,
    w_diag: torch.Tensor,
    bias: torch.Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
    meta: torch.Tensor,
    launcher=None,
) -> torch.Tensor:
    """The 3-buffer format: 2-D ``x2`` (M, I_total) (any strides) -> (M, O_total) contiguous, in x2's dtype.

    Args:
        w_shared, w_cross, w_diag: contiguous blocks (see the module docstring), x2's dtype and device.
        meta: :func:`segment_meta` of the layouts, on x2's device.
        launcher: ``torch.library.wrap_triton`` inside a ``triton_op`` (so torch.compile sees the kernel), or None
            to launch directly (tests, interpreter).
    """
    M = x2.shape[0]
    y = torch.empty((M, sum(out_layout)), dtype=x2.dtype, device=x2.device)

    # Empty blocks may have no storage; hand the kernel a valid pointer that no range reads.
    def ptr(t: torch.Tensor) -> torch.Tensor:
        return t if t.numel() > 0 else y

    return _launch(x2, ptr(w_shared), ptr(w_cross), ptr(w_diag), bias, y, meta, list(out_layout), sum(in_layout),
                   activation, launcher)  # fmt: skip


def partial_linear_segments_fwd(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    meta: MaskedMeta,
    activation: str,
    launcher=None,
) -> torch.Tensor:
    """The masked-segment storage format: ``weight`` flat (meta.storage_size,), x2 (M, I_total) -> (M, O_total).

    Raises:
        ValueError: if the weight or x2 do not have the sizes the table describes.
    """
    if weight.dim() != 1 or weight.numel() != meta.storage_size:
        raise ValueError(
            f"weight must be flat with {meta.storage_size} elements (the masked-segment storage format); got shape "
            f"{tuple(weight.shape)}"
        )
    if x2.dim() != 2 or x2.shape[1] != meta.i_total:
        raise ValueError(f"x2 must have shape (M, {meta.i_total}); got {tuple(x2.shape)}")
    M = x2.shape[0]
    y = torch.empty((M, sum(meta.out_sizes)), dtype=x2.dtype, device=x2.device)
    w = weight if weight.numel() > 0 else y
    return _launch(x2, w, w, w, bias, y, meta.table, list(meta.out_sizes), meta.i_total, activation, launcher)
