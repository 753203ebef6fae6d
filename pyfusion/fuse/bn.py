"""BatchNorm recalibration after fusion (the "reset" of Jordan et al. 2023, REPAIR §3).

A fused network's BatchNorm running statistics (transformed by A_k from the members') do not describe its
own activations. :func:`reset_bn_stats` recomputes them: every BatchNorm is put in train mode with
``momentum=None`` (cumulative average over the calibration batches), the data is run forward without gradients,
then modes and momenta are restored. Other layers (Dropout, ...) stay in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pyfusion.stats import batch_inputs

__all__ = ["reset_bn_stats", "has_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def reset_bn_stats(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None, device: torch.device | str | None = None
) -> int:
    """Recompute every BatchNorm's running mean / variance of ``model`` (in place) on calibration data.

    Args:
        model: the fused network.
        data: batches (inputs, or (inputs, labels)).
        max_batches: stop after this many batches.
        device: move inputs there first.

    Returns:
        The number of samples used.

    Raises:
        ValueError: when the data yields no batch (the statistics are then left unchanged).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    modes = {m: m.training for m in model.modules()}
    count = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch_inputs(batch)
                if device is not None:
                    x = x.to(device)
                model(x)
                count += int(x.shape[0])
        if count == 0:
            raise ValueError("data is empty: cannot recompute BatchNorm statistics")
    except BaseException:
        for m, (rm, rv, nb, _) in zip(bns, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(nb)
        raise
    finally:
        for m, (_, _, _, mom) in zip(bns, saved):
            m.momentum = mom
        for m, mode in modes.items():
            m.train(mode)
    return count
