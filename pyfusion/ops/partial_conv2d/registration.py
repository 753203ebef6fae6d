"""``torch.library`` registration of ``pyfusion::partial_conv2d`` (a ``custom_op``), its fake kernel and autograd.

Registered on first need (:class:`pyfusion.ops._registry.LazyOp`). The body calls the one dispatcher
(:mod:`.backends`); the backward computes the gradients of the stored blocks only, with one
``aten.convolution_backward`` per block (the zero blocks are never built).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion.ops._registry import LazyOp
from pyfusion.ops.layout import uniform_branches
from pyfusion.ops.partial_conv2d.backends import DISPATCHER, conv_out_hw

__all__ = ["OP"]


def _register() -> None:
    @torch.library.custom_op("pyfusion::partial_conv2d", mutates_args=())
    def _partial_conv2d_op(
        x: Tensor,
        w_shared: Tensor,
        w_cross: Tensor,
        w_diag: Tensor,
        bias: Tensor | None,
        in_layout: list[int],
        out_layout: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
    ) -> Tensor:
        """x (N, I_total, H, W) -> (N, O_total, H', W'); see :func:`pyfusion.ops.partial_conv2d`."""
        y = DISPATCHER(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, stride, padding, dilation)
        return y.contiguous()  # what the fake kernel promises (a channels-last input gives a channels-last conv)

    @_partial_conv2d_op.register_fake
    def _partial_conv2d_fake(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, stride, padding, dilation):
        torch._check(x.dim() == 4 and x.shape[1] == sum(in_layout), lambda: "x must be (N, sum(in_layout), H, W)")
        torch._check(w_shared.dtype == x.dtype and w_cross.dtype == x.dtype and w_diag.dtype == x.dtype)
        kernel = (w_cross.shape[2], w_cross.shape[3])
        ho, wo = conv_out_hw(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
        return x.new_empty((x.shape[0], sum(out_layout), ho, wo))

    _partial_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, stride, padding, dilation = inputs
    ctx.layouts = (list(in_layout), list(out_layout))
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w_shared, w_cross, w_diag)


def _backward(ctx, grad_y: Tensor):
    """With g = dL/dy split into g_s (shared outputs) and g_B (branch outputs): each stored block's weight
    gradient, and its contribution to dx, from one ``convolution_backward`` of that block alone:
    ``(w_shared; x, g_s)``, ``(w_cross; x[:, shared], g_B)``, ``(w_diag; x[:, branches], g_B)`` (grouped over the
    branches when they have equal sizes, else one per branch); ``db = sum g`` over (N, H', W')."""
    x, w_shared, w_cross, w_diag = ctx.saved_tensors
    il, ol = ctx.layouts
    stride, padding, dilation = ctx.conv
    i_s, o_s, kb = il[0], ol[0], len(ol) - 1
    kh, kw = int(w_cross.shape[2]), int(w_cross.shape[3])
    need_x, need_ws, need_wc, need_wd, need_b = ctx.needs_input_grad[:5]
    g = grad_y.contiguous()
    g_s, g_b = g[:, :o_s], g[:, o_s:]
    gx = torch.zeros_like(x) if need_x else None

    def block(gout: Tensor, c0: int, c1: int, w: Tensor, groups: int, need_w: bool) -> Tensor | None:
        """dL/dw of the block w reading input channels [c0, c1) (None unless need_w); adds its dL/dx into gx."""
        if w.numel() == 0 or x.shape[0] == 0 or not (need_x or need_w):
            return torch.zeros_like(w) if need_w else None
        gi, gw, _ = torch.ops.aten.convolution_backward(
            gout, x[:, c0:c1], w, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
        )
        if need_x:
            gx[:, c0:c1] += gi
        return gw

    gws = block(g_s, 0, sum(il), w_shared, 1, need_ws)
    gwc = block(g_b, 0, i_s, w_cross, 1, need_wc)
    o_b = sum(ol[1:])
    if uniform_branches(il, ol) and o_b > 0 and sum(il[1:]) > 0:
        gwd = block(g_b, i_s, sum(il), w_diag.view(o_b, il[1], kh, kw), kb, need_wd)
        gwd = None if gwd is None else gwd.reshape(-1)
    else:
        parts, i0, o0, d0 = [], i_s, 0, 0
        for o_k, i_k in zip(ol[1:], il[1:]):
            n = o_k * i_k * kh * kw
            w_k = w_diag[d0 : d0 + n].view(o_k, i_k, kh, kw)
            gw = block(g_b[:, o0 : o0 + o_k], i0, i0 + i_k, w_k, 1, need_wd)
            parts.append(None if gw is None else gw.reshape(-1))
            i0, o0, d0 = i0 + i_k, o0 + o_k, d0 + n
        gwd = torch.cat(parts) if need_wd and parts else (w_diag.new_zeros(0) if need_wd else None)
    gbias = g.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    return gx, gws, gwc, gwd, gbias, None, None, None, None, None


OP = LazyOp("partial_conv2d", DISPATCHER, _register, differentiable=True)
