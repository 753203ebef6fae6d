"""Costs of neuron-interpolation fusion (Luenam et al. 2025, papers.md B.3), from Gram statistics only.

HF pairs neuron i of one member with neuron j of another at the cost

    cost_ij = s_i f(||p_ij - a_i||^2) + s_j f(||p_ij - b_j||^2),   p_ij = (s_i x_i + s_j y_j) / (s_i + s_j),

f the identity or sqrt (the authors' L2 norm), where x_i, y_j are the neurons' *predictions* and a_i, b_j their
*targets*. Both squared norms are affine in seven Gram quantities (:class:`PairParts`), so the cost is an
elementwise epilogue (:func:`pyfusion.ops.hf_cost`) over products formed once:

* least-squares predictions (the paper's HF): ``x_i = X w_i`` with the fused inputs X and LS weights w; the parts
  come from ``G = X^T X``, ``C = X^T A`` and the target norms (:func:`ls_pair_parts`), never from X itself;
* raw activations (groups fitted at several points, e.g. a residual stream): ``x_i = a_i``; the parts are blocks of
  the members' activation Gram (:func:`activation_pair_parts`), and the cost reduces to
  ``(2 s_i s_j / (s_i + s_j)) ||a_i - b_j||`` (for f = sqrt), the authors' Git Re-Basin cost on pre-activations.

A neuron may span several target columns (a rep factor: the q rows of a grouped-query head, a neuron observed at
several points): its prediction and target are then the concatenations, and the parts are sums over the copies
(paired copy by copy), which :func:`ls_pair_parts` takes as a trailing ``R`` axis.

* :func:`hf_pair_cost`: the two-member cost of one level from its statistics (simple layout);
* :func:`slot_alignment_cost`: squared distance between slot targets and member-0 neurons (puts k-means clusters in
  member 0's neuron order);
* :func:`ls_points_gram`: the Gram of every member's LS predictions (KF's k-means points).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pyfusion.match.distance import sqdist_from_gram
from pyfusion.ops.interp_cost import hf_cost

__all__ = [
    "PairParts",
    "activation_pair_parts",
    "hf_pair_cost",
    "ls_pair_parts",
    "ls_points_gram",
    "pair_cost",
    "slot_alignment_cost",
]


@dataclass
class PairParts:
    """The Gram quantities of the HF cost between neurons of member a (n_a) and member b (n_b).

    Attributes:
        M: (n_a, n_b) ``x_i . y_j`` (predictions).
        Q01: (n_a, n_b) ``x_i . b_j`` (prediction of a's neuron against b's target).
        Q10: (n_a, n_b) ``a_i . y_j``.
        d0, e0, n0: (n_a,) ``||x_i||^2``, ``x_i . a_i``, ``||a_i||^2``.
        d1, e1, n1: (n_b,) the same for member b.
    """

    M: Tensor
    Q01: Tensor
    Q10: Tensor
    d0: Tensor
    e0: Tensor
    n0: Tensor
    d1: Tensor
    e1: Tensor
    n1: Tensor

    def __add__(self, other: PairParts) -> PairParts:
        return PairParts(*(a + b for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.M, self.Q01, self.Q10, self.d0, self.e0, self.n0, self.d1, self.e1, self.n1)


def pair_cost(parts: PairParts, s0: Tensor, s1: Tensor, cost: str = "l2") -> Tensor:
    """The (n_a, n_b) HF cost from its parts and the importance scores ``s0`` (n_a,), ``s1`` (n_b,) (> 0).

    Args:
        cost: "l2" (the authors' sum of L2 norms) or "sqeuclidean".
    """
    p = parts
    return hf_cost(p.M, p.Q01, p.Q10, p.d0, p.e0, p.n0, s0, p.d1, p.e1, p.n1, s1, squared=cost == "sqeuclidean")


def ls_pair_parts(g: Tensor, w0: Tensor, c0: Tensor, ns0: Tensor, w1: Tensor, c1: Tensor, ns1: Tensor) -> PairParts:
    """Parts for least-squares predictions ``x = X w`` of two members' neurons.

    Args:
        g: (p, p) ``X^T X``.
        w0, c0: (p, n_a, R) LS weights and ``X^T A`` of member a's neurons (R copies per neuron).
        ns0: (n_a, R) squared target norms.
        w1, c1, ns1: the same for member b (same p and R).
    """
    gw1 = torch.einsum("pq,qjr->pjr", g, w1)
    gw0 = torch.einsum("pq,qir->pir", g, w0)
    return PairParts(
        torch.einsum("pir,pjr->ij", w0, gw1),
        torch.einsum("pir,pjr->ij", w0, c1),
        torch.einsum("pir,pjr->ij", c0, w1),
        (gw0 * w0).sum((0, 2)),
        (w0 * c0).sum((0, 2)),
        ns0.sum(1),
        (gw1 * w1).sum((0, 2)),
        (w1 * c1).sum((0, 2)),
        ns1.sum(1),
    )


def activation_pair_parts(gram: Tensor, a: slice, b: slice) -> PairParts:
    """Parts for raw activations (prediction = target) of the neurons ``a`` and ``b`` (slices of the rows of
    ``gram``, the Gram of the concatenated members' activations)."""
    m = gram[a, b]
    da = torch.diagonal(gram[a, a]).clone()
    db = torch.diagonal(gram[b, b]).clone()
    return PairParts(m, m, m, da, da, da, db, db, db)


def ls_points_gram(g: Tensor, w: Tensor) -> Tensor:
    """``sum_r W_r^T G W_r`` (D, D): the Gram of the LS predictions of D neurons (KF's points), ``w`` (p, D, R)."""
    out = torch.einsum("pdr,pq,qer->de", w, g, w)
    return 0.5 * (out + out.T)


def hf_pair_cost(
    g: Tensor, cs: Sequence[Tensor], ns: Sequence[Tensor], ws: Sequence[Tensor], s0: Tensor, s1: Tensor, cost: str
) -> Tensor:
    """The (n0, n1) HF cost (papers.md B.3) from the Gram statistics of two members, one column per neuron.

    Args:
        g: (p, p) ``X^T X`` of the fused inputs (p design columns).
        cs: two (p, n_k) ``X^T A_k``.
        ns: two (n_k,) squared norms of the targets.
        ws: two (p, n_k) least-squares weights.
        s0, s1: (n_0,), (n_1,) importance scores.
        cost: "l2" (the authors' sum of L2 norms) or "sqeuclidean".
    """
    parts = ls_pair_parts(g, ws[0][..., None], cs[0][..., None], ns[0][:, None], ws[1][..., None],
                          cs[1][..., None], ns[1][:, None])  # fmt: skip
    return pair_cost(parts, s0, s1, cost)


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
