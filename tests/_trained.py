"""Small members shared by several test files: trained MLPs, and untrained MLP / VGG+BN / ResNet pairs."""

from __future__ import annotations

import torch
from torch import nn

from pyfusion.models import mlp, resnet20, vgg


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


def family_pair(name: str) -> tuple[list[nn.Module], torch.Tensor]:
    """Two untrained members of the family "mlp", "vgg_bn" or "resnet" (seed 0) with their BatchNorm buffers drawn
    away from the defaults (so the maps acting on them are exercised), and an example batch."""
    torch.manual_seed(0)
    if name == "mlp":
        make, example = (lambda: mlp([12, 16, 16, 5])), torch.randn(4, 12)
    elif name == "vgg_bn":
        make = lambda: vgg((8, "M", 16, "M"), in_channels=3, image_size=8, hidden=16)  # noqa: E731
        example = torch.randn(4, 3, 8, 8)
    else:
        make, example = (lambda: resnet20(width=1, blocks=1)), torch.randn(2, 3, 16, 16)
    members = [make().eval(), make().eval()]
    with torch.no_grad():
        for m in members:
            for buf in m.buffers():
                if buf.is_floating_point():
                    buf.copy_(torch.rand_like(buf) + 0.5)
    return members, example
