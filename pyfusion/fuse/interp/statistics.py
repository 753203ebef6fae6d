"""Least-squares statistics of neuron-interpolation fusion: Gram products of the fused inputs and member targets.

For a level with producer P (Linear or Conv2d), the design X holds the fused model's inputs of P (unfolded
patches for a convolution, plus a ones column for a bias) and the targets A_k the members' level outputs. Only
``G = X^T X``, ``C_k = X^T A_k`` and the squared target norms are needed (never X itself): they are accumulated
chunk by chunk, through the C++ statistics engine (:class:`pyfusion.stats.ActivationStats`) when it is built and
the products are float32, else in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyfusion import _ext
from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["activation_gram", "check_producer", "design", "ls_statistics", "patches", "target_rows"]


def patches(producer: nn.Module, u: Tensor) -> Tensor:
    """The design without the ones column: unfolded patches (N*L, C*k*k) for a convolution, (N, F) for a Linear."""
    if isinstance(producer, nn.Conv2d):
        # Strided views + one copy instead of F.unfold (im2col): same (C, kh, kw) column order, and on the shared
        # 2-core VM im2col took 416 ms vs 44 ms for this on a (64, 16, 14, 14) input with 2 threads under load.
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            producer.kernel_size,
            producer.stride,
            producer.padding,
            producer.dilation,
        )
        up = F.pad(u, (pw, pw, ph, ph)) if ph or pw else u
        v = up.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return v.permute(0, 2, 3, 1, 4, 5).reshape(-1, u.shape[1] * kh * kw)
    return u.reshape(u.shape[0], -1)


def design(producer: nn.Module, u: Tensor) -> Tensor:
    """The full float64 LS design of ``u`` (patches plus a ones column for a bias), for references and baselines."""
    x = patches(producer, u).double()
    if producer.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def target_rows(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Level outputs (N, n) or (N, n, H, W) as rows (N*H*W, n), in unfold's position order."""
    return a.to(dtype) if a.ndim == 2 else a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1]).to(dtype)


def check_producer(name: str, producer: nn.Module) -> None:
    if isinstance(producer, nn.Conv2d):
        if producer.groups != 1 or producer.padding_mode != "zeros" or isinstance(producer.padding, str):
            raise ValueError(
                f"conv {name!r}: only groups=1, zero padding given as integers are supported "
                f"(got groups={producer.groups}, padding={producer.padding!r}, padding_mode={producer.padding_mode!r})"
            )


