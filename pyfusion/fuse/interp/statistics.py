"""Least-squares statistics of neuron-interpolation fusion: Gram products of the fused inputs and the targets.

For a fit with sites P (Linear, Conv2d or ``addmm`` producers summed into one target), the design X holds, per
output position, the fused model's inputs of every site side by side (unfolded patches for a convolution) plus a
ones column when the fit has an intercept; the targets T are the members' values at the target and the extra
columns the fit subtracts (passthroughs, constants). Only ``G = X^T X``, ``C = X^T T`` and the squared column norms
of T are needed (never X itself): they are accumulated chunk by chunk. With ``dtype=float32`` G goes through the
C++ statistics engine (:class:`pyfusion.stats.ActivationStats`: blocked lower-triangle SYRK, float32 products over
panels of 256 rows, float64 accumulation) when it is built, and C through float32 GEMMs over blocks of at most
:data:`ROW_BLOCK` rows accumulated in float64; ``dtype=float64`` makes every product float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion import _ext

__all__ = ["LSAccumulator", "ROW_BLOCK", "conv_patches", "design", "ls_statistics", "target_rows"]

# rows per float32 product before it is added to the float64 sums (bounds the float32 accumulation length)
ROW_BLOCK = 4096


def conv_patches(
    u: Tensor,
    kernel: tuple[int, int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Unfolded patches (N*Ho*Wo, C*kh*kw) of ``u`` (N, C, H, W), in F.unfold's (C, kh, kw) column order and
    (n, h, w) row order.

    Strided views + one copy instead of F.unfold (im2col): on the shared 2-core VM im2col took 416 ms vs 44 ms for
    this on a (64, 16, 14, 14) input with 2 threads under load.
    """
    kh, kw = kernel
    sh, sw = (list(stride) * 2)[:2] if len(stride) == 1 else stride
    ph, pw = (list(padding) * 2)[:2] if len(padding) == 1 else padding
    dh, dw = (list(dilation) * 2)[:2] if len(dilation) == 1 else dilation
    up = F.pad(u, (pw, pw, ph, ph)) if ph or pw else u
    v = up.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(-1, u.shape[1] * kh * kw)


def design(kind: str, u: Tensor, weight_shape: Sequence[int], conv: tuple | None = None) -> Tensor:
    """A site's design rows (without the ones column) for its input chunk ``u``.

    Args:
        kind: "linear" (rows = every leading position, ``u.reshape(-1, in)``), "addmm" (u is 2-D already) or
            "conv2d" (unfolded patches).
        weight_shape: the weight's shape (conv: (out, C, kh, kw); linear: (out, in); addmm: (in, out)).
        conv: (stride, padding, dilation) of a conv2d.
    """
    if kind == "conv2d":
        assert conv is not None
        return conv_patches(u, (int(weight_shape[2]), int(weight_shape[3])), *conv)
    cols = int(weight_shape[1]) if kind == "linear" else int(weight_shape[0])
    return u.reshape(-1, cols)


def target_rows(a: Tensor, dim: int = 1, dtype: torch.dtype | None = None) -> Tensor:
    """A value as rows (positions, neurons): the neuron dim ``dim`` moved last, the rest flattened in order."""
    t = a.movedim(dim, -1)
    t = t.reshape(-1, t.shape[-1])
    return t if dtype is None else t.to(dtype)


