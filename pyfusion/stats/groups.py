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

Inside :func:`pyfusion.stats.distributed.reducing` (``pyfusion.fuse`` with ``torch.distributed`` initialized), each
rank streams its own batches, then the statistics are all-reduced: every rank gets those of the union of the shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pyfusion.graph.capture import plain_chain
from pyfusion.graph.groups import FusionGraph
from pyfusion.stats.activation_stats import ActivationStats
from pyfusion.stats.collect import collect_stats
from pyfusion.stats.distributed import agree, current_group

__all__ = ["group_points", "group_statistics"]


def group_points(graph: FusionGraph, point: str, *, fallback: bool = False) -> dict[str, tuple[list[Any], list[str]]]:
    """group -> (graph points, module paths) of its ``point`` ("pre" or "post"; "post" falls back to "pre"
    for groups without an activation). Graph points are node names where one dim holds exactly the group's
    neurons; a traced group without such a node (attention heads: q | k segments of a packed projection, heads
    with their inner dims) is observed at its :class:`~pyfusion.graph.CapturePoint` s of that kind instead.

    ``fallback`` (for matching, where any observation of the neurons is a feature): a group with no point of the
    kind asked for is observed at its other kind, then at the inputs its consumers read (a maxout's consumer side,
    a group produced by ``einsum`` with a raw parameter); without it (REPAIR, which corrects pre-activation
    statistics) such a group has no points."""
    if point not in ("pre", "post"):
        raise ValueError(f"point must be 'pre' or 'post'; got {point!r}")
    other = "pre" if point == "post" else "post"
    out: dict[str, tuple[list[Any], list[str]]] = {}
    for name, g in graph.groups.items():
        nodes, paths = (g.post_nodes, g.post_points) if point == "post" else (g.pre_nodes, g.pre_points)
        if not nodes and not paths:
            nodes, paths = g.pre_nodes, g.pre_points
        if not nodes and not paths and fallback:
            nodes, paths = (g.post_nodes, g.post_points) if other == "post" else (g.pre_nodes, g.pre_points)
        nodes = list(nodes)
        if not nodes and graph.traced is not None:
            kinds = (point, "pre") + ((other, "input") if fallback else ())
            kind = next((k for k in kinds if any(c.kind == k for c in g.captures)), None)
            nodes = [c for c in g.captures if c.kind == kind]
        out[name] = (nodes, list(paths))
    return out


def _hookable(members: Sequence[nn.Module], pts: dict[str, tuple[list[Any], list[str]]], wanted: list[str]) -> bool:
    """Whether every wanted group's traced points are whole nodes, each the output of one recorded module path, and
    every member is a :func:`~pyfusion.graph.capture.plain_chain` (no module's output is changed after it ran)."""
    for g in wanted:
        nodes, paths = pts[g]
        if not nodes or len(paths) != len(nodes) or not all(isinstance(c, str) for c in nodes):
            return False
    return all(plain_chain(m) for m in members)


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
    pairs: Sequence[tuple[int, int]] | str | None = None,
    fallback: bool = True,
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
        pairs: the member pairs (a, b) whose cross moments the caller reads, "diag" for means and variances only,
            None (default) for all: the engine computes only those blocks (:class:`ActivationStats`).
        fallback: observe a group without a point of the kind asked for at another kind (:func:`group_points`;
            True for matching, False where the statistics must be exactly that kind, as REPAIR's).

    Returns:
        group -> ActivationStats with K blocks.
    """
    wanted = list(graph.groups) if groups is None else list(groups)
    pts = group_points(graph, point, fallback=fallback)
    modes = [{m: m.training for m in member.modules()} for member in members]
    try:
        transform = None
        if graph.traced is not None and _hookable(members, pts, wanted):
            # a plain chain of pure modules: hooks on the members themselves see exactly the traced nodes' values
            # (graph.capture.plain_chain), at the speed of the members' own forward
            runners, points = list(members), {g: pts[g][1] for g in wanted}
        elif graph.traced is not None:
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
        dist_group = current_group()
        try:
            stats = collect_stats(
                runners,
                data,
                points,
                max_batches=max_batches,
                device=device,
                progress=progress,
                transform=transform,
                pairs=pairs,
            )
        except Exception:
            if dist_group is not None:  # the other ranks must not wait for this one in the all-reduce
                agree(False, "activation statistics", dist_group[0])
            raise
        if dist_group is not None:
            agree(True, "activation statistics", dist_group[0])
            for g in wanted:  # the same order on every rank
                stats[g].all_reduce(dist_group[0])
        return stats
    finally:
        for mm in modes:
            for m, mode in mm.items():
                m.training = mode
