"""Collect activation statistics of K members through forward hooks, streaming (no activations kept).

Each batch runs through every member; the hooks keep that batch's activations only until the batch's
update of every point's :class:`ActivationStats` (the C++/CUDA engine), so memory is one batch of
activations plus O(D^2) per point, whatever the amount of calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["collect_stats", "as_samples", "batch_inputs"]


def as_samples(t: Tensor, channel_dim: int | None = None) -> Tensor:
    """Reshape an activation to (samples, neurons).

    (N, C) stays; (N, C, H, W) and (N, C, L) with ``channel_dim=1`` give N*H*W (N*L) samples of C;
    (N, T, C) token sequences (default for 3-D) give N*T samples of C.
    """
    if t.ndim < 2:
        raise ValueError(f"activations must have a sample axis and a neuron axis; got shape {tuple(t.shape)}")
    if t.ndim == 2:
        return t
    if channel_dim is None:
        channel_dim = 1 if t.ndim == 4 else t.ndim - 1
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def _version_of(t: Tensor) -> int:
    """The tensor's in-place version counter, or -1 where it has none (inference tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


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
    transform: Callable[[Tensor], Tensor] | None = None,
    channel_dim: int | None = None,
    progress: bool = True,
    stats_device: torch.device | str | None = None,
    pairs: Sequence[tuple[int, int]] | str | None = None,
) -> dict[str, ActivationStats]:
    """Run every member on the same batches and stream hooked activations into per-point statistics.

    Args:
        models: K members of one architecture.
        data: iterable of batches (inputs, or (inputs, labels)).
        points: name -> module paths (same in every member) whose activations feed that statistic; the
            samples of several paths are stacked (e.g. the points of one residual stream).
        capture: "output" (module output) or "input" (first positional input).
        max_batches: stop after this many batches.
        device: move each batch's input there before running the members.
        transform: applied to every captured tensor before it is reshaped (e.g. ``torch.relu`` to get
            post-activation statistics from a pre-activation Linear/Conv output).
        channel_dim: the neuron axis of captured tensors (see :func:`as_samples`; default: 1 for 4-D
            conv maps, last for 3-D token sequences).
        progress: show a tqdm progress bar over the batches.
        stats_device: where the statistics live (default: the device of the first captured activation).
        pairs: the member pairs whose cross moments are needed (:class:`ActivationStats`; "diag": means and
            variances only; None: all).

    Returns:
        name -> ActivationStats with K blocks (block k = member k's neurons).
    """
    if capture not in ("output", "input"):
        raise ValueError(f"capture must be 'output' or 'input'; got {capture!r}")
    if len(models) == 0:
        raise ValueError("models must contain at least one member; got an empty sequence")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None; got {max_batches}")
    if not points:  # not a data problem: say what is missing
        raise ValueError(
            "no activations to observe (no capture points): the graph has no neuron groups, so there is nothing to "
            "match and every fusion of these members is vanilla averaging (method='average')"
        )
    # imported here: the engine (pyfusion.ops) loads on first use, not with pyfusion.stats / pyfusion.fuse
    from pyfusion.stats.activation_stats import ActivationStats

    stats: dict[str, ActivationStats] = {}
    buffers: list[dict[str, list[Tensor]]] = [dict() for _ in models]
    # A captured activation may be changed in place later in the same forward pass (nn.ReLU(inplace=True) after the
    # hooked layer, ``out += shortcut``): its version counter then moves, and that member's pass is rerun with the
    # point's activations copied in the hook from then on (a copy per batch only where a model needs it).
    versions: list[list[tuple[str, Tensor, int]]] = [[] for _ in models]
    copy_points: set[str] = set()
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
                    if not isinstance(t, Tensor):
                        raise ValueError(
                            f"points[{_name!r}]: module {mod.__class__.__name__} gave {type(t).__name__}, not a tensor"
                        )
                    t = t.detach()
                    if transform is not None:
                        t = transform(t)
                    t = as_samples(t, channel_dim)
                    if _name in copy_points:
                        t = t.clone()
                    else:
                        versions[_k].append((_name, t, _version_of(t)))
                    buffers[_k].setdefault(_name, []).append(t)

                handles.append(mods[p].register_forward_hook(hook))
    modes = [m.training for m in models]
    bar = None
    try:
        for m in models:
            m.eval()
        total = None
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            pass
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="activation statistics", unit="batch", leave=False)
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                for buf in buffers:
                    buf.clear()
                x = batch_inputs(batch)
                if device is not None:
                    x = x.to(device)
                for k, m in enumerate(models):
                    versions[k].clear()
                    m(x)
                    changed = {name for name, t, v in versions[k] if v < 0 or _version_of(t) != v}
                    if changed:
                        copy_points.update(changed)
                        buffers[k].clear()
                        versions[k].clear()
                        m(x)
                for name, paths in points.items():
                    for k in range(len(models)):
                        if name not in buffers[k]:
                            raise ValueError(
                                f"points[{name!r}] modules {list(paths)} did not run in member {k}'s forward pass"
                            )
                    parts = [buffers[k].pop(name) for k in range(len(models))]
                    blocks = [p[0] if len(p) == 1 else torch.cat(p, dim=0) for p in parts]  # one point: no copy
                    if name not in stats:
                        where = stats_device if stats_device is not None else blocks[0].device
                        stats[name] = ActivationStats([b.shape[1] for b in blocks], device=where, pairs=pairs)
                    stats[name].update(blocks)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for h in handles:
            h.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    if not stats:
        raise ValueError("data yielded no batches: cannot compute activation statistics from empty data")
    return stats
