"""Neuron-interpolation fusion (Luenam et al. 2025, "Model Fusion via Neuron Interpolation"; papers.md part B).

The fused network has the architecture of one member and is built level by level (a level is a Linear / Conv2d
with the modules before it and its BatchNorm; for ResNets a stem, a residual block, the head). For level l:

1. X = the inputs of level l in the *fused* model built so far (so later levels correct earlier errors);
   the targets are the members' own level outputs A_k (pre-activations; a residual block's output).
2. Grouping: the K*n neurons of level l are grouped into n slots, each slot's target being the
   importance-weighted mean of its neurons' outputs.
3. Approximation: the fused level is fitted to reproduce the slot targets from X.

Methods (``pyfusion.fuse(..., method=...)``, all need calibration data):

* ``"hf"`` (K = 2): least-squares weights ``W_k = (X^T X + r I)^{-1} X^T A_k`` reproducing every member neuron
  from the fused inputs (normal equations through a Cholesky factor, never ``pinv`` of the data; convolutions use
  the unfolded patches, but only the Gram ``X^T X`` and ``X^T A_k`` are accumulated, chunk by chunk). The
  interpolation cost of every pair (papers.md B.3) comes from Gram products (C.2 item 3;
  :func:`pyfusion.ops.hf_cost`), the pairs from the exact assignment engine, and the fused weights are the
  importance-weighted means ``(s0_i w0_i + s1_j w1_j) / (s0_i + s1_j)``. Last level: neuron i with neuron i.
* ``"kf"`` (any K): importance-weighted k-means (k = n) over the K*n neurons in pre-activation space. The points
  are the LS predictions ``X w_j``; their Gram is ``W^T (X^T X) W`` (Kn x Kn), so no activation matrix is ever
  formed; :func:`pyfusion.ops.weighted_kmeans` (C++, restarts) clusters it. The fused weights are the centroids
  ``sum_{j in c} s_j w_j / sum_{j in c} s_j`` (whose prediction is exactly the centroid of the points). Last level:
  class c of every member forms cluster c.
* ``"kf_gradient"``: the KF grouping, then every level is trained (Adam or SGD, mini-batches of the calibration
  data, 80/20 split, early stopping on the validation MSE, the best state kept) to reproduce its slot targets
  ``T_c = sum_{j in c} s_j a_j / sum s_j`` from the fused inputs; the last level is trained to reproduce the
  lambda-weighted mean logits (optionally weighted per class by each member's class share). As in the authors'
  code, the slots are k-means clusters of the members' activations, matched to member 0's neurons, and each level
  starts from member 0's weights (``level_init="kf"`` starts Linear/Conv2d levels from the KF closed form instead;
  a one-layer level is then already the least-squares optimum). Levels exist for
  ``nn.Sequential`` chains (MLP, VGG) and for :class:`pyfusion.models.ResNet` (stem, one level per residual block,
  head); ResNet levels start from member 0 with the targets' slots matched (exact assignment) to member 0's
  neurons, so the identity shortcuts stay consistent.

Deviations from the authors' code (documented choices):

* k-means uses the squared distance (the objective of the C++ kernel and of Lloyd's centroid step); the authors'
  KF minimises the sum of unsquared L2 distances with the same centroid rule. The points are the projections
  ``X w_j`` instead of ``a_j``: for squared distances the two objectives differ by the constant
  ``sum_j s_j ||a_j - X w_j||^2`` (exact least squares), so the clusterings are the same.
* The Gram products of each chunk of samples are formed in float32 by default (``stats_dtype``) and accumulated
  in float64; ``stats_dtype="float64"`` makes them exact to float64 rounding.
* HF supports both the authors' L2 cost (``cost="l2"``, default) and the squared form (``cost="sqeuclidean"``).
* The LS system has a ridge ``ridge * mean(diag(X^T X))`` (default 1e-6; zero columns such as always-black pixels
  or dead ReLUs make X^T X singular); if the Cholesky factorisation fails the ridge grows 100x until it succeeds
  (reported in ``fusion_info``).
* Importance scores are normalised per level and member (:mod:`pyfusion.fuse.importance`) and multiplied by the
  member weights lambda_k. The last level uses lambda only.
* BatchNorm after a fitted layer is set to the identity (running mean 0, variance 1, weight sqrt(1 + eps),
  bias 0): the LS fit produces the pre-activation directly. The fused module carries ``fusion_weights_fitted``,
  so ``pyfusion.fuse`` does not reset its BatchNorm statistics by default.

The calibration data are held in memory (inputs and the current level's activations of every member), as in the
authors' code: a few hundred to a few thousand samples.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyfusion import _ext
from pyfusion.fuse.importance import IMPORTANCE_METHODS, neuron_importance
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.ops import hf_cost, linear_assignment, weighted_kmeans

__all__ = ["Level", "interp_levels", "ls_statistics", "solve_ls", "hf_pair_cost", "fuse_interp"]

_FLATTEN = "__flatten__"
_PRE_OK = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Level:
    """One level of neuron-interpolation fusion.

    Attributes:
        name: a readable name (the producer's or the block's module path).
        calls: module paths applied in order to the level input (``"__flatten__"`` is ``torch.flatten(x, 1)``).
        producer: the Linear / Conv2d whose weights a linear fit sets (None for residual blocks).
        norm: the BatchNorm right after the producer, or None.
        out_point: module path whose output is the level output (importance is measured there).
        group: the graph group of the level output (None for the logits).
        last: whether the level outputs the logits.
        kind: "linear" (a producer fitted in closed form) or "block" (trained only).
    """

    name: str
    calls: list[str]
    producer: str | None
    norm: str | None
    out_point: str
    group: str | None
    last: bool = False
    kind: str = "linear"
    pre: list[str] = field(default_factory=list)


def _group_of(graph: FusionGraph, weight_key: str) -> str | None:
    for g in graph.groups.values():
        if any(r.key == weight_key for r in g.producers):
            return g.name
    return None


def interp_levels(model: nn.Module, graph: FusionGraph) -> list[Level]:
    """The levels of ``model``: an ``nn.Sequential`` chain (MLP, VGG) or a :class:`pyfusion.models.ResNet`.

    Raises:
        ValueError: an unsupported architecture or module (named by path and type).
    """
    from pyfusion.models import ResNet

    if isinstance(model, ResNet):
        return _resnet_levels(model, graph)
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"neuron interpolation supports nn.Sequential chains (MLP, VGG) and pyfusion.models.ResNet; "
            f"got {type(model).__name__}"
        )
    leaves = []
    for path, m in model.named_modules():
        if any(True for _ in m.children()):
            if not isinstance(m, nn.Sequential):
                raise ValueError(f"module {path!r} ({type(m).__name__}) is not supported inside a Sequential chain")
            continue
        leaves.append((path, m))
    levels: list[Level] = []
    pre: list[str] = []
    i = 0
    while i < len(leaves):
        path, m = leaves[i]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            norm = None
            if i + 1 < len(leaves) and isinstance(leaves[i + 1][1], _NORMS):
                norm = leaves[i + 1][0]
                i += 1
            calls = [*pre, path] + ([norm] if norm else [])
            group = _group_of(graph, f"{path}.weight")
            levels.append(Level(path, calls, path, norm, norm or path, group, pre=list(pre)))
            pre = []
        elif isinstance(m, _PRE_OK):
            pre.append(path)
        else:
            raise ValueError(f"module {path!r} of type {type(m).__name__} is not supported by neuron interpolation")
        i += 1
    if not levels:
        raise ValueError("the model has no Linear or Conv2d layer")
    if pre:
        raise ValueError(f"modules after the last Linear/Conv2d are not supported: {pre}")
    levels[-1].last = True
    if levels[-1].group is not None:
        raise ValueError(f"the last layer {levels[-1].name!r} must output the logits (it belongs to a group)")
    for lv in levels[:-1]:
        if lv.group is None:
            raise ValueError(f"layer {lv.name!r} belongs to no neuron group of the graph")
    return levels


def _resnet_levels(model: nn.Module, graph: FusionGraph) -> list[Level]:
    levels = [Level("stem", ["conv1", "bn1"], None, None, "bn1", _group_of(graph, "conv1.weight"), kind="block")]
    first = True
    for s in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(model, s)):
            path = f"{s}.{i}"
            last_conv = "conv3" if hasattr(block, "conv3") else "conv2"
            calls = (["relu"] if first else []) + [path]
            first = False
            levels.append(
                Level(path, calls, None, None, path, _group_of(graph, f"{path}.{last_conv}.weight"), kind="block")
            )
    levels.append(Level("head", ["pool", _FLATTEN, "fc"], None, None, "fc", None, last=True, kind="block"))
    return levels


def _run(model: nn.Module, calls: Sequence[str], x: Tensor) -> Tensor:
    mods = dict(model.named_modules())
    for c in calls:
        x = torch.flatten(x, 1) if c == _FLATTEN else mods[c](x)
    return x


@torch.no_grad()
def _run_chunked(model: nn.Module, calls: Sequence[str], x: Tensor, chunk: int = 256) -> Tensor:
    return torch.cat([_run(model, calls, x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])


# ------------------------------------------------------------------------------------------------------------
# Least squares from Gram statistics
# ------------------------------------------------------------------------------------------------------------


def _patches(producer: nn.Module, u: Tensor) -> Tensor:
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


def _design(producer: nn.Module, u: Tensor) -> Tensor:
    """The full float64 LS design of ``u`` (patches plus a ones column for a bias), for references and baselines."""
    x = _patches(producer, u).double()
    if producer.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def _targets(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Level outputs (N, n) or (N, n, H, W) as rows (N*H*W, n), in unfold's position order."""
    return a.to(dtype) if a.ndim == 2 else a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1]).to(dtype)


