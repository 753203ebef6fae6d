"""Vanilla weight averaging: ``A_k = lambda_k I``, ``B_k = I`` (no alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from pyfusion.fuse.config import AverageConfig
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph

__all__ = ["average_plan"]


@register_method(
    "average", config=AverageConfig, needs_data="optional", summary="vanilla weight averaging (no alignment)"
)
def average_plan(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: AverageConfig
) -> Plan:
    """Vanilla averaging ``W' = sum_k lambda_k W_k`` (no options: :class:`AverageConfig` has no fields). ``data`` is
    only used by the BatchNorm reset of ``fuse``."""
    return Plan.identity(graph, lambdas)