class LSAccumulator:
    """Streams design rows X (rows, p) and target rows T (rows, q) into ``G = [X 1]^T [X 1]``, ``C = [X 1]^T T``
    and ``ns = ||T||^2`` per column (float64), without storing either.

    Args:
        p: design columns (without the ones column).
        q: target columns.
        bias: append the ones column (its Gram entries are the column sums and the row count).
        dtype: precision of the per-block products (see the module docstring).
    """

    def __init__(self, p: int, q: int, bias: bool, dtype: torch.dtype = torch.float32):
        self.p, self.q, self.bias, self.dtype = int(p), int(q), bool(bias), dtype
        self._syrk = None
        if dtype == torch.float32 and _ext.EXT_AVAILABLE and p > 0:
            from pyfusion.stats.activation_stats import ActivationStats

            self._syrk = ActivationStats([self.p])
        self.gxx = torch.zeros(self.p, self.p, dtype=torch.float64)
        self.sx = torch.zeros(self.p, dtype=torch.float64)
        self.c = torch.zeros(self.p, self.q, dtype=torch.float64)
        self.st = torch.zeros(self.q, dtype=torch.float64)
        self.ns = torch.zeros(self.q, dtype=torch.float64)
        self.count = 0

    def update(self, x: Tensor, t: Tensor) -> None:
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"design has {x.shape[0]} rows, targets {t.shape[0]} (shape mismatch)")
        if x.shape[1] != self.p or t.shape[1] != self.q:
            raise ValueError(f"expected ({self.p}, {self.q}) columns; got ({x.shape[1]}, {t.shape[1]})")
        x = x.to(self.dtype)
        t = t.to(self.dtype)
        if self._syrk is not None:
            self._syrk.update(x.contiguous(), check_finite=False)
        for s in range(0, x.shape[0], ROW_BLOCK):
            xb, tb = x[s : s + ROW_BLOCK], t[s : s + ROW_BLOCK]
            if self._syrk is None:
                self.gxx += (xb.T @ xb).double()
                self.sx += xb.sum(0).double()
            self.c += (xb.T @ tb).double()
            self.st += tb.sum(0).double()
            self.ns += (tb * tb).sum(0).double()
        self.count += int(x.shape[0])

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(G (p+b, p+b), C (p+b, q), ns (q,)), float64.

        Raises:
            ValueError: no rows, or NaN / inf in the inputs.
        """
        if self.count == 0:
            raise ValueError("no calibration rows reached this level")
        if self._syrk is not None:
            g = self._syrk.gram(0, 0)
            sx = self._syrk.mean(0) * float(self._syrk.count)
        else:
            g, sx = self.gxx, self.sx
        c = self.c
        finite = bool(torch.isfinite(g).all()) and bool(torch.isfinite(c).all())
        if not (finite and bool(torch.isfinite(self.ns).all())):
            raise ValueError("the fused inputs or the members' activations contain NaN or inf")
        if self.bias:
            p = self.p
            gb = g.new_empty(p + 1, p + 1)
            gb[:p, :p] = g
            gb[:p, p] = sx
            gb[p, :p] = sx
            gb[p, p] = float(self.count)
            g = gb
            c = torch.cat([c, self.st[None]], 0)
        return 0.5 * (g + g.T), c, self.ns.clone()


def ls_statistics(
    kind: str,
    weight_shape: Sequence[int],
    u: Tensor,
    targets: Sequence[Tensor],
    *,
    bias: bool,
    conv: tuple | None = None,
    dim: int = 1,
    chunk: int = 64,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gram statistics of one site on inputs ``u`` and K targets: ``G``, ``[C_k]``, ``[||A_k[:, j]||^2]``.

    Args:
        kind, weight_shape, conv: the site (see :func:`design`).
        u: (N, ...) its inputs.
        targets: K values (N, ...) with the neurons on ``dim``.
        bias: add the ones column.
        chunk: samples per chunk.
        dtype: precision of the per-block products.
    """
    q = [int(t.shape[dim]) for t in targets]
    acc = None
    for s in range(0, u.shape[0], chunk):
        x = design(kind, u[s : s + chunk], weight_shape, conv)
        t = torch.cat([target_rows(a[s : s + chunk], dim) for a in targets], 1)
        if acc is None:
            acc = LSAccumulator(x.shape[1], t.shape[1], bias, dtype)
        acc.update(x, t)
    assert acc is not None
    g, c, ns = acc.result()
    bounds = [0]
    for n in q:
        bounds.append(bounds[-1] + n)
    cs = [c[:, bounds[k] : bounds[k + 1]] for k in range(len(q))]
    nss = [ns[bounds[k] : bounds[k + 1]] for k in range(len(q))]
    return g, cs, nss
