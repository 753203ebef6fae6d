"""``method="cluster_fit"``: generalized pruning whose every slot is fitted to its cluster's targets by least squares.

Construction (the clustering of :mod:`pyfusion.fuse.cluster`, Morelli & Eckstein 2026 A.6, with the least-squares
step of neuron interpolation, Luenam et al. 2025, papers.md B.3, as :mod:`pyfusion.fuse.partial_fit` applies it to
partial fusion). ``method="cluster"`` gives every group ``width`` slots, a slot c being a cluster of the members'
neurons with the mean of their incoming weights. That mean reproduces the cluster only when its neurons are alike;
on networks whose streams are summed (a ResNet's residual stream, a transformer's), the errors of dissimilar
merged neurons add up along the stream. Here every slot's incoming weights are instead *fitted*, layer by layer in
forward order, on the fused model's own inputs (so each layer corrects the errors of the layers before it)::

    T_c = sum_k A_k[c, :] a_k = mean_{(k, j) in c} a_kj       (a_k: member k's output of the layer)
    W_c = argmin_W ||X W - T_c||^2 + r ||W - W0_c||^2

with X the fused layer's inputs, ``W0`` the clustered (averaged) weights, ``r = ridge * mean(diag X^T X)``, the
output layer fitted to the ensemble's outputs (``output_target`` "logits" or "probs"). It is
:func:`pyfusion.fuse.partial_fit.fit_shared_slots` applied to *all* the slots of the cluster plan (a cluster of
one member's neurons only is fitted too; the fit reads only the design columns its member's blocks read, so the
layout, hence the cost, is the one of ``method="cluster"`` at the same width). BatchNorms after a fitted producer
are folded into the fit (the fused module is marked ``fusion_weights_fitted``: no BatchNorm reset afterwards).
The layers fitted are ``partial_fit``'s (``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D``, packed q | k | v
segments, rotary q / k rows, ``nn.MultiheadAttention``'s in_proj rows and out_proj); embedding tables stay as
clustered, their averaged rows being their slots' targets already (``fusion_info["fit"]["exact"]``), and what the
fit cannot read is listed in ``fusion_info["fit"]["skipped"]``.

Measured (the issue-14 frontier's MNIST ResNet-8 pair, members 98.6%, the first 1000 of bench/frontier.py's
calibration samples, 5 k-means restarts, test accuracy): width 0.6875 of one member, ``cluster`` 33.7% (its
changed BatchNorm slots recalibrated, the default), 34.3% with every BatchNorm reset, 28.0% with REPAIR;
``cluster_fit`` 91.3% (width 0.875: 94.8%). The budget search's numbers: :mod:`pyfusion.fuse.budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pyfusion.fuse import cluster as _cluster  # noqa: F401 - registers method 'cluster'
from pyfusion.fuse.config import ClusterConfig
from pyfusion.fuse.partial_fit import build_and_fit, check_fit_options
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import get_method, register_method
from pyfusion.graph.groups import FusionGraph

__all__ = ["ClusterFitConfig", "cluster_fit"]


@dataclass(frozen=True)
class ClusterFitConfig(ClusterConfig):
    """``method="cluster_fit"``: the options of :class:`~pyfusion.fuse.config.ClusterConfig` and

    Attributes:
        ridge: r / mean(diag X^T X) of the fit towards the clustered weights (as ``partial_fit``'s 1e-2).
        max_samples: calibration samples used for the fit.
        fit_output: also fit the output layer to the ensemble's outputs.
        output_target: "logits" or "probs" (see :class:`pyfusion.fuse.partial_fit.PartialFitConfig`).
    """

    ridge: float = 1e-2
    max_samples: int | None = 2048
    fit_output: bool = True
    output_target: str = "logits"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fit_options(self)


def _all_slots(plan: Plan) -> Plan:
    """The plan with every slot in the first segment: what :func:`fit_shared_slots` fits (the rows of
    ``layout[0]``); the maps, hence the targets, are the plan's."""
    groups = {
        name: GroupPlan(g.A, g.B, (int(sum(g.layout)),) + (0,) * (len(g.layout) - 1)) for name, g in plan.groups.items()
    }
    return Plan(plan.lambdas, groups)


@register_method(
    "cluster_fit",
    config=ClusterFitConfig,
    needs_data="yes",
    min_members=1,
    summary="generalized pruning with every slot fitted to its cluster's targets by least squares",
)
def cluster_fit(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: ClusterFitConfig
) -> nn.Module:
    """The cluster plan, built, then every slot fitted (module docstring)."""
    if data is None:
        raise ValueError("method 'cluster_fit' needs calibration data: pass data=DataLoader or a list of batches")
    base = ClusterConfig(**{f: getattr(config, f) for f in ClusterConfig.field_names()})
    plan = get_method("cluster").run(members, graph, lambdas, data, base)
    return build_and_fit(members, graph, plan, _all_slots(plan), data, config, "cluster_fit")
