"""Neuron-interpolation fusion (hf, kf, kf_gradient), core: least squares and the Gram-based cost against float64
brute force (papers.md B.3), the end-to-end HF layer against scipy (K = 2 and the K = 3 reference rule), the level
runner against the model, one-hot lambdas, K = 3 / 4 determinism, kf_gradient training, plans, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

import pyfusion
from pyfusion.fuse.interp import interp_levels, ls_statistics, solve_ls
from pyfusion.fuse.interp.grouping import align_to_reference
from pyfusion.fuse.interp.program import Runner, model_state
from pyfusion.graph import NeuronGroup, declare_groups, trace_groups
from pyfusion.match.importance import neuron_importance
from pyfusion.match.interp import hf_pair_cost
from pyfusion.models import mlp, resnet20, vgg
from pyfusion.ops import hf_cost, interp_cost
from pyfusion.ops.reference import hf_cost_ref
from pyfusion.testing import permuted_copy


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.normal_()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp([20, 16, 12, 5]).eval()


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    m = vgg((4, "M", 6), in_channels=1, num_classes=5, image_size=8, hidden=10).eval()
    _randomise_bn(m)
    return m


def _data(shape: tuple[int, ...], n: int = 160, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return [(x[i : i + 40], y[i : i + 40]) for i in range(0, n, 40)]


def _unfolded(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    x = F.unfold(u, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ls_weights_equal_brute_force_least_squares(dtype):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    u = torch.randn(11, 3, 7, 7)
    targets = [torch.randn(11, 5, 4, 4), torch.randn(11, 5, 4, 4)]
    conv_args = (conv.stride, conv.padding, conv.dilation)
    g, cs, ns = ls_statistics("conv2d", conv.weight.shape, u, targets, bias=True, conv=conv_args, chunk=3,
                              dtype=dtype)  # fmt: skip
    ws, rel = solve_ls(g, cs, ridge=0.0)
    assert rel == 0.0
    x = _unfolded(conv, u)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for t, w, n in zip(targets, ws, ns):
        a = t.flatten(2).transpose(1, 2).reshape(-1, 5).double()
        ref = torch.linalg.lstsq(x, a, driver="gelsd").solution
        torch.testing.assert_close(w, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(n, (a * a).sum(0), rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    gref = x.T @ x
    scale = float(gref.abs().max())  # float32 products: an error relative to the largest entry
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=1e-12 * scale if dtype == torch.float64 else 1e-6 * scale)
    # Linear producer, and a singular design (a zero column) needing the ridge fallback
    lin = nn.Linear(6, 4)
    u = torch.randn(30, 6)
    u[:, 2] = 0
    t = [torch.randn(30, 4)]
    g, cs, _ = ls_statistics("linear", lin.weight.shape, u, t, bias=True, dtype=dtype)
    (w,), rel = solve_ls(g, cs, ridge=0.0)
    assert rel > 0
    x = torch.cat([u.double(), torch.ones(30, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(x, t[0].double(), driver="gelsd").solution  # minimum-norm solution
    torch.testing.assert_close(x @ w, x @ ref, rtol=1e-5, atol=1e-5)


def test_ls_with_a_prior_equals_the_augmented_least_squares():
    """``solve_ls(priors=[W0])`` is ``argmin ||X W - T||^2 + r ||W - W0||^2`` (the float64 least squares of the
    stacked system ``[X; sqrt(r) I] W = [T; sqrt(r) W0]``), also where r had to grow; an underdetermined design
    (fewer rows than columns) with targets ``X W0`` gives back exactly ``W0`` (a ridge toward 0 does not); a singular
    G with ``ridge=0`` grows r and stays the same formula."""
    gen = torch.Generator().manual_seed(3)
    for rows, ridge in ((40, 1e-3), (6, 1e-2), (6, 1e-8)):
        x = torch.randn(rows, 9, dtype=torch.float64, generator=gen)
        t = torch.randn(rows, 4, dtype=torch.float64, generator=gen)
        w0 = torch.randn(9, 4, dtype=torch.float64, generator=gen)
        g = x.T @ x
        (w,), rel = solve_ls(g, [x.T @ t], ridge=ridge, priors=[w0])
        assert rel == ridge
        r = rel * float(torch.diagonal(g).mean())
        stacked = torch.cat([x, r**0.5 * torch.eye(9, dtype=torch.float64)])
        ref = torch.linalg.lstsq(stacked, torch.cat([t, r**0.5 * w0]), driver="gelsd").solution
        torch.testing.assert_close(w, ref, rtol=1e-7, atol=1e-7)
        (exact,), _ = solve_ls(g, [x.T @ (x @ w0)], ridge=max(ridge, 1e-6), priors=[w0])
        torch.testing.assert_close(exact, w0, rtol=1e-9, atol=1e-9)
        if rows < 9:  # the plain ridge loses W0's null-space part: the fit differs off the calibration rows
            (plain,), _ = solve_ls(g, [x.T @ (x @ w0)], ridge=max(ridge, 1e-6))
            assert float((plain - w0).abs().max()) > 1e-2
    x = torch.randn(40, 9, dtype=torch.float64, generator=gen)
    xz = torch.cat([x, torch.zeros(40, 1, dtype=torch.float64)], 1)  # an exactly zero column: G is singular
    w0z = torch.cat([w0, torch.randn(1, 4, dtype=torch.float64, generator=gen)])
    gz = xz.T @ xz
    (wz,), rel = solve_ls(gz, [xz.T @ (xz @ w0z)], ridge=0.0, priors=[w0z])
    assert rel > 0
    torch.testing.assert_close(wz, w0z, rtol=1e-9, atol=1e-9)
    g, t = x.T @ x, torch.randn(40, 4, dtype=torch.float64, generator=gen)
    (none,), _ = solve_ls(g, [x.T @ t], ridge=1e-3, priors=[None])
    (plain,), _ = solve_ls(g, [x.T @ t], ridge=1e-3)
    assert torch.equal(none, plain)
    with pytest.raises(ValueError, match="prior"):
        solve_ls(g, [x.T @ t], priors=[w0[:3]])
    with pytest.raises(ValueError, match="priors"):
        solve_ls(g, [x.T @ t], priors=[w0, w0])


@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
def test_gram_cost_equals_per_pair_definition(cost):
    """cost_ij = s0_i ||p_ij - a0_i|| + s1_j ||p_ij - a1_j||, p_ij = X (s0_i w0_i + s1_j w1_j) / (s0_i + s1_j),
    with every prediction materialised (the authors' loop); any W, exact LS or not."""
    rng = np.random.default_rng(0)
    m, p, n0, n1 = 50, 7, 6, 5
    x = torch.as_tensor(rng.standard_normal((m, p)))
    a0 = torch.as_tensor(rng.standard_normal((m, n0)))
    a1 = torch.as_tensor(rng.standard_normal((m, n1)))
    s0 = torch.as_tensor(rng.uniform(0.1, 2, n0))
    s1 = torch.as_tensor(rng.uniform(0.1, 2, n1))
    for exact in (True, False):
        if exact:
            w0 = torch.linalg.lstsq(x, a0).solution
            w1 = torch.linalg.lstsq(x, a1).solution
        else:
            w0 = torch.as_tensor(rng.standard_normal((p, n0)))
            w1 = torch.as_tensor(rng.standard_normal((p, n1)))
        ref = torch.empty(n0, n1, dtype=torch.float64)
        for i in range(n0):
            for j in range(n1):
                pij = x @ (s0[i] * w0[:, i] + s1[j] * w1[:, j]) / (s0[i] + s1[j])
                d0, d1 = (pij - a0[:, i]).square().sum(), (pij - a1[:, j]).square().sum()
                ref[i, j] = s0[i] * d0 + s1[j] * d1 if cost == "sqeuclidean" else s0[i] * d0.sqrt() + s1[j] * d1.sqrt()
        g = x.T @ x
        got = hf_pair_cost(g, [x.T @ a0, x.T @ a1], [(a0 * a0).sum(0), (a1 * a1).sum(0)], [w0, w1], s0, s1, cost)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_hf_cost_backends_agree(monkeypatch):
    rng = np.random.default_rng(1)
    n0, n1 = 33, 70
    mats = [torch.as_tensor(rng.standard_normal((n0, n1))) for _ in range(3)]
    v0 = [torch.as_tensor(rng.uniform(1, 3, n0)) for _ in range(4)]
    v1 = [torch.as_tensor(rng.uniform(1, 3, n1)) for _ in range(4)]
    v0[0] += 10
    v1[0] += 10  # keep most squared distances positive (negative ones clamp to 0 in both)
    for squared in (False, True):
        ref = hf_cost_ref(*mats, *v0, *v1, squared=squared)
        monkeypatch.setenv("PYFUSION_BACKEND", "hf_cost:cpp")
        torch.testing.assert_close(hf_cost(*mats, *v0, *v1, squared=squared), ref, rtol=1e-13, atol=1e-12)
        monkeypatch.setenv("PYFUSION_BACKEND", "hf_cost:reference")
        torch.testing.assert_close(hf_cost(*mats, *v0, *v1, squared=squared), ref, rtol=0, atol=0)
    monkeypatch.delenv("PYFUSION_BACKEND")
    with pytest.raises(ValueError, match="Q01 must have shape"):
        hf_cost(mats[0], mats[1][:, :5], mats[2], *v0, *v1)
    with pytest.raises(ValueError, match="s1 must have shape"):
        hf_cost(*mats, *v0, *v1[:3], v1[3][:4])
    bad = v0[3].clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="importance"):
        hf_cost(*mats, *v0[:3], bad, *v1)
    nan = mats[0].clone()
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match="M contains NaN"):
        hf_cost(nan, *mats[1:], *v0, *v1)
    torch.library.opcheck(interp_cost.OP.op().default, ([m for m in mats], v0 + v1, False))


