"""Fusion of Hugging Face families the library was not tested on (audit 15): tiny float64 configs, every parameter
re-drawn, fused with a permuted copy of themselves (must give the model back) and with an independent member
(partial alpha = 1 must be the ensemble, at no more FLOPs than the ensemble).

Found and fixed:

* a parameter broadcast over a group's units (Phi's ``qk_layernorm``: one LayerNorm over the head dim applied to
  every head; a scalar scale on a hidden layer) has one copy in the fused model: partial fusion at alpha = 1 averaged
  the members' copies, silently (Phi: 3.6e-2 relative error against the ensemble; the scalar net: 7.5e-2). The
  tracer now records such parameters on the group (``NeuronGroup.shared_params``) and widening it is refused,
  naming the parameter, the op and the module; permutations and full fusion are unchanged;
* Swin (transformers 5) passes its relative position bias table to ``scaled_dot_product_attention`` as the mask: the
  table's per-head group had no capture point and every activation-based method (and partial fusion, which reads
  activations) raised "points[...] modules [] did not run in member 0's forward pass". The mask is now a capture
  point of the bias group, as T5's bias is at its embedding's output;
* Falcon with ALiBi pins its heads, and the head dims became the units of a group: widening them sums both members'
  q . k terms inside each head (never the ensemble; it ran into a broadcast error only because no adapter resizes
  ``FalconAttention``, and would be silent with one). Dims contracted between two activations now block widening
  (``NeuronGroup.contracted``), named with the op.

* ConvNeXt's channels-first LayerNorm (between the stages and after the stem), a ``LayerNorm2d`` and
  GroupNorm(1, C) normalize a group held on dim 1 of ``(N, C, H, W)``, and Swin's patch merging a
  ``LayerNorm(4 C)`` over four copies of the stream: all were "functional code inside a module", so partial
  fusion refused alpha > 0 on the whole stream. The member-view normalizer now takes the group's axis and its
  copies (``Normalizer.dim`` / ``copies``, ``MemberViewNorm(dim=...)``).

Covered without a fix: GPT-NeoX (interleaved fused qkv, rotary_pct < 1), Qwen2 (qkv bias, RMSNorm in float32),
T5 encoder under a pooled head (per-head relative bias), ALBERT (one layer shared across depth, factorized
embeddings), CLIP vision; clear refusals naming the module and op for Mixtral's experts and DeBERTa-v2's position
projections (trace).
"""

from __future__ import annotations

import pytest
import torch
from _audit import F64
from _audit import random_model as _random
from _audit import rel as _rel
from _audit import run as _run
from _audit import state as _state
from _audit import unchanged as _unchanged
from torch import nn

import pyfusion
from pyfusion.graph import UnsupportedModuleError, trace_groups
from pyfusion.testing import permuted_copy

tf = pytest.importorskip("transformers")

V = 50


class Pooled(nn.Module):
    """A base model whose stream is mean-pooled into a Linear head (a returned stream cannot be widened)."""

    def __init__(self, base: nn.Module, d: int, key: str = "last_hidden_state"):
        super().__init__()
        self.base, self.head, self.key = base, nn.Linear(d, 3), key

    def forward(self, x):
        h = getattr(self.base(x), self.key)
        return self.head(h.mean(1) if h.dim() == 3 else h)


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, V, (4, 6), generator=g)


def _pix(g: torch.Generator, size: int = 8) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=g, dtype=F64)


