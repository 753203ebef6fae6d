"""The builder on every family of issue 12 (float64): a model fused with its permuted copy (heads and within-head
dims permuted too) through the true inverse permutations is the model; the ensemble plan builds
``sum_k lambda_k f_k(x)`` to 1e-10 (LayerNorm / RMSNorm streams included); one-hot lambdas give the member;
tied embeddings stay tied exactly when they can."""

from __future__ import annotations

import pytest
import torch
from _ir_families import check_ensemble, check_partial_permuted, check_permuted_copy, randomize
from _ir_models import (
    CatNet,
    ConvLast,
    EncoderNet,
    GatedRMSNet,
    HandAttention,
    HandViT,
    MHANet,
    SplitAttention,
    hf_models,
    register_test_adapters,
)
from torch import nn

from pyfusion.fuse.builder import build
from pyfusion.fuse.plan import Plan
from pyfusion.graph import trace_groups
from pyfusion.nn.norm import MemberViewNorm

HF = hf_models()
F64 = torch.float64
USER = {
    "catnet": (CatNet, (torch.randn(3, 5, 6, dtype=F64),)),
    "convlast": (ConvLast, (torch.randn(3, 2, 4, 4, dtype=F64),)),
    "mha": (MHANet, (torch.randn(2, 5, 5, dtype=F64),)),
    "encoder": (EncoderNet, (torch.randn(2, 5, 5, dtype=F64),)),
    "hand_vit": (HandViT, (torch.randn(2, 1, 8, 8, dtype=F64),)),
    "split_vit": (lambda: HandViT(attention=SplitAttention), (torch.randn(2, 1, 8, 8, dtype=F64),)),
    "gated_rms": (GatedRMSNet, (torch.randint(0, 20, (3, 4)),)),
}
# Llama's RMSNorm computes in float32 even in a float64 model: a permuted copy differs in float32 rounding
TWIN_TOL = {"llama": 1e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_test_adapters()
    yield
    torch.set_num_threads(n)


def _family(name):
    return USER[name] if name in USER else HF[name]


@pytest.mark.parametrize("name", list(USER) + list(HF))
def test_permuted_copy_and_ensemble(name):
    factory, x = _family(name)
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph, fused = check_permuted_copy(a, x, twin_tol=TWIN_TOL.get(name, 1e-10))
    # full fusion by permutations keeps the usual normalizers (combined parameters)
    assert not any(isinstance(m, MemberViewNorm) for m in fused.modules())
    graph, ens = check_ensemble([a, b], x, graph)
    if any(g.normalizers for g in graph.groups.values()):
        # alpha = 1 on a normalized stream: every member normalizes its own branch with its own module
        assert any(isinstance(m, MemberViewNorm) for m in ens.modules())
    if any(g.unit_size > 1 or g.tie for g in graph.groups.values()):
        assert any(g.tie for g in graph.groups.values())


def test_user_attention_without_adapter_is_caught_by_the_retrace_check():
    """A user attention class that hard-codes its head count gives a wrong fused model unless an adapter updates
    it: the re-trace check of the builder catches it (the fused heads trace to the wrong unit size)."""
    from pyfusion.fuse import builder

    factory, x = USER["hand_vit"]
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph = trace_groups(a, x)
    saved = builder._ADAPTERS.pop("HandAttention")
    try:
        with pytest.raises(ValueError, match=r"g1:blocks\.0\.attn\.qkv.*32 slots in units of 4.*units of 8"):
            build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)))
    finally:
        builder._ADAPTERS["HandAttention"] = saved
    fused = build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)))
    assert fused.blocks[0].attn.heads == 8 and isinstance(fused.blocks[0].attn, HandAttention)


@pytest.mark.skipif("gpt2" not in HF, reason="transformers is not installed")
def test_gpt2_tied_embeddings_kept_or_untied():
    factory, x = HF["gpt2"]
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph, fused = check_permuted_copy(a, x)
    assert fused.transformer.wte.weight is fused.lm_head.weight and fused.config.tie_word_embeddings
    assert fused.fusion_untied_params == []
    graph, ens = check_ensemble([a, b], x, graph)
    # branch columns of the output embedding carry lambda_k, the input embedding's do not: untied
    assert ens.transformer.wte.weight is not ens.lm_head.weight
    assert ens.config.tie_word_embeddings is False and ens.fusion_untied_params
    assert ens.transformer.wte.weight.shape == (100, 64) and ens.lm_head.weight.shape == (100, 64)
    assert ens.transformer.h[0].attn.split_size == 64 and ens.transformer.h[0].attn.c_attn.nf == 192
    # averaging (identity maps): equal fused values, so the tie is kept
    avg = build([a, b], graph, Plan.identity(graph, (0.5, 0.5)))
    assert avg.transformer.wte.weight is avg.lm_head.weight


