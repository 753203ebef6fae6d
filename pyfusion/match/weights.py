"""Weight costs between neurons: incoming (and outgoing) weights aligned through the other groups' maps.

* :func:`weight_cost`: partial fusion's ``"weights"`` / ``"pcd"`` features (squared distance or 1 - correlation of
  the producer rows, and with ``outgoing`` of the consumer columns, each side normalised and averaged);
* :func:`ot_weight_cost`: OT fusion's ground cost (squared distance of the incoming rows and per-neuron
  parameters, member inputs mapped by the transport maps of earlier groups);
* :func:`neuron_masses`: OT fusion's neuron masses (uniform or importance from the incoming weights).

Weight matching's similarity is in :func:`pyfusion.match.solvers.align_weights`. All of them build their features
with :func:`pyfusion.match.align.aligned_features`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pyfusion.graph.groups import AxisRef, FusionGraph
from pyfusion.graph.transform import neuron_view
from pyfusion.match.align import Alignment, aligned_features
from pyfusion.match.distance import combine_costs, correlation_cost, sqdist

__all__ = ["MASSES", "WEIGHT_COSTS", "neuron_masses", "ot_weight_cost", "unit_masses", "weight_cost"]

WEIGHT_COSTS = ("sqdist", "correlation")
MASSES = ("uniform", "l1", "l2")


def _feature_rows(feats: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The (ref, member) feature matrices (n, F): the pieces concatenated along the features, contiguous (one
    piece, the usual case, is used as is when it already is: no copy)."""
    if len(feats) == 1:
        return feats[0][0].contiguous(), feats[0][1].contiguous()
    return torch.cat([f[0] for f in feats], 1), torch.cat([f[1] for f in feats], 1)


def _sq_norms(sq: list[tuple[Tensor, Tensor] | None]) -> tuple[Tensor, Tensor] | None:
    """The rows' squared norms of :func:`_feature_rows`'s matrices where the gather computed them: one piece only
    (for several, a sum of the pieces' norms would round differently from the norms of the concatenation)."""
    return sq[0] if len(sq) == 1 else None


def weight_cost(
    ref_state: Mapping[str, Tensor],
    member_state: Mapping[str, Tensor],
    graph: FusionGraph,
    name: str,
    maps: Mapping[str, Alignment],
    *,
    outgoing: bool,
    cost: str = "sqdist",
    by_key: Mapping[str, list[tuple[str, AxisRef]]] | None = None,
) -> Tensor:
    """Cost (n, n) between the reference's and a member's neurons of group ``name`` from their weights.

    Features of a neuron: its rows of every producer tensor (incoming side) and, with ``outgoing``, its columns of
    every consumer tensor; every other group axis of a tensor goes through that group's map in ``maps`` (a tensor
    with an axis in a group without a map is left out). With both sides, each side's cost is normalised to sum 1
    and the two are averaged (:func:`pyfusion.match.distance.combine_costs`). No usable tensor: all zeros.

    Args:
        ref_state, member_state: float64 state dicts of the reference and the member.
        graph: neuron groups.
        name: the group.
        maps: group -> alignment of the member to the reference (partial fusion: matched pairs).
        outgoing: add the consumer side (pcd).
        cost: "sqdist" or "correlation".
        by_key: ``graph.refs_by_key()`` if the caller has it.

    Returns:
        (n, n) float64, rows = reference neurons.
    """
    if cost not in WEIGHT_COSTS:
        raise ValueError(f"cost must be one of {WEIGHT_COSTS}; got {cost!r}")
    g = graph.groups[name]
    by_key = graph.refs_by_key() if by_key is None else by_key
    per_side = []
    for refs in [g.producers] + ([g.consumers] if outgoing else []):
        sq: list[tuple[Tensor, Tensor] | None] = []
        feats = aligned_features(
            ref_state, member_state, graph, name, refs, maps, missing="drop", by_key=by_key,
            sq_norms=sq if cost == "sqdist" else None,
        )  # fmt: skip
        if not feats:
            continue
        a, b = _feature_rows(feats)
        per_side.append(sqdist(a, b, sq_norms=_sq_norms(sq)) if cost == "sqdist" else correlation_cost(a, b))
    if not per_side:
        return torch.zeros(g.size, g.size, dtype=torch.float64)
    return combine_costs(per_side)


