"""Streaming neuron statistics of K members (DESIGN §5: pyfusion.stats).

Names resolve on first access, so ``import pyfusion.stats`` (and the layers above it) load the statistics engine
(``pyfusion.ops``) only when statistics are computed.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ActivationStats": "pyfusion.stats.activation_stats",
    "as_samples": "pyfusion.stats.collect",
    "batch_inputs": "pyfusion.stats.collect",
    "collect_stats": "pyfusion.stats.collect",
}

__all__ = ["ActivationStats", "as_samples", "batch_inputs", "collect_stats"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.stats' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
