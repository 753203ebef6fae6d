"""Neuron-interpolation fusion (Luenam et al. 2025, "Model Fusion via Neuron Interpolation"; papers.md part B).

The fused network has the architecture of one member and is built level by level (a level is a Linear / Conv2d
with the modules before it and its BatchNorm; for ResNets a stem, a residual block, the head). For level l:

1. X = the inputs of level l in the *fused* model built so far (so later levels correct earlier errors);
   the targets are the members' own level outputs A_k (pre-activations; a residual block's output).
2. Grouping: the K*n neurons of level l are grouped into n slots, each slot's target being the
   importance-weighted mean of its neurons' outputs.
3. Approximation: the fused level is fitted to reproduce the slot targets from X.

Methods (``pyfusion.fuse(..., method=...)``, all need calibration data):

* ``"hf"`` (K = 2): least-squares weights ``W_k = (X^T X + r I)^{-1} X^T A_k`` reproducing every member neuron
  from the fused inputs (normal equations through a Cholesky factor, never ``pinv`` of the data; convolutions use
  the unfolded patches, but only the Gram ``X^T X`` and ``X^T A_k`` are accumulated, chunk by chunk). The
  interpolation cost of every pair (papers.md B.3) comes from Gram products (C.2 item 3;
  :func:`pyfusion.ops.hf_cost`), the pairs from the exact assignment engine, and the fused weights are the
  importance-weighted means ``(s0_i w0_i + s1_j w1_j) / (s0_i + s1_j)``. Last level: neuron i with neuron i.
* ``"kf"`` (any K): importance-weighted k-means (k = n) over the K*n neurons in pre-activation space. The points
  are the LS predictions ``X w_j``; their Gram is ``W^T (X^T X) W`` (Kn x Kn), so no activation matrix is ever
  formed; :func:`pyfusion.ops.weighted_kmeans` (C++, restarts) clusters it. The fused weights are the centroids
  ``sum_{j in c} s_j w_j / sum_{j in c} s_j`` (whose prediction is exactly the centroid of the points). Last level:
  class c of every member forms cluster c.
* ``"kf_gradient"``: the KF grouping, then every level is trained (Adam or SGD, mini-batches of the calibration
  data, 80/20 split, early stopping on the validation MSE, the best state kept) to reproduce its slot targets
  ``T_c = sum_{j in c} s_j a_j / sum s_j`` from the fused inputs; the last level is trained to reproduce the
  lambda-weighted mean logits (optionally weighted per class by each member's class share). As in the authors'
  code, the slots are k-means clusters of the members' activations, matched to member 0's neurons, and each level
  starts from member 0's weights (``level_init="kf"`` starts Linear/Conv2d levels from the KF closed form instead;
  a one-layer level is then already the least-squares optimum). Levels exist for
  ``nn.Sequential`` chains (MLP, VGG) and for :class:`pyfusion.models.ResNet` (stem, one level per residual block,
  head); ResNet levels start from member 0 with the targets' slots matched (exact assignment) to member 0's
  neurons, so the identity shortcuts stay consistent.

Deviations from the authors' code (documented choices):

* k-means uses the squared distance (the objective of the C++ kernel and of Lloyd's centroid step); the authors'
  KF minimises the sum of unsquared L2 distances with the same centroid rule. The points are the projections
  ``X w_j`` instead of ``a_j``: for squared distances the two objectives differ by the constant
  ``sum_j s_j ||a_j - X w_j||^2`` (exact least squares), so the clusterings are the same.
* The Gram products of each chunk of samples are formed in float32 by default (``stats_dtype``) and accumulated
  in float64; ``stats_dtype="float64"`` makes them exact to float64 rounding.
* HF supports both the authors' L2 cost (``cost="l2"``, default) and the squared form (``cost="sqeuclidean"``).
* The LS system has a ridge ``ridge * mean(diag(X^T X))`` (default 1e-6; zero columns such as always-black pixels
  or dead ReLUs make X^T X singular); if the Cholesky factorisation fails the ridge grows 100x until it succeeds
  (reported in ``fusion_info``).
* Importance scores are normalised per level and member (:mod:`pyfusion.match.importance`) and multiplied by the
  member weights lambda_k. The last level uses lambda only.
* BatchNorm after a fitted layer is set to the identity (running mean 0, variance 1, weight sqrt(1 + eps),
  bias 0): the LS fit produces the pre-activation directly. The fused module carries ``fusion_weights_fitted``,
  so ``pyfusion.fuse`` does not reset its BatchNorm statistics by default.

The calibration data are held in memory (inputs and the current level's activations of every member), as in the
authors' code: a few hundred to a few thousand samples.

Modules: :mod:`.levels` (what a level is and how levels are found), :mod:`.statistics` (the Gram statistics of the
least-squares fits), :mod:`.fitting` (solves, maps of a grouping, level training), :mod:`.driver` (the level loop
and the three registered methods); the pair costs are :mod:`pyfusion.match.interp`, the importance scores
:mod:`pyfusion.match.importance`.
"""

from pyfusion.fuse.interp.driver import fuse_hf, fuse_interp, fuse_kf, fuse_kf_gradient
from pyfusion.fuse.interp.fitting import solve_ls
from pyfusion.fuse.interp.levels import Level, interp_levels
from pyfusion.fuse.interp.statistics import ls_statistics

__all__ = [
    "Level",
    "fuse_hf",
    "fuse_interp",
    "fuse_kf",
    "fuse_kf_gradient",
    "interp_levels",
    "ls_statistics",
    "solve_ls",
]
