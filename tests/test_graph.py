"""Neuron groups (pyfusion.graph), plans and the builder (pyfusion.fuse.builder) against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfusion import models
from pyfusion.fuse.builder import build, fused_tensors
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.graph import AxisRef, UnsupportedModuleError, declare_groups, permuted_state, trace_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation on the shared 2-core machine (10-30x slower at load 8)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _keys(refs):
    return sorted((r.key, r.axis, r.role, r.expand) for r in refs)


def test_mlp_groups_exact():
    g = trace_groups(models.mlp([6, 5, 4, 3], bias=True))
    assert len(g.groups) == 2
    g0, g1 = g.groups.values()
    assert g0.size == 5 and g1.size == 4
    assert _keys(g0.refs) == [
        ("1.bias", 0, "producer", 1),
        ("1.weight", 0, "producer", 1),
        ("3.weight", 1, "consumer", 1),
    ]
    assert _keys(g1.refs) == [
        ("3.bias", 0, "producer", 1),
        ("3.weight", 0, "producer", 1),
        ("5.weight", 1, "consumer", 1),
    ]
    assert g0.pre_points == ["1"] and g0.post_points == ["2"] and g0.activation == "relu"
    g = trace_groups(models.mlp([6, 5, 3], bias=False))
    assert _keys(next(iter(g.groups.values())).refs) == [("1.weight", 0, "producer", 1), ("3.weight", 1, "consumer", 1)]


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc2, self.fc3, self.fc4 = nn.Linear(8, 10), nn.Linear(10, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.ln(self.fc1(x))
        h = h + self.fc3(F.gelu(self.fc2(self.drop(h))))  # residual stream with a LayerNorm in it
        return self.fc4(torch.tanh(h))


def test_functional_stream_layernorm():
    g = trace_groups(_Functional())
    assert len(g.groups) == 2
    stream = next(gr for gr in g.groups.values() if any(r.key == "ln.weight" for r in gr.refs))
    assert {r.key for r in stream.producers} == {"fc1.weight", "fc1.bias", "fc3.weight", "fc3.bias"}
    assert {r.key for r in stream.per_neuron} == {"ln.weight", "ln.bias"}
    assert {r.key for r in stream.consumers} == {"fc2.weight", "fc4.weight"}
    inner = next(gr for gr in g.groups.values() if gr is not stream)
    assert {r.key for r in inner.producers} == {"fc2.weight", "fc2.bias"}
    assert {r.key for r in inner.consumers} == {"fc3.weight"}
    assert inner.activation == "functional:gelu" and inner.post_nodes == ["gelu"] and not inner.post_points
    assert inner.pre_points == ["fc2"]
    # the residual sum (not the LayerNorm output it absorbs) is the stream's pre-activation point
    assert stream.pre_nodes == ["add"] and stream.post_nodes == ["tanh"]


def test_vgg_flatten_expand():
    m = models.vgg((4, "M", 6, "M"), in_channels=3, image_size=8, hidden=5)
    g = trace_groups(m)
    conv2 = next(gr for gr in g.groups.values() if gr.producers[0].module == "4")
    assert conv2.size == 6
    assert ("9.weight", 1, "consumer", 4) in _keys(conv2.refs)  # 2x2 spatial positions per channel
    assert {r.key for r in conv2.per_neuron} == {"5.weight", "5.bias", "5.running_mean", "5.running_var"}


def test_resnet_streams():
    m = models.resnet20(1, blocks=2)
    g = trace_groups(m)
    # per stage: one stream + one group per block (block-internal); 3 stages x (1 + 2)
    assert len(g.groups) == 9
    s1 = next(gr for gr in g.groups.values() if any(r.key == "conv1.weight" for r in gr.producers))
    assert {r.key for r in s1.producers} == {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"}
    assert {r.key for r in s1.consumers} == {
        "layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer2.0.conv1.weight", "layer2.0.shortcut.0.weight"
    }  # fmt: skip
    s3 = next(gr for gr in g.groups.values() if any(r.key == "fc.weight" for r in gr.consumers))
    assert "layer3.0.shortcut.0.weight" in {r.key for r in s3.producers}
    assert "layer3.0.shortcut.1.running_var" in {r.key for r in s3.per_neuron}
    bg = trace_groups(models.bottleneck_resnet())
    assert len(bg.groups) == 10


def test_unsupported_module_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.block = nn.Sequential(nn.Identity(), nn.GroupNorm(2, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.block(self.fc(x)))

    with pytest.raises(UnsupportedModuleError, match=r"block\.1.*GroupNorm"):
        trace_groups(Odd())

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), self.b(x)], 1))

    # torch.cat is understood (issue 12): the consumer's input axis holds one segment per concatenated group
    g = trace_groups(Cat())
    a, b = g.groups.values()
    assert (a.size, b.size) == (3, 3) and a.producers[0].module == "a" and b.producers[0].module == "b"
    (ca,), (cb,) = a.consumers, b.consumers
    assert (ca.key, ca.axis, ca.offset, ca.pattern) == ("out.weight", 1, 0, (("unit", 3),))
    assert (cb.key, cb.axis, cb.offset, cb.pattern) == ("out.weight", 1, 3, (("unit", 3),))


def test_declare_groups_and_walk():
    m = models.mlp([6, 5, 3])
    g = declare_groups(m, {"h": {"producers": ["1.weight", "1.bias"], "consumers": ["3.weight"], "post_points": ["2"]}})
    assert _keys(g.groups["h"].refs) == _keys(next(iter(trace_groups(m).groups.values())).refs)
    with pytest.raises(ValueError, match="expected size"):
        declare_groups(m, {"h": {"producers": ["1.weight"], "consumers": [("3.weight", 0)]}})
    with pytest.raises(ValueError, match="does not have"):
        declare_groups(m, {"h": {"producers": ["nope.weight"]}})

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.fc2(self.act(self.fc1(x)))
            return self.fc2(self.act(self.fc1(-x)))

    with pytest.warns(UserWarning, match="walking"):
        g = trace_groups(Untraceable())
    assert _keys(next(iter(g.groups.values())).refs) == [
        ("fc1.bias", 0, "producer", 1), ("fc1.weight", 0, "producer", 1), ("fc2.weight", 1, "consumer", 1)
    ]  # fmt: skip


def _random_plan(graph, k, rng, widen):
    """A random partial-fusion-like plan: layout [shared | branch_1 .. branch_K] with exact-zero cross blocks."""
    groups = {}
    for name, g in graph.groups.items():
        n = g.size
        shared = n - widen
        layout = (shared,) + (widen,) * k
        slots = sum(layout)
        a_maps, b_maps = [], []
        for j in range(k):
            a = torch.zeros(slots, n, dtype=torch.float64)
            b = torch.zeros(n, slots, dtype=torch.float64)
            perm = torch.as_tensor(rng.permutation(n))
            a[torch.arange(shared), perm[:shared]] = torch.as_tensor(rng.uniform(0.2, 1, shared))
            b[perm[:shared], torch.arange(shared)] = 1.0
            off = shared + j * widen
            a[off + torch.arange(widen), perm[shared:]] = 1.0
            b[perm[shared:], off + torch.arange(widen)] = 1.0
            a_maps.append(a)
            b_maps.append(b)
        groups[name] = GroupPlan(a_maps, b_maps, layout)
    return Plan(tuple([1.0 / k] * k), groups)


def _explicit(members, graph, plan):
    """Explicit float64 W' = sum_k A_k W_k B_k per layer (written out per layer type, not via the builder)."""
    out = {}
    by_key = graph.refs_by_key()
    for key in dict(members[0].named_parameters()):
        refs = by_key.get(key, [])
        a_g = next((gname for gname, r in refs if r.role != "consumer"), None)
        b = next(((gname, r.expand) for gname, r in refs if r.role == "consumer"), None)
        acc = 0
        for k, m in enumerate(members):
            w = dict(m.named_parameters())[key].detach().double()
            am = plan.groups[a_g].A[k] if a_g else plan.lambdas[k] * torch.eye(w.shape[0], dtype=torch.float64)
            if w.ndim == 1:
                acc = acc + am @ w
                continue
            bm = torch.eye(w.shape[1], dtype=torch.float64)
            if b is not None:
                bm = torch.kron(plan.groups[b[0]].B[k], torch.eye(b[1], dtype=torch.float64))
            if w.ndim == 2:
                acc = acc + am @ w @ bm
            else:  # conv (out, in, kh, kw)
                acc = acc + torch.einsum("so,oikl,it->stkl", am, w, bm)
        out[key] = acc
    return out


