"""BatchNorm recalibration after fusion: only what fusion changed (DESIGN §8: calibration data never breaks
alpha = 1), and the full reset of Jordan et al. 2023 (REPAIR §3).

The builder transforms every BatchNorm's parameters and running statistics with the maps ``A_k`` of its neuron
group (DESIGN §3): slot s gets ``rm_b[s] = sum_k A_k[s] rm_k`` and ``rv_b[s] = sum_k A_k[s] rv_k``. Which slots
fusion changed follows from ``A_k`` alone:

* a slot whose ``A_k`` rows hold, over all members, exactly one non-zero entry, equal to 1, *is* that member's
  neuron: its weight, bias and statistics are the member's, exactly. These are the branch slots of partial fusion,
  every slot of member m when lambda is one-hot on m, and singleton clusters of generalized pruning. They are never
  touched, so alpha = 1 stays exactly the ensemble, and lambda one-hot exactly the member, with or without data;
* every other slot is *changed*: shared slots (two or more members' neurons, lambda-weighted), OT fusion's soft
  slots (``A_k = lambda_k diag(1/a) T_k``: a barycentre of several neurons, also for a single member), clusters
  (the sum of their neurons), a neuron scaled by a coefficient other than 1. Their transformed statistics are
  what the members' statistics predict for the combination; the fused neuron's actual activations differ
  (variance collapse of averaged neurons, Jordan et al. 2023), so they are recalibrated.

:func:`recalibrate_bn` recalibrates the changed slots *relative to the members*, on the calibration data: with
``mu_k, v_k`` the members' pre-BatchNorm means and variances on the data, ``m_b = sum_k A_k mu_k``,
``v_b = sum_k A_k v_k`` (what the combination predicts) and ``mu_f, v_f`` the fused network's own, measured in eval
mode after the BatchNorms before it were recalibrated (one pass per BatchNorm with changed slots, in forward order,
each pass stopping at that BatchNorm):

    ``running_mean = rm_b + (mu_f - m_b)``,   ``running_var = rv_b * v_f / v_b``

(``v_f`` when ``v_b`` is below ``eps * 1e-3``, where the ratio means nothing; ``rv_b`` when both are). So:

* members whose running statistics describe the data (``rm_k = mu_k``, ``rv_k = v_k``, as after training on it)
  give exactly the data statistics of the fused network (the plain reset);
* a slot whose activations are what the combination predicts keeps its statistics: fusing a model with a permuted
  copy of itself gives the model back, with or without data; a cluster of identical neurons gets the statistics
  of their sum (mean times |c|, variance times |c|^2) exactly;
* statistics are never pulled towards the calibration data where fusion changed nothing, and a shift of the data
  away from the members' training data moves the fused statistics only as much as it moves the members' own.

Branch slots keep their member's statistics even when they read shared input slots: they are the member's
neurons and its normalisation. :func:`reset_bn_stats` is the plain reset of every BatchNorm (``reset_bn="all"``).

Cost: one eval pass per member, then for each BatchNorm with changed slots a pass that stops at it (the statistics
of a BatchNorm's input depend on every BatchNorm before it, so they are measured after those are final): about
K + L/2 forward passes for L BatchNorms, against one train-mode pass for the plain reset. Measured on the loaded
2-core VM (1 thread, 512 CIFAR-sized samples, alpha 0.5): a ResNet-20 pair (21 BatchNorms) 68 s against 6.4 s,
a 4-conv VGG pair 7.7 s against 2.5 s. ``bn_batches`` caps the batches; an alpha = 1 fusion (nothing changed) runs
no pass at all. Replaying the network from each BatchNorm instead (torch.fx, keeping the live activations of all
calibration samples) would bring it to K + 1 passes at the memory of those activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.fuse.plan import Plan
from pyfusion.graph.groups import FusionGraph
from pyfusion.stats import batch_inputs

__all__ = ["changed_slots", "has_batchnorm", "recalibrate_bn", "reset_bn_stats"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def changed_slots(maps: Sequence[Tensor]) -> Tensor:
    """Which slots fusion changed, from the K maps ``A_k`` (slots, n_k) of one group.

    A slot is unchanged when its rows hold, over all members, exactly one non-zero entry and that entry is 1 (it is
    that member's neuron); every other slot is changed (module docstring).

    Returns:
        (slots,) bool.
    """
    nnz = sum((a != 0).sum(1) for a in maps)
    ones = sum(((a != 0) & (a != 1)).sum(1) for a in maps)
    return (nnz != 1) | (ones != 0)


class _Moments:
    """Per-channel mean and variance of a BatchNorm's input, streamed over batches (Chan et al. 1979), float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        n_b = x.numel() // max(x.shape[1], 1)
        if n_b == 0:
            return
        # per batch, two passes in x's dtype (torch.var_mean over these dims costs as much as a 3x3 convolution of
        # the same tensor on CPU, 30 ms for (128, 16, 32, 32); mean + centred squares 8.6 ms), then combined across
        # batches in float64
        x = x.detach()
        mean = x.mean(dim=dims, keepdim=True)
        m2_b = (x - mean).square_().sum(dim=dims).to(torch.float64)
        mean_b = mean.reshape(-1).to(torch.float64)
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count = n

    def var(self) -> Tensor:
        """Unbiased variance (what BatchNorm's running_var estimates)."""
        assert self.m2 is not None
        return self.m2 / max(self.count - 1, 1)


class _Stop(Exception):
    """Ends a forward pass once the measured BatchNorm has seen its input."""


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}


