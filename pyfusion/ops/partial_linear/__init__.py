"""``pyfusion::partial_linear``: a partially fused linear layer at a cost proportional to its effective FLOPs.

``y = act(x @ W^T + b)`` with ``W`` block sparse by member-mask segments (DESIGN §7; segments and the packed weight:
:mod:`pyfusion.ops.layout`). Modules:

* :mod:`.backends`: the implementations (Triton on CUDA, the CPU panel engine, torch's BLAS, the float64 reference,
  the Triton interpreter) and their dispatcher;
* :mod:`.registration`: the ``torch.library`` op (``triton_op``, fake kernel, autograd), registered on first need;
* this module: the validated public function :func:`partial_linear` and the modules' entry point.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from pyfusion.dispatch import forced_spec
from pyfusion.ops._registry import _C_IS_TRACING, is_jit_tracing
from pyfusion.ops._weight_cache import TrackedParameter
from pyfusion.ops.layout import (
    ACTIVATIONS,
    SegmentPlan,
    as_segments,
    check_operands,
    pack_segment_weight,
    segment_plan,
    segments_key,
    unpack_segment_weight,
)
from pyfusion.ops.partial_linear import backends as _backends
from pyfusion.ops.partial_linear.backends import DISPATCHER, FLOAT_DTYPES, cpp_max_rows
from pyfusion.ops.partial_linear.registration import OP

# Eager CPU inference in these dtypes runs the measured strategy choice (backends.cpu_inference_forward); the
# dispatcher's backends (PYFUSION_BACKEND, autograd, torch.compile, other devices and dtypes) otherwise (benchmarks
# set it to () to time the static path).
_TUNED_DTYPES = (torch.float32, torch.float64)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
# a cached weight becomes a TrackedParameter (pyfusion.ops._weight_cache): as plain as nn.Parameter for the fast path
_PLAIN = (Tensor, torch.nn.Parameter, TrackedParameter)
_hot_key, _hot_forward = _backends.hot_key, _backends.hot_forward
_tracing = _C_IS_TRACING if _C_IS_TRACING is not None else is_jit_tracing  # (is_jit_tracing's bool() costs 70 ns)
_ENV = "PYFUSION_BACKEND"
# forced_spec() reads os.environ.get, and even ``_ENV in os.environ`` costs ~2 us on the loaded VM when the variable
# is unset (os.environ's __contains__ raises and catches a KeyError), a fifth of a batch-1 call of a 100x100 layer.
# os.environ keeps its encoded copy in ``_data`` (updated by every os.environ assignment, monkeypatch.setenv
# included): a membership test there is a plain dict lookup (~50 ns).
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(_ENV)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another os.environ implementation
    _ENV_DATA, _ENV_KEY = os.environ, _ENV


def backend_unforced() -> bool:
    """True when ``PYFUSION_BACKEND`` forces no backend (unset or blank)."""
    return _ENV_KEY not in _ENV_DATA or forced_spec() is None


def _plain(x: Tensor, weight: Tensor) -> bool:
    """Real tensors with storage: not FakeTensors or other subclasses, not torch.func's vmap / grad wrappers (the
    strategies write into views of a new output, which those have no rules for)."""
    return type(x) in _PLAIN and type(weight) in _PLAIN and not (_is_wrapped(x) or _is_wrapped(weight))


__all__ = [
    "ACTIVATIONS",
    "DISPATCHER",
    "OP",
    "cpp_max_rows",
    "pack_segment_weight",
    "partial_linear",
    "partial_linear_flops",
    "partial_linear_module_forward",
    "unpack_segment_weight",
]


def partial_linear_flops(in_segments, out_segments, rows: int) -> int:
    """Effective multiply-add FLOPs ``2 * rows * (stored weights)`` of one forward (bias/activation ignored)."""
    plan = segment_plan(as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments"))
    return 2 * int(rows) * plan.stored


def _check_args(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(
            f"x must be a tensor of shape (..., I_total); got {type(x).__name__} {getattr(x, 'shape', '')}"
        )
    if x.shape[-1] != plan.i_total:
        raise ValueError(
            f"x.shape[-1] must equal the input segments' total {plan.i_total} (in_segments="
            f"{list(plan.in_segments)}); got x.shape={tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16/float64; got dtype {x.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() != plan.stored:
        raise ValueError(
            f"weight must be the packed flat weight of ({plan.stored},) stored entries for in_segments="
            f"{list(plan.in_segments)}, out_segments={list(plan.out_segments)} (pyfusion.ops.layout."
            f"pack_segment_weight builds it from a dense matrix); got {tuple(getattr(weight, 'shape', ()))}"
        )
    check_operands(x, weight, bias, plan.o_total, activation)


def partial_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_segments,
    out_segments,
    activation: str | None = None,
) -> Tensor:
    """Partially fused linear layer ``y = act(x @ W^T + b)`` with block-sparse ``W`` (DESIGN §7).

    .. math:: y[:, o] = act\\Big(b_o + \\sum_{i:\\ mask_o \\,\\&\\, mask_i \\ne 0} W_{oi}\\, x[:, i]\\Big)

    Args:
        x: (..., I_total) float32/float16/bfloat16/float64, any strides.
        weight: the packed flat weight (stored,) of :mod:`pyfusion.ops.layout` (``pack_segment_weight`` builds it
            from a dense matrix and checks the skipped blocks are zero).
        bias: (O_total,) or None.
        in_segments: ``[(size, member_mask), ...]`` of the input features, or a standard layout
            ``[I_s, I_1, ..., I_K]``.
        out_segments: the same for the outputs.
        activation: None/"none", "relu", "gelu" (exact erf), "silu"; applied in the epilogue.

    Returns:
        (..., O_total) in x's dtype. Differentiable in x, the weight and the bias (gradients of the stored blocks).

    Raises:
        ValueError: naming the argument (segments, sizes, dtypes, devices, activation).
        pyfusion.dispatch.NoBackendError: if ``PYFUSION_BACKEND`` forces a backend that declines.
    """
    ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
    plan = segment_plan(ins, outs)
    act = "none" if activation is None else activation
    _check_args(x, weight, bias, plan, act)
    return _run(x, weight, bias, plan, act)


def _op_args(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, act: str) -> tuple:
    (i_s, i_m), (o_s, o_m) = segments_key(plan.in_segments), segments_key(plan.out_segments)
    return (x, weight, bias, list(i_s), list(i_m), list(o_s), list(o_m), act)


def _run(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, act: str) -> Tensor:
    """Run validated arguments: :meth:`LazyOp.__call__ <pyfusion.ops._registry.LazyOp.__call__>`'s rule, inlined
    (batch-1 layers cost 3-4 us, so every microsecond of Python shows), with the backend choice cached.

    Under ``torch.jit.trace`` the registered op runs (and is what the trace records): the eager backends depend on
    the batch size (the panel engine writes through data pointers the tracer cannot see, the BLAS path's strided
    views bake the row count in), so a trace of them would be wrong at every other batch size.
    """
    if is_jit_tracing():
        return OP.op()(*_op_args(x, weight, bias, plan, act))
    return _run_untraced(x, weight, bias, plan, act)


def _run_untraced(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, act: str) -> Tensor:
    """:func:`_run` outside ``torch.jit.trace``."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return OP(*_op_args(x, weight, bias, plan, act))
    if x.is_cpu and x.dtype in _TUNED_DTYPES and _plain(x, weight) and backend_unforced():
        return _backends.cpu_inference_forward(x, weight, bias, plan, act)
    # The backends' reasons depend on the device, the dtype and (cpp) whether rows <= the crossover only, so the
    # choice is cached by those (and PYFUSION_BACKEND): the dispatcher's checks cost ~6 us a call, a GEMV of a
    # 100x100 layer ~3 us. x.is_cpu costs ~50 ns, x.device.type ~400 ns (a device object).
    small = _backends.rows_of(x) <= cpp_max_rows(plan)
    key = ("cpu" if x.is_cpu else x.device.type, x.dtype, small)
    backend = DISPATCHER.select_cached(key, x, weight, bias, plan, act)
    return backend.fn(x, weight, bias, plan, act)


