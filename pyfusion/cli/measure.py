"""What the reports measure: accuracy, effective FLOPs / parameters, latency per batch, fusion time.

Cost goes through :func:`model_cost`, one function that uses ``pyfusion.cost`` (the library's count
of the non-zero blocks) when the library provides it, and otherwise counts the dense FLOPs of the
Linear and Conv layers a forward pass visits (correct for plain, fully fused networks).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Cost", "accuracy", "dense_cost", "ensemble_logits", "model_cost", "time_forward"]


@dataclass(frozen=True)
class Cost:
    """Per-sample cost of one forward pass."""

    flops: float  # effective FLOPs (2 per multiply-add) of the non-zero blocks
    params: float  # effective parameters
    dense_flops: float
    dense_params: float


def dense_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """Dense FLOPs (2 x multiply-adds) of every Linear / Conv that one sample's forward pass visits.

    Args:
        model: any module.
        example: one batch of inputs (N, ...); FLOPs are divided by N.
    """
    flops = [0.0]

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            flops[0] += 2.0 * out.numel() * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = 1
            for s in mod.kernel_size:
                k *= s
            flops[0] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * k

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    n = example.shape[0]
    params = float(sum(p.numel() for p in model.parameters()))
    return Cost(flops[0] / n, params, flops[0] / n, params)


def _field(obj: object, *names: str) -> float | None:
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return float(v)
    return None


def model_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """Effective and dense per-sample FLOPs and parameters of ``model``.

    Uses ``pyfusion.cost`` when available (it knows which blocks of partially fused layers are zero);
    falls back to :func:`dense_cost`, which is exact for networks made of dense layers only.
    """
    try:
        from pyfusion.fuse.cost import cost as lib_cost  # noqa: PLC0415
    except ImportError:
        return dense_cost(model, example)
    params = inspect.signature(lib_cost).parameters
    c = lib_cost(model, example) if len(params) > 1 else lib_cost(model)
    fallback = dense_cost(model, example)
    flops = _field(c, "effective_flops", "flops_effective", "flops")
    dflops = _field(c, "dense_flops", "flops_dense")
    return Cost(
        flops if flops is not None else fallback.flops,
        _field(c, "effective_params", "params_effective", "params") or fallback.params,
        dflops if dflops is not None else fallback.dense_flops,
        _field(c, "dense_params", "params_dense") or fallback.dense_params,
    )


def ensemble_logits(models: Sequence[nn.Module], lambdas: Sequence[float] | None = None) -> Callable:
    """``x -> sum_k lambda_k f_k(x)`` (uniform lambda by default), the alpha = 1 end of the trade-off."""
    lam = list(lambdas) if lambdas is not None else [1.0 / len(models)] * len(models)

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = None
        for w, m in zip(lam, models):
            y = w * m(x)
            out = y if out is None else out + y
        return out

    return forward


def time_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn(x)`` in milliseconds (inference mode; CUDA synchronised when on a GPU)."""
    cuda = x.is_cuda
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@torch.no_grad()
def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``fn`` on (x, y), in [0, 1]."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        out = fn(x[i : i + batch_size])
        correct += int((out.argmax(1) == y[i : i + batch_size].to(out.device)).sum())
    return correct / max(int(x.shape[0]), 1)
