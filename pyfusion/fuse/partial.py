"""Partial fusion by partial assignment (Morelli & Eckstein, ICML 2026; DESIGN §4), for K >= 2 members.

Per neuron group of width n and fusion level alpha, ``iso = floor(alpha * n + 0.5)`` neurons of each member stay
isolated (round half up; Python's ``round`` would round half to even, so alpha * n = 2.5 would give 2 but 3.5
would give 4) and ``s = n - iso`` are fused. Which neurons to fuse and how to pair them come from ONE partial
assignment per (group, member) pair: the ``s`` disjoint pairs of minimum total cost between the reference
member's neurons and member k's (``pyfusion.ops.linear_assignment(num_matches=s)``). With uniform masses this is
exactly the paper's partial OT with a sink (mass alpha/(1+alpha), point-sink cost 0, sink-sink forbidden): a
neuron sent to the sink is isolated.

K members (the rule, reducing exactly to the two-member construction at K = 2): member ``reference`` (default 0)
is the reference. Every other member k is partially matched to it with ``num_matches = s``. A *shared* slot is a
reference neuron matched by at least one member; it is built from the reference neuron and every member
neuron matched to it, with the lambdas renormalised over these contributors (``A_k = lambda_k / sum_{c in
contributors} lambda_c``; if that sum is 0 the contributors share equally, which never reaches the output since
only zero-weight members read such a slot). The reference's unmatched neurons are its branch slots, and each
member's n - s unmatched neurons are its branch slots. So every non-reference member keeps exactly ``iso``
isolated neurons, the group has ``n + (K - 1) * iso`` slots, alpha = 1 is the lambda-weighted ensemble exactly,
alpha = 0 is activation / weight matching to the reference, and lambda one-hot on member m reproduces member m
(every slot member m reads is built from member m alone). For K = 2 the shared slots are exactly the matched
pairs with weights (lambda_0, lambda_1), the paper's construction.

Layout of every group: ``[shared (by reference neuron index) | branch_0 | ... | branch_{K-1}]`` (each branch by
neuron index). ``A_k`` carries the coefficients above, ``B_k`` is member k's 0/1 position map; the one builder
(``W' = sum_k A_k W_k B_k``) assembles the weights, so the blocks (branch_k out, branch_j in), j != k, are
exactly zero.

Neuron features (each gives an (n, n) cost between the reference's and member k's neurons):

* ``"weights"`` (no data): the incoming weights (producer rows and biases, concatenated over every layer that
  writes the group, e.g. all layers of a residual stream). The input axes are aligned through the input group's
  plan: only the shared input slots to which member k contributes enter (the paper restricts rows to fused
  inputs too); groups are planned in forward order and an input group not planned yet (the inner group of a
  later residual block) is left out of the features.
* ``"activations"``: statistics of the members' activations on calibration data (``point`` "pre" / "post"),
  cost ``"sqdist"`` (mean squared difference, the paper's) or ``"correlation"`` (1 - Pearson); shares the cost
  function (and dead-neuron tie-breaking) of ``activation_matching``. All groups' problems are independent and
  are solved in one batched assignment call.
* ``"pcd"``: incoming and outgoing weights (consumer columns, aligned through the consumer's output group), one
  squared-Euclidean cost for each side normalised to sum 1 and averaged, refined by coordinate descent: all
  plans start as the identity, then sweeps over the groups re-solve each group under its neighbours' current
  plans, until a sweep changes nothing (or ``sweeps``; the paper uses 10).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph

__all__ = [
    "PartialAssignment",
    "isolated_count",
    "partial_group_plan",
    "partial_plan",
    "resolve_alpha",
    "weight_feature_costs",
]

FEATURES = ("weights", "activations", "pcd")


def isolated_count(alpha: float, n: int) -> int:
    """Neurons of each member left isolated in a group of width n: ``floor(alpha * n + 0.5)`` (round half up)."""
    return int(math.floor(alpha * n + 0.5))


def resolve_alpha(alpha: Any, graph: FusionGraph) -> dict[str, float]:
    """Per-group alpha from a float, a list (one per group, graph order) or a dict by group name.

    A dict may hold the key ``"*"``: the value of every group it does not name; without it every group must be
    named.

    Raises:
        ValueError: values outside [0, 1] or not finite, a list of the wrong length, unknown or missing names
            (the message lists the graph's groups).
    """
    names = list(graph.groups)

    def num(v: Any, where: str) -> float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            if isinstance(v, Tensor) and v.ndim == 0 and v.dtype.is_floating_point:
                v = float(v)
            else:
                raise ValueError(f"{where} must be a float in [0, 1]; got {type(v).__name__} {v!r}")
        x = float(v)
        if not math.isfinite(x) or not 0.0 <= x <= 1.0:
            raise ValueError(f"{where} must be in [0, 1]; got {x}")
        return x

    if isinstance(alpha, Mapping):
        unknown = [k for k in alpha if k != "*" and k not in graph.groups]
        if unknown:
            raise ValueError(f"alpha names unknown groups {unknown}; the groups are {names}")
        if "*" not in alpha:
            missing = [n for n in names if n not in alpha]
            if missing:
                raise ValueError(
                    f"alpha (a dict) misses groups {missing}; name every group of {names} or give a default "
                    "under the key '*'"
                )
        default = alpha.get("*")
        return {n: num(alpha[n] if n in alpha else default, f"alpha[{n!r}]") for n in names}
    if isinstance(alpha, (list, tuple, np.ndarray)) or (isinstance(alpha, Tensor) and alpha.ndim > 0):
        vals = list(alpha)
        if len(vals) != len(names):
            raise ValueError(f"alpha (a list) must have one value per group ({len(names)}: {names}); got {len(vals)}")
        return {n: num(v, f"alpha[{i}]") for i, (n, v) in enumerate(zip(names, vals))}
    x = num(alpha, "alpha")
    return dict.fromkeys(names, x)


@dataclass
class PartialAssignment:
    """The slot structure of one group: where every member's neurons sit.

    Attributes:
        slot_of: K (n,) int64 arrays: the slot of member k's neuron j.
        layout: segment sizes ``(shared, branch_0, ..., branch_{K-1})``.
    """

    slot_of: list[np.ndarray]
    layout: tuple[int, ...]

    @classmethod
    def identity(cls, n: int, k_all: int) -> PartialAssignment:
        """Full fusion without alignment (every member's neuron j in slot j)."""
        return cls([np.arange(n, dtype=np.int64) for _ in range(k_all)], (n,) + (0,) * k_all)

    @property
    def shared(self) -> int:
        return self.layout[0]

    def shared_pairs(self, k: int, ref: int) -> tuple[np.ndarray, np.ndarray]:
        """(reference neurons, member-k neurons) sharing a slot, by slot order."""
        sk = self.slot_of[k]
        jk = np.flatnonzero(sk < self.shared)
        order = np.argsort(sk[jk], kind="stable")
        jk = jk[order]
        inv = np.full(self.shared, -1, dtype=np.int64)
        sr = self.slot_of[ref]
        ir = np.flatnonzero(sr < self.shared)
        inv[sr[ir]] = ir
        return inv[sk[jk]], jk

    def group_plan(self, lambdas: Sequence[float]) -> GroupPlan:
        """A_k (slots, n) with the renormalised lambdas on shared slots and 1 on branch slots; B_k = 0/1 positions."""
        k_all = len(self.slot_of)
        n = len(self.slot_of[0])
        slots = sum(self.layout)
        s = self.shared
        contrib = np.zeros((k_all, s), dtype=bool)
        for k in range(k_all):
            sk = self.slot_of[k]
            contrib[k, sk[sk < s]] = True
        lam = np.asarray(lambdas, dtype=np.float64)[:, None] * contrib
        tot = lam.sum(0)
        cnt = contrib.sum(0)
        coef = np.where(tot > 0, lam / np.where(tot > 0, tot, 1.0), contrib / np.maximum(cnt, 1))
        maps_a, maps_b = [], []
        for k in range(k_all):
            sk = torch.as_tensor(self.slot_of[k])
            ar = torch.arange(n)
            a = torch.zeros(slots, n, dtype=torch.float64)
            vals = torch.ones(n, dtype=torch.float64)
            in_shared = sk < s
            vals[in_shared] = torch.as_tensor(coef[k])[sk[in_shared]]
            a[sk, ar] = vals
            b = torch.zeros(n, slots, dtype=torch.float64)
            b[ar, sk] = 1.0
            maps_a.append(a)
            maps_b.append(b)
        return GroupPlan(maps_a, maps_b, tuple(int(x) for x in self.layout))


def partial_group_plan(
    n: int, k_all: int, ref: int, matches: Mapping[int, tuple[np.ndarray, np.ndarray]]
) -> PartialAssignment:
    """Slots of one group from the partial matchings of every member k != ref to the reference.

    Args:
        n: group width.
        k_all: K.
        ref: the reference member.
        matches: k -> (reference neurons, member-k neurons) of the matched pairs.

    Returns:
        The :class:`PartialAssignment` of the module docstring's rule.
    """
    used = np.zeros(n, dtype=bool)
    for ri, _ in matches.values():
        used[np.asarray(ri, dtype=np.int64)] = True
    shared_ref = np.flatnonzero(used)
    s = len(shared_ref)
    slot_of_ref_shared = np.full(n, -1, dtype=np.int64)
    slot_of_ref_shared[shared_ref] = np.arange(s)
    slot_of = [np.full(n, -1, dtype=np.int64) for _ in range(k_all)]
    branch = []
    for k in range(k_all):
        if k == ref:
            slot_of[k][shared_ref] = np.arange(s)
        else:
            ri, ci = (np.asarray(x, dtype=np.int64) for x in matches[k])
            slot_of[k][ci] = slot_of_ref_shared[ri]
        branch.append(np.flatnonzero(slot_of[k] < 0))
    start = s
    for k in range(k_all):
        slot_of[k][branch[k]] = start + np.arange(len(branch[k]))
        start += len(branch[k])
    return PartialAssignment(slot_of, (s, *(len(b) for b in branch)))


# ---------------------------------------------------------------------------------------------------------
# weight features
# ---------------------------------------------------------------------------------------------------------


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    """(n_a, n_b) squared Euclidean distances of the rows, float64, >= 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def _corr_cost(a: Tensor, b: Tensor) -> Tensor:
    """1 - Pearson correlation of the rows (0 correlation for a constant row)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    a = a / torch.where(na > 0, na, torch.ones_like(na))[:, None]
    b = b / torch.where(nb > 0, nb, torch.ones_like(nb))[:, None]
    return 1.0 - (a @ b.T).clamp(-1.0, 1.0)


def _expand_idx(idx: np.ndarray, expand: int) -> Tensor:
    t = torch.as_tensor(idx, dtype=torch.long)
    if expand == 1:
        return t
    return (t[:, None] * expand + torch.arange(expand)).reshape(-1)


def weight_feature_costs(
    states: Sequence[Mapping[str, Tensor]],
    graph: FusionGraph,
    name: str,
    assigns: Mapping[str, PartialAssignment],
    ref: int,
    *,
    outgoing: bool,
    cost: str = "sqdist",
) -> dict[int, Tensor]:
    """Costs (n, n) between the reference's and each member's neurons of group ``name`` from their weights.

    Features of a neuron: its rows of every producer tensor (incoming side) and, with ``outgoing``, its
    columns of every consumer tensor; every other group axis of a tensor is aligned through that group's
    current :class:`PartialAssignment` (only the shared slots member k contributes to; a tensor with an axis
    in a group without an assignment is left out). With both sides, each side's cost is normalised to sum 1
    and the two are averaged (the paper's ``combine_costs``).

    Args:
        states: K float64 state dicts.
        assigns: group -> current assignment (groups without one are not aligned yet).
        cost: "sqdist" or "correlation".

    Returns:
        member k (!= ref) -> (n, n) float64 cost, rows = reference neurons.
    """
    g = graph.groups[name]
    by_key = graph.refs_by_key()
    k_all = len(states)
    sides = [("in", g.producers)] + ([("out", g.consumers)] if outgoing else [])
    out: dict[int, Tensor] = {}
    for k in range(k_all):
        if k == ref:
            continue
        per_side = []
        for _, refs in sides:
            fr, fk = [], []
            for r in refs:
                tr, tk = states[ref][r.key], states[k][r.key]
                usable = True
                for gname, r2 in by_key.get(r.key, []):
                    if (gname, r2.axis) == (name, r.axis):
                        continue
                    asg = assigns.get(gname)
                    if asg is None:
                        usable = False
                        break
                    ir, ik = asg.shared_pairs(k, ref)
                    tr = tr.index_select(r2.axis, _expand_idx(ir, r2.expand))
                    tk = tk.index_select(r2.axis, _expand_idx(ik, r2.expand))
                if not usable:
                    continue
                n_rows = g.size
                tr = tr.movedim(r.axis, 0)
                tk = tk.movedim(r.axis, 0)
                if r.expand > 1:  # a flatten consumer: e columns per neuron
                    tr = tr.reshape(n_rows, r.expand, *tr.shape[1:]).movedim(1, -1)
                    tk = tk.reshape(n_rows, r.expand, *tk.shape[1:]).movedim(1, -1)
                fr.append(tr.reshape(n_rows, -1))
                fk.append(tk.reshape(n_rows, -1))
            if not fr:
                continue
            a, b = torch.cat(fr, 1), torch.cat(fk, 1)
            c = _sqdist(a, b) if cost == "sqdist" else _corr_cost(a, b)
            per_side.append(c)
        if not per_side:
            out[k] = torch.zeros(g.size, g.size, dtype=torch.float64)
        elif len(per_side) == 1:
            out[k] = per_side[0]
        else:
            normed = [c / c.sum() if float(c.sum()) > 0 else c for c in per_side]
            out[k] = sum(normed) / len(normed)
    return out


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------


def _solve(problems: list[Tensor], ks: list[int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    from pyfusion.ops import linear_assignment

    if not problems:
        return [], 0.0
    for i, c in enumerate(problems):
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"partial fusion: cost matrix {i} has NaN or inf values")
    t0 = time.perf_counter()
    res = linear_assignment([c.numpy() for c in problems], num_matches=ks)
    dt = time.perf_counter() - t0
    return [(np.asarray(r), np.asarray(c)) for r, c in zip(res.row_ind, res.col_ind)], dt


@register_method(
    "partial", needs_data="optional", summary="partial fusion: fuse the most similar neurons, keep the rest per member"
)
def partial_plan(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Any = None,
    *,
    alpha: Any = 0.5,
    features: str | None = None,
    cost: str | None = None,
    point: str = "post",
    reference: int = 0,
    sweeps: int = 10,
    max_batches: int | None = None,
) -> Plan:
    """Partial fusion plan (module docstring).

    Args:
        alpha: fraction of each member's neurons left isolated: a float, a list (one per group, graph order) or
            a dict by group name (key "*" for the rest).
        features: "weights", "activations" or "pcd" (default: "activations" when data is given, else "weights").
        cost: "sqdist" (default) or "correlation".
        point: activations only: "post" (default) or "pre" activation values.
        reference: the member every other member is matched to.
        sweeps: pcd only: maximum coordinate-descent sweeps.
        max_batches: activations only: calibration batches used.
    """
    t_start = time.perf_counter()
    k_all = len(members)
    alphas = resolve_alpha(alpha, graph)
    if features is None:
        features = "activations" if data is not None else "weights"
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}; got {features!r}")
    cost = "sqdist" if cost is None else cost
    if cost not in ("sqdist", "correlation"):
        raise ValueError(f"cost must be 'sqdist' or 'correlation'; got {cost!r}")
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)) or not 0 <= reference < k_all:
        raise ValueError(f"reference must be a member index in [0, {k_all}); got {reference!r}")
    if int(sweeps) != sweeps or sweeps < 1:
        raise ValueError(f"sweeps must be an integer >= 1; got {sweeps!r}")
    if features == "activations" and data is None:
        raise ValueError("features='activations' needs calibration data: pass data=DataLoader or a list of batches")
    ref = int(reference)
    others = [k for k in range(k_all) if k != ref]
    isolated = {name: isolated_count(alphas[name], g.size) for name, g in graph.groups.items()}
    matches_n = {name: graph.groups[name].size - isolated[name] for name in graph.groups}
    assigns: dict[str, PartialAssignment] = {}
    info: dict[str, Any] = {"method": "partial", "features": features, "alpha": alphas, "isolated": isolated}
    t_stats = t_solve = 0.0
    if features == "activations":
        from pyfusion.fuse.activation_matching import activation_cost, neuron_features
        from pyfusion.fuse.activations import group_statistics

        t0 = time.perf_counter()
        stats = group_statistics(members, graph, data, point=point, max_batches=max_batches)
        t_stats = time.perf_counter() - t0
        states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in members]
        problems, ks, keys = [], [], []
        for name in graph.groups:
            feats = [neuron_features(st, graph, name) for st in states]
            for k in others:
                problems.append(activation_cost(stats[name], ref, k, cost, (feats[ref], feats[k])))
                ks.append(matches_n[name])
                keys.append((name, k))
        sol, t_solve = _solve(problems, ks)
        per_group: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for (name, k), m in zip(keys, sol):
            per_group.setdefault(name, {})[k] = m
        for name, g in graph.groups.items():
            assigns[name] = partial_group_plan(g.size, k_all, ref, per_group.get(name, {}))
        info["stat_rows"] = next(iter(stats.values())).count if stats else 0
    else:
        states = [
            {n: t.detach().to("cpu", torch.float64) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
            for m in members
        ]
        pcd = features == "pcd"
        if pcd:
            assigns = {name: PartialAssignment.identity(g.size, k_all) for name, g in graph.groups.items()}
        done = 0
        for _ in range(sweeps if pcd else 1):
            done += 1
            changed = False
            for name, g in graph.groups.items():
                costs = weight_feature_costs(states, graph, name, assigns, ref, outgoing=pcd, cost=cost)
                sol, dt = _solve([costs[k] for k in others], [matches_n[name]] * len(others))
                t_solve += dt
                new = partial_group_plan(g.size, k_all, ref, dict(zip(others, sol)))
                old = assigns.get(name)
                if old is None or any(not np.array_equal(a, b) for a, b in zip(old.slot_of, new.slot_of)):
                    changed = True
                assigns[name] = new
            if not changed:
                break
        info["sweeps"] = done
    groups = {name: asg.group_plan(lambdas) for name, asg in assigns.items()}
    info.update(
        layouts={name: asg.layout for name, asg in assigns.items()},
        time_stats_s=t_stats,
        time_solve_s=t_solve,
        time_match_s=time.perf_counter() - t_start,
    )
    return Plan(tuple(float(x) for x in lambdas), groups, info)
