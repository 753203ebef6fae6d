"""The ops pyfusion's modules and methods call. Each op validates its arguments, dispatches to the best
available backend (C++, CUDA, Triton, torch) and has a float64 ``*_ref`` reference in ``ops.reference``."""

from pyfusion.ops.assignment import AssignmentResult, linear_assignment
from pyfusion.ops.cluster import ClusterResult, weighted_kmeans
from pyfusion.ops.correlation import correlation
from pyfusion.ops.interp_cost import hf_cost
from pyfusion.ops.partial_linear import partial_linear

__all__ = [
    "AssignmentResult",
    "ClusterResult",
    "correlation",
    "hf_cost",
    "linear_assignment",
    "partial_linear",
    "weighted_kmeans",
]
