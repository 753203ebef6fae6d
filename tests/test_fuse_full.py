"""Full fusion through pyfusion.fuse: permutation recovery, lambda invariants, BatchNorm reset, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.fuse import available_methods
from pyfusion.fuse.bn import reset_bn_stats
from pyfusion.fuse.repair import RepairSkippedWarning
from pyfusion.graph import permuted_state, trace_groups
from pyfusion.testing import permuted_copy, randomize_batchnorm


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation on the shared 2-core machine (10-30x slower at load 8)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALIGNING = ["weight_matching", "activation_matching", "ot", "ot_weights", "ot_l2"]

# method aliases used in tests: name -> (registered method, options)
VARIANTS = {
    "ot_weights": ("ot", {"cost": "weights"}),
    "ot_l2": ("ot", {"masses": "l2"}),
    "activation_matching_pre_sq": ("activation_matching", {"point": "pre", "cost": "sqdist"}),
}


def _fuse(members, data, method, **kw):
    name, opts = VARIANTS.get(method, (method, {}))
    return pyfusion.fuse(members, data, method=name, **opts, **kw)


class _LNStream(nn.Module):
    """Token MLP with a LayerNorm residual stream and functional activations."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc2, self.fc3, self.fc4 = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.ln(self.fc1(x))
        h = h + self.fc3(torch.nn.functional.gelu(self.fc2(h)))
        return self.fc4(torch.relu(h))


ARCHS = {
    "ln_stream": (_LNStream, (5, 6)),
    "mlp": (lambda: models.mlp([12, 16, 16, 5]), (12,)),
    "vgg": (lambda: models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10), (2, 8, 8)),
    "resnet": (lambda: models.resnet20(1, blocks=1, num_classes=5), (3, 8, 8)),
    "bottleneck": (lambda: models.bottleneck_resnet(1, num_classes=5), (3, 8, 8)),
}


def _snapshot(ms):
    return [{k: v.detach().clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())} for m in ms]


def _assert_unchanged(ms, snap):
    for m, s in zip(ms, snap):
        for k, v in list(m.named_parameters()) + list(m.named_buffers()):
            assert torch.equal(v, s[k]), k


