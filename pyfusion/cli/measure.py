"""What the reports measure: accuracy, effective FLOPs / parameters, latency per batch, fusion time.

Cost goes through :func:`model_cost`, which asks ``pyfusion.cost`` (the library's count of the
non-zero blocks).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Cost", "accuracy", "ensemble_logits", "model_cost", "time_forward", "time_interleaved"]


@dataclass(frozen=True)
class Cost:
    """Per-sample cost of one forward pass."""

    flops: float  # effective FLOPs (2 per multiply-add) of the non-zero blocks
    params: float  # effective parameters
    dense_flops: float
    dense_params: float


def model_cost(model: nn.Module, example: torch.Tensor) -> Cost:
    """Effective and dense per-sample FLOPs and parameters of ``model``, from :func:`pyfusion.cost`.

    Effective counts cover the stored (non-zero) blocks of partially fused layers only; FLOPs are
    2 x multiply-adds of the weight layers for one sample of ``example``'s shape.

    Args:
        model: any module.
        example: a batch of inputs (N, ...); the counts are per sample.
    """
    from pyfusion.fuse.cost import cost

    c = cost(model, example[:1])
    return Cost(float(c.flops), float(c.params), float(c.dense_flops), float(c.dense_params))


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


def time_interleaved(
    fns: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int, warmup: int = 2
) -> list[float]:
    """Median wall time in milliseconds of each ``fn(x)``, the functions timed in one loop, alternating.

    Repetition i runs every function once, in the given order for even i and reversed for odd i (so none always
    runs first). Under a changing machine load every function sees the same load, so their ratios are stable
    even when the absolute times are not. Measured (two MLPs 784-256-256-10 of one architecture, batch 256,
    1 thread, 10 repeats, 12 trials, shared 2-core VM at load 2.9): timed one after the other their ratio
    ranged 0.70-1.70; each timed interleaved with the ensemble, the ratio of their ratios ranged 0.99-1.07.
    """
    cuda = x.is_cuda
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for j in order if i % 2 == 0 else order[::-1]:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fns[j](x)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[j].append(time.perf_counter() - t0)
    return [1000.0 * statistics.median(t) for t in times]


@torch.no_grad()
def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``fn`` on (x, y), in [0, 1]."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        out = fn(x[i : i + batch_size])
        correct += int((out.argmax(1) == y[i : i + batch_size].to(out.device)).sum())
    return correct / max(int(x.shape[0]), 1)
