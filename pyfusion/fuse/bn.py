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

Several processes (``pyfusion.fuse`` with ``torch.distributed`` initialized): every rank runs its own batches and
the moments (recalibration) or the batch-count-weighted running averages (plain reset) are summed over the ranks,
so every rank gets the statistics of the union of the shards.

Cost: one eval pass per member, then the fused network's BatchNorms in forward order (the statistics of a
BatchNorm's input depend on every BatchNorm before it, so they are measured after those are final). When the
calibration samples fit as one batch (:data:`ONE_PASS_BYTES`), that is one pass: all samples run as one batch
and each BatchNorm's pre-hook recalibrates it from its input before it runs (eval-mode BatchNorm treats each
sample alone, so this is exactly the per-BatchNorm passes side by side): K + 1 passes. Otherwise (or with
several processes) one pass per BatchNorm with changed slots that stops at it: about K + L/2 passes for L
BatchNorms (measured before the one-pass path on the loaded 2-core VM, 1 thread, 512 CIFAR-sized samples,
alpha 0.5: a ResNet-20 pair, 21 BatchNorms, 68 s against the plain reset's 6.4 s). ``bn_batches`` caps the
batches; an alpha = 1 fusion (nothing changed) runs no pass at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.fuse.plan import Plan
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.transform import axis_plan, member_tensor
from pyfusion.stats import batch_inputs
from pyfusion.stats.distributed import all_reduce_sum, current_group

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
        self.calls = 0  # add() calls: more than one per batch for a BatchNorm module applied twice in a forward
        self.per_sample = 0  # the largest input seen, in elements per sample (the one-pass memory estimate)
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        n_b = x.numel() // max(x.shape[1], 1)
        self.calls += 1
        if x.dim() > 0 and x.shape[0]:
            self.per_sample = max(self.per_sample, x.numel() // x.shape[0])
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


def _reduce_moments(moments: dict[str, _Moments], sizes: dict[str, int], group: Any) -> None:
    """Combine each path's moments over the ranks of ``group``, in place (Chan et al. 1979 as sums over disjoint
    samples: mu = sum_r n_r mu_r / n, M2 = sum_r M2_r + n_r (mu_r - mu)^2); a rank without samples adds nothing."""
    paths = list(moments)
    counts = torch.tensor([float(moments[p].count) for p in paths], dtype=torch.float64)
    all_reduce_sum([counts], group)
    for p, n in zip(paths, counts.tolist()):
        m = moments[p]
        if n == 0:
            continue
        zero = torch.zeros(sizes[p], dtype=torch.float64)
        mean = m.mean if m.mean is not None else zero
        weighted = (mean * m.count).clone()
        all_reduce_sum([weighted], group)
        mu = weighted / n
        part = (m.m2 + (mean - mu).square() * m.count) if m.m2 is not None else zero.to(mu.device)
        all_reduce_sum([part], group)
        m.count, m.mean, m.m2 = int(n), mu, part


class _Stop(Exception):
    """Ends a forward pass once the measured BatchNorm has seen its input."""


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}


def _maps_of(path: str, graph: FusionGraph, plan: Plan, member_size: int) -> list[Tensor]:
    """The channel maps A_k (fused channels, member_size) that built the BatchNorm at ``path``: the builder's own
    transform of its ``running_mean`` (:func:`pyfusion.graph.transform.member_tensor` through every reference of that
    tensor) applied to the identity, so a channel axis that is a unit group's heads x head dims (LeViT's BatchNorm
    over packed q / k / v heads), or segments of several groups, maps channel by channel; lambda_k I without a
    group. For a BatchNorm whose channels are one group's neurons these are the group's A_k."""
    refs = graph.refs_by_key().get(f"{path}.running_mean", [])
    eye = torch.eye(member_size, dtype=torch.float64)
    if not refs:
        return [lam * eye for lam in plan.lambdas]
    ax = axis_plan(refs, graph.groups)
    out = []
    for k, lam in enumerate(plan.lambdas):
        maps = {}
        for name, _r in refs:
            gp = plan.groups.get(name)
            if gp is None:  # a group the plan leaves out is averaged (Plan docstring)
                n = graph.groups[name].size
                maps[name] = (lam * torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64))
            else:
                maps[name] = (gp.A[k].detach().to("cpu", torch.float64), gp.B[k].detach().to("cpu", torch.float64))
        out.append(member_tensor(eye, ax, maps, lam))
    return out


