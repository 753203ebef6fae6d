"""One-shot neuron correlation between two activation matrices, registered with ``torch.library``.

``correlation(x, y)`` streams ``[x | y]`` through :class:`pyfusion.stats.ActivationStats` (the C++ / CUDA
correlation engine, or the float64 torch path) and returns the (x, y) block of the Pearson correlation.
The result is always float64 (whatever the input dtype): correlations feed assignment costs, where float32
rounding of near-ties changes matchings. Forward only (no autograd formula). The float64 reference is
:func:`pyfusion.ops.reference.correlation_ref`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["correlation"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, Dx); got shape {tuple(x.shape)}")
    if y.ndim != 2:
        raise ValueError(f"y must have shape (N, Dy); got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]}, Dy) like x's N; got shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x and y must have at least one sample (N >= 1); got N = 0")
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device; got {x.device} and {y.device}")


@torch.library.custom_op("pyfusion::correlation", mutates_args=())
def _correlation_op(x: Tensor, y: Tensor) -> Tensor:
    stats = ActivationStats([x.shape[1], y.shape[1]], device=x.device)
    stats.update([x, y])
    return stats.corr(0, 1).contiguous()


@_correlation_op.register_fake
def _(x: Tensor, y: Tensor) -> Tensor:
    torch._check(x.ndim == 2 and y.ndim == 2, lambda: "x and y must be 2-D")
    torch._check(x.shape[0] == y.shape[0], lambda: "x and y must have the same number of samples")
    return x.new_empty((x.shape[1], y.shape[1]), dtype=torch.float64)


def correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation between the neurons (columns) of x and y.

    Args:
        x: (N, Dx) activations (float16 / bfloat16 / float32 / float64, any strides).
        y: (N, Dy) activations on the same samples and device.

    Returns:
        (Dx, Dy) float64: corr[i, j] = cov(x_i, y_j) / (std(x_i) std(y_j)) with population moments, in
        [-1, 1]; 0 for pairs involving a constant column (std <= 1e-7 |mean|, or exactly 0): never NaN.
        Non-finite input raises ValueError.
    """
    _check(x, y)
    return _correlation_op(x, y)
