"""Backends of ``pyfusion::partial_conv2d`` and its dispatcher (layouts: :mod:`pyfusion.ops.layout`, on channels).

``y = conv2d(x, W) + b`` with ``W`` (O_total, I_total, kh, kw) zero outside the allowed blocks (DESIGN §7):

* ``torch`` (any device): ``y[:, shared] = conv(x, w_shared)`` over all input channels, and
  ``y[:, branches] = conv(x[:, shared], w_cross) + grouped_conv(x[:, branches], w_diag, groups=K)`` (one grouped
  convolution when the branches have equal sizes, one convolution per branch otherwise);
* ``reference``: the float64 dense weight with zero blocks (:func:`pyfusion.ops.reference.partial_conv2d_ref`).

A Triton backend (implicit-GEMM over the allowed blocks) is to come; it will take its place before ``torch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops.layout import uniform_branches

__all__ = ["ARG_NAMES", "DISPATCHER", "FLOAT_DTYPES", "conv_out_hw", "torch_forward"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ARG_NAMES = (
    "x", "w_shared", "w_cross", "w_diag", "bias", "in_layout", "out_layout", "stride", "padding", "dilation",
)  # fmt: skip


def conv_out_hw(
    h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int]:
    """Output spatial size of a convolution (as ``nn.Conv2d``)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def torch_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Shared-input convolution + convolution from the shared input to the branches + grouped convolution over
    the branches, x (N, I_total, H, W) -> (N, O_total, H', W')."""
    il, ol = in_layout, out_layout
    i_s, o_s, kb = il[0], ol[0], len(ol) - 1
    kh, kw = int(w_cross.shape[2]), int(w_cross.shape[3])

    def conv(inp: Tensor, w: Tensor, b: Tensor | None, groups: int = 1) -> Tensor:
        return F.conv2d(inp, w, b, stride, padding, dilation, groups)

    def zeros(channels: int) -> Tensor:
        ho, wo = conv_out_hw(x.shape[2], x.shape[3], (kh, kw), stride, padding, dilation)
        return x.new_zeros(x.shape[0], channels, ho, wo)

    outs = []
    if o_s > 0:
        outs.append(conv(x, w_shared, None if bias is None else bias[:o_s]))
    o_b = sum(ol[1:])
    if o_b > 0:
        b_b = None if bias is None else bias[o_s:]
        y_b = conv(x[:, :i_s], w_cross, b_b) if i_s > 0 else None
        if sum(il[1:]) > 0:
            xb = x[:, i_s:]
            if uniform_branches(il, ol):
                z = conv(xb, w_diag.view(o_b, il[1], kh, kw), b_b if y_b is None else None, groups=kb)
            else:
                parts, i0, d0 = [], 0, 0
                for o_k, i_k in zip(ol[1:], il[1:]):
                    n = o_k * i_k * kh * kw
                    if i_k > 0 and o_k > 0:
                        parts.append(conv(xb[:, i0 : i0 + i_k], w_diag[d0 : d0 + n].view(o_k, i_k, kh, kw), None))
                    else:
                        parts.append(zeros(o_k))
                    i0, d0 = i0 + i_k, d0 + n
                z = torch.cat(parts, dim=1)
                if y_b is None and b_b is not None:
                    z = z + b_b.view(1, -1, 1, 1)
            y_b = z if y_b is None else y_b + z
        elif y_b is None:
            y_b = zeros(o_b) if b_b is None else zeros(o_b) + b_b.view(1, -1, 1, 1)
        outs.append(y_b)
    if not outs:
        return zeros(0)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _reference_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, stride, padding, dilation) -> Tensor:
    from pyfusion.ops.reference import partial_conv2d_ref

    blocks = [w_shared, w_cross, w_diag]
    return partial_conv2d_ref(x, blocks, bias, in_layout, out_layout, stride, padding, dilation).to(x.dtype)


DISPATCHER = Dispatcher(
    "partial_conv2d",
    [
        Backend(
            "torch",
            torch_forward,
            description="shared-input conv + conv from the shared input + grouped conv over the branches, any device",
        ),
        Backend(
            "reference",
            _reference_fn,
            description="float64 dense weight with zero blocks (ops.reference.partial_conv2d_ref)",
        ),
    ],
    arg_names=ARG_NAMES,
)
