"""Per-group activation statistics of K members, through :func:`pyfusion.stats.collect_stats`.

This module is part of ``pyfusion.stats`` (not ``pyfusion.fuse`` or ``pyfusion.match``) because it needs only the
neuron groups (``pyfusion.graph``) and the statistics engine: every method, REPAIR and the matching costs read
these statistics, so they sit below all of them in the data flow graph -> stats -> match -> fuse.

Each group's activations are observed at its pre-activation points (producer / BatchNorm / LayerNorm outputs,
residual sums) or post-activation points (activation outputs). When the graph was traced (``torch.export``), a
tap is inserted after each point's node in the exported graph, run with each member's own weights
(:class:`pyfusion.graph.capture.TracedGraph`): functional activations such as ``F.relu(out + shortcut)`` can be
observed too, and a tap clones the value when its node has run, so in-place ops that run later
(``nn.ReLU(inplace=True)``, ``out += shortcut``) cannot overwrite it. Otherwise the module paths recorded on the
group are hooked directly, and the hooked outputs are cloned for the same reason. Samples of all points of a
group are stacked (a residual stream is observed at every block), conv maps contribute one sample per spatial
position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pyfusion.graph.groups import FusionGraph
from pyfusion.stats.activation_stats import ActivationStats
from pyfusion.stats.collect import collect_stats

__all__ = ["group_points", "group_statistics"]


def group_points(graph: FusionGraph, point: str) -> dict[str, tuple[list[Any], list[str]]]:
    """group -> (graph points, module paths) of its ``point`` ("pre" or "post"; "post" falls back to "pre"
    for groups without an activation). Graph points are node names where one dim holds exactly the group's
    neurons; a traced group without such a node (attention heads: q | k segments of a packed projection, heads
    with their inner dims) is observed at its :class:`~pyfusion.graph.CapturePoint` s of that kind instead."""
    if point not in ("pre", "post"):
        raise ValueError(f"point must be 'pre' or 'post'; got {point!r}")
    out: dict[str, tuple[list[Any], list[str]]] = {}
    for name, g in graph.groups.items():
        nodes, paths = (g.post_nodes, g.post_points) if point == "post" else (g.pre_nodes, g.pre_points)
        if not nodes and not paths:
            nodes, paths = g.pre_nodes, g.pre_points
        nodes = list(nodes)
        if not nodes and graph.traced is not None:
            caps = [c for c in g.captures if c.kind == point] or [c for c in g.captures if c.kind == "pre"]
            nodes = list(caps)
        out[name] = (nodes, list(paths))
    return out


def group_statistics(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    data: Iterable[Any],
    *,
    point: str = "post",
    groups: Sequence[str] | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, ActivationStats]:
    """Joint statistics of the members' activations per group (block k = member k).

    Args:
        members: K networks (not modified: their training flags are restored).
        graph: neuron groups (traced from member 0's architecture; also valid for wider fused networks).
        data: batches (inputs, or (inputs, labels)).
        point: "pre" or "post" activation.
        groups: restrict to these groups (default all).
        max_batches: stop after this many batches.
        device: move inputs there first.
        progress: show collect_stats' progress bar.

    Returns:
        group -> ActivationStats with K blocks.
    """
    wanted = list(graph.groups) if groups is None else list(groups)
    pts = group_points(graph, point)
    modes = [{m: m.training for m in member.modules()} for member in members]
    try:
        transform = None
        if graph.traced is not None:
            runners, points = graph.traced.runners(members, {g: pts[g][0] for g in wanted})
        else:
            runners = list(members)
            points = {g: pts[g][1] for g in wanted}
            missing = [g for g in wanted if not points[g]]
            if missing:
                raise ValueError(
                    f"groups {missing} have no module whose output gives their activations; declare pre_points / "
                    "post_points for them"
                )
            transform = torch.clone  # a hooked module output may be overwritten later by an in-place op
        return collect_stats(
            runners, data, points, max_batches=max_batches, device=device, progress=progress, transform=transform
        )
    finally:
        for mm in modes:
            for m, mode in mm.items():
                m.training = mode
