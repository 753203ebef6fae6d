"""Streaming joint moments of K members' activations, and the statistics matching methods need.

The state of :class:`ActivationStats` is a *shifted* accumulation (DESIGN §5): a shift vector c (the mean of
256 samples spread over the first batch, rounded to float32), s1 = sum_n (x_n - c) and the lower triangle of
s2 = sum_n (x_n - c)(x_n - c)^T, all float64. Because c is close to the mean, the centered second moment
M2 = s2 - s1 s1^T / N suffers no cancellation: a mean offset of 1e3 with unit or smaller variance costs no
accuracy, unlike the one-pass formula E[x x^T] - E[x] E[x]^T in float32 (tests/test_stats.py shows both).

The float32 kernels form the products (x - c)(x - c)^T, so their rounding grows with (x - c)^2, and c must stay
near the data. Taking c from the first batch alone fails when that batch is unrepresentative (one sample, then 20k
samples at offset 1e3: correlation errors of 4.6e-4 instead of 4e-8). So before each later batch its mean m_b (from
its column sums, which also serve as the finiteness check) and variance (from 64 rows spread over it) are
combined with the state's (Chan et al. 1979) into the mean mu and second moment M2 of all the data so far, and a
neuron's shift moves when

* this batch is far and heavy: ``N_b (m_b - c)^2 > DRIFT_FACTOR * M2`` and ``(m_b - c)^2 > DRIFT_FACTOR var_b``:
  the shift moves to m_b (the batch about to be accumulated is then centred), or else
* the shift has left the data: ``N (mu - c)^2 > DRIFT_FACTOR * M2``: the shift moves to mu;

(rounded to float32), and the state is moved with it, exactly, in float64: with d = c - c', ``s1 += N d``,
``s2 += s1 d^T + d s1^T + N d d^T`` (s1 before the update). The shift thus follows the data whatever the order (a
tiny first batch, sorted data, a jump of the offset), and the float32 rounding stays that of centred data (the
measurements are beside ``DRIFT_FACTOR``). An ordinary stream (batches alike) does not re-centre: its running mean
moves by ~std / sqrt(N). The check costs one column sum of the batch (in place of the float32 total the
finiteness check took) and about ten operations on (D,) vectors, which rule out almost every batch with the state's
M2 as a lower bound; only a batch they cannot rule out pays for the probe's variance and the exact criteria,
on the neurons they kept.

Accumulation is the op :func:`pyfusion.ops.accumulate_moments` (its backends: the BLAS path for the cross blocks of
``pairs`` (float32 torch.mm of the shifted batch over panels of 512 rows, float64 across panels); the C++ engine,
csrc/correlation:
cache-blocked lower-triangle SYRK in float32 over panels of 256 samples with float64 accumulation, OpenMP; the
CUDA kernel for GPU tensors; the float64 reference for everything else: float64 input, no extension). A batch given
as K CPU blocks of one float32 / float16 / bfloat16 dtype skips the (N, D) concatenation
(:func:`pyfusion.ops.moments.accumulate_moments_blocks`: on the BLAS path each block shifted into its own float32
buffer, one product per rectangle and panel of 512 rows, float64 across panels: correlation error ~1e-7 against
float64, that of the BLAS path; on the engine each row read from the blocks, bit for bit the concatenation's result;
tests/test_stats_hooks.py). With ``pairs``, only the diagonal and the pairs' blocks of the (D, D) state are
initialised (the rest is never read, and masked before a merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyfusion.ops.moments import CONST_RTOL, accumulate_moments, accumulate_moments_blocks, all_finite, moment_shift

__all__ = ["ActivationStats", "CONST_RTOL", "DRIFT_FACTOR"]

# Re-centring threshold (squared offsets in units of the variance; see the module docstring), measured on orders of
# 20k float32 samples of 24 correlated neurons (correlation error against float64; before = first-batch shift
# only; iid batches of 256 at offset 1e3: 3.6e-8, no re-centring). With 1.0: one sample then 20k at offset 1e3:
# 9.9e-10 (before: 4.6e-4); sorted by value at offset 1e3, std 1e-2: 5e-15 (6 re-centrings in 78 batches;
# before: 7.9e-7); 100 samples at 0 then 19900 at 1e3: 9.6e-12 (before: 4.4e-6); 10k at 0 then 10k at 1e3: 5.5e-8
# (2 re-centrings); 3000 single-sample batches: 1.9e-9 (9). 16 and 4 left the sorted and the 100-then-1e3 orders
# at 8e-7 / 4e-6; 0.25 re-centred 3x as often for no better result. A re-centring costs two float64 passes over the
# (D, D) state.
DRIFT_FACTOR = 1.0
# Rows (spread over the batch) from which a later batch's variance is estimated when the drift pre-check cannot rule
# a re-centring out (its mean comes from the column sums): to ~1/4 relative, plenty for a threshold of 1.
DRIFT_PROBE_ROWS = 64


class ActivationStats:
    """Joint first and second moments of the concatenated activations ``[X_1 | ... | X_K]``.

    ``sizes[k]`` is the number of neurons of block k (member k, or any block the caller defines);
    D = sum(sizes). Memory is O(D^2) whatever the number of samples. Blocks are addressed by index
    (``None`` means all D neurons).

    Finalizers (float64, all (n_a, n_b) unless noted), with N the sample count and E the sample mean:
        mean(a) (n_a,), var(a) (n_a,), cov(a, b) = E[(x_a - mu_a)(x_b - mu_b)^T] (population, /N),
        corr(a, b), sqdist(a, b)[i, j] = E[(x_ai - x_bj)^2], cosine(a, b), gram(a, b) = sum_n x_a x_b^T.
    Each reads only the (a, b) block of the state (and the diagonals of (a, a), (b, b)).

    ``pairs`` restricts the second moments to what the caller reads: None (default) accumulates every block pair;
    a list of block pairs ``(a, b)`` accumulates those cross (or within-block, for a == b) covariances and the
    variances of all neurons; ``"diag"`` only the means and variances. The C++ engine then skips the other macro
    blocks (activation matching of K = 2 members reads the cross block only: half the work of the whole lower
    triangle; REPAIR reads variances only). Finalizers of a pair that was not accumulated raise ValueError.

    Zero-variance rule: a neuron is constant when its std <= ``CONST_RTOL`` * |mean| (1e-7), or its variance
    is exactly 0. ``corr`` is 0 for every pair involving a constant neuron (its diagonal entry included);
    ``cosine`` is 0 for every pair involving an all-zero neuron. Results are always finite and never NaN.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        device: torch.device | str | None = None,
        pairs: Sequence[tuple[int, int]] | str | None = None,
    ):
        if len(sizes) == 0 or any(int(s) < 0 for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of non-negative block sizes; got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.pairs = self._check_pairs(pairs)
        self._rects: list[int] | None = None
        if self.pairs is not None:  # lower-triangle rectangles for the engine; [0, 0, 0, 0]: the diagonal alone
            self._rects = [0, 0, 0, 0]
            for a, b in sorted(self.pairs):
                self._rects += [self.offsets[a], self.offsets[a + 1], self.offsets[b], self.offsets[b + 1]]
        self.dim = self.offsets[-1]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.recentred_batches = 0  # batches before which the state was re-centred (module docstring)
        self._last_recentred = 0
        self._views: tuple = ((),)  # (ids of the state tensors, numpy views of them): _recentre_if_drifted
        self._shift = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._s1 = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self._s2 = self._new_s2()
        self.last_backend: str | None = None

    def _new_s2(self) -> Tensor:
        """The (D, D) second-moment state, zero where it is accumulated. On the CPU, numpy's zeros (calloc: a large
        block comes as fresh pages the kernel maps, already zero, on first touch) viewed 64-byte aligned as torch's own
        allocations are: no pass over the state, and with ``pairs`` only the pages the accumulation touches (the
        diagonal's and the pairs' rectangles') are ever mapped. Allocation + first update of an MLP-1024 pair's
        cross-block state (D = 2048, batch 512, 1 thread, loaded VM): 18.4 ms with torch.empty and zeroing the
        diagonal and the rectangle (7.5 ms of it the zeroing), 14.5 ms. Elsewhere, with ``pairs``, only the diagonal
        and the pairs' rectangles are zeroed (the rest is never read: :meth:`_centered` masks it)."""
        opts = {"dtype": torch.float64, "device": self.device}
        if self.device.type == "cpu":
            flat = np.zeros(self.dim * self.dim + 8)
            skip = (-flat.ctypes.data % 64) // 8  # numpy aligns to 16 bytes: start on a cache line
            return torch.from_numpy(flat[skip : skip + self.dim * self.dim].reshape(self.dim, self.dim))
        if self._rects is None:
            return torch.zeros(self.dim, self.dim, **opts)
        s2 = torch.empty(self.dim, self.dim, **opts)
        s2.diagonal().zero_()
        for i in range(0, len(self._rects), 4):
            r0, r1, c0, c1 = self._rects[i : i + 4]
            s2[r0:r1, c0:c1].zero_()
        return s2

    def _accumulated(self) -> Tensor | None:
        """(D, D) bool mask of the entries of the symmetric second moments that are accumulated (the diagonal and the
        pairs' blocks, both orientations), or None when all are."""
        if self._rects is None:
            return None
        mask = torch.zeros(self.dim, self.dim, dtype=torch.bool, device=self.device)
        mask.diagonal().fill_(True)
        for i in range(0, len(self._rects), 4):
            r0, r1, c0, c1 = self._rects[i : i + 4]
            mask[r0:r1, c0:c1] = True
            mask[c0:c1, r0:r1] = True
        return mask

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

    def _state(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._shift, self._s1, self._s2

    def _blocks(self, xs: Tensor | Sequence[Tensor]) -> list[Tensor] | None:
        """The K blocks of a batch given as K CPU tensors of one float32 / float16 / bfloat16 dtype (the BLAS path
        and the engine read the blocks themselves, :func:`pyfusion.ops.moments.accumulate_moments_blocks`); None
        otherwise (concatenate)."""
        if isinstance(xs, Tensor) or self.device.type != "cpu" or len(xs) != len(self.sizes):
            return None
        for k, t in enumerate(xs):
            if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] != self.sizes[k] or t.device.type != "cpu":
                return None
            if t.dtype != xs[0].dtype or t.shape[0] != xs[0].shape[0] or t.dtype == torch.float64:
                return None
        if not xs[0].is_floating_point():
            return None
        return list(xs)

    def update(self, xs: Tensor | Sequence[Tensor], *, check_finite: bool = True) -> ActivationStats:
        """Add a batch: one (N, D) tensor, or K tensors (N, sizes[k]); any strides, float16/bfloat16/float32/64.

        Raises ValueError (and changes nothing) on a wrong shape or, with ``check_finite``, NaN/inf values.
        """
        blocks = self._blocks(xs)
        if blocks is not None and accumulate_moments_blocks(blocks, *self._state(), self._rects, dry_run=True) is None:
            blocks = None  # the engine's path: on the concatenation, as before (same column sums, same shifts)
        x = self._concat(xs) if blocks is None else None
        n = x.shape[0] if x is not None else blocks[0].shape[0]  # type: ignore[index]
        if n == 0:
            return self
        parts = [x] if x is not None else blocks
        if self.count == 0:
            if check_finite and not all(all_finite(t) for t in parts):  # type: ignore[union-attr]
                raise ValueError("activations contain NaN or inf; statistics were not updated")
            # float32-representable: x - c is exact or correctly rounded in float32 (column-wise: per block alike)
            self._shift = torch.cat([moment_shift(t) for t in parts]) if x is None else moment_shift(x)  # type: ignore[union-attr]
        else:
            # one pass gives the finiteness check (as all_finite: a non-finite sum triggers the exact check) and the
            # batch mean for the drift check; float32 column sums cost what the float32 total did
            sums = [t.sum(0, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in parts]  # type: ignore[union-attr]
            colsum = sums[0] if len(sums) == 1 else torch.cat(sums)
            colsum = colsum.numpy() if self.device.type == "cpu" else colsum
            if check_finite and not bool(colsum.isfinite().all() if isinstance(colsum, Tensor) else
                                         np.isfinite(colsum).all()) and not all(bool(torch.isfinite(t).all())
                                                                                for t in parts):  # fmt: skip
                raise ValueError("activations contain NaN or inf; statistics were not updated")
            self._recentre_if_drifted(x if x is not None else blocks, colsum, n)  # type: ignore[arg-type]
        backend = None
        if blocks is not None:
            backend = accumulate_moments_blocks(blocks, *self._state(), self._rects)
        if backend is None:
            x = self._concat(blocks) if x is None else x  # (the dry run said yes: not expected)
            backend = accumulate_moments(x, self._shift, self._s1, self._s2, self._rects)  # type: ignore[arg-type]
        self.last_backend = backend
        self.count += n
        self.recentred_batches += self._last_recentred
        return self

    def _recentre_if_drifted(self, x: Tensor | list[Tensor], colsum: np.ndarray | Tensor, n_b: int) -> None:
        """Move the shift of the neurons that drifted (module docstring) and re-express the state about the new
        shift, exactly in float64. ``colsum`` (D,) are the column sums of the batch x (numpy for a CPU state), x
        the batch (N_b, D) or its K column blocks, ``n_b`` its rows. Sets ``_last_recentred``.

        A pre-check with the batch's exact mean and the state's M2 (a lower bound of the combined one: M2 only
        grows) rules out almost every batch in about 14 operations on (D,) vectors, in numpy for a CPU state (views
        of the state, ~1 us an operation against torch's 3 us); only a batch it cannot rule out pays for the
        variance of the probe rows and the exact criteria, on the columns of the neurons it kept alone (D = 2048,
        5 such neurons: 0.2 ms against 0.76 ms on all D).
        """
        self._last_recentred = 0
        n_s = self.count
        n = n_s + n_b
        cpu = isinstance(colsum, np.ndarray)
        if cpu:
            key = (id(self._shift), id(self._s1), id(self._s2))
            if self._views[0] != key:  # numpy views of the state, made again only when a tensor is replaced
                self._views = (key, self._shift.numpy(), self._s1.numpy(), self._s2.numpy().diagonal())
            shift, s1, diag = self._views[1:]
        else:
            shift, s1, diag = self._shift, self._s1, torch.diagonal(self._s2)
        e_b = colsum - shift * n_b  # n_b * (batch mean - shift), float64 (the shift is)
        a = s1 + e_b  # n * (mean of state + batch - shift)
        lim = (diag - s1 * s1 / n_s) * (DRIFT_FACTOR * n_b)  # factor * n_b * M2 of the state (<= of state + batch)
        # to-mean criterion n (mu - c)^2 > factor M2, to-batch criterion n_b (m_b - c)^2 > factor M2, times n_b
        lhs = a * a * (n_b / n)
        maybe = (lhs > lim) | (e_b * e_b > lim)
        if not maybe.any():  # (cheaper than the candidates' indices: the usual batch ends here)
            return
        # the exact criteria only for the neurons the pre-check keeps (usually a few nearly dead ones: the state's M2
        # is ~0 there), on their columns of the probe rows: every criterion is per neuron
        if cpu:
            cand_np = np.flatnonzero(maybe)
            cand = torch.from_numpy(cand_np)
            e_b, s1, a, diag = (torch.from_numpy(v[cand_np]) for v in (e_b, s1, a, diag))
        else:
            cand = maybe.nonzero().flatten()
            e_b, s1, a, diag = e_b[cand], s1[cand], a[cand], diag[cand]
        shift = self._shift[cand]
        d_b = e_b / n_b  # batch mean - shift
        d_s = s1 / n_s  # state mean - shift
        d_all = a / n
        step = -(-n_b // DRIFT_PROBE_ROWS)
        if isinstance(x, Tensor):
            probe = x[::step][:, cand]
        else:  # the candidates' columns of each block (cand is sorted: block order is column order)
            pieces = []
            for k, t in enumerate(x):
                o0, o1 = self.offsets[k], self.offsets[k + 1]
                sel = cand[(cand >= o0) & (cand < o1)]
                if sel.numel():
                    pieces.append(t[::step][:, sel - o0])
            probe = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        probe = probe.to(torch.float64) - shift
        v_b = (probe - (d_b if step == 1 else probe.mean(0))).square_().mean(0)  # batch variance (probe rows)
        # Chan: M2 of state + batch
        m2 = (diag - s1 * d_s).clamp_min_(0).add_(v_b, alpha=n_b)
        m2.add_((d_b - d_s).square_(), alpha=n_s * n_b / n).mul_(DRIFT_FACTOR)
        # the running mean left the shift, or this batch alone would add a large share of rounding
        to_mean = d_all.square() * n > m2
        excess = d_b.square()
        to_batch = (excess * n_b > m2) & (excess > DRIFT_FACTOR * v_b)
        moved = to_mean | to_batch
        if not bool(moved.any()):
            return
        step_to = torch.where(to_batch, d_b, d_all) + shift
        new = self._shift.clone()
        new[cand[moved]] = step_to[moved].to(torch.float32).to(torch.float64)
        self._move_shift(new)
        self._last_recentred = 1

    def _move_shift(self, new: Tensor) -> None:
        """Re-express the state about the shift ``new`` (D,), exactly in float64 (the statistics do not change):
        with d = c - c', ``s1 += N d`` and ``s2 += s1 d^T + d s1^T + N d d^T = u d^T + d u^T``, u = s1 + N d / 2
        (only the lower triangle of s2 is read).

        d is non-zero only at the neurons whose shift moved (usually a few: a neuron nearly dead on the first
        batch), so only their rows and columns change: O(D m) for m moved neurons instead of two passes over the
        (D, D) state (7 re-centrings cost 0.6 of 8 s of an activation matching at D = 2048 under load). With
        ``pairs``, only the accumulated entries (the pairs' rectangles and the diagonal) are updated: the others are
        never read, and their pages were never mapped (touching a moved neuron's whole column mapped the whole
        (D, D) allocation: 1.2 ms a re-centring at D = 2048, 0.05 ms restricted)."""
        d = self._shift - new  # x - new = (x - shift) + d
        u = self._s1 + d * (0.5 * self.count)
        moved = d.nonzero().flatten()
        few = moved.numel() * 4 < self.dim
        if self._rects is not None:
            self._move_restricted(u, d, moved if few else None)
        elif few:
            dm = d[moved]
            self._s2.index_add_(1, moved, torch.outer(u, dm)).index_add_(0, moved, torch.outer(dm, u))
        else:
            # addcmul_, not addr_: the same element-wise kernel as _move_restricted's (equal bits on what both hold)
            self._s2.addcmul_(u[:, None], d[None, :]).addcmul_(d[:, None], u[None, :])
        self._s1 = self._s1 + d * self.count
        self._shift = new

    def _move_restricted(self, u: Tensor, d: Tensor, moved: Tensor | None) -> None:
        """:meth:`_move_shift`'s ``s2 += u d^T + d u^T`` on the accumulated entries of a ``pairs`` state: each
        rectangle (rows R, columns C) gets ``u_R d_C^T + d_R u_C^T`` (a within-block square holds its diagonal), the
        rest of the diagonal ``u d + d u``, by the full state's operations (a ``pairs`` state equals it bit for bit on
        what it holds). ``moved``: the indices where d != 0 (only their rows / columns change), or None to update the
        rectangles whole."""
        s2 = self._s2
        covered = torch.zeros(self.dim, dtype=torch.bool, device=self.device)
        for i in range(4, len(self._rects), 4):  # type: ignore[arg-type]
            r0, r1, c0, c1 = self._rects[i : i + 4]  # type: ignore[index]
            blk = s2[r0:r1, c0:c1]
            if (r0, r1) == (c0, c1):
                covered[r0:r1] = True
            if moved is None:
                blk.addcmul_(u[r0:r1, None], d[None, c0:c1]).addcmul_(d[r0:r1, None], u[None, c0:c1])
                continue
            cols = moved[(moved >= c0) & (moved < c1)]
            rows = moved[(moved >= r0) & (moved < r1)]
            if cols.numel():
                blk.index_add_(1, cols - c0, torch.outer(u[r0:r1], d[cols]))
            if rows.numel():
                blk.index_add_(0, rows - r0, torch.outer(d[rows], u[c0:c1]))
        diag = torch.diagonal(s2)
        rest = ~covered if moved is None else moved[~covered[moved]]
        ur, dr = u[rest], d[rest]
        if moved is None:  # the full state's two addcmul_ on its diagonal
            diag[rest] = diag[rest].addcmul_(ur, dr).addcmul_(dr, ur)
        else:  # its two index_add_ of u d
            ud = ur * dr
            diag[rest] = diag[rest] + ud + ud

    def _centered(self) -> tuple[Tensor, Tensor]:
        """(mean (D,), full M2 = sum (x - mean)(x - mean)^T (D, D)), float64."""
        mu = self._s1 / self.count
        m2 = self._sym(slice(0, self.dim), slice(0, self.dim)) - torch.outer(self._s1, mu)
        mask = self._accumulated()
        if mask is not None:  # entries outside the pairs are uninitialised memory: 0, so merges stay finite
            m2 = torch.where(mask, m2, torch.zeros((), dtype=m2.dtype, device=m2.device))
        return self._shift + mu, m2

    def _set_centered(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Store (count, mean, M2) in the shifted form, with a new float32-representable shift."""
        self.count = int(count)
        shift = mean.to(torch.float32).to(torch.float64)
        d = mean - shift
        self._shift = shift
        self._s1 = d * count
        self._s2 = (m2 + torch.outer(d, d) * count).contiguous()
        self._views = ((),)  # the cached numpy views would keep the old (D, D) state alive

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Combine with another state over disjoint samples (Chan et al. 1979); in place, returns self.

        M2 = M2_a + M2_b + delta delta^T n_a n_b / n with delta = mean_b - mean_a.
        """
        if other.sizes != self.sizes:
            raise ValueError(f"cannot merge states with block sizes {other.sizes} into {self.sizes}")
        if other.pairs != self.pairs:
            raise ValueError(f"cannot merge states of block pairs {other.pairs} into {self.pairs}")
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

    def _check_pairs(self, pairs: Sequence[tuple[int, int]] | str | None) -> frozenset[tuple[int, int]] | None:
        """``pairs`` as a set of (larger, smaller) block indices (the lower-triangle block), or None for all."""
        if pairs is None:
            return None
        if isinstance(pairs, str):
            if pairs != "diag":
                raise ValueError(f"pairs must be None, 'diag' or a list of block pairs (a, b); got {pairs!r}")
            return frozenset()
        out = set()
        for p in pairs:
            if len(p) != 2 or not all(isinstance(i, int) and 0 <= i < len(self.sizes) for i in p):
                raise ValueError(
                    f"pairs must hold block index pairs (a, b) with 0 <= a, b < {len(self.sizes)}; got {p}"
                )
            out.add((max(p), min(p)))
        return frozenset(out)

    def _check_read(self, a: int | None, b: int | None) -> None:
        """The (a, b) block of the second moments was accumulated (``pairs``), else ValueError."""
        if self.pairs is None:
            return
        if a is not None and b is not None:
            self._sl(a), self._sl(b)  # IndexError for a bad index first
            if (max(a, b), min(a, b)) in self.pairs:
                return
        have = "the means and variances only" if not self.pairs else f"the block pairs {sorted(self.pairs)}"
        raise ValueError(
            f"the second moments of blocks ({a}, {b}) were not accumulated: these statistics hold {have} "
            "(ActivationStats(pairs=...)); collect them with pairs=None"
        )

    def _sym(self, sa: slice, sb: slice) -> Tensor:
        """Block (sa, sb) of the symmetric s2 from its lower triangle, touching only that block's storage."""
        if sa.start >= sb.stop:  # strictly below the diagonal
            return self._s2[sa, sb].clone()
        if sb.start >= sa.stop:  # strictly above: mirror of the (sb, sa) block
            # always a copy (callers modify it in place), row-major (a plain clone() keeps the transposed strides):
            # the block copied as it is stored, then transposed from that contiguous copy (torch's blocked transpose
            # applies to a whole contiguous matrix only: the strided block's direct transposed copy took 5.5 ms of a
            # (1024, 1024) float64 block, 1 thread, against 4.1 ms for both steps)
            return self._s2[sb, sa].clone().T.contiguous()
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
        self._check_read(a, b)
        sa, sb = self._sl(a), self._sl(b)
        out = self._sym(sa, sb).addr_(self._s1[sa], self._s1[sb], alpha=-1.0 / self.count)
        return out.div_(self.count)

    def constant(self, a: int | None = None) -> Tensor:
        """The constant neurons of block a by the zero-variance rule (class doc), (n_a,) bool: the neurons ``corr``
        gives 0 with every other."""
        var = self.var(a)
        return (var == 0) | (var.sqrt() <= CONST_RTOL * self.mean(a).abs())

    def _inv_std(self, a: int | None) -> Tensor:
        """1 / std of block a's neurons, 0 for constant neurons (class doc), (n_a,)."""
        std = self.var(a).sqrt()
        const = self.constant(a)
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
        self._check_read(a, b)
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
