"""Grouping rules of neuron-interpolation fusion: which member neurons share a fused slot, as plan maps.

* **Reference alignment** (HF, any K; head groups under every method): each member k >= 1 is aligned to member 0
  by an exact assignment on the HF pair cost between the two (:mod:`pyfusion.match.interp`); slot i is the tuple
  (neuron i of member 0, its partner in each other member), and its fused neuron is the importance-weighted mean
  of the tuple. With K = 2 this is the paper's HF (one Hungarian solve on the pair cost); for K > 2 it is the
  multi-member rule of DESIGN §4 (align every member to a reference, fuse the matched tuples). For a group of
  units (attention heads, ``unit_size`` D > 1) and the groups tied to it, whole units are matched: the cost of
  pairing unit u with unit u' is the sum over the tie set of the cheapest one-to-one matching of their D inner
  neurons (one D x D assignment per unit pair, batched), the units are then assigned on that cost, and inside
  each matched pair the inner matching is kept: heads move whole, q/k rows and v/o rows with their own inner
  permutation, as the IR requires.
* **k-means** (KF, groups of single neurons): importance-weighted k-means with k = n over the K*n neurons' points
  (LS predictions or activations, given by their Gram), :func:`pyfusion.ops.weighted_kmeans`.
* :func:`align_slots` puts the slots in member 0's neuron order (KF-Gradient starting from member 0's weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion.graph.groups import NeuronGroup
from pyfusion.match import linear_assignment, weighted_kmeans
from pyfusion.match.interp import slot_alignment_cost

__all__ = ["align_slots", "align_to_reference", "kmeans_labels", "maps_from_labels"]


def align_to_reference(
    costs: Sequence[dict[str, Tensor]], groups: Sequence[NeuronGroup]
) -> tuple[dict[str, list[Tensor]], list[float]]:
    """Slots of a tie set by aligning every member to member 0.

    Args:
        costs: for each member k = 1..K-1, group name -> (n, n) cost between member 0's neurons (rows) and member
            k's (columns).
        groups: the tie set's groups (equal unit counts).

    Returns:
        (group -> K label vectors (n,): member k's neuron j goes to slot ``labels[k][j]``; member 0's are the
        identity, the total cost of each member's alignment).
    """
    units = {g.units for g in groups}
    if len(units) != 1:
        raise ValueError(f"tied groups {[g.name for g in groups]} have different unit counts {sorted(units)}")
    u = units.pop()
    labels: dict[str, list[Tensor]] = {g.name: [torch.arange(g.size)] for g in groups}
    totals = []
    for ck in costs:
        unit_cost = torch.zeros(u, u, dtype=torch.float64)
        inner: dict[str, Tensor] = {}
        for g in groups:
            c = ck[g.name].double()
            d = g.unit_size
            if d == 1:
                unit_cost += c
                continue
            blocks = c.reshape(u, d, u, d).permute(0, 2, 1, 3).reshape(u * u, d, d)
            res = linear_assignment(blocks, dtype="float64")
            cols = torch.stack([torch.as_tensor(x) for x in res.col_ind])  # (u*u, d): ref inner r <-> cols[r]
            unit_cost += torch.as_tensor(res.cost, dtype=torch.float64).reshape(u, u)
            inner[g.name] = cols.reshape(u, u, d)
        res = linear_assignment(unit_cost, dtype="float64")
        rows, cols = torch.as_tensor(res.row_ind), torch.as_tensor(res.col_ind)
        totals.append(float(unit_cost[rows, cols].sum()))
        partner = torch.empty(u, dtype=torch.long)
        partner[rows] = cols  # slot unit s = reference unit s <- member unit partner[s]
        for g in groups:
            d = g.unit_size
            lab = torch.empty(g.size, dtype=torch.long)
            for s in range(u):
                pu = int(partner[s])
                inner_map = inner[g.name][s, pu] if d > 1 else torch.zeros(1, dtype=torch.long)
                lab[pu * d + inner_map] = s * d + torch.arange(d)
            labels[g.name].append(lab)
    return labels, totals


def kmeans_labels(
    gram: Tensor, weights: Tensor, n: int, *, n_restarts: int, init: str, seed: int
) -> tuple[Tensor, float]:
    """Weighted k-means (k = n) of D points given by their (D, D) Gram; (labels (D,), inertia)."""
    res = weighted_kmeans(
        gram=0.5 * (gram + gram.T), weights=weights, num_clusters=n, n_restarts=n_restarts, init=init, seed=seed
    )
    return torch.as_tensor(res.labels).long(), float(res.inertia)


def maps_from_labels(labels: Tensor, weights: Sequence[Tensor], n: int) -> tuple[list[Tensor], list[Tensor]]:
    """Plan maps of a grouping: ``A_k[c, j] = s_kj / S_c`` for j in c, ``B_k[j, c] = 1`` (cluster indicator).

    Args:
        labels: (K n,) slot of every neuron, member-major.
        weights: K (n,) positive neuron weights (lambda_k times importance).
        n: slots.
    """
    k_members = len(weights)
    w = torch.cat([x.double() for x in weights])
    lab = labels.long()
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, w)
    size = w.numel() // k_members
    maps_a, maps_b = [], []
    for k in range(k_members):
        sl = slice(k * size, (k + 1) * size)
        a = torch.zeros(n, size, dtype=torch.float64)
        a[lab[sl], torch.arange(size)] = w[sl] / tot[lab[sl]]
        b = torch.zeros(size, n, dtype=torch.float64)
        b[torch.arange(size), lab[sl]] = 1.0
        maps_a.append(a)
        maps_b.append(b)
    return maps_a, maps_b


def align_slots(maps_a: list[Tensor], maps_b: list[Tensor], gram: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Reorder the slots so that slot i's target is closest (exact assignment) to member 0's neuron i."""
    n = maps_a[0].shape[1]
    c = slot_alignment_cost(maps_a, gram)
    res = linear_assignment(c, dtype="float64")
    order = torch.empty(n, dtype=torch.long)
    order[torch.as_tensor(res.col_ind)] = torch.as_tensor(res.row_ind)  # slot i (member-0 neuron i) <- cluster
    return [a[order] for a in maps_a], [b[:, order] for b in maps_b]
