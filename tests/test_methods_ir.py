"""Every alignment method on the IR (issue 12 item 6): hidden-structure tests on every model family.

Families: MLP, VGG + BatchNorm, ResNet, user classes (``torch.cat`` skips with in-place ReLU, a channels-last
flatten), a transformer block on ``nn.MultiheadAttention``, ``nn.TransformerEncoder``, hand-written attention
(a ViT-like model), SwiGLU + RMSNorm, and Hugging Face BERT, ViT, GPT-2 (``Conv1D``, packed ``c_attn``, tied
embeddings) and Llama (grouped-query attention, rotary q/k dims pinned, v/o dims free, SwiGLU, RMSNorm). Methods:
weight matching, activation matching, OT fusion, partial fusion at alpha 0, 0.5 and 1, clustering at full width
(and pruning at the ensemble's width). Everything runs in float64:

* a model fused with a copy of itself whose FFN neurons, heads and free within-head dims are permuted
  (:func:`pyfusion.testing.permuted_copy`) gives back the model (1e-10; Llama: 1e-5 where its normalizers run on
  a widened stream, since Hugging Face's RMSNorm computes in float32 and a permutation changes that sum's order);
* alpha = 1 (and clustering / pruning at K * n) is the ensemble ``sum_k lambda_k f_k`` (1e-10);
* one-hot lambdas give the member;
* the blocks (branch a outputs, branch b inputs), a != b, of every widened tensor are exactly zero;
* K = 3 runs and is deterministic for a seed.

Plus the combination rule of clustering (incoming mean / outgoing sum) and the errors for groups that may only be
permuted.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from _ir_families import families, max_diff, randomize, run
from _ir_models import hf_models, register_test_adapters
from torch import nn

import pyfusion
from pyfusion.fuse.builder import build
from pyfusion.fuse.plan import GroupPlan, Plan, unit_map
from pyfusion.graph import AxisRef, NeuronGroup, neuron_view, trace_groups
from pyfusion.testing import permuted_copy

F64 = torch.float64
HF = hf_models()


FAMILIES = {name: (factory, inputs) for name, (factory, inputs, _kind) in families(8).items()}
# Hugging Face's Llama RMSNorm computes in float32: a member-view normalizer on a permuted stream sums in another order
WIDE_TOL = {"llama": 1e-5}  # (measured: 2e-7 to 3e-7 relative)

RECOVER = {
    "weight_matching": ("weight_matching", {}),
    "activation_matching": ("activation_matching", {}),
    "ot": ("ot", {}),
    "partial_0": ("partial", {"alpha": 0.0}),
    "partial_0.5": ("partial", {"alpha": 0.5}),
    "partial_1": ("partial", {"alpha": 1.0}),
    "cluster": ("cluster", {"alpha": 0.0, "n_restarts": 50}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_test_adapters()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_retrace(monkeypatch):
    """Skip the builder's re-trace of the fused model (a torch.export per new set of widths, 1-3 s for a Hugging Face
    model on a loaded 2-core machine): the outputs are compared anyway, and the check itself runs in the recovery
    tests here and in tests/test_builder_families.py."""
    from pyfusion.fuse import builder

    monkeypatch.setattr(builder, "check_fused_widths", lambda *args, **kwargs: None)


@functools.cache
def _setup(family: str):
    """(model, other model, permuted copy, calibration data, graph), float64, traced once per family."""
    factory, batch = FAMILIES[family]
    gen = torch.Generator().manual_seed(11)
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    data = [batch(gen) for _ in range(2)]
    graph = trace_groups(a, data[0])
    twin = permuted_copy(a, torch.Generator().manual_seed(5), graph=graph)
    return a, b, twin, data, graph


def _fuse(members, family, method, opts, **kw):
    _a, _b, _t, data, graph = _setup(family)
    return pyfusion.fuse(
        members, data, method=method, graph=graph, reset_bn=False, fast_modules=False, **opts, **kw
    ).eval()


def _scale(ys):
    return max(1.0, max(float(t.abs().max()) for t in ys))


def _widened(fused) -> bool:
    return any(sum(lay[1:]) > 0 for lay in fused.fusion_layouts.values())


@pytest.mark.parametrize("method", list(RECOVER))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_permuted_copy_comes_back(family, method):
    a, _b, twin, data, graph = _setup(family)
    name, opts = RECOVER[method]
    fused = _fuse([a, twin], family, name, opts)
    y = run(a, data[0])
    tol = WIDE_TOL.get(family, 1e-10) if _widened(fused) else 1e-10
    assert max_diff(run(fused, data[0]), y) <= tol * _scale(y)
    fused.fusion_plan.validate(graph)  # whole units, tied groups with one unit-level map
    if method == "partial_0.5":  # really an intermediate layout: every tie set has branch units
        assert all(lay[1] > 0 for n, lay in fused.fusion_layouts.items() if graph.groups[n].units > 1)


def _axis_owner(length: int, segs, graph, plan) -> torch.Tensor:
    """Branch (1..K, 0 = shared or gap) of every index of a fused tensor's axis, from the original references on
    that axis and the plan's layouts: each segment becomes ``slots / inner`` units of its factor pattern."""
    owner = torch.zeros(length, dtype=torch.long)
    pos_new = pos_old = 0
    for offset, r, gname in sorted(segs, key=lambda s: s[0]):
        g, gp = graph.groups[gname], plan.groups[gname]
        pos_new += offset - pos_old
        inner = g.unit_size
        factors = tuple((k, gp.slots // inner if k == "unit" else s) for k, s in r.factors(g))
        fused_group = NeuronGroup("fused", gp.slots, unit_size=inner)
        ref = AxisRef(r.module, r.param, 0, r.role, offset=0, pattern=factors)
        n_new = math.prod(s for _, s in factors)
        rows = neuron_view(torch.arange(n_new), ref, fused_group)  # (slots, positions of the slot)
        bounds = np.cumsum(gp.layout)
        branch = torch.as_tensor(np.searchsorted(bounds, np.arange(gp.slots), side="right"))
        owner[pos_new + rows] = branch[:, None].expand_as(rows)
        pos_new += n_new
        pos_old = offset + r.length(g)
    return owner


def assert_zero_blocks(fused, graph, plan) -> int:
    """The blocks (branch a out, branch b in), a != b, of every fused tensor are exactly zero; returns how many
    tensors had such blocks."""
    state = dict(fused.named_parameters(remove_duplicate=False))
    checked = 0
    for key, refs in graph.refs_by_key().items():
        if key not in state:
            continue  # a normalizer replaced by a member-view module keeps the members' own tensors
        t = state[key].detach()
        out_axes = {r.axis for _, r in refs if r.role != "consumer"}
        in_axes = {r.axis for _, r in refs if r.role == "consumer"}
        if not out_axes or not in_axes:
            continue
        oa = min(out_axes)
        owners = {}
        for ax in {oa, *in_axes}:
            owners[ax] = _axis_owner(t.shape[ax], [(r.offset, r, gn) for gn, r in refs if r.axis == ax], graph, plan)
        for ia in in_axes:
            o, i = owners[oa], owners[ia]
            cross = (o[:, None] > 0) & (i[None, :] > 0) & (o[:, None] != i[None, :])
            if not bool(cross.any()):
                continue
            view = t.movedim((oa, ia), (0, 1))
            assert bool((view[cross] == 0).all()), f"{key}: a block between two members' branches is not zero"
            checked += 1
    return checked


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ensemble_one_hot_and_zero_blocks(family, no_retrace):
    a, b, _twin, data, graph = _setup(family)
    ya, yb = run(a, data[0]), run(b, data[0])
    lam = (0.3, 0.7)
    ens = [lam[0] * u + lam[1] * v for u, v in zip(ya, yb)]
    scale = _scale(ens)
    for method, opts in [("partial", {"alpha": 1.0}), ("cluster", {"width": 2.0, "n_restarts": 2}),
                         ("prune", {"width": 2.0})]:  # fmt: skip
        fused = _fuse([a, b], family, method, opts, lambdas=lam)
        assert max_diff(run(fused, data[0]), ens) <= 1e-10 * scale, method
    # one-hot on the member that is not the reference (the reference comes back through identity maps)
    for method, opts in RECOVER.values():
        fused = _fuse([a, b], family, method, opts, lambdas=(0.0, 1.0))
        # (Llama: member 1 comes back permuted, and its float32 RMSNorm then sums in another order)
        assert max_diff(run(fused, data[0]), yb) <= WIDE_TOL.get(family, 1e-10) * _scale(yb), (method, opts)
    fused = _fuse([a, b], family, "partial", {"alpha": 0.5})
    assert assert_zero_blocks(fused, graph, fused.fusion_plan) > 0


K3 = [
    ("weight_matching", {}),
    ("activation_matching", {}),
    ("ot", {"cost": "weights"}),
    ("partial", {"alpha": 0.5}),
    ("cluster", {"alpha": 0.5, "n_restarts": 4}),
    ("prune", {"alpha": 0.5}),
]


@pytest.mark.parametrize(
    "family", ["mlp", "resnet", "catnet", "mha", "hand_vit"] + [f for f in ("bert", "gpt2", "llama") if f in HF]
)
def test_three_members_deterministic_and_permuted_copies_come_back(family, no_retrace):
    a, b, twin, data, graph = _setup(family)
    c = randomize(FAMILIES[family][0](), 3)
    for method, opts in K3:
        p1 = _fuse([a, b, c], family, method, opts).fusion_plan
        p2 = _fuse([a, b, c], family, method, opts).fusion_plan
        assert p1.groups.keys() == p2.groups.keys()
        for name, gp in p1.groups.items():
            other = p2.groups[name]
            assert gp.layout == other.layout
            assert all(torch.equal(x, y) for x, y in zip(gp.A + gp.B, other.A + other.B)), (method, name)
        p1.validate(graph)
    twin2 = permuted_copy(a, torch.Generator().manual_seed(9), graph=graph)
    y = run(a, data[0])
    for method, opts in K3[:4]:
        fused = _fuse([a, twin, twin2], family, method, opts)
        tol = WIDE_TOL.get(family, 1e-10) if _widened(fused) else 1e-10
        assert max_diff(run(fused, data[0]), y) <= tol * _scale(y), method


# ---- the combination rule of clustering -------------------------------------------------------------------------


def _old_rule(plan: Plan) -> Plan:
    """The previous rule on the same clusters: incoming sum (A = indicators), outgoing mean (B = indicators / |c|)."""
    groups = {}
    for name, gp in plan.groups.items():
        size = sum(b.sum(0) for b in gp.B)  # neurons per slot, over all members
        groups[name] = GroupPlan(
            [(a != 0).to(F64) for a in gp.A], [b / size.clamp_min(1)[None, :] for b in gp.B], gp.layout
        )
    return Plan(plan.lambdas, groups)


def _act_mlp(act: nn.Module, seed: int, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)] + ([nn.BatchNorm1d(10)] if bn else []) + [act, nn.Linear(10, 8), act, nn.Linear(8, 3)]
    return randomize(nn.Sequential(*layers), seed)


def test_cluster_rule_gives_the_same_relu_network_as_before():
    """For ReLU, incoming mean / outgoing sum and incoming sum / outgoing mean are the same function for every
    cluster (relu(mean z) sum w = relu(sum z) mean w), identical neurons or not."""
    a, b = _act_mlp(nn.ReLU(), 1), _act_mlp(nn.ReLU(), 2)
    data = [torch.randn(32, 6, dtype=F64, generator=torch.Generator().manual_seed(3))]
    x = torch.randn(16, 6, dtype=F64)
    graph = trace_groups(a, data[0])
    for width in (0.5, 1.0, 1.5):
        fused = pyfusion.fuse([a, b], data, method="cluster", width=width, graph=graph, lambdas=(0.4, 0.6),
                              fast_modules=False, n_restarts=10)  # fmt: skip
        plan = fused.fusion_plan
        # some clusters hold several neurons (coefficient 1 / |c| < 1)
        assert any(bool(((m > 0) & (m < 1)).any()) for gp in plan.groups.values() for m in gp.A)
        old = build([a, b], graph, _old_rule(plan)).eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), old(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.CELU(0.7), nn.GELU(approximate="tanh")])
