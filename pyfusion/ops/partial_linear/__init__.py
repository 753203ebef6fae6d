"""``pyfusion::partial_linear``: a partially fused linear layer at a cost proportional to its effective FLOPs.

``y = act(x @ W^T + b)`` with ``W`` block-sparse by the layouts ``[shared | branch_1 | ... | branch_K]``
(DESIGN §7; layouts and packed weights: :mod:`pyfusion.ops.layout`). Modules:

* :mod:`.backends`: the implementations (Triton on CUDA, the compiled small-batch kernel, torch's BLAS, the
  float64 reference, the Triton interpreter) and their dispatcher;
* :mod:`.registration`: the ``torch.library`` op (``triton_op``, fake kernel, autograd), registered on first need;
* this module: the validated public function :func:`partial_linear` and the modules' entry point.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion.ops._registry import is_jit_tracing
from pyfusion.ops.layout import (
    ACTIVATIONS,
    block_shapes,
    pack_partial_weight,
    partial_linear_flops,
    partial_linear_params,
    unpack_partial_weight,
    validate_layouts,
)
from pyfusion.ops.partial_linear import backends as _backends
from pyfusion.ops.partial_linear.backends import CPP_MAX_ROWS, DISPATCHER, FLOAT_DTYPES
from pyfusion.ops.partial_linear.registration import OP

__all__ = [
    "ACTIVATIONS",
    "CPP_MAX_ROWS",
    "DISPATCHER",
    "OP",
    "block_shapes",
    "pack_partial_weight",
    "partial_linear",
    "partial_linear_flops",
    "partial_linear_module_forward",
    "partial_linear_params",
    "unpack_partial_weight",
    "validate_layouts",
]


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
    if x.dtype not in FLOAT_DTYPES:
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
        weight_blocks: ``(w_shared (O_s, I_total), w_cross (O_B, I_s), w_diag (sum_k O_k I_k,))``, see
            :mod:`pyfusion.ops.layout` (:func:`pack_partial_weight` builds them from a dense matrix).
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


def _rows_small(x: Tensor) -> bool:
    """Whether x flattened to (rows, I_total) has at most ``backends.CPP_MAX_ROWS`` rows (read from the backends
    module, where the cpp backend reads it: a benchmark may change it; x.shape[0] costs ~50 ns)."""
    if x.dim() == 2:
        return x.shape[0] <= _backends.CPP_MAX_ROWS
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n <= _backends.CPP_MAX_ROWS


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
    """Run validated arguments: :meth:`LazyOp.__call__ <pyfusion.ops._registry.LazyOp.__call__>`'s rule, inlined
    (batch-1 layers cost 3-4 us, so every microsecond of Python shows), with the backend choice cached.

    Under ``torch.jit.trace`` the registered op runs (and is what the trace records): the eager backends depend on
    the batch size (the compiled small-batch kernel writes through data pointers the tracer cannot see, the BLAS
    path's strided views bake the row count in), so a trace of them is wrong at every other batch size.
    """
    if is_jit_tracing():
        return OP.op()(x, w_shared, w_cross, w_diag, bias, il, ol, act)
    return _run_eager(x, w_shared, w_cross, w_diag, bias, il, ol, act)


def _run_eager(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    il: list[int],
    ol: list[int],
    act: str,
) -> Tensor:
    """:func:`_run` when not tracing."""
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
        return OP(x, w_shared, w_cross, w_diag, bias, il, ol, act)
    # The backends' reasons depend on the device, the dtype and (cpp) whether rows <= CPP_MAX_ROWS only, so the
    # choice is cached by those (and PYFUSION_BACKEND): the dispatcher's checks cost ~6 us a call, a GEMV of a
    # 100x100 layer ~3 us. x.is_cpu costs ~50 ns, x.device.type ~400 ns (a device object).
    key = ("cpu" if x.is_cpu else x.device.type, x.dtype, _rows_small(x))
    backend = DISPATCHER.select_cached(key, x, w_shared, w_cross, w_diag, bias, il, ol, act)
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
    if is_jit_tracing():
        return _traced_module_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)
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
    return _run_eager(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)


def _traced_module_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: list[int],
    out_layout: list[int],
    activation: str,
) -> Tensor:
    """The module forward under ``torch.jit.trace``: the same input checks (with the tracer's warnings about reading
    sizes silenced: the feature size is fixed by the weights), then the registered op, which the trace records with
    its layouts as constants, so the trace is correct at every batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if x.dim() < 1 or x.shape[-1] != w_shared.shape[1]:
            raise ValueError(
                f"x.shape[-1] must equal sum(in_layout) = {sum(in_layout)} (in_layout={list(in_layout)}); "
                f"got x.shape={tuple(x.shape)}"
            )
    if x.dtype != w_shared.dtype or x.device != w_shared.device:
        raise ValueError(
            f"x must have the module's dtype and device ({w_shared.dtype}, {w_shared.device}); "
            f"got ({x.dtype}, {x.device})"
        )
    return OP.op()(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)
