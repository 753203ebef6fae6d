"""Matching (DESIGN §5: ``pyfusion.match``): neuron features, costs between neurons, and the solver calls.

This layer sits between the statistics and the methods (graph -> stats -> match -> fuse): it reads neuron groups
(:mod:`pyfusion.graph`), statistics (:mod:`pyfusion.stats`) and weights, and calls the engines of
:mod:`pyfusion.ops`; it never imports :mod:`pyfusion.fuse`. Use it to inspect or reuse a step of a method (the
cost matrix partial fusion solves, the transport plan OT fusion finds) without building a network.

* features: :func:`neuron_features` (dead-neuron tie-break features), :func:`neuron_masses` (OT masses),
  :func:`neuron_importance` / :func:`attributions` (importance scores of neuron interpolation), and the
  alignment of member tensors through other groups' maps (:func:`aligned_features`, :class:`Permutation`,
  :class:`MatchedPairs`, :class:`SoftMap`; a whole state dict moves with :func:`pyfusion.graph.permuted_state`);
* costs: :func:`sqdist`, :func:`correlation_cost`, :func:`combine_costs` (feature rows),
  :func:`activation_cost` / :func:`activation_costs` (from :class:`pyfusion.stats.ActivationStats`),
  :func:`weight_cost` (partial fusion's weights and pcd), :func:`weight_feature_costs`, :func:`ot_weight_cost`,
  :func:`hf_pair_cost` and :func:`hf_cost` (neuron-interpolation pair costs from Gram statistics);
* solvers: :func:`linear_assignment` (exact, batched, partial forms), :func:`assignments`,
  :func:`partial_assignments`, :func:`transport` (OT coupling: assignment or POT), :func:`entropic_transport`
  (Sinkhorn), :func:`weighted_kmeans`, :func:`align_weights` (permutation coordinate descent); the partial
  matching of a whole graph (:func:`partial_activation_assignments`, :func:`partial_weight_assignments`,
  :class:`PartialAssignment`);
* units and ties (attention heads): :func:`tie_set_costs` (unit costs of a tie set from its groups' neuron costs,
  best inner matchings in one batched call), :func:`neuron_perms`, :func:`neuron_pairs`, :func:`neuron_map`,
  :func:`unit_frames` (neuron-level maps from a unit-level solution), :func:`unit_masses`.

Plans are made by the methods, which live one layer up: ``pyfusion.fuse.partial_plan``, ``weight_matching_plan``,
``activation_matching_plan``, ``ot_plan``, ``cluster_plan``, ``prune_plan`` (and ``Plan`` / ``GroupPlan``). The
same names are still reachable here for compatibility, resolved from :mod:`pyfusion.fuse` on first access (so
importing ``pyfusion.match`` does not import the methods); new code should take them from ``pyfusion.fuse``.

Every name is resolved on first access (the submodules are imported then): importing one submodule, e.g. the
method configs importing :mod:`pyfusion.match.activations` for its cost names, does not import the engines.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (resolved on first access)
_EXPORTS = {
    "activation_cost": "pyfusion.match.activations",
    "activation_costs": "pyfusion.match.activations",
    "neuron_features": "pyfusion.match.activations",
    "MatchedPairs": "pyfusion.match.align",
    "Permutation": "pyfusion.match.align",
    "SoftMap": "pyfusion.match.align",
    "aligned_features": "pyfusion.match.align",
    "combine_costs": "pyfusion.match.distance",
    "correlation_cost": "pyfusion.match.distance",
    "sqdist": "pyfusion.match.distance",
    "attributions": "pyfusion.match.importance",
    "neuron_importance": "pyfusion.match.importance",
    "hf_pair_cost": "pyfusion.match.interp",
    "PartialAssignment": "pyfusion.match.partial",
    "partial_activation_assignments": "pyfusion.match.partial",
    "partial_weight_assignments": "pyfusion.match.partial",
    "weight_feature_costs": "pyfusion.match.partial",
    "expand_unit_assignment": "pyfusion.match.partial",
    "UnitCost": "pyfusion.match.units",
    "neuron_map": "pyfusion.match.units",
    "neuron_pairs": "pyfusion.match.units",
    "neuron_perms": "pyfusion.match.units",
    "tie_set_costs": "pyfusion.match.units",
    "unit_frames": "pyfusion.match.units",
    "unit_masses": "pyfusion.match.weights",
    "align_weights": "pyfusion.match.solvers",
    "assignments": "pyfusion.match.solvers",
    "partial_assignments": "pyfusion.match.solvers",
    "transport": "pyfusion.match.solvers",
    "entropic_transport": "pyfusion.match.solvers",
    "SinkhornResult": "pyfusion.match.solvers",
    "neuron_masses": "pyfusion.match.weights",
    "ot_weight_cost": "pyfusion.match.weights",
    "weight_cost": "pyfusion.match.weights",
    # the engines (ops), which are the solvers themselves
    "AssignmentResult": "pyfusion.ops.assignment",
    "linear_assignment": "pyfusion.ops.assignment",
    "ClusterResult": "pyfusion.ops.cluster",
    "weighted_kmeans": "pyfusion.ops.cluster",
    "hf_cost": "pyfusion.ops.interp_cost",
}

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

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _FROM_FUSE.get(name)
    if module is None:
        raise AttributeError(f"module 'pyfusion.match' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_FROM_FUSE))
