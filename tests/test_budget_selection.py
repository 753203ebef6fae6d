"""fuse(budget=...)'s selection: trivial candidates scored on every calibration sample, never worse than the best
trivial baseline on the search's objective, the full ensemble at budget 1, ties, the default objective."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pyfusion.fuse import budget_search
from pyfusion.fuse.budget import HOLDOUT_FUSED_MARGIN

TRIVIAL = ["members", "subsets"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noisy_linear_members(k: int, seed: int, noise: float = 1.2, c: int = 4) -> list[nn.Module]:
    """K linear classifiers ``x -> x (I + E_k)``, E_k independent noise: each is the true rule ``argmax x`` plus
    its own error, so averaging members cancels errors (the full ensemble has the fewest)."""
    g = torch.Generator().manual_seed(seed)
    members = []
    for _ in range(k):
        m = nn.Linear(c, c, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.eye(c) + noise * torch.randn(c, c, generator=g))
        members.append(m.eval())
    return members


def _data(n: int, seed: int, c: int = 4) -> tuple[torch.Tensor, torch.Tensor, list]:
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed))
    y = x.argmax(1)
    return x, y, [(x[s : s + 50], y[s : s + 50]) for s in range(0, n, 50)]


def _lex(z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    z = z.double()
    return float((z.argmax(1) != y).double().mean()), float(nn.functional.cross_entropy(z, y))


def test_trivial_candidates_are_scored_on_every_calibration_sample():
    members = _noisy_linear_members(3, seed=1)
    x, y, data = _data(200, seed=2)
    search = budget_search(members, data, candidates=TRIVIAL)
    assert search.n_triv == 200 and search.n_hold == 100
    # the member / sub-ensemble objectives are the error on all 200 samples (any order: it is a mean)
    model = search.choose(1 / 3 + 1e-9)
    rows = {r["name"]: r for r in model.fusion_info["budget"]["candidates"]}
    with torch.no_grad():
        for i, m in enumerate(members):
            assert rows[f"member {i}"]["objective"] == pytest.approx(_lex(m(x), y)[0], abs=1e-12)
            assert rows[f"member {i}"]["samples"] == 200
    # "holdout": the old rule, only the held-out half
    old = budget_search(members, data, candidates=TRIVIAL, trivial_samples="holdout")
    assert old.n_triv == old.n_hold == 100
    rows = {r["name"]: r for r in old.choose(1.0).fusion_info["budget"]["candidates"]}
    with torch.no_grad():
        assert rows["member 0"]["objective"] == pytest.approx(_lex(members[0](old.x_hold), old.y_hold)[0], abs=1e-12)


def test_budget_one_returns_the_full_ensemble_when_it_is_best():
    members = _noisy_linear_members(4, seed=4, noise=0.6, c=8)
    x, y, data = _data(400, seed=104, c=8)
    with torch.no_grad():
        zs = torch.stack([m(x) for m in members]).double()
    # the premise, computed directly: the full logit ensemble has the lexicographically lowest (error, CE) of every
    # member subset (logit average) on the calibration samples
    scores = {sub: _lex(zs[list(sub)].mean(0), y) for m in range(1, 5) for sub in itertools.combinations(range(4), m)}
    assert min(scores, key=scores.get) == (0, 1, 2, 3)
    search = budget_search(members, data, candidates=TRIVIAL, subset_combines=("logits",))
    model = search.choose(1.0)
    info = model.fusion_info["budget"]
    assert info["chosen"] == "ensemble [0, 1, 2, 3] (logits)"
    assert info["best_trivial"]["name"] == info["chosen"]
    assert "the best trivial baseline is ensemble [0, 1, 2, 3] (logits)" in info["reason"]
    assert "no fused candidate fits" in info["reason"]
    with torch.no_grad():
        assert torch.allclose(model(x).double(), zs.mean(0), atol=1e-6)
    # below the ensemble's cost it cannot be returned: the best 3-subset instead
    info3 = search.choose(0.75).fusion_info["budget"]
    best3 = min((s for s in scores if len(s) <= 3), key=scores.get)
    assert info3["chosen"].endswith(f"{list(best3)} (logits)")


@pytest.mark.parametrize("objective", ["error", "cross_entropy", "ensemble"])
def test_the_choice_is_never_worse_than_the_best_trivial_baseline_on_the_objective(objective):
    members = _noisy_linear_members(4, seed=5)
    _, _, data = _data(240, seed=6)
    families = ["members", "subsets", "partial", "partial_fit", "cluster", "average"]
    # the calibration argmin among the trivial candidates (the prior rule: tests/test_budget_prior.py)
    search = budget_search(members, data, objective=objective, cluster_restarts=2, candidates=families,
                           trivial_rule="argmin")  # fmt: skip
    for b in (0.25, 0.5, 0.8, 1.0):
        info = search.choose(b).fusion_info["budget"]
        assert info["objective"] == objective
        rows = [r for r in info["candidates"] if r["feasible"]]
        trivial = [r for r in rows if r["family"] in TRIVIAL]
        fused = [r for r in rows if r["family"] not in TRIVIAL]
        # stage 1: the best trivial baseline on every calibration sample, the best fused one on the held-out ones
        best_t = min(r["objective"] for r in trivial)
        assert info["best_trivial"]["objective"] == best_t
        # stage 2, paired (on every calibration sample when the fused candidate was cross-fitted, else on the
        # held-out ones): the choice is never worse than that baseline there
        on = "all_objective" if info["compared_on"] == "all" else "holdout_objective"
        chosen = info["chosen_all_objective"] if on == "all_objective" else info["chosen_holdout_objective"]
        assert chosen <= info["best_trivial"][on]
        margin = info["margin_test"]
        if margin is not None:
            assert margin["samples"] == (search.n_triv if on == "all_objective" else search.n_hold)
            # the measured margin on every sample; at least HOLDOUT_FUSED_MARGIN on the held-out half alone
            want = info["fused_margin"] if on == "all_objective" else max(info["fused_margin"], HOLDOUT_FUSED_MARGIN)
            assert margin["required_z"] == want
        if info["chosen_family"] in TRIVIAL:
            assert info["chosen"] == info["best_trivial"]["name"]
            best_fused_hold = min((r[on] for r in fused if r[on] is not None), default=math.inf)
            if best_fused_hold < info["best_trivial"][on]:  # kept by the margin test only
                assert margin is not None and not margin["passed"]
                assert margin["mean_improvement"] <= margin["required_z"] * margin["standard_error"]
                assert "the trivial baseline is kept" in info["reason"]
        else:
            assert info["chosen_objective"] == min(r["objective"] for r in fused)
            assert chosen < info["best_trivial"][on]
            assert margin["passed"] and margin["z"] > margin["required_z"] >= info["fused_margin"]
            # the per-sample losses average to the objectives: the improvement is the paired difference
            gap = info["best_trivial"][on] - chosen
            assert margin["mean_improvement"] == pytest.approx(gap, rel=1e-9, abs=1e-12)
            assert "the fused candidate has the lower" in info["reason"]
        if b >= 1.0:  # the full ensemble is a candidate for every combine rule
            names = [r["name"] for r in trivial]
            assert "ensemble [0, 1, 2, 3] (logits)" in names and "ensemble [0, 1, 2, 3] (probs)" in names


def test_holdout_mode_is_the_plain_minimum_over_the_held_out_objective():
    members = _noisy_linear_members(3, seed=13)
    _, _, data = _data(160, seed=14)
    search = budget_search(members, data, trivial_samples="holdout", cluster_restarts=2, trivial_rule="argmin",
                           candidates=["members", "subsets", "partial", "cluster"])  # fmt: skip
    for b in (0.4, 1.0):
        info = search.choose(b).fusion_info["budget"]
        rows = [r for r in info["candidates"] if r["feasible"]]
        assert all(r["objective"] == r["holdout_objective"] for r in rows)
        assert info["chosen_objective"] == min(r["objective"] for r in rows)


def test_default_objective_with_labels_is_the_error_and_without_the_distance():
    members = _noisy_linear_members(2, seed=7)
    x, y, data = _data(100, seed=8)
    assert budget_search(members, data, candidates=TRIVIAL).objective_name == "error"
    assert budget_search(members, [b[0] for b in data], candidates=TRIVIAL).objective_name == "ensemble"


def test_tie_tolerance_takes_the_cheaper_within_it():  # with the argmin rule (the prior rule prefers more members)
    members = _noisy_linear_members(4, seed=9)
    _, _, data = _data(200, seed=10)
    exact = budget_search(members, data, candidates=TRIVIAL, objective="cross_entropy", trivial_rule="argmin")
    info = exact.choose(1.0).fusion_info["budget"]
    rows = [r for r in info["candidates"] if r["feasible"]]
    low = min(r["objective"] for r in rows)
    assert info["chosen_objective"] == low
    # a tolerance that ties everything: the cheapest candidate (a member) wins, and the reason says so
    loose = budget_search(members, data, candidates=TRIVIAL, objective="cross_entropy", tie_tolerance=1e9,
                          trivial_rule="argmin")  # fmt: skip
    info = loose.choose(1.0).fusion_info["budget"]
    assert info["chosen_family"] == "members"
    assert info["tie_tolerance"] == 1e9 and "tied within the tolerance" in info["reason"]
    # a tolerance between the best and the second best changes nothing
    objs = sorted({r["objective"] for r in rows})
    mid = budget_search(members, data, candidates=TRIVIAL, objective="cross_entropy", trivial_rule="argmin",
                        tie_tolerance=0.5 * (objs[1] - objs[0]))  # fmt: skip
    assert mid.choose(1.0).fusion_info["budget"]["chosen_objective"] == objs[0]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"trivial_samples": "fit"}, "trivial_samples must be one of"),
        ({"tie_tolerance": -1.0}, "tie_tolerance must be a finite number >= 0"),
        ({"tie_tolerance": float("nan")}, "tie_tolerance must be a finite number >= 0"),
        ({"tie_tolerance": "0"}, "tie_tolerance must be a finite number >= 0"),
    ],
)
def test_invalid_selection_options_raise(options, match):
    members = _noisy_linear_members(2, seed=11)
    _, _, data = _data(40, seed=12)
    with pytest.raises(ValueError, match=match):
        budget_search(members, data, candidates=TRIVIAL, **options)


@pytest.mark.parametrize("objective", ["error", "ensemble"])
def test_the_fused_margin_is_a_paired_z_test_on_the_compared_losses(objective):
    members = _noisy_linear_members(4, seed=5)
    _, _, data = _data(240, seed=6)
    families = ["members", "subsets", "partial", "average"]
    loose = budget_search(members, data, objective=objective, candidates=families, fused_margin=0.0)
    strict = budget_search(members, data, objective=objective, candidates=families, fused_margin=1e9)
    for b in (0.5, 0.8):
        off = loose.choose(b).fusion_info["budget"]
        on = strict.choose(b).fusion_info["budget"]
        assert off["margin_test"] is None  # fused_margin=0: the plain paired minimum
        assert on["chosen_family"] in TRIVIAL  # an unreachable margin always keeps the trivial baseline
        assert on["chosen"] == on["best_trivial"]["name"]
        if off["chosen_family"] not in TRIVIAL:  # the fused pick the margin overrode
            m = on["margin_test"]
            assert m is not None and not m["passed"] and m["required_z"] == 1e9
            # paired on every calibration sample when the fused candidate was cross-fitted, else on the held-out ones
            key = "all_objective" if on["compared_on"] == "all" else "holdout_objective"
            assert off["compared_on"] == on["compared_on"]
            gap = on["best_trivial"][key] - off[f"chosen_{key}"]
            assert m["mean_improvement"] == pytest.approx(gap, rel=1e-9, abs=1e-12)
            assert m["samples"] == (strict.n_triv if key == "all_objective" else strict.n_hold)
            assert m["z"] == pytest.approx(m["mean_improvement"] / m["standard_error"])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "2", True])
def test_fused_margin_must_be_a_finite_non_negative_number(bad):
    members = _noisy_linear_members(2, seed=1)
    _, _, data = _data(40, seed=2)
    with pytest.raises(ValueError, match="fused_margin must be a finite number >= 0"):
        budget_search(members, data, fused_margin=bad)


def test_the_best_fused_candidate_is_cross_fitted_before_the_paired_test():
    import pyfusion
    from pyfusion.models import mlp

    torch.manual_seed(5)
    members = [mlp([4, 16, 4]).eval() for _ in range(3)]  # a hidden layer to fuse partially
    _, _, data = _data(240, seed=6)
    search = budget_search(members, data, candidates=["members", "partial"], fused_margin=0.0)
    info = search.choose(0.8).fusion_info["budget"]
    assert info["compared_on"] == "all"
    row = next(r for r in info["candidates"] if r["family"] == "partial" and r["feasible"])
    assert row["options"]["cross_fitted"]
    # reproduce: the same fusion rebuilt on the held-out half and scored on the fit half, the original (fitted on
    # the fit half) on the held-out half; the objective is the error over all 240 samples
    hold = [(search.x_hold[s : s + 50], search.y_hold[s : s + 50]) for s in range(0, search.n_hold, 50)]
    mirror = pyfusion.fuse(members, hold, method="partial", alpha=row["options"]["alpha"], lambdas=[1 / 3] * 3)
    original = pyfusion.fuse(members, search.fit_data, method="partial", alpha=row["options"]["alpha"],
                             lambdas=[1 / 3] * 3)  # fmt: skip
    with torch.no_grad():
        z = torch.cat([mirror(search.x_fit), original(search.x_hold)]).double()
    err = float((z.argmax(1) != search.y_triv).double().mean())
    assert row["all_objective"] == pytest.approx(err, abs=1e-12)
    assert row["holdout_objective"] == pytest.approx(_lex(z[search.n_fit_triv :], search.y_hold)[0], abs=1e-12)