@pytest.mark.gpu
def test_hf_cost_cuda_matches_reference():
    rng = np.random.default_rng(2)
    mats = [torch.as_tensor(rng.standard_normal((40, 300))) for _ in range(3)]
    vecs = [torch.as_tensor(rng.uniform(1, 3, 40)) for _ in range(4)] + [
        torch.as_tensor(rng.uniform(1, 3, 300)) for _ in range(4)
    ]
    ref = hf_cost_ref(*mats, *vecs)
    got = hf_cost(*[t.cuda() for t in mats], *[t.cuda() for t in vecs])
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)


def _first_layer_reference(members, x, y, importance):
    """Brute force of the first hf layer: lstsq weights of every member, L2 pair costs of member 0 against each
    other member (scipy assignment), importance-weighted means of the matched tuples."""
    lam = 1.0 / len(members)
    s = [lam * neuron_importance(m, [(x, y)], ["1"], method=importance)["1"] for m in members]
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    with torch.no_grad():
        a = [m[1](x).double() for m in members]
    w = [torch.linalg.lstsq(xd, t).solution for t in a]
    n = w[0].shape[1]
    partners = [np.arange(n)]
    for k in range(1, len(members)):
        cost = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                pij = xd @ (s[0][i] * w[0][:, i] + s[k][j] * w[k][:, j]) / (s[0][i] + s[k][j])
                cost[i, j] = s[0][i] * (pij - a[0][:, i]).norm() + s[k][j] * (pij - a[k][:, j]).norm()
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        partners.append(cols[np.argsort(rows)])

    def fused_column(i: int) -> torch.Tensor:
        num = sum(s[k][p[i]] * w[k][:, p[i]] for k, p in enumerate(partners))
        return num / sum(s[k][p[i]] for k, p in enumerate(partners))

    wf = torch.stack([fused_column(i) for i in range(n)])
    return wf, partners


