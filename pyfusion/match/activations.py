"""Activation costs between neurons (Git Re-Basin §3.1; Jordan et al. 2023 "correlation matching").

From the joint statistics of the members' activations on calibration data (:class:`pyfusion.stats.ActivationStats`,
one block per member, e.g. from :func:`pyfusion.stats.groups.group_statistics`), the cost between reference
neuron i and member-k neuron j is ``1 - corr(i, j)`` ("correlation") or the mean squared distance
``E[(x_i - y_j)^2]`` ("sqdist"). Activation matching, partial fusion and OT fusion all use these costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.transform import neuron_view
from pyfusion.match.distance import sqdist

if TYPE_CHECKING:  # annotations only: the engine loads when statistics are computed
    from pyfusion.stats.activation_stats import ActivationStats

__all__ = ["ACTIVATION_COSTS", "activation_cost", "activation_costs", "neuron_features"]

ACTIVATION_COSTS = ("correlation", "sqdist")


def neuron_features(state: Mapping[str, Tensor], graph: FusionGraph, name: str) -> Tensor:
    """Permutation-invariant per-neuron features of one member (n, F): the norm of each producer row (every
    segment, read with :func:`pyfusion.graph.neuron_view`), and the values of 1-D per-neuron tensors (biases,
    BatchNorm / LayerNorm parameters and running statistics). They do not depend on how the *input* neurons are
    ordered, so they can break ties between members' dead neurons."""
    g = graph.groups[name]
    cols = []
    for r in g.producers + g.per_neuron:
        if r.key not in state:
            continue
        t = neuron_view(state[r.key].detach().to("cpu", torch.float64), r, g)
        cols.append(t[:, 0] if t.shape[1] == 1 else t.norm(dim=1))
    return torch.stack(cols, 1) if cols else torch.zeros(g.size, 1, dtype=torch.float64)


def activation_cost(
    st: ActivationStats,
    a: int,
    b: int,
    cost: str,
    features: tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Cost matrix (n_a, n_b) between blocks a and b: "correlation" (1 - Pearson) or "sqdist" (E[(x - y)^2]).

    Constant neurons (zero variance on the calibration data, e.g. dead ReLUs) carry no signal: every pair of
    constant neurons gets the same correlation cost. When ``features`` (from :func:`neuron_features`) are given,
    such ties are broken by adding ``1e-6 * scale * d / max(d)`` on the constant x constant block, with d the
    squared distance of the features (scale: the largest cost), so that a neuron-permuted copy is recovered
    exactly even where neurons are dead. ``features`` may be a callable returning the pair: it is called only when
    both blocks have a constant neuron (the features read every producer weight, in float64: 0.1 s of an MLP-1024
    pair's activation matching, for nothing when no neuron is dead).
    """
    if cost == "correlation":
        c = st.corr(a, b).neg_().add_(1.0)  # in place: corr is a fresh tensor (no second (n_a, n_b) allocation)
    elif cost == "sqdist":
        c = st.sqdist(a, b)
    else:
        raise ValueError(f"cost must be 'correlation' or 'sqdist'; got {cost!r}")
    if features is not None:
        # the neurons corr treats as constant (std <= CONST_RTOL |mean| too: a ReLU6 saturated in float32 is not
        # exactly constant after the shifted float64 sums), not only var == 0: else they tie at cost 1, unbroken
        dead_a, dead_b = st.constant(a), st.constant(b)
        if bool(dead_a.any()) and bool(dead_b.any()):
            if callable(features):
                features = features()
            # exact differences: identical features (a permuted copy) must give exactly 0
            d = sqdist(features[0][dead_a], features[1][dead_b], exact=True)
            scale = float(c.abs().max().clamp_min(1e-12))
            blk = c[dead_a][:, dead_b] + 1e-6 * scale * d / float(d.max().clamp_min(1e-300))
            idx_a, idx_b = dead_a.nonzero().flatten(), dead_b.nonzero().flatten()
            c = c.clone()
            c[idx_a[:, None], idx_b[None, :]] = blk
    return c


def activation_costs(
    st: ActivationStats,
    states: Sequence[Mapping[str, Tensor]],
    graph: FusionGraph,
    name: str,
    reference: int,
    cost: str,
    members: Sequence[int] | None = None,
) -> dict[int, Tensor]:
    """The activation costs of group ``name`` between the reference and every other member, tie-broken.

    Args:
        st: the group's statistics, block k = member k.
        states: K state dicts (parameters and buffers) for the dead-neuron features.
        graph: neuron groups.
        name: the group.
        reference: the member whose neurons are the rows.
        cost: "correlation" or "sqdist".
        members: the members to compare with (default: all but the reference).

    Returns:
        member k -> (n, n) cost, rows = reference neurons (see :func:`activation_cost`).
    """
    ks = [k for k in range(len(states)) if k != reference] if members is None else list(members)
    feats: dict[int, Tensor] = {}

    def features(k: int) -> Callable[[], tuple[Tensor, Tensor]]:
        def pair() -> tuple[Tensor, Tensor]:  # computed once per member, only where dead neurons need them
            for j in (reference, k):
                if j not in feats:
                    feats[j] = neuron_features(states[j], graph, name)
            return feats[reference], feats[k]

        return pair

    return {k: activation_cost(st, reference, k, cost, features(k)) for k in ks}
