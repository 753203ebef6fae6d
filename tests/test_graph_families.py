"""The tracer on every family of issue 12: the groups it finds (heads, ties, segments, pins, normalizers, tied
embeddings) and their verification; wrong declarations are caught."""

from __future__ import annotations

import pytest
import torch
from _ir_models import CatNet, ConvLast, EncoderNet, GatedRMSNet, HandViT, MHANet, SplitAttention, hf_models
from torch import nn

from pyfusion import models
from pyfusion.graph import GroupVerificationError, UnsupportedModuleError, declare_groups, trace_groups, verify_groups

HF = hf_models()
needs_hf = pytest.mark.skipif(not HF, reason="transformers is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _group(graph, module, param="weight", role="producer"):
    return next(
        g for g in graph.groups.values() if any(r.key == f"{module}.{param}" and r.role == role for r in g.refs)
    )


def _refs(group, key):
    return sorted((r.axis, r.role, r.offset, r.pattern, r.expand) for r in group.refs if r.key == key)


def test_catnet_segments_gaps_and_in_place_ops():
    g = trace_groups(CatNet(), torch.randn(3, 5, 6))
    assert g.verified and g.source == "export" and len(g.groups) == 3
    a, b, d = _group(g, "a"), _group(g, "b"), _group(g, "d")
    # out = c(cat(a, b)); out += cat(a, b): c's rows and columns both hold the a | b segments
    assert _refs(a, "c.weight") == [(0, "producer", 0, (("unit", 8),), 1), (1, "consumer", 0, (("unit", 8),), 1)]
    assert _refs(b, "c.weight") == [(0, "producer", 8, (("unit", 4),), 1), (1, "consumer", 8, (("unit", 4),), 1)]
    assert _refs(b, "d.weight") == [(1, "consumer", 8, (("unit", 4),), 1)]
    # head reads cat([d, x.mean(1)]): d's segment, then a gap of 6 raw-input columns
    assert _refs(d, "head.weight") == [(1, "consumer", 0, (("unit", 10),), 1)]
    assert a.activation == "relu" and a.post_points == ["act"]  # nn.ReLU(inplace=True) is still the activation


def test_channels_last_flatten_is_a_rep_before_the_unit():
    g = trace_groups(ConvLast(), torch.randn(3, 2, 4, 4))
    c2 = _group(g, "c2")
    assert _refs(c2, "fc.weight") == [(1, "consumer", 0, (("rep", 16), ("unit", 5)), 1)]
    assert {r.key for r in _group(g, "c1").per_neuron} == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}


def _attention_pair(g, qk_producer, param="weight"):
    """(q/k group, v/o group): the q/k group holds the first segment of the q (or packed qkv) projection."""
    key = f"{qk_producer}.{param}"
    qk = next(
        x for x in g.groups.values() if any(r.key == key and r.role == "producer" and r.offset == 0 for r in x.refs)
    )
    vo = next(x for x in g.groups.values() if x.tie == qk.tie and x is not qk)
    return qk, vo


def test_multihead_attention_packed_in_proj_is_two_tied_head_groups():
    g = trace_groups(MHANet(), torch.randn(2, 5, 5))
    assert len(g.groups) == 4
    qk, vo = _attention_pair(g, "mha", "in_proj_weight")
    assert (qk.units, qk.unit_size, vo.units, vo.unit_size) == (4, 4, 4, 4) and qk.tie == vo.tie is not None
    heads = (("unit", 4), ("inner", 4))
    assert _refs(qk, "mha.in_proj_weight") == [(0, "producer", 0, heads, 1), (0, "producer", 16, heads, 1)]
    assert _refs(vo, "mha.in_proj_weight") == [(0, "producer", 32, heads, 1)]
    assert _refs(vo, "mha.out_proj.weight") == [(1, "consumer", 0, heads, 1)]
    stream = _group(g, "emb")
    assert [(n.module, n.kind, n.wrappable) for n in stream.normalizers] == [
        ("ln1", "LayerNorm", True), ("ln2", "LayerNorm", True)
    ]  # fmt: skip
    assert {"mha.in_proj_weight", "ff1.weight", "out.weight"} <= {r.key for r in stream.consumers}