@pytest.mark.parametrize(
    "factory,shape",
    [
        (lambda: models.mlp([7, 6, 5, 3]), (2, 7)),
        (lambda: models.vgg((4, "M", 6, "M"), in_channels=2, image_size=8, hidden=5), (2, 2, 8, 8)),
        (lambda: models.resnet20(1, blocks=1), (2, 3, 8, 8)),
    ],
    ids=["mlp", "vgg", "resnet"],
)
@pytest.mark.parametrize("k", [2, 3])
def test_builder_matches_explicit(factory, shape, k, rng):
    members = [factory() for _ in range(k)]
    graph = trace_groups(members[0])
    plan = _random_plan(graph, k, rng, widen=2)
    fused = build(members, graph, plan)
    ref = _explicit(members, graph, plan)
    params = dict(fused.named_parameters())
    for key, w in ref.items():
        assert params[key].shape == w.shape, key
        torch.testing.assert_close(params[key].double(), w, rtol=1e-6, atol=1e-6)
    # float64 path is exact to rounding
    f64 = fused_tensors([{n: t.double() for n, t in m.named_parameters()} for m in members], graph, plan)
    for key, w in ref.items():
        torch.testing.assert_close(f64[key], w, rtol=1e-12, atol=1e-12)
    # the layout's cross-branch blocks are exactly zero (2-D weights whose in and out groups are both planned)
    for path, lay in fused.fusion_module_layouts.items():
        if lay["out"] is None or lay["in"] is None:
            continue
        w = dict(fused.named_parameters())[f"{path}.weight"]
        e = lay["in_expand"]
        sh_o, sh_i, br = lay["out"][0], lay["in"][0], lay["out"][1]
        for j in range(k):
            for i in range(k):
                if i == j:
                    continue
                blk = w[sh_o + j * br : sh_o + (j + 1) * br, (sh_i + i * br) * e : (sh_i + (i + 1) * br) * e]
                assert torch.count_nonzero(blk) == 0
    # the fused (wider) module runs; logits keep their size
    out = fused.eval()(torch.randn(shape))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_permute_state_preserves_function():
    m = models.resnet20(1, blocks=1).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    g = trace_groups(m)
    perm = {n: torch.randperm(gr.size) for n, gr in g.groups.items()}
    st = {k: v.detach() for k, v in list(m.named_parameters()) + list(m.named_buffers())}
    m2 = copy.deepcopy(m)
    m2.load_state_dict(permuted_state(st, g, perm))
    x = torch.randn(3, 3, 8, 8)
    assert not torch.equal(m.conv1.weight, m2.conv1.weight)
    torch.testing.assert_close(m(x), m2(x), rtol=1e-5, atol=1e-5)


