"""``torch.export`` front end: one exported program per architecture and input signature (cached).

The export runs in eval mode (the modes are restored), non-strict, with static shapes. Exports are cached by a
structural fingerprint of the model (module classes and their plain attributes, tensor names / shapes / dtypes,
which tensors are tied, hooks, Hugging Face configs) plus the input signature, so that fusing many members of one
architecture (and the test suite) exports each architecture once: an MLP exports in ~0.03 s, a ResNet-20 in
~0.2 s, a two-layer Hugging Face model in ~0.6-1 s after the ~2 s first call of a process (2-core VM, loaded).

Hugging Face models are exported with ``config.use_cache = False`` (restored afterwards): a key/value cache in the
outputs (``DynamicCache``) is not a pytree torch.export knows, and it is generation state, not part of the function
the neuron groups describe (a fused model builds its own cache, in its own head layout, when it generates).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pyfusion.graph.capture import input_signature

__all__ = ["export_program", "fingerprint", "clear_cache"]

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_SIZE = 16  # programs hold references to one model's tensors: keep a handful


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return tuple(v)
    if isinstance(v, torch.dtype):
        return str(v)
    return ...


def _attrs(m: nn.Module) -> tuple:
    out = []
    for k, v in sorted(vars(m).items()):
        if k in ("training",) or k.startswith("_") and k not in ("_qkv_same_embed_dim",):
            continue
        p = _plain(v)
        if p is not ...:
            out.append((k, p))
        elif hasattr(v, "to_dict") and callable(v.to_dict):  # a Hugging Face config steers the forward
            try:
                out.append((k, repr(sorted((kk, repr(vv)) for kk, vv in v.to_dict().items()))))
            except Exception:  # an odd config object: fingerprint by identity (no cache sharing)
                out.append((k, id(v)))
            out.append(("_attn_implementation", repr(getattr(v, "_attn_implementation", None))))
    return tuple(out)


def fingerprint(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """A key that is equal for two models the export would trace to the same graph (same classes, attributes,
    tensor shapes, ties, hooks) and the same input signature."""
    mods = tuple(
        (p, type(m).__module__, type(m).__qualname__, _attrs(m), len(m._forward_hooks), len(m._forward_pre_hooks))
        for p, m in model.named_modules(remove_duplicate=False)
    )
    ids: dict[int, int] = {}
    tensors = []
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        tensors.append((n, tuple(t.shape), str(t.dtype), t.device.type, ids.setdefault(id(t), len(ids))))
    return (mods, tuple(tensors), input_signature(args, kwargs))


def clear_cache() -> None:
    """Forget every cached export."""
    _CACHE.clear()


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` on every (Hugging Face) config of ``model`` for the duration; restored after."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = [(c, c.use_cache) for c in configs.values() if getattr(c, "use_cache", None) is True]
    try:
        for c, _ in saved:
            c.use_cache = False
        yield
    finally:
        for c, v in saved:
            c.use_cache = v


def export_program(model: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> Any:
    """``torch.export.export(model, args, kwargs, strict=False)`` in eval mode, cached (see the module docstring)."""
    with _without_kv_cache(model):
        return _export_program(model, args, kwargs)


def _export_program(model: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None) -> Any:
    kwargs = dict(kwargs or {})
    key = fingerprint(model, args, kwargs)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    _CACHE[key] = ep
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return ep
