"""Partially fused transformer blocks run at their effective FLOPs (issue 12 item 7) and never cost more than the
ensemble (issue 14 item 4).

Every transformer family of the test zoo (nn.MultiheadAttention, nn.TransformerEncoder, hand-written attention,
SwiGLU + RMSNorm, Hugging Face BERT, ViT, GPT-2 with its Conv1D, Llama with grouped-query attention), float64:

* with the fast modules (``fast_modules="always"``: every block-sparse layer is swapped, whatever the cost model
  predicts for these tiny widths) the fused model equals the dense zero-block model (``fast_modules=False``) at
  alpha 0, 0.5 and 1 to 1e-12; at alpha > 0 the FFN, q / k / v / o and packed projections are PartialLinear (an
  nn.MultiheadAttention becomes a PartialMultiheadAttention);
* alpha = 1 is the ensemble ``sum_k lambda_k f_k``, and its effective FLOPs equal the ensemble's exactly; alpha = 0
  costs one member; alpha = 0.5 lies strictly between; the dense and the fast model count the same;
* K = 3 likewise (member-subset shared slots, sorted into segments);
* a fused point that would cost more than the ensemble is replaced by the exact ensemble, said in ``fusion_info``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _ir_families import max_diff, randomize, run
from _ir_models import EncoderNet, GatedRMSNet, HandViT, MHANet, hf_models, register_test_adapters
from torch import nn

import pyfusion
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.graph import trace_groups
from pyfusion.nn import PartialLinear, PartialMultiheadAttention

F64 = torch.float64
HF = hf_models()
LAM = (0.4, 0.6)


def _x(*shape):
    return lambda g: torch.randn(4, *shape, dtype=F64, generator=g)


def _ids(vocab, t=6):
    return lambda g: torch.randint(0, vocab, (4, t), generator=g)


FAMILIES = {
    "mha": (MHANet, _x(5, 5)),
    "encoder": (EncoderNet, _x(5, 5)),
    "hand_vit": (HandViT, _x(1, 8, 8)),
    "gated_rms": (GatedRMSNet, _ids(20, 4)),
}
for _name, (_factory, _) in HF.items():
    FAMILIES[_name] = (_factory, _ids(100) if _name != "vit" else _x(1, 8, 8))


@pytest.fixture(autouse=True)
def _setup_threads(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_test_adapters()
    # the builder's re-trace of every fused model (a torch.export, 1-3 s for a Hugging Face model on a loaded
    # machine) is tested in test_builder_families / test_methods_ir; the outputs are compared here anyway
    from pyfusion.fuse import builder

    monkeypatch.setattr(builder, "check_fused_widths", lambda *args, **kwargs: None)
    yield
    torch.set_num_threads(n)


@functools.cache
def _members(family: str, k: int = 2):
    factory, batch = FAMILIES[family]
    gen = torch.Generator().manual_seed(11)
    ms = [randomize(factory(), 1 + j) for j in range(k)]
    data = [batch(gen) for _ in range(2)]
    return ms, data, trace_groups(ms[0], data[0])


def _fuse(members, data, graph, alpha, fast, lambdas):
    return pyfusion.fuse(
        members, data, method="partial", alpha=alpha, graph=graph, lambdas=lambdas, reset_bn=False, fast_modules=fast
    ).eval()


def _one(data):
    x = data[0]
    return x[:1]


def _flops(model, x) -> int:
    return pyfusion.cost(model, x).flops


def _scale(ys):
    return max(1.0, max(float(t.abs().max()) for t in ys))


@pytest.mark.slow  # 3-8 s per family (6 fusions)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_modules_equal_the_dense_model_and_cost_at_most_the_ensemble(family):
    members, data, graph = _members(family)
    x, x1 = data[1], _one(data)
    ys = [run(m, x) for m in members]
    ens = [sum(lam * y[i] for lam, y in zip(LAM, ys)) for i in range(len(ys[0]))]
    scale = _scale(ens)
    member_flops = [_flops(m, x1) for m in members]
    flops = {}
    for alpha in (0.0, 0.5, 1.0):
        dense = _fuse(members, data, graph, alpha, False, LAM)
        fast = _fuse(members, data, graph, alpha, "always", LAM)
        y_dense, y_fast = run(dense, x), run(fast, x)
        assert max_diff(y_fast, y_dense) <= 1e-12 * scale, alpha
        kinds = [type(m) for m in fast.modules()]
        if alpha > 0:
            assert fast.fusion_info["fast_modules"], alpha
            assert PartialLinear in kinds
            if family in ("mha", "encoder"):
                assert PartialMultiheadAttention in kinds
                assert not any(isinstance(m, nn.MultiheadAttention) for m in fast.modules())
        else:
            assert not fast.fusion_info["fast_modules"]  # nothing is block-sparse at alpha = 0
        if alpha == 1.0:
            assert max_diff(y_fast, ens) <= 1e-10 * scale
        assert not fast.fusion_info["ensemble_cap"]["capped"]
        flops[alpha] = _flops(fast, x1)
        assert _flops(dense, x1) == flops[alpha]  # the zero blocks are not effective work in either form
        # the default (cost-model) choice is the same function too
        if alpha == 0.5:
            default = _fuse(members, data, graph, alpha, True, LAM)
            assert max_diff(run(default, x), y_dense) <= 1e-12 * scale
    assert flops[0.0] == member_flops[0]
    assert flops[0.0] < flops[0.5] < flops[1.0] == sum(member_flops)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mha", "gpt2", "llama"])
def test_three_members_cost_the_ensemble_at_alpha_1(family):
    if family in ("gpt2", "llama") and family not in HF:
        pytest.skip("transformers is not installed")
    members, data, graph = _members(family, 3)
    x, x1 = data[1], _one(data)
    lam = (0.2, 0.3, 0.5)
    ys = [run(m, x) for m in members]
    ens = [sum(lam_k * y[i] for lam_k, y in zip(lam, ys)) for i in range(len(ys[0]))]
    ens_flops = sum(_flops(m, x1) for m in members)
    for alpha in (0.5, 1.0):
        dense = _fuse(members, data, graph, alpha, False, lam)
        fast = _fuse(members, data, graph, alpha, "always", lam)
        assert max_diff(run(fast, x), run(dense, x)) <= 1e-12 * _scale(ens)
        f = _flops(fast, x1)
        assert f == _flops(dense, x1) and f <= ens_flops
        if alpha == 1.0:
            assert f == ens_flops
            assert max_diff(run(fast, x), ens) <= 1e-10 * _scale(ens)


def _wasteful_plan(graph, k: int) -> Plan:
    """A valid-function plan that costs more than the ensemble: every hidden group keeps K branch copies of the
    members' neurons (the ensemble) and, in addition, n shared slots that average them and that nothing reads."""
    groups = {}
    for name, g in graph.groups.items():
        n = g.size
        a_maps, b_maps = [], []
        for j in range(k):
            a = torch.zeros((k + 1) * n, n, dtype=F64)
            a[:n] = torch.eye(n, dtype=F64) / k
            a[(j + 1) * n : (j + 2) * n] = torch.eye(n, dtype=F64)
            b = torch.zeros(n, (k + 1) * n, dtype=F64)
            b[:, (j + 1) * n : (j + 2) * n] = torch.eye(n, dtype=F64)
            a_maps.append(a)
            b_maps.append(b)
        groups[name] = GroupPlan(a_maps, b_maps, (n,) + (n,) * k)
    return Plan((1.0 / k,) * k, groups)


