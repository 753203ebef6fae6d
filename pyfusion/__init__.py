"""pyfusion: fast neuron-level fusion of K trained networks, from full fusion to the exact ensemble.

Public API (imported lazily so that ``import pyfusion`` stays cheap):

* ``pyfusion.fuse(models, data=None, *, method, lambdas=None, **options)``: fuse K members. ``pyfusion.fuse`` is
  the package :mod:`pyfusion.fuse`, which is callable (``pyfusion.fuse.available_methods()``, the method configs
  such as ``pyfusion.fuse.PartialConfig`` and the plan functions live there too);
  ``pyfusion.fuse(models, data, budget=0.5)``: the most accurate model within a FLOP budget (a fraction of the
  ensemble's FLOPs, a FLOP count, or ``pyfusion.fuse.Flops(n)``; :mod:`pyfusion.fuse.budget`);
* ``pyfusion.cost(model)``: effective and dense parameters / FLOPs;
* ``pyfusion.save(module, path)`` / ``pyfusion.load(path)``: safe serialization;
* subpackages ``ops`` (kernels), ``nn`` (drop-in modules), ``graph`` (neuron groups), ``stats`` (statistics),
  ``match`` (features, costs, solvers).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def _map_source_triton_kernels() -> None:
    """Make ``pyfusion.triton_kernels`` importable from a source checkout.

    Installed (wheel or editable), the build maps the top-level ``triton_kernels/`` folder to
    ``pyfusion.triton_kernels``. When the package is used straight from a checkout
    (``PYTHONPATH=repo``), register the folder under that name here. Nothing is imported from it.
    """
    if "pyfusion.triton_kernels" in sys.modules:
        return
    try:
        if importlib.util.find_spec("pyfusion.triton_kernels") is not None:
            return
    except (ImportError, ValueError):
        pass
    init = Path(__file__).resolve().parent.parent / "triton_kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "pyfusion.triton_kernels", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyfusion.triton_kernels"] = module
    spec.loader.exec_module(module)


_map_source_triton_kernels()

# name -> "module:attribute" (or "module" for subpackages); resolved on first access.
_LAZY: dict[str, str] = {
    # the callable package, never the function: importing any pyfusion.fuse.* submodule binds this attribute to
    # the package anyway, so the lazy attribute must be the same object whatever was imported first
    "fuse": "pyfusion.fuse",
    "cost": "pyfusion.fuse.cost:cost",
    "save": "pyfusion.serialization:save",
    "load": "pyfusion.serialization:load",
    "ops": "pyfusion.ops",
    "nn": "pyfusion.nn",
    "graph": "pyfusion.graph",
    "stats": "pyfusion.stats",
    "match": "pyfusion.match",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'pyfusion' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value
