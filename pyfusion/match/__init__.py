"""Matching (DESIGN §5: ``pyfusion.match``): neuron features, costs between neurons, and the solver calls.

This layer sits between the statistics and the methods (graph -> stats -> match -> fuse): it reads neuron groups
(:mod:`pyfusion.graph`), statistics (:mod:`pyfusion.stats`) and weights, and calls the engines of
:mod:`pyfusion.ops`; it never imports :mod:`pyfusion.fuse`. Use it to inspect or reuse a step of a method (the
cost matrix partial fusion solves, the transport plan OT fusion finds) without building a network.

* features: :func:`neuron_features` (dead-neuron tie-break features), :func:`neuron_masses` (OT masses),
  :func:`neuron_importance` / :func:`attributions` (importance scores of neuron interpolation), and the
  alignment of member tensors through other groups' maps (:func:`aligned_features`, :class:`Permutation`,
  :class:`MatchedPairs`, :class:`SoftMap`, :func:`permute_state`);
* costs: :func:`sqdist`, :func:`correlation_cost`, :func:`combine_costs` (feature rows),
  :func:`activation_cost` / :func:`activation_costs` (from :class:`pyfusion.stats.ActivationStats`),
  :func:`weight_cost` (partial fusion's weights and pcd), :func:`weight_feature_costs`, :func:`ot_weight_cost`,
  :func:`hf_pair_cost` and :func:`hf_cost` (neuron-interpolation pair costs from Gram statistics);
* solvers: :func:`linear_assignment` (exact, batched, partial forms), :func:`assignments`,
  :func:`partial_assignments`, :func:`transport` (OT coupling: assignment or POT), :func:`weighted_kmeans`,
  :func:`align_weights` (permutation coordinate descent); the partial matching of a whole graph
  (:func:`partial_activation_assignments`, :func:`partial_weight_assignments`, :class:`PartialAssignment`).

Plans are made by the methods, which live one layer up: ``pyfusion.fuse.partial_plan``, ``weight_matching_plan``,
``activation_matching_plan``, ``ot_plan``, ``cluster_plan``, ``prune_plan`` (and ``Plan`` / ``GroupPlan``). The
same names are still reachable here for compatibility, resolved from :mod:`pyfusion.fuse` on first access (so
importing ``pyfusion.match`` does not import the methods); new code should take them from ``pyfusion.fuse``.
"""

from __future__ import annotations

import importlib
from typing import Any

from pyfusion.match.activations import activation_cost, activation_costs, neuron_features
from pyfusion.match.align import MatchedPairs, Permutation, SoftMap, aligned_features, permute_state
from pyfusion.match.distance import combine_costs, correlation_cost, sqdist
from pyfusion.match.importance import attributions, neuron_importance
from pyfusion.match.interp import hf_pair_cost
from pyfusion.match.partial import (
    PartialAssignment,
    partial_activation_assignments,
    partial_weight_assignments,
    weight_feature_costs,
)
from pyfusion.match.solvers import align_weights, assignments, partial_assignments, transport
from pyfusion.match.weights import neuron_masses, ot_weight_cost, weight_cost
from pyfusion.ops.assignment import AssignmentResult, linear_assignment
from pyfusion.ops.cluster import ClusterResult, weighted_kmeans
from pyfusion.ops.interp_cost import hf_cost

# Plan-making names, kept here for compatibility: they belong to pyfusion.fuse (the layer above) and are
# resolved from it on first access, never at import time (pyfusion.match must not import pyfusion.fuse).
_FROM_FUSE = {
    "GroupPlan": "pyfusion.fuse.plan",
    "Plan": "pyfusion.fuse.plan",
    "activation_matching_plan": "pyfusion.fuse.activation_matching",
    "cluster_plan": "pyfusion.fuse.cluster",
    "ot_plan": "pyfusion.fuse.ot",
    "partial_plan": "pyfusion.fuse.partial",
    "prune_plan": "pyfusion.fuse.cluster",
    "weight_matching_plan": "pyfusion.fuse.weight_matching",
}

__all__ = [
    "AssignmentResult",
    "ClusterResult",
    "MatchedPairs",
    "PartialAssignment",
    "Permutation",
    "SoftMap",
    "activation_cost",
    "activation_costs",
    "align_weights",
    "aligned_features",
    "assignments",
    "attributions",
    "combine_costs",
    "correlation_cost",
    "hf_cost",
    "hf_pair_cost",
    "linear_assignment",
    "neuron_features",
    "neuron_importance",
    "neuron_masses",
    "ot_weight_cost",
    "partial_activation_assignments",
    "partial_assignments",
    "partial_weight_assignments",
    "permute_state",
    "sqdist",
    "transport",
    "weight_cost",
    "weight_feature_costs",
    "weighted_kmeans",
]


def __getattr__(name: str) -> Any:
    module = _FROM_FUSE.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.match' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_FUSE))
