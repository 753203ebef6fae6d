"""bench/defaults.py: the subset outputs of the selection study are the budget search's combine rules, and the
per-axis win counts count what they say."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_frontier import _import

defaults = _import("defaults")


def test_subset_outputs_are_the_sub_ensembles_of_the_search():
    from pyfusion.fuse.budget import _log_mean_probs

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    outs = defaults._subset_outputs(z)
    # 3 members, 3 pairs (x2 rules), 1 triple (x2 rules)
    assert len(outs) == 3 + 2 * 3 + 2 * 1
    for sub, combine, o in outs:
        zs = z[list(sub)]
        w = torch.full((len(sub),), 1.0 / len(sub), dtype=torch.float64)
        # what the budget search scores (BudgetSearch._subsets), and a float64 reference of it
        want = zs.mean(0) if combine == "logits" else _log_mean_probs(zs, w)
        ref = zs.mean(0) if combine == "logits" else torch.log(torch.softmax(zs, -1).mean(0))
        assert torch.allclose(o, want, atol=1e-12) and torch.allclose(o, ref, atol=1e-12), (sub, combine)
    # the probabilities of the probs rule sum to one
    probs = [o for _, c, o in outs if c == "probs"]
    assert all(torch.allclose(p.exp().sum(-1), torch.ones(5, dtype=torch.float64)) for p in probs)


def _rec(case: str, alpha: float, point: str, acc: float, dist: float) -> dict:
    return {"case": case, "alpha": alpha, "method": "partial", "axis": "options", "features": "activations",
            "cost": "sqdist", "point": point, "acc": acc, "dist": dist}  # fmt: skip


def test_wins_counts_accuracy_wins_ties_and_distance_wins():
    recs = [
        _rec("a", 0.0, "post", 0.90, 1.0), _rec("a", 0.0, "pre", 0.92, 2.0),  # pre wins acc, post wins dist
        _rec("a", 0.5, "post", 0.95, 1.0), _rec("a", 0.5, "pre", 0.95, 0.5),  # accuracy tie, pre wins dist
        _rec("b", 0.0, "post", 0.80, 1.0),  # incomplete cell (no pre): not counted
        {**_rec("b", 0.5, "pre", 0.7, 1.0), "acc": None},  # failed variant
    ]  # fmt: skip
    w = defaults._wins(recs, "partial", "point", ("post", "pre"), {"features": "activations", "cost": "sqdist"})
    assert w["cells"] == 2 and w["ties"] == 1
    assert w["acc_wins"] == {"post": 0, "pre": 1}
    assert w["dist_wins"] == {"post": 1, "pre": 1}
    assert w["mean_acc"]["pre"] == pytest.approx((0.92 + 0.95) / 2)
    assert not math.isnan(w["mean_acc"]["post"])