@pytest.mark.parametrize("k", [2, 3])
def test_hf_first_layer_end_to_end_against_scipy(k):
    """K = 2: the paper's HF layer exactly; K = 3: every member aligned to member 0 by the same pair cost, the
    matched triples averaged with their importance (the K = 2 rule applied member by member)."""
    torch.manual_seed(5)
    members = [mlp([8, 6, 3]).eval() for _ in range(k)]
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    fused = pyfusion.fuse(members, [(x, y)], method="hf", ridge=0.0, importance="conductance")
    wf, partners = _first_layer_reference(members, x, y, "conductance")
    torch.testing.assert_close(fused[1].weight.detach().double(), wf[:, :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1].bias.detach().double(), wf[:, 8], rtol=1e-4, atol=1e-5)
    gp = fused.fusion_plan.groups[next(iter(fused.fusion_plan.groups))]
    for j in range(1, k):  # member j's neuron partners[j][i] sits in slot i
        assert torch.equal(gp.B[j].argmax(1)[torch.as_tensor(partners[j])], torch.arange(6))


def test_reference_alignment_of_units_matches_brute_force():
    """Heads: the unit cost is the cheapest inner matching; the unit assignment over all 3! x (2!)^3 choices."""
    import itertools

    g = NeuronGroup("h", 6, unit_size=2)
    c = torch.rand(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels, totals = align_to_reference([{"h": c}], [g])
    best = None
    for up in itertools.permutations(range(3)):
        for inner in itertools.product(itertools.permutations(range(2)), repeat=3):
            lab = torch.empty(6, dtype=torch.long)
            tot = 0.0
            for s, u in enumerate(up):
                for d in range(2):
                    j = u * 2 + inner[s][d]
                    lab[j] = s * 2 + d
                    tot += float(c[s * 2 + d, j])
            if best is None or tot < best[0] - 1e-12:
                best = (tot, lab)
    assert abs(totals[0] - best[0]) < 1e-12
    assert torch.equal(labels["h"][1], best[1])
    assert torch.equal(labels["h"][0], torch.arange(6))


def test_runner_matches_the_model_and_pads_chunks():
    torch.manual_seed(2)
    model = resnet20(num_classes=5, in_channels=1, blocks=1).eval()
    _randomise_bn(model)
    x = torch.randn(13, 1, 8, 8)
    graph = trace_groups(model, x[:5])
    lv = interp_levels(model, graph)
    r = Runner(lv.program, model_state(model), [x], 5, lambda b: ((x[torch.arange(b) % 13],), {}))
    mid = lv.levels[2].end
    r.advance(mid)
    assert set(r.env) <= lv.program.frontier(mid) | {lv.program.nodes[mid].name}
    r.advance(len(lv.program.nodes) - 2)
    with torch.no_grad():
        torch.testing.assert_close(r.value(lv.program.logits), model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="backwards"):
        r.advance(mid)


def test_one_hot_lambda_reproduces_that_member():
    """lambda = (1, 0): the fused layers are member 0's least-squares weights, i.e. member 0 (DESIGN §8)."""
    torch.manual_seed(11)
    m0, m1 = mlp([20, 16, 12, 5]).eval(), mlp([20, 16, 12, 5]).eval()
    data = _data((20,), n=200)
    x = torch.cat([b[0] for b in data])
    for method in ("hf", "kf"):
        fused = pyfusion.fuse([m0, m1], data, method=method, lambdas=(1.0, 0.0), ridge=1e-12, stats_dtype="float64")
        with torch.no_grad():
            ref = m0(x)
            torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("k", [4])  # K = 3 on every family: tests/test_interp_families.py
def test_k_members_deterministic(k):
    members = []
    for i in range(k):
        torch.manual_seed(100 + i)
        members.append(vgg((4, "M", 6), in_channels=1, num_classes=5, image_size=8, hidden=10).eval())
        _randomise_bn(members[-1])
    data = _data((1, 8, 8), n=120)
    x = torch.cat([b[0] for b in data])
    graph = trace_groups(members[0], data[0][0])
    for method in ("hf", "kf", "kf_gradient"):
        opts = {"epochs": 3, "last_epochs": 3, "seed": 7} if method == "kf_gradient" else {"seed": 7}
        a = pyfusion.fuse(members, data, method=method, importance="activation_gradient", **opts)
        b = pyfusion.fuse(members, data, method=method, importance="activation_gradient", **opts)
        for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(ta, tb), (method, na)
        a.fusion_plan.validate(graph)
        if method != "kf_gradient":
            assert len(a.fusion_plan.groups) == len(graph.groups)
        for gp in a.fusion_plan.groups.values():  # every neuron in exactly one slot; slot weights sum to 1
            for bk in gp.B:
                assert torch.equal(bk.sum(1), torch.ones(bk.shape[0], dtype=torch.float64))
            torch.testing.assert_close(sum(ak.sum(1) for ak in gp.A), torch.ones(gp.slots, dtype=torch.float64))
            if method == "hf":  # one neuron of every member per slot
                for ak in gp.A:
                    assert torch.equal((ak > 0).sum(1), torch.ones(gp.slots, dtype=torch.long))
        assert torch.isfinite(a(x)).all()
    info = b.fusion_info["interp_levels"]
    assert len(info) == 4 and all("val_mse" in lv for lv in info)


def test_kf_gradient_trains_to_targets_and_class_weights():
    """Levels are trained to their targets: on a ResNet (levels start from member 0) training the head lowers its
    MSE to the mean logits; per-class weights move the target to the owning member's logits."""
    torch.manual_seed(0)
    res = [resnet20(num_classes=5, in_channels=1, blocks=1).eval() for _ in range(2)]
    data8 = _data((1, 8, 8), n=100)
    x8 = torch.cat([b[0] for b in data8])
    start = pyfusion.fuse(res, data8, method="kf_gradient", epochs=0, last_epochs=0)
    trained = pyfusion.fuse(res, data8, method="kf_gradient", epochs=0, last_epochs=30, lr=3e-3)
    with torch.no_grad():
        target = sum(0.5 * m(x8) for m in res)
        assert F.mse_loss(trained(x8), target) < 0.5 * F.mse_loss(start(x8), target)
        for a, b in zip(model_state(start).values(), model_state(res[0]).values()):  # start: member 0
            assert torch.equal(a, b)
    members = []
    for i in range(2):
        torch.manual_seed(200 + i)
        members.append(mlp([20, 16, 5]).eval())
    data = _data((20,), n=200)
    x = torch.cat([b[0] for b in data])
    shares = torch.tensor([[1.0] * 5, [0.0] * 5])  # member 0 owns every class: target = member 0's logits
    one = pyfusion.fuse(members, data, method="kf_gradient", epochs=0, last_epochs=60, lr=3e-3, class_weights=shares)
    with torch.no_grad():
        assert F.mse_loss(one(x), members[0](x)) < F.mse_loss(one(x), members[1](x))
    with pytest.raises(ValueError, match="class_weights"):
        pyfusion.fuse(members, data, method="kf_gradient", class_weights=torch.ones(3, 5))


def test_kf_gradient_from_kf_improves_a_level_and_keeps_the_rest():
    """level_init='kf': every level starts from the closed form, then training can only lower each level's
    validation MSE (the best state is kept)."""
    torch.manual_seed(3)
    res = [resnet20(num_classes=5, in_channels=1, blocks=1).eval() for _ in range(2)]
    for m in res:
        _randomise_bn(m)
    data = _data((1, 8, 8), n=80)
    kf = pyfusion.fuse(res, data, method="kf", seed=2)
    start = pyfusion.fuse(res, data, method="kf_gradient", level_init="kf", epochs=0, last_epochs=0, seed=2)
    for (k, a), b in zip(model_state(kf).items(), model_state(start).values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    trained = pyfusion.fuse(res, data, method="kf_gradient", level_init="kf", epochs=4, last_epochs=4, seed=2)
    info = trained.fusion_info["interp_levels"]
    start_info = start.fusion_info["interp_levels"]
    assert len(info) == len(interp_levels(res[0], trace_groups(res[0], data[0][0])).levels)
    for lv, lv0 in zip(info, start_info):
        assert lv["val_mse"] <= lv0["val_mse"] + 1e-9


def test_errors_change_nothing():
    model = _mlp()
    members = [model, permuted_copy(model, torch.Generator().manual_seed(1))]
    before = [copy.deepcopy(m.state_dict()) for m in members]
    data = _data((20,))
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse(members, None, method="kf")
    with pytest.raises(ValueError, match="importance must be one of"):
        pyfusion.fuse(members, data, method="hf", importance="deeplift")
    with pytest.raises(ValueError, match="cost must be"):
        pyfusion.fuse(members, data, method="hf", cost="l1")
    with pytest.raises(ValueError, match="ridge"):
        pyfusion.fuse(members, data, method="kf", ridge=-1.0)
    with pytest.raises(ValueError, match="empty"):
        pyfusion.fuse(members, [], method="kf")
    with pytest.raises(ValueError, match="stats_dtype"):
        pyfusion.fuse(members, data, method="kf", stats_dtype="float16")
    declared = declare_groups(
        model, {"h": {"producers": ["1.weight", "1.bias"], "consumers": ["3.weight"]}}, example_inputs=data[0][0]
    )
    with pytest.raises(ValueError, match="exported graph"):
        pyfusion.fuse(members, data, method="hf", graph=declared)
    for m, sd in zip(members, before):
        for key, t in m.state_dict().items():
            assert torch.equal(t, sd[key])


def test_class_balanced_indices():
    from pyfusion.data import class_balanced_indices

    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = class_balanced_indices(y, 4, seed=1)
    assert np.bincount(y.numpy()[idx], minlength=3).tolist() == [4, 3, 4]
    assert len(set(idx.tolist())) == idx.size and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, class_balanced_indices(y, 4, seed=1))
    pool = np.arange(5, 20)
    sub = class_balanced_indices(y, 2, pool=pool)
    assert set(sub.tolist()) <= set(pool.tolist())
    assert np.bincount(y.numpy()[sub], minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="per_class"):
        class_balanced_indices(y, 0)
