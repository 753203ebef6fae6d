"""Fusion of models the library was not written around (audit 14): each test is a silently wrong result found by
fusing a model with a hand-permuted copy of itself, or checking alpha = 1 against the ensemble and the returned
model's FLOPs against the ensemble's, computed here independently of the library's graph.

* hidden neurons that no group holds (pinned by a per-neuron buffer, or a stream the model returns: a Hugging Face
  base model's hidden states) were merged unaligned: partial fusion at alpha = 1 returned the vanilla average
  (0.78 / 1.65 relative error against the ensemble, no warning). Now refused, naming the modules and the op;
* Bloom's ALiBi pins the attention heads: partial fusion at alpha = 1 was 0.45 off the ensemble;
* a depthwise convolution on a widened group kept ``groups`` at the member's channel count (partial fusion raised
  a bare torch error);
* ``nn.Conv1d`` runs its zero blocks: at alpha = 1 the "exact ensemble" the FLOP cap returned cost 1.6 x the
  ensemble;
* nearly constant neurons (std <= 1e-7 |mean|) escaped the dead-neuron tie-break of activation matching;
* Gemma's RMSNorm scale ``1 + weight`` was read as a capture point holding samples: every activation-based method
  raised "activations must have a sample axis".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _audit import F64
from _audit import random_model as _random
from _audit import rel as _rel
from _audit import run as _run
from _audit import state as _state
from _audit import unchanged as _unchanged
from torch import nn

import pyfusion
from pyfusion.graph import UnsupportedModuleError, trace_groups
from pyfusion.models import mlp
from pyfusion.testing import permuted_copy


class BufNet(nn.Module):
    """A per-neuron scale and shift kept as buffers (not parameters), dropout."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 10))
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 10))
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x) * self.scale + self.shift)))


def test_neurons_pinned_by_a_buffer_are_refused_not_merged_unaligned():
    a, b = _random(BufNet(), 1), _random(BufNet(), 2)
    x = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    graph = trace_groups(a, x)
    assert not graph.groups  # the buffer pins the hidden neurons: no group holds them
    (pin,) = graph.pinned
    assert (pin.size, pin.producers, pin.consumers) == (10, ("a",), ("b",)) and "'mul'" in pin.where
    before = [_state(a), _state(b)]
    for method, opts in [("partial", {"alpha": 1.0, "features": "weights"}), ("weight_matching", {}),
                         ("activation_matching", {}), ("cluster", {"alpha": 0.5})]:  # fmt: skip
        with pytest.raises(UnsupportedModuleError, match=r"10 neurons produced by a and read by b .*'mul'"):
            pyfusion.fuse([a, b], [x], method=method, **opts)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    # vanilla averaging aligns nothing: still allowed, and it says what it merged in place
    avg = pyfusion.fuse([a, b], [x], method="average")
    assert "10 neurons produced by a" in avg.fusion_info["pinned"][0]
    want = 0.5 * (a.a.weight + b.a.weight)
    torch.testing.assert_close(avg.a.weight, want, rtol=0, atol=1e-15)


def test_a_stream_the_model_returns_cannot_be_widened():
    """A Hugging Face base model returns its residual stream (hidden states): the stream is pinned by the output.
    Full fusion may merge it in place (the outputs are those coordinates); alpha = 1 cannot be the ensemble."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        vocab_size=50, max_position_embeddings=8)  # fmt: skip
    torch.manual_seed(0)
    a, b = _random(tf.BertModel(cfg), 1), _random(tf.BertModel(cfg), 2)
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    graph = trace_groups(a, ids)
    assert [p.where for p in graph.pinned] == ["the model's output"]
    assert "encoder.layer.0.intermediate.dense" in graph.pinned[0].consumers
    with pytest.raises(UnsupportedModuleError, match="cannot keep them per member.*A stream the model returns"):
        pyfusion.fuse([a, b], [ids], method="partial", alpha=1.0, graph=graph)
    fused = pyfusion.fuse([a, b], [ids], method="weight_matching", graph=graph)
    assert "merged in place" in fused.fusion_info["pinned"][0]


class Depthwise(nn.Module):
    """A MobileNet-style block: conv + BN, depthwise conv + BN, pointwise conv, pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu6(self.bn1(self.c1(x)))
        h = F.hardswish(self.bn2(self.dw(h)))
        return self.fc(F.adaptive_avg_pool2d(self.pw(h), 1).flatten(1))


