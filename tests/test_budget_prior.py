"""fuse(budget=...)'s prior rule for the trivial candidates: the calibration argmin is replaced by the candidate
first in the prior order (more members averaged; class shares, logits, probs) among those at noise level (within
``trivial_margin`` paired standard errors of the argmin), checked on synthetic candidates with known per-sample
losses and end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyfusion.fuse import budget_search
from pyfusion.fuse.budget import TRIVIAL_MARGIN, _Candidate


def _members(k: int = 3, c: int = 4, seed: int = 0) -> list[nn.Module]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        m = nn.Linear(c, c, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.eye(c) + 0.8 * torch.randn(c, c, generator=g))
        out.append(m.eval())
    return out


def _data(n: int = 120, c: int = 4, seed: int = 1) -> list:
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed))
    y = x.argmax(1)
    return [(x[s : s + 40], y[s : s + 40]) for s in range(0, n, 40)]


@pytest.fixture(scope="module")
def search():
    return budget_search(_members(), _data(), candidates=["members", "subsets"])


def _cand(name: str, family: str, members: list[int], losses: torch.Tensor, tie: float = 0.0,
          combine: str | None = "logits") -> _Candidate:  # fmt: skip
    """A trivial candidate with per-sample losses ``losses`` (N,) on every calibration sample."""
    opts = {"members": members} if combine is None else {"members": members, "combine": combine}
    obj = float(losses.double().mean())
    return _Candidate(name, family, 100 * len(members), obj, tie, opts, all_losses=losses.double(),
                      all_key=(obj, tie))  # fmt: skip


def _errors(n: int, wrong: list[int]) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[wrong] = 1.0
    return e


def _paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """(mean(a - b)) / (std(a - b) / sqrt(N)), computed independently of the library."""
    d = (a - b).double().tolist()
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1)
    return mean / math.sqrt(var / n)


def test_noise_level_differences_go_to_the_candidate_with_more_members(search):
    n = 1000
    # the 3-subset errs on samples 0..49, the full ensemble on 0..47 plus 100..103: 52 against 50, z ~ 0.9
    sub = _cand("sub-ensemble 3/8", "subsets", [0, 1, 2], _errors(n, list(range(50))))
    ens = _cand("ensemble", "subsets", list(range(8)), _errors(n, list(range(48)) + list(range(100, 104))))
    member = _cand("member 0", "members", [0], _errors(n, list(range(51))), combine=None)
    assert _paired_z(ens.all_losses, sub.all_losses) < TRIVIAL_MARGIN
    chosen, _, record = search._pick_trivial([member, sub, ens])
    assert chosen is ens
    assert record["rule"] == "prior" and record["argmin"] == "sub-ensemble 3/8" and record["chosen"] == "ensemble"
    assert set(record["noise_level"]) == {"member 0", "sub-ensemble 3/8", "ensemble"}
    t = record["chosen_vs_argmin"]
    assert t["mean_excess_loss"] == pytest.approx(2 / n)
    assert t["z"] == pytest.approx(_paired_z(ens.all_losses, sub.all_losses))
    # the calibration argmin rule takes the subset
    argmin = budget_search(_members(), _data(), candidates=["members", "subsets"], trivial_rule="argmin")
    assert argmin._pick_trivial([member, sub, ens])[0] is sub


def test_a_significantly_better_cheaper_candidate_replaces_the_prior(search):
    n = 1000
    sub = _cand("sub-ensemble 2/4", "subsets", [0, 3], _errors(n, list(range(30))))
    ens = _cand("ensemble", "subsets", [0, 1, 2, 3], _errors(n, list(range(20)) + list(range(200, 260))))
    assert _paired_z(ens.all_losses, sub.all_losses) > 5
    chosen, _, record = search._pick_trivial([sub, ens])
    assert chosen is sub and record["noise_level"] == ["sub-ensemble 2/4"]
    assert record["tests"]["ensemble"]["noise_level"] is False


def test_the_margin_is_the_paired_z_threshold(search):
    n = 400
    sub = _cand("sub", "subsets", [0, 1], _errors(n, list(range(20))))
    ens = _cand("ens", "subsets", [0, 1, 2], _errors(n, list(range(14)) + list(range(100, 112))))
    z = _paired_z(ens.all_losses, sub.all_losses)  # 6 net extra errors of 18 discordant samples: z ~ 1.42
    assert 1 < z < 2
    for margin, want in ((z - 1e-6, sub), (z + 1e-6, ens), (0.0, sub), (math.inf, ens)):
        s = budget_search(_members(), _data(), candidates=["members", "subsets"], trivial_margin=margin)
        assert s._pick_trivial([sub, ens])[0] is want, margin


def test_exact_ties_and_margin_zero_go_to_the_prior(search):
    n = 300
    wrong = list(range(15))
    a = _cand("sub-ensemble [0, 1] (probs)", "subsets", [0, 1], _errors(n, wrong), combine="probs")
    b = _cand("sub-ensemble [0, 1] (logits)", "subsets", [0, 1], _errors(n, wrong), combine="logits")
    c = _cand("class-share [0, 2]", "class_counts", [0, 2], _errors(n, wrong), combine="probs")
    m = _cand("member 1", "members", [1], _errors(n, wrong), combine=None)
    zero = budget_search(_members(), _data(), candidates=["members", "subsets"], trivial_margin=0.0)
    for s in (search, zero):
        # equal losses everywhere: the class-share weights first, then logits, then probs; members last
        assert s._pick_trivial([m, a, b, c])[0] is c
        assert s._pick_trivial([m, a, b])[0] is b
        assert s._pick_trivial([m, a])[0] is a


def test_within_a_prior_rank_the_tie_breaker_decides(search):
    n = 500
    m0 = _cand("member 0", "members", [0], _errors(n, list(range(25))), tie=0.30, combine=None)
    m1 = _cand("member 1", "members", [1], _errors(n, list(range(20, 46))), tie=0.20, combine=None)
    # member 0 has one error fewer (the argmin), member 1 the lower cross-entropy: noise level, so member 1
    chosen, _, record = search._pick_trivial([m0, m1])
    assert record["argmin"] == "member 0" and chosen is m1
    # the same tie-breaker the other way round keeps the argmin
    m1b = _cand("member 1", "members", [1], _errors(n, list(range(20, 46))), tie=0.40, combine=None)
    assert search._pick_trivial([m0, m1b])[0] is m0


def test_end_to_end_the_record_and_the_reason():
    members = _members(4, seed=3)
    s = budget_search(members, _data(200, seed=4), candidates=["members", "subsets"])
    model = s.choose(1.0)
    info = model.fusion_info["budget"]
    rec = info["trivial_choice"]
    assert info["trivial_rule"] == "prior" and info["trivial_margin"] == TRIVIAL_MARGIN
    assert rec["chosen"] == info["chosen"] == info["best_trivial"]["name"]
    assert rec["samples"] == s.n_triv
    rows = {r["name"]: r for r in info["candidates"] if r["feasible"]}
    low = min(r["objective"] for r in rows.values())
    assert rows[rec["argmin"]]["objective"] == low
    # nothing at noise level averages more members than the choice
    n_chosen = len(rows[rec["chosen"]]["options"]["members"])
    assert all(len(rows[name]["options"]["members"]) <= n_chosen for name in rec["noise_level"])
    # every candidate not at noise level is worse than the argmin by more than the margin
    for name, t in rec["tests"].items():
        if not t["noise_level"]:
            assert t["z"] > TRIVIAL_MARGIN and rows[name]["objective"] > low
    assert "the prior rule" in info["reason"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"trivial_rule": "best"}, "trivial_rule must be one of"),
        ({"trivial_margin": -1.0}, "trivial_margin must be a number >= 0"),
        ({"trivial_margin": float("nan")}, "trivial_margin must be a number >= 0"),
        ({"trivial_margin": "2"}, "trivial_margin must be a number >= 0"),
    ],
)
def test_invalid_prior_rule_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        budget_search(_members(2), _data(40), candidates=["members", "subsets"], **options)


def test_a_fused_candidate_must_also_beat_the_argmin():
    # trivial_margin=inf: the prior's first (the most members) is always the trivial pick, so it often differs from
    # the argmin, and a fused candidate is tested against both
    members = _members(4, seed=5)
    families = ["members", "subsets", "partial", "cluster", "average"]
    seen, kept_by_argmin, fused_both = 0, 0, 0
    for seed in (1, 2):
        s = budget_search(members, _data(160, seed=20 + seed), candidates=families, cluster_restarts=1,
                          trivial_margin=math.inf, fused_margin=0.5)  # fmt: skip
        for b in (0.3, 0.55, 0.8):
            info = s.choose(b).fusion_info["budget"]
            tc, ma = info["trivial_choice"], info["margin_test_argmin"]
            if tc["argmin"] == info["best_trivial"]["name"]:
                assert ma is None  # the same candidate: one test
            if ma is not None:
                seen += 1
                assert ma["required_z"] == info["margin_test"]["required_z"]
                z = ma["mean_improvement"] / ma["standard_error"] if ma["standard_error"] > 0 else ma["z"]
                assert ma["passed"] == (z > ma["required_z"])
            if info["chosen_family"] not in ("members", "subsets"):  # a fused pick passed both tests
                assert info["margin_test"]["passed"] and (ma is None or ma["passed"])
                fused_both += ma is not None
            elif ma is not None and info["margin_test"]["passed"]:  # kept out by the argmin alone
                assert not ma["passed"] and "not the calibration argmin" in info["reason"]
                kept_by_argmin += 1
    # both paths ran (these seeds: a fused pick over both, and one that beat the prior's pick but not the argmin)
    assert seen > 0 and kept_by_argmin > 0 and fused_both > 0
