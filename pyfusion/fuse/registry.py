"""Registry of fusion methods: ``pyfusion.fuse`` dispatches through it, so new methods live in their own files.

A method is registered with :func:`register_method` under its name, with its config class (the method's
settings, a frozen dataclass of :mod:`pyfusion.fuse.config`) and its implementation
``run(members, graph, lambdas, data, config) -> Plan | nn.Module``. Returning a :class:`~pyfusion.fuse.plan.Plan`
lets the one builder make the weights; methods that fit weights directly (neuron interpolation) return the fused
module (with ``fusion_plan`` set).

A method may also be registered without a config (a user's own method): its function then takes the keyword
options itself, ``fn(members, graph, lambdas, data, **options)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from pyfusion.fuse.config import MethodConfig

__all__ = ["MethodSpec", "available_methods", "get_method", "method_for_config", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the ``method=`` string.
        fn: the keyword entry point ``fn(members, graph, lambdas, data=None, *, <config fields>, config=None)``
            (its signature lists the options); for a method without a config, the registered function itself.
        needs_data: "yes" (calibration data required), "no", or "optional" (used when given).
        summary: one line for error messages and ``--help``.
        min_members: the fewest members the method accepts (2; 1 for methods that also prune one network).
        config: the config class (None: a method that takes ``**options`` itself).
        run: the implementation ``run(members, graph, lambdas, data, config)`` (None without a config).
    """

    name: str
    fn: Callable[..., Any]
    needs_data: str
    summary: str
    min_members: int = 2
    config: type[MethodConfig] | None = None
    run: Callable[..., Any] | None = None

    def make_config(self, options: Mapping[str, Any], config: MethodConfig | None = None) -> MethodConfig | None:
        """The method's config from keyword ``options`` (on top of ``config`` when given); None without a config
        class (``options`` then go to :attr:`fn` as they are).

        Raises:
            UnknownOptionError: an option the config does not have (the message lists the fields).
            ValueError: an invalid value (naming the field), or ``config`` of another method's type.
        """
        if self.config is None:
            if config is not None:
                raise ValueError(f"method {self.name!r} has no config class; pass its options as keywords")
            return None
        return self.config.from_options(options, method=self.name, base=config)

    def call(self, members: Any, graph: Any, lambdas: Any, data: Any, config: MethodConfig | None, **options: Any):
        """Run the method: ``run(..., config)``, or ``fn(..., **options)`` for a method without a config."""
        if self.run is None:
            return self.fn(members, graph, lambdas, data, **options)
        return self.run(members, graph, lambdas, data, config)


_METHODS: dict[str, MethodSpec] = {}

# Method discovery: on first lookup every submodule of pyfusion.fuse (not starting with "_") is imported, so a new
# method only needs its own file with a @register_method decorator; nothing here has to be edited.
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


def _keyword_entry(name: str, config_cls: type[MethodConfig], run: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(members, graph, lambdas, data=None, *, config=None, **options)``: options -> config -> ``run``, with a
    signature listing the config's fields (so ``help()``, ``inspect`` and the CLI see the options)."""

    @functools.wraps(run)
    def entry(members: Any, graph: Any, lambdas: Any, data: Any = None, *, config: Any = None, **options: Any) -> Any:
        return run(members, graph, lambdas, data, config_cls.from_options(options, method=name, base=config))

    kw = inspect.Parameter.KEYWORD_ONLY
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(p, pos) for p in ("members", "graph", "lambdas")]
    params.append(inspect.Parameter("data", pos, default=None))
    params += [inspect.Parameter(f.name, kw, default=f.default) for f in fields(config_cls)]
    params.append(inspect.Parameter("config", kw, default=None))
    entry.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    del entry.__wrapped__  # the signature above, not run's
    return entry


def register_method(
    name: str,
    *,
    config: type[MethodConfig] | None = None,
    needs_data: str = "no",
    summary: str = "",
    min_members: int = 2,
) -> Callable[[Callable], Callable]:
    """Decorator registering a fusion method under ``name``.

    With ``config``, the decorated function is the implementation ``run(members, graph, lambdas, data, config)``
    and the decorator returns the keyword entry point
    ``fn(members, graph, lambdas, data=None, *, <config fields>=<defaults>, config=None)``, which builds the
    config from the keywords (unknown ones raise :class:`~pyfusion.fuse.config.UnknownOptionError`). Without
    ``config``, the function takes ``**options`` itself and is returned unchanged.

    Args:
        name: the string users pass as ``method=``.
        config: the method's config class (a frozen :class:`~pyfusion.fuse.config.MethodConfig` subclass).
        needs_data: "yes", "no" or "optional".
        summary: one-line description.
        min_members: the fewest members accepted (1 for methods that also work on one network).
    """
    if needs_data not in ("yes", "no", "optional"):
        raise ValueError(f"needs_data must be 'yes', 'no' or 'optional'; got {needs_data!r}")
    if config is not None and not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise ValueError(f"config must be a MethodConfig subclass; got {config!r}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].fn is not fn and _METHODS[name].run is not fn:
            owner = _METHODS[name].run or _METHODS[name].fn
            raise ValueError(f"fusion method {name!r} is already registered by {owner.__module__}")
        if config is not None:
            for other in _METHODS.values():
                if other.config is config and other.name != name:
                    raise ValueError(f"config {config.__name__} already belongs to method {other.name!r}")
        entry = fn if config is None else _keyword_entry(name, config, fn)
        _METHODS[name] = MethodSpec(
            name,
            entry,
            needs_data,
            summary or (fn.__doc__ or "").strip().split("\n")[0],
            int(min_members),
            config,
            None if config is None else fn,
        )
        return entry

    return deco


def _load_builtins() -> None:
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil

    pkg = importlib.import_module("pyfusion.fuse")  # the package, whatever the attribute pyfusion.fuse is bound to

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


def method_for_config(config: MethodConfig) -> MethodSpec:
    """The registered method whose config class is ``type(config)`` (or its nearest registered base class).

    Raises:
        ValueError: not a config, or no method has this config class (the message lists the config classes).
    """
    _load_builtins()
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config must be a method config (pyfusion.fuse.config); got {type(config).__name__}")
    by_class = {spec.config: spec for spec in _METHODS.values() if spec.config is not None}
    for cls in type(config).__mro__:
        if cls in by_class:
            return by_class[cls]
    known = ", ".join(f"{c.__name__} ({s.name})" for c, s in sorted(by_class.items(), key=lambda kv: kv[1].name))
    raise ValueError(f"no fusion method takes a {type(config).__name__}; the method configs are: {known}")
