"""Small trained members shared by the budget and cluster_fit tests."""

from __future__ import annotations

import torch
from torch import nn

from pyfusion.models import mlp


def trained_mlps(k: int, seed: int = 0, sizes=(8, 16, 16, 3)) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """K small MLPs trained a few steps on a random teacher's labels (so they differ and are better than chance).

    Returns (members, x (160, sizes[0]), y (160,))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(160, sizes[0], generator=g)
    teacher = torch.randn(sizes[0], sizes[-1], generator=g)
    y = (x @ teacher).argmax(1)
    members = []
    for i in range(k):
        torch.manual_seed(seed * 100 + i)
        m = mlp(list(sizes))
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        members.append(m.eval())
    return members, x, y
