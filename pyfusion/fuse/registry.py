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

# Method discovery: on first lookup every submodule of pyfusion.fuse (not starting with "_") is imported, so a new
# method only needs its own file with a @register_method decorator; nothing here has to be edited.
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


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
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil

    # not `import pyfusion.fuse as pkg`: that binds the attribute pyfusion.fuse, which is the fuse *function*
    # once pyfusion's lazy __getattr__ has resolved it
    pkg = importlib.import_module("pyfusion.fuse")

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{pkg.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken method file must not hide the others; its error is reported on lookup
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    _LOADED = True


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """Look up a method; unknown names raise a ValueError listing the known ones."""
    _load_builtins()
    if name not in _METHODS:
        broken = "".join(f"; {m} failed to import ({e})" for m, e in _IMPORT_ERRORS.items())
        raise ValueError(f"unknown fusion method {name!r}; known methods: {', '.join(sorted(_METHODS))}{broken}")
    return _METHODS[name]
