"""The ops pyfusion's modules and methods call.

Every op has one shape (:mod:`pyfusion.ops._registry`): a validated public function -> a ``torch.library`` op
(fake kernel; autograd where differentiable) whose body calls one :class:`~pyfusion.dispatch.Dispatcher` ->
backends (C++ CPU, CUDA, Triton, torch) -> a float64 ``*_ref`` in :mod:`pyfusion.ops.reference`.

The layer ops (``partial_linear``, ``partial_conv2d``: what :mod:`pyfusion.nn` runs) load with this package;
their modules are cheap (the ``torch.library`` registration and triton load on first need). The fusion-time ops
load on first access, so that inference code never imports them (nor scipy, nor the statistics layer).
"""

from __future__ import annotations

import importlib
from typing import Any

from pyfusion.ops._registry import register_all
from pyfusion.ops.partial_conv2d import partial_conv2d
from pyfusion.ops.partial_linear import partial_linear

# op name -> module that defines it (its dispatcher, registration and public function).
OP_MODULES: dict[str, str] = {
    "accumulate_moments": "pyfusion.ops.moments",
    "correlation": "pyfusion.ops.moments",
    "hf_cost": "pyfusion.ops.interp_cost",
    "linear_assignment": "pyfusion.ops.assignment",
    "partial_conv2d": "pyfusion.ops.partial_conv2d",
    "partial_linear": "pyfusion.ops.partial_linear",
    "weighted_kmeans": "pyfusion.ops.cluster",
}

# public name -> module, resolved on first access
_LAZY: dict[str, str] = {
    "AssignmentResult": "pyfusion.ops.assignment",
    "ClusterResult": "pyfusion.ops.cluster",
    "accumulate_moments": "pyfusion.ops.moments",
    "correlation": "pyfusion.ops.moments",
    "hf_cost": "pyfusion.ops.interp_cost",
    "linear_assignment": "pyfusion.ops.assignment",
    "weighted_kmeans": "pyfusion.ops.cluster",
}

__all__ = [
    "OP_MODULES",
    "AssignmentResult",
    "ClusterResult",
    "accumulate_moments",
    "correlation",
    "hf_cost",
    "linear_assignment",
    "partial_conv2d",
    "partial_linear",
    "register_all",
    "weighted_kmeans",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
