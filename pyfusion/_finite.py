"""The finiteness test shared by the layers (torch only: importing it loads no engine)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(x: Tensor) -> bool:
    """Whether the floating-point tensor ``x`` has no NaN / inf, without a full-size boolean temporary.

    A finite sum proves every entry finite (one NaN makes the sum NaN, an inf makes it inf or NaN); only when the
    sum is not finite (a bad entry, or finite entries overflowing) is the exact elementwise test run. Low-precision
    tensors are summed in float32, float64 ones in float64. The sum reads the tensor once; ``isfinite(x).all()``
    also writes a bool tensor of the same size (64 MiB: ~5 ms against ~15 ms; a VGG11 pair's parameters: 27 -> 8 ms,
    1 thread).
    """
    if bool(torch.isfinite(x.sum(dtype=torch.float32 if x.dtype != torch.float64 else torch.float64))):
        return True
    return bool(torch.isfinite(x).all())
