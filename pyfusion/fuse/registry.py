"""Registry of fusion methods: ``pyfusion.fuse`` dispatches through it, so new methods live in their own files.

A method is a function ``fn(members, graph, lambdas, data, **options) -> Plan | nn.Module`` registered with
:func:`register_method`. Returning a :class:`~pyfusion.fuse.plan.Plan` lets the one builder make the weights;
methods that fit weights directly (neuron interpolation) return the fused module (with ``fusion_plan`` set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the ``method=`` string.
        fn: the implementation.
        needs_data: "yes" (calibration data required), "no", or "optional" (used when given).
        summary: one line for error messages and ``--help``.
        min_members: the fewest members the method accepts (2; 1 for methods that also prune one network).
    """

    name: str
    fn: Callable[..., Any]
    needs_data: str
    summary: str
    min_members: int = 2


_METHODS: dict[str, MethodSpec] = {}

# modules imported on first lookup so that every built-in method is registered (add yours here, one line)
_BUILTIN_MODULES = (
    "pyfusion.fuse.average",
    "pyfusion.fuse.weight_matching",
    "pyfusion.fuse.activation_matching",
    "pyfusion.fuse.ot",
    "pyfusion.fuse.interp",
    "pyfusion.fuse.partial",
    "pyfusion.fuse.cluster",
)
_EXTRA_MODULES: list[str] = []


def register_method(
    name: str, *, needs_data: str = "no", summary: str = "", min_members: int = 2
) -> Callable[[Callable], Callable]:
    """Decorator registering a fusion method under ``name``.

    Args:
        name: the string users pass as ``method=``.
        needs_data: "yes", "no" or "optional".
        summary: one-line description.
        min_members: the fewest members accepted (1 for methods that also work on one network).
    """
    if needs_data not in ("yes", "no", "optional"):
        raise ValueError(f"needs_data must be 'yes', 'no' or 'optional'; got {needs_data!r}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"fusion method {name!r} is already registered by {_METHODS[name].fn.__module__}")
        _METHODS[name] = MethodSpec(
            name, fn, needs_data, summary or (fn.__doc__ or "").strip().split("\n")[0], int(min_members)
        )
        return fn

    return deco


def _load_builtins() -> None:
    import importlib

    for mod in (*_BUILTIN_MODULES, *_EXTRA_MODULES):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a method file another helper has not merged yet
            if exc.name != mod:
                raise


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """Look up a method; unknown names raise a ValueError listing the known ones."""
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"unknown fusion method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
