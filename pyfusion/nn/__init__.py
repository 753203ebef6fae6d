"""Drop-in modules for fused networks: partially fused layers at a cost proportional to their effective
FLOPs, stacked ensembles, executable sub-ensembles (``SubEnsemble``), and an in-place module swap (DESIGN §7).
Names load on first access."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "EnsembleLinear": "pyfusion.nn.partial",
    "PartialConv1d": "pyfusion.nn.partial",
    "PartialConv2d": "pyfusion.nn.partial",
    "PartialLinear": "pyfusion.nn.partial",
    "PartialMultiheadAttention": "pyfusion.nn.attention",
    "TorchScriptUnsupportedError": "pyfusion.nn.partial",
    "SubEnsemble": "pyfusion.nn.ensemble",
    "replace_": "pyfusion.nn.swap",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.nn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