def test_transformer_encoder_layers():
    g = trace_groups(EncoderNet(), torch.randn(2, 5, 5))
    assert len(g.groups) == 7  # stream + (q/k heads, v/o heads, FFN) per layer
    assert len(g.ties()) == 2
    stream = _group(g, "inp")
    assert len(stream.normalizers) == 4 and all(n.wrappable for n in stream.normalizers)


def test_swiglu_and_rmsnorm_modules_called_twice():
    g = trace_groups(GatedRMSNet(), torch.randint(0, 20, (3, 4)))
    ffn = _group(g, "gate")
    assert {r.key for r in ffn.producers} == {"gate.weight", "up.weight"} and ffn.activation == "functional:silu"
    stream = _group(g, "emb")
    assert [(n.module, n.kind, n.wrappable) for n in stream.normalizers] == [
        ("n1", "RMSNorm", True), ("n2", "UserRMSNorm", True)
    ]  # fmt: skip


@pytest.mark.parametrize("attention", ["packed", "split"])
def test_hand_written_attention_cls_token_position_embedding_layer_scale(attention):
    model = HandViT() if attention == "packed" else HandViT(attention=SplitAttention)
    g = trace_groups(model, torch.randn(2, 1, 8, 8))
    stream = _group(g, "patch")
    keys = {(r.key, r.axis, r.role) for r in stream.refs}
    assert {("cls", 2, "neuron"), ("pos", 2, "neuron"), ("blocks.0.gamma", 0, "neuron")} <= keys
    assert len(stream.normalizers) == 5
    qk, vo = _attention_pair(g, "blocks.0.attn.qkv" if attention == "packed" else "blocks.0.attn.q")
    assert (qk.units, qk.unit_size, vo.unit_size) == (4, 4, 4)


@needs_hf
def test_bert_heads_ffn_stream_with_layernorms():
    factory, x = HF["bert"]
    g = trace_groups(factory(), x)
    assert len(g.groups) == 8 and len(g.ties()) == 2
    qk, vo = _attention_pair(g, "bert.encoder.layer.0.attention.self.query")
    assert (qk.units, qk.unit_size) == (4, 8) and {r.key for r in qk.producers} == {
        f"bert.encoder.layer.0.attention.self.{p}.{w}" for p in ("query", "key") for w in ("weight", "bias")
    }
    assert _refs(vo, "bert.encoder.layer.0.attention.output.dense.weight") == [
        (1, "consumer", 0, (("unit", 4), ("inner", 8)), 1)
    ]
    stream = _group(g, "bert.embeddings.word_embeddings")
    assert {"bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"} <= {
        r.key for r in stream.producers
    }
    assert len(stream.normalizers) == 5 and all(n.kind == "LayerNorm" and n.wrappable for n in stream.normalizers)


@needs_hf
def test_vit_cls_token_and_heads():
    factory, x = HF["vit"]
    g = trace_groups(factory(), x)
    stream = _group(g, "vit.embeddings.patch_embeddings.projection")
    keys = {(r.key, r.axis) for r in stream.per_neuron}
    assert {("vit.embeddings.cls_token", 2), ("vit.embeddings.position_embeddings", 2)} <= keys
    qk, vo = _attention_pair(g, "vit.layers.0.attention.q_proj")
    assert (qk.units, qk.unit_size, vo.units, vo.unit_size) == (4, 8, 4, 8)


@needs_hf
def test_gpt2_packed_c_attn_and_tied_embeddings():
    factory, x = HF["gpt2"]
    g = trace_groups(factory(), x)
    assert g.tied_params == [("transformer.wte.weight", "lm_head.weight")]
    stream = _group(g, "transformer.wte")
    assert ("transformer.wte.weight", 1, "producer") in {(r.key, r.axis, r.role) for r in stream.refs}
    assert ("lm_head.weight", 1, "consumer") in {(r.key, r.axis, r.role) for r in stream.refs}
    qk, vo = _attention_pair(g, "transformer.h.0.attn.c_attn")
    heads = (("unit", 4), ("inner", 8))
    # Conv1D weights are (in, out): c_attn writes q | k | v on axis 1
    assert _refs(qk, "transformer.h.0.attn.c_attn.weight") == [
        (1, "producer", 0, heads, 1),
        (1, "producer", 32, heads, 1),
    ]
    assert _refs(vo, "transformer.h.0.attn.c_attn.weight") == [(1, "producer", 64, heads, 1)]
    assert _refs(vo, "transformer.h.0.attn.c_proj.weight") == [(0, "consumer", 0, heads, 1)]
    ffn = _group(g, "transformer.h.0.mlp.c_fc")
    assert ffn.activation == "newgeluactivation" and "tanh" in ffn.activation_ops