def _maps_of(path: str, graph: FusionGraph, plan: Plan, size: int) -> list[Tensor]:
    """The A_k maps (slots, n) that built the BatchNorm at ``path``: its group's, or lambda_k I without a group."""
    for name, g in graph.groups.items():
        if any(r.module == path and r.role == "neuron" for r in g.refs):
            gp = plan.groups.get(name)
            if gp is not None:
                return [a.detach().to("cpu", torch.float64) for a in gp.A]
            break
    eye = torch.eye(size, dtype=torch.float64)
    return [lam * eye for lam in plan.lambdas]


def _moments(model: nn.Module, paths: Sequence[str], batches: Iterable[Tensor], stop_after: str | None = None):
    """Input moments of the BatchNorms at ``paths`` of ``model`` in eval mode, and the order they ran in; with
    ``stop_after`` every forward ends once that BatchNorm has seen its input."""
    mods = {p: model.get_submodule(p) for p in paths}
    moments = {p: _Moments() for p in paths}
    order: list[str] = []
    handles = []

    def hook(path: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            moments[path].add(args[0])
            if path not in order:
                order.append(path)
            if path == stop_after:
                raise _Stop

        return fn

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for p, m in mods.items():
            handles.append(m.register_forward_pre_hook(hook(p)))
        with torch.no_grad():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return moments, order


def recalibrate_bn(
    fused: nn.Module,
    members: Sequence[nn.Module],
    graph: FusionGraph,
    plan: Plan,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Recalibrate, in place, the BatchNorm slots of ``fused`` that fusion changed, relative to the members
    (module docstring); unchanged slots keep the members' statistics exactly.

    Args:
        fused: the network the builder made from ``plan`` (BatchNorm modules at the members' paths).
        members: the K members (not modified; their modes are restored).
        graph: the neuron groups.
        plan: the plan ``fused`` was built from.
        data: batches (inputs, or (inputs, labels)); every pass reads the same batches (at most ``max_batches``).
        max_batches: use at most this many batches.
        device: move inputs there first.

    Returns:
        ``{"samples": N, "recalibrated": {path: changed slots}, "kept": {path: unchanged slots}}``; ``samples`` is
        0 when no slot changed (no pass is run then).

    Raises:
        ValueError: when the data yields no batch (nothing is changed then).
    """
    bns = _bn_modules(fused)
    changed = {p: changed_slots(_maps_of(p, graph, plan, m.num_features)) for p, m in bns.items()}
    info: dict[str, Any] = {
        "samples": 0,
        "recalibrated": {p: int(c.sum()) for p, c in changed.items()},
        "kept": {p: int((~c).sum()) for p, c in changed.items()},
    }
    todo = [p for p, c in changed.items() if bool(c.any())]
    if not todo:
        return info
    it = (batch_inputs(b) for b in data)
    batches: Any = list(islice(it, max_batches)) if max_batches is not None else None
    if batches is None:  # the whole data, each pass (a DataLoader is re-iterable)
        batches = _Reiterable(data)
    if device is not None:
        batches = [x.to(device) for x in batches]
    count = 0
    for x in batches:
        count += int(x.shape[0])
    if count == 0:
        raise ValueError("data is empty: cannot recalibrate BatchNorm statistics")
    member_moments = []
    order: list[str] = []
    for k, m in enumerate(members):
        mom, seen = _moments(m, todo, batches)
        member_moments.append(mom)
        if k == 0:
            order = seen + [p for p in todo if p not in seen]
    saved = {p: (bns[p].running_mean.clone(), bns[p].running_var.clone()) for p in todo}
    try:
        for p in order:
            bn = bns[p]
            maps = _maps_of(p, graph, plan, bn.num_features)
            mom, _ = _moments(fused, [p], batches, stop_after=p)
            f = mom[p]
            if f.mean is None:
                continue  # never reached by the forward: left as built
            m_b = sum(a @ mm[p].mean for a, mm in zip(maps, member_moments))
            v_b = sum(a @ mm[p].var() for a, mm in zip(maps, member_moments))
            rm_b = bn.running_mean.detach().to(torch.float64).cpu()
            rv_b = bn.running_var.detach().to(torch.float64).cpu()
            mu_f, v_f = f.mean.cpu(), f.var().cpu()
            tiny = float(bn.eps) * 1e-3  # a variance this far below eps does not change the normalisation
            ok = v_b > tiny
            rv = torch.where(ok, rv_b * v_f / torch.where(ok, v_b, 1.0), torch.where(v_f > tiny, v_f, rv_b))
            rm = rm_b + (mu_f - m_b)
            c = changed[p]
            with torch.no_grad():
                bn.running_mean[c] = rm[c].to(bn.running_mean)
                bn.running_var[c] = rv[c].to(bn.running_var)
    except BaseException:
        with torch.no_grad():
            for p, (rm, rv) in saved.items():
                bns[p].running_mean.copy_(rm)
                bns[p].running_var.copy_(rv)
        raise
    info["samples"] = count
    return info


class _Reiterable:
    """The model inputs of every batch of a re-iterable ``data``, each time it is iterated."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self):
        return (batch_inputs(b) for b in self.data)


def reset_bn_stats(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None, device: torch.device | str | None = None
) -> int:
    """Recompute every BatchNorm's running mean / variance of ``model`` (in place) on calibration data: the plain
    reset of Jordan et al. 2023 (``fuse(..., reset_bn="all")``; it also overwrites the slots fusion did not change,
    so alpha = 1 is then no longer exactly the ensemble).

    Every BatchNorm is put in train mode with ``momentum=None`` (cumulative average over the calibration batches),
    the data is run forward without gradients, then modes and momenta are restored. Other layers (Dropout, ...)
    stay in eval mode.

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