def ot_weight_cost(
    ref_state: Mapping[str, Tensor],
    member_state: Mapping[str, Tensor],
    graph: FusionGraph,
    name: str,
    maps: Mapping[str, Alignment],
    by_key: Mapping[str, list[tuple[str, AxisRef]]] | None = None,
) -> Tensor:
    """OT fusion's ground cost (n, n): squared distance of the incoming weight rows and per-neuron parameters.

    The member's input axes go through the maps of the groups aligned so far (OTFusion's layer-wise procedure);
    a tensor with an input group not aligned yet (a residual stream's later blocks) is left out, and if no tensor
    is ready all are used, aligned where possible.
    """
    g = graph.groups[name]
    refs = g.producers + g.per_neuron
    feats = aligned_features(ref_state, member_state, graph, name, refs, maps, missing="drop", by_key=by_key)
    if not feats:
        feats = aligned_features(ref_state, member_state, graph, name, refs, maps, missing="keep", by_key=by_key)
    return sqdist(torch.cat([f[0] for f in feats], 1), torch.cat([f[1] for f in feats], 1))


def _importance(state: Mapping[str, Tensor], graph: FusionGraph, name: str, kind: str) -> Tensor:
    """L1 / L2 norm (n,) of each neuron's incoming weight rows (all producer segments, read with neuron_view)."""
    g = graph.groups[name]
    rows = torch.cat([neuron_view(state[r.key], r, g) for r in g.producers], dim=1)
    return rows.abs().sum(1) if kind == "l1" else rows.norm(dim=1)


def _normalised(w: Tensor) -> Tensor:
    # a dead neuron keeps a tiny mass (1e-12 of the largest) so that the marginals stay positive
    w = w + 1e-12 * float(w.max().clamp_min(1e-300))
    return w / w.sum()


def neuron_masses(state: Mapping[str, Tensor], graph: FusionGraph, name: str, kind: str) -> Tensor:
    """Neuron masses (n,) of one member in one group, float64, summing to 1.

    "uniform": 1/n; "l1" / "l2": the L1 / L2 norm of each neuron's incoming weight rows (all producers of the
    group), normalised; a dead neuron keeps a tiny mass (1e-12 of the largest) so that the marginals stay
    positive.
    """
    g = graph.groups[name]
    if kind == "uniform":
        return torch.full((g.size,), 1.0 / g.size, dtype=torch.float64)
    if kind not in MASSES:
        raise ValueError(f"masses must be 'uniform', 'l1', 'l2' or a dict of mass vectors; got {kind!r}")
    return _normalised(_importance(state, graph, name, kind))


def unit_masses(state: Mapping[str, Tensor], graph: FusionGraph, names: list[str], kind: str) -> Tensor:
    """Unit masses (U,) of one member in one tie set ``names``, summing to 1: "uniform" 1/U; "l1" / "l2" the sum
    over the tie set's groups and the unit's inner neurons of the neurons' L1 / L2 incoming-weight norms,
    normalised. For an untied group of ordinary neurons this is :func:`neuron_masses`."""
    g0 = graph.groups[names[0]]
    if kind == "uniform":
        return torch.full((g0.units,), 1.0 / g0.units, dtype=torch.float64)
    if kind not in MASSES:
        raise ValueError(f"masses must be 'uniform', 'l1', 'l2' or a dict of mass vectors; got {kind!r}")
    total = torch.zeros(g0.units, dtype=torch.float64)
    for n in names:
        g = graph.groups[n]
        total += _importance(state, graph, n, kind).reshape(g.units, g.unit_size).sum(1)
    return _normalised(total)
