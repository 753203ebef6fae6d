"""``torch.library`` registration of ``pyfusion::partial_linear`` (a ``triton_op``), its fake kernel and autograd.

Registered on first need (:class:`pyfusion.ops._registry.LazyOp`): creating a ``triton_op`` imports
``torch._inductor`` and triton. The op's body calls the one dispatcher (:mod:`.backends`): traced by
torch.compile it records the Triton launch through ``wrap_triton`` on CUDA and the functional torch form
elsewhere; the CPU kernel calls the same dispatcher on real tensors (in-place BLAS). Inside the op the
forward-only backends (the compiled small-batch kernel, the interpreter) decline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion.ops._registry import LazyOp
from pyfusion.ops.partial_linear.backends import DISPATCHER, flatten, op_context

__all__ = ["OP"]


def _register() -> None:
    from torch.library import triton_op

    @triton_op("pyfusion::partial_linear", mutates_args=())
    def _partial_linear_op(
        x: Tensor,
        w_shared: Tensor,
        w_cross: Tensor,
        w_diag: Tensor,
        bias: Tensor | None,
        in_layout: list[int],
        out_layout: list[int],
        activation: str,
    ) -> Tensor:
        """x (..., I_total) -> (..., O_total); see :func:`pyfusion.ops.partial_linear`."""
        # triton_op traces this body for torch.compile (and under FakeTensorMode): functional forms only.
        with op_context(traceable=True):
            return DISPATCHER(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)

    # Real CPU tensors: the in-place BLAS forms. CUDA (and every other device) runs the body, as triton_op
    # launches it eagerly: with wrap_triton switched off, so the Triton kernel is launched directly.
    @_partial_linear_op.register_kernel("cpu")
    def _partial_linear_cpu(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
        with op_context(traceable=False):
            return DISPATCHER(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)

    @_partial_linear_op.register_fake
    def _partial_linear_fake(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
        torch._check(x.shape[-1] == sum(in_layout), lambda: "x.shape[-1] must equal sum(in_layout)")
        torch._check(w_shared.dtype == x.dtype and w_cross.dtype == x.dtype and w_diag.dtype == x.dtype)
        # Same result as the real kernels: a fresh contiguous (..., O_total) tensor in x's dtype.
        return x.new_empty((*x.shape[:-1], sum(out_layout)))

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
    x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation = inputs
    ctx.in_layout, ctx.out_layout, ctx.activation = list(in_layout), list(out_layout), activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w_shared, w_cross, w_diag, bias, output if activation == "relu" else None)


def _backward(ctx, grad_y: Tensor):
    """Gradients of the stored blocks only; the zero blocks are never built.

    With g = dL/dz (z the pre-activation) flattened to (M, O_total):
    ``dx = g_s @ w_shared``, ``dx[:, shared] += g_B @ w_cross``, ``dx[:, branch_k] += g_k @ W_kk``;
    ``dw_shared = g_s^T x``, ``dw_cross = g_B^T x[:, shared]``, ``dW_kk = g_k^T x[:, branch_k]``, ``db = sum g``.
    GELU/SiLU recompute z with one extra forward (the op returns only act(z)); ReLU uses the output.
    """
    x, w_shared, w_cross, w_diag, bias, y_saved = ctx.saved_tensors
    il, ol, act = ctx.in_layout, ctx.out_layout, ctx.activation
    i_s, o_s, kb = il[0], ol[0], len(ol) - 1
    x2 = flatten(x)
    g = grad_y.reshape(-1, grad_y.shape[-1])
    if act == "relu":
        g = g * (y_saved.reshape(g.shape) > 0).to(g.dtype)
    elif act != "none":
        z = torch.ops.pyfusion.partial_linear(x, w_shared, w_cross, w_diag, bias, il, ol, "none")
        g = g * _activation_grad(z.reshape(g.shape), act)
    g_s, g_b = g[:, :o_s], g[:, o_s:]
    gx = gws = gwc = gwd = gbias = None
    need_x, need_ws, need_wc, need_wd, need_b = ctx.needs_input_grad[:5]
    if need_x:
        gx = g_s @ w_shared if o_s > 0 else x2.new_zeros(x2.shape)
        if i_s > 0 and g_b.shape[1] > 0:
            gx[:, :i_s] += g_b @ w_cross
        i0, o0, d0 = i_s, 0, 0
        for k in range(1, kb + 1):
            o_k, i_k = ol[k], il[k]
            if o_k > 0 and i_k > 0:
                gx[:, i0 : i0 + i_k] += g_b[:, o0 : o0 + o_k] @ w_diag[d0 : d0 + o_k * i_k].view(o_k, i_k)
            i0, o0, d0 = i0 + i_k, o0 + o_k, d0 + o_k * i_k
        gx = gx.reshape(x.shape)
    if need_ws:
        gws = g_s.t() @ x2
    if need_wc:
        gwc = g_b.t() @ x2[:, :i_s]
    if need_wd:
        parts = []
        i0, o0 = i_s, 0
        for k in range(1, kb + 1):
            o_k, i_k = ol[k], il[k]
            parts.append((g_b[:, o0 : o0 + o_k].t() @ x2[:, i0 : i0 + i_k]).reshape(-1))
            i0, o0 = i0 + i_k, o0 + o_k
        gwd = torch.cat(parts) if parts else w_diag.new_zeros(0)
    if need_b and ctx.has_bias:
        gbias = g.sum(0)
    return gx, gws, gwc, gwd, gbias, None, None, None


OP = LazyOp("partial_linear", DISPATCHER, _register, differentiable=True)
