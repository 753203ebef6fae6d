"""Levels of neuron-interpolation fusion: the units fitted one after another (Luenam et al. 2025).

A level is a Linear / Conv2d with the parameter-free modules before it and its BatchNorm (``nn.Sequential``
chains: MLP, VGG), or, for :class:`pyfusion.models.ResNet`, the stem, one residual block, or the head. The levels
are found by walking the model (not derived from the neuron groups; each level's output group is looked up in
the graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pyfusion.graph.groups import FusionGraph

__all__ = ["FLATTEN", "Level", "interp_levels", "run_calls", "run_chunked"]

FLATTEN = "__flatten__"  # a level call meaning torch.flatten(x, 1)
_PRE_OK = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Level:
    """One level of neuron-interpolation fusion.

    Attributes:
        name: a readable name (the producer's or the block's module path).
        calls: module paths applied in order to the level input (``"__flatten__"`` is ``torch.flatten(x, 1)``).
        producer: the Linear / Conv2d whose weights a linear fit sets (None for residual blocks).
        norm: the BatchNorm right after the producer, or None.
        out_point: module path whose output is the level output (importance is measured there).
        group: the graph group of the level output (None for the logits).
        last: whether the level outputs the logits.
        kind: "linear" (a producer fitted in closed form) or "block" (trained only).
        pre: the parameter-free modules before the producer (their output is the producer's input).
    """

    name: str
    calls: list[str]
    producer: str | None
    norm: str | None
    out_point: str
    group: str | None
    last: bool = False
    kind: str = "linear"
    pre: list[str] = field(default_factory=list)


def _group_of(graph: FusionGraph, weight_key: str) -> str | None:
    for g in graph.groups.values():
        if any(r.key == weight_key for r in g.producers):
            return g.name
    return None


def interp_levels(model: nn.Module, graph: FusionGraph) -> list[Level]:
    """The levels of ``model``: an ``nn.Sequential`` chain (MLP, VGG) or a :class:`pyfusion.models.ResNet`.

    Raises:
        ValueError: an unsupported architecture or module (named by path and type).
    """
    # The one architecture-specific case of neuron interpolation: levels are not derived from the neuron groups
    # yet, so a ResNet (whose blocks are not a Sequential chain of leaves) is recognised by its class. It stays
    # isolated here, in _resnet_levels, until levels are derived from the graph IR.
    from pyfusion.models import ResNet

    if isinstance(model, ResNet):
        return _resnet_levels(model, graph)
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"neuron interpolation supports nn.Sequential chains (MLP, VGG) and pyfusion.models.ResNet; "
            f"got {type(model).__name__}"
        )
    leaves = []
    for path, m in model.named_modules():
        if any(True for _ in m.children()):
            if not isinstance(m, nn.Sequential):
                raise ValueError(f"module {path!r} ({type(m).__name__}) is not supported inside a Sequential chain")
            continue
        leaves.append((path, m))
    levels: list[Level] = []
    pre: list[str] = []
    i = 0
    while i < len(leaves):
        path, m = leaves[i]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            norm = None
            if i + 1 < len(leaves) and isinstance(leaves[i + 1][1], _NORMS):
                norm = leaves[i + 1][0]
                i += 1
            calls = [*pre, path] + ([norm] if norm else [])
            group = _group_of(graph, f"{path}.weight")
            levels.append(Level(path, calls, path, norm, norm or path, group, pre=list(pre)))
            pre = []
        elif isinstance(m, _PRE_OK):
            pre.append(path)
        else:
            raise ValueError(f"module {path!r} of type {type(m).__name__} is not supported by neuron interpolation")
        i += 1
    if not levels:
        raise ValueError("the model has no Linear or Conv2d layer")
    if pre:
        raise ValueError(f"modules after the last Linear/Conv2d are not supported: {pre}")
    levels[-1].last = True
    if levels[-1].group is not None:
        raise ValueError(f"the last layer {levels[-1].name!r} must output the logits (it belongs to a group)")
    for lv in levels[:-1]:
        if lv.group is None:
            raise ValueError(f"layer {lv.name!r} belongs to no neuron group of the graph")
    return levels


def _resnet_levels(model: nn.Module, graph: FusionGraph) -> list[Level]:
    """The levels of :class:`pyfusion.models.ResNet`: the stem, one level per residual block, the head (its module
    names ``conv1``, ``bn1``, ``layer1..3``, ``pool``, ``fc`` are that class's)."""
    levels = [Level("stem", ["conv1", "bn1"], None, None, "bn1", _group_of(graph, "conv1.weight"), kind="block")]
    first = True
    for s in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(model, s)):
            path = f"{s}.{i}"
            last_conv = "conv3" if hasattr(block, "conv3") else "conv2"
            calls = (["relu"] if first else []) + [path]
            first = False
            levels.append(
                Level(path, calls, None, None, path, _group_of(graph, f"{path}.{last_conv}.weight"), kind="block")
            )
    levels.append(Level("head", ["pool", FLATTEN, "fc"], None, None, "fc", None, last=True, kind="block"))
    return levels


def run_calls(model: nn.Module, calls: Sequence[str], x: Tensor) -> Tensor:
    """Apply the module paths ``calls`` of ``model`` in order to ``x`` (:data:`FLATTEN` is ``torch.flatten(x, 1)``)."""
    mods = dict(model.named_modules())
    for c in calls:
        x = torch.flatten(x, 1) if c == FLATTEN else mods[c](x)
    return x


@torch.no_grad()
def run_chunked(model: nn.Module, calls: Sequence[str], x: Tensor, chunk: int = 256) -> Tensor:
    """:func:`run_calls` on ``chunk`` samples at a time, without gradients."""
    return torch.cat([run_calls(model, calls, x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])