def partial_linear_module_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str, hot: bool = True
) -> Tensor:
    """:func:`partial_linear` for pyfusion.nn modules, whose segments and weight size were validated when the
    module was built (``load_state_dict`` keeps the shapes): only x is checked here.

    The common case (eager CPU inference without autograd, a plain float32/64 tensor of the right width, no
    ``PYFUSION_BACKEND``) goes straight to the measured strategy after one flat chain of cheap tests (~1 us less
    than the general path's nested calls on the loaded VM); anything else (wrong input included) takes the general
    path below, which raises the precise errors.

    Before that chain, a call whose (weight, x.shape, x.dtype, activation, threads) already passed it and whose
    strategy is settled runs from one lookup (:func:`~pyfusion.ops.partial_linear.backends.hot_forward`: the dense
    strategy is then F.linear with the cached dense weight) after the tests the key cannot stand for: a plain CPU
    tensor x, no autograd, no torch.compile / jit tracing, no ``PYFUSION_BACKEND``. Measured at 2 threads, 512 -> 10
    K=2 alpha 0.5 batch 1 (the dense strategy; separate processes alternated, min of 4x3 repeats of 2000 calls, load
    ~2): the module call 8.4-9.1 -> 7.3-7.7 us, as fast as the dense zero-block nn.Linear (7.0-7.6 us; F.linear alone
    3.7-3.9 us: the rest is nn.Module.__call__). ``hot=False``: the weight is a new object at every call (a view
    made per call), which would never hit."""
    eager = (
        type(x) is Tensor
        and not _grad_enabled()
        and not _is_compiling()  # before the tracer test: dynamo reads this as True and stops here
        and not _tracing()
        and _ENV_KEY not in _ENV_DATA
        and x.is_cpu
        and not _is_wrapped(x)
    )
    key = None
    if eager and hot:
        key = _hot_key(x, weight, activation)
        y = _hot_forward(key, x, weight, bias, plan, activation)
        if y is not None:
            return y
    if (
        eager
        and x.dtype is weight.dtype
        and x.dtype in _TUNED_DTYPES
        and x.dim() >= 1
        and x.shape[-1] == plan.i_total
        and weight.is_cpu
        and type(weight) in _PLAIN
        and not _is_wrapped(weight)
    ):
        return _backends.cpu_inference_forward(x, weight, bias, plan, activation, key)
    tracing = is_jit_tracing()
    if tracing:  # the checks without the tracer's size warnings (the feature size is fixed by the weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            bad = bool(x.dim() < 1 or x.shape[-1] != plan.i_total)
    else:
        bad = x.dim() < 1 or x.shape[-1] != plan.i_total
    if bad:
        raise ValueError(
            f"x.shape[-1] must equal the input segments' total {plan.i_total} (in_segments="
            f"{list(plan.in_segments)}); got x.shape={tuple(x.shape)}"
        )
    # get_device() is an int (-1 on CPU): cheaper than building two torch.device objects (~1 us a call).
    if x.dtype != weight.dtype or x.get_device() != weight.get_device():
        raise ValueError(
            f"x must have the module's dtype and device ({weight.dtype}, {weight.device}); got ({x.dtype}, {x.device})"
        )
    if tracing:
        return OP.op()(*_op_args(x, weight, bias, plan, activation))
    return _run_untraced(x, weight, bias, plan, activation)
