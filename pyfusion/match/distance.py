"""Distances between neurons given as feature rows: the one squared-distance and correlation cost of pyfusion.

Every method that compares neurons by a feature vector (weights, pcd, OT ground costs, the dead-neuron
tie-break, the slot alignment of neuron interpolation) calls these; the statistics engine has its own finalizers
for activation costs (:meth:`pyfusion.stats.ActivationStats.sqdist`, ``corr``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["combine_costs", "correlation_cost", "sqdist", "sqdist_from_gram"]


def sqdist_from_gram(sq_a: Tensor, sq_b: Tensor, cross: Tensor, *, clamp: bool = True) -> Tensor:
    """Squared Euclidean distances from inner products: ``d_ij = sq_a[i] + sq_b[j] - 2 cross[i, j]``.

    Args:
        sq_a: (n_a,) squared norms of the first set.
        sq_b: (n_b,) squared norms of the second set.
        cross: (n_a, n_b) inner products.
        clamp: set the (rounding-only) negative entries to 0.

    Returns:
        (n_a, n_b), the dtype of the inputs.
    """
    d = sq_a[:, None] + sq_b[None, :] - 2.0 * cross
    return d.clamp_min_(0.0) if clamp else d


def sqdist(a: Tensor, b: Tensor, *, exact: bool = False, sq_norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Squared Euclidean distances between the rows of ``a`` (n_a, F) and ``b`` (n_b, F): (n_a, n_b), >= 0.

    ``sq_norms``: the rows' sums of squares ((n_a,), (n_b,)) when the caller has them (partial fusion's feature
    gather computes them while copying the rows: :func:`pyfusion.match.align.aligned_features`); ignored with
    ``exact``.

    The default is one GEMM, ``||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (negative rounding clamped to 0).
    ``exact=True`` forms every difference, ``sum_f (a_if - b_jf)^2`` (O(n_a n_b F) memory: small blocks only),
    which is exactly 0 for identical rows; the dead-neuron tie-break of the activation costs needs that.
    """
    if exact:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    # sqdist_from_gram's arithmetic ((sq_a + sq_b) - 2 cross, then the clamp) in place on the two buffers: the
    # same values bit for bit without two more (n_a, n_b) temporaries (3 x 1024 x 1024 for an MLP-1024 pair)
    sq_a, sq_b, cross = _gram_parts(a, b, sq_norms)
    cross.mul_(2.0)
    d = sq_a[:, None] + sq_b[None, :]
    return d.sub_(cross).clamp_min_(0.0)


# a @ b.T from csrc/gemm from this many multiply-adds on (smaller: the call and packing cost more than they save)
_GEMM_MIN_MACS = 1 << 21


def _gemm_kernel(a: Tensor, b: Tensor) -> Any:
    """``pyfusion._C`` when its AVX-512 float64 kernel (``gemm_abt_f64``, csrc/gemm) computes ``a @ b.T`` here,
    else None (torch's BLAS then). Why the kernel: torch's MKL runs its AVX2 code on non-Intel CPUs; one core of
    an AMD EPYC (Zen 5) VM, float64 512 x 512 x 3456 (a VGG11 layer's weight cost at alpha 0.25): MKL 30.4 ms (60
    GFLOPS), the kernel 17.4 ms (104); 1024 x 1024 x 768: 25.9 -> 13.8 ms. On Intel CPUs MKL uses AVX-512
    itself and stays. Each entry is still one dot product of the two rows in float64 (a different summation
    order than MKL's: equal to it to rounding, not bit for bit)."""
    from pyfusion import _ext
    from pyfusion.dispatch import forced_backend

    ext = _ext._C
    if ext is None or not hasattr(ext, "gemm_abt_f64") or not _gemm_usable(ext):
        return None
    # a global PYFUSION_BACKEND other than cpp (reference, torch: debugging, A/B runs) takes torch's product too
    if forced_backend("sqdist") not in (None, "cpp"):
        return None
    if a.dtype != torch.float64 or b.dtype != torch.float64 or a.device.type != "cpu" or b.device.type != "cpu":
        return None
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        return None
    if a.shape[0] * b.shape[0] * a.shape[1] < _GEMM_MIN_MACS:
        return None
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return None
    return ext


@functools.cache
def _gemm_usable(ext: Any) -> bool:
    """The kernel runs here (AVX-512F) and beats torch's BLAS (oneMKL on a non-Intel CPU runs AVX2 code)."""
    from pyfusion import _ext

    return bool(ext.gemm_abt_f64_supported()) and _ext.mkl_avx2_vendor() is not None