# fmt: off
FAMILIES = {
    # name: (factory, inputs, tolerance: float32 inside the model where it casts, e.g. RMSNorm / T5's LayerNorm)
    "gpt_neox": (
        lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24, vocab_size=V,
            rotary_pct=0.5, use_cache=False, max_position_embeddings=16)),
        _ids, 1e-10,
    ),
    "qwen2": (
        lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
            vocab_size=V, use_cache=False)),
        _ids, 1e-5,
    ),
    "t5_encoder": (
        lambda: Pooled(tf.T5EncoderModel(tf.T5Config(
            d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4, vocab_size=V, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu")), 16),
        _ids, 1e-5,
    ),
    "albert": (
        lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
            embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            vocab_size=V, max_position_embeddings=16, num_labels=3)),
        _ids, 1e-10,
    ),
    "clip_vision": (
        lambda: Pooled(tf.CLIPVisionModel(tf.CLIPVisionConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8,
            patch_size=4, num_channels=3)), 16, "pooler_output"),
        _pix, 1e-10,
    ),
    "swin": (
        lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
            num_labels=3, mlp_ratio=1.5)),
        _pix, 1e-10,
    ),
    # channels-first LayerNorms (ConvNeXtLayerNorm(data_format="channels_first"): permute, layer_norm, permute
    # back) in the stem and between the stages; ConvNeXt-V2 adds global response normalization
    "convnext": (
        lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, patch_size=2)),
        _pix, 1e-10,
    ),
    "convnextv2": (
        lambda: tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, patch_size=2)),
        _pix, 1e-10,
    ),
    # two stages: the patch merging normalizes the concatenation of four neighbours' features, LayerNorm(4 C)
    "swin_2stage": (
        lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
            window_size=2, num_labels=3, mlp_ratio=1.5)),
        _pix, 1e-10,
    ),
}
# fmt: on


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_permuted_copy_and_ensemble(name):
    """Permuted copy: partial fusion (alpha 0.5) and activation matching give the model back; with an independent
    member, partial alpha = 1 is the ensemble and costs no more than it."""
    factory, inputs, tol = FAMILIES[name]
    torch.manual_seed(0)
    a, b = _random(factory(), 1), _random(factory(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [inputs(gen) for _ in range(2)]
    x = inputs(gen)
    graph = trace_groups(a, data[0])
    assert graph.groups and not graph.pinned
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, x)
    assert _rel(_run(twin, x), y) < tol
    assert any(not torch.equal(v, a.state_dict()[k]) for k, v in twin.state_dict().items() if v.is_floating_point())
    before = [_state(a), _state(twin), _state(b)]
    for method, opts in [("partial", {"alpha": 0.5}), ("activation_matching", {})]:
        fused = pyfusion.fuse([a, twin], data, method=method, graph=graph, **opts)
        assert _rel(_run(fused, x), y) < tol, method
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert _rel(_run(fused, x), 0.5 * (_run(a, x) + _run(b, x))) < 1e-10
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.flops <= cost.ensemble_flops
    assert all(_unchanged(m, s) for m, s in zip((a, twin, b), before))


def _phi_qk():
    cfg = tf.PhiConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=24, vocab_size=V, partial_rotary_factor=0.5, qk_layernorm=True,
                       use_cache=False)  # fmt: skip
    return tf.PhiForCausalLM(cfg)


def test_phi_qk_layernorm_is_shared_by_the_heads():
    """Phi's q / k LayerNorms (over the head dim) are one tensor for all heads: widening the heads averaged the
    members' LayerNorms (3.6e-2 off the ensemble at alpha = 1, silently). Now refused, naming the parameter; the
    heads still permute, and the rest of the model still widens."""
    torch.manual_seed(0)
    a, b = _random(_phi_qk(), 1), _random(_phi_qk(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [_ids(gen) for _ in range(2)]
    x = _ids(gen)
    graph = trace_groups(a, data[0])
    attn = [n for n, g in graph.groups.items() if g.shared_params]
    assert attn and all("self_attn" in n for n in attn)
    assert "model.layers.0.self_attn.q_layernorm.weight" in {p.param for p in graph.groups[attn[0]].shared_params}
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match=r"cannot be widened: parameter 'model\.layers\.0\.self_attn\.q_layernorm"):
        pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    with pytest.raises(ValueError, match=r"cannot be widened: parameter .*layernorm"):
        pyfusion.fuse([a, b], data, method="cluster", width=1.5, graph=graph)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, x)
    for method, opts in [("partial", {"alpha": 0.0}), ("weight_matching", {})]:
        assert _rel(_run(pyfusion.fuse([a, twin], data, method=method, graph=graph, **opts), x), y) < 1e-10
    # the attention heads at full width, everything else kept per member
    alpha = {n: 0.0 for n in attn} | {"*": 0.5}
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=alpha, graph=graph)
    assert _rel(_run(fused, x), y) < 1e-10
    assert any(gp.slots > graph.groups[n].size for n, gp in fused.fusion_plan.groups.items())


