"""Streaming joint moments of K members' activations, and the statistics matching methods need.

The state of :class:`ActivationStats` is a *shifted* accumulation (DESIGN §5): a shift vector c (the mean of
the first batch's first 256 samples, rounded to float32), s1 = sum_n (x_n - c) and the lower triangle of
s2 = sum_n (x_n - c)(x_n - c)^T, all float64. Because c is close to the mean, the centered second moment
M2 = s2 - s1 s1^T / N suffers no cancellation: a mean offset of 1e3 with unit or smaller variance costs no
accuracy, unlike the one-pass formula E[x x^T] - E[x] E[x]^T in float32 (tests/test_stats.py shows both).

Accumulation is the op :func:`pyfusion.ops.accumulate_moments` (its backends: the C++ engine, csrc/correlation:
cache-blocked lower-triangle SYRK in float32 over panels of 256 samples with float64 accumulation, OpenMP; the
CUDA kernel for GPU tensors; the float64 reference for everything else: float64 input, no extension).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pyfusion.ops.moments import CONST_RTOL, accumulate_moments, all_finite, moment_shift

__all__ = ["ActivationStats", "CONST_RTOL"]


class ActivationStats:
    """Joint first and second moments of the concatenated activations ``[X_1 | ... | X_K]``.

    ``sizes[k]`` is the number of neurons of block k (member k, or any block the caller defines);
    D = sum(sizes). Memory is O(D^2) whatever the number of samples. Blocks are addressed by index
    (``None`` means all D neurons).

    Finalizers (float64, all (n_a, n_b) unless noted), with N the sample count and E the sample mean:
        mean(a) (n_a,), var(a) (n_a,), cov(a, b) = E[(x_a - mu_a)(x_b - mu_b)^T] (population, /N),
        corr(a, b), sqdist(a, b)[i, j] = E[(x_ai - x_bj)^2], cosine(a, b), gram(a, b) = sum_n x_a x_b^T.
    Each reads only the (a, b) block of the state (and the diagonals of (a, a), (b, b)).

    Zero-variance rule: a neuron is constant when its std <= ``CONST_RTOL`` * |mean| (1e-7), or its variance
    is exactly 0. ``corr`` is 0 for every pair involving a constant neuron (its diagonal entry included);
    ``cosine`` is 0 for every pair involving an all-zero neuron. Results are always finite and never NaN.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device | str | None = None):
        if len(sizes) == 0 or any(int(s) < 0 for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of non-negative block sizes; got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.dim = self.offsets[-1]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self._shift = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._s1 = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._s2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self.last_backend: str | None = None

    def __repr__(self) -> str:
        return f"ActivationStats(sizes={self.sizes}, count={self.count}, device={self.device})"

    # -- accumulation -------------------------------------------------------------------------
    def _concat(self, xs: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(xs, Tensor):
            x = xs
        else:
            if len(xs) != len(self.sizes):
                raise ValueError(f"xs must have {len(self.sizes)} blocks (one per size); got {len(xs)}")
            blocks = []
            for k, t in enumerate(xs):
                if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] != self.sizes[k]:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"xs[{k}] must have shape (N, {self.sizes[k]}); got {shape}")
                blocks.append(t)
            if len({t.shape[0] for t in blocks}) != 1:
                raise ValueError(f"all blocks must have the same sample count; got {[t.shape[0] for t in blocks]}")
            dtype = blocks[0].dtype
            for t in blocks[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
            x = torch.cat([t.to(self.device, dtype) for t in blocks], dim=1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}); got {tuple(x.shape)}")
        if not (x.is_floating_point()):
            raise ValueError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        return x.to(self.device)

    def update(self, xs: Tensor | Sequence[Tensor], *, check_finite: bool = True) -> ActivationStats:
        """Add a batch: one (N, D) tensor, or K tensors (N, sizes[k]); any strides, float16/bfloat16/float32/64.

        Raises ValueError (and changes nothing) on a wrong shape or, with ``check_finite``, NaN/inf values.
        """
        x = self._concat(xs)
        n = x.shape[0]
        if n == 0:
            return self
        if check_finite and not all_finite(x):
            raise ValueError("activations contain NaN or inf; statistics were not updated")
        if self.count == 0:
            self._shift = moment_shift(x)  # float32-representable: x - c is exact or correctly rounded in float32
        self.last_backend = accumulate_moments(x, self._shift, self._s1, self._s2)
        self.count += n
        return self

    def _centered(self) -> tuple[Tensor, Tensor]:
        """(mean (D,), full M2 = sum (x - mean)(x - mean)^T (D, D)), float64."""
        mu = self._s1 / self.count
        m2 = self._sym(slice(0, self.dim), slice(0, self.dim)) - torch.outer(self._s1, mu)
        return self._shift + mu, m2

    def _set_centered(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Store (count, mean, M2) in the shifted form, with a new float32-representable shift."""
        self.count = int(count)
        shift = mean.to(torch.float32).to(torch.float64)
        d = mean - shift
        self._shift = shift
        self._s1 = d * count
        self._s2 = (m2 + torch.outer(d, d) * count).contiguous()

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Combine with another state over disjoint samples (Chan et al. 1979); in place, returns self.

        M2 = M2_a + M2_b + delta delta^T n_a n_b / n with delta = mean_b - mean_a.
        """
        if other.sizes != self.sizes:
            raise ValueError(f"cannot merge states with block sizes {other.sizes} into {self.sizes}")
        if other.count == 0:
            return self
        mb, m2b = other._centered()
        mb, m2b = mb.to(self.device), m2b.to(self.device)
        if self.count == 0:
            self._set_centered(other.count, mb, m2b)
            return self
        ma, m2a = self._centered()
        na, nb = self.count, other.count
        n = na + nb
        delta = mb - ma
        self._set_centered(n, ma + delta * (nb / n), m2a + m2b + torch.outer(delta, delta) * (na * nb / n))
        return self

    def all_reduce(self, group: Any = None) -> ActivationStats:
        """Merge the states of all ranks of ``group`` (torch.distributed); every rank ends with the total.

        Exact Chan combination by all-reduces of count-weighted sums: mu = sum_r n_r mu_r / N, then
        M2 = sum_r (M2_r + n_r (mu_r - mu)(mu_r - mu)^T), which has no cancellation. Works on gloo (CPU) and
        nccl (state on the rank's GPU). Collective: every rank of the group must call it; a rank with no samples
        contributes nothing. Ranks whose states have different dimensions all raise ValueError.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("all_reduce needs an initialized torch.distributed process group")
        opts = {"dtype": torch.float64, "device": self.device}
        dims = torch.tensor([self.dim, -self.dim], **opts)  # max of both: all ranks equal iff max == -max(-dim)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        if int(dims[0]) != self.dim or int(-dims[1]) != self.dim:
            raise ValueError(f"ranks hold states of different dimensions (this rank: {self.dim})")
        total = torch.tensor([float(self.count)], **opts)
        dist.all_reduce(total, group=group)
        n_total = int(total.item())
        if n_total == 0:
            return self
        if self.count:
            mean, m2 = self._centered()
        else:
            mean = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
            m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        weighted = mean * self.count
        dist.all_reduce(weighted, group=group)
        mu = weighted / n_total
        delta = mean - mu
        part = m2 + torch.outer(delta, delta) * self.count if self.count else m2
        dist.all_reduce(part, group=group)
        self._set_centered(n_total, mu, part)
        return self

    # -- finalizers ---------------------------------------------------------------------------
    def _sl(self, a: int | None) -> slice:
        if a is None:
            return slice(0, self.dim)
        if not isinstance(a, int) or not 0 <= a < len(self.sizes):
            raise IndexError(f"block index {a} out of range for {len(self.sizes)} blocks")
        return slice(self.offsets[a], self.offsets[a + 1])

    def _need(self) -> None:
        if self.count == 0:
            raise ValueError("no samples were accumulated (empty calibration data?)")

    def _sym(self, sa: slice, sb: slice) -> Tensor:
        """Block (sa, sb) of the symmetric s2 from its lower triangle, touching only that block's storage."""
        if sa.start >= sb.stop:  # strictly below the diagonal
            return self._s2[sa, sb].clone()
        if sb.start >= sa.stop:  # strictly above: mirror of the (sb, sa) block
            return self._s2[sb, sa].T.clone()
        lo, hi = min(sa.start, sb.start), max(sa.stop, sb.stop)
        blk = self._s2[lo:hi, lo:hi]
        full = torch.tril(blk)
        full += torch.tril(blk, -1).T
        if (lo, hi) == (sa.start, sa.stop) == (sb.start, sb.stop):
            return full
        return full[sa.start - lo : sa.stop - lo, sb.start - lo : sb.stop - lo].clone()

    def _diag_s2(self, sa: slice) -> Tensor:
        return torch.diagonal(self._s2)[sa]

    def mean(self, a: int | None = None) -> Tensor:
        """Sample mean of block a, (n_a,) float64."""
        self._need()
        sa = self._sl(a)
        return self._shift[sa] + self._s1[sa] / self.count

    def var(self, a: int | None = None) -> Tensor:
        """Population variance of block a, (n_a,) float64, >= 0."""
        sa = self._sl(a)
        self._need()
        s1 = self._s1[sa]
        return ((self._diag_s2(sa) - s1 * s1 / self.count) / self.count).clamp_min(0)

    def cov(self, a: int | None = None, b: int | None = None) -> Tensor:
        """Population covariance block (n_a, n_b) = (s2_ab - s1_a s1_b^T / N) / N."""
        self._need()
        b = a if b is None else b
        sa, sb = self._sl(a), self._sl(b)
        out = self._sym(sa, sb).addr_(self._s1[sa], self._s1[sb], alpha=-1.0 / self.count)
        return out.div_(self.count)

    def _inv_std(self, a: int | None) -> Tensor:
        """1 / std of block a's neurons, 0 for constant neurons (class doc), (n_a,)."""
        var = self.var(a)
        std = var.sqrt()
        const = (var == 0) | (std <= CONST_RTOL * self.mean(a).abs())
        return torch.where(const, torch.zeros_like(std), 1.0 / torch.where(const, torch.ones_like(std), std))

    def corr(self, a: int | None = None, b: int | None = None) -> Tensor:
        """Pearson correlation block (n_a, n_b) in [-1, 1]; 0 for pairs with a constant neuron (class doc)."""
        b = a if b is None else b
        # Few full-size passes: the finalize is memory-bound, and each torch op is a thread-pool round trip.
        c = self.cov(a, b)
        c.mul_(self._inv_std(a)[:, None]).mul_(self._inv_std(b)[None, :])
        return c.clamp_(-1.0, 1.0)

    def gram(self, a: int | None = None, b: int | None = None) -> Tensor:
        """Raw (uncentered) sum over samples of x_a x_b^T, (n_a, n_b)."""
        self._need()
        b = a if b is None else b
        sa, sb = self._sl(a), self._sl(b)
        ca, cb = self._shift[sa], self._shift[sb]
        s1a, s1b = self._s1[sa], self._s1[sb]
        return self._sym(sa, sb) + torch.outer(s1a, cb) + torch.outer(ca, s1b) + torch.outer(ca, cb) * self.count

    def sqdist(self, a: int, b: int) -> Tensor:
        """Mean squared distance E[(x_ai - x_bj)^2] = var_ai + var_bj - 2 cov_ij + (mu_ai - mu_bj)^2, >= 0."""
        dm = self.mean(a)[:, None] - self.mean(b)[None, :]
        return (self.var(a)[:, None] + self.var(b)[None, :] - 2 * self.cov(a, b) + dm * dm).clamp_min(0)

    def cosine(self, a: int, b: int) -> Tensor:
        """Cosine similarity of the neurons' sample vectors, (n_a, n_b) in [-1, 1]; 0 with an all-zero neuron."""
        g = self.gram(a, b)
        na = self._raw_sq(a).sqrt()
        nb = self._raw_sq(b).sqrt()
        denom = torch.outer(na, nb)
        ok = denom > 0
        out = torch.where(ok, g / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))
        return out.clamp_(-1.0, 1.0)

    def _raw_sq(self, a: int | None) -> Tensor:
        """sum_n x_ai^2 = N (var + mean^2), (n_a,)."""
        return (self.var(a) + self.mean(a) ** 2) * self.count