def _depthwise_twin(m: Depthwise, seed: int) -> Depthwise:
    """The same function with the 8 channels and the 6 pointwise outputs permuted by hand (not by the library)."""
    gen = torch.Generator().manual_seed(seed)
    p, q = torch.randperm(8, generator=gen), torch.randperm(6, generator=gen)
    t = Depthwise().to(F64).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for k in ("c1.weight", "c1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "dw.weight",
              "dw.bias", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"):  # fmt: skip
        sd[k] = sd[k][p]
    sd["pw.weight"] = sd["pw.weight"][q][:, p]
    sd["pw.bias"] = sd["pw.bias"][q]
    sd["fc.weight"] = sd["fc.weight"][:, q]
    t.load_state_dict(sd)
    return t


def test_depthwise_conv_on_widened_groups():
    a, b, c = (_random(Depthwise(), s) for s in (1, 2, 3))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 6, 6, dtype=F64, generator=gen) for _ in range(2)]
    x = torch.randn(16, 3, 6, 6, dtype=F64, generator=gen)
    twin = _depthwise_twin(a, 5)
    y = _run(a, x)
    assert _rel(_run(twin, x), y) < 1e-12
    for alpha in (0.0, 0.5, 1.0):
        fused = pyfusion.fuse([a, twin], data, method="partial", alpha=alpha)
        assert _rel(_run(fused, x), y) < 1e-10, alpha
    ens = (_run(a, x) + _run(b, x) + _run(c, x)) / 3
    fused = pyfusion.fuse([a, b, c], data, method="partial", alpha=1.0)
    assert _rel(_run(fused, x), ens) < 1e-10
    dw = fused.get_submodule("dw")
    assert dw.groups == dw.in_channels == dw.out_channels == 24


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.Conv1d(8, 6, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        return self.fc(F.gelu(self.c2(h)).amax(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.Conv3d(8, 6, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        return self.fc(F.gelu(self.c2(h)).amax((-3, -2, -1)))


def test_dense_zero_block_layers_never_cost_more_than_the_ensemble():
    """No execution module skips an nn.Conv3d's zero blocks: the ensemble built as one network costs more than the
    members run one after another, so the cap returns the members themselves. An nn.Conv1d runs as PartialConv1d:
    the built ensemble costs exactly the members' FLOPs (before PartialConv1d, it was capped like the Conv3d)."""
    a, b = _random(Conv3dNet(), 1), _random(Conv3dNet(), 2)
    x = torch.randn(4, 3, 5, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    member_flops = 2 * (3 * 8 * 27 * 125 + 8 * 6 * 27 * 27 + 6 * 3)  # MACs x output positions
    fused = pyfusion.fuse([a, b], [x], method="partial", alpha=1.0)
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.ensemble_flops == 2 * member_flops
    assert cost.flops <= cost.ensemble_flops
    assert fused.fusion_info["ensemble_cap"]["capped"] and fused.fusion_info["effective_flops"] == cost.flops
    assert isinstance(fused, pyfusion.nn.SubEnsemble)
    assert _rel(_run(fused, x), 0.5 * (_run(a, x) + _run(b, x))) < 1e-12

    a, b = _random(Conv1dNet(), 1), _random(Conv1dNet(), 2)
    x = torch.randn(16, 3, 10, dtype=F64, generator=torch.Generator().manual_seed(0))
    member_flops = 2 * (3 * 8 * 3 * 10 + 8 * 6 * 3 * 8 + 6 * 3)
    fused = pyfusion.fuse([a, b], [x], method="partial", alpha=1.0)
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.ensemble_flops == 2 * member_flops == cost.flops
    assert type(fused) is Conv1dNet and not fused.fusion_info["ensemble_cap"]["capped"]
    assert _rel(_run(fused, x), 0.5 * (_run(a, x) + _run(b, x))) < 1e-12


def test_bloom_alibi_heads_cannot_be_widened(monkeypatch):
    """Bloom's ALiBi adds a per-head slope table to the attention scores: the heads are pinned (no permutation of
    them keeps the function). Full fusion merges them in place; a widened plan was 0.45 off the ensemble at
    alpha = 1, silently: refused, naming the op."""
    tf = pytest.importorskip("transformers")
    from pyfusion.fuse import builder

    monkeypatch.setattr(builder, "check_fused_widths", lambda *args, **kwargs: None)  # the outputs are compared
    cfg = tf.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=50, use_cache=False)
    torch.manual_seed(0)
    a, b = _random(tf.BloomForCausalLM(cfg), 1), _random(tf.BloomForCausalLM(cfg), 2)
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    graph = trace_groups(a, ids)
    (pin,) = graph.pinned
    assert pin.consumers == ("transformer.h.0.self_attention.dense",) and "'baddbmm'" in pin.where
    assert pin.buffer is None
    before = [_state(a), _state(b)]
    with pytest.raises(UnsupportedModuleError, match="cannot keep them per member.*'baddbmm'"):
        pyfusion.fuse([a, b], [ids], method="partial", alpha=1.0, graph=graph)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    fused = pyfusion.fuse([a, twin], [ids], method="weight_matching", graph=graph)
    assert _rel(_run(fused, ids), _run(a, ids)) < 1e-10
    assert "'baddbmm'" in fused.fusion_info["pinned"][0]


def test_nearly_constant_neurons_are_tie_broken_like_constant_ones():
    """Neurons with std <= 1e-7 |mean| (a huge bias, a saturated activation) have correlation 0 with everything,
    like exactly constant ones, but were left out of the dead-neuron tie-break (var == 0 only): they tied at cost 1
    and activation matching of a model with its permuted copy was 0.52 off."""
    torch.manual_seed(0)
    m = _random(mlp([6, 10, 3]), 1)
    lin = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    with torch.no_grad():
        for j in range(4):  # std / mean ~ 1e-9 on any input
            lin[0].weight[j] *= 1e-5
            lin[0].bias[j] = 1e3 * (j + 1)
        lin[1].weight.mul_(1e-3)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 6, dtype=F64, generator=gen)]
    x = torch.randn(32, 6, dtype=F64, generator=gen)
    twin = permuted_copy(m, torch.Generator().manual_seed(1), example_inputs=data[0])
    y = _run(m, x)
    assert _rel(_run(twin, x), y) < 1e-12
    for cost in ("correlation", "sqdist"):
        fused = pyfusion.fuse([m, twin], data, method="activation_matching", cost=cost)
        assert _rel(_run(fused, x), y) < 1e-12, cost


def test_gemma_norm_scale_is_not_a_capture_point(monkeypatch):
    tf = pytest.importorskip("transformers")
    from pyfusion.fuse import builder

    monkeypatch.setattr(builder, "check_fused_widths", lambda *args, **kwargs: None)  # the outputs are compared
    cfg = tf.GemmaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=4, intermediate_size=24, vocab_size=50, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    a, b = _random(tf.GemmaForCausalLM(cfg), 1), _random(tf.GemmaForCausalLM(cfg), 2)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50, (4, 5), generator=gen) for _ in range(2)]
    graph = trace_groups(a, data[0])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, data[0])
    assert _rel(_run(twin, data[0]), y) < 1e-5  # Gemma's RMSNorm computes in float32
    for method, opts in [("activation_matching", {}), ("partial", {"alpha": 0.5})]:
        fused = pyfusion.fuse([a, twin], data, method=method, graph=graph, **opts)
        assert _rel(_run(fused, data[0]), y) < 1e-5, method
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert _rel(_run(fused, data[0]), 0.5 * (_run(a, data[0]) + _run(b, data[0]))) < 1e-5


