"""``pyfusion::partial_linear``: a partially fused linear layer at a cost proportional to its effective FLOPs.

Layouts (DESIGN §7). ``in_layout = [I_s, I_1, ..., I_K]`` splits the input columns and
``out_layout = [O_s, O_1, ..., O_K]`` the output rows into ``[shared | branch_1 | ... | branch_K]``
(K >= 1; any size may be 0). Shared outputs read every input segment; branch k outputs read the shared
input and branch k's input only. The dense equivalent ``W`` (O_total, I_total) is zero elsewhere.

Packed weight (``weight_blocks``, three tensors, only the allowed blocks stored):

* ``w_shared`` (O_s, I_total): the shared output rows, all input columns;
* ``w_cross``  (O_B, I_s), O_B = O_1 + ... + O_K: every branch output row, shared input columns
  (branches stacked in order);
* ``w_diag``   (sum_k O_k * I_k,): branch k's own block ``W[o_k, i_k]`` of shape (O_k, I_k), row-major,
  the K blocks concatenated (one flat buffer; block k starts at ``sum_{j<k} O_j * I_j``).

This split lets each backend address every GEMM operand as a view of the packed buffers (no per-call
weight copy):

* CPU (torch's BLAS): ``y[:, shared] = x @ w_shared^T`` (one GEMM over the whole input, no slicing),
  ``y[:, branches] = x[:, shared] @ w_cross^T`` (one GEMM from the shared input to every branch output),
  then ``y[:, branch_k] += x[:, branch_k] @ W_kk^T`` for all k as one ``baddbmm`` when the branches have
  equal sizes and >= 8 rows (a loop of ``addmm_`` otherwise). All three write into views of one preallocated output.
* CPU, small batches (<= ``CPP_MAX_ROWS`` rows, float32/float64, no autograd): the compiled kernel
  (csrc/partial_linear/, backend "cpp") computes every block, the bias and the activation in one call from
  data pointers, GEMV-style (AVX-512/AVX2 FMA), removing the per-call Python cost of the BLAS path's views.
* GPU: one Triton launch (:mod:`pyfusion.triton_kernels.partial_linear`), a grouped GEMM whose K-loop
  visits only the allowed input segments, bias and activation fused in the epilogue.

``y = act(x @ W^T + b)`` with ``act`` in ``none | relu | gelu | silu`` (GELU is torch's default, exact
erf form). Effective FLOPs per row: ``2 * (O_s * I_total + O_B * I_s + sum_k O_k * I_k)``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op, wrap_triton

from pyfusion import _ext, backends
from pyfusion.dispatch import Backend, Dispatcher

__all__ = [
    "ACTIVATIONS",
    "partial_linear",
    "pack_partial_weight",
    "unpack_partial_weight",
    "partial_linear_flops",
    "partial_linear_params",
    "validate_layouts",
]

ACTIVATIONS = ("none", "relu", "gelu", "silu")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------------------


def validate_layouts(in_layout: Sequence[int], out_layout: Sequence[int]) -> tuple[list[int], list[int]]:
    """Check two layouts ``[shared, branch_1, ..., branch_K]`` and return them as lists of ints.

    Raises:
        ValueError: naming the argument, when a layout has fewer than 2 entries, a negative entry, or the
            two layouts have different numbers of branches.
    """
    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    for name, lay in (("in_layout", il), ("out_layout", ol)):
        if len(lay) < 2:
            raise ValueError(f"{name} must be [shared, branch_1, ..., branch_K] with K >= 1; got {lay}")
        if any(v < 0 for v in lay):
            raise ValueError(f"{name} sizes must be >= 0; got {lay}")
    if len(il) != len(ol):
        raise ValueError(
            f"in_layout and out_layout must have the same number of branches; got in_layout={il} "
            f"({len(il) - 1} branches) and out_layout={ol} ({len(ol) - 1} branches)"
        )
    return il, ol


def block_shapes(in_layout: Sequence[int], out_layout: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Expected shapes of ``(w_shared, w_cross, w_diag)``."""
    i_s, o_s = in_layout[0], out_layout[0]
    o_b = sum(out_layout[1:])
    n_diag = sum(o * i for o, i in zip(out_layout[1:], in_layout[1:]))
    return (o_s, sum(in_layout)), (o_b, i_s), (n_diag,)


