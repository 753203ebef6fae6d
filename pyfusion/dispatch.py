"""One dispatcher per op: picks the first backend that accepts the inputs, and says why the others declined.

Each op builds a :class:`Dispatcher` with its backends in priority order. A backend has a static
availability check (extension built? Triton importable? GPU present?) and a per-input check
(dtype, device, sizes). Every op uses the same backend names for the same kind of implementation:

=================== =====================================================================================
``cpp``             compiled C++ CPU kernel (``pyfusion._C``)
``cuda``            compiled CUDA kernel (``pyfusion._C``)
``triton``          Triton kernel compiled for the GPU
``triton_interpret`` the Triton kernel in Triton's CPU interpreter (``TRITON_INTERPRET=1``; tests)
``torch``           torch operations in the input's dtype, on any device
``reference``       the float64 ``*_ref`` of :mod:`pyfusion.ops.reference` (the spec; slow)
=================== =====================================================================================

``PYFUSION_BACKEND`` forces a backend for debugging and benchmarks, and is read in one place
(:func:`forced_spec`):

* ``PYFUSION_BACKEND=reference``: every op uses that backend; an op that has no backend of that name
  raises :class:`NoBackendError` naming the op and its backends (a global override never silently skips
  an op);
* ``PYFUSION_BACKEND=linear_assignment:cpp,partial_linear:torch``: per op; naming an op that does not exist
  raises.

A forced backend that declines the inputs raises, listing its reasons (it never silently falls back).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "Dispatcher",
    "NoBackendError",
    "REGISTRY",
    "describe_inputs",
    "forced_backend",
    "forced_spec",
]

BACKEND_NAMES = ("cpp", "cuda", "triton", "triton_interpret", "torch", "reference")
_ENV = "PYFUSION_BACKEND"


class NoBackendError(RuntimeError):
    """No backend accepts the inputs, or ``PYFUSION_BACKEND`` forces one that does not exist or declines."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: the name ``PYFUSION_BACKEND`` uses; pyfusion's ops use :data:`BACKEND_NAMES` only.
        fn: the implementation, called with the op's arguments.
        available: returns the reasons the backend cannot run on this machine at all (empty: it can).
        supports: returns the reasons it cannot take these particular inputs (empty: it can).
        description: one line for ``python -m pyfusion.info``.
        defers: returns the reasons the automatic choice passes over this backend, on this machine, for a later
            one that accepts the inputs (a measured speed order, not a limitation: the backend still runs when
            ``PYFUSION_BACKEND`` forces it, or when no later backend accepts).
    """

    name: str
    fn: Callable[..., Any]
    available: Callable[[], list[str]] = field(default=lambda: [])
    supports: Callable[..., list[str]] = field(default=lambda *a, **k: [])
    description: str = ""
    defers: Callable[[], list[str]] = field(default=lambda: [])

    def reasons(self, *args: Any, **kwargs: Any) -> list[str]:
        static = self.available()
        return static if static else self.supports(*args, **kwargs)


def forced_spec() -> str | None:
    """The raw value of ``PYFUSION_BACKEND`` (None when unset or blank): the one place it is read.

    Read at every dispatch so that a change (``monkeypatch.setenv`` in a test, ``os.environ[...] = ...`` in a
    notebook) applies at once; ``os.environ.get`` costs about 1 us, against 3-4 us for a whole batch-1
    ``PartialLinear`` call on the compiled kernel, so callers key their caches by this value.
    """
    spec = os.environ.get(_ENV)
    return spec if spec and spec.strip() else None


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``spec`` -> (global backend name or None, ((op, backend), ...))."""
    spec = spec.strip()
    if ":" not in spec and "," not in spec:
        return spec, ()
    pairs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise NoBackendError(
                f"{_ENV}={spec!r}: entry {item!r} must be 'op:backend' (or give one backend name for every op)"
            )
        op, backend = (s.strip() for s in item.split(":", 1))
        pairs.append((op, backend))
    return None, tuple(pairs)


def _known_ops() -> set[str]:
    from pyfusion.ops import OP_MODULES  # the static list of pyfusion's ops (their modules load lazily)

    return set(OP_MODULES) | set(REGISTRY)


def forced_backend(op: str, spec: str | None = None) -> str | None:
    """The backend name that ``spec`` (default: ``PYFUSION_BACKEND``) forces for ``op``, or None.

    Raises:
        NoBackendError: the per-op form names an op that does not exist, or an entry is malformed.
    """
    if spec is None:
        spec = forced_spec()
    if spec is None:
        return None
    everywhere, pairs = _parse(spec)
    if everywhere is not None:
        return everywhere
    unknown = sorted({name for name, _ in pairs} - _known_ops())
    if unknown:
        raise NoBackendError(
            f"{_ENV}={spec!r} names op(s) {unknown} that do not exist; pyfusion's ops: {sorted(_known_ops())}"
        )
    for name, backend in pairs:
        if name == op:
            return backend
    return None


