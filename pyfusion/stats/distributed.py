"""Statistics over several processes: every rank streams its own calibration shard, then the sums are all-reduced.

:func:`pyfusion.fuse` enters :func:`reducing` when ``torch.distributed`` is initialized (more than one rank) and
``distributed`` is not switched off; inside it, every data-dependent statistic is reduced over the ranks of the
process group before it is used:

* the joint activation statistics of :func:`pyfusion.stats.groups.group_statistics` (activation matching, OT,
  partial fusion, clustering, pruning, REPAIR targets and REPAIR's fused-network passes), through
  :meth:`pyfusion.stats.ActivationStats.all_reduce` (Chan et al. 1979: counts, sample-weighted means and centred
  second moments are sums over disjoint samples, so the reduced state is the one-process state of the union of the
  shards, to float64 rounding);
* the BatchNorm input moments of :func:`pyfusion.fuse.bn.recalibrate_bn`, and the cumulative averages of the plain
  reset :func:`pyfusion.fuse.bn.reset_bn_stats` (each a mean over batches: their batch-count-weighted sum).

Every rank reduces the same statistics in the same order (the groups' order in the graph), and a rank that fails
before a reduction (no calibration batch on its shard, a non-finite activation) tells the others through
:func:`agree`, so all ranks raise together instead of waiting forever in the collective. Tensors travel on the
device the process group needs (CUDA for NCCL, the tensor's own otherwise) and come back where they were.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DistributedMismatchError",
    "agree",
    "all_reduce_sum",
    "broadcast_module",
    "check_same",
    "current_group",
    "reducing",
    "world_info",
]

# None outside reducing(); inside, the process group (torch.distributed's default group is represented by None in
# its own API, so the active state is a 1-tuple holding the group)
_ACTIVE: contextvars.ContextVar[tuple[Any] | None] = contextvars.ContextVar("pyfusion_distributed", default=None)


class DistributedMismatchError(ValueError):
    """The ranks of a distributed fusion disagree (different options, members or graphs), or one of them failed."""


def world_info(group: Any = None) -> tuple[int, int] | None:
    """(rank, world size) of ``group`` when ``torch.distributed`` is initialized, else None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(group), dist.get_world_size(group)


@contextlib.contextmanager
def reducing(group: Any = None) -> Iterator[None]:
    """Within this context, the statistics of this package are all-reduced over ``group`` (default: the world)."""
    if world_info(group) is None:
        raise ValueError("reducing() needs an initialized torch.distributed process group")
    token = _ACTIVE.set((group,))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_group() -> tuple[Any] | None:
    """``(group,)`` inside :func:`reducing`, None outside (a single-process computation)."""
    return _ACTIVE.get()


def _comm_device(group: Any, like: torch.device) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like


def all_reduce_sum(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks of ``group``, in place (one collective for all, float64 on the wire)."""
    import torch.distributed as dist

    if not tensors:
        return
    dev = _comm_device(group, tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat, group=group)
    off = 0
    for t in tensors:
        n = t.numel()
        with torch.no_grad():
            t.copy_(flat[off : off + n].view(t.shape))
        off += n


def agree(ok: bool, what: str, group: Any = None) -> None:
    """Collective: raise :class:`DistributedMismatchError` on every rank when ``ok`` is False on any rank (the
    failing ranks re-raise their own error after this returns; call it from an ``except`` block)."""
    import torch.distributed as dist

    info = world_info(group)
    assert info is not None
    rank, size = info
    flags = torch.zeros(size, dtype=torch.float64, device=_comm_device(group, torch.device("cpu")))
    flags[rank] = 0.0 if ok else 1.0
    dist.all_reduce(flags, group=group)
    failed = [r for r in range(size) if flags[r] > 0]
    if failed and ok:
        raise DistributedMismatchError(f"{what} failed on rank(s) {failed} (see their errors); nothing was fused")


def check_same(value: str, what: str, group: Any = None) -> None:
    """Collective: every rank must pass the same ``value`` (compared by a 62-bit hash); otherwise every rank raises
    :class:`DistributedMismatchError` naming ``what`` and the ranks that differ from rank 0."""
    import torch.distributed as dist

    info = world_info(group)
    assert info is not None
    rank, size = info
    h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "little") >> 2
    # float64 holds integers exactly below 2^53: send the hash as three 21-bit pieces
    mine = torch.tensor([(h >> s) & (2**21 - 1) for s in (0, 21, 42)], dtype=torch.float64)
    table = torch.zeros(size, 3, dtype=torch.float64, device=_comm_device(group, torch.device("cpu")))
    table[rank] = mine.to(table.device)
    dist.all_reduce(table, group=group)
    differ = [r for r in range(size) if not torch.equal(table[r], table[0])]
    if differ:
        raise DistributedMismatchError(
            f"the ranks of a distributed fusion must agree on {what}; rank(s) {differ} differ from rank 0 "
            f"(this is rank {rank}: {value[:300]})"
        )


def broadcast_module(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place, so that all ranks hold the
    bit-identical network (the structures must agree: checked by :func:`check_same` first)."""
    import torch.distributed as dist

    tensors = list(module.state_dict(keep_vars=True).items())
    layout = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors)
    check_same(layout, "the fused network's parameters (names, shapes, dtypes)", group)
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for _, t in tensors:
        if t.numel():
            by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in by_kind.items():  # one broadcast per dtype and device
        wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool collectives
        flat = torch.cat([t.detach().reshape(-1).to(wire) for t in ts]).to(_comm_device(group, device))
        dist.broadcast(flat, src=src, group=group)
        off = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[off : off + t.numel()].view(t.shape))
                off += t.numel()