def test_opt_heads_widen_and_save(monkeypatch, tmp_path):
    """OPT views q / k / v as (batch, -1, num_heads, head_dim): without an adapter the fused heads folded into the
    sequence axis (partial fusion raised a broadcast error); its config's ``_remove_final_layer_norm`` flag made
    ``pyfusion.save`` refuse the file."""
    tf = pytest.importorskip("transformers")
    from pyfusion.fuse import builder

    monkeypatch.setattr(builder, "check_fused_widths", lambda *args, **kwargs: None)  # the outputs are compared
    cfg = tf.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, ffn_dim=24, vocab_size=50,
                       max_position_embeddings=16, word_embed_proj_dim=16, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    a, b = _random(tf.OPTForCausalLM(cfg), 1), _random(tf.OPTForCausalLM(cfg), 2)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(2, 50, (4, 5), generator=gen) for _ in range(2)]
    graph = trace_groups(a, data[0])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, data[0])
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.5, graph=graph)
    assert _rel(_run(fused, data[0]), y) < 1e-10
    ens = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert _rel(_run(ens, data[0]), 0.5 * (_run(a, data[0]) + _run(b, data[0]))) < 1e-10
    pyfusion.save(fused, tmp_path / "opt.safetensors")
    again = pyfusion.load(tmp_path / "opt.safetensors")
    assert torch.equal(_run(again, data[0]), _run(fused, data[0]))