def ls_statistics(
    producer: nn.Module, u: Tensor, targets: Sequence[Tensor], chunk: int = 64, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gram statistics of one level: ``G = X^T X``, ``C_k = X^T A_k`` and the squared norms of the targets.

    X is the design (unfolded patches for a convolution, plus a ones column when the producer has a bias) of the
    fused inputs ``u``; it is built ``chunk`` samples at a time and never stored whole (nor is the ones column:
    its Gram entries are the column sums and the row count).

    Args:
        producer: the Linear / Conv2d of the level.
        u: (N, ...) inputs of the producer in the fused model.
        targets: K member outputs (N, n) or (N, n, H, W).
        chunk: samples per chunk.
        dtype: precision of the per-chunk products (float32 halves the time of the dominant GEMMs; the chunks are
            always accumulated in float64, so the error stays at float32 rounding of one chunk's sums).

    Returns:
        (G (p, p), [C_k (p, n)], [||A_k[:, j]||^2 (n,)]), float64.
    """
    if dtype == torch.float32 and _ext.EXT_AVAILABLE and u.device.type == "cpu":
        return _ls_statistics_syrk(producer, u, targets, chunk)
    bias = producer.bias is not None
    gxx: Tensor | None = None
    cols = None
    cs: list[Tensor] = []
    ts: list[Tensor] = []
    ns: list[Tensor] = []
    count = 0
    for s in range(0, u.shape[0], chunk):
        x = patches(producer, u[s : s + chunk]).to(dtype)
        part = (x.T @ x).double()
        gxx = part if gxx is None else gxx + part
        cs_part = x.sum(0).double()
        cols = cs_part if cols is None else cols + cs_part
        count += x.shape[0]
        for k, a in enumerate(targets):
            t = target_rows(a[s : s + chunk], dtype)
            if t.shape[0] != x.shape[0]:
                raise ValueError(f"targets[{k}] has {t.shape[0]} rows for {x.shape[0]} design rows (shape mismatch)")
            c, tsum, nsq = (x.T @ t).double(), t.sum(0).double(), (t * t).sum(0).double()
            if len(cs) <= k:
                cs.append(c)
                ts.append(tsum)
                ns.append(nsq)
            else:
                cs[k] += c
                ts[k] += tsum
                ns[k] += nsq
    assert gxx is not None and cols is not None
    if bias:
        p = gxx.shape[0]
        g = gxx.new_empty(p + 1, p + 1)
        g[:p, :p] = gxx
        g[:p, p] = cols
        g[p, :p] = cols
        g[p, p] = float(count)
        cs = [torch.cat([c, t[None]], 0) for c, t in zip(cs, ts)]
    else:
        g = gxx
    return 0.5 * (g + g.T), cs, ns


def _ls_statistics_syrk(
    producer: nn.Module, u: Tensor, targets: Sequence[Tensor], chunk: int
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """:func:`ls_statistics` through the statistics engine: the rows ``[X | A_1 | ... | A_K]`` of each chunk are
    written once into one float32 buffer and streamed into :class:`~pyfusion.stats.ActivationStats` (C++ blocked
    lower-triangle SYRK, float32 products over panels of 256 rows, float64 shifted accumulation), which yields G,
    every C_k, the target norms and the column sums (for the bias) from one symmetric product."""
    conv = isinstance(producer, nn.Conv2d)
    sizes = [int(t.shape[1]) for t in targets]
    stats = None
    for s in range(0, u.shape[0], chunk):
        uc = u[s : s + chunk].float()
        if conv:
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
                producer.kernel_size,
                producer.stride,
                producer.padding,
                producer.dilation,
            )
            up = F.pad(uc, (pw, pw, ph, ph)) if ph or pw else uc
            v = up.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
            v = v.permute(0, 2, 3, 1, 4, 5)  # (B, Ho, Wo, C, kh, kw)
            rows, p = v.shape[0] * v.shape[1] * v.shape[2], v.shape[3] * kh * kw
        else:
            v = uc.reshape(uc.shape[0], -1)
            rows, p = v.shape
        if stats is None:
            stats = ActivationStats([p, *sizes])
        buf = torch.empty(rows, p + sum(sizes), dtype=torch.float32)
        if conv:
            buf[:, :p].unflatten(1, v.shape[3:]).unflatten(0, v.shape[:3]).copy_(v)
        else:
            buf[:, :p].copy_(v)
        off = p
        for k, a in enumerate(targets):
            ac = a[s : s + chunk]
            if ac.ndim == 2:
                dst = buf[:, off : off + sizes[k]]
                if ac.shape[0] != rows:
                    raise ValueError(f"targets[{k}] has {ac.shape[0]} rows for {rows} design rows (shape mismatch)")
                dst.copy_(ac)
            else:
                if ac.shape[0] * ac.shape[2] * ac.shape[3] != rows:
                    raise ValueError(f"targets[{k}] has shape {tuple(ac.shape)}, which does not match the design")
                buf[:, off : off + sizes[k]].unflatten(0, (ac.shape[0], ac.shape[2], ac.shape[3])).copy_(
                    ac.permute(0, 2, 3, 1)
                )
            off += sizes[k]
        stats.update(buf, check_finite=False)
    assert stats is not None
    g = stats.gram(0, 0)
    cs = [stats.gram(0, k + 1) for k in range(len(targets))]
    ns = [torch.diagonal(stats.gram(k + 1, k + 1)).clone() for k in range(len(targets))]
    if not (bool(torch.isfinite(g).all()) and all(bool(torch.isfinite(c).all()) for c in cs)):
        raise ValueError("the fused inputs or the members' activations contain NaN or inf")
    if producer.bias is not None:
        n = float(stats.count)
        sx = stats.mean(0) * n
        p = g.shape[0]
        gb = g.new_empty(p + 1, p + 1)
        gb[:p, :p] = g
        gb[:p, p] = sx
        gb[p, :p] = sx
        gb[p, p] = n
        g = gb
        cs = [torch.cat([c, (stats.mean(k + 1) * n)[None]], 0) for k, c in enumerate(cs)]
    return 0.5 * (g + g.T), cs, ns


def activation_gram(outs: Sequence[Tensor]) -> Tensor:
    """Gram (Kn, Kn) of the concatenated member outputs over samples and positions, float64."""
    g = None
    for s in range(0, outs[0].shape[0], 64):
        z = torch.cat([target_rows(o[s : s + 64]) for o in outs], 1)
        g = z.T @ z if g is None else g + z.T @ z
    assert g is not None
    return 0.5 * (g + g.T)
