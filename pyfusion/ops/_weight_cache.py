"""Tensors derived from a weight once per weight version (packed panels, tap-major copies, dense copies).

A cache entry belongs to the weight it was derived from and is rebuilt when the weight changes: an in-place update
(optimizer step, ``copy_``, ``load_state_dict``) bumps the weight's version counter, ``param.data = other``
changes its storage, and a new tensor has its own entry. Entries hold a weak reference to the weight (they go
with it) and a strong reference to its storage (so that its address cannot be reused by another tensor while the
entry exists). A view made anew at every call (``param.reshape(-1)``) is cached under the tensor it views, with
its offset and size. Inference tensors have no version counter, and inside ``torch.inference_mode()`` they can
still be changed in place (``w.mul_(2)``) with nothing to tell the cache: what is derived from them is rebuilt at
every call, never cached (a stale copy would be a silently wrong output; build modules outside inference mode to
keep the cache).

Writes through ``param.data`` (``w.data.mul_(2)``, ``w.data[i] = x``, ``w.data.copy_(new)``: the idiom of
hand-written optimizers, EMA updates and weight surgery) bypass the version counter: ``.data`` is an alias with a
counter of its own. A cached copy would then be stale, a silently wrong output. So every ``nn.Parameter`` a cache
entry is made for becomes a :class:`TrackedParameter` (in place, :func:`track`): its ``.data`` is
``self.detach()``, which shares the version counter, and so every such write is seen. Other tensors passed to the
ops directly (not Parameters) are not changed: a write through their ``.data`` stays unseen (change them in place,
or call :func:`clear`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TrackedParameter", "derived_weight", "clear", "entries", "forget", "track"]

_SET_DATA = torch._C.TensorBase.data.__set__


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``.data`` is ``self.detach()``: the same storage *and* the same version counter,
    so an in-place write through ``.data`` bumps the parameter's version and invalidates what was derived from it
    (module docstring). Everything else is ``nn.Parameter``'s: ``p.data = other`` swaps the storage as before,
    ``isinstance(p, nn.Parameter)`` holds, state dicts and :func:`pyfusion.save` hold plain tensors.

    The one difference from ``.data``: autograd now sees such a write, so changing a weight through ``.data``
    between a forward and its backward raises torch's "modified by an inplace operation" error instead of
    silently computing gradients from the new values.
    """

    @property
    def data(self) -> Tensor:  # type: ignore[override]
        return self.detach()

    @data.setter
    def data(self, value: Tensor) -> None:
        _SET_DATA(self, value)


def track(t: Tensor | None) -> None:
    """Make ``t`` (or the tensor it views) a :class:`TrackedParameter` in place if it is a plain ``nn.Parameter``
    (``__class__`` assignment: same object, storage, version and autograd state); anything else is left alone."""
    if t is None:
        return
    base = t if t._base is None else t._base
    if type(base) is nn.Parameter:
        base.__class__ = TrackedParameter


@dataclass
class _Entry:
    owner: weakref.ref
    source: Tensor
    version: int
    value: Any


_CACHE: dict[tuple, _Entry] = {}
_LOCK = threading.Lock()


def _version(t: Tensor) -> int:
    # EAFP: is_inference() first cost ~0.4 us a call on the loaded VM (of a ~7 us batch-1 GEMV); reading the
    # version of an inference tensor raises
    try:
        return t._version
    except RuntimeError:
        return -1


def derived_weight(weight: Tensor, key: Hashable, build: Callable[[Tensor], Any]) -> Any:
    """``build(weight.detach())``, cached per (weight, ``key``) until the weight changes (see the module docstring).

    ``key`` names what is derived (and from which layout): one weight may have several derived tensors.
    """
    owner = weight if weight._base is None else weight._base
    full = (id(owner), weight.storage_offset(), weight.numel(), key)
    ver = _version(weight)
    if ver < 0:  # an inference tensor: no version to tell an in-place change (module docstring)
        return build(weight.detach())
    track(owner)
    ent = _CACHE.get(full)
    if ent is not None and ent.owner() is owner and ent.version == ver and ent.source.data_ptr() == weight.data_ptr():
        return ent.value
    src = weight.detach()
    value = build(src)

    def _drop(ref: weakref.ref, full: tuple = full) -> None:
        with _LOCK:
            cur = _CACHE.get(full)
            if cur is not None and cur.owner is ref:
                del _CACHE[full]

    with _LOCK:
        _CACHE[full] = _Entry(weakref.ref(owner, _drop), src, ver, value)
    return value


def entry_ref(table: dict, key: Hashable, owner: Tensor, slot: int) -> weakref.ref:
    """A weak reference to ``owner`` for the tuple entry ``table[key]`` (held at index ``slot``): when ``owner``
    dies the entry is removed, unless it was replaced by one holding another reference meanwhile."""

    def _drop(ref: weakref.ref) -> None:
        cur = table.get(key)
        if cur is not None and cur[slot] is ref:
            del table[key]

    return weakref.ref(owner, _drop)


def forget(weight: Tensor, key: Hashable) -> None:
    """Drop the tensor derived from ``weight`` under ``key``, if any (a strategy that was measured, not kept)."""
    owner = weight if weight._base is None else weight._base
    with _LOCK:
        _CACHE.pop((id(owner), weight.storage_offset(), weight.numel(), key), None)


def entries() -> int:
    """Number of live cache entries (tests)."""
    return len(_CACHE)


def clear() -> None:
    """Forget every derived tensor (tests, or to free their memory)."""
    with _LOCK:
        _CACHE.clear()
