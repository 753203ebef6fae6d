"""``torch.library`` registration of ``pyfusion::partial_linear`` (a ``triton_op``), its fake kernel and autograd.

Schema: ``partial_linear(Tensor x, Tensor weight, Tensor? bias, int[] in_sizes, int[] in_masks, int[] out_sizes,
int[] out_masks, str activation) -> Tensor`` (segments as parallel size / member-mask lists; weight packed,
:mod:`pyfusion.ops.layout`).

Registered on first need (:class:`pyfusion.ops._registry.LazyOp`): creating a ``triton_op`` imports
``torch._inductor`` and triton. The op's body calls the one dispatcher (:mod:`.backends`): traced by torch.compile
it records the Triton launch through ``wrap_triton`` on CUDA and the functional torch form elsewhere; the CPU
kernel calls the same dispatcher on real tensors (in-place BLAS). Inside the op the forward-only backends (the
panel engine, the interpreter) decline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion.ops._registry import LazyOp
from pyfusion.ops.layout import SegmentPlan, segment_plan
from pyfusion.ops.partial_linear.backends import DISPATCHER, flatten, op_context

__all__ = ["OP", "plan_of"]


def plan_of(in_sizes, in_masks, out_sizes, out_masks) -> SegmentPlan:
    """The cached plan of the op's int lists."""
    ins = tuple((int(s), int(m)) for s, m in zip(in_sizes, in_masks))
    outs = tuple((int(s), int(m)) for s, m in zip(out_sizes, out_masks))
    return segment_plan(ins, outs)


def _register() -> None:
    from torch.library import triton_op

    @triton_op("pyfusion::partial_linear", mutates_args=())
    def _partial_linear_op(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        in_sizes: list[int],
        in_masks: list[int],
        out_sizes: list[int],
        out_masks: list[int],
        activation: str,
    ) -> Tensor:
        """x (..., I_total) -> (..., O_total); see :func:`pyfusion.ops.partial_linear`."""
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        # triton_op traces this body for torch.compile (and under FakeTensorMode): functional forms only.
        with op_context(traceable=True):
            return DISPATCHER(x, weight, bias, plan, activation)

    # Real CPU tensors: the in-place BLAS forms. CUDA (and every other device) runs the body, as triton_op
    # launches it eagerly: with wrap_triton switched off, so the Triton kernel is launched directly.
    @_partial_linear_op.register_kernel("cpu")
    def _partial_linear_cpu(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, activation):
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        with op_context(traceable=False):
            return DISPATCHER(x, weight, bias, plan, activation)

    @_partial_linear_op.register_fake
    def _partial_linear_fake(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, activation):
        plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
        torch._check(x.shape[-1] == plan.i_total, lambda: "x.shape[-1] must equal the input segments' total")
        torch._check(weight.dtype == x.dtype, lambda: "weight must have x's dtype")
        torch._check(weight.numel() == plan.stored, lambda: "weight must hold the stored blocks of the segments")
        # Same result as the real kernels: a fresh contiguous (..., O_total) tensor in x's dtype.
        return x.new_empty((*x.shape[:-1], plan.o_total))

    _partial_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _activation_grad(z: Tensor, activation: str) -> Tensor:
    """d act(z) / dz, elementwise (z is the pre-activation)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        # d/dz [z Phi(z)] = Phi(z) + z phi(z)
        phi = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * phi
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    return torch.ones_like(z)


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, activation = inputs
    ctx.segments = (list(in_sizes), list(in_masks), list(out_sizes), list(out_masks))
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output if activation == "relu" else None)


def linear_backward(
    x2: Tensor, weight: Tensor, g: Tensor, plan: SegmentPlan, need_x: bool, need_w: bool, taps: int = 1
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the stored blocks only (the zero blocks are never built), for 2-D x2 (M, I_total * taps) and
    g = dL/dz (M, O_total): per output segment o and allowed range r, ``dx[:, r] += g_o @ W_o[:, r]`` and
    ``dW_o[:, r] = g_o^T x[:, r]``. ``taps`` scales the input columns (an unfolded convolution)."""
    gx = x2.new_zeros(x2.shape) if need_x else None
    gw_parts: list[Tensor] = []
    for o, ranges in enumerate(plan.ranges):
        n_o = plan.out_segments[o][0]
        if n_o == 0:
            continue
        k_o, off = plan.k_of_out[o] * taps, plan.offsets[o] * taps
        g_o = g[:, plan.out_starts[o] : plan.out_starts[o] + n_o]
        w_o = weight[off : off + n_o * k_o].view(n_o, k_o)
        for col, n, q in ranges:
            col, n, q = col * taps, n * taps, q * taps
            if gx is not None:
                gx[:, col : col + n] += g_o @ w_o[:, q : q + n]
        if need_w and ranges:
            blocks = [g_o.t() @ x2[:, col * taps : (col + n) * taps] for col, n, _q in ranges]
            gw_parts.append((blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)).reshape(-1))
    gw = None
    if need_w:
        gw = torch.cat(gw_parts) if gw_parts else weight.new_zeros(weight.shape)
    return gx, gw


def _backward(ctx, grad_y: Tensor):
    """``dx``, ``dW`` (the packed layout), ``db = sum g``. GELU/SiLU recompute z with one extra forward (the op
    returns only act(z)); ReLU uses the output."""
    x, weight, bias, y_saved = ctx.saved_tensors
    in_sizes, in_masks, out_sizes, out_masks = ctx.segments
    act = ctx.activation
    plan = plan_of(in_sizes, in_masks, out_sizes, out_masks)
    x2 = flatten(x)
    g = grad_y.reshape(-1, grad_y.shape[-1])
    if act == "relu":
        g = g * (y_saved.reshape(g.shape) > 0).to(g.dtype)
    elif act != "none":
        z = torch.ops.pyfusion.partial_linear(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, "none")
        g = g * _activation_grad(z.reshape(g.shape), act)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = linear_backward(x2, weight, g, plan, need_x, need_w)
    if gx is not None:
        gx = gx.reshape(x.shape)
    gbias = g.sum(0) if need_b and ctx.has_bias else None
    return gx, gw, gbias, None, None, None, None, None


def _dispatch_args(x, weight, bias, in_sizes, in_masks, out_sizes, out_masks, activation) -> tuple:
    return (x, weight, bias, plan_of(in_sizes, in_masks, out_sizes, out_masks), activation)


OP = LazyOp("partial_linear", DISPATCHER, _register, differentiable=True, dispatch_args=_dispatch_args)
