"""Helpers for tests of fusion code (ours and users'): permuted copies and non-trivial BatchNorm statistics.

A network and a copy whose neurons are permuted in every neuron group compute the same function; every method
that aligns neurons must give the network back when fusing the two (DESIGN §8).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyfusion.graph import trace_groups
from pyfusion.match.align import permute_state

__all__ = ["permuted_copy", "randomize_batchnorm"]


def permuted_copy(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of ``model`` (in eval mode) with the neurons of every traced group randomly permuted.

    Args:
        model: the network (not modified).
        generator: random source of the permutations (default: torch's global generator).
    """
    graph = trace_groups(model)
    perm = {name: torch.randperm(g.size, generator=generator) for name, g in graph.groups.items()}
    state = {k: v.detach() for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    out = copy.deepcopy(model)
    out.load_state_dict(permute_state(state, graph, perm))
    return out.eval()


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters (in place); eval mode.

    Fresh BatchNorm layers are the identity in eval mode, which hides bugs in how fusion treats them.
    """
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0, 0.3)
    return model.eval()