@needs_hf
def test_llama_gqa_rotary_pins_qk_inner_swiglu_rmsnorm():
    factory, x = HF["llama"]
    g = trace_groups(factory(), x)
    qk = _group(g, "model.layers.0.self_attn.q_proj")
    vo = _group(g, "model.layers.0.self_attn.v_proj")
    assert qk.tie == vo.tie is not None
    # a unit is a kv head with its q heads; rotary tables vary along the q / k inner dims: pinned (reps)
    assert (qk.units, qk.unit_size) == (2, 1)
    assert _refs(qk, "model.layers.0.self_attn.q_proj.weight") == [(0, "producer", 0, None, 32)]  # 2 q heads x 16
    assert _refs(qk, "model.layers.0.self_attn.k_proj.weight") == [(0, "producer", 0, None, 16)]
    # v / o inner dims are free; o_proj reads each kv head's values once per q head of its group
    assert (vo.units, vo.unit_size) == (2, 16)
    assert _refs(vo, "model.layers.0.self_attn.o_proj.weight") == [
        (1, "consumer", 0, (("unit", 2), ("rep", 2), ("inner", 16)), 1)
    ]
    ffn = _group(g, "model.layers.0.mlp.gate_proj")
    assert {r.key for r in ffn.producers} == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    }
    stream = _group(g, "model.embed_tokens")
    assert len(stream.normalizers) == 5 and all(n.kind == "LlamaRMSNorm" and n.wrappable for n in stream.normalizers)
    assert not g.tied_params


@needs_hf
def test_llama_declared_free_rotary_inner_is_caught():
    """Declaring the q/k inner dims free (a false symmetry under rotary embeddings) fails verification."""
    factory, x = HF["llama"]
    m = factory()
    g = trace_groups(m, x)
    spec = {}
    for name, gr in g.groups.items():
        spec[name] = {
            "producers": list(gr.producers), "neurons": list(gr.per_neuron), "consumers": list(gr.consumers),
            "unit_size": gr.unit_size, "tie": gr.tie,
        }  # fmt: skip
    qk = _group(g, "model.layers.0.self_attn.q_proj").name
    refs = []
    for r in spec[qk]["producers"]:
        inner = 16
        pattern = (("unit", 2), ("rep", 2), ("inner", inner)) if "q_proj" in r.key else (("unit", 2), ("inner", 16))
        refs.append({"key": r.key, "axis": 0, "pattern": pattern})
    spec[qk] = {"producers": refs, "unit_size": 16, "tie": spec[qk]["tie"]}
    with pytest.raises(GroupVerificationError, match=r"self_attn\.q_proj.*declare_groups") as err:
        declare_groups(m, spec, example_inputs=x)
    assert qk in err.value.groups[0] and err.value.difference > 1e-3


def test_wrong_declared_group_is_caught_with_the_documented_error():
    m = models.mlp([6, 5, 4, 3])
    spec = {"h": {"producers": ["1.weight", "1.bias"], "consumers": ["3.weight"]}}
    declare_groups(m, spec)  # right: verified
    wrong = {"h": {"producers": ["1.weight"], "consumers": ["3.weight"]}}  # forgets the bias
    with pytest.raises(GroupVerificationError, match=r"group 'h' failed verification.*\['1', '3'\].*declare_groups"):
        declare_groups(m, wrong)
    assert declare_groups(m, wrong, verify=False).verified is False  # the expert opt-out


def test_traced_groups_are_verified_and_a_broken_graph_is_named():
    m = models.resnet20(1, blocks=1)
    g = trace_groups(m)
    assert g.verified
    stream = next(iter(g.groups.values()))
    stream.refs = [r for r in stream.refs if r.key != "layer1.0.conv2.weight"]  # a tracer mistake
    with pytest.raises(GroupVerificationError, match=r"g0:conv1") as err:
        verify_groups(m, g)
    assert err.value.groups == ["g0:conv1"] and err.value.difference > 0


