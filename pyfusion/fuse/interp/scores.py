"""Importance scores of every neuron group, observed at the groups' points (targets) in the exported graph.

The attribution itself is :func:`pyfusion.match.importance.attribute` (uniform, activation x gradient, layer
conductance); this module runs a member through its :class:`~.program.Runner` with a zero probe added at every
point (so the gradient of the target logit with respect to the value exists whatever requires grad), and reduces
each point's absolute attributions to one score per neuron of each group there: summed over samples and averaged
over the other positions (tokens, pixels), a neuron's copies (rep factors) summed, normalised to sum 1 per point
(plus 1e-8, as the authors). A group seen at several points (a residual stream) gets the mean of its points'
scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyfusion.fuse.interp.fitting import columns
from pyfusion.fuse.interp.levels import InterpLevels
from pyfusion.fuse.interp.program import Runner, _rows
from pyfusion.match.importance import attribute

__all__ = ["group_scores"]


def _path_nodes(levels: InterpLevels, runner: Runner) -> list[str]:
    """Where conductance's path from the zero baseline starts: the inputs themselves when one is floating point
    (``[]``), else the outputs of the embedding lookups of the (integer) inputs: token models interpolate their
    looked-up token embeddings from zero, with position / token-type embeddings kept (the usual integrated-
    gradients baseline of language models, e.g. captum's ``LayerIntegratedGradients`` on the word embeddings).

    Raises:
        ValueError: no floating-point input and no embedding lookup of an input.
    """
    prog = levels.program
    ph = [p.name for p in prog.placeholders]
    if any(isinstance(runner.env[p], Tensor) and runner.env[p].is_floating_point() for p in ph):
        return []
    nodes = [s.node for s in levels.sites.values() if s.kind == "embedding" and s.input in prog.dep]
    if not nodes:
        raise ValueError(
            "importance='conductance' interpolates the inputs (or the embeddings of integer inputs) from zero; "
            "this model has integer inputs and no embedding lookup of them: use 'activation_gradient' or 'uniform'"
        )
    return nodes


def group_scores(
    levels: InterpLevels,
    runner: Runner,
    labels: Tensor | None,
    *,
    method: str,
    n_steps: int,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """Per group, (n,) float64 scores of one member (``runner`` holds its state and the calibration inputs).

    Raises:
        ValueError: conductance on integer inputs that no embedding lookup reads.
    """
    prog = levels.program
    graph = levels.graph
    points = [t for t, f in levels.fits.items() if f.segments]
    ph = [p.name for p in prog.placeholders]
    scaled = _path_nodes(levels, runner) if method == "conductance" else []
    end = max(prog.pos[o] for o in prog.outputs)
    start = max(prog.pos[p] for p in ph)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    n, c = runner.n, runner.chunk
    for s in range(0, n, c):
        real = min(c, n - s)
        base = runner.chunk_env(ph, s, real, c)
        y = None if labels is None else _rows(labels, n, s, real, c)

        def forward(alphas: Sequence[float], base: dict = base) -> tuple[Tensor, list[Tensor]]:
            logits, vals = [], [[] for _ in points]
            for a in alphas:
                floats = not scaled
                env = {p: (a * v if floats and a != 1.0 and torch.is_tensor(v) and v.is_floating_point() else v)
                       for p, v in base.items()}  # fmt: skip
                hooks: dict[str, Callable[[Tensor], Tensor]] = {}
                if a != 1.0:  # token inputs: the path runs over the looked-up embeddings instead
                    hooks.update({t: (lambda v, a=a: a * v) for t in scaled})
                if torch.is_grad_enabled():
                    for t in points:
                        inner = hooks.get(t)
                        hooks[t] = (lambda v, prev=inner: (prev(v) if prev is not None else v)
                                    + torch.zeros_like(v).requires_grad_(True))  # fmt: skip
                out = runner.run_chunk(start, end, env, c, [prog.logits, *points], hooks=hooks or None)
                logits.append(out[prog.logits])
                for i, t in enumerate(points):
                    vals[i].append(out[t])
            return torch.cat(logits), vals

        attrs = attribute(forward, y, method=method, n_steps=n_steps)
        for t, a in zip(points, attrs):
            a = runner.stored(t, a, real, c)
            f = levels.fits[t]
            rows = a.abs().movedim(f.dim, -1).reshape(-1, f.width).double()
            sums[t] = rows.sum(0) if t not in sums else sums[t] + rows.sum(0)
            counts[t] = counts.get(t, 0) + rows.shape[0]
    out: dict[str, list[Tensor]] = {}
    for t in points:
        f = levels.fits[t]
        per_col = sums[t] / max(counts[t], 1)
        per_group: dict[str, Tensor] = {}
        for seg in f.segments:  # a group's segments at one point (q and k rows of a packed qkv) add up
            part = per_col[columns(graph, seg)].sum(1)
            per_group[seg.group] = part if seg.group not in per_group else per_group[seg.group] + part
        for g, score in per_group.items():
            if normalize:
                total = float(score.sum())
                score = (score / total if total > 0 else torch.full_like(score, 1.0 / score.numel())) + 1e-8
            out.setdefault(g, []).append(score)
    return {g: torch.stack(v).mean(0) for g, v in out.items()}
