"""Costs of neuron-interpolation fusion (Luenam et al. 2025, papers.md B.3), from Gram statistics only.

* :func:`hf_pair_cost`: the HF cost of pairing neuron i of member 0 with neuron j of member 1 (the elementwise
  epilogue is the op :func:`pyfusion.ops.hf_cost`; this builds its Gram products).
* :func:`slot_alignment_cost`: squared distance between every slot target and every member-0 neuron, used to
  put k-means clusters in member 0's neuron order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion.match.distance import sqdist_from_gram
from pyfusion.ops.interp_cost import hf_cost

__all__ = ["hf_pair_cost", "slot_alignment_cost"]


def hf_pair_cost(
    g: Tensor, cs: Sequence[Tensor], ns: Sequence[Tensor], ws: Sequence[Tensor], s0: Tensor, s1: Tensor, cost: str
) -> Tensor:
    """The (n0, n1) HF cost (papers.md B.3) from the Gram statistics of two members (see :func:`hf_cost`).

    Args:
        g: (p, p) ``X^T X`` of the fused inputs (p design columns).
        cs: two (p, n_k) ``X^T A_k``.
        ns: two (n_k,) squared norms of the targets.
        ws: two (p, n_k) least-squares weights.
        s0, s1: (n_0,), (n_1,) importance scores.
        cost: "l2" (the authors' sum of L2 norms) or "sqeuclidean".
    """
    w0, w1 = ws
    gw0, gw1 = g @ w0, g @ w1
    return hf_cost(
        w0.T @ gw1,
        w0.T @ cs[1],
        cs[0].T @ w1,
        (gw0 * w0).sum(0),
        (w0 * cs[0]).sum(0),
        ns[0],
        s0,
        (gw1 * w1).sum(0),
        (w1 * cs[1]).sum(0),
        ns[1],
        s1,
        squared=cost == "sqeuclidean",
    )


def slot_alignment_cost(maps_a: Sequence[Tensor], gram: Tensor) -> Tensor:
    """Squared distance (slots, n) between the slot targets ``T = sum_k A_k a_k`` and member 0's neurons ``a_0``.

    Args:
        maps_a: K (slots, n) maps A_k.
        gram: (K n, K n) Gram of the concatenated member outputs (member 0 first).

    Returns:
        ``||T_c||^2 + ||a_0j||^2 - 2 T_c . a_0j`` (not clamped: the assignment only needs the order).
    """
    n = maps_a[0].shape[1]
    acat = torch.cat(list(maps_a), 1)  # (slots, K n)
    tt = acat @ gram @ acat.T
    ta = acat @ gram[:, :n]
    return sqdist_from_gram(torch.diagonal(tt), torch.diagonal(gram)[:n], ta, clamp=False)
