"""Generalized pruning (method="cluster") and structured pruning (method="prune") through pyfusion.fuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.graph import trace_groups

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mlp(seed, sizes=(8, 12, 12, 4)):
    torch.manual_seed(seed)
    return models.mlp(list(sizes)).double().eval()


def _data(d=8, n=3, bs=40):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(bs, d, generator=g, dtype=torch.float64) for _ in range(n)]


def _vgg(seed):
    torch.manual_seed(seed)
    return models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10).double().eval()


def test_all_singletons_is_the_ensemble_and_duplicates_collapse_exactly():
    a, b = _mlp(0), _mlp(1)
    data = _data()
    x = torch.randn(6, 8, dtype=torch.float64)
    lam = [0.3, 0.7]
    full = pyfusion.fuse([a, b], data, method="cluster", width=24, lambdas=lam, n_restarts=4).eval()
    torch.testing.assert_close(full(x), 0.3 * a(x) + 0.7 * b(x), rtol=0, atol=1e-10)
    # duplicated members: each cluster holds a neuron and its copy; sum-in / mean-out is exact for ReLU
    dup = pyfusion.fuse([a, a], data, method="cluster", width=1.0, n_restarts=20).eval()
    torch.testing.assert_close(dup(x), a(x), rtol=0, atol=1e-10)
    # (dead neurons are identical to each other too, so a cluster may hold two of them from one member)
    assert all(sum(lay) == 12 for lay in dup.fusion_layouts.values())
    assert all(v < 1e-12 for v in dup.fusion_info["inertia"].values())


def test_single_network_and_widths():
    a = _mlp(0)
    data = _data()
    x = torch.randn(6, 8, dtype=torch.float64)
    same = pyfusion.fuse([a], data, method="cluster", width=1.0, n_restarts=2).eval()
    torch.testing.assert_close(same(x), a(x), rtol=0, atol=1e-10)
    half = pyfusion.fuse([a], data, method="cluster", width=0.5, n_restarts=20)
    assert half.fusion_layouts == dict.fromkeys(trace_groups(a).groups, (6, 0))
    assert pyfusion.cost(half, (8,)).params < pyfusion.cost(a, (8,)).params
    b = _mlp(1)
    by_alpha = pyfusion.fuse([a, b], data, method="cluster", alpha=0.5, n_restarts=20)
    assert all(sum(lay) == 18 for lay in by_alpha.fusion_layouts.values())  # n (1 + alpha)
    with pytest.raises(ValueError, match="exactly one of width"):
        pyfusion.fuse([a, b], data, method="cluster", width=10, alpha=0.5)
    with pytest.raises(ValueError, match="between 1 and K"):
        pyfusion.fuse([a, b], data, method="cluster", width=25)
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse([a, b], method="cluster", width=10)
    with pytest.raises(ValueError, match="K >= 2"):
        pyfusion.fuse([a], data, method="partial", alpha=0.5)


def test_deterministic_under_seed_and_fast_equals_dense():
    members = [_vgg(s) for s in range(3)]
    data = [torch.randn(10, 2, 8, 8, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    kw = {"method": "cluster", "width": 1.5, "n_restarts": 30, "reset_bn": False}
    f1 = pyfusion.fuse(members, data, seed=3, **kw).eval()
    f2 = pyfusion.fuse(members, data, seed=3, **kw).eval()
    assert f1.fusion_info["inertia"] == f2.fusion_info["inertia"]
    for (n, p), q in zip(f1.state_dict().items(), f2.state_dict().values()):
        assert torch.equal(p, q), n
    dense = pyfusion.fuse(members, data, seed=3, fast_modules=False, **kw).eval()
    torch.testing.assert_close(f1(x), dense(x), rtol=0, atol=1e-12)
    # clusters of one member only do not read other members' own clusters: zero blocks exact
    for path, mod in dense.named_modules():
        lay = dense.fusion_module_layouts.get(path)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or lay is None or lay["in"] is None or lay["out"] is None:
            continue
        ro, ci = np.cumsum([0, *lay["out"]]), np.cumsum([0, *lay["in"]]) * lay["in_expand"]
        for i in range(1, 4):
            for j in range(1, 4):
                if i != j:
                    assert torch.count_nonzero(mod.weight[ro[i] : ro[i + 1], ci[j] : ci[j + 1]]) == 0


def _group_points(members, data, layer_idx):
    """Neurons of one MLP group as points: post-ReLU activations, concatenated over members, / Frobenius norm."""
    acts = []
    for m in members:
        x = torch.cat(data)
        acts.append(torch.relu(m[: layer_idx + 1](x)).T)  # (n, samples)
    pts = torch.cat(acts).detach().numpy()
    return pts / np.linalg.norm(pts)


@pytest.mark.parametrize("width", [6, 12, 18])
def test_inertia_not_worse_than_sklearn(width):
    a, b = _mlp(0), _mlp(1)
    data = _data()
    lam = [0.4, 0.6]
    fused = pyfusion.fuse([a, b], data, method="cluster", width=width, lambdas=lam, n_restarts=50, point="post")
    g = trace_groups(a)
    for name, layer_idx in zip(g.groups, (1, 3)):
        pts = _group_points([a, b], data, layer_idx)
        w = np.repeat(lam, 12)
        km = KMeans(n_clusters=width, n_init=50, random_state=0).fit(pts, sample_weight=w)
        ours = fused.fusion_info["inertia"][name]
        assert ours <= km.inertia_ * (1 + 1e-9) + 1e-15, (name, ours, km.inertia_)
        # the reported inertia is that of the plan's clusters on these points
        gp = fused.fusion_plan.groups[name]
        lab = torch.cat([gp.A[0].argmax(0), gp.A[1].argmax(0)]).numpy()
        cent = np.stack([(w[lab == c, None] * pts[lab == c]).sum(0) / w[lab == c].sum() for c in range(width)])
        direct = float((w * ((pts - cent[lab]) ** 2).sum(1)).sum())
        assert abs(direct - ours) <= 1e-9 * max(1.0, direct)


def test_prune_keeps_top_scores_and_full_width_is_ensemble():
    a, b = _mlp(0), _mlp(1)
    data = _data()
    x = torch.randn(6, 8, dtype=torch.float64)
    full = pyfusion.fuse([a, b], method="prune", width=24).eval()
    torch.testing.assert_close(full(x), 0.5 * a(x) + 0.5 * b(x), rtol=0, atol=1e-10)
    one = pyfusion.fuse([a], method="prune", width=1.0).eval()
    torch.testing.assert_close(one(x), a(x), rtol=0, atol=1e-10)
    lam = [0.3, 0.7]
    for crit in ("weight_norm", "activation_std"):
        p = pyfusion.fuse([a, b], data, method="prune", width=9, criterion=crit, lambdas=lam, fast_modules=False)
        name = next(iter(trace_groups(a).groups))
        if crit == "weight_norm":
            sc = [torch.cat([m[1].weight, m[1].bias[:, None]], 1).norm(dim=1).detach() for m in (a, b)]
        else:
            sc = [torch.relu(m[:2](torch.cat(data))).std(0, unbiased=False).detach() for m in (a, b)]
        allsc = torch.cat([lam[0] * sc[0], lam[1] * sc[1]])
        top = set(torch.topk(allsc, 9).indices.tolist())
        gp = p.fusion_plan.groups[name]
        kept = {j for j in range(12) if gp.A[0][:, j].any()} | {12 + j for j in range(12) if gp.A[1][:, j].any()}
        assert kept == top
        assert gp.layout[0] == 0 and sum(gp.layout) == 9
    with pytest.raises(ValueError, match="criterion must be"):
        pyfusion.fuse([a, b], method="prune", width=9, criterion="random")
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse([a, b], method="prune", width=9, criterion="activation_std")
