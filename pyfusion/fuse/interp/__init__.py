"""Neuron-interpolation fusion: ``method="hf"``, ``"kf"`` and ``"kf_gradient"`` (Luenam et al. 2025, "Model
Fusion via Neuron Interpolation"; papers.md B.1-B.4), on any traced model.

**What it does.** The fused network is built level by level in graph order. At each closed-form step (one target,
or several fitted together) the members' values at the target are the *targets* ``A_k`` (m rows = samples x
positions, one column per neuron), and the fused model's own inputs to the step's sites give the design ``X``.
Each member's neuron j is predicted from the fused inputs by least squares, ``W_k = (X^T X)^-1 X^T A_k``
(:func:`solve_ls`, Gram statistics accumulated chunk by chunk, :func:`ls_statistics`), the neurons of all
members are *grouped* into n slots (below), and the step's weights are fitted so that slot c reproduces the
importance-weighted mean target of its neurons, ``y_c = sum_{(k, j) in c} s_kj A_kj / sum s_kj``. Because the fit
is linear, this equals the weighted mean of the members' LS weights; it is always solved on the fused model's
inputs, so the errors of earlier levels are corrected, not compounded (the paper's point).

**Ridge toward the aligned average.** The fused weights solve ``min ||X W - Y||^2 + r ||W - W0||^2``, i.e.
``W = W0 + (G + r I)^{-1} (C - G W0)`` (``G = X^T X``, ``C = X^T Y``, ``r = ridge * mean(diag G)``), with ``W0``
the weights the fit's sites would have from the builder's formula ``sum_k A_k W_k B_k`` of this fusion's maps (the
aligned average, BatchNorms absorbed: :meth:`~.driver._Interp.fit_prior`). Directions the calibration data do not
determine (fewer samples than a level's inputs, a feature that is constant on them) keep the aligned average instead
of being pulled to 0, so a member fused with its permuted copy, or one-hot lambdas, give the member back on every
input, whatever the calibration size. A fit with fewer design rows than 8 x its columns accumulates its statistics
in float64 whatever ``stats_dtype`` says (those free directions would amplify float32 rounding by 1 / r).

**Grouping** (:mod:`.grouping`):

* ``hf`` (any K >= 2): every member k >= 1 is aligned to member 0 by one exact assignment on the paper's pair cost
  ``c_ij = s_0i ||X w_ij - a_0i|| + s_kj ||X w_ij - a_kj||`` with ``w_ij`` the weighted mean of the two LS weight
  columns (computed from Gram products, never materialising the predictions: :mod:`pyfusion.match.interp`); a slot
  is the tuple (member 0's neuron i, its partner in every other member), fused with weights ``s``. At K = 2 this
  is exactly the paper's HF (tested against a scipy brute force). For K > 2 it is the multi-member rule chosen in
  DESIGN §4: the exact K-dimensional matching is the axial assignment problem (NP-hard for K >= 3), and aligning
  to a reference keeps every member's matching exact and optimal for its pair; it depends on which member is
  the reference (member 0; reorder the members to change it), and a member with lambda = 0 does not change the
  others' matching (so the K = 3 rule with lambda_3 = 0 is the K = 2 rule; tested).
* ``kf`` (any K): importance-weighted k-means with k = n over the K*n neurons' LS predictions (their Gram only:
  :func:`pyfusion.ops.weighted_kmeans`); slots may hold several neurons of one member or none of another.
* ``kf_gradient``: the KF grouping (or member 0's neurons, ``level_init="member0"``, the authors' choice), then
  every *level* (below) is trained with Adam to its targets, the last one to the lambda-weighted mean logits
  (optionally weighted per class, ``class_weights``).
* Attention heads and other unit groups (``unit_size`` D > 1) and groups tied to them move as whole units under
  every method: units are matched on the sum over the tie set of their cheapest inner matchings, as HF, and the
  inner dims inside matched units (see :mod:`.grouping`).

**Levels, residual blocks and transformer blocks** (:mod:`.levels`, read off the exported graph of the IR, never
from module types). A *site* is an op applying a parameter tensor to an input-dependent value (Linear, Conv2d,
GPT-2's Conv1D ``addmm``, embeddings). From each site the graph is walked forward through ops that keep it an
affine per-neuron function (eval-mode BatchNorm is absorbed into the fit, biases / layer-scales / position
embeddings are kept and compensated); where the walk stops is the site's *target*: a pre-activation (so any
elementwise activation - ReLU, GELU, SiLU, tanh, ELU / CELU, LeakyReLU, ... - works: it is never modelled), a
residual sum, the logits. Sites reaching the same target are fitted jointly.

* ResNet: the stem, then per block its hidden layer(s) (targets grouped from LS predictions as above) and its
  output sum ``conv2(h) + shortcut(x)`` (a projection shortcut is fitted jointly with conv2; an identity shortcut
  is a *passthrough*, taken from the fused model and subtracted from the target). The residual stream is one
  neuron group seen at every block's sum, and the sums depend on each other, so the stream is grouped **once**,
  on the members' activations at all of its points together (HF: exact assignment on the activation pair cost;
  KF: k-means of the activations), and every block is fitted to that one grouping: the paper's "group the
  residual-stream outputs of a block and fit the block to them".
* Transformers (ViT, BERT, GPT-2, Llama, ``nn.MultiheadAttention``, ``nn.TransformerEncoder``, hand-written
  attention): per layer the q / k / v projections are fitted jointly (heads as units, tied q/k and v/o groups
  grouped together), the attention output projection and the MLP output projection write into the residual
  stream (their targets are the stream sums; the stream is a passthrough and is grouped once on activations,
  as in a ResNet), the MLP input projection(s) (SwiGLU: gate and up jointly) have their pre-activation targets.
  LayerNorm / RMSNorm parameters, embeddings, tied tensors (GPT-2's ``wte`` / ``lm_head``) and anything the walk
  cannot fit are set from the grouping by the builder's formula ``sum_k A_k W_k B_k``.
* kf_gradient's *levels* are the segments between *cuts*: targets after which nothing but the target's value is
  read later (every layer of a chain, every ResNet block's output, the stream after each attention and each MLP
  sublayer of a transformer block, the logits). :meth:`InterpLevels.describe` prints the levels, steps, fits and
  passthroughs of any model.

**Importance** (``importance=``): "uniform", "activation_gradient" or "conductance"
(:mod:`pyfusion.match.importance`), observed at each group's targets through the exported graph
(:mod:`.scores`); token models interpolate their looked-up embeddings from zero for conductance.

Options: one frozen config per method (:class:`~pyfusion.fuse.config.HFConfig`, ``KFConfig``,
``KFGradientConfig``; fields in :class:`~pyfusion.fuse.config.InterpConfig`). Speed against the authors'
approach (pinv + 8 x 8 pair loops, scikit-learn k-means): ``bench/bench_interp.py``; accuracy against the other
methods and the trivial baselines: ``bench/interp_mnist.py``.
"""

from pyfusion.fuse.interp.driver import fuse_hf, fuse_interp, fuse_kf, fuse_kf_gradient
from pyfusion.fuse.interp.fitting import solve_ls
from pyfusion.fuse.interp.levels import InterpLevels, Level, interp_levels
from pyfusion.fuse.interp.statistics import ls_statistics

__all__ = [
    "InterpLevels",
    "Level",
    "fuse_hf",
    "fuse_interp",
    "fuse_kf",
    "fuse_kf_gradient",
    "interp_levels",
    "ls_statistics",
    "solve_ls",
]