def partial_linear_params(in_layout: Sequence[int], out_layout: Sequence[int], bias: bool = True) -> int:
    """Number of stored (effective) weights and biases."""
    n = sum(int(torch.Size(s).numel()) for s in block_shapes(in_layout, out_layout))
    return n + (sum(out_layout) if bias else 0)


def partial_linear_flops(in_layout: Sequence[int], out_layout: Sequence[int], rows: int) -> int:
    """Effective multiply-add FLOPs ``2 * rows * (stored weights)`` of one forward (bias/activation ignored)."""
    return 2 * int(rows) * partial_linear_params(in_layout, out_layout, bias=False)


def pack_partial_weight(
    weight: Tensor, in_layout: Sequence[int], out_layout: Sequence[int], *, check_zero: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense (O_total, I_total) weight -> packed ``(w_shared, w_cross, w_diag)`` (copies).

    Raises:
        ValueError: if ``weight`` has the wrong shape, or (``check_zero``) a skipped block (branch k output,
            branch j != k input) holds a non-zero entry.
    """
    il, ol = validate_layouts(in_layout, out_layout)
    if weight.dim() != 2 or tuple(weight.shape) != (sum(ol), sum(il)):
        raise ValueError(
            f"weight must have shape (sum(out_layout), sum(in_layout)) = {(sum(ol), sum(il))}; "
            f"got {tuple(weight.shape)}"
        )
    io = [0]
    oo = [0]
    for i, o in zip(il, ol):
        io.append(io[-1] + i)
        oo.append(oo[-1] + o)
    if check_zero:
        for k in range(1, len(ol)):
            for j in range(1, len(il)):
                if j == k:
                    continue
                blk = weight[oo[k] : oo[k + 1], io[j] : io[j + 1]]
                if blk.numel() and bool((blk != 0).any()):
                    nz = int((blk != 0).sum())
                    raise ValueError(
                        f"weight block (output branch {k}, input branch {j}) = weight[{oo[k]}:{oo[k + 1]}, "
                        f"{io[j]}:{io[j + 1]}] must be zero for this layout (branches read only shared and "
                        f"their own inputs); it has {nz} non-zero entries (max |w| = {blk.abs().max().item():.3g})"
                    )
    w_shared = weight[: oo[1]].clone().contiguous()
    w_cross = weight[oo[1] :, : io[1]].clone().contiguous()
    diag = [weight[oo[k] : oo[k + 1], io[k] : io[k + 1]].reshape(-1) for k in range(1, len(ol))]
    w_diag = torch.cat(diag) if diag else weight.new_zeros(0)
    return w_shared, w_cross, w_diag.contiguous()


def unpack_partial_weight(
    w_shared: Tensor, w_cross: Tensor, w_diag: Tensor, in_layout: Sequence[int], out_layout: Sequence[int]
) -> Tensor:
    """Packed blocks -> the dense (O_total, I_total) weight with zero blocks (differentiable)."""
    il, ol = validate_layouts(in_layout, out_layout)
    i_s, o_s = il[0], ol[0]
    rows = [w_shared]
    d = 0
    i_tot = sum(il)
    for k in range(1, len(ol)):
        o_k, i_k = ol[k], il[k]
        before = sum(il[1:k])
        after = i_tot - i_s - before - i_k
        c0 = sum(ol[1:k])
        blk = w_diag[d : d + o_k * i_k].reshape(o_k, i_k)
        d += o_k * i_k
        rows.append(
            torch.cat(
                [w_cross[c0 : c0 + o_k], w_shared.new_zeros(o_k, before), blk, w_shared.new_zeros(o_k, after)],
                dim=1,
            )
        )
    del o_s
    return torch.cat(rows, dim=0)


def _check_args(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(
            f"x must be a tensor of shape (..., I_total); got {type(x).__name__} {getattr(x, 'shape', '')}"
        )
    if x.shape[-1] != sum(in_layout):
        raise ValueError(
            f"x.shape[-1] must equal sum(in_layout) = {sum(in_layout)} (in_layout={list(in_layout)}); "
            f"got x.shape={tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16/float64; got dtype {x.dtype}")
    names = ("w_shared (weight_blocks[0])", "w_cross (weight_blocks[1])", "w_diag (weight_blocks[2])")
    for name, w, shape in zip(names, (w_shared, w_cross, w_diag), block_shapes(in_layout, out_layout)):
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for in_layout={list(in_layout)}, out_layout={list(out_layout)}; "
                f"got {tuple(w.shape)}"
            )
        if w.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}; got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {w.device}")
    if bias is not None:
        if tuple(bias.shape) != (sum(out_layout),):
            raise ValueError(f"bias must have shape (sum(out_layout),) = ({sum(out_layout)},); got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must match x's dtype/device ({x.dtype}, {x.device}); got ({bias.dtype}, {bias.device})"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None; got {activation!r}")


# ----------------------------------------------------------------------------------------------------------
# CPU / generic torch implementation (torch's BLAS), and the activation helpers
# ----------------------------------------------------------------------------------------------------------


def _apply_activation_(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return y.relu_()
    if activation == "gelu":
        return F.gelu(y)
    if activation == "silu":
        return F.silu(y, inplace=True)
    return y


def _activation(y: Tensor, activation: str) -> Tensor:
    fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}.get(activation)
    return y if fn is None else fn(y)


def _uniform_branches(in_layout: Sequence[int], out_layout: Sequence[int]) -> bool:
    return len(set(in_layout[1:])) == 1 and len(set(out_layout[1:])) == 1


# Below this many rows the branch blocks run as a loop of addmm_ (GEMV) instead of one baddbmm: torch's CPU
# bmm opens an OpenMP region even for M = 1; measured with 2 threads on the loaded 2-core VM (load ~12),
# ViT-S branches (K=2, 384->1536): M=1 baddbmm 23 ms vs loop 0.43 ms; M=8 both 0.27 ms.
_BMM_MIN_ROWS = 8


def _torch_forward_2d(
    x2: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
) -> Tensor:
    """Pre-activation ``x2 @ W^T + b`` for 2-D x2 (M, I_total) -> (M, O_total): three BLAS calls into views
    of one output; reads x2 in place (column slices are strided views, never copies)."""
    m = x2.shape[0]
    i_s, o_s = in_layout[0], out_layout[0]
    o_tot = sum(out_layout)
    kb = len(out_layout) - 1
    y = x2.new_empty((m, o_tot))
    if o_s > 0:
        ys = y[:, :o_s]
        if bias is not None:
            torch.addmm(bias[:o_s], x2, w_shared.t(), out=ys)
        else:
            torch.mm(x2, w_shared.t(), out=ys)
    if o_tot == o_s:
        return y
    yb = y[:, o_s:]
    if i_s > 0:
        if bias is not None:
            torch.addmm(bias[o_s:], x2[:, :i_s], w_cross.t(), out=yb)
        else:
            torch.mm(x2[:, :i_s], w_cross.t(), out=yb)
        beta = 1.0
    elif bias is not None:
        yb.copy_(bias[o_s:].expand_as(yb))
        beta = 1.0
    else:
        beta = 0.0  # baddbmm/addmm with beta=0 ignore the uninitialised output
    if sum(in_layout[1:]) == 0:
        if beta == 0.0:
            yb.zero_()
        return y
    if m >= _BMM_MIN_ROWS and _uniform_branches(in_layout, out_layout):
        o_b, i_b = out_layout[1], in_layout[1]
        # (K, M, I_b), (K, M, O_b) and (K, I_b, O_b) views; one as_strided each (unflatten + transpose costs
        # ~7 us per view in eager mode, as much as a batch-1 GEMM of a 100x100 block).
        sm, sk = x2.stride()
        xb = x2.as_strided((kb, m, i_b), (i_b * sk, sm, sk), x2.storage_offset() + i_s * sk)
        yv = y.as_strided((kb, m, o_b), (o_b, o_tot, 1), o_s)
        wt = w_diag.as_strided((kb, i_b, o_b), (o_b * i_b, 1, i_b), w_diag.storage_offset())
        yv.baddbmm_(xb, wt, beta=beta)
        return y
    i0, o0, d0 = i_s, 0, 0
    for k in range(1, kb + 1):
        o_k, i_k = out_layout[k], in_layout[k]
        if o_k > 0:
            yk = yb[:, o0 : o0 + o_k]
            if i_k > 0:
                yk.addmm_(x2[:, i0 : i0 + i_k], w_diag[d0 : d0 + o_k * i_k].view(o_k, i_k).t(), beta=beta)
            elif beta == 0.0:
                yk.zero_()
        i0, o0, d0 = i0 + i_k, o0 + o_k, d0 + o_k * i_k
    return y


def _functional_forward_2d(
    x2: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
) -> Tensor:
    """Same result as :func:`_torch_forward_2d` without in-place writes into views: the form traced for
    torch.compile (functionalization cannot replay in-place ``baddbmm_`` into transposed output views)."""
    m = x2.shape[0]
    i_s, o_s = in_layout[0], out_layout[0]
    o_b = sum(out_layout[1:])
    kb = len(out_layout) - 1
    parts = []
    if o_s > 0:
        parts.append(F.linear(x2, w_shared, None if bias is None else bias[:o_s]))
    if o_b > 0:
        yb = F.linear(x2[:, :i_s], w_cross, None if bias is None else bias[o_s:])
        if sum(in_layout[1:]) > 0:
            if _uniform_branches(in_layout, out_layout):
                o_k, i_k = out_layout[1], in_layout[1]
                xb = x2[:, i_s:].unflatten(1, (kb, i_k)).transpose(0, 1)
                zb = torch.bmm(xb, w_diag.view(kb, o_k, i_k).transpose(1, 2)).transpose(0, 1).reshape(m, o_b)
            else:
                zs, i0, d0 = [], i_s, 0
                for o_k, i_k in zip(out_layout[1:], in_layout[1:]):
                    zs.append(F.linear(x2[:, i0 : i0 + i_k], w_diag[d0 : d0 + o_k * i_k].view(o_k, i_k)))
                    i0, d0 = i0 + i_k, d0 + o_k * i_k
                zb = torch.cat(zs, dim=1)
            yb = yb + zb
        parts.append(yb)
    if not parts:
        return x2.new_zeros((m, 0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _flatten(x: Tensor) -> Tensor:
    # A view for 2-D inputs of any strides and for contiguous N-D inputs; only N-D inputs whose leading
    # dims cannot be merged are copied (torch.reshape semantics).
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _torch_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
    functional: bool = False,
) -> Tensor:
    fwd = _functional_forward_2d if functional else _torch_forward_2d
    y = fwd(_flatten(x), w_shared, w_cross, w_diag, bias, in_layout, out_layout)
    y = _apply_activation_(y, activation) if not functional else _activation(y, activation)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


@functools.cache
def _triton_module():
    from pyfusion.triton_kernels import partial_linear as mod

    return mod


def _triton_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
    launcher=None,
) -> Tensor:
    mod = _triton_module()
    meta = mod.segment_meta(in_layout, out_layout, x.device)
    y = mod.partial_linear_fwd(
        _flatten(x),
        w_shared.contiguous(),
        w_cross.contiguous(),
        w_diag.contiguous(),
        bias,
        in_layout,
        out_layout,
        activation,
        meta,
        launcher=launcher,
    )
    return y.view(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------


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
    """x (..., I_total) -> (..., O_total). CUDA: one Triton launch; other devices: torch's BLAS path."""
    # triton_op also traces this body for torch.compile (and under FakeTensorMode): on a CUDA device with
    # Triton the kernel launch is recorded with wrap_triton, elsewhere the BLAS path is traced.
    if x.device.type == "cuda" and x.dtype in _TRITON_DTYPES and not backends.triton_gpu_reasons():
        return _triton_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, wrap_triton)
    return _torch_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, functional=True)


