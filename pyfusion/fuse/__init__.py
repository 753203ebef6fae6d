"""Fusion methods and the public entry point ``pyfusion.fuse`` (DESIGN §3, §5).

``fuse(models, data=None, *, method, lambdas=None, **options)`` traces the neuron groups, asks the method for a
plan (maps A_k, B_k per group), builds the fused network with the one builder, then recalibrates BatchNorm
statistics on the calibration data (``reset_bn``) and optionally applies REPAIR (``repair=True``).

``pyfusion.fuse`` is this package, and the package is callable: ``pyfusion.fuse(models, data, method=...)`` is
``pyfusion.fuse.fuse(models, data, method=...)``, so ``pyfusion.fuse(...)``, ``pyfusion.fuse.available_methods()``
and ``from pyfusion.fuse import fuse`` all work, in any import order.

What lives here: the methods (one module each: ``average``, ``weight_matching``, ``activation_matching``, ``ot``,
``partial``, ``cluster``, ``interp``), their settings (:mod:`pyfusion.fuse.config`: ``PartialConfig``, ...), the
registry, the plan (:class:`Plan`), the one builder (:func:`build`), BatchNorm reset and REPAIR, and the effective
cost of a fused network. The costs, features and solver calls the methods use are :mod:`pyfusion.match`.

The plan functions (``partial_plan(members, graph, lambdas, data=None, *, alpha=..., ...)``, ...) are importable
from here (loaded on first access, like the methods themselves).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from pyfusion.fuse.api import fuse
from pyfusion.fuse.budget import BudgetError, BudgetSearch, Flops, budget_search, fuse_budgets, fuse_within_budget
from pyfusion.fuse.builder import build
from pyfusion.fuse.config import (
    ActivationMatchingConfig,
    AverageConfig,
    ClusterConfig,
    HFConfig,
    InterpConfig,
    KFConfig,
    KFGradientConfig,
    MethodConfig,
    OTConfig,
    PartialConfig,
    PruneConfig,
    UnknownOptionError,
    WeightMatchingConfig,
)
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import available_methods, get_method, register_method

# plan functions: name -> module, imported on first access (importing a method module registers the method)
_PLANS = {
    "activation_matching_plan": "pyfusion.fuse.activation_matching",
    "average_plan": "pyfusion.fuse.average",
    "cluster_plan": "pyfusion.fuse.cluster",
    "ot_plan": "pyfusion.fuse.ot",
    "partial_plan": "pyfusion.fuse.partial",
    "prune_plan": "pyfusion.fuse.cluster",
    "weight_matching_plan": "pyfusion.fuse.weight_matching",
}

__all__ = [
    "ActivationMatchingConfig",
    "AverageConfig",
    "BudgetError",
    "BudgetSearch",
    "ClusterConfig",
    "Flops",
    "GroupPlan",
    "HFConfig",
    "InterpConfig",
    "KFConfig",
    "KFGradientConfig",
    "MethodConfig",
    "OTConfig",
    "PartialConfig",
    "Plan",
    "PruneConfig",
    "UnknownOptionError",
    "WeightMatchingConfig",
    "available_methods",
    "budget_search",
    "build",
    "fuse",
    "fuse_budgets",
    "fuse_within_budget",
    "get_method",
    "register_method",
    *_PLANS,
]


def __getattr__(name: str) -> Any:
    module = _PLANS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.fuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PLANS))


class _CallableModule(types.ModuleType):
    """The class of this package: calling the module calls :func:`pyfusion.fuse.fuse`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return fuse(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