def _check_producer(name: str, producer: nn.Module) -> None:
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
        x = _patches(producer, u[s : s + chunk]).to(dtype)
        part = (x.T @ x).double()
        gxx = part if gxx is None else gxx + part
        cs_part = x.sum(0).double()
        cols = cs_part if cols is None else cols + cs_part
        count += x.shape[0]
        for k, a in enumerate(targets):
            t = _targets(a[s : s + chunk], dtype)
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
    from pyfusion.stats import ActivationStats

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


def solve_ls(g: Tensor, cs: Sequence[Tensor], ridge: float = 1e-6) -> tuple[list[Tensor], float]:
    """``W_k = (G + r I)^{-1} C_k`` through a Cholesky factor, ``r = ridge * mean(diag G)``.

    If the factorisation fails (G singular and ``ridge`` 0 or too small), r grows 100x (from 1e-12 relative when
    ``ridge`` is 0) until it succeeds.

    Returns:
        (the K solutions (p, n), the relative ridge used).
    """
    scale = float(torch.diagonal(g).mean()) or 1.0
    rel = float(ridge)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(g + rel * scale * eye)
        if int(info) == 0:
            return [torch.cholesky_solve(c, chol) for c in cs], rel
        rel = 1e-12 if rel == 0 else rel * 100
    raise ValueError("the input Gram matrix X^T X could not be factorised (NaN in the activations?)")


