"""fuse(budget=...): cost within the budget, the choice, errors, the CLI; partial_fit; fused subsets; SubEnsemble."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _trained import trained_mlps
from torch import nn

import pyfusion
from pyfusion.fuse import BudgetError, Flops, budget_search
from pyfusion.fuse.subsets import fuse_subsets, similar_groups
from pyfusion.models import mlp, vgg
from pyfusion.nn import SubEnsemble
from pyfusion.testing import permuted_copy, randomize_batchnorm


def _trained_mlps(k: int, seed: int = 0, sizes=(8, 16, 16, 3)) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    return trained_mlps(k, seed, sizes)


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int = 40) -> list:
    return [x[s : s + size] if y is None else (x[s : s + size], y[s : s + size]) for s in range(0, x.shape[0], size)]


def _vggs(k: int) -> tuple[list[nn.Module], torch.Tensor]:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        m = vgg(widths=[4, "M", 8, "M"], in_channels=1, num_classes=3, image_size=8, hidden=8)
        randomize_batchnorm(m)
        members.append(m.eval())
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return members, x


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    return int(pyfusion.cost(model, x[:1]).flops)


# fast settings for the tests: few cluster restarts
FAST = {"cluster_restarts": 2}
# the conv test searches the families whose cost depends on the budget (plus members / sub-ensembles): the cluster
# bisection on a conv model takes ~1 min on the loaded 2-core VM, and its cost rule is the MLP test's
CONV = ["members", "subsets", "partial", "partial_fit", "prune"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The searches run many small fusions: one thread (two threads on the shared 2-core VM were 3-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp3():
    members, x, y = _trained_mlps(3)
    search = budget_search(members, _batches(x, y), **FAST)
    return members, x, y, search


def test_cost_within_budget_three_members(mlp3):
    members, x, _, search = mlp3
    ens = sum(_flops(m, x) for m in members)
    for b in (0.2, 0.5, 1.0):
        model = search.choose(b)
        info = model.fusion_info["budget"]
        assert _flops(model, x) <= b * ens
        assert info["chosen_flops"] == _flops(model, x)
        assert info["ensemble_flops"] == ens
        # every candidate marked feasible fits, every other one does not
        for row in info["candidates"]:
            assert row["feasible"] == (row["flops"] <= b * ens)


def test_cluster_fit_candidates_share_the_cluster_width_and_the_best_member_is_clustered_alone():
    members, x, y = _trained_mlps(2, seed=5)
    search = budget_search(members, _batches(x, y), candidates=["members", "cluster", "cluster_fit"],
                           objective="ensemble", **FAST)  # fmt: skip
    info = search.choose(0.4).fusion_info["budget"]
    rows = {r["name"]: r for r in info["candidates"]}
    plain = next(r for r in rows.values() if r["family"] == "cluster")
    fitted = [r for r in rows.values() if r["family"] == "cluster_fit" and "of member" not in r["name"]]
    assert {r["options"]["output_target"] for r in fitted} == {"logits", "probs"}
    for r in fitted:  # the same clustering, fitted: the same layout and cost
        assert r["flops"] == plain["flops"] and r["name"].startswith(plain["name"].replace("cluster", "cluster_fit"))
    # below one member's cost: the member with the lowest objective on every calibration sample, clustered alone
    best = min(range(2), key=lambda i: (search._score_trivial(search.z_triv[i]), i))
    alone = [r for r in rows.values() if r["name"].endswith(f"of member {best}")]
    assert len(alone) == 1 and alone[0]["options"]["members"] == [best] and alone[0]["feasible"]
    assert info["chosen_flops"] <= 0.4 * info["ensemble_flops"]
    # above it, no single-member candidate
    rows1 = search.choose(0.75).fusion_info["budget"]["candidates"]
    assert not any("of member" in r["name"] for r in rows1)


def test_cost_within_budget_conv_model():
    members, x = _vggs(2)
    ens = sum(_flops(m, x) for m in members)
    for b in (0.3, 0.6):
        model = pyfusion.fuse(members, _batches(x, None, 16), budget=b, candidates=CONV, **FAST)
        assert _flops(model, x) <= b * ens
        assert model.fusion_info["budget"]["objective"] == "ensemble"  # no labels: distance to the ensemble


def test_chosen_has_the_best_objective_among_feasible(mlp3):
    _, _, _, search = mlp3
    for b in (0.5, 0.8):
        info = search.choose(b).fusion_info["budget"]
        feasible = [r for r in info["candidates"] if r["feasible"]]
        assert len(feasible) >= 3
        # lowest in its group (trivial: on every calibration sample; fused: held out), and lowest of the two
        # groups' winners on the held-out samples
        group = [r for r in feasible if (r["family"] in ("members", "subsets")) == (info["chosen_family"] in
                 ("members", "subsets"))]  # fmt: skip
        best = min(r["objective"] for r in group)
        assert info["chosen_objective"] == best
        assert info["chosen"] in [r["name"] for r in group if r["objective"] == best]
        assert info["chosen_holdout_objective"] <= info["best_trivial"]["holdout_objective"]
        assert info["fusions"] > 0 and info["time_s"] > 0
        assert "lowest error" in info["reason"] and info["objective"] == "error"  # the default with labels


def test_chosen_objective_recomputed_on_its_samples(mlp3):
    members, _, _, search = mlp3
    model = search.choose(1.0)
    info = model.fusion_info["budget"]
    # trivial candidates (members, sub-ensembles) are scored on every calibration sample, fused ones on the
    # held-out ones
    trivial = info["chosen_family"] in ("members", "subsets")
    x, y = (search.x_triv, search.y_triv) if trivial else (search.x_hold, search.y_hold)
    assert x.shape[0] == (info["trivial_samples"] if trivial else info["holdout_samples"])
    with torch.no_grad():
        z = model(x).double()
        ens = sum(m(search.x_triv).double() for m in members) / len(members)
    assert info["objective"] == "error"
    got = float((z.argmax(1) != y).double().mean())
    ens_err = float((ens.argmax(1) != search.y_triv).double().mean())
    if info["chosen_family"] == "class_subsets":  # cross-fitted: scored out of fold on every sample, refitted on all
        assert info["chosen_all_objective"] == info["chosen_objective"]
        assert {r["name"]: r for r in info["candidates"]}[info["chosen"]]["samples"] == search.n_triv
    else:
        assert got == pytest.approx(info["chosen_objective"], rel=1e-9, abs=1e-12)
    # budget = 1: the ensemble is a candidate, so the choice is at least as good on the objective
    assert info["chosen_objective"] <= ens_err + 1e-12
    rows = {r["name"]: r for r in info["candidates"]}
    assert rows["ensemble [0, 1, 2] (logits)"]["objective"] == pytest.approx(ens_err, rel=1e-9, abs=1e-12)
    assert rows["ensemble [0, 1, 2] (logits)"]["samples"] == search.n_fit + search.n_hold


def test_budget_one_without_labels_is_at_least_the_ensemble():
    members, x, _ = _trained_mlps(2, seed=3)
    model = pyfusion.fuse(members, _batches(x, None), budget=1.0, candidates=["subsets", "partial", "members"])
    info = model.fusion_info["budget"]
    ens_row = next(r for r in info["candidates"] if r["name"].startswith("ensemble") and "logits" in r["name"])
    assert ens_row["objective"] == 0.0  # the ensemble is its own target
    assert info["chosen_objective"] == 0.0


def test_absolute_budgets_agree_with_the_fraction(mlp3):
    members, x, _, search = mlp3
    ens = sum(_flops(m, x) for m in members)
    by_fraction = search.choose(0.5).fusion_info["budget"]
    for budget in (Flops(0.5 * ens), 0.5 * ens):
        info = search.choose(budget).fusion_info["budget"]
        assert info["budget_flops"] == pytest.approx(0.5 * ens)
        assert info["chosen"] == by_fraction["chosen"]
        assert info["chosen_flops"] <= 0.5 * ens
    assert "absolute" in search.choose(Flops(0.5 * ens)).fusion_info["budget"]["read_as"]


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), "0.5", True, [0.5]])
def test_invalid_budgets_raise(mlp3, bad):
    _, _, _, search = mlp3
    with pytest.raises(BudgetError, match="budget"):
        search.choose(bad)


def test_budget_below_the_cheapest_candidate_names_it(mlp3):
    _, _, _, search = mlp3
    with pytest.raises(BudgetError, match=r"below the cheapest candidate, .* at [\d,]+ FLOPs per sample") as err:
        search.choose(Flops(10))
    name, flops = err.value.cheapest
    assert flops > 10 and name in str(err.value)
    with pytest.raises(ValueError, match="Flops"):
        Flops(0)


def test_budget_needs_data_and_enough_samples():
    members, x, y = _trained_mlps(2)
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse(members, None, budget=0.5)
    with pytest.raises(ValueError, match="at least 2 of each"):
        pyfusion.fuse(members, [x[:3]], budget=0.5)
    with pytest.raises(ValueError, match="takes no method options"):
        pyfusion.fuse(members, _batches(x, y), budget=0.5, alpha=0.3)
    with pytest.raises(ValueError, match="objective must be one of"):
        pyfusion.fuse(members, _batches(x, y), budget=0.5, objective="accuracy")
    with pytest.raises(ValueError, match="needs integer labels"):
        pyfusion.fuse(members, _batches(x, None), budget=0.5, objective="error")


def test_method_restricts_the_search_to_partial():
    members, x, y = _trained_mlps(2)
    ens = sum(_flops(m, x) for m in members)
    model = pyfusion.fuse(members, _batches(x, y), budget=0.75, method="partial", point="pre")
    info = model.fusion_info["budget"]
    assert {r["family"] for r in info["candidates"]} == {"partial"}
    assert info["chosen_family"] == "partial"
    assert _flops(model, x) <= 0.75 * ens
    # the bisection found the largest alpha on the grid that fits: the next grid step does not
    alpha = model.fusion_info["alpha"]
    a = next(iter(alpha.values()))
    if a < 1:
        nxt = pyfusion.fuse(members, _batches(x, y), method="partial", alpha=a + 1 / 32, point="pre")
        assert _flops(nxt, x) > 0.75 * ens


def test_cli_fuse_budget_round_trip(tmp_path, capsys):
    from safetensors.torch import save_file

    from pyfusion.cli import main

    sizes = [64, 32, 32, 10]
    files = []
    for k in range(2):
        torch.manual_seed(200 + k)
        path = tmp_path / f"m{k}.safetensors"
        save_file({n: t.contiguous() for n, t in mlp(sizes).state_dict().items()}, str(path))
        files.append(str(path))
    target = tmp_path / "budget.safetensors"
    code = main(["fuse", *files, "--model", f"pyfusion.models:mlp(sizes={sizes})", "--data", "digits",
                 "--budget", "0.5", "-o", str(target), "--calib-samples", "64", "--eval-samples", "64",
                 "--repeats", "1", "--latency-batch", "8", "-q"])  # fmt: skip
    assert code == 0
    fused = pyfusion.load(target)
    example = torch.zeros(1, 1, 8, 8)
    one = pyfusion.cost(mlp(sizes), example).flops
    assert pyfusion.cost(fused, example).flops <= 0.5 * 2 * one
    assert main(["fuse", *files, "--model", f"pyfusion.models:mlp(sizes={sizes})", "--data", "digits",
                 "--budget", "0", "-o", str(target)]) == 2  # fmt: skip
    assert "argument --budget: must be a finite number > 0; got '0'" in capsys.readouterr().err
    assert main(["fuse", *files, "--model", f"pyfusion.models:mlp(sizes={sizes})", "--data", "digits",
                 "-o", str(target), "-q"]) == 2  # fmt: skip


# ----------------------------------------------------------------------------------------------- partial_fit


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_partial_fit_of_a_member_and_its_permuted_copy_is_the_member(alpha):
    torch.manual_seed(0)
    m = mlp([10, 12, 12, 4]).eval()
    x = torch.randn(64, 10)
    copies = [m, permuted_copy(m), permuted_copy(m)]
    fused = pyfusion.fuse(copies, _batches(x, None, 32), method="partial_fit", alpha=alpha)
    with torch.no_grad():  # float32 least squares per member-mask row set (K = 3): a wrong map is O(1) off
        torch.testing.assert_close(fused(x), m(x), rtol=1e-3, atol=2e-4)
    assert fused.fusion_info["fit"]["fitted"]


def test_partial_fit_on_token_inputs_permuted_copy_is_the_member():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 5, 6)  # (N, T, features): the Linear layers act on the last dim
    fused = pyfusion.fuse([m, permuted_copy(m, example_inputs=x[:2])], [x[:8], x[8:]], method="partial_fit",
                          alpha=0.5)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-5)


def test_partial_fit_conv_batchnorm_permuted_copy_and_cost():
    members, x = _vggs(1)
    m = members[0]
    data = _batches(x, None, 16)
    fused = pyfusion.fuse([m, permuted_copy(m)], data, method="partial_fit", alpha=0.5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-5)
    # the fit keeps the layout: the cost of partial fusion at the same alpha
    two, _ = _vggs(2)
    fit = pyfusion.fuse(two, data, method="partial_fit", alpha=0.5)
    plain = pyfusion.fuse(two, data, method="partial", alpha=0.5)
    assert _flops(fit, x) == _flops(plain, x)


@pytest.mark.parametrize("method", ["partial_fit", "cluster_fit"])
def test_fit_of_a_cat_model_and_its_permuted_copy_is_the_member_and_fits_every_segment(method):
    """CatNet: ``torch.cat`` of two layers feeds a layer whose output rows are split across two groups (offsets 0 and
    8 of its axis), an in-place ReLU follows a fitted layer, ``out += h`` changes another in place. Each segment's
    shared rows are fitted (none skipped), to the values the layers produced (not the in-place-changed ones)."""
    from _ir_models import CatNet

    torch.manual_seed(0)
    m = CatNet().double().eval()
    x = torch.randn(8, 5, 6, dtype=torch.float64)
    data = [torch.randn(16, 5, 6, dtype=torch.float64)]
    twin = permuted_copy(m, torch.Generator().manual_seed(1), example_inputs=x)
    fused = pyfusion.fuse([m, twin], data, method=method, alpha=0.0)
    fit = fused.fusion_info["fit"]
    assert fit["skipped"] == {}
    assert fit["fitted"]["c"] == 12  # both segments' rows: 8 of group g0:a, 4 of g1:b
    assert {"a", "b", "d", "head"} <= set(fit["fitted"])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["partial_fit", "cluster_fit"])
def test_fit_of_a_torchvision_style_resnet_and_its_permuted_copy_is_the_member(method):
    """``out += identity`` changes the second BatchNorm's output in place, and in-place ReLUs follow the others."""
    from _ir_models import TorchvisionResNet

    torch.manual_seed(2)
    m = randomize_batchnorm(TorchvisionResNet().double()).eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    data = [torch.randn(12, 3, 8, 8, dtype=torch.float64)]
    twin = permuted_copy(m, torch.Generator().manual_seed(4), example_inputs=x)
    fused = pyfusion.fuse([m, twin], data, method=method, alpha=0.0, reset_bn=False)
    assert len(fused.fusion_info["fit"]["fitted"]) >= 5
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-9, atol=1e-9)


