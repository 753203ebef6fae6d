"""Matching (DESIGN §5: ``pyfusion.match``): costs between neurons, the solvers, and the plan each method makes.

This is the public namespace for users who want a plan (or a cost matrix) without building a network, e.g. to
inspect which neurons partial fusion would fuse, or to feed their own builder. The implementations live with
the methods in ``pyfusion.fuse`` and the kernels in ``pyfusion.ops``; nothing here is a second copy.

* costs: :func:`neuron_features` (incoming weights of a group), :func:`activation_cost` (1 - correlation or
  squared distance from :class:`pyfusion.stats.ActivationStats`), :func:`weight_feature_costs` (partial
  fusion's weight / pcd features), :func:`hf_cost` (neuron-interpolation pair costs from Gram statistics);
* solvers: :func:`linear_assignment` (exact, batched, partial forms), :func:`weighted_kmeans`;
* plans (``Plan`` / ``GroupPlan``, the maps ``A_k``, ``B_k`` of DESIGN §3): :func:`weight_matching_plan`,
  :func:`activation_matching_plan`, :func:`ot_plan`, :func:`partial_plan`, :func:`cluster_plan`,
  :func:`prune_plan`; turn one into weights with :func:`pyfusion.fuse.builder.build`.
"""

from pyfusion.fuse.activation_matching import activation_cost, activation_matching_plan, neuron_features
from pyfusion.fuse.cluster import cluster_plan, prune_plan
from pyfusion.fuse.ot import ot_plan
from pyfusion.fuse.partial import partial_plan, weight_feature_costs
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.weight_matching import weight_matching_plan
from pyfusion.ops.assignment import AssignmentResult, linear_assignment
from pyfusion.ops.cluster import ClusterResult, weighted_kmeans
from pyfusion.ops.interp_cost import hf_cost

__all__ = [
    "AssignmentResult",
    "ClusterResult",
    "GroupPlan",
    "Plan",
    "activation_cost",
    "activation_matching_plan",
    "cluster_plan",
    "hf_cost",
    "linear_assignment",
    "neuron_features",
    "ot_plan",
    "partial_plan",
    "prune_plan",
    "weight_feature_costs",
    "weight_matching_plan",
    "weighted_kmeans",
]
