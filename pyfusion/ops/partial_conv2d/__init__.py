"""``pyfusion::partial_conv2d``: a partially fused 2-D convolution at a cost proportional to its effective FLOPs.

Member-mask segments split the input and output channels (DESIGN §7; segments and the packed weight:
:mod:`pyfusion.ops.layout`, ``W_o`` stored as (O_o, K_o, kh, kw)). Modules:

* :mod:`.backends`: the implementations (Triton implicit GEMM on CUDA; torch: one convolution per run of output
  segments over its gathered input channels; the float64 reference) and their dispatcher;
* :mod:`.registration`: the ``torch.library`` op (``triton_op``, fake kernel, autograd), registered on first need;
* this module: the validated public function :func:`partial_conv2d` and :class:`pyfusion.nn.PartialConv2d`'s
  entry point.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion.ops._registry import is_jit_tracing
from pyfusion.ops.layout import SegmentPlan, as_segments, check_operands, segment_plan, segments_key
from pyfusion.ops.partial_conv2d import backends as _backends
from pyfusion.ops.partial_conv2d.backends import DISPATCHER, FLOAT_DTYPES, ConvGeom
from pyfusion.ops.partial_conv2d.registration import OP
from pyfusion.ops.partial_linear import (
    _ENV_DATA,
    _ENV_KEY,
    _PLAIN,
    _grad_enabled,
    _is_compiling,
    _is_wrapped,
    _plain,
    _tracing,
    backend_unforced,
)

# Eager CPU inference in these dtypes runs the measured strategy choice (backends.cpu_inference_forward); the
# dispatcher's backends otherwise (benchmarks set it to () to time the static path).
_TUNED_DTYPES = (torch.float32, torch.float64)
_hot_key, _hot_forward = _backends.hot_key, _backends.hot_forward

__all__ = ["DISPATCHER", "OP", "ConvGeom", "conv_geom", "partial_conv2d", "partial_conv2d_module_forward"]


def _pair(name: str, v: int | Sequence[int], low: int) -> tuple[int, int]:
    pair = [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]
    if len(pair) != 2 or any(t < low for t in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {low}; got {v!r}")
    return pair[0], pair[1]


def conv_geom(kernel_size, stride=1, padding=0, dilation=1) -> ConvGeom:
    """Validated :class:`ConvGeom` (kernel >= 1, stride >= 1, padding >= 0, dilation >= 1).

    Raises:
        ValueError: naming the argument.
    """
    return ConvGeom(
        _pair("kernel_size", kernel_size, 1),
        _pair("stride", stride, 1),
        _pair("padding", padding, 0),
        _pair("dilation", dilation, 1),
    )


def _check_args(x, weight, bias, plan: SegmentPlan, geom: ConvGeom, act: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != plan.i_total:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must have shape (N, I_total = {plan.i_total}, H, W) (in_segments={list(plan.in_segments)}); got {shape}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16/float64; got dtype {x.dtype}")
    want = plan.stored * geom.taps
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() != want:
        raise ValueError(
            f"weight must be the packed flat weight of ({want},) entries (stored blocks x {geom.taps} taps) for "
            f"in_segments={list(plan.in_segments)}, out_segments={list(plan.out_segments)}, kernel "
            f"{geom.kernel}; got {tuple(getattr(weight, 'shape', ()))}"
        )
    check_operands(x, weight, bias, plan.o_total, act)


def partial_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_segments,
    out_segments,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    activation: str | None = None,
) -> Tensor:
    """Partially fused convolution ``y = act(conv2d(x, W) + b)`` with ``W`` zero outside the allowed blocks.

    .. math:: y[:, o] = act\\Big(b_o + \\sum_{i:\\ mask_o \\,\\&\\, mask_i \\ne 0} W_{oi} \\star x[:, i]\\Big)

    Args:
        x: (N, I_total, H, W) float32/float16/bfloat16/float64.
        weight: the packed flat weight (stored * kh * kw,): per output segment ``W_o`` (O_o, K_o, kh, kw).
        bias: (O_total,) or None.
        in_segments / out_segments: ``[(size, member_mask), ...]`` on channels, or standard layouts.
        kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (an int or a pair).
        activation: None/"none", "relu", "gelu", "silu" (fused on GPU).

    Returns:
        (N, O_total, H', W') in x's dtype. Differentiable in x, the weight and the bias.

    Raises:
        ValueError: naming the argument (shapes, dtypes, devices, segments, conv parameters).
        pyfusion.dispatch.NoBackendError: if ``PYFUSION_BACKEND`` forces a backend that declines.
    """
    ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
    plan = segment_plan(ins, outs)
    geom = conv_geom(kernel_size, stride, padding, dilation)
    act = "none" if activation is None else activation
    _check_args(x, weight, bias, plan, geom, act)
    return _run(x, weight, bias, plan, geom, act)


def _op_args(x, weight, bias, plan: SegmentPlan, geom: ConvGeom, act: str) -> tuple:
    (i_s, i_m), (o_s, o_m) = segments_key(plan.in_segments), segments_key(plan.out_segments)
    return (x, weight, bias, list(i_s), list(i_m), list(o_s), list(o_m), list(geom.kernel), list(geom.stride),
            list(geom.padding), list(geom.dilation), act)  # fmt: skip


def _run(x, weight, bias, plan: SegmentPlan, geom: ConvGeom, act: str) -> Tensor:
    """:meth:`LazyOp.__call__ <pyfusion.ops._registry.LazyOp.__call__>`'s rule with the backend choice cached by
    (device, dtype). Under ``torch.jit.trace`` the registered op runs and is recorded."""
    if is_jit_tracing():
        return OP.op()(*_op_args(x, weight, bias, plan, geom, act))
    return _run_untraced(x, weight, bias, plan, geom, act)


def _run_untraced(x, weight, bias, plan: SegmentPlan, geom: ConvGeom, act: str) -> Tensor:
    """:func:`_run` outside ``torch.jit.trace``."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return OP(*_op_args(x, weight, bias, plan, geom, act))
    if x.is_cpu and x.dtype in _TUNED_DTYPES and _plain(x, weight) and backend_unforced():
        return _backends.cpu_inference_forward(x, weight, bias, plan, geom, act)
    backend = DISPATCHER.select_cached(("cpu" if x.is_cpu else x.device.type, x.dtype), x, weight, bias, plan, geom,
                                       act)  # fmt: skip
    return backend.fn(x, weight, bias, plan, geom, act)


