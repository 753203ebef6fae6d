"""Shared helpers of the audit tests (models the library was not written around): random float64 members, the
"inputs untouched" check, and the relative error the audits compare outputs with."""

from __future__ import annotations

import math

import torch
from torch import nn

F64 = torch.float64


def random_model(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval, every parameter and BatchNorm statistic re-drawn (no symmetric initialisation hides a bug)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(F64).eval()
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(max(1, p[0].numel())) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * std)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=F64) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=F64) + 0.5)
    return model


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict (for :func:`unchanged`)."""
    return {k: v.clone() for k, v in m.state_dict().items()}


def unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether the model's state dict is exactly ``before`` (a failed fusion must leave its inputs untouched)."""
    after = m.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` without autograd (the first entry of a tuple / Hugging Face output)."""
    with torch.no_grad():
        y = m(x)
    return y if isinstance(y, torch.Tensor) else y[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
