"""Collect activation statistics of K members through forward hooks, streaming (no activations kept).

SKELETON: the statistics engine work adds progress bars, batched updates through the C++ kernel,
distributed merging and more capture options behind the same API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["collect_stats", "as_samples", "batch_inputs"]


def as_samples(t: Tensor, channel_dim: int | None = None) -> Tensor:
    """Reshape an activation to (samples, neurons).

    (N, C) stays; (N, C, H, W) and (N, C, L) with ``channel_dim=1`` give N*H*W (N*L) samples of C;
    (N, T, C) token sequences (default for 3-D) give N*T samples of C.
    """
    if t.ndim == 2:
        return t
    if channel_dim is None:
        channel_dim = 1 if t.ndim == 4 else t.ndim - 1
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the batch itself, or its first element for (inputs, labels)."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def collect_stats(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    points: Mapping[str, Sequence[str]],
    *,
    capture: str = "output",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, ActivationStats]:
    """Run every member on the same batches and stream hooked activations into per-point statistics.

    Args:
        models: K members of one architecture.
        data: iterable of batches (inputs, or (inputs, labels)).
        points: name -> module paths (same in every member) whose activations feed that statistic; the
            samples of several paths are stacked (e.g. the points of one residual stream).
        capture: "output" (module output) or "input" (first positional input).

    Returns:
        name -> ActivationStats with K blocks (block k = member k's neurons).
    """
    if capture not in ("output", "input"):
        raise ValueError(f"capture must be 'output' or 'input'; got {capture!r}")
    stats: dict[str, ActivationStats] = {}
    buffers: list[dict[str, list[Tensor]]] = [dict() for _ in models]
    handles = []
    owner: dict[tuple[int, str], str] = {}
    for name, paths in points.items():
        for p in paths:
            owner[(0, p)] = name
    for k, model in enumerate(models):
        mods = dict(model.named_modules())
        for name, paths in points.items():
            for p in paths:
                if p not in mods:
                    raise ValueError(f"points[{name!r}] names module {p!r}, which member {k} does not have")

                def hook(mod, args, out, _k=k, _name=name):
                    t = out if capture == "output" else args[0]
                    buffers[_k].setdefault(_name, []).append(as_samples(t.detach()))

                handles.append(mods[p].register_forward_hook(hook))
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch_inputs(batch)
                if device is not None:
                    x = x.to(device)
                for m in models:
                    m(x)
                for name in points:
                    blocks = [torch.cat(buffers[k].pop(name), dim=0) for k in range(len(models))]
                    if name not in stats:
                        stats[name] = ActivationStats([b.shape[1] for b in blocks])
                    stats[name].update(blocks)
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    if not stats:
        raise ValueError("data yielded no batches: cannot compute activation statistics from empty data")
    return stats