def _data(shape, n=4, bs=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, *shape, generator=g), torch.zeros(bs, dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", [*ALIGNING, "activation_matching_pre_sq"])
@pytest.mark.parametrize("k", [2, 3])
def test_permuted_copies_recovered(arch, method, k):
    factory, shape = ARCHS[arch]
    m = randomize_batchnorm(factory())
    members = [m] + [permuted_copy(m) for _ in range(k - 1)]
    x = torch.randn(8, *shape)
    for other in members[1:]:
        assert not torch.equal(
            other.state_dict()[next(iter(other.state_dict()))], m.state_dict()[next(iter(m.state_dict()))]
        )
    snap = _snapshot(members)
    # no BN reset: the fused network must equal the member exactly, running statistics included
    fused = _fuse(members, _data(shape), method, reset_bn=False)
    torch.testing.assert_close(fused.eval()(x), m(x), rtol=1e-5, atol=1e-5)
    _assert_unchanged(members, snap)


@pytest.mark.parametrize("method", ["average", "weight_matching", "activation_matching", "ot", "ot_weights"])
@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_one_hot_lambdas_return_member(method, arch):
    factory, shape = ARCHS[arch]
    kk = 3 if arch == "mlp" else 2
    members = [randomize_batchnorm(factory()) for _ in range(kk)]
    x = torch.randn(6, *shape)
    for k in range(kk):
        lam = [0.0] * kk
        lam[k] = 1.0
        fused = _fuse(members, _data(shape), method, lambdas=lam, reset_bn=False)
        torch.testing.assert_close(fused.eval()(x), members[k](x), rtol=1e-5, atol=1e-5)


def test_average_is_weighted_mean():
    a, b = models.mlp([5, 4, 3]), models.mlp([5, 4, 3])
    fused = pyfusion.fuse([a, b], method="average", lambdas=[0.25, 0.75])
    for (n, p), q, r in zip(fused.named_parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(p, 0.25 * q + 0.75 * r, msg=n)
    assert fused.fusion_layouts == {g: (4, 0, 0) for g in trace_groups(a).groups}
    assert fused.fusion_info["method"] == "average"


def test_weight_matching_beats_identity_objective():
    """On unrelated members the chosen permutations score at least as high as the identity (coordinate ascent)."""
    torch.manual_seed(3)
    a, b = models.mlp([10, 24, 24, 4]), models.mlp([10, 24, 24, 4])
    fused = pyfusion.fuse([a, b], method="weight_matching")
    plan = fused.fusion_plan
    g = trace_groups(a)
    perms = {name: plan.groups[name].B[1].argmax(0) for name in g.groups}
    sb = {k: v.detach().double() for k, v in b.named_parameters()}
    sa = {k: v.detach().double() for k, v in a.named_parameters()}
    moved = permuted_state(sb, g, perms)
    score = sum((sa[k] * moved[k]).sum() for k in sa)
    score_id = sum((sa[k] * sb[k]).sum() for k in sa)
    assert score >= score_id
    assert all(torch.equal(plan.groups[n].A[1], 0.5 * plan.groups[n].B[1].T) for n in g.groups)


def test_bn_reset_matches_batch_statistics():
    factory, shape = ARCHS["vgg"]
    m = randomize_batchnorm(factory())
    data = _data(shape, n=3, bs=10)
    fused = copy.deepcopy(m)
    seen = []
    h = fused[0].register_forward_hook(lambda mod, i, o: seen.append(o.detach()))
    assert reset_bn_stats(fused, data) == 30
    h.remove()
    acts = torch.cat(seen).double()  # (30, C, H, W)
    mean = acts.mean((0, 2, 3))
    # momentum=None: PyTorch's cumulative average of the per-batch (unbiased) variances
    var = torch.stack([s.double().var((0, 2, 3), unbiased=True) for s in seen]).mean(0)
    torch.testing.assert_close(fused[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1].running_var.double(), var, rtol=1e-4, atol=1e-6)
    assert fused[1].momentum == m[1].momentum and not fused.training
    with pytest.raises(ValueError, match="empty"):
        reset_bn_stats(fused, [])
    torch.testing.assert_close(fused[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)  # unchanged on error


def test_fuse_resets_bn_by_default_with_data():
    factory, shape = ARCHS["resnet"]
    members = [randomize_batchnorm(factory()) for _ in range(2)]
    fused = pyfusion.fuse(members, _data(shape), method="average")
    assert fused.fusion_info["bn_reset_samples"] == 64 and fused.fusion_info["bn_reset"] == "changed slots"
    plain = pyfusion.fuse(members, method="average")
    assert "bn_reset_samples" not in plain.fusion_info
    # averaging changes every slot; the first layer is linear in the shared input, so its fused mean is exactly the
    # members' average (the correction is rounding) while the variance of averaged neurons collapses
    torch.testing.assert_close(fused.bn1.running_mean, plain.bn1.running_mean, rtol=1e-5, atol=1e-5)
    assert (fused.bn1.running_var < 0.9 * plain.bn1.running_var).any()
    assert not torch.allclose(fused.layer2[0].bn1.running_mean, plain.layer2[0].bn1.running_mean)


def test_errors_and_inputs_unchanged():
    a, b = models.mlp([6, 5, 3]), models.mlp([6, 5, 3])
    snap = _snapshot([a, b])
    with pytest.raises(ValueError, match="unknown fusion method 'nope'.*average.*weight_matching"):
        pyfusion.fuse([a, b], method="nope")
    with pytest.raises(ValueError, match="K >= 2"):
        pyfusion.fuse([a], method="average")
    with pytest.raises(ValueError, match="different architecture"):
        pyfusion.fuse([a, models.vgg((4, "M"), image_size=4)], method="average")
    with pytest.raises(ValueError, match="mismatched tensor shapes"):
        pyfusion.fuse([a, models.mlp([6, 7, 3])], method="average")
    with pytest.raises(ValueError, match="sum to 1"):
        pyfusion.fuse([a, b], method="average", lambdas=[0.5, 0.6])
    with pytest.raises(ValueError, match="non-negative"):
        pyfusion.fuse([a, b], method="average", lambdas=[1.5, -0.5])
    with pytest.raises(ValueError, match="one weight per member"):
        pyfusion.fuse([a, b], method="average", lambdas=[1.0])
    with pytest.raises(ValueError, match="empty"):
        pyfusion.fuse([a, b], [], method="average")
    with pytest.raises(ValueError, match="empty"):
        pyfusion.fuse([a, b], iter([]), method="weight_matching")
    with pytest.raises(ValueError, match="takes no options"):
        pyfusion.fuse([a, b], method="average", bogus=1)
    c = copy.deepcopy(b)
    with torch.no_grad():
        c[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"models\[1\].*'1.weight'.*NaN"):
        pyfusion.fuse([a, c], method="weight_matching")
    with torch.no_grad():
        c[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        pyfusion.fuse([a, c], method="average")

    class WithGN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm, self.out = nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    with pytest.raises(ValueError, match="'norm' of type GroupNorm"):
        pyfusion.fuse([WithGN(), WithGN()], method="average")
    _assert_unchanged([a, b], snap)
    assert {"average", "weight_matching"} <= set(available_methods())


def test_method_needing_data_and_failures_leave_members_unchanged():
    a, b = models.mlp([6, 5, 3]), models.mlp([6, 5, 3])
    a.train()
    b.eval()
    snap = _snapshot([a, b])
    with pytest.raises(ValueError, match="'activation_matching' needs calibration data"):
        pyfusion.fuse([a, b], method="activation_matching")
    with pytest.raises(ValueError, match="needs calibration data"):
        pyfusion.fuse([a, b], method="ot", cost="activations")
    with pytest.raises(RuntimeError):  # wrong input width: fails inside the members' forward pass
        pyfusion.fuse([a, b], [torch.randn(4, 7)], method="activation_matching")
    with pytest.raises(ValueError, match="cost must be"):
        pyfusion.fuse([a, b], [torch.randn(4, 6)], method="activation_matching", cost="cosine")
    with pytest.raises(ValueError, match="reference"):
        pyfusion.fuse([a, b], [torch.randn(4, 6)], method="activation_matching", reference=2)
    _assert_unchanged([a, b], snap)
    assert a.training and not b.training and all(m.training for m in a.modules())


def test_ot_uniform_assignment_equals_pot_and_soft_maps_are_barycentric():
    ot = pytest.importorskip("ot")
    torch.manual_seed(5)
    a, b = models.mlp([8, 12, 10, 3]), models.mlp([8, 12, 10, 3])
    data = [torch.randn(32, 8) for _ in range(3)]
    graph = trace_groups(a)
    from pyfusion.match.activations import activation_cost, neuron_features
    from pyfusion.stats.groups import group_statistics

    stats = group_statistics([a, b], graph, data)
    fused = pyfusion.fuse([a, b], data, method="ot", lambdas=[0.3, 0.7])
    sa = dict(a.named_parameters())
    sb = dict(b.named_parameters())
    for name, gp in fused.fusion_plan.groups.items():
        n = graph.groups[name].size
        cost = activation_cost(
            stats[name], 0, 1, "sqdist", (neuron_features(sa, graph, name), neuron_features(sb, graph, name))
        )
        t = gp.B[1].T / n  # uniform masses: T_k = diag(a) B_k^T
        u = torch.full((n,), 1.0 / n, dtype=torch.float64)
        torch.testing.assert_close(t.sum(0), u)
        torch.testing.assert_close(t.sum(1), u)
        want = ot.emd2(u.numpy(), u.numpy(), cost.numpy())
        assert abs(float((t * cost).sum()) - want) <= 1e-9 * max(1.0, abs(want))
        torch.testing.assert_close(gp.A[1], 0.7 * gp.B[1].T)
    # importance masses: soft maps, marginals of the transport equal the masses
    fused = pyfusion.fuse([a, b], data, method="ot", masses="l2")
    from pyfusion.match.weights import neuron_masses

    for name, gp in fused.fusion_plan.groups.items():
        ma = neuron_masses({k: v.detach().double() for k, v in sa.items()}, graph, name, "l2")
        mb = neuron_masses({k: v.detach().double() for k, v in sb.items()}, graph, name, "l2")
        t = ma[:, None] * gp.B[1].T  # T = diag(a) M
        torch.testing.assert_close(t.sum(1), ma, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t.sum(0), mb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gp.A[1].sum(1), torch.full_like(ma, 0.5))
        assert (gp.A[1] >= 0).all()


@pytest.mark.parametrize("arch,method", [("mlp", "weight_matching"), ("vgg", "activation_matching"), ("resnet", "ot")])
def test_repair_matches_member_statistics(arch, method):
    from pyfusion.fuse.repair import repair_targets
    from pyfusion.stats.groups import group_statistics

    factory, shape = ARCHS[arch]
    members = [randomize_batchnorm(factory()) for _ in range(2)]
    data = _data(shape, n=3)
    snap = _snapshot(members)
    if arch == "resnet":  # residual streams are skipped, loudly
        with pytest.warns(RepairSkippedWarning, match="residual stream"):
            fused = _fuse(members, data, method, repair=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RepairSkippedWarning)
            fused = _fuse(members, data, method, repair=True)
    rep = fused.fusion_info["repair"]
    graph = trace_groups(members[0])
    targets = repair_targets(members, graph, fused.fusion_plan, data)
    stats = group_statistics([fused], graph, data, point="pre")
    assert rep["repaired"]
    if arch == "resnet":  # residual streams are skipped, block-internal groups are repaired
        assert any("residual stream" in v["reason"] for v in rep["skipped"].values())
    for name in rep["repaired"]:
        t_mu, t_sd = targets[name]
        live = stats[name].var(0) > 1e-8
        torch.testing.assert_close(stats[name].mean(0)[live], t_mu[live], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[name].var(0).sqrt()[live], t_sd[live], rtol=1e-4, atol=1e-4)
    _assert_unchanged(members, snap)
    # a permuted copy is its own REPAIR target: the function does not change
    m = members[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepairSkippedWarning)
        fused = _fuse([m, permuted_copy(m)], data, method, repair=True, reset_bn=False)
    x = torch.randn(5, *shape)
    torch.testing.assert_close(fused.eval()(x), m(x), rtol=1e-4, atol=1e-4)


class _Custom(nn.Module):
    """A custom parametrised module: traced (the gain is a per-neuron parameter), and declarable by hand."""

    class Gain(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.g = nn.Parameter(torch.rand(n) + 0.5)

        def forward(self, x):
            return x * self.g

    def __init__(self):
        super().__init__()
        self.fc1, self.gain, self.act, self.fc2 = nn.Linear(6, 10), self.Gain(10), nn.ReLU(), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.act(self.gain(self.fc1(x))))


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching", "ot"])
def test_declared_groups_for_custom_model(method):
    from pyfusion.graph import declare_groups

    m = _Custom().eval()
    (traced,) = trace_groups(m).groups.values()  # ``x * self.g`` is now traced (a per-neuron parameter)
    spec = {
        "h": {
            "producers": ["fc1.weight", "fc1.bias"],
            "neurons": ["gain.g"],
            "consumers": ["fc2.weight"],
            "pre_points": ["gain"],
            "post_points": ["act"],
        }
    }
    graph = declare_groups(m, spec)
    (declared,) = graph.groups.values()
    assert sorted((r.key, r.axis, r.role) for r in traced.refs) == sorted(
        (r.key, r.axis, r.role) for r in declared.refs
    )
    assert (traced.pre_points, traced.post_points) == (declared.pre_points, declared.post_points)
    perm = torch.randperm(10)
    m2 = copy.deepcopy(m)
    m2.load_state_dict(permuted_state({k: v.detach() for k, v in m.state_dict().items()}, graph, {"h": perm}))
    fused = pyfusion.fuse([m, m2], [torch.randn(16, 6) for _ in range(3)], method=method, graph=graph)
    x = torch.randn(7, 6)
    torch.testing.assert_close(fused(x), m(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.fusion_plan.groups["h"].B[1].argmax(0), torch.argsort(perm))  # m2[j] = m[perm[j]]


def test_register_custom_method():
    from pyfusion.fuse import Plan, register_method
    from pyfusion.fuse.registry import _METHODS

    @register_method("_test_reverse", needs_data="no", summary="reverse neuron order of member 1")
    def _reverse(members, graph, lambdas, data, **opts):
        perms = {g: [torch.arange(gr.size), torch.arange(gr.size).flip(0)] for g, gr in graph.groups.items()}
        return Plan.from_permutations(graph, perms, lambdas)

    try:
        assert "_test_reverse" in available_methods()
        a = models.mlp([5, 4, 3])
        fused = pyfusion.fuse([a, a], method="_test_reverse", lambdas=[0.0, 1.0])
        x = torch.randn(3, 5)
        torch.testing.assert_close(fused(x), a(x))  # a permutation of member 1 is the same function
        assert torch.equal(fused[1].weight, a[1].weight.flip(0))
        with pytest.raises(ValueError, match="already registered"):
            register_method("_test_reverse")(lambda *a, **k: None)
    finally:
        _METHODS.pop("_test_reverse", None)


def test_registry_loads_when_pyfusion_fuse_is_the_function(monkeypatch):
    """After ``pyfusion.fuse`` resolved lazily to the function, method discovery must still find the package."""
    from pyfusion.fuse import api, registry

    monkeypatch.setattr(pyfusion, "fuse", api.fuse)
    monkeypatch.setattr(registry, "_LOADED", False)
    assert {"average", "weight_matching", "activation_matching", "ot"} <= set(registry.available_methods())
    assert not registry._IMPORT_ERRORS