def test_partial_fit_is_the_same_with_an_in_place_relu():
    """The fit reads each layer's output: ``nn.ReLU(inplace=True)`` after it must not change what it reads."""
    members, x, _ = _trained_mlps(2, seed=1)
    data = _batches(x, None)
    inplace = []
    for m in members:
        c = copy.deepcopy(m)
        for i, layer in enumerate(c):
            if isinstance(layer, nn.ReLU):
                c[i] = nn.ReLU(inplace=True)
        inplace.append(c)
    assert any(isinstance(layer, nn.ReLU) for layer in members[0])
    a = pyfusion.fuse(members, data, method="partial_fit", alpha=0.25)
    b = pyfusion.fuse(inplace, data, method="partial_fit", alpha=0.25)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)


def test_partial_fit_reduces_the_distance_to_the_targets():
    members, x, y = _trained_mlps(2, seed=1)
    data = _batches(x, None)
    ens = sum(m(x) for m in members) / 2
    plain = pyfusion.fuse(members, data, method="partial", alpha=0.0)
    fit = pyfusion.fuse(members, data, method="partial_fit", alpha=0.0)
    with torch.no_grad():
        d_plain = float(((plain(x) - ens) ** 2).mean())
        d_fit = float(((fit(x) - ens) ** 2).mean())
    assert d_fit < d_plain
    # ridge -> infinity is plain partial fusion
    big = pyfusion.fuse(members, data, method="partial_fit", alpha=0.0, ridge=1e12)
    with torch.no_grad():
        torch.testing.assert_close(big(x), plain(x), rtol=1e-4, atol=1e-5)


