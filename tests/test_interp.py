"""Neuron-interpolation fusion (hf, kf, kf_gradient): recovery of permuted copies, least squares and the Gram-based
cost against float64 brute force (papers.md B.3), the end-to-end HF layer against scipy, K = 3 / 4, determinism,
plans, errors."""

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
from pyfusion.graph import trace_groups
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


CASES = [(_mlp, (20,)), (_vgg, (1, 8, 8))]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("method,k", [("hf", 2), ("kf", 2), ("kf", 3)])
def test_permuted_copies_are_recovered(make, shape, method, k):
    model = make()
    members = [model] + [permuted_copy(model, torch.Generator().manual_seed(s)) for s in range(1, k)]
    data = _data(shape)
    x = torch.cat([b[0] for b in data])
    fused = pyfusion.fuse(members, data, method=method, ridge=1e-12)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    plan = fused.fusion_plan
    plan.validate(trace_groups(model))
    for gp in plan.groups.values():  # each slot is one neuron of every member, with weights lambda_k
        for a in gp.A:
            assert torch.equal((a > 0).sum(1), torch.ones(a.shape[0], dtype=torch.long))
        torch.testing.assert_close(sum(a.sum(1) for a in gp.A), torch.ones(gp.slots, dtype=torch.float64))


def _unfolded(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    x = F.unfold(u, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
    x = x.reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)


def test_ls_weights_equal_brute_force_least_squares():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    u = torch.randn(11, 3, 7, 7)
    targets = [torch.randn(11, 5, 4, 4), torch.randn(11, 5, 4, 4)]
    g, cs, ns = ls_statistics(conv, u, targets, chunk=3)
    ws, rel = solve_ls(g, cs, ridge=0.0)
    assert rel == 0.0
    x = _unfolded(conv, u)
    for t, w, n in zip(targets, ws, ns):
        a = t.flatten(2).transpose(1, 2).reshape(-1, 5).double()
        ref = torch.linalg.lstsq(x, a, driver="gelsd").solution
        torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(n, (a * a).sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-10)
    # Linear producer, and a singular design (a zero column) needing the ridge fallback
    lin = nn.Linear(6, 4)
    u = torch.randn(30, 6)
    u[:, 2] = 0
    t = [torch.randn(30, 4)]
    g, cs, _ = ls_statistics(lin, u, t)
    (w,), rel = solve_ls(g, cs, ridge=0.0)
    assert rel > 0
    x = torch.cat([u.double(), torch.ones(30, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(x, t[0].double(), driver="gelsd").solution  # minimum-norm solution
    torch.testing.assert_close(x @ w, x @ ref, rtol=1e-6, atol=1e-6)


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


def test_hf_first_layer_end_to_end_against_scipy():
    """The first fused layer of hf = brute force: lstsq weights, per-pair costs, scipy assignment, weighted mean."""
    torch.manual_seed(5)
    m0, m1 = mlp([8, 6, 3]).eval(), mlp([8, 6, 3]).eval()
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    fused = pyfusion.fuse([m0, m1], [(x, y)], method="hf", ridge=0.0, importance="conductance")
    from pyfusion.match.importance import neuron_importance

    s = [lam * neuron_importance(m, [(x, y)], ["1"], method="conductance")["1"] for lam, m in zip((0.5, 0.5), (m0, m1))]
    xd = torch.cat([x.double(), torch.ones(64, 1, dtype=torch.float64)], 1)
    with torch.no_grad():
        a = [m[1](x).double() for m in (m0, m1)]
    w = [torch.linalg.lstsq(xd, t).solution for t in a]
    cost = np.zeros((6, 6))
    for i in range(6):
        for j in range(6):
            pij = xd @ (s[0][i] * w[0][:, i] + s[1][j] * w[1][:, j]) / (s[0][i] + s[1][j])
            cost[i, j] = s[0][i] * (pij - a[0][:, i]).norm() + s[1][j] * (pij - a[1][:, j]).norm()
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    wf = torch.stack([(s[0][i] * w[0][:, i] + s[1][j] * w[1][:, j]) / (s[0][i] + s[1][j]) for i, j in zip(rows, cols)])
    torch.testing.assert_close(fused[1].weight.detach().double(), wf[:, :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1].bias.detach().double(), wf[:, 8], rtol=1e-4, atol=1e-5)
    gp = fused.fusion_plan.groups[next(iter(fused.fusion_plan.groups))]
    assert torch.equal(gp.B[1].argmax(1)[torch.as_tensor(cols)], torch.as_tensor(rows))


def _trained_members(k: int, make, shape, seed: int = 0) -> list[nn.Module]:
    out = []
    for i in range(k):
        torch.manual_seed(seed + 10 * i)
        m = make()
        out.append(m)
    return out


@pytest.mark.parametrize("k", [3, 4])
def test_kf_and_kf_gradient_k_members_deterministic(k):
    members = []
    for i in range(k):
        torch.manual_seed(100 + i)
        members.append(vgg((4, "M", 6), in_channels=1, num_classes=5, image_size=8, hidden=10).eval())
        _randomise_bn(members[-1])
    data = _data((1, 8, 8), n=120)
    x = torch.cat([b[0] for b in data])
    graph = trace_groups(members[0])
    for method in ("kf", "kf_gradient"):
        opts = {"epochs": 3, "last_epochs": 3, "seed": 7} if method == "kf_gradient" else {"seed": 7}
        a = pyfusion.fuse(members, data, method=method, importance="activation_gradient", **opts)
        b = pyfusion.fuse(members, data, method=method, importance="activation_gradient", **opts)
        for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(ta, tb), na
        a.fusion_plan.validate(graph)
        assert len(a.fusion_plan.groups) == len(graph.groups)
        for gp in a.fusion_plan.groups.values():  # every neuron in exactly one slot; slot weights sum to 1
            for bk in gp.B:
                assert torch.equal(bk.sum(1), torch.ones(gp.slots, dtype=torch.float64))
            torch.testing.assert_close(sum(ak.sum(1) for ak in gp.A), torch.ones(gp.slots, dtype=torch.float64))
        assert torch.isfinite(a(x)).all()
    # kf_gradient never ends worse than its closed-form start on the validation split of each level
    info = b.fusion_info["interp_levels"]
    assert all("val_mse" in lv for lv in info)


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


def test_kf_gradient_resnet_levels_and_permuted_copy():
    torch.manual_seed(0)
    model = resnet20(num_classes=5, in_channels=1, blocks=1).eval()
    _randomise_bn(model)
    for m in model.modules():  # no dead channels: k-means may pool identical all-zero neurons of one member
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.weight.data.uniform_(0.1, 0.3)
            m.bias.data.uniform_(1.0, 2.0)
    graph = trace_groups(model)
    levels = interp_levels(model, graph)
    assert [lv.name for lv in levels] == ["stem", "layer1.0", "layer2.0", "layer3.0", "head"]
    assert all(lv.group is not None for lv in levels[:-1])
    data = _data((1, 8, 8), n=80)
    x = torch.cat([b[0] for b in data])
    twin = permuted_copy(model, torch.Generator().manual_seed(3))
    fused = pyfusion.fuse([model, twin], data, method="kf_gradient", epochs=2, last_epochs=2, seed=1)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    other = resnet20(num_classes=5, in_channels=1, blocks=1).eval()
    a = pyfusion.fuse([model, other], data, method="kf_gradient", epochs=2, last_epochs=2, seed=1)
    b = pyfusion.fuse([model, other], data, method="kf_gradient", epochs=2, last_epochs=2, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_errors_change_nothing():
    model = _mlp()
    members = [
        model,
        permuted_copy(model, torch.Generator().manual_seed(1)),
        permuted_copy(model, torch.Generator().manual_seed(2)),
    ]
    before = [copy.deepcopy(m.state_dict()) for m in members]
    data = _data((20,))
    with pytest.raises(ValueError, match="exactly 2 members"):
        pyfusion.fuse(members, data, method="hf")
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse(members[:2], None, method="kf")
    with pytest.raises(ValueError, match="importance must be one of"):
        pyfusion.fuse(members[:2], data, method="hf", importance="deeplift")
    with pytest.raises(ValueError, match="cost must be"):
        pyfusion.fuse(members[:2], data, method="hf", cost="l1")
    with pytest.raises(ValueError, match="ridge"):
        pyfusion.fuse(members[:2], data, method="kf", ridge=-1.0)
    with pytest.raises(ValueError, match="empty"):
        pyfusion.fuse(members[:2], [], method="kf")
    with pytest.raises(ValueError, match="stats_dtype"):
        pyfusion.fuse(members[:2], data, method="kf", stats_dtype="float16")
    res = resnet20(num_classes=5, in_channels=1, blocks=1)
    with pytest.raises(ValueError, match="residual block"):
        pyfusion.fuse([res, copy.deepcopy(res)], _data((1, 8, 8)), method="kf")
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


@pytest.mark.parametrize("method", ["hf", "kf"])
def test_one_hot_lambda_reproduces_that_member(method):
    """lambda = (1, 0): the fused layers are member 0's least-squares weights, i.e. member 0 (DESIGN §8)."""
    torch.manual_seed(11)
    m0, m1 = mlp([20, 16, 12, 5]).eval(), mlp([20, 16, 12, 5]).eval()
    data = _data((20,), n=200)
    x = torch.cat([b[0] for b in data])
    fused = pyfusion.fuse([m0, m1], data, method=method, lambdas=(1.0, 0.0), ridge=1e-12, stats_dtype="float64")
    with torch.no_grad():
        ref = m0(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