def test_unsupported_op_is_named_and_example_inputs_are_asked_for():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.fft.fft(self.fc(x)).real)

    with pytest.raises(UnsupportedModuleError, match=r"node '.*' \(op 'fft.*'.*declare"):
        trace_groups(Sorts())

    class NoLayer(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ValueError, match="example_inputs"):
        trace_groups(NoLayer())


def test_chain_walk_is_used_only_when_it_passes_verification():
    class Branchy(nn.Module):
        """Data-dependent control flow (no export) around a residual block: not a chain."""

        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            if h.sum() > 0:
                h = h + self.fc2(torch.relu(h))
            else:
                h = h - self.fc2(torch.relu(h))
            return self.fc3(h)

    with pytest.raises(UnsupportedModuleError, match=r"could not trace Branchy.*as a chain.*change its function"):
        trace_groups(Branchy())
    with pytest.raises(Exception, match="(?i)data.dependent|guard|control flow"):
        trace_groups(Branchy(), allow_walk=False)


def test_parameters_transformed_in_forward_keep_their_roles():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.log_gain = nn.Parameter(torch.zeros(6))
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.nn.functional.linear(x, self.w * 0.5)
            return self.out(torch.tanh(h * self.log_gain.exp()))

    g = trace_groups(Scaled(), torch.randn(3, 4))
    (grp,) = g.groups.values()
    assert sorted((r.key, r.axis, r.role) for r in grp.refs) == [
        ("log_gain", 0, "neuron"), ("out.weight", 1, "consumer"), ("w", 0, "producer")
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["mha", "llama"])
def test_neuron_view_rows_follow_the_permutation(name):
    """``neuron_view`` reads each neuron's entries whatever the layout: after permuting one tie set, row s of each
    of its references is row perm[s] of the original (heads, GQA reps, packed segments included)."""
    from _ir_families import randomize

    from pyfusion.graph import neuron_view, permuted_state, random_group_permutations

    if name == "llama" and "llama" not in HF:
        pytest.skip("transformers is not installed")
    factory, x = HF[name] if name in HF else (MHANet, (torch.randn(2, 5, 5, dtype=torch.float64),))
    a = randomize(factory(), 1)
    g = trace_groups(a, x)
    own = {k: v.detach() for k, v in a.named_parameters(remove_duplicate=False)}
    perms = random_group_permutations(g, torch.Generator().manual_seed(0))
    checked = set()
    for tie_set in g.tie_sets():
        new = permuted_state(own, g, {n: perms[n] for n in tie_set})
        for gname in tie_set:
            gr = g.groups[gname]
            for r in gr.refs:
                others = [o for n in tie_set for o in g.groups[n].refs if o.key == r.key and o.axis != r.axis]
                if r.key not in own or others:
                    continue
                rows = neuron_view(own[r.key], r, gr)
                assert rows.shape[0] == gr.size
                torch.testing.assert_close(neuron_view(new[r.key], r, gr), rows[perms[gname]], rtol=0, atol=0)
                checked.add(r.pattern)
    assert None in checked and any(p is not None and ("inner", 4 if name == "mha" else 16) in p for p in checked)
    if name == "llama":  # o_proj reads each kv head once per q head of its group
        assert (("unit", 2), ("rep", 2), ("inner", 16)) in checked


def test_encoder_fast_path_does_not_hide_the_heads_under_export():
    """In eval mode without gradients nn.TransformerEncoderLayer takes a fused C++ fast path eagerly; under
    torch.export it traces the Python path (linear / sdpa / layer_norm), so the heads are found all the same."""
    from pyfusion.graph.export import clear_cache, export_program

    m = EncoderNet().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, 5)
    clear_cache()
    with torch.no_grad():
        ops = {str(n.target) for n in export_program(m, (x,)).graph.nodes}
        g = trace_groups(m, x)
    assert not any("_transformer_encoder_layer_fwd" in o or "_native_multi_head_attention" in o for o in ops)
    assert len(g.groups) == 7 and g.verified