def _gram_parts(a: Tensor, b: Tensor, sq_norms: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(squared norms of a's rows (n_a,), of b's (n_b,), ``a @ b.T`` (n_a, n_b)): from csrc/gemm where
    :func:`_gemm_kernel` says so (the norms summed while it packs the rows: no second pass over a and b, 5.5 ms
    of a VGG11 pair's fusion at alpha 0.25), else :func:`_row_sq_norms` and torch's product. ``sq_norms``, when
    given, are the norms (neither the kernel nor :func:`_row_sq_norms` computes them then)."""
    if sq_norms is not None and (sq_norms[0].shape != a.shape[:1] or sq_norms[1].shape != b.shape[:1]):
        raise ValueError(
            f"sq_norms must have shapes ({a.shape[0]},) and ({b.shape[0]},); got {tuple(sq_norms[0].shape)} and "
            f"{tuple(sq_norms[1].shape)}"
        )
    ext = _gemm_kernel(a, b)
    if ext is None:
        if sq_norms is not None:
            return sq_norms[0], sq_norms[1], a @ b.T
        return _row_sq_norms(a), _row_sq_norms(b), a @ b.T
    m, n, k = int(a.shape[0]), int(b.shape[0]), int(a.shape[1])
    # the kernel reads rows of unit column stride at a row stride >= k (not an expanded or column-major view)
    a = a if a.stride(1) == 1 and a.stride(0) >= k else a.contiguous()
    b = b if b.stride(1) == 1 and b.stride(0) >= k else b.contiguous()
    out = torch.empty(m, n, dtype=torch.float64)
    if sq_norms is not None:
        ext.gemm_abt_f64(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, a.stride(0), b.stride(0), n,
                         torch.get_num_threads())  # fmt: skip
        return sq_norms[0], sq_norms[1], out
    sq_a = torch.empty(m, dtype=torch.float64)
    sq_b = torch.empty(n, dtype=torch.float64)
    ext.gemm_abt_f64(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, a.stride(0), b.stride(0), n,
                     torch.get_num_threads(), sq_a.data_ptr(), sq_b.data_ptr())  # fmt: skip
    return sq_a, sq_b, out


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` (n_a, n_b) as :func:`sqdist` forms it (:func:`_gram_parts`)."""
    return _gram_parts(a, b)[2]


def _row_sq_norms(x: Tensor, chunk_bytes: int = 1 << 18) -> Tensor:
    """``(x * x).sum(1)`` for a 2-D ``x`` (the same values: every row is reduced on its own), squaring blocks of
    rows into one small buffer instead of a fresh copy of ``x``: a new (512, 3456) float64 tensor costs its page
    faults every time, 3.2 -> 1.8 ms for the norms of one VGG11 feature matrix (1 thread, loaded 2-core VM)."""
    if x.dim() != 2 or not x.dtype.is_floating_point or x.numel() * x.element_size() <= 4 * chunk_bytes:
        return (x * x).sum(1)
    rows = max(1, chunk_bytes // max(1, x.shape[1] * x.element_size()))
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    buf = torch.empty(min(rows, x.shape[0]), x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], rows):
        part = x[i : i + rows]
        torch.sum(torch.mul(part, part, out=buf[: part.shape[0]]), 1, out=out[i : i + rows])
    return out


def correlation_cost(a: Tensor, b: Tensor) -> Tensor:
    """``1 - Pearson correlation`` of the rows of ``a`` (n_a, F) and ``b`` (n_b, F): (n_a, n_b) in [0, 2].

    A constant row has correlation 0 with every row (cost 1): it carries no signal to match on.
    """
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    a = a / torch.where(na > 0, na, torch.ones_like(na))[:, None]
    b = b / torch.where(nb > 0, nb, torch.ones_like(nb))[:, None]
    return 1.0 - (a @ b.T).clamp(-1.0, 1.0)


def combine_costs(costs: Sequence[Tensor]) -> Tensor:
    """Average of cost matrices each normalised to sum 1 (one that sums to 0 is kept as is); one is returned as is.

    This is the pcd rule of partial fusion (Morelli & Eckstein 2026, ``combine_costs``): the incoming- and
    outgoing-weight costs have different scales, and each should weigh the same.
    """
    if not costs:
        raise ValueError("combine_costs needs at least one cost matrix; got none")
    if len(costs) == 1:
        return costs[0]
    normed = [c / c.sum() if float(c.sum()) > 0 else c for c in costs]
    return sum(normed) / len(normed)