def hf_pair_cost(
    g: Tensor, cs: Sequence[Tensor], ns: Sequence[Tensor], ws: Sequence[Tensor], s0: Tensor, s1: Tensor, cost: str
) -> Tensor:
    """The (n0, n1) HF cost (papers.md B.3) from the Gram statistics of two members (see :func:`hf_cost`)."""
    w0, w1 = ws
    gw0, gw1 = g @ w0, g @ w1
    return hf_cost(
        w0.T @ gw1,
        w0.T @ cs[1],
        cs[0].T @ w1,
        (gw0 * w0).sum(0),
        (w0 * cs[0]).sum(0),
        ns[0],
        s0,
        (gw1 * w1).sum(0),
        (w1 * cs[1]).sum(0),
        ns[1],
        s1,
        squared=cost == "sqeuclidean",
    )


def _set_linear(fused: nn.Module, level: Level, w: Tensor) -> None:
    """Write LS weights (p, n) into the producer (and make its BatchNorm the identity)."""
    mods = dict(fused.named_modules())
    prod = mods[level.producer]
    with torch.no_grad():
        p_w = prod.weight[0].numel()
        prod.weight.copy_(w[:p_w].T.reshape(prod.weight.shape).to(prod.weight.dtype))
        if prod.bias is not None:
            prod.bias.copy_(w[p_w].to(prod.bias.dtype))
        if level.norm is not None:
            bn = mods[level.norm]
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            if bn.weight is not None:
                bn.weight.fill_(math.sqrt(1.0 + bn.eps))
                bn.bias.zero_()