def partial_conv2d_module_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: SegmentPlan,
    geom: ConvGeom,
    activation: str,
    hot: bool = True,
) -> Tensor:
    """:func:`partial_conv2d` for :class:`pyfusion.nn.PartialConv2d`, whose segments, weight size and conv
    parameters were validated when the module was built: only x is checked here. Eager CPU inference on a plain
    float32/64 input of the right shape goes straight to the measured strategy (as
    :func:`pyfusion.ops.partial_linear.partial_linear_module_forward`); anything else takes the checked path.

    Before that, a call whose (weight, geometry, x.shape, x.dtype, activation, threads) already passed the checks and
    whose strategy is settled runs from one lookup (:func:`~pyfusion.ops.partial_conv2d.backends.hot_forward`; the
    dense strategy is then F.conv2d with the cached dense weight) after the tests the key cannot stand for: a plain
    CPU tensor x, no autograd, no torch.compile / export / jit tracing, no ``PYFUSION_BACKEND``. ``hot=False``: never
    (a weight made anew at every call would never hit)."""
    eager = (
        type(x) is Tensor
        and not _grad_enabled()
        and not _is_compiling()  # before the tracer test: dynamo reads this as True and stops here
        and not _tracing()  # before the shape tests: under the tracer they warn (TracerWarning)
        and _ENV_KEY not in _ENV_DATA
        and x.is_cpu
        and not _is_wrapped(x)
    )
    key = None
    if eager and hot:
        key = _hot_key(x, weight, geom, activation)
        y = _hot_forward(key, x, weight, bias, plan, geom, activation)
        if y is not None:
            return y
    if (
        eager
        and x.dtype is weight.dtype
        and x.dtype in _TUNED_DTYPES
        and x.dim() == 4
        and x.shape[1] == plan.i_total
        and weight.is_cpu
        and type(weight) in _PLAIN
        and not _is_wrapped(weight)
    ):
        return _backends.cpu_inference_forward(x, weight, bias, plan, geom, activation, key)
    tracing = is_jit_tracing()
    if tracing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            bad = bool(x.dim() != 4 or x.shape[1] != plan.i_total)
    else:
        bad = x.dim() != 4 or x.shape[1] != plan.i_total
    if bad:
        raise ValueError(
            f"x must have shape (N, {plan.i_total}, H, W) (in_segments={list(plan.in_segments)}); got {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype or x.get_device() != weight.get_device():
        raise ValueError(
            f"x must have the module's dtype and device ({weight.dtype}, {weight.device}); got ({x.dtype}, {x.device})"
        )
    if tracing:
        return OP.op()(*_op_args(x, weight, bias, plan, geom, activation))
    return _run_untraced(x, weight, bias, plan, geom, activation)