@pytest.mark.parametrize("bn", [False, True])
def test_clusters_of_identical_neurons_give_the_function_back_under_any_activation(act, bn):
    """A network fused with itself (every cluster a neuron and its copy) is the network, for activations that are
    not positively homogeneous and with BatchNorm (its running statistics are per-neuron parameters); the
    previous rule (incoming sum, outgoing mean) is not."""
    a = _act_mlp(act, 1, bn)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(32, 6, dtype=F64, generator=gen)]
    x = torch.randn(16, 6, dtype=F64, generator=gen)
    graph = trace_groups(a, data[0])
    assert all(g.activation_ops for g in graph.groups.values())
    fused = pyfusion.fuse([a, a], data, method="cluster", width=1.0, graph=graph, reset_bn=False, fast_modules=False,
                          n_restarts=20)  # fmt: skip
    with torch.no_grad():
        assert all(v < 1e-12 for v in fused.fusion_info["inertia"].values())
        torch.testing.assert_close(fused.eval()(x), a(x), rtol=1e-10, atol=1e-10)
        old = build([a, a], graph, _old_rule(fused.fusion_plan)).eval()
        assert float((old(x) - a(x)).abs().max()) > 1e-3
    # within one network: a neuron and its copy (outgoing weights split between them) collapse into one slot
    torch.manual_seed(0)
    wide = _act_mlp(act, 1, bn)
    with torch.no_grad():
        first = wide[0]
        first.weight[5:] = first.weight[:5]
        first.bias[5:] = first.bias[:5]
        if bn:
            for t in (wide[1].weight, wide[1].bias, wide[1].running_mean, wide[1].running_var):
                t[5:] = t[:5]
    g1 = trace_groups(wide, data[0])
    h1 = next(iter(g1.groups))
    width = {name: (0.5 if name == h1 else 1.0) for name in g1.groups}
    one = pyfusion.fuse([wide], data, method="cluster", width=width, graph=g1, reset_bn=False, fast_modules=False,
                        n_restarts=20)  # fmt: skip
    assert one.fusion_layouts[h1] == (5, 0)
    with torch.no_grad():
        torch.testing.assert_close(one.eval()(x), wide(x), rtol=1e-10, atol=1e-10)