def test_a_point_costlier_than_the_ensemble_is_replaced_by_the_ensemble():
    from pyfusion import models
    from pyfusion.fuse.builder import build
    from pyfusion.fuse.fast import finish

    torch.manual_seed(0)
    members = [models.mlp([6, 10, 8, 3]).double().eval() for _ in range(2)]
    x = torch.randn(5, 6, dtype=F64)
    graph = trace_groups(members[0], x)
    plan = _wasteful_plan(graph, 2)
    wasteful = build(members, graph, plan)
    ens = (members[0](x) + members[1](x)) / 2
    torch.testing.assert_close(wasteful(x), ens, rtol=1e-12, atol=1e-12)  # the same function ...
    ens_flops = sum(_flops(m, x[:1]) for m in members)
    assert _flops(wasteful, x[:1]) > ens_flops  # ... at a higher cost
    info: dict = {}
    out, out_plan = finish(wasteful, members, graph, plan, (0.5, 0.5), info, fast_modules=True, example=x[:2])
    cap = info["ensemble_cap"]
    assert cap["checked"] and cap["capped"] and cap["fused_flops"] > cap["ensemble_flops"] == ens_flops
    assert "ensemble" in cap["reason"]
    assert _flops(out, x[:1]) == ens_flops == info["effective_flops"]
    torch.testing.assert_close(out(x), ens, rtol=1e-12, atol=1e-12)
    assert out_plan is not plan and all(gp.layout[0] == 0 for gp in out_plan.groups.values())


def test_fast_transformer_block_exports_with_a_dynamic_batch():
    """torch.export of a fused MHA block with its fast modules (PartialMultiheadAttention, PartialLinear) records the
    ops and is correct at another batch size."""
    members, data, graph = _members("mha")
    fast = _fuse(members, data, graph, 0.5, "always", LAM)
    assert isinstance(fast.mha, PartialMultiheadAttention)
    ep = torch.export.export(fast, (data[0][:3],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert "pyfusion.partial_linear" in str(ep.graph_module.code)
    x = torch.randn(7, 5, 5, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), fast(x), rtol=1e-12, atol=1e-12)