def test_members_with_equal_shapes_but_other_head_counts_are_refused():
    """GPT-2 with 4 heads of 8 and with 2 heads of 16 has the same tensors: fusing them read member 1's heads as
    member 0's, silently. Module attributes (head counts, groups, flags) are part of the architecture."""
    tf = pytest.importorskip("transformers")
    cfg = dict(n_embd=16, n_layer=1, vocab_size=50, n_positions=8, use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    a, b = tf.GPT2LMHeadModel(tf.GPT2Config(n_head=4, **cfg)), tf.GPT2LMHeadModel(tf.GPT2Config(n_head=2, **cfg))
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match=r"models\[1\] has a different architecture.*attributes differ.*head_dim"):
        pyfusion.fuse([a, b], [ids], method="weight_matching")
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    c = tf.GPT2LMHeadModel(tf.GPT2Config(n_head=4, **cfg))
    c.gradient_checkpointing = c.transformer.gradient_checkpointing = True  # a flag that does not change the function
    pyfusion.fuse([a, c], [ids], method="average")


class InstNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.n(self.c1(x))).mean((2, 3)))


def test_instance_norm_on_widened_groups():
    """An affine InstanceNorm2d kept ``num_features`` at the member's width: every widened plan raised."""
    a, b = _random(InstNormNet(), 1), _random(InstNormNet(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 5, 5, dtype=F64, generator=gen)]
    x = torch.randn(8, 3, 5, 5, dtype=F64, generator=gen)
    twin = permuted_copy(a, torch.Generator().manual_seed(1), example_inputs=data[0])
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.5)
    assert _rel(_run(fused, x), _run(a, x)) < 1e-10
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0)
    assert _rel(_run(fused, x), 0.5 * (_run(a, x) + _run(b, x))) < 1e-10
    assert fused.n.num_features == 16


class SortedNet(nn.Module):
    """Hidden neurons sorted by value: no permutation of them keeps the function, so no group holds them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.b(torch.sort(self.a(x), -1).values)


def test_a_graph_without_groups_is_never_the_ensemble():
    """With every hidden neuron pinned the plan has no group to widen: partial fusion at alpha = 1 (weights)
    returned the vanilla average, and activation matching said "data yielded no batches" (now: no groups)."""
    a, b = _random(SortedNet(), 1), _random(SortedNet(), 2)
    x = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert not trace_groups(a, x).groups
    with pytest.raises(UnsupportedModuleError, match=r"alpha > 0.*10 neurons produced by a and read by b.*'sort'"):
        pyfusion.fuse([a, b], [x], method="partial", alpha=1.0, features="weights")
    with pytest.raises(ValueError, match="no activations to observe.*no neuron groups"):
        pyfusion.fuse([a, b], [x], method="activation_matching")
    fused = pyfusion.fuse([a, b], [x], method="weight_matching")  # nothing to align: merged in place, said so
    torch.testing.assert_close(fused.a.weight, 0.5 * (a.a.weight + b.a.weight), rtol=0, atol=1e-15)
    assert "'sort'" in fused.fusion_info["pinned"][0]


class RenormNet(nn.Module):
    def __init__(self, max_norm=1.0):
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=max_norm)
        self.a, self.b = nn.Linear(8, 10), nn.Linear(10, 3)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.emb(ids)))).mean(1)


class CountingNet(nn.Module):
    """A forward that writes into its own buffer (a call counter)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def test_a_forward_that_changes_the_members_is_refused():
    """nn.Embedding(max_norm=...) renormalizes its weight in place on every forward: a failed fusion changed
    member 0 (its weight rescaled by the data check)."""
    torch.manual_seed(0)
    a, b = RenormNet(), RenormNet()
    with torch.no_grad():
        a.emb.weight.mul_(3)
    ids = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match=r"module 'emb' \(Embedding, max_norm=1.0\) renormalizes its weight"):
        pyfusion.fuse([a, b], [ids], method="activation_matching")
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    c, d = CountingNet(), CountingNet()
    with pytest.raises(ValueError, match=r"models\[0\] changed its own tensors in place.*'calls'"):
        pyfusion.fuse([c, d], [torch.randn(4, 6)], method="activation_matching")
    assert float(d.calls) == 0  # refused at the first forward: no member ran again