def test_partial_fit_probs_target_fits_the_probability_ensemble():
    members, x, _ = _trained_mlps(2, seed=4)
    data = _batches(x, None)
    with torch.no_grad():
        target = torch.log(sum(torch.softmax(m(x).double(), 1) for m in members) / 2)
        logit_fit = pyfusion.fuse(members, data, method="partial_fit", alpha=1.0)
        prob_fit = pyfusion.fuse(members, data, method="partial_fit", alpha=1.0, output_target="probs")
        ens = sum(m(x) for m in members) / 2
        torch.testing.assert_close(logit_fit(x), ens, rtol=1e-4, atol=1e-5)  # alpha = 1, logits: the ensemble
        d_logits = float(((torch.log_softmax(logit_fit(x).double(), 1) - target) ** 2).mean())
        d_probs = float(((torch.log_softmax(prob_fit(x).double(), 1) - target) ** 2).mean())
    assert d_probs < d_logits
    with pytest.raises(ValueError, match="output_target"):
        pyfusion.fuse(members, data, method="partial_fit", output_target="mean")


# ----------------------------------------------------------------------------------------------- subsets


def test_fused_subsets_at_alpha_one_are_the_ensemble():
    members, x, _ = _trained_mlps(4, seed=2)
    model = fuse_subsets(members, _batches(x, None), [[0, 2], [1, 3]], method="partial", alpha=1.0)
    with torch.no_grad():
        ens = sum(m(x) for m in members) / 4
        torch.testing.assert_close(model(x), ens, rtol=1e-5, atol=1e-5)
    assert model.fusion_info["groups"] == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="partition"):
        fuse_subsets(members, _batches(x, None), [[0, 1], [1, 2, 3]])


