"""Streaming joint moments of K members' activations, and the statistics matching methods need.

SKELETON: float64 torch implementation with Chan's merge. The statistics engine work replaces the
accumulation with the C++/CUDA kernels (csrc/correlation) behind the same API.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ActivationStats"]


class ActivationStats:
    """Joint first and second moments of the concatenated activations ``[X_1 | ... | X_K]``.

    ``sizes[k]`` is the number of neurons of block k (member k, or any block the caller defines);
    D = sum(sizes). Memory is O(D^2) whatever the number of samples. Blocks are addressed by index.

    Finalizers (float64, all (n_a, n_b) unless noted), with N the sample count and E the sample mean:
        mean(a) (n_a,), var(a) (n_a,), cov(a, b) = E[(x_a - mu_a)(x_b - mu_b)^T] (population, /N),
        corr(a, b), sqdist(a, b)[i, j] = E[(x_ai - x_bj)^2], cosine(a, b), gram(a, b) = sum_n x_a x_b^T.
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
        self._mean = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    # -- accumulation -------------------------------------------------------------------------
    def _concat(self, xs: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(xs, Tensor):
            x = xs
        else:
            if len(xs) != len(self.sizes):
                raise ValueError(f"expected {len(self.sizes)} blocks, got {len(xs)}")
            x = torch.cat([t.reshape(t.shape[0], -1) for t in xs], dim=1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}); got {tuple(x.shape)}")
        return x

    def update(self, xs: Tensor | Sequence[Tensor]) -> ActivationStats:
        """Add a batch: one (N, D) tensor, or K tensors (N, sizes[k])."""
        x = self._concat(xs).to(self.device, torch.float64)
        n = x.shape[0]
        if n == 0:
            return self
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        self._combine(n, mean_b, m2_b)
        return self

    def _combine(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._m2 += m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self._mean += delta * (n_b / n)
        self.count = n

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Combine with another state over disjoint samples (Chan et al.); in place, returns self."""
        if other.sizes != self.sizes:
            raise ValueError(f"cannot merge states with block sizes {other.sizes} into {self.sizes}")
        if other.count:
            self._combine(other.count, other._mean.to(self.device), other._m2.to(self.device))
        return self

    # -- finalizers ---------------------------------------------------------------------------
    def _sl(self, a: int | None) -> slice:
        if a is None:
            return slice(0, self.dim)
        if not 0 <= a < len(self.sizes):
            raise IndexError(f"block index {a} out of range for {len(self.sizes)} blocks")
        return slice(self.offsets[a], self.offsets[a + 1])

    def _need(self) -> None:
        if self.count == 0:
            raise ValueError("no samples were accumulated (empty calibration data?)")

    def mean(self, a: int | None = None) -> Tensor:
        self._need()
        return self._mean[self._sl(a)].clone()

    def cov(self, a: int | None = None, b: int | None = None) -> Tensor:
        self._need()
        b = a if b is None else b
        return self._m2[self._sl(a), self._sl(b)] / self.count

    def var(self, a: int | None = None) -> Tensor:
        s = self._sl(a)
        self._need()
        return torch.diagonal(self._m2)[s].clamp_min(0) / self.count

    def corr(self, a: int | None = None, b: int | None = None) -> Tensor:
        """Pearson correlation; a pair involving a zero-variance neuron has correlation 0."""
        b = a if b is None else b
        sa, sb = self.var(a).sqrt(), self.var(b).sqrt()
        denom = torch.outer(sa, sb)
        c = self.cov(a, b)
        return torch.where(denom > 0, c / denom.clamp_min(1e-300), torch.zeros_like(c))

    def gram(self, a: int | None = None, b: int | None = None) -> Tensor:
        """Raw (uncentered) sum over samples of x_a x_b^T."""
        b = a if b is None else b
        return (self.cov(a, b) + torch.outer(self.mean(a), self.mean(b))) * self.count

    def sqdist(self, a: int, b: int) -> Tensor:
        sa = self.gram(a, a).diagonal() / self.count
        sb = self.gram(b, b).diagonal() / self.count
        return (sa[:, None] + sb[None, :] - 2 * self.gram(a, b) / self.count).clamp_min(0)

    def cosine(self, a: int, b: int) -> Tensor:
        g = self.gram(a, b)
        na, nb = self.gram(a, a).diagonal().sqrt(), self.gram(b, b).diagonal().sqrt()
        denom = torch.outer(na, nb)
        return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))
