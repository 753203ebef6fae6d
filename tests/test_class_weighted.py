"""Class-weighted sub-ensembles: SubEnsemble(class_weights=...), fit_class_weights, class_weights_from_counts, and
their budget candidates (class_subsets: fitted and cross-fitted; class_counts: from the members' class counts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion.fuse import budget_search
from pyfusion.fuse.subsets import class_weights_from_counts, fit_class_weights
from pyfusion.models import mlp
from pyfusion.nn import SubEnsemble


def _members(k: int = 3, c: int = 4, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [mlp([6, 12, c]).eval() for _ in range(k)]


def _x(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_class_weighted_formula_matches_a_float64_reference():
    members, x = _members(), _x()
    w = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.05
    w = w / w.sum(0)
    with torch.no_grad():
        got = SubEnsemble(members, class_weights=w)(x).double()
        probs = torch.stack([torch.softmax(m(x).double(), -1) for m in members])  # (K, N, C)
    want = torch.log((w[:, None, :] * probs).sum(0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("j", [0, 2])
def test_one_hot_class_weights_recover_a_single_member(j):
    members, x = _members(), _x()
    w = torch.zeros(3, 4)
    w[j] = 1.0
    with torch.no_grad():
        got = SubEnsemble(members, class_weights=w)(x)
        torch.testing.assert_close(got, torch.log_softmax(members[j](x), -1), rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), members[j](x).argmax(-1))


def test_uniform_class_weights_recover_the_plain_probability_sub_ensemble():
    members, x = _members(), _x()
    with torch.no_grad():
        got = SubEnsemble(members, class_weights=torch.full((3, 4), 1 / 3))(x)
        torch.testing.assert_close(got, SubEnsemble(members, combine="probs")(x), rtol=1e-5, atol=1e-6)
        lam = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        got = SubEnsemble(members, class_weights=lam[:, None].expand(3, 4))(x)
        torch.testing.assert_close(got, SubEnsemble(members, lam, "probs")(x), rtol=1e-5, atol=1e-6)


def test_class_weighted_serialization_and_cost(tmp_path):
    members, x = _members(), _x()
    w = torch.tensor([[0.7, 0.1, 0.2, 0.0], [0.2, 0.8, 0.3, 0.5], [0.1, 0.1, 0.5, 0.5]])
    se = SubEnsemble(members, class_weights=w)
    path = tmp_path / "cw.safetensors"
    pyfusion.save(se, path)
    back = pyfusion.load(path)
    torch.testing.assert_close(back.class_weights, se.class_weights)
    with torch.no_grad():
        torch.testing.assert_close(back(x), se(x))
    # the per-class weighting adds no counted FLOPs: the cost is the plain sub-ensemble's
    assert pyfusion.cost(back, x[:1]).flops == pyfusion.cost(SubEnsemble(members), x[:1]).flops


def test_bad_class_weights_raise_naming_the_argument():
    members, x = _members(), _x()
    with pytest.raises(ValueError, match=r"class_weights must have shape \(m, C\) = \(3"):
        SubEnsemble(members, class_weights=torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="class_weights must have shape"):
        SubEnsemble(members, class_weights=torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="column 1 sums to"):
        SubEnsemble(members, class_weights=torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="non-negative"):
        SubEnsemble(members, class_weights=torch.tensor([[2.0] * 4, [-1.0] * 4, [0.0] * 4]))
    with pytest.raises(ValueError, match="not both"):
        SubEnsemble(members, [0.2, 0.3, 0.5], class_weights=torch.full((3, 4), 1 / 3))
    with pytest.raises(ValueError, match="combine='probs'"):
        SubEnsemble(members, combine="logits", class_weights=torch.full((3, 4), 1 / 3))
    with pytest.raises(ValueError, match="class_weights has 5 classes"), torch.no_grad():
        SubEnsemble(members, class_weights=torch.full((3, 5), 1 / 3))(x)
    z, y = torch.randn(3, 10, 4), torch.randint(0, 4, (10,))
    with pytest.raises(ValueError, match=r"outputs must be \(K, N, C\)"):
        fit_class_weights(z[0], y)
    with pytest.raises(ValueError, match=r"labels must be \(10,\)"):
        fit_class_weights(z, y[:5])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        fit_class_weights(z, y + 4)
    with pytest.raises(ValueError, match="lambdas must be 3"):
        fit_class_weights(z, y, lambdas=[0.5, 0.5])
    with pytest.raises(ValueError, match="ridge"):
        fit_class_weights(z, y, ridge=-1.0)
    with pytest.raises(ValueError, match=r"class_counts must have shape \(K, C\)"):
        class_weights_from_counts(torch.ones(4))
    with pytest.raises(ValueError, match="class_counts must be finite and non-negative"):
        class_weights_from_counts(-torch.ones(2, 4))


def _experts(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(K=3, N, C=4) synthetic logits and labels: member k is confident and right on its classes {k, 3}, and
    confidently wrong (on class (c + 1) % 3) elsewhere: the per-class weights that help are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    z = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    for k in range(3):
        own = (y == k) | (y == 3)
        z[k, own, y[own]] += 4.0
        other = ~own
        z[k, other, (y[other] + 1) % 3] += 3.0
    return z, y


def test_fit_class_weights_is_equivariant_in_the_member_order():
    z, y = _experts()
    w = fit_class_weights(z, y)
    assert w.shape == (3, 4)
    torch.testing.assert_close(w.sum(0), torch.ones(4, dtype=torch.float64))
    for perm in ([2, 0, 1], [1, 0, 2]):
        wp = fit_class_weights(z[perm], y)
        torch.testing.assert_close(wp, w[perm], rtol=1e-5, atol=1e-6)
    lam = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(fit_class_weights(z[[2, 1, 0]], y, lambdas=lam[[2, 1, 0]]),
                               fit_class_weights(z, y, lambdas=lam)[[2, 1, 0]], rtol=1e-5, atol=1e-6)  # fmt: skip


def test_fit_class_weights_lowers_the_cross_entropy_and_trusts_the_experts():
    z, y = _experts()
    w = fit_class_weights(z, y)

    def ce(wt: torch.Tensor) -> float:
        out = torch.logsumexp(torch.log_softmax(z, -1) + torch.log(wt)[:, None, :], 0)
        return float(nn.functional.cross_entropy(out, y))

    uniform = torch.full((3, 4), 1 / 3, dtype=torch.float64)
    assert ce(w) < ce(uniform) - 0.05
    for k in range(3):  # class k: member k is the only one right on it
        assert int(w[:, k].argmax()) == k
    # an infinite ridge is the prior (the plain probability ensemble)
    torch.testing.assert_close(fit_class_weights(z, y, ridge=1e12), uniform, rtol=0, atol=1e-6)


def test_class_weights_from_counts_are_the_class_shares():
    counts = torch.tensor([[30.0, 0.0, 10.0, 0.0], [10.0, 20.0, 30.0, 0.0]])
    w = class_weights_from_counts(counts)
    want = torch.tensor([[0.75, 0.0, 0.25, 0.5], [0.25, 1.0, 0.75, 0.5]], dtype=torch.float64)  # class 3: no one
    torch.testing.assert_close(w, want)
    w = class_weights_from_counts(counts, lambdas=[0.25, 0.75], smoothing=10.0)
    want0 = 0.25 * (counts[0] + 10) / (0.25 * (counts[0] + 10) + 0.75 * (counts[1] + 10))
    torch.testing.assert_close(w[0], want0.double())
    torch.testing.assert_close(w.sum(0), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- budget candidates


def _non_iid_members(seed: int = 0) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 MLPs, each trained on 2 of 4 classes (of a random linear teacher), with their class counts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    classes = [(0, 1), (1, 2), (2, 3)]
    members, counts = [], torch.zeros(3, 4)
    for k, cl in enumerate(classes):
        torch.manual_seed(seed * 10 + k)
        m = mlp([6, 16, 4])
        keep = (y == cl[0]) | (y == cl[1])
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[keep]), y[keep]).backward()
            opt.step()
        counts[k] = torch.bincount(y[keep], minlength=4).float()
        members.append(m.eval())
    xc = torch.randn(400, 6, generator=g)
    return members, xc, (xc @ torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))).argmax(1), counts


def _calib(seed: int = 0):
    members, _, _, counts = _non_iid_members(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    return members, [(x[s : s + 100], y[s : s + 100]) for s in range(0, 600, 100)], counts


def test_class_subset_candidates_are_cross_fitted_and_scored_out_of_fold():
    members, data, counts = _calib()
    search = budget_search(members, data, candidates=["members", "subsets", "class_subsets", "class_counts"],
                           class_counts=counts)  # fmt: skip
    model = search.choose(1.0)
    info = model.fusion_info["budget"]
    rows = {r["name"]: r for r in info["candidates"]}
    fitted = [r for r in info["candidates"] if r["family"] == "class_subsets"]
    shares = [r for r in info["candidates"] if r["family"] == "class_counts"]
    assert len(fitted) == 2 and len(shares) == 2  # m = 2, 3
    assert all(r["options"]["cross_fitted"] and r["samples"] == search.n_triv for r in fitted)
    # the out-of-fold objective recomputed: the procedure fitted on one half, scored on the other
    n_a = search.n_fit_triv
    full = [r for r in fitted if len(r["options"]["members"]) == 3][0]
    z, y = search.z_triv, search.y_triv
    w_on_b = fit_class_weights(z[:, n_a:], y[n_a:])
    w_on_a = fit_class_weights(z[:, :n_a], y[:n_a])

    def logits(zz: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(torch.log_softmax(zz, -1) + torch.log(w)[:, None, :], 0)

    oof = torch.cat([logits(z[:, :n_a], w_on_b), logits(z[:, n_a:], w_on_a)])
    err = float((oof.argmax(-1) != y).double().mean())
    assert abs(full["objective"] - err) < 1e-12
    assert full["holdout_objective"] == pytest.approx(float((oof[n_a:].argmax(-1) != y[n_a:]).double().mean()))
    # the class-share candidate uses the counts, no calibration data
    share_full = [r for r in shares if len(r["options"]["members"]) == 3][0]
    w = class_weights_from_counts(counts)
    want = float((logits(z, w).argmax(-1) != y).double().mean())
    assert share_full["objective"] == pytest.approx(want)
    # these members are experts on their classes: the class-weighted models beat every plain sub-ensemble
    plain = min(r["objective"] for r in rows.values() if r["family"] == "subsets")
    assert share_full["objective"] < plain
    assert model.fusion_info["method"] in ("class-weighted sub-ensemble", "class-share sub-ensemble")
    assert isinstance(model, SubEnsemble) and model.class_weights is not None
    if info["margin_test"] is not None:
        assert info["margin_test"]["samples"] == search.n_triv


def test_class_counts_with_the_wrong_shape_raise():
    members, data, counts = _calib()
    with pytest.raises(ValueError, match="class_counts must have one row per member"):
        budget_search(members, data, candidates=["members", "class_counts"], class_counts=counts[:2])
    with pytest.raises(ValueError, match="class_counts must have one column per class"):
        budget_search(members, data, candidates=["members", "class_counts"], class_counts=counts[:, :3])