@_partial_linear_op.register_kernel("cpu")
def _partial_linear_cpu(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
    return _torch_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)


@_partial_linear_op.register_fake
def _partial_linear_fake(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
    torch._check(x.shape[-1] == sum(in_layout), lambda: "x.shape[-1] must equal sum(in_layout)")
    torch._check(w_shared.dtype == x.dtype and w_cross.dtype == x.dtype and w_diag.dtype == x.dtype)
    # Same result as the real kernels: a fresh contiguous (..., O_total) tensor in x's dtype.
    return x.new_empty((*x.shape[:-1], sum(out_layout)))


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
    x2 = _flatten(x)
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


_partial_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Backends and the public wrapper
# ----------------------------------------------------------------------------------------------------------


# Small-batch CPU path: the compiled kernel (csrc/partial_linear/) computes every block, the bias and the
# activation in one call from data pointers. It replaces up to three BLAS calls, their output views and the
# activation (~15-25 us of Python and dispatch at batch 1, more than the GEMVs of a 512-wide layer).
# Up to this many rows (after flattening the leading dims) it is chosen over the BLAS path. Measured with
# bench/bench_partial_linear_batch1.py --crossover (alpha .5, K=2, 1 thread, 2-core AMD EPYC VM, load ~7),
# median us cpp / BLAS path at rows 1, 8, 12, 16, 32: MNIST 100x100 3.8/24, 8.8/22, 12/24, 15/25, 26/31;
# VGG fc 512 21/51, 76/124, 111/156, 173/189, 458/322; ViT-S 384->1536 47/87, 176/247, 262/323, 351/402,
# 1094/771; BERT 768->3072 210/357, 1301/3146, 6249/3280, 6867/6535, 13292/8131. At 8 rows the kernel won
# on every shape (1.4-2.5x), from 12-16 rows the BLAS GEMM (cache blocking) catches up on the large layers.
CPP_MAX_ROWS = 8
_CPP_DTYPES = (torch.float32, torch.float64)
_ACT_IDS = {a: i for i, a in enumerate(ACTIVATIONS)}  # the kernel's codes: 0 none, 1 relu, 2 gelu, 3 silu


def _rows(x: Tensor) -> int:
    """Number of rows of x flattened to (rows, I_total)."""
    if x.dim() == 2:
        return x.shape[0]
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


def _cpp_available() -> list[str]:
    why = backends.cpp_reasons()
    if not why and not hasattr(_ext._C, "PartialLinearPlan"):
        why = ["the compiled extension predates the partial_linear kernel; rebuild it (tools/dev_build.sh)"]
    return why


def _cpp_supports(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the compiled kernel runs on CPU tensors")
    if x.dtype not in _CPP_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float64")
    rows = _rows(x)
    if rows > CPP_MAX_ROWS:
        why.append(f"{rows} rows > CPP_MAX_ROWS = {CPP_MAX_ROWS} (torch's BLAS is faster on larger batches)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_shared, w_cross, w_diag, bias)):
        why.append("autograd is recording (a tensor requires grad): the kernel is forward-only, use 'torch'")
    return why


@functools.lru_cache(maxsize=256)
def _cpp_plan(in_layout: tuple[int, ...], out_layout: tuple[int, ...], activation: str):
    """The compiled kernel's per-layout plan (segment offsets, work size), built once per layout.

    ``PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS`` (read when a plan is built) overrides the work size from
    which the kernel runs OpenMP threads (default ``pyfusion._C.PARTIAL_LINEAR_PARALLEL_MIN_MACS``).
    """
    plan = _ext._C.PartialLinearPlan(list(in_layout), list(out_layout), _ACT_IDS[activation])
    override = os.environ.get("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "").strip()
    if override:
        try:
            plan.parallel_min_macs = int(override)
        except ValueError:
            raise ValueError(
                f"PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS must be an integer; got {override!r}"
            ) from None
    return plan


def _cpp_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
) -> Tensor:
    """Forward through the compiled small-batch kernel (CPU, float32/float64, no autograd).

    Pointers are read at every call (never cached): parameters replaced, moved with ``.to()`` or updated in
    place are always seen. x needs a unit column stride (any row stride); other inputs and non-contiguous
    weights are copied first (rare: parameters are contiguous).
    """
    x2 = _flatten(x)
    m, i_total = x2.shape
    sm, sk = x2.stride()
    if sk != 1 and i_total > 1:
        x2 = x2.contiguous()
        sm = i_total
    if not (w_shared.is_contiguous() and w_cross.is_contiguous() and w_diag.is_contiguous()):
        w_shared, w_cross, w_diag = w_shared.contiguous(), w_cross.contiguous(), w_diag.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    plan = _cpp_plan(tuple(in_layout), tuple(out_layout), activation)
    y = x2.new_empty(m, plan.o_total)  # fresh and contiguous; ~0.3 us cheaper than torch.empty(size, dtype=)
    try:
        ptrs = (w_shared.data_ptr(), w_cross.data_ptr(), w_diag.data_ptr(), 0 if bias is None else bias.data_ptr())
        px, py = x2.data_ptr(), y.data_ptr()
    except RuntimeError:
        # Tensors without storage that still report a CPU device (FakeTensor, torch.func's vmap/grad wrappers):
        # the functional BLAS form (no out= / in-place writes, which vmap has no batching rules for).
        return _torch_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, functional=True)
    run = plan.forward_f32 if x.dtype == torch.float32 else plan.forward_f64
    run(px, m, sm, *ptrs, py, torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.o_total)


def _call_op(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
    return torch.ops.pyfusion.partial_linear(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)


def _triton_supports(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> list[str]:
    why = []
    if x.device.type != "cuda":
        why.append(f"x is on {x.device}, the compiled Triton kernel needs a CUDA tensor")
    if x.dtype not in _TRITON_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float16/bfloat16")
    return why


def _torch_supports(x, *args) -> list[str]:
    return [] if x.device.type != "cuda" else ["CUDA inputs go to the Triton kernel when Triton can run"]


def _interp_available() -> list[str]:
    return backends.triton_interpreter_reasons()


def _interp_supports(x, *args) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append("the Triton interpreter runs on CPU tensors")
    if x.dtype not in (torch.float32, torch.float16):
        why.append(f"the Triton interpreter supports float32/float16 here, not {x.dtype}")
    if x.requires_grad or any(t is not None and t.requires_grad for t in args[:4]):
        why.append("the interpreter launch is forward-only (no autograd); use the 'torch' backend for training")
    return why


def _interp_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
    return _triton_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)


def _reference_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation):
    from pyfusion.ops.reference import partial_linear_ref

    return partial_linear_ref(x, [w_shared, w_cross, w_diag], bias, in_layout, out_layout, activation).to(x.dtype)


DISPATCHER = Dispatcher(
    "partial_linear",
    [
        Backend(
            "triton",
            _call_op,
            available=backends.triton_gpu_reasons,
            supports=_triton_supports,
            description="pyfusion::partial_linear on CUDA: one Triton grouped-GEMM launch, fused bias+activation",
        ),
        Backend(
            "cpp",
            _cpp_forward,
            available=_cpp_available,
            supports=_cpp_supports,
            description=f"compiled small-batch kernel (<= {CPP_MAX_ROWS} rows, float32/64, CPU, inference): "
            "all blocks + bias + activation in one call",
        ),
        Backend(
            "torch",
            _call_op,
            supports=_torch_supports,
            description="pyfusion::partial_linear CPU kernel: 3 BLAS calls (addmm, addmm, baddbmm) into output views",
        ),
        Backend(
            "reference",
            _reference_fn,
            description="float64 dense matrix with zero blocks (ops.reference.partial_linear_ref)",
        ),
        Backend(
            "triton_interpret",
            _interp_fn,
            available=_interp_available,
            supports=_interp_supports,
            description="the Triton kernel in the CPU interpreter (TRITON_INTERPRET=1; tests only, forward only)",
        ),
    ],
)


def partial_linear(
    x: Tensor,
    weight_blocks: Sequence[Tensor],
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str | None = None,
) -> Tensor:
    """Partially fused linear layer ``y = act(x @ W^T + b)`` with block-sparse ``W`` (DESIGN §7).

    Args:
        x: (..., I_total) float32/float16/bfloat16/float64, any strides.
        weight_blocks: ``(w_shared (O_s, I_total), w_cross (O_B, I_s), w_diag (sum_k O_k I_k,))``, see the
            module docstring (:func:`pack_partial_weight` builds them from a dense matrix).
        bias: (O_total,) or None.
        in_layout: ``[I_s, I_1, ..., I_K]``, K >= 1, sizes >= 0, summing to ``x.shape[-1]``.
        out_layout: ``[O_s, O_1, ..., O_K]`` with the same K.
        activation: None/"none", "relu", "gelu" (exact erf), "silu"; applied in the epilogue.

    Returns:
        (..., O_total) in x's dtype. Differentiable in x, the blocks and the bias; gradients exist only for
        the stored blocks.

    Raises:
        ValueError: naming the argument (layout sums, block shapes, dtypes, activation).
        pyfusion.dispatch.NoBackendError: if ``PYFUSION_BACKEND`` forces a backend that declines.
    """
    il, ol = validate_layouts(in_layout, out_layout)
    act = "none" if activation is None else activation
    if not isinstance(weight_blocks, (list, tuple)) or len(weight_blocks) != 3:
        raise ValueError(
            "weight_blocks must be a sequence (w_shared, w_cross, w_diag) of 3 tensors; got "
            f"{type(weight_blocks).__name__} of length {len(weight_blocks) if hasattr(weight_blocks, '__len__') else '?'}"  # noqa: E501
        )
    w_shared, w_cross, w_diag = weight_blocks
    _check_args(x, w_shared, w_cross, w_diag, bias, il, ol, act)
    return _run(x, w_shared, w_cross, w_diag, bias, il, ol, act)


# Backend choice per (device type, dtype, autograd needed, rows <= CPP_MAX_ROWS, PYFUSION_BACKEND): the row
# count is the only size any backend's reasons depend on, so the choice is cached (the dispatcher's checks
# cost ~6 us a call, a GEMV of a 100x100 layer ~3 us).
_SELECTED: dict[tuple, Backend] = {}

# os.environ.get costs ~0.5-1 us (key encoding, Mapping machinery); os.environ's own backing dict, which every
# os.environ write (monkeypatch.setenv included) updates, answers in ~50 ns. Only used as a cache key.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("PYFUSION_BACKEND") if hasattr(os.environ, "encodekey") else None


def _forced_env() -> object:
    if isinstance(_ENV_DATA, dict) and _ENV_KEY is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("PYFUSION_BACKEND")


def _run(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    il: list[int],
    ol: list[int],
    act: str,
) -> Tensor:
    """Dispatch validated arguments."""
    if torch.compiler.is_compiling():
        # Under torch.compile the op itself picks the device path (Triton on CUDA, BLAS elsewhere); the
        # Python dispatcher (env lookups, cached probes) stays out of the traced graph.
        return torch.ops.pyfusion.partial_linear(x, w_shared, w_cross, w_diag, bias, il, ol, act)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or w_shared.requires_grad
        or w_cross.requires_grad
        or w_diag.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    # x.is_cpu and x.shape[0] cost ~50 ns; x.device.type ~400 ns (a device object), _rows ~250 ns.
    small = (x.shape[0] if x.dim() == 2 else _rows(x)) <= CPP_MAX_ROWS
    key = ("cpu" if x.is_cpu else x.device.type, x.dtype, needs_grad, small, _forced_env())
    backend = _SELECTED.get(key)
    if backend is None:
        backend = DISPATCHER.select(x, w_shared, w_cross, w_diag, bias, il, ol, act)
        _SELECTED[key] = backend
    if backend.name == "torch" and not needs_grad:
        # Eager inference: call the registered CPU kernel directly. Going through torch.ops adds the Python
        # custom-op dispatch (~20-30 us per call measured here), as much as a small layer's GEMMs.
        return _torch_forward(x, w_shared, w_cross, w_diag, bias, il, ol, act)
    return backend.fn(x, w_shared, w_cross, w_diag, bias, il, ol, act)


def partial_linear_module_forward(
    x: Tensor,
    weight_blocks: Sequence[Tensor],
    bias: Tensor | None,
    in_layout: list[int],
    out_layout: list[int],
    activation: str,
) -> Tensor:
    """:func:`partial_linear` for pyfusion.nn modules, whose layouts and block shapes were validated when
    the module was built (``load_state_dict`` keeps the shapes): only x is checked here."""
    w_shared, w_cross, w_diag = weight_blocks
    if x.dim() < 1 or x.shape[-1] != w_shared.shape[1]:
        raise ValueError(
            f"x.shape[-1] must equal sum(in_layout) = {sum(in_layout)} (in_layout={list(in_layout)}); "
            f"got x.shape={tuple(x.shape)}"
        )
    # get_device() is an int (-1 on CPU): cheaper than building two torch.device objects (~1 us a call).
    if x.dtype != w_shared.dtype or x.get_device() != w_shared.get_device():
        raise ValueError(
            f"x must have the module's dtype and device ({w_shared.dtype}, {w_shared.device}); "
            f"got ({x.dtype}, {x.device})"
        )
    return _run(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)