class ScaledNet(nn.Module):
    """A hidden layer multiplied by one learned scalar."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * self.s)


def test_a_scalar_parameter_blocks_widening():
    """alpha = 1 of two nets with different scalars was 7.5e-2 off the ensemble (one averaged scalar); the builder
    refuses a widened plan of such a group too (a plan made by hand)."""
    from pyfusion.fuse.builder import build
    from pyfusion.fuse.plan import Plan

    a, b = _random(ScaledNet(), 1), _random(ScaledNet(), 2)
    x = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    graph = trace_groups(a, x)
    (g,) = graph.groups.values()
    assert [p.param for p in g.shared_params] == ["s"] and "'mul'" in g.shared_params[0].where
    with pytest.raises(ValueError, match=r"group 'g0:a' cannot be widened: parameter 's' .*'mul'"):
        pyfusion.fuse([a, b], [x], method="partial", alpha=1.0, features="weights")
    with pytest.raises(ValueError, match=r"plan widens group 'g0:a' to 16 slots .*parameter 's'"):
        build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)))
    twin = permuted_copy(a, torch.Generator().manual_seed(1), example_inputs=x)
    fused = pyfusion.fuse([a, twin], [x], method="activation_matching")
    assert _rel(_run(fused, x), _run(a, x)) < 1e-12


def test_channels_first_norms_are_member_views(tmp_path):
    """ConvNeXt at alpha = 0.5: the channels-first LayerNorms become member views on dim -3, the channels-last
    ones on dim -1; the saved file loads back bit for bit."""
    factory, inputs, _tol = FAMILIES["convnext"]
    torch.manual_seed(0)
    a, b = _random(factory(), 1), _random(factory(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [inputs(gen) for _ in range(2)]
    graph = trace_groups(a, data[0])
    norms = {nz.module: nz for g in graph.groups.values() for nz in g.normalizers}
    assert norms["convnext.embeddings.layernorm"].dim == -3 and norms["convnext.embeddings.layernorm"].wrappable
    assert norms["convnext.encoder.stages.0.layers.0.layernorm"].dim == -1
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=0.5, graph=graph)
    from pyfusion.nn.norm import MemberViewNorm

    views = {p: m.dim for p, m in fused.named_modules() if isinstance(m, MemberViewNorm)}
    assert views["convnext.embeddings.layernorm"] == -3
    assert views["convnext.encoder.stages.1.downsampling_layer.0"] == -3
    assert views["convnext.encoder.stages.1.layers.0.layernorm"] == -1
    loaded = pyfusion.load(pyfusion.save(fused, tmp_path / "convnext.safetensors"))
    x = inputs(gen)
    assert torch.equal(_run(loaded, x), _run(fused, x))


def test_swin_patch_merging_norm_reads_four_copies():
    factory = FAMILIES["swin_2stage"][0]
    torch.manual_seed(0)
    a = _random(factory(), 1)
    graph = trace_groups(a, _pix(torch.Generator().manual_seed(0)))
    nz = [n for g in graph.groups.values() for n in g.normalizers if n.module.endswith("downsample.norm")]
    assert nz and all(n.wrappable and n.copies == 4 and n.dim == -1 for n in nz)


def test_swin_bias_table_heads_are_observed():
    """The per-head bias table reaches the scores only as SDPA's mask: its group now has a capture point there."""
    factory = FAMILIES["swin"][0]
    torch.manual_seed(0)
    a = _random(factory(), 1)
    graph = trace_groups(a, _pix(torch.Generator().manual_seed(0)))
    bias = [g for n, g in graph.groups.items() if n.endswith("relative_position_bias")]
    assert bias and all(g.captures and g.tie is not None for g in bias)


@pytest.mark.parametrize(
    "name, factory, match",
    [
        ("mixtral", lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
            vocab_size=V, num_local_experts=3, num_experts_per_tok=2, use_cache=False)),
         r"module 'model\.layers\.0\.mlp\.experts' of type MixtralExperts"),
        ("deberta_v2", lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=V,
            max_position_embeddings=16, relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"],
            num_labels=3, type_vocab_size=0)),
         r"module 'deberta\.encoder\.layer\.0\.attention\.self\.pos_key_proj' of type Linear"),
    ],
)  # fmt: skip
def test_untraceable_families_are_refused_by_name(name, factory, match):
    """The trace names the module and op (Mixtral's experts do not even run in float64 on CPU: the fusion is asked
    without data, on synthesized inputs)."""
    torch.manual_seed(0)
    a, b = _random(factory(), 1), _random(factory(), 2)
    ids = _ids(torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModuleError, match=match):
        trace_groups(a, ids)
    before = [_state(a), _state(b)]
    with pytest.raises(UnsupportedModuleError, match=match):
        pyfusion.fuse([a, b], method="weight_matching")
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])


