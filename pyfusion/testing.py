"""Helpers for tests of fusion code (ours and users'): permuted copies and non-trivial BatchNorm statistics.

A network and a copy whose neurons are permuted in every neuron group compute the same function; every method
that aligns neurons must give the network back when fusing the two (DESIGN §8).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pyfusion.graph import FusionGraph, permuted_state, random_group_permutations, trace_groups

__all__ = ["permuted_copy", "randomize_batchnorm"]


def permuted_copy(
    model: nn.Module,
    generator: torch.Generator | None = None,
    example_inputs: Any = None,
    *,
    graph: FusionGraph | None = None,
    return_permutations: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, torch.Tensor]]:
    """A deep copy of ``model`` (in eval mode) with the neurons of every traced group randomly permuted: whole
    units (attention heads) with one permutation per tie set, inner dims per unit where they are free
    (:func:`pyfusion.graph.random_group_permutations`: derangements, so every neuron moves).

    Args:
        model: the network (not modified).
        generator: random source of the permutations (default: torch's global generator).
        example_inputs: inputs to trace with (see :func:`pyfusion.graph.trace_groups`; synthesized when omitted).
        graph: the model's groups, when the caller traced them already (``example_inputs`` is then not used).
        return_permutations: also return the permutations (group -> slot -> neuron of ``model``).
    """
    graph = trace_groups(model, example_inputs) if graph is None else graph
    perm = random_group_permutations(graph, generator)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    new = permuted_state({k: v.detach() for k, v in state.items()}, graph, perm)
    out = copy.deepcopy(model)
    own = dict(out.named_parameters(remove_duplicate=False))
    own.update(dict(out.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    out = out.eval()
    return (out, perm) if return_permutations else out


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