# ------------------------------------------------------------------------------------------------------------
# Grouping helpers
# ------------------------------------------------------------------------------------------------------------


def _maps_from_labels(labels: Tensor, weights: Sequence[Tensor], n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Plan maps of a grouping: ``A_k[c, j] = s_kj / S_c`` for j in c, ``B_k[j, c] = 1`` (cluster indicator)."""
    k_members = len(weights)
    w = torch.cat([x.double() for x in weights])
    lab = labels.long()
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, w)
    maps_a, maps_b = [], []
    for k in range(k_members):
        sl = slice(k * n, (k + 1) * n)
        a = torch.zeros(n, n, dtype=torch.float64)
        a[lab[sl], torch.arange(n)] = w[sl] / tot[lab[sl]]
        b = torch.zeros(n, n, dtype=torch.float64)
        b[torch.arange(n), lab[sl]] = 1.0
        maps_a.append(a)
        maps_b.append(b)
    return maps_a, maps_b


def _mix(maps_a: Sequence[Tensor], outs: Sequence[Tensor]) -> Tensor:
    """Slot targets ``T = sum_k A_k a_k`` along the neuron axis (dim 1) of the member outputs."""
    t = None
    for a, o in zip(maps_a, outs):
        part = torch.einsum("cj,nj...->nc...", a.to(o.dtype), o)
        t = part if t is None else t + part
    assert t is not None
    return t


def _activation_gram(outs: Sequence[Tensor]) -> Tensor:
    """Gram (Kn, Kn) of the concatenated member outputs over samples and positions, float64."""
    g = None
    for s in range(0, outs[0].shape[0], 64):
        z = torch.cat([_targets(o[s : s + 64]) for o in outs], 1)
        g = z.T @ z if g is None else g + z.T @ z
    assert g is not None
    return 0.5 * (g + g.T)


# ------------------------------------------------------------------------------------------------------------
# Level training (KF-Gradient)
# ------------------------------------------------------------------------------------------------------------


def _fit_level(model: nn.Module, level: Level, x: Tensor, t: Tensor, opts: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train the level's parameters to map ``x`` to ``t`` (MSE), 80/20 split, early stopping, best state kept."""
    mods = dict(model.named_modules())
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for c in level.calls:
        if c == _FLATTEN:
            continue
        for p in mods[c].parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        return {"epochs": 0}
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(opts["val_fraction"] * n)) if n >= 5 else 0
    val, tr = perm[:n_val], perm[n_val:]
    if opts["optimizer"] == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=opts["lr"], momentum=0.9, weight_decay=opts["weight_decay"])
    epochs = opts["last_epochs"] if level.last else opts["epochs"]
    bs = opts["batch_size"]
    model.eval()  # BatchNorm uses its running statistics: the level is a fixed function of its parameters

    def val_loss() -> float:
        idx = val if n_val else tr
        with torch.no_grad():
            return float(F.mse_loss(_run_chunked(model, level.calls, x[idx]), t[idx]))

    best = val_loss()
    best_state = [p.detach().clone() for p in params]
    bad, done = 0, 0
    for _ in range(epochs):
        order = tr[torch.randperm(tr.numel(), generator=gen)]
        for s in range(0, order.numel(), bs):
            idx = order[s : s + bs]
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when fuse() is called under torch.no_grad()
                loss = F.mse_loss(_run(model, level.calls, x[idx]), t[idx])
                loss.backward()
            opt.step()
        done += 1
        cur = val_loss()
        if cur < best - 1e-12:
            best, bad = cur, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= opts["patience"]:
                break
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    return {"epochs": done, "val_mse": best}


# ------------------------------------------------------------------------------------------------------------
# The driver shared by hf / kf / kf_gradient
# ------------------------------------------------------------------------------------------------------------