def test_falcon_alibi_head_dims_cannot_be_widened():
    """Falcon's ALiBi pins the heads, leaving their head dims (q, k, v of every head) as the group's units: widening
    them adds the members' q . k terms into each head's scores (never the ensemble; only the missing adapter of
    ``FalconAttention`` kept it from running). Now refused, naming the SDPA; permuting them still gives the model."""
    cfg = tf.FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, multi_query=False,
                          new_decoder_architecture=False, parallel_attn=False, alibi=True, vocab_size=V,
                          use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    a, b = _random(tf.FalconForCausalLM(cfg), 1), _random(tf.FalconForCausalLM(cfg), 2)
    gen = torch.Generator().manual_seed(0)
    data = [_ids(gen)]
    x = _ids(gen)
    graph = trace_groups(a, data[0])
    (qkv,) = [g for g in graph.groups.values() if g.contracted]
    assert qkv.unit_size == 1 and qkv.size == 8 and "'scaled_dot_product_attention'" in qkv.contracted[0]
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match=r"cannot be widened: its units are summed against another activation"):
        pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    fused = pyfusion.fuse([a, twin], data, method="weight_matching", graph=graph)
    assert _rel(_run(fused, x), _run(a, x)) < 1e-10


def _levit():
    return tf.LevitForImageClassification(tf.LevitConfig(
        image_size=16, num_channels=3, hidden_sizes=[16, 24], num_attention_heads=[2, 2], depths=[1, 1],
        key_dim=[8, 8], down_ops=[["Subsample", 8, 2, 2, 2, 2]], num_labels=3))  # fmt: skip


def test_levit_batchnorm_over_packed_heads_and_its_adapter():
    """LeViT normalizes its packed q / k / v projection with a BatchNorm1d: the channels are heads x (q | k | v)
    dims, a unit group's neurons times their pattern. The BatchNorm recalibration read the group's (heads, heads)
    maps against 64 channels and every method with data raised a size mismatch; it now maps channel by channel
    through the builder's own transform. The attention views by ``num_attention_heads`` and splits by ``key_dim``,
    and caches its gathered biases in eval mode: the adapter updates the counts and empties the cache (partial
    fusion of a permuted copy widened the value dims and did not run)."""
    from pyfusion.fuse import bn as bn_mod

    torch.manual_seed(0)
    a = _random(_levit(), 1)
    gen = torch.Generator().manual_seed(0)
    x16 = lambda g: torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)  # noqa: E731
    data = [x16(gen) for _ in range(2)]
    x = x16(gen)
    graph = trace_groups(a, data[0])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, x)
    before = [_state(a), _state(twin)]
    for method, opts in [("partial", {"alpha": 0.5}), ("activation_matching", {}), ("weight_matching", {})]:
        fused = pyfusion.fuse([a, twin], data, method=method, graph=graph, **opts)
        assert _rel(_run(fused, x), y) < 1e-10, method  # BatchNorm statistics re-measured: rounding only
    assert _unchanged(a, before[0]) and _unchanged(twin, before[1])
    # the channel maps of the packed projection's BatchNorm: 64 channels, one permutation matrix (times 1/2) each
    path = "levit.encoder.stages.0.layers.0.module.queries_keys_values.batch_norm"
    plan = pyfusion.fuse([a, twin], data, method="weight_matching", graph=graph).fusion_plan
    maps = bn_mod._maps_of(path, graph, plan, a.get_submodule(path).num_features)
    assert [tuple(m.shape) for m in maps] == [(64, 64), (64, 64)]
    for m in maps:
        assert torch.equal((m != 0).sum(0), torch.ones(64, dtype=torch.long)) and bool((m[m != 0] == 0.5).all())
    # member 0 is the slot order; the copy's channel for slot c undoes the permutation
    assert torch.equal(maps[0], 0.5 * torch.eye(64, dtype=torch.float64))