def test_axisref_key():
    assert AxisRef("a.b", "weight", 0, "producer").key == "a.b.weight"
    assert AxisRef("", "w", 1, "consumer").key == "w"


@pytest.mark.parametrize(
    "factory",
    [
        lambda: models.vgg((4, "M", 6, "M"), in_channels=2, image_size=8, hidden=5),
        lambda: models.resnet20(1, blocks=1),
    ],
    ids=["vgg", "resnet"],
)
@pytest.mark.parametrize("k", [2, 3])
def test_builder_scatter_path_bit_identical(factory, k, rng, monkeypatch):
    """The one-scatter path for selection maps gives exactly the general per-axis path's tensors, and is taken."""
    import pyfusion.fuse.builder as builder

    members = [factory().double() for _ in range(k)]
    graph = trace_groups(members[0])
    plan = _random_plan(graph, k, rng, widen=2)
    states = [dict(list(m.named_parameters()) + list(m.named_buffers())) for m in members]
    taken = []
    real = builder._scatter_fused

    def counting(*args, **kwargs):
        res = real(*args, **kwargs)
        taken.append(res is not None)
        return res

    monkeypatch.setattr(builder, "_scatter_fused", counting)
    fast = fused_tensors(states, graph, plan)
    assert sum(taken) >= len(graph.groups)  # every producer weight at least
    monkeypatch.setattr(builder, "_scatter_fused", lambda *a, **kw: None)
    general = fused_tensors(states, graph, plan)
    assert fast.keys() == general.keys()
    for key in fast:
        assert fast[key].shape == general[key].shape, key
        assert torch.equal(fast[key], general[key]), key


def test_public_permuted_copy_same_function_different_weights():
    from pyfusion.testing import permuted_copy, randomize_batchnorm

    m = randomize_batchnorm(models.resnet20(1, blocks=1, num_classes=5))
    twin = permuted_copy(m, torch.Generator().manual_seed(7))
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(twin(x), m(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(twin.state_dict()["conv1.weight"], m.state_dict()["conv1.weight"])