def _calibration(data: Iterable[Any], max_samples: int | None) -> tuple[Tensor, Tensor | None]:
    xs, ys = [], []
    for batch in data:
        if isinstance(batch, (tuple, list)):
            xs.append(batch[0])
            ys.append(batch[1] if len(batch) > 1 else None)
        else:
            xs.append(batch)
            ys.append(None)
    x = torch.cat(xs)
    y = None if any(v is None for v in ys) else torch.cat(ys)
    if max_samples is not None:
        x = x[:max_samples]
        y = None if y is None else y[:max_samples]
    if x.shape[0] == 0:
        raise ValueError("data is empty: the calibration data yielded no sample")
    return x, y


def _importance(
    members: Sequence[nn.Module], x: Tensor, y: Tensor | None, levels: list[Level], method: str, n_steps: int
) -> list[dict[str, Tensor]]:
    points = [lv.out_point for lv in levels if not lv.last]
    if method == "uniform":
        return [{} for _ in members]
    data = [(x[s : s + 256], None if y is None else y[s : s + 256]) for s in range(0, x.shape[0], 256)]
    if y is None:
        data = [(b[0],) for b in data]
    return [neuron_importance(m, data, points, method=method, n_steps=n_steps) for m in members]


def fuse_interp(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Iterable[Any],
    *,
    method: str,
    importance: str = "uniform",
    n_steps: int = 10,
    ridge: float = 1e-6,
    stats_dtype: torch.dtype | str = "float32",
    cost: str = "l2",
    n_restarts: int = 10,
    init: str = "ward",
    seed: int = 0,
    max_samples: int | None = None,
    class_weights: Any = None,
    epochs: int = 30,
    last_epochs: int = 50,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 32,
    patience: int = 5,
    val_fraction: float = 0.2,
    weight_decay: float = 0.0,
    level_init: str = "member0",
) -> nn.Module:
    """Neuron-interpolation fusion (see the module docstring); returns the fused module with ``fusion_plan``.

    Args:
        members: K members (K = 2 for "hf").
        graph: neuron groups of the architecture.
        lambdas: member weights (scale the importance scores and average the logits).
        data: calibration batches ``(x, y)``; labels are the importance targets (else the member's prediction).
        method: "hf", "kf" or "kf_gradient".
        importance: "uniform", "activation_gradient" or "conductance" (:mod:`pyfusion.fuse.importance`).
        n_steps: conductance path steps.
        ridge: relative ridge of the LS normal equations.
        stats_dtype: precision of the per-chunk Gram products ("float32" or "float64"); chunks are accumulated in
            float64 either way. float32 roughly halves the fusion time of convolutional levels (bench/
            bench_interp.py); "float64" for bit-level studies.
        cost: HF pair cost, "l2" (the authors' sum of L2 norms) or "sqeuclidean".
        n_restarts, init, seed: k-means restarts, start ("ward": randomized Ward, or "kmeans++") and seed (also
            seeds the training of kf_gradient).
        max_samples: use at most this many calibration samples.
        class_weights: (K, C) per-member class weights for the last-level target of kf_gradient (e.g.
            :func:`pyfusion.data.class_shares`); normalised per class over the members.
        epochs, last_epochs, lr, optimizer, batch_size, patience, val_fraction, weight_decay: kf_gradient training.
        level_init: where kf_gradient starts each level: "member0" (the authors' choice: member 0's weights, the
            k-means of the members' activations aligned to member 0's neurons) or "kf" (the KF closed-form weights
            of Linear/Conv2d levels; a single-layer level is then already the least-squares optimum of its targets,
            so training changes only the head when class weights are given).

    Raises:
        ValueError: hf with K != 2, bad options, unsupported architectures (named), empty data.
    """
    k_members = len(members)
    if method not in ("hf", "kf", "kf_gradient"):
        raise ValueError(f"method must be 'hf', 'kf' or 'kf_gradient'; got {method!r}")
    if method == "hf" and k_members != 2:
        raise ValueError(f"method 'hf' fuses exactly 2 members (use 'kf' for K > 2); got {k_members}")
    if importance not in IMPORTANCE_METHODS:
        raise ValueError(f"importance must be one of {IMPORTANCE_METHODS}; got {importance!r}")
    if cost not in ("l2", "sqeuclidean"):
        raise ValueError(f"cost must be 'l2' or 'sqeuclidean'; got {cost!r}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0; got {ridge}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    sdtype = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32}.get(
        stats_dtype, torch.float64 if stats_dtype == torch.float64 else None
    )
    if sdtype is None:
        raise ValueError(f"stats_dtype must be 'float32' or 'float64'; got {stats_dtype!r}")
    if level_init not in ("member0", "kf"):
        raise ValueError(f"level_init must be 'member0' or 'kf'; got {level_init!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if data is None:
        raise ValueError(f"method {method!r} needs calibration data")
    levels = interp_levels(members[0], graph)
    if method != "kf_gradient":
        for lv in levels:
            if lv.kind != "linear":
                raise ValueError(
                    f"method {method!r} fits Linear/Conv2d chains in closed form; level {lv.name!r} is a residual "
                    "block (use method='kf_gradient' for ResNets)"
                )
    mods0 = dict(members[0].named_modules())
    for lv in levels:
        if lv.producer is not None:
            _check_producer(lv.producer, mods0[lv.producer])
    x, y = _calibration(data, max_samples)
    lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
    cw = None
    if class_weights is not None:
        cw = torch.as_tensor(class_weights, dtype=torch.float64)
        if cw.ndim != 2 or cw.shape[0] != k_members or not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise ValueError(
                f"class_weights must be a non-negative finite ({k_members}, C) array; got {tuple(cw.shape)}"
            )
    train_opts = {
        "epochs": int(epochs),
        "last_epochs": int(last_epochs),
        "lr": float(lr),
        "optimizer": optimizer,
        "batch_size": int(batch_size),
        "patience": int(patience),
        "val_fraction": float(val_fraction),
        "weight_decay": float(weight_decay),
    }

    t0 = time.perf_counter()
    scores = _importance(members, x, y, levels, importance, n_steps)
    times = {"importance_s": time.perf_counter() - t0, "stats_s": 0.0, "solve_s": 0.0, "group_s": 0.0, "train_s": 0.0}
    fused = copy.deepcopy(members[0])
    fused.eval()
    members_eval = [copy.deepcopy(m).eval() for m in members]
    member_in = [x for _ in members]
    fused_in = x
    groups: dict[str, GroupPlan] = {}
    level_info: list[dict[str, Any]] = []
    for li, lv in enumerate(levels):
        info: dict[str, Any] = {"level": lv.name}
        outs = [_run_chunked(m, lv.calls, member_in[k]) for k, m in enumerate(members_eval)]
        n = outs[0].shape[1]
        if lv.last:
            w = [lam[k] * torch.ones(n, dtype=torch.float64) for k in range(k_members)]
        elif importance == "uniform":
            w = [lam[k] * (torch.full((n,), 1.0 / n, dtype=torch.float64) + 1e-8) for k in range(k_members)]
        else:
            w = [lam[k] * scores[k][lv.out_point] for k in range(k_members)]
        w = [v.clamp_min(1e-12) for v in w]  # lambda_k = 0 members keep a tiny positive weight
        if lv.kind == "linear" and not (method == "kf_gradient" and level_init == "member0"):
            prod = dict(fused.named_modules())[lv.producer]
            t1 = time.perf_counter()
            u = _run_chunked(fused, lv.pre, fused_in) if lv.pre else fused_in
            g, cs, ns = ls_statistics(prod, u, outs, dtype=sdtype)
            times["stats_s"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            ws, rel = solve_ls(g, cs, ridge)
            times["solve_s"] += time.perf_counter() - t1
            info["ridge"] = rel
            t1 = time.perf_counter()
            if lv.last:
                labels = torch.arange(n).repeat(k_members)
            elif method == "hf":
                c = hf_pair_cost(g, cs, ns, ws, w[0], w[1], cost)
                rows, cols = linear_assignment(c, dtype="float64")
                rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
                lab1 = torch.empty(n, dtype=torch.long)
                lab1[cols] = rows
                labels = torch.cat([torch.arange(n), lab1])
                info["cost"] = float(c[rows, cols].sum())
            else:
                wcat = torch.cat(ws, 1)
                gk = wcat.T @ g @ wcat
                res = weighted_kmeans(
                    gram=0.5 * (gk + gk.T), weights=torch.cat(w), num_clusters=n, n_restarts=n_restarts, init=init,
                    seed=seed + li,
                )  # fmt: skip
                labels = torch.as_tensor(res.labels)
                info["inertia"] = res.inertia
            maps_a, maps_b = _maps_from_labels(labels, w, n)
            wf = sum(ws[k] @ maps_a[k].T for k in range(k_members))
            times["group_s"] += time.perf_counter() - t1
            _set_linear(fused, lv, wf)
        else:  # group on activations, align slots to member 0, start from member 0 (ResNet, kf_gradient default)
            t1 = time.perf_counter()
            if lv.last:
                labels = torch.arange(n).repeat(k_members)
            else:
                gk = _activation_gram(outs)
                res = weighted_kmeans(
                    gram=gk, weights=torch.cat(w), num_clusters=n, n_restarts=n_restarts, init=init, seed=seed + li
                )
                labels = torch.as_tensor(res.labels)
                info["inertia"] = res.inertia
            maps_a, maps_b = _maps_from_labels(labels, w, n)
            if not lv.last:
                acat = torch.cat(maps_a, 1)  # (n, Kn)
                tt = acat @ gk @ acat.T
                ta = acat @ gk[:, :n]
                c = torch.diagonal(tt)[:, None] + torch.diagonal(gk)[None, :n] - 2 * ta
                rows, cols = linear_assignment(c, dtype="float64")
                order = torch.empty(n, dtype=torch.long)
                order[torch.as_tensor(cols)] = torch.as_tensor(rows)  # slot i (member-0 neuron i) <- cluster
                maps_a = [a[order] for a in maps_a]
                maps_b = [b[:, order] for b in maps_b]
            times["group_s"] += time.perf_counter() - t1
        if lv.group is not None:
            groups[lv.group] = GroupPlan(maps_a, maps_b, (n,) + (0,) * k_members)
        if method == "kf_gradient":
            t1 = time.perf_counter()
            if lv.last:
                q = lam[:, None].expand(k_members, n).clone()
                if cw is not None:
                    if cw.shape[1] != n:
                        raise ValueError(f"class_weights must have shape ({k_members}, {n}); got {tuple(cw.shape)}")
                    q = lam[:, None] * cw
                    q = q / q.sum(0, keepdim=True).clamp_min(1e-300)
                target = sum(outs[k] * q[k].to(outs[k].dtype) for k in range(k_members))
            else:
                target = _mix(maps_a, outs)
            info.update(_fit_level(fused, lv, fused_in, target.detach(), train_opts, seed * 1000 + li))
            times["train_s"] += time.perf_counter() - t1
        fused_in = _run_chunked(fused, lv.calls, fused_in)
        member_in = outs
        level_info.append(info)
    plan = Plan(
        tuple(float(v) for v in lambdas),
        groups,
        {"interp_levels": level_info, **{f"time_{k}": v for k, v in times.items()}},
    )
    fused.fusion_plan = plan
    fused.fusion_weights_fitted = True
    for p in fused.parameters():
        p.requires_grad_(True)
    return fused


def _make(method: str, summary: str) -> None:
    def fn(members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, **options: Any):
        return fuse_interp(members, graph, lambdas, data, method=method, **options)

    fn.__name__ = f"fuse_{method}"
    fn.__doc__ = summary
    # the options are fuse_interp's keywords (method is fixed here): inspect.signature, --help and the CLI read them
    sig = inspect.signature(fuse_interp)
    fn.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "method"])
    register_method(method, needs_data="yes", summary=summary)(fn)


_make("hf", "Hungarian neuron-interpolation fusion of two members (least squares on the fused inputs)")
_make("kf", "K-means neuron-interpolation fusion of K members (weighted k-means over LS predictions)")
_make("kf_gradient", "KF grouping, then every level trained to its targets (neuron interpolation, gradient)")
