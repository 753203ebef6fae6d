"""``pyfusion::partial_conv2d``: a partially fused 2-D convolution at a cost proportional to its effective FLOPs.

The layouts ``[shared | branch_1 | ... | branch_K]`` split the input and output channels (DESIGN §7; layouts
and packed weights: :mod:`pyfusion.ops.layout`, with the kernel taps trailing). Modules:

* :mod:`.backends`: the implementations (torch: shared-input conv + grouped conv over the branches; the float64
  reference) and their dispatcher;
* :mod:`.registration`: the ``torch.library`` op (``custom_op``, fake kernel, autograd), registered on first need;
* this module: the validated public function :func:`partial_conv2d` and :class:`pyfusion.nn.PartialConv2d`'s
  entry point.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion.ops._registry import is_jit_tracing
from pyfusion.ops.layout import validate_layouts
from pyfusion.ops.partial_conv2d.backends import DISPATCHER, FLOAT_DTYPES
from pyfusion.ops.partial_conv2d.registration import OP

__all__ = ["DISPATCHER", "OP", "conv_block_shapes", "partial_conv2d", "partial_conv2d_module_forward"]


def conv_block_shapes(
    in_layout: Sequence[int], out_layout: Sequence[int], kernel_size: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    """Shapes of ``(w_shared, w_cross, w_diag)`` of a convolution with kernel (kh, kw)."""
    kh, kw = (int(k) for k in kernel_size)
    o_s, i_s = out_layout[0], in_layout[0]
    n_diag = sum(o * i for o, i in zip(out_layout[1:], in_layout[1:]))
    return (o_s, sum(in_layout), kh, kw), (sum(out_layout[1:]), i_s, kh, kw), (n_diag * kh * kw,)


def _pair(name: str, v: int | Sequence[int], low: int) -> list[int]:
    pair = [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
    if len(pair) != 2 or any(t < low for t in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {low}; got {v!r}")
    return pair


def _check_args(x, w_shared, w_cross, w_diag, bias, il, ol) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != sum(il):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (N, sum(in_layout) = {sum(il)}, H, W) (in_layout={il}); got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16/float64; got dtype {x.dtype}")
    if not isinstance(w_shared, Tensor) or w_shared.dim() != 4:
        shape = tuple(getattr(w_shared, "shape", ()))
        raise ValueError(f"w_shared (weight_blocks[0]) must have shape (O_s, I_total, kh, kw); got {shape}")
    kernel = tuple(w_shared.shape[2:])
    names = ("w_shared (weight_blocks[0])", "w_cross (weight_blocks[1])", "w_diag (weight_blocks[2])")
    for name, w, shape in zip(names, (w_shared, w_cross, w_diag), conv_block_shapes(il, ol, kernel)):
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for in_layout={il}, out_layout={ol}, kernel {kernel}; "
                f"got {tuple(w.shape)}"
            )
        if w.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}; got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {w.device}")
    if bias is not None:
        if tuple(bias.shape) != (sum(ol),):
            raise ValueError(f"bias must have shape (sum(out_layout),) = ({sum(ol)},); got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must match x's dtype/device ({x.dtype}, {x.device}); got ({bias.dtype}, {bias.device})"
            )


def partial_conv2d(
    x: Tensor,
    weight_blocks: Sequence[Tensor],
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """Partially fused convolution ``y = conv2d(x, W) + b`` with ``W`` zero outside the allowed blocks (DESIGN §7).

    .. math:: y[:, o] = b_o + \\sum_{i \\in \\text{allowed}(o)} W_{o i} \\star x[:, i]

    where a shared output channel reads every input channel and a branch-k output channel reads the shared and
    branch-k input channels.

    Args:
        x: (N, I_total, H, W) float32/float16/bfloat16/float64.
        weight_blocks: ``(w_shared (O_s, I_total, kh, kw), w_cross (O_B, I_s, kh, kw),
            w_diag (sum_k O_k I_k kh kw,))``: branch k's block (O_k, I_k, kh, kw) flattened, the K concatenated.
        bias: (O_total,) or None.
        in_layout: ``[I_s, I_1, ..., I_K]`` (K >= 1, sizes >= 0) of the input channels.
        out_layout: ``[O_s, O_1, ..., O_K]`` with the same K.
        stride, padding, dilation: as ``nn.Conv2d`` (an int or a pair; stride, dilation >= 1, padding >= 0).

    Returns:
        (N, O_total, H', W') in x's dtype, H' and W' as ``nn.Conv2d``. Differentiable in x, the blocks and the
        bias; gradients exist only for the stored blocks.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, layouts, conv parameters).
        pyfusion.dispatch.NoBackendError: if ``PYFUSION_BACKEND`` forces a backend that declines.
    """
    il, ol = validate_layouts(in_layout, out_layout)
    if not isinstance(weight_blocks, (list, tuple)) or len(weight_blocks) != 3:
        raise ValueError(
            "weight_blocks must be a sequence (w_shared, w_cross, w_diag) of 3 tensors; got "
            f"{type(weight_blocks).__name__}"
        )
    w_shared, w_cross, w_diag = weight_blocks
    _check_args(x, w_shared, w_cross, w_diag, bias, il, ol)
    st, pd, dl = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    return _run(x, w_shared, w_cross, w_diag, bias, il, ol, st, pd, dl)


def _run(x, w_shared, w_cross, w_diag, bias, il, ol, stride, padding, dilation) -> Tensor:
    """:meth:`LazyOp.__call__ <pyfusion.ops._registry.LazyOp.__call__>`'s rule with the backend choice cached by
    (device, dtype): no backend's reasons depend on anything else. Under ``torch.jit.trace`` the registered op runs
    and is recorded (as for ``partial_linear``: the eager path's shapes would be baked into the trace)."""
    args = (x, w_shared, w_cross, w_diag, bias, il, ol, stride, padding, dilation)
    if is_jit_tracing():
        return OP.op()(*args)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and (
            x.requires_grad
            or w_shared.requires_grad
            or w_cross.requires_grad
            or w_diag.requires_grad
            or (bias is not None and bias.requires_grad)
        )
    ):
        return OP(*args)
    backend = DISPATCHER.select_cached(("cpu" if x.is_cpu else x.device.type, x.dtype), *args)
    return backend.fn(*args)


def partial_conv2d_module_forward(
    x: Tensor,
    weight_blocks: Sequence[Tensor],
    bias: Tensor | None,
    in_layout: list[int],
    out_layout: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """:func:`partial_conv2d` for :class:`pyfusion.nn.PartialConv2d`, whose layouts, block shapes and conv
    parameters were validated when the module was built: only x is checked here."""
    w_shared, w_cross, w_diag = weight_blocks
    if is_jit_tracing():  # as partial_linear's: the checks without the tracer's size warnings, then the recorded op
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            bad = bool(x.dim() != 4 or x.shape[1] != w_shared.shape[1])
    else:
        bad = x.dim() != 4 or x.shape[1] != w_shared.shape[1]
    if bad:
        raise ValueError(
            f"x must have shape (N, {sum(in_layout)}, H, W) (in_layout={list(in_layout)}); got {tuple(x.shape)}"
        )
    if x.dtype != w_shared.dtype or x.get_device() != w_shared.get_device():
        raise ValueError(
            f"x must have the module's dtype and device ({w_shared.dtype}, {w_shared.device}); "
            f"got ({x.dtype}, {x.device})"
        )
    return _run(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, stride, padding, dilation)
