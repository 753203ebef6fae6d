"""Partial fusion (method="partial"): invariants of DESIGN §8, the K-member rule, a direct two-member
reference construction (POT sink problem + the paper's block assembly), fast modules, errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import ot
import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.fuse.partial import isolated_count, resolve_alpha
from pyfusion.graph import permuted_state, trace_groups
from pyfusion.nn import PartialConv2d, PartialLinear
from pyfusion.testing import randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ARCHS = {
    "mlp": (lambda: models.mlp([12, 10, 10, 5]), (12,)),
    "vgg": (lambda: models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10), (2, 8, 8)),
    "resnet": (lambda: models.resnet20(1, blocks=1, num_classes=5), (3, 8, 8)),
    "bottleneck": (lambda: models.bottleneck_resnet(1, num_classes=5), (3, 8, 8)),
}
FEATURES = [("weights", {}), ("pcd", {}), ("activations", {}), ("activations", {"cost": "correlation"})]


def _members(arch: str, k: int) -> list[nn.Module]:
    return [randomize_batchnorm(ARCHS[arch][0]()).double() for _ in range(k)]


def _data(shape, n=2, bs=12):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(bs, *shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _snapshot(ms):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in ms]


def _assert_unchanged(ms, snap):
    for m, s in zip(ms, snap):
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k]), k


def _fuse(members, shape, alpha, feat, opts, **kw):
    data = _data(shape) if feat == "activations" else None
    kw.setdefault("reset_bn", False)
    return pyfusion.fuse(members, data, method="partial", alpha=alpha, features=feat, **opts, **kw).eval()


@pytest.mark.parametrize("arch,k", [("mlp", 2), ("mlp", 3), ("mlp", 4), ("vgg", 3), ("resnet", 2), ("resnet", 3),
                                    ("bottleneck", 2), ("vgg", 4)])  # fmt: skip
@pytest.mark.parametrize("feat,opts", FEATURES[:3])
def test_alpha_one_is_the_ensemble(arch, k, feat, opts):
    members = _members(arch, k)
    lam = np.random.default_rng(k).dirichlet(np.ones(k)).tolist()
    lam[-1] = 1.0 - sum(lam[:-1])
    x = torch.randn(5, *ARCHS[arch][1], dtype=torch.float64)
    snap = _snapshot(members)
    fused = _fuse(members, ARCHS[arch][1], 1.0, feat, opts, lambdas=lam)
    ens = sum(w * m(x) for w, m in zip(lam, members))
    torch.testing.assert_close(fused(x), ens, rtol=0, atol=1e-10)
    g = trace_groups(members[0])
    assert fused.fusion_layouts == {n: (0,) + (gr.size,) * k for n, gr in g.groups.items()}
    _assert_unchanged(members, snap)


@pytest.mark.parametrize("arch,k", [("mlp", 3), ("vgg", 3), ("resnet", 3), ("mlp", 4)])
@pytest.mark.parametrize("feat,opts", FEATURES[:3])
def test_one_hot_lambda_gives_the_member(arch, k, feat, opts):
    members = _members(arch, k)
    x = torch.randn(5, *ARCHS[arch][1], dtype=torch.float64)
    for j in range(k):
        lam = [0.0] * k
        lam[j] = 1.0
        fused = _fuse(members, ARCHS[arch][1], 0.4, feat, opts, lambdas=lam)
        torch.testing.assert_close(fused(x), members[j](x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
@pytest.mark.parametrize("cost,point", [("sqdist", "post"), ("correlation", "post"), ("sqdist", "pre")])
@pytest.mark.parametrize("k", [2, 3])
def test_alpha_zero_equals_activation_matching(arch, cost, point, k):
    members = _members(arch, k)
    data = _data(ARCHS[arch][1])
    kw = {"cost": cost, "point": point, "reset_bn": False}
    part = pyfusion.fuse(members, data, method="partial", alpha=0.0, features="activations", **kw)
    full = pyfusion.fuse(members, data, method="activation_matching", **kw)
    for (n, p), q in zip(part.state_dict().items(), full.state_dict().values()):
        assert torch.equal(p, q), n
    assert all(lay[1:] == (0,) * k for lay in part.fusion_layouts.values())


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet", "bottleneck"])
@pytest.mark.parametrize("feat,opts", FEATURES)
def test_permuted_copy_is_the_model_at_every_alpha(arch, feat, opts):
    m = randomize_batchnorm(ARCHS[arch][0]()).double()
    g = trace_groups(m)
    perm = {n: torch.randperm(gr.size) for n, gr in g.groups.items()}
    other = copy.deepcopy(m)
    other.load_state_dict(permuted_state(m.state_dict(), g, perm))
    x = torch.randn(5, *ARCHS[arch][1], dtype=torch.float64)
    for alpha in (0.0, 0.2, 0.5, 0.7, 1.0):
        fused = _fuse([m, other], ARCHS[arch][1], alpha, feat, opts)
        torch.testing.assert_close(fused(x), m(x), rtol=0, atol=1e-10, msg=f"alpha={alpha}")


@pytest.mark.parametrize("arch,k", [("mlp", 2), ("vgg", 3), ("resnet", 2), ("bottleneck", 3)])
def test_zero_blocks_and_fast_modules_equal_dense(arch, k):
    members = _members(arch, k)
    x = torch.randn(4, *ARCHS[arch][1], dtype=torch.float64)
    dense = _fuse(members, ARCHS[arch][1], 0.5, "weights", {}, fast_modules=False)
    fast = _fuse(members, ARCHS[arch][1], 0.5, "weights", {}, fast_modules="always")  # tiny layers: swap anyway
    torch.testing.assert_close(fast(x), dense(x), rtol=0, atol=1e-12)
    swapped = fast.fusion_info["fast_modules"]
    assert swapped and all(isinstance(fast.get_submodule(p), (PartialLinear, PartialConv2d)) for p in swapped)
    for p in swapped:  # segment buffers are set: the modules round-trip through their state_dict
        mod = fast.get_submodule(p)
        assert mod.layout_in.tolist() == [list(s) for s in mod.in_segments]
        assert mod.layout_out.tolist() == [list(s) for s in mod.out_segments]
        # no stored block is an exact-zero block (K >= 3 too): every (output, input) segment pair kept is allowed
        for o, (_n_o, m_o) in enumerate(mod.out_segments):
            blk = mod.block(o)
            col = 0
            for size, m_i in mod.in_segments:
                if m_i & m_o and size:
                    assert torch.count_nonzero(blk[:, col : col + size]) > 0, (p, o)
                    col += size
            assert col == blk.shape[1]
        if isinstance(mod, PartialLinear):
            again = PartialLinear.from_state_dict(mod.state_dict())
            xin = torch.randn(3, mod.in_features, dtype=torch.float64)
            torch.testing.assert_close(again(xin), mod(xin), rtol=0, atol=0)
    lay = dense.fusion_module_layouts
    checked = 0
    for path, mod in dense.named_modules():
        if type(mod) not in (nn.Linear, nn.Conv2d) or path not in lay or lay[path]["in"] is None:
            continue
        il, ol, e = lay[path]["in"], lay[path]["out"], lay[path]["in_expand"]
        if ol is None:
            continue
        ro, ci = np.cumsum([0, *ol]), np.cumsum([0, *il]) * e
        for a in range(1, k + 1):
            for b in range(1, k + 1):
                blk = mod.weight[ro[a] : ro[a + 1], ci[b] : ci[b + 1]]
                if a != b:
                    assert torch.count_nonzero(blk) == 0, (path, a, b)
                    checked += blk.numel()
                elif blk.numel():
                    assert torch.count_nonzero(blk) > 0
    assert checked > 0


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.3, 0.5, 0.8, 1.0])
def test_mlp_effective_weights_formula(alpha):
    n = 20
    members = [models.mlp([7, n, n, 3], bias=False).double() for _ in range(2)]
    fused = pyfusion.fuse(members, method="partial", alpha=alpha)
    c = pyfusion.cost(fused, (7,))
    assert c.layers["3"][0] == round(n * n * (1 + 2 * alpha - alpha * alpha))
    assert c.layers["3"][2] == round(n * n * (1 + alpha) ** 2)  # dense with zero blocks
    assert c.layers["1"][0] == 7 * round(n * (1 + alpha))


def test_rounding_rule_and_k_member_layout():
    assert isolated_count(0.25, 10) == 3  # 2.5 rounds up (Python's round would give 2)
    assert isolated_count(0.35, 10) == 4 and isolated_count(0.05, 10) == 1 and isolated_count(0.04, 10) == 0
    members = _members("mlp", 3)
    fused = pyfusion.fuse(members, method="partial", alpha=0.25, fast_modules=False)
    for name, lay in fused.fusion_layouts.items():
        n, iso = 10, 3
        assert lay[2] == lay[3] == iso  # every non-reference member keeps exactly iso neurons
        assert n - iso <= lay[0] <= n and lay[0] + lay[1] == n
        assert sum(lay) == n + 2 * iso
        gp = fused.fusion_plan.groups[name]
        # each member's neurons appear exactly once; shared slots' coefficients sum to 1
        for b in gp.B:
            assert torch.equal(b.sum(1), torch.ones(n, dtype=torch.float64))
        torch.testing.assert_close(sum(a[: lay[0]].sum(1) for a in gp.A), torch.ones(lay[0], dtype=torch.float64))


def _reference_two_member(ma, mb, x_cal, alpha, la):
    """The paper's construction for a bias-free MLP: POT sink problem per layer on pre-activation sqdist
    (A.4), the [fused | isoA | isoB] block assembly of A.5, written directly with numpy indexing."""
    lb = 1.0 - la
    wa = [m.weight.detach().numpy() for m in ma if isinstance(m, nn.Linear)]
    wb = [m.weight.detach().numpy() for m in mb if isinstance(m, nn.Linear)]
    xa = xb = x_cal.reshape(len(x_cal), -1).numpy()
    fused_w, prev = [], None  # prev: (fA, fB, iA, iB) index arrays of the previous layer
    for li in range(len(wa)):
        last = li == len(wa) - 1
        # the members' own activations (paper: features from the original models)
        pa, pb = xa @ wa[li].T, xb @ wb[li].T
        if last:
            fa = fb = np.arange(wa[li].shape[0])
            ia = ib = np.array([], dtype=np.int64)
        else:
            n = wa[li].shape[0]
            c = ((pa[:, :, None] - pb[:, None, :]) ** 2).mean(0)
            s = alpha / (1 + alpha)
            a = np.r_[np.full(n, (1 - s) / n), s]
            cs = np.zeros((n + 1, n + 1))
            cs[:n, :n] = c
            cs[n, n] = c.max() + 1
            p = ot.emd(a, a, cs)[:n, :n]
            fa, fb = np.nonzero(p > 1e-8)
            ia = np.setdiff1d(np.arange(n), fa)
            ib = np.setdiff1d(np.arange(n), fb)
        if prev is None:  # first layer: every row reads the raw input
            cols_a = cols_b = [np.arange(wa[li].shape[1])]
            zero_cross = False
        else:
            pfa, pfb, pia, pib = prev
            cols_a, cols_b = [pfa, pia, None], [pfb, None, pib]
            zero_cross = True
        blocks = []
        for rows, who in ((None, "f"), (ia, "a"), (ib, "b")):
            if who != "f" and last:
                continue
            row_blocks = []
            for ca, cb in zip(cols_a, cols_b):
                if who == "f":
                    ra, rb = (fa, fb)
                    ba = la * wa[li][np.ix_(ra, ca)] if ca is not None else 0
                    bb = lb * wb[li][np.ix_(rb, cb)] if cb is not None else 0
                    blk = ba + bb
                elif who == "a":
                    blk = wa[li][np.ix_(rows, ca)] if ca is not None else np.zeros((len(rows), len(cb)))
                else:
                    blk = wb[li][np.ix_(rows, cb)] if cb is not None else np.zeros((len(rows), len(ca)))
                row_blocks.append(blk)
            blocks.append(np.concatenate(row_blocks, 1))
        del zero_cross
        fused_w.append(np.concatenate(blocks, 0))
        xa, xb = np.asarray(torch.relu(torch.from_numpy(pa))), np.asarray(torch.relu(torch.from_numpy(pb)))
        prev = (fa, fb, ia, ib)
    return fused_w


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("la", [0.5, 0.3])
def test_k2_agrees_with_direct_two_member_construction(alpha, la):
    n = 10
    ma, mb = (models.mlp([6, n, n, 4], bias=False).double().eval() for _ in range(2))
    x_cal = torch.randn(200, 6, dtype=torch.float64)
    ref_w = _reference_two_member(ma, mb, x_cal, alpha, la)
    fused = pyfusion.fuse([ma, mb], [x_cal], method="partial", alpha=alpha, features="activations",
                          point="pre", lambdas=[la, 1 - la]).eval()  # fmt: skip
    x = torch.randn(9, 6, dtype=torch.float64)
    h = x.numpy()
    for i, w in enumerate(ref_w):
        h = h @ w.T
        if i < len(ref_w) - 1:
            h = np.maximum(h, 0)
    torch.testing.assert_close(fused(x), torch.from_numpy(h), rtol=0, atol=1e-10)
    assert math.isclose(pyfusion.cost(fused, (6,)).layers["3"][0], n * n * (1 + 2 * alpha - alpha**2))


def test_alpha_forms_and_errors():
    members = _members("mlp", 2)
    g = trace_groups(members[0])
    names = list(g.groups)
    assert resolve_alpha(0.3, g) == dict.fromkeys(names, 0.3)
    assert resolve_alpha([0.1, 0.9], g) == {names[0]: 0.1, names[1]: 0.9}
    assert resolve_alpha({names[1]: 0.5, "*": 0.0}, g) == {names[0]: 0.0, names[1]: 0.5}
    fused = pyfusion.fuse(members, method="partial", alpha={names[0]: 0.0, names[1]: 1.0})
    assert fused.fusion_layouts == {names[0]: (10, 0, 0), names[1]: (0, 10, 10)}
    snap = _snapshot(members)
    bad = [
        (-0.1, r"alpha must be in \[0, 1\]"),
        (1.5, r"alpha must be in \[0, 1\]"),
        (float("nan"), r"alpha must be in \[0, 1\]"),
        ("half", "alpha must be a float"),
        (True, "alpha must be a float"),
        ([0.5], "one value per group"),
        ([0.5, 2.0], r"alpha\[1\] must be in"),
        ({"nope": 0.5}, r"unknown groups \['nope'\].*" + names[0]),
        ({names[0]: 0.5}, "misses groups"),
    ]
    for alpha, msg in bad:
        with pytest.raises(ValueError, match=msg):
            pyfusion.fuse(members, method="partial", alpha=alpha)
    with pytest.raises(ValueError, match="K >= 2"):
        pyfusion.fuse(members[:1], method="partial", alpha=0.5)
    with pytest.raises(ValueError, match="features must be one of"):
        pyfusion.fuse(members, method="partial", alpha=0.5, features="gradients")
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse(members, method="partial", alpha=0.5, features="activations")
    with pytest.raises(ValueError, match="reference must be"):
        pyfusion.fuse(members, method="partial", alpha=0.5, reference=2)
    with pytest.raises(ValueError, match="cost must be"):
        pyfusion.fuse(members, method="partial", alpha=0.5, cost="l1")
    _assert_unchanged(members, snap)


def test_bn_recalibrated_and_float32_runs():
    members = [randomize_batchnorm(ARCHS["resnet"][0]()) for _ in range(2)]
    data = [d.float() for d in _data(ARCHS["resnet"][1])]
    fused = pyfusion.fuse(members, data, method="partial", alpha=0.5, features="pcd")
    assert fused.fusion_info["bn_reset_samples"] == 24
    x = data[0]
    assert fused(x).dtype == torch.float32 and torch.isfinite(fused(x)).all()
    ens = pyfusion.fuse(members, data, method="partial", alpha=1.0, reset_bn=False).eval()
    torch.testing.assert_close(ens(x), 0.5 * members[0](x) + 0.5 * members[1](x), rtol=1e-5, atol=1e-5)
