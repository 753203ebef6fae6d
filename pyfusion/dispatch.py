"""One dispatcher per op: picks the first backend that accepts the inputs, and says why the others declined.

Each op builds a :class:`Dispatcher` with its backends in priority order. A backend has a static
availability check (extension built? Triton importable? GPU present?) and a per-input check
(dtype, device, sizes). ``PYFUSION_BACKEND`` forces a backend for debugging and benchmarks:

* ``PYFUSION_BACKEND=reference``: every op uses that backend name;
* ``PYFUSION_BACKEND=linear_assignment:cpp,partial_linear:torch``: per op.

A forced backend that declines the inputs raises, listing its reasons (it never silently falls back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Backend", "Dispatcher", "NoBackendError", "REGISTRY", "forced_backend"]


class NoBackendError(RuntimeError):
    """No backend accepts the inputs (or the forced one declined)."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        name: short name used by ``PYFUSION_BACKEND`` ("cpp", "cuda", "triton", "torch", "reference").
        fn: the implementation, called with the op's arguments.
        available: returns the reasons the backend cannot run on this machine at all (empty: it can).
        supports: returns the reasons it cannot take these particular inputs (empty: it can).
        description: one line for ``python -m pyfusion.info``.
    """

    name: str
    fn: Callable[..., Any]
    available: Callable[[], list[str]] = field(default=lambda: [])
    supports: Callable[..., list[str]] = field(default=lambda *a, **k: [])
    description: str = ""

    def reasons(self, *args: Any, **kwargs: Any) -> list[str]:
        static = self.available()
        return static if static else self.supports(*args, **kwargs)


def forced_backend(op: str) -> str | None:
    """The backend name forced for ``op`` by ``PYFUSION_BACKEND``, or None."""
    spec = os.environ.get("PYFUSION_BACKEND", "").strip()
    if not spec:
        return None
    if ":" not in spec and "," not in spec:
        return spec
    for item in spec.split(","):
        if ":" in item:
            name, backend = (s.strip() for s in item.split(":", 1))
            if name == op:
                return backend
    return None


class Dispatcher:
    """Chooses a backend for one op, in priority order, honouring ``PYFUSION_BACKEND``."""

    def __init__(self, op: str, backends: Sequence[Backend]):
        self.op = op
        self.backends = list(backends)
        REGISTRY[op] = self

    def select(self, *args: Any, **kwargs: Any) -> Backend:
        forced = forced_backend(self.op)
        if forced is not None:
            by_name = {b.name: b for b in self.backends}
            if forced not in by_name:
                if os.environ.get("PYFUSION_BACKEND", "").strip() == forced:
                    # A global override naming a backend this op does not have: use the default order.
                    forced = None
                else:
                    raise NoBackendError(
                        f"PYFUSION_BACKEND asks op {self.op!r} to use backend {forced!r}, "
                        f"which does not exist; known: {sorted(by_name)}"
                    )
            if forced is not None:
                backend = by_name[forced]
                why = backend.reasons(*args, **kwargs)
                if why:
                    raise NoBackendError(
                        f"PYFUSION_BACKEND forces backend {forced!r} for op {self.op!r}, but it declined: "
                        + "; ".join(why)
                    )
                return backend
        declined: list[str] = []
        for backend in self.backends:
            why = backend.reasons(*args, **kwargs)
            if not why:
                return backend
            declined.append(f"  {backend.name}: " + "; ".join(why))
        raise NoBackendError(f"no backend of op {self.op!r} accepts these inputs:\n" + "\n".join(declined))

    def explain(self, *args: Any, **kwargs: Any) -> str:
        """One line per backend: 'ok' or its reasons for these inputs."""
        lines = [f"op {self.op}:"]
        for backend in self.backends:
            why = backend.reasons(*args, **kwargs)
            lines.append(f"  {backend.name:10s} " + ("ok" if not why else "declined: " + "; ".join(why)))
        return "\n".join(lines)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.select(*args, **kwargs).fn(*args, **kwargs)


REGISTRY: dict[str, Dispatcher] = {}
