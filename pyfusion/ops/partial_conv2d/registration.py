"""``torch.library`` registration of ``pyfusion::partial_conv2d`` (a ``triton_op``), its fake kernel and autograd.

Schema: ``partial_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] in_sizes, int[] in_masks, int[] out_sizes,
int[] out_masks, int[] kernel_size, int[] stride, int[] padding, int[] dilation, str activation) -> Tensor``.

Registered on first need (:class:`pyfusion.ops._registry.LazyOp`). The body calls the one dispatcher
(:mod:`.backends`); the backward computes the gradients of the stored blocks only, one
``aten.convolution_backward`` per allowed input range of each run of output segments (the zero blocks are never
built).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion.ops._registry import LazyOp
from pyfusion.ops.partial_conv2d.backends import DISPATCHER, ConvGeom, conv_out_hw, conv_runs
from pyfusion.ops.partial_linear.backends import op_context
from pyfusion.ops.partial_linear.registration import _activation_grad, plan_of

__all__ = ["OP", "geom_of"]


def geom_of(kernel_size, stride, padding, dilation) -> ConvGeom:
    def pair(v) -> tuple[int, int]:
        return int(v[0]), int(v[1])

    return ConvGeom(pair(kernel_size), pair(stride), pair(padding), pair(dilation))


def _register() -> None:
    from torch.library import triton_op

    @triton_op("pyfusion::partial_conv2d", mutates_args=())
    def _partial_conv2d_op(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        in_sizes: list[int],
        in_masks: list[int],
        out_sizes: list[int],
        out_masks: list[int],
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        activation: str,
    ) -> Tensor:
        """x (N, I_total, H, W) -> (N, O_total, H', W'); see :func:`pyfusion.ops.partial_conv2d`."""
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        geom = geom_of(kernel_size, stride, padding, dilation)
        with op_context(traceable=True):
            return DISPATCHER(x, weight, bias, plan, geom, activation)

    @_partial_conv2d_op.register_kernel("cpu")
    def _partial_conv2d_cpu(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, kernel_size, stride, padding,
                            dilation, activation):  # fmt: skip
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        geom = geom_of(kernel_size, stride, padding, dilation)
        with op_context(traceable=False):
            return DISPATCHER(x, weight, bias, plan, geom, activation)

    @_partial_conv2d_op.register_fake
    def _partial_conv2d_fake(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, kernel_size, stride, padding,
                             dilation, activation):  # fmt: skip
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        torch._check(x.dim() == 4 and x.shape[1] == plan.i_total, lambda: "x must be (N, I_total, H, W)")
        torch._check(weight.dtype == x.dtype, lambda: "weight must have x's dtype")
        ho, wo = conv_out_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
        return x.new_empty((x.shape[0], plan.o_total, ho, wo))

    _partial_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, kernel_size, stride, padding, dilation,
     activation) = inputs  # fmt: skip
    ctx.segments = (list(in_sizes), list(in_masks), list(out_sizes), list(out_masks))
    ctx.geom = geom_of(kernel_size, stride, padding, dilation)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output if activation == "relu" else None)


def _backward(ctx, grad_y: Tensor):
    """Per run of output segments and per allowed input range, one ``convolution_backward`` of that block alone:
    its weight gradient (into the packed layout) and its contribution to dx; ``db = sum g`` over (N, H', W')."""
    x, weight, bias, y_saved = ctx.saved_tensors
    plan = plan_of(*ctx.segments)
    geom, act = ctx.geom, ctx.activation
    g = grad_y
    if act == "relu":
        g = g * (y_saved > 0).to(g.dtype)
    elif act != "none":
        z = torch.ops.pyfusion.partial_conv2d(x, weight, bias, *ctx.segments, list(geom.kernel), list(geom.stride),
                                              list(geom.padding), list(geom.dilation), "none")  # fmt: skip
        g = g * _activation_grad(z, act)
    g = g.contiguous()
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    kh, kw = geom.kernel
    taps = geom.taps
    gx = torch.zeros_like(x) if need_x else None
    gw = weight.new_zeros(weight.shape) if need_w else None
    runs, _idle = conv_runs(plan)
    for run in runs:
        g_r = g[:, run.o0 : run.o0 + run.n_out]
        w_r = weight[run.w_off * taps : (run.w_off + run.n_out * run.k_o) * taps].view(run.n_out, run.k_o, kh, kw)
        gw_r = (
            None
            if gw is None
            else gw[run.w_off * taps : (run.w_off + run.n_out * run.k_o) * taps].view(run.n_out, run.k_o, kh, kw)
        )
        q = 0
        for col, n in run.ranges:
            if x.shape[0] > 0 and (need_x or need_w):
                gi, gwb, _ = torch.ops.aten.convolution_backward(
                    g_r, x[:, col : col + n], w_r[:, q : q + n].contiguous(), None, list(geom.stride),
                    list(geom.padding), list(geom.dilation), False, [0, 0], 1, [need_x, need_w, False],
                )  # fmt: skip
                if need_x:
                    gx[:, col : col + n] += gi
                if need_w:
                    gw_r[:, q : q + n] = gwb
            q += n
    gbias = g.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    return gx, gw, gbias, None, None, None, None, None, None, None, None, None


def _dispatch_args(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, kernel_size, stride, padding,
                   dilation, activation) -> tuple:  # fmt: skip
    return (x, weight, bias, plan_of(in_sizes, in_masks, out_sizes, out_masks),
            geom_of(kernel_size, stride, padding, dilation), activation)  # fmt: skip


OP = LazyOp("partial_conv2d", DISPATCHER, _register, differentiable=True, dispatch_args=_dispatch_args)