def _describe(value: Any) -> str:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return (
            f"Tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).replace('torch.', '')}, device={value.device})"
        )
    if isinstance(value, np.ndarray):
        return f"ndarray(shape={value.shape}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value):
        inner = [_describe(v) for v in value[:3]]
        more = f", ... ({len(value)} in all)" if len(value) > 3 else ""
        return "[" + ", ".join(inner) + more + "]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_inputs(args: Sequence[Any], names: Sequence[str] | None = None) -> str:
    """One line per argument: its name and shape / dtype / device (tensors, arrays) or its value."""
    lines = []
    for i, value in enumerate(args):
        name = names[i] if names is not None and i < len(names) else f"arg{i}"
        lines.append(f"    {name}: {_describe(value)}")
    return "\n".join(lines)


class Dispatcher:
    """Chooses a backend for one op, in priority order, honouring ``PYFUSION_BACKEND``.

    Args:
        op: the op's name (as in ``PYFUSION_BACKEND`` and ``python -m pyfusion.info``).
        backends: in priority order; their names must be distinct.
        arg_names: the names of the op's positional arguments, for error messages.
        cache_key: for ops called often on small inputs: a function of the op's arguments that captures
            everything its backends' reasons depend on (device, dtype, ...); :meth:`__call__` then remembers
            the choice per key (:meth:`select_cached`).
    """

    def __init__(
        self,
        op: str,
        backends: Sequence[Backend],
        arg_names: Sequence[str] | None = None,
        cache_key: Callable[..., Hashable] | None = None,
    ):
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"op {op!r}: backend names must be distinct; got {names}")
        self.op = op
        self.backends = list(backends)
        self.arg_names = tuple(arg_names) if arg_names is not None else None
        self._by_name = {b.name: b for b in self.backends}
        self._cache: dict[Hashable, Backend] = {}
        self._cache_key = cache_key
        REGISTRY[op] = self

    def _inputs(self, args: Sequence[Any]) -> str:
        return "inputs:\n" + describe_inputs(args, self.arg_names)

    def select(self, *args: Any, spec: str | None = None) -> Backend:
        """The backend that runs these inputs (``spec``: the value of ``PYFUSION_BACKEND``, read if None).

        Raises:
            NoBackendError: nothing accepts the inputs, or the forced backend does not exist or declines; the
                message lists the inputs and every backend's reasons.
        """
        spec = forced_spec() if spec is None else spec
        forced = forced_backend(self.op, spec)
        if forced is not None:
            backend = self._by_name.get(forced)
            if backend is None:
                raise NoBackendError(
                    f"PYFUSION_BACKEND={spec!r}: backend {forced!r} does not exist "
                    f"for op {self.op!r}; its backends: {list(self._by_name)}"
                )
            why = backend.reasons(*args)
            if why:
                raise NoBackendError(
                    f"PYFUSION_BACKEND forces backend {forced!r} for op {self.op!r}, but it declined: "
                    + "; ".join(why)
                    + "\n"
                    + self._inputs(args)
                )
            return backend
        declined: list[str] = []
        deferred: Backend | None = None
        for backend in self.backends:
            why = backend.reasons(*args)
            if not why:
                if backend.defers():
                    deferred = deferred or backend
                    continue
                return backend
            declined.append(f"  {backend.name}: " + "; ".join(why))
        if deferred is not None:  # nothing later accepts: the passed-over backend runs after all
            return deferred
        raise NoBackendError(
            f"no backend of op {self.op!r} accepts these inputs:\n" + "\n".join(declined) + "\n" + self._inputs(args)
        )

    def select_cached(self, key: Hashable, *args: Any) -> Backend:
        """:meth:`select`, remembered per ``(key, PYFUSION_BACKEND)``.

        For hot paths whose backends' reasons depend only on what ``key`` captures (device, dtype, ...);
        :meth:`clear_cache` forgets the choices (tests that change availability).
        """
        spec = forced_spec()
        full = (key, spec)
        backend = self._cache.get(full)
        if backend is None:
            backend = self.select(*args, spec=spec)
            self._cache[full] = backend
        return backend

    def clear_cache(self) -> None:
        self._cache.clear()

    def explain(self, *args: Any) -> str:
        """One line per backend: 'ok' or its reasons for these inputs."""
        lines = [f"op {self.op}:"]
        for backend in self.backends:
            why = backend.reasons(*args)
            later = backend.defers() if not why else []
            state = "declined: " + "; ".join(why) if why else "ok"
            if later:
                state += " (deferred: " + "; ".join(later) + ")"
            lines.append(f"  {backend.name:10s} " + state)
        return "\n".join(lines)

    def __call__(self, *args: Any) -> Any:
        if self._cache_key is not None:
            return self.select_cached(self._cache_key(*args), *args).fn(*args)
        return self.select(*args).fn(*args)


REGISTRY: dict[str, Dispatcher] = {}