def _moments(
    model: nn.Module,
    paths: Sequence[str],
    batches: Iterable[Tensor],
    stop_after: str | None = None,
    each_call: Any = None,
):
    """Input moments of the BatchNorms at ``paths`` of ``model`` in eval mode, and the order they ran in; with
    ``stop_after`` every forward ends once that BatchNorm has seen its input. ``each_call(path, moments)``: also
    called with the moments of every single call, before the BatchNorm runs (it may change the BatchNorm)."""
    mods = {p: model.get_submodule(p) for p in paths}
    moments = {p: _Moments() for p in paths}
    order: list[str] = []
    handles = []

    def hook(path: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            moments[path].add(args[0])
            if each_call is not None:
                call = _Moments()
                call.add(args[0])
                each_call(path, call)
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
    dist_group = current_group()
    if dist_group is not None:  # every rank's paths and their order are the same (the same network)
        _reduce_moments(moments, {p: int(m.num_features) for p, m in mods.items()}, dist_group[0])
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
    member_bns = _bn_modules(members[0])
    maps_of = {p: _maps_of(p, graph, plan, member_bns[p].num_features) for p in bns if p in member_bns}
    changed = {p: changed_slots(maps_of[p]) for p in maps_of}
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
    count = num_batches = 0
    for x in batches:
        count += int(x.shape[0])
        num_batches += 1
    dist_group = current_group()
    if dist_group is not None:  # the samples of all ranks (a rank with an empty shard still takes part)
        total = torch.tensor([float(count)], dtype=torch.float64)
        all_reduce_sum([total], dist_group[0])
        count = int(total.item())
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

    def recalibrate(p: str, f: _Moments) -> None:
        bn = bns[p]
        if f.mean is None:
            return  # never reached by the forward: left as built
        maps = maps_of[p]
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

    try:
        itemsize = next(iter(bns.values())).running_mean.element_size()
        whole = None
        # with several ranks, a rank without batches must still take part in every reduce; a sequence-first module
        # (batch_first=False: inputs (T, N, ...)) would read batches joined on dim 0 as longer sequences
        if dist_group is None and sequence_first_module(fused) is None:
            whole = _one_batch(batches, count, num_batches, member_moments[0], todo, itemsize)
        if whole is not None:
            # one eval-mode forward of all samples: each BatchNorm's pre-hook recalibrates it from its input (the
            # BatchNorms before it already done: the forward runs them first) before it runs. Eval-mode BatchNorm
            # treats each sample alone, so this is the per-BatchNorm passes side by side, in one pass
            _moments(fused, todo, [whole], each_call=recalibrate)
            info["passes"] = 1
        else:
            for p in order:
                mom, _ = _moments(fused, [p], batches, stop_after=p)
                recalibrate(p, mom[p])
            info["passes"] = len(order)
    except BaseException:
        with torch.no_grad():
            for p, (rm, rv) in saved.items():
                bns[p].running_mean.copy_(rm)
                bns[p].running_var.copy_(rv)
        raise
    info["samples"] = count
    return info


# the calibration batches are run as one batch (one pass of the fused network for every BatchNorm) when the largest
# BatchNorm input of all samples, times 4 (the input, the output, a residual and a temporary live at once), fits in
# this many bytes; else one pass per BatchNorm that stops at it
ONE_PASS_BYTES = 1 << 30


def _one_batch(
    batches: Iterable[Tensor], count: int, num_batches: int, moments: dict[str, _Moments], todo: Sequence[str],
    itemsize: int,
) -> Tensor | None:  # fmt: skip
    """The calibration inputs (``count`` samples in ``num_batches`` batches) concatenated into one batch, when they
    can be run as one (every BatchNorm to recalibrate called once per forward, its largest input over all samples
    within :data:`ONE_PASS_BYTES` -- checked before any batch is held --, tensors of one trailing shape and
    dtype), else None."""
    if any(moments[p].calls not in (0, num_batches) for p in todo):  # a module applied twice: per call
        return None
    per_sample = max((moments[p].per_sample for p in todo), default=0)
    if 4 * count * per_sample * max(itemsize, 4) > ONE_PASS_BYTES:
        return None
    return concat_batches(list(batches))


def sequence_first_module(model: nn.Module) -> str | None:
    """The path of a module of ``model`` with ``batch_first=False`` (nn.RNN / LSTM / GRU, MultiheadAttention,
    Transformer layers: inputs (T, N, ...)) -- ``""`` for the root --, or None. Calibration batches joined along dim 0
    would be longer sequences there, so the one-pass BatchNorm reset and REPAIR refuse such models (a forward that
    transposes its input itself is not detected)."""
    return next((p for p, m in model.named_modules() if getattr(m, "batch_first", None) is False), None)


def concat_batches(xs: Sequence[Any]) -> Tensor | None:
    """The batches ``xs`` (each (n_i, *shape)) as one batch (sum n_i, *shape) -- ``xs[0]`` itself when there is one
    --, or None when they are not tensors of one trailing shape, dtype and device (or there are none)."""
    if not xs or not all(isinstance(x, Tensor) and x.dim() >= 1 for x in xs):
        return None
    if any(x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype or x.device != xs[0].device for x in xs):
        return None
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), 0)


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
        dist_group = current_group()
        if dist_group is not None:
            count = _reduce_running_averages(bns, count, dist_group[0])
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


def _reduce_running_averages(bns: Sequence[nn.Module], count: int, group: Any) -> int:
    """Combine, over the ranks of ``group``, the cumulative averages (``momentum=None``) of batch means and
    variances the plain reset left in ``bns``: the average over all ranks' batches is the batch-count-weighted mean of
    the ranks' averages. Returns the samples of all ranks."""
    parts = [torch.tensor([float(count)], dtype=torch.float64)]
    for m in bns:
        nb = m.num_batches_tracked.to(torch.float64)
        parts += [nb.reshape(1), m.running_mean.to(torch.float64) * nb, m.running_var.to(torch.float64) * nb]
    all_reduce_sum(parts, group)
    for i, m in enumerate(bns):
        nb, rm, rv = parts[1 + 3 * i : 4 + 3 * i]
        if nb.item() > 0:
            with torch.no_grad():
                m.running_mean.copy_(rm / nb)
                m.running_var.copy_(rv / nb)
                m.num_batches_tracked.fill_(int(nb.item()))
    return int(parts[0].item())
