"""Triton grouped GEMM for a partially fused linear layer (DESIGN §7). Import as
``pyfusion.triton_kernels.partial_linear``.

One launch computes every output segment of ``y = act(x @ W^T + b)`` where ``W`` is block sparse in the
layout ``[shared | branch_1 | ... | branch_K]``: shared output rows read every input column, branch k rows
read the shared columns and branch k's columns. The packed weight (see
:mod:`pyfusion.ops.partial_linear`) is three buffers:

* ``w_shared`` (O_s, I_total): shared output rows, all input columns;
* ``w_cross``  (O_B, I_s): every branch output row, shared input columns (branches stacked in order);
* ``w_diag``   (sum_k O_k * I_k,): branch k's own block (O_k, I_k), row-major, blocks concatenated.

Program ids map to (output tile, batch tile): ``program_id(0)`` enumerates the output tiles of all
segments (segment s contributes ``cdiv(O_s, BLOCK_O)`` tiles), ``program_id(1)`` the tiles of the M
batch rows. The K-loop of a shared tile runs over all I_total input columns; a branch tile runs over the
I_s shared columns (``w_cross``) and then over its own I_k columns (``w_diag``), so skipped blocks are
never read. Bias and activation are fused in the epilogue; the accumulator is float32 for every input
dtype. Set ``TRITON_INTERPRET=1`` before importing this module to run it on CPU (tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATIONS", "autotune_configs", "partial_linear_fwd", "segment_meta"]

ACTIVATIONS: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
META_FIELDS = 5  # per segment: out_size, out_start, in_size, in_start, diag_offset


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def autotune_configs() -> list[triton.Config]:
    """The autotuned set. One small config under the interpreter or with ``PYFUSION_TRITON_AUTOTUNE=0``
    (tests shrink the set to one so they do not time every config in the interpreter)."""
    if _interpreting() or os.environ.get("PYFUSION_TRITON_AUTOTUNE", "1") == "0":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_O": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    # Standard Hopper/Ampere GEMM tiles (the triton matmul tutorial set, trimmed); BLOCK_M=16 serves batch 1-16.
    # Not tuned on a GPU in this session (none was available): the autotuner picks per (M, O, I) key.
    shapes = [
        (128, 128, 32, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (16, 128, 64, 4, 4),
        (16, 64, 128, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bo, bk, w, s in shapes
    ]


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


@triton.autotune(configs=autotune_configs(), key=["M", "O_TOTAL", "I_TOTAL", "NSEG"])
@triton.jit
def _partial_linear_fwd_kernel(
    x_ptr,
    ws_ptr,
    wc_ptr,
    wd_ptr,
    b_ptr,
    y_ptr,
    meta_ptr,
    M,
    O_TOTAL,
    I_TOTAL,
    I_SHARED,
    O_SHARED,
    NSEG,
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
):
    pid_o = tl.program_id(0)
    pid_m = tl.program_id(1)

    # Which segment owns output tile pid_o (segments are few: K + 1 <= a handful).
    seg = pid_o * 0
    local = pid_o * 0
    t0 = pid_o * 0
    for s in range(0, NSEG):
        o_sz = tl.load(meta_ptr + s * 5)
        nt = (o_sz + BLOCK_O - 1) // BLOCK_O
        hit = (pid_o >= t0) & (pid_o < t0 + nt)
        seg = tl.where(hit, s, seg)
        local = tl.where(hit, pid_o - t0, local)
        t0 += nt

    o_size = tl.load(meta_ptr + seg * 5)
    o_start = tl.load(meta_ptr + seg * 5 + 1)
    i_size = tl.load(meta_ptr + seg * 5 + 2)
    i_start = tl.load(meta_ptr + seg * 5 + 3)
    d_off = tl.load(meta_ptr + seg * 5 + 4)

    offs_o = local * BLOCK_O + tl.arange(0, BLOCK_O)  # row inside the segment
    mask_o = offs_o < o_size
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)

    if seg == 0:
        # Shared outputs: the K-loop visits every input column.
        w_rows = offs_o.to(tl.int64) * I_TOTAL
        for k0 in range(0, I_TOTAL, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < I_TOTAL
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=mask_m[:, None] & mk[None, :],
                other=0.0,
            )
            b = tl.load(ws_ptr + w_rows[None, :] + kk[:, None], mask=mk[:, None] & mask_o[None, :], other=0.0)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    else:
        # Branch outputs: shared input columns first (w_cross) ...
        c_rows = (o_start - O_SHARED + offs_o).to(tl.int64) * I_SHARED
        for k0 in range(0, I_SHARED, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < I_SHARED
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=mask_m[:, None] & mk[None, :],
                other=0.0,
            )
            b = tl.load(wc_ptr + c_rows[None, :] + kk[:, None], mask=mk[:, None] & mask_o[None, :], other=0.0)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        # ... then the branch's own input columns (w_diag block), never the other branches'.
        d_rows = d_off + offs_o.to(tl.int64) * i_size
        for k0 in range(0, i_size, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < i_size
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (i_start + kk)[None, :] * stride_xk,
                mask=mask_m[:, None] & mk[None, :],
                other=0.0,
            )
            b = tl.load(wd_ptr + d_rows[None, :] + kk[:, None], mask=mk[:, None] & mask_o[None, :], other=0.0)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)

    cols = o_start + offs_o
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=mask_o, other=0.0).to(tl.float32)
        acc += bias[None, :]
    acc = _activation(acc, ACT)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


def segment_meta(in_layout: Sequence[int], out_layout: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 table (NSEG * 5,): per segment ``out_size, out_start, in_size, in_start, diag_offset``."""
    rows: list[int] = []
    o_start, i_start, d_off = 0, 0, 0
    for s, (o, i) in enumerate(zip(out_layout, in_layout)):
        rows += [o, o_start, i, i_start, d_off if s > 0 else 0]
        if s > 0:
            d_off += o * i
        o_start += o
        i_start += i
    return torch.tensor(rows, dtype=torch.int32, device=device)


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
    """Launch the kernel on a 2-D input ``x2`` (M, I_total) (any strides) -> (M, O_total) in x2's dtype.

    Args:
        meta: :func:`segment_meta` of the layouts, on x2's device.
        launcher: ``torch.library.wrap_triton`` inside a ``triton_op`` (so torch.compile sees the
            kernel), or None to launch directly (tests, interpreter).
    """
    M = x2.shape[0]
    o_total, i_total = sum(out_layout), sum(in_layout)
    y = torch.empty((M, o_total), dtype=x2.dtype, device=x2.device)
    n_tiles_total = sum(1 for o in out_layout if o > 0)
    if M == 0 or n_tiles_total == 0:
        return y
    kernel = _partial_linear_fwd_kernel if launcher is None else launcher(_partial_linear_fwd_kernel)

    def grid(meta_params):
        bo, bm = meta_params["BLOCK_O"], meta_params["BLOCK_M"]
        return (sum(triton.cdiv(o, bo) for o in out_layout), triton.cdiv(M, bm))

    # Empty blocks (a zero-size segment) may have no storage; hand the kernel a valid pointer it never reads.
    def ptr(t: torch.Tensor | None) -> torch.Tensor:
        return t if t is not None and t.numel() > 0 else y

    kernel[grid](
        x2,
        ptr(w_shared),
        ptr(w_cross),
        ptr(w_diag),
        ptr(bias),
        y,
        meta,
        M,
        o_total,
        i_total,
        in_layout[0],
        out_layout[0],
        len(out_layout),
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        # float32 follows torch's matmul setting: full-precision products unless TF32 is allowed.
        DOT_IEEE=x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32,
    )
    return y