@pytest.mark.skipif("llama" not in HF, reason="transformers is not installed")
def test_llama_with_tied_embeddings_and_one_kv_head_per_pair():
    import transformers as tf

    cfg = tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=50, use_cache=False, tie_word_embeddings=True,
    )  # fmt: skip
    a, b = randomize(tf.LlamaForCausalLM(cfg), 1), randomize(tf.LlamaForCausalLM(cfg), 2)
    x = (torch.randint(0, 50, (2, 5)),)
    graph, fused = check_permuted_copy(a, x, twin_tol=1e-5)
    assert graph.tied_params == [("model.embed_tokens.weight", "lm_head.weight")]
    assert fused.model.embed_tokens.weight is fused.lm_head.weight
    _, ens = check_ensemble([a, b], x, graph)
    assert ens.model.embed_tokens.weight is not ens.lm_head.weight and not ens.config.tie_word_embeddings
    assert all(isinstance(m, MemberViewNorm) for m in (ens.model.norm, ens.model.layers[0].input_layernorm))


def test_multihead_attention_needs_equal_stream_and_head_widths():
    factory, x = USER["mha"]
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph = trace_groups(a, x)
    plan = Plan.ensemble(graph, (0.5, 0.5))
    stream = next(g for g in graph.groups.values() if g.normalizers).name
    plan.groups[stream] = Plan.identity(graph, (0.5, 0.5)).groups[stream]  # heads widened, stream not
    with pytest.raises(ValueError, match=r"mha: nn.MultiheadAttention needs its heads \(32.*\(16\)"):
        build([a, b], graph, plan)
    assert isinstance(a.mha, nn.MultiheadAttention) and a.mha.num_heads == 4  # members untouched


def test_functional_normalizer_refuses_widening():
    class FunctionalLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            h = h + self.fc2(torch.relu(h))
            return self.out(torch.nn.functional.layer_norm(h, (6,)))

    a, b = randomize(FunctionalLN(), 1), randomize(FunctionalLN(), 2)
    x = (torch.randn(3, 4, dtype=F64),)
    graph = trace_groups(a, x)
    stream = next(g for g in graph.groups.values() if g.normalizers)
    assert [(n.kind, n.wrappable) for n in stream.normalizers] == [("layer_norm", False)]
    check_permuted_copy(a, x, graph)  # permuting a functionally normalized stream is fine
    with pytest.raises(ValueError, match=r"normalized by layer_norm in module ''.*permuted but not widened"):
        build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)))


@pytest.mark.parametrize(
    "name", ["mha", "encoder", "hand_vit", "catnet", "gated_rms"] + [n for n in ("bert", "llama") if n in HF]
)
def test_partial_layout_with_the_permuted_copy_is_the_model(name):
    """At an intermediate layout ([shared | branch_1 | branch_2], half of each group's units isolated) the fused
    model of a network and its permuted copy is the network, LayerNorm / RMSNorm streams included: the member-view
    normalizer gives every member exactly its own normalized stream (a widened plain LayerNorm would not)."""
    factory, x = _family(name)
    a = randomize(factory(), 1)
    fused = check_partial_permuted(a, x, twin_tol=TWIN_TOL.get(name, 1e-10), tol=TWIN_TOL.get(name, 1e-10))
    if any(g.normalizers for g in fused.fusion_graph.groups.values()):
        assert any(isinstance(m, MemberViewNorm) for m in fused.modules())


@pytest.mark.skipif("bert" not in HF, reason="transformers is not installed")
def test_fuse_api_on_a_hugging_face_model():
    """``pyfusion.fuse`` traces (inputs from the config), verifies and builds; the aligning methods move whole heads
    (a permuted copy, heads included, comes back)."""
    import pyfusion

    factory, x = HF["bert"]
    a, b = factory().eval(), factory().eval()
    fused = pyfusion.fuse([a, b], method="average")
    q = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(fused.state_dict()[q], (a.state_dict()[q] + b.state_dict()[q]) / 2)
    assert fused(*x).logits.shape == (2, 3)
    from pyfusion.testing import permuted_copy

    twin = permuted_copy(a, torch.Generator().manual_seed(0))
    back = pyfusion.fuse([a, twin], method="weight_matching").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(*x).logits, a(*x).logits, rtol=1e-5, atol=1e-5)
