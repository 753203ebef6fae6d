"""The ops pyfusion's modules and methods call. Each op validates its arguments, dispatches to the best
available backend (C++, CUDA, Triton, torch) and has a float64 ``*_ref`` reference in ``ops.reference``."""

from pyfusion.ops.assignment import AssignmentResult, linear_assignment
from pyfusion.ops.cluster import ClusterResult, weighted_kmeans

__all__ = ["AssignmentResult", "ClusterResult", "linear_assignment", "weighted_kmeans"]
