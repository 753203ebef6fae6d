"""What the reports measure: accuracy, effective FLOPs / parameters, latency per batch, fusion time.

Cost goes through :func:`model_cost`, one function that uses ``pyfusion.cost`` (the library's count
of the non-zero blocks) when the library provides it, and otherwise :func:`layer_cost`, which counts the
FLOPs of the weight layers a forward pass visits (dense layers fully, pyfusion's partial layers by their
stored blocks).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Cost", "accuracy", "layer_cost", "ensemble_logits", "model_cost", "time_forward"]


@dataclass(frozen=True)
class Cost:
    """Per-sample cost of one forward pass."""

    flops: float  # effective FLOPs (2 per multiply-add) of the non-zero blocks
    params: float  # effective parameters
    dense_flops: float
    dense_params: float


def _is_counted(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or callable(getattr(m, "effective_flops", None))


def _bias_numel(m: nn.Module) -> int:
    b = getattr(m, "bias", None)
    return int(b.numel()) if isinstance(b, torch.Tensor) else 0


def layer_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """Per-sample FLOPs (2 x multiply-adds) of every weight layer that one forward pass visits.

    Dense ``nn.Linear`` / ``nn.Conv*`` count all their weights. Layers that know their own cost (pyfusion's
    ``PartialLinear``, ``PartialConv2d``, ``EnsembleLinear``: an ``effective_flops`` method) count their
    stored blocks only; their dense FLOPs scale by ``dense weights / stored weights``. Effective parameters
    are the stored parameters (partial layers store only the non-zero blocks).

    Args:
        model: any module.
        example: one batch of inputs (N, ...); FLOPs are divided by N.
    """
    eff, dense = [0.0], [0.0]

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(mod, nn.Linear):
            f = 2.0 * out.numel() * mod.in_features
            eff[0] += f
            dense[0] += f
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = 1
            for s in mod.kernel_size:
                k *= s
            f = 2.0 * out.numel() * (mod.in_channels // mod.groups) * k
            eff[0] += f
            dense[0] += f
        else:
            if x.ndim == 4:  # a convolution: cost depends on the spatial size
                f = float(mod.effective_flops(x.shape[0], tuple(x.shape[-2:])))
            else:
                f = float(mod.effective_flops(x.numel() // max(x.shape[-1], 1)))
            eff[0] += f
            stored = float(sum(p.numel() for p in mod.parameters(recurse=False)) - _bias_numel(mod))
            dense_w = float(mod.dense_params() - _bias_numel(mod)) if hasattr(mod, "dense_params") else stored
            dense[0] += f * (dense_w / stored if stored > 0 else 1.0)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_counted(m)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    n = example.shape[0]
    params = float(sum(p.numel() for p in model.parameters()))
    dense_params = params
    for m in model.modules():
        if callable(getattr(m, "dense_params", None)):
            dense_params += float(m.dense_params()) - float(sum(p.numel() for p in m.parameters(recurse=False)))
    return Cost(eff[0] / n, params, dense[0] / n, dense_params)


def _field(obj: object, *names: str) -> float | None:
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return float(v)
    return None


def model_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """Effective and dense per-sample FLOPs and parameters of ``model``.

    Uses ``pyfusion.cost`` when available (it knows which blocks of partially fused layers are zero);
    falls back to :func:`layer_cost`.
    """
    try:
        from pyfusion.fuse.cost import cost as lib_cost  # noqa: PLC0415
    except ImportError:
        return layer_cost(model, example)
    params = inspect.signature(lib_cost).parameters
    c = lib_cost(model, example) if len(params) > 1 else lib_cost(model)
    fallback = layer_cost(model, example)
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