def test_similar_groups_pairs_the_closest_members():
    z = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.1, 0.0], [10.0, 10.2]])[:, None, :]
    assert similar_groups(z, 2) == [[0, 2], [1, 3]]
    assert similar_groups(z, 3) == [[0, 1, 2], [3]]  # (0, 2) first, then 1 (closer to both than 3 on average)
    assert sorted(i for g in similar_groups(z, 3) for i in g) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------- SubEnsemble


def test_sub_ensemble_formulas_and_serialization(tmp_path):
    members, x, _ = _trained_mlps(3)
    w = [0.2, 0.3, 0.5]
    with torch.no_grad():
        logits = SubEnsemble(members, w)(x)
        want = sum(wi * m(x).double() for wi, m in zip(w, members))
        torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-6)
        probs = SubEnsemble(members, w, "probs")
        want_p = sum(wi * torch.softmax(m(x).double(), -1) for wi, m in zip(w, members))
        torch.testing.assert_close(probs(x).double().exp(), want_p, rtol=1e-5, atol=1e-6)
    path = tmp_path / "se.safetensors"
    pyfusion.save(probs, path)
    back = pyfusion.load(path)
    with torch.no_grad():
        torch.testing.assert_close(back(x), probs(x))
    assert pyfusion.cost(back, x[:1]).flops == sum(_flops(m, x) for m in members)
    with pytest.raises(ValueError, match="sum to 1"):
        SubEnsemble(members, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="combine"):
        SubEnsemble(members, None, "mean")
    assert math.isclose(float(SubEnsemble(members).weights.sum()), 1.0, rel_tol=1e-6)
