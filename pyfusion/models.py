"""Reference architectures used across pyfusion's tests, examples and benchmarks.

* :func:`mlp` — fully connected net ``sizes[0] -> ... -> sizes[-1]`` (flattens its input);
* :func:`vgg` — small VGG-style CNN with BatchNorm (CIFAR / MNIST sized);
* :func:`resnet20` — CIFAR ResNet-20 style (basic blocks, width multiplier, identity and 1x1 projection
  shortcuts, He et al. 2016 option B);
* :func:`bottleneck_resnet` — a small ResNet with bottleneck blocks (1x1 - 3x3 - 1x1, expansion 4).

Every block uses its own activation modules (no module is called twice), so that each activation has a module
path that forward hooks can observe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["mlp", "vgg", "resnet20", "bottleneck_resnet", "BasicBlock", "Bottleneck", "ResNet"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def mlp(sizes: Sequence[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """A multilayer perceptron ``Flatten -> Linear -> act -> ... -> Linear`` (no activation after the last layer).

    Args:
        sizes: layer widths including input and output, e.g. ``[784, 512, 512, 10]`` (at least two entries).
        activation: one of "relu", "gelu", "tanh", "sigmoid", "silu".
        bias: whether the Linear layers have biases.
    """
    if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths; got {list(sizes)}")
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(_ACTS)}; got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(int(sizes[i]), int(sizes[i + 1]), bias=bias))
        if i < len(sizes) - 2:
            layers.append(_ACTS[activation]())
    return nn.Sequential(*layers)


def vgg(
    widths: Sequence[int | str] = (16, "M", 32, "M", 64, "M"),
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    hidden: int = 64,
) -> nn.Sequential:
    """A VGG-style CNN: ``[Conv3x3 -> BN -> ReLU | MaxPool]* -> Flatten -> Linear -> ReLU -> Linear``.

    Args:
        widths: conv output channels, "M" for a 2x2 max pool.
        in_channels: image channels (3 for CIFAR, 1 for MNIST).
        num_classes: logits.
        image_size: input side length (the flatten size is derived from it).
        hidden: width of the hidden Linear layer (0: flatten straight into the classifier).
    """
    layers: list[nn.Module] = []
    c, side = in_channels, image_size
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            layers += [nn.Conv2d(c, int(w), 3, padding=1), nn.BatchNorm2d(int(w)), nn.ReLU()]
            c = int(w)
    layers.append(nn.Flatten())
    if hidden:
        layers += [nn.Linear(c * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    else:
        layers.append(nn.Linear(c * side * side, num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """3x3 - 3x3 residual block; a 1x1 conv + BN projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck block (expansion 4) with a projection shortcut when the shape changes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages (strides 1, 2, 2), global average pool, linear classifier."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: Sequence[int],
        base_width: int,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        c = base_width
        stages = []
        for s, nb in enumerate(blocks_per_stage):
            planes = base_width * 2**s
            layers = []
            for i in range(nb):
                layers.append(block(c, planes, 2 if (s > 0 and i == 0) else 1))
                c = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(width: int = 1, num_classes: int = 10, in_channels: int = 3, blocks: int = 3) -> ResNet:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels times ``width``). ``blocks`` per stage is adjustable
    for tiny test instances. Stages 2 and 3 start with a 1x1 projection shortcut; the rest are identity."""
    if width < 1:
        raise ValueError(f"width must be a positive integer; got {width}")
    return ResNet(BasicBlock, [blocks] * 3, 16 * width, num_classes, in_channels)


def bottleneck_resnet(width: int = 1, num_classes: int = 10, in_channels: int = 3, blocks: int = 1) -> ResNet:
    """A small bottleneck ResNet (3 stages of ``blocks`` bottleneck blocks, planes 8/16/32 times ``width``)."""
    if width < 1:
        raise ValueError(f"width must be a positive integer; got {width}")
    return ResNet(Bottleneck, [blocks] * 3, 8 * width, num_classes, in_channels)