# ---- groups that may only be permuted, and unit / tie options ---------------------------------------------------


class _FunctionalLN(nn.Module):
    """A residual stream normalized by ``F.layer_norm`` in the root's forward (not a module: not wrappable)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = h + self.fc3(torch.tanh(self.fc2(h)))
        return self.out(torch.nn.functional.layer_norm(h, (6,)))


def test_functional_normalizer_may_be_permuted_but_not_widened():
    a = randomize(_FunctionalLN(), 1)
    data = [torch.randn(16, 4, dtype=F64, generator=torch.Generator().manual_seed(2))]
    graph = trace_groups(a, data[0])
    stream = next(n for n, g in graph.groups.items() if g.normalizers)
    twin = permuted_copy(a, torch.Generator().manual_seed(4), graph=graph)
    kw = {"graph": graph, "fast_modules": False}
    hint = rf"normalized by layer_norm in module ''.*permuted but not widened.*alpha=\{{'{stream}': 0.0, '\*': 0.5\}}"
    for method, opts, match in [("partial", {"alpha": 0.5}, hint), ("cluster", {"alpha": 0.5}, hint),
                                ("prune", {"alpha": 0.5}, r"not widened or mixed; pruning the ensemble mixes"),
                                ("cluster", {"width": 1.5}, r"may be permuted but not widened.*width 1")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pyfusion.fuse([a, twin], data, method=method, **opts, **kw)
    with pytest.raises(ValueError, match=r"module ''.*masses='uniform'"):
        pyfusion.fuse([a, twin], data, method="ot", masses="l2", **kw)
    y = a(data[0])
    alpha = {stream: 0.0, "*": 0.5}  # the dict form the messages suggest
    for method, opts in [("partial", {"alpha": alpha}), ("cluster", {"alpha": alpha, "n_restarts": 20}),
                         ("ot", {})]:  # fmt: skip
        fused = pyfusion.fuse([a, twin], data, method=method, **opts, **kw).eval()
        assert fused.fusion_layouts[stream] == (6, 0, 0)
        assert any(sum(lay[1:]) > 0 for lay in fused.fusion_layouts.values()) or method == "ot"
        with torch.no_grad():
            torch.testing.assert_close(fused(data[0]), y, rtol=1e-10, atol=1e-10)


def test_tied_groups_need_one_alpha_and_whole_units():
    a, _b, twin, data, graph = _setup("mha")
    qk = next(n for n, g in graph.groups.items() if g.unit_size > 1 and g.tie == n)
    vo = next(n for n, g in graph.groups.items() if g.tie == qk and n != qk)
    with pytest.raises(ValueError, match=rf"groups \['{qk}', '{vo}'\] are one tie set.*same alpha"):
        _fuse([a, twin], "mha", "partial", {"alpha": {qk: 0.5, vo: 0.0, "*": 0.5}})
    with pytest.raises(ValueError, match=r"whole units of 4 neurons"):
        _fuse([a, twin], "mha", "cluster", {"width": 6})
    ffn = next(n for n, g in graph.groups.items() if g.activation)
    fused = _fuse([a, twin], "mha", "partial", {"alpha": {qk: 0.5, vo: 0.5, ffn: 0.0, "*": 0.5}})
    assert fused.fusion_layouts[ffn] == (24, 0, 0)
    # two of four heads isolated per member: whole heads, in every group of the tie set
    assert fused.fusion_layouts[qk] == fused.fusion_layouts[vo] == (8, 8, 8)
    qk_units = [unit_map(m, 4) for m in fused.fusion_plan.groups[qk].A]
    vo_units = [unit_map(m, 4) for m in fused.fusion_plan.groups[vo].A]
    assert all(torch.equal(u, v) for u, v in zip(qk_units, vo_units))


# ---- units: costs and maps ---------------------------------------------------------------------------------------


def test_unit_costs_are_the_best_inner_matchings_and_maps_are_scaled_permutations():
    import itertools

    from pyfusion.graph import FusionGraph
    from pyfusion.match.units import neuron_map, neuron_perms, tie_set_costs

    gen = torch.Generator().manual_seed(0)
    u, d = 3, 3
    groups = {
        "qk": NeuronGroup("qk", u * d, unit_size=d, tie="t"),
        "pin": NeuronGroup("pin", u, unit_size=1, tie="t"),  # rotary-pinned q/k of a GQA layer: no inner dims
    }
    graph = FusionGraph(groups)
    costs = {
        "qk": torch.rand(u * d, u * d, generator=gen, dtype=F64),
        "pin": torch.rand(u, u, generator=gen, dtype=F64),
    }
    for maximize in (False, True):
        (uc,), _ = tie_set_costs(graph, [costs], maximize=maximize)
        best = max if maximize else min
        for i in range(u):
            for j in range(u):
                blk = costs["qk"][i * d : (i + 1) * d, j * d : (j + 1) * d]
                want = best(float(sum(blk[r, p[r]] for r in range(d))) for p in itertools.permutations(range(d)))
                assert abs(float(uc.cost[i, j]) - want - float(costs["pin"][i, j])) < 1e-12
        # the neuron permutation of a unit assignment scores exactly the unit costs of the matched pairs
        cols = torch.tensor([2, 0, 1])
        perms = neuron_perms(graph, uc, cols)
        total = sum(float(costs[n][torch.arange(groups[n].size), p].sum()) for n, p in perms.items())
        assert abs(total - float(uc.cost[torch.arange(u), cols].sum())) < 1e-12
    t = torch.rand(u, u, generator=gen, dtype=F64)
    m = neuron_map(graph, uc, "qk", t)
    blocks = m.reshape(u, d, u, d).permute(0, 2, 1, 3)
    for i in range(u):
        for j in range(u):
            blk = blocks[i, j] / t[i, j]
            assert torch.equal((blk != 0).sum(0), torch.ones(d, dtype=torch.long)) and torch.allclose(
                blk.sum(0), torch.ones(d, dtype=F64)
            )


def test_head_statistics_read_the_q_and_k_segments_of_the_packed_projection():
    """Head groups have no node holding exactly their neurons: their statistics come from their capture points
    (q and k segments of ``in_proj``, each head's inner dims in order), stacked as samples."""
    from pyfusion.stats.groups import group_statistics

    a, _b, _twin, data, graph = _setup("mha")
    qk = next(n for n, g in graph.groups.items() if g.unit_size > 1 and g.tie == n)
    st = group_statistics([a], graph, data, point="pre")[qk]
    with torch.no_grad():
        rows = []
        for x in data:
            h = a.emb(x)
            proj = torch.nn.functional.linear(h, a.mha.in_proj_weight, a.mha.in_proj_bias)
            rows += [proj[..., :16].reshape(-1, 16), proj[..., 16:32].reshape(-1, 16)]
        want = torch.cat(rows)
    assert st.count == want.shape[0]
    torch.testing.assert_close(st.mean(0), want.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.var(0), want.var(0, unbiased=False), rtol=1e-8, atol=1e-12)
