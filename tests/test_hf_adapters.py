"""Partial fusion (widened attention heads) of Hugging Face families whose attention (or head) had no adapter.

Before: ``pyfusion.fuse([m, p], data, method="partial", alpha=0.5)`` was refused after the build for Falcon with
``new_decoder_architecture=True`` (its fused ``query_key_value`` is viewed per key / value group through
``num_kv_heads``), Phi-3 (``qkv_proj`` split at ``self.config.num_attention_heads * head_dim``: a count read from the
config every layer shares), the Whisper encoder (keys / values viewed through ``num_heads``), MPNet and MobileViT
(their self attention merges the heads back with ``view(..., all_head_size)``) and Segformer's classification model
(it flattens the last stage with ``reshape(batch, -1, self.config.hidden_sizes[-1])`` before pooling): "the fused X
does not run / trace with the fused widths (RuntimeError: ...)". Full-width fusion worked. Falcon, once it built, was
still always returned as the members' SubEnsemble: its ``FalconLinear`` (an ``nn.Linear`` subclass with its own,
affine, forward) was neither swapped into a partial module nor counted by its stored blocks, so every widened Falcon
cost more than the ensemble.

Now adapters (pyfusion.fuse.builder) update the sizes each module's forward reads; Phi-3's attention and Segformer's
classification model get their own view of the config (:class:`pyfusion._module_config.ModuleConfig`: the head
counts, or ``hidden_sizes`` ending with the classifier's fused width; everything else read from the shared config,
which stays unchanged for the rotary embedding, Segformer's encoder and ``set_attn_implementation``), and pyfusion
files store that view's sizes (integers, or a list of as many integers). Checked per family (tiny float64 configs,
every parameter re-drawn), with Mistral and Qwen2 (no adapter needed) alongside:

1. partial fusion at alpha 0, 0.5 and 1 with a permuted copy gives the model back (1e-8 relative; 1e-6 where the
   model computes its RMSNorm in float32), and alpha 0.5 really widens the heads (Segformer: and its config view
   follows the widened last stage);
2. with an independent member, alpha = 1 is the ensemble (1e-10) and ``pyfusion.cost`` is at most the ensemble's;
3. the default fast modules, forced fast modules (``"always"``) and dense layers give the same outputs, and
   ``pyfusion.save`` / ``pyfusion.load`` round-trip each (Whisper's pooled encoder with ``factory=``);

and a layout an adapter cannot express is a ``ValueError`` naming the module, which ``pyfusion.fuse`` passes on with
the members unchanged.
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
from pyfusion._module_config import ModuleConfig
from pyfusion.fuse import builder
from pyfusion.graph import trace_groups
from pyfusion.testing import permuted_copy

tf = pytest.importorskip("transformers")

V = 50


class PooledEncoder(nn.Module):
    """Whisper's encoder mean-pooled into a Linear head (a returned stream cannot be widened)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = tf.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                               num_mel_bins=8, max_source_positions=8, decoder_layers=1, decoder_attention_heads=4,
                               decoder_ffn_dim=48, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                               decoder_start_token_id=1)  # fmt: skip
        self.base, self.head = WhisperEncoder(cfg), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x).last_hidden_state.mean(1))


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, V, (4, 6), generator=g)


def _mel(g: torch.Generator) -> torch.Tensor:
    return torch.randn(4, 8, 16, generator=g, dtype=F64)  # 2 * max_source_positions frames


def _pixels(g: torch.Generator) -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=g, dtype=F64)


_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
           vocab_size=V, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)  # fmt: skip
# fmt: off
FAMILIES = {
    # name: (factory, inputs, tolerance of the permuted copy (float32 RMSNorm inside), attention module class)
    "falcon": (
        lambda: tf.FalconForCausalLM(tf.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
            alibi=False, vocab_size=V, use_cache=False, bos_token_id=1, eos_token_id=1)),
        _ids, 1e-8, "FalconAttention",
    ),
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_LM)), _ids, 1e-6, "Phi3Attention"),
    # views by self.num_heads / self.num_key_value_heads; partial rotary (a quarter of each head's dims)
    "stablelm": (lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_LM)), _ids, 1e-8, "StableLmAttention"),
    "whisper_encoder": (PooledEncoder, _mel, 1e-8, "WhisperAttention"),
    "mpnet": (
        lambda: tf.MPNetForSequenceClassification(tf.MPNetConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=V,
            max_position_embeddings=20, num_labels=3)),
        _ids, 1e-8, "MPNetSelfAttention",
    ),
    "segformer": (  # sr_ratio 2: stage 0's keys / values read a strided Conv2d of the widened stream
        lambda: tf.SegformerForImageClassification(tf.SegformerConfig(
            num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
            patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[2, 2], mlp_ratios=[2, 2], num_labels=3)),
        _pixels, 1e-8, "SegformerAttention",
    ),
    "mobilevit": (
        lambda: tf.MobileViTForImageClassification(tf.MobileViTConfig(
            num_channels=3, image_size=16, patch_size=2, hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2, num_labels=3)),
        _pixels, 1e-8, "MobileViTSelfAttention",
    ),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_LM)), _ids, 1e-6, "MistralAttention"),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LM)), _ids, 1e-6, "Qwen2Attention"),
}
# fmt: on


_SETUPS: dict[str, tuple] = {}


def _setup(name: str):
    """(factory, member a, member b, calibration batches, fresh inputs, tolerance, attention class, a's graph), built
    once per family (the trace is a torch.export: a second of each test's budget). The tests check the members are
    unchanged, so sharing them is safe."""
    if name not in _SETUPS:
        factory, inputs, tol, attn = FAMILIES[name]
        torch.manual_seed(0)
        a, b = _random(factory(), 1), _random(factory(), 2)
        gen = torch.Generator().manual_seed(0)
        data = [inputs(gen) for _ in range(2)]
        x = inputs(torch.Generator().manual_seed(99))  # not the calibration data
        _SETUPS[name] = (factory, a, b, data, x, tol, attn, trace_groups(a, data[0]))
    return _SETUPS[name]


def _heads(model: nn.Module, attn: str) -> list[int]:
    """Query heads per attention layer, from the output projection's input width (MobileViT's is outside the
    module: its query projection's output width)."""
    out = []
    for m in model.modules():
        if type(m).__name__ == attn:
            hd = int(getattr(m, "head_dim", 0) or m.attention_head_size)
            o = next((getattr(m, n) for n in ("dense", "o_proj", "out_proj", "o") if hasattr(m, n)), None)
            # nn.Linear or pyfusion's PartialLinear
            out.append((int(o.in_features) if o is not None else int(m.query.out_features)) // hd)
    return out


# MobileViT: nine attention layers (its stage depths are fixed), ~20 s a fusion
ADAPTED = [
    "falcon", "phi3", "stablelm", "whisper_encoder", "mpnet", "segformer",
    pytest.param("mobilevit", marks=pytest.mark.slow),
]  # fmt: skip


def _check_phi3_views(fused: nn.Module, heads: list[int]) -> None:
    """Each attention layer reads its own head counts from its config view; the shared config (the rotary
    embedding's) keeps the member's."""
    shared = fused.config
    assert shared.num_attention_heads == 4 and shared.num_key_value_heads == 2
    assert fused.model.rotary_emb.config is shared
    for layer, h in zip(fused.model.layers, heads):
        view = layer.self_attn.config
        assert isinstance(view, ModuleConfig) and view.shared is shared
        assert view.num_attention_heads == h and view.num_key_value_heads == h // 2
        assert view.hidden_size == shared.hidden_size  # everything else reads through


def _check_segformer_view(fused: nn.Module, member: nn.Module) -> None:
    """The classification model reads the last stage's width from its own config view (the classifier's fused
    input width, which alpha > 0 widens); the encoder keeps the shared config, with the member's sizes."""
    view, shared = fused.config, fused.segformer.config
    assert isinstance(view, ModuleConfig) and view.shared is shared
    assert shared.hidden_sizes == member.config.hidden_sizes
    width = int(fused.classifier.in_features)
    assert width > member.config.hidden_sizes[-1]
    assert view.hidden_sizes == [*member.config.hidden_sizes[:-1], width]


def _ensemble_build(a: nn.Module, b: nn.Module, graph) -> nn.Module:
    """The alpha = 1 model as the builder makes it (no FLOP cap): every group widened to both members' units."""
    from pyfusion.fuse.plan import Plan

    return builder.build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)), check=True)


@pytest.mark.parametrize("name", ADAPTED)
def test_permuted_copy_at_every_alpha(name):
    """alpha 0, 0.5, 1 with a permuted copy give the model back; alpha > 0 widens every attention layer's heads (the
    sizes the forward reads follow: Phi-3's own config views, the shared config untouched). alpha = 1 runs with
    every block-sparse layer swapped into a partial module (Whisper's nn.Conv1d stem too: before PartialConv1d it ran
    its zero blocks, cost more than the ensemble and was capped to the members' SubEnsemble)."""
    _factory, a, _b, data, x, tol, attn, graph = _setup(name)
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = _run(a, x)
    assert _rel(_run(twin, x), y) < tol
    before = [_state(a), _state(twin)]
    member_heads = _heads(a, attn)
    for alpha, fast in ((0.0, True), (0.5, True), (1.0, "always")):
        fused = pyfusion.fuse([a, twin], data, method="partial", alpha=alpha, graph=graph, fast_modules=fast)
        assert _rel(_run(fused, x), y) < tol, alpha
        assert type(fused) is type(a), fused.fusion_info.get("ensemble_cap")
        heads = _heads(fused, attn)
        if alpha == 0.0:
            assert heads == member_heads
        elif alpha == 0.5:  # every layer has more heads than a member
            assert all(h > m for h, m in zip(heads, member_heads)), (heads, member_heads)
        else:  # both members' heads
            assert heads == [2 * m for m in member_heads]
        if alpha == 1.0:
            assert fused.fusion_info["fast_modules"]  # partial modules really run
            if name == "whisper_encoder":
                convs = [m for p, m in fused.named_modules() if p in ("base.conv1", "base.conv2")]
                # conv1 reads the mel bins every member shares: no zero block, a plain Conv1d
                assert [type(m).__name__ for m in convs] == ["Conv1d", "PartialConv1d"]
        if name == "phi3" and alpha > 0:
            _check_phi3_views(fused, heads)
        if name == "segformer":
            if alpha > 0:
                _check_segformer_view(fused, a)
            else:  # nothing widened: the member's config
                assert fused.config is fused.segformer.config and not isinstance(fused.config, ModuleConfig)
    assert _unchanged(a, before[0]) and _unchanged(twin, before[1])


@pytest.mark.parametrize("name", ADAPTED)
def test_ensemble_cost_fast_modules_and_files(name, tmp_path):
    """An independent member: alpha = 1 is the ensemble, at no more FLOPs; alpha 0.5 with forced and without fast
    modules gives one function (widened heads, no more FLOPs than the ensemble), and the saved file of the one with
    partial modules loads back to it (Phi-3's config views included)."""
    factory, a, b, data, x, _tol, attn, graph = _setup(name)
    before = [_state(a), _state(b)]
    ens = 0.5 * (_run(a, x) + _run(b, x))
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert _rel(_run(fused, x), ens) < 1e-10
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.flops <= cost.ensemble_flops
    assert type(fused) is type(a), fused.fusion_info.get("ensemble_cap")
    assert _rel(_run(_ensemble_build(a, b, graph), x), ens) < 1e-10  # the builder's own alpha = 1, no swap
    models = {
        fast: pyfusion.fuse([a, b], data, method="partial", alpha=0.5, graph=graph, fast_modules=fast)
        for fast in (False, "always")
    }
    assert models["always"].fusion_info["fast_modules"]  # some layer really runs as a partial module
    dense = _run(models[False], x)
    for fast, m in models.items():
        assert type(m) is type(a), m.fusion_info.get("ensemble_cap")
        assert _heads(m, attn) != _heads(a, attn)
        assert pyfusion.cost(m, x, members=[a, b]).flops <= cost.ensemble_flops
        y = _run(m, x)
        assert _rel(y, dense) < 1e-12, fast
    # the file of the model with partial modules (the dense one differs only in its layers' classes)
    m = models["always"]
    path = pyfusion.save(m, tmp_path / "fused.safetensors")
    loaded = pyfusion.load(path, factory=factory if name == "whisper_encoder" else None)
    assert _rel(_run(loaded, x), _run(m, x)) < 1e-12
    assert _heads(loaded, attn) == _heads(m, attn)
    if name == "phi3":
        _check_phi3_views(loaded, _heads(m, attn))
    if name == "segformer":
        _check_segformer_view(loaded, a)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_families_without_adapters_still_widen(name):
    """Mistral and Qwen2 read no size the widening changes (their views use -1 and the projections' widths): partial
    fusion with a permuted copy gives the model back, and alpha = 1 of independent members is the ensemble."""
    _factory, a, b, data, x, tol, attn, graph = _setup(name)
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.5, graph=graph)
    assert _rel(_run(fused, x), _run(a, x)) < tol
    assert all(h > m for h, m in zip(_heads(fused, attn), _heads(a, attn)))
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert type(fused) is type(a)
    assert _rel(_run(fused, x), 0.5 * (_run(a, x) + _run(b, x))) < 1e-10
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.flops <= cost.ensemble_flops


def _falcon_attention(**flags) -> nn.Module:
    cfg = tf.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=V, alibi=False,
                          **flags)  # fmt: skip
    return tf.FalconForCausalLM(cfg).transformer.h[0].self_attention


def _resize(linear: nn.Module, rows: int | None = None, cols: int | None = None) -> None:
    out_f, in_f = linear.weight.shape
    linear.weight = nn.Parameter(torch.zeros(rows or out_f, cols or in_f))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.zeros(rows or out_f))


def test_inexpressible_layouts_are_named():
    """Layouts no size attribute can express: Falcon groups of unequal sizes, a second key / value head of a
    multi-query Falcon, Phi-3 heads not in whole groups, Whisper, MPNet and MobileViT q / k / v (and MPNet's o) of
    different widths or not whole heads."""
    orig = _falcon_attention(new_decoder_architecture=True, num_kv_heads=2)  # groups: 2 queries + k + v, 8 dims
    mod = _falcon_attention(new_decoder_architecture=True, num_kv_heads=2)
    _resize(mod.query_key_value, rows=3 * 32)  # three groups ...
    _resize(mod.dense, cols=7 * 8)  # ... but 7 query heads
    with pytest.raises(ValueError, match=r"^h\.0\.attn: Falcon's new decoder architecture .* unequal sizes"):
        builder._adapt_falcon_attention(mod, "h.0.attn", orig)
    _resize(mod.dense, cols=6 * 8)
    builder._adapt_falcon_attention(mod, "h.0.attn", orig)
    assert (mod.num_kv_heads, mod.num_heads, mod.num_key_value_groups) == (3, 6, 2)

    orig = _falcon_attention(multi_query=True, new_decoder_architecture=False)
    mod = _falcon_attention(multi_query=True, new_decoder_architecture=False)
    _resize(mod.query_key_value, rows=(6 + 4) * 8)
    _resize(mod.dense, cols=6 * 8)
    with pytest.raises(ValueError, match=r"^mq: multi-query Falcon has one key / value head .* need 2 of them"):
        builder._adapt_falcon_attention(mod, "mq", orig)

    phi = tf.Phi3ForCausalLM(tf.Phi3Config(**_LM))
    orig, mod = phi.model.layers[0].self_attn, tf.Phi3ForCausalLM(tf.Phi3Config(**_LM)).model.layers[0].self_attn
    _resize(mod.qkv_proj, rows=6 * 8 + 2 * 2 * 8)  # 6 queries for 2 key / value heads: ratio 3, not 2
    _resize(mod.o_proj, cols=6 * 8)
    with pytest.raises(ValueError, match=r"^layers\.0: the fused qkv_proj has 6 query heads for 2 key / value"):
        builder._adapt_phi3_attention(mod, "layers.0", orig)
    assert not isinstance(mod.config, ModuleConfig)  # nothing changed on a refusal

    enc = PooledEncoder().base.layers[0].self_attn
    _resize(enc.k_proj, rows=40)
    with pytest.raises(ValueError, match=r"^enc: the fused q / k / v projections write 32 / 40 / 32 rows"):
        builder._adapt_whisper_attention(enc, "enc", enc)

    mp = FAMILIES["mpnet"][0]().mpnet.encoder.layer[0].attention.attn
    _resize(mp.k, rows=24)  # 3 key heads of 8 dims for 2 query heads
    with pytest.raises(ValueError, match=r"^mp: the fused q / k / v projections write 16 / 24 / 16 rows and o reads"):
        builder._adapt_bert_attention(mp, "mp", mp)
    assert (mp.num_attention_heads, mp.all_head_size) == (2, 16)  # nothing changed on a refusal
    _resize(mp.k, rows=16)
    _resize(mp.o, cols=24)
    with pytest.raises(ValueError, match=r"^mp: .* 16 / 16 / 16 rows and o reads 24: not the same whole heads of 8"):
        builder._adapt_bert_attention(mp, "mp", mp)

    vit = FAMILIES["mobilevit"][0]().mobilevit.encoder.layer[2].transformer.layer[0].attention.attention
    _resize(vit.value, rows=20)  # not whole heads of 8
    with pytest.raises(ValueError, match=r"^vit: the fused query / key / value projections write 16 / 16 / 20 rows:"):
        builder._adapt_bert_attention(vit, "vit", vit)


def test_an_adapter_refusal_refuses_the_fusion(monkeypatch):
    """An adapter's ValueError (here: forced on Whisper's attention) comes out of pyfusion.fuse as that error, and
    the members are unchanged."""
    _factory, a, b, data, _x, _tol, _attn, _graph = _setup("whisper_encoder")

    def refuse(mod: nn.Module, path: str, original: nn.Module) -> None:
        raise ValueError(f"{path}: cannot express this layout")

    monkeypatch.setitem(builder._ADAPTERS, "WhisperAttention", refuse)
    before = [_state(a), _state(b)]
    with pytest.raises(ValueError, match=r"base\.layers\.0\.self_attn: cannot express this layout"):
        pyfusion.fuse([a, b], data, method="partial", alpha=0.5)
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])


def test_module_config_view_reads_through_and_survives_copies():
    """The view answers its overrides, reads every other key from the shared config when asked (a later
    set_attn_implementation reaches it), sets non-overridden keys on the shared config, and deep copies keep it
    pointing at the copied model's config."""
    import copy

    model = tf.Phi3ForCausalLM(tf.Phi3Config(**_LM))
    shared = model.config
    attn = model.model.layers[0].self_attn
    attn.config = ModuleConfig(attn.config, {"num_attention_heads": 6})
    assert attn.config.num_attention_heads == 6 and shared.num_attention_heads == 4
    model.set_attn_implementation("eager")
    assert attn.config._attn_implementation == "eager"
    attn.config.tie_word_embeddings = False
    assert shared.tie_word_embeddings is False
    assert ModuleConfig(attn.config, {"num_key_value_heads": 3}).shared is shared  # views never nest
    twin = copy.deepcopy(model)
    view = twin.model.layers[0].self_attn.config
    assert isinstance(view, ModuleConfig) and view.shared is twin.config and view.shared is not shared
    assert view.num_attention_heads == 6


def test_config_overrides_a_file_may_hold():
    """A file's config override is an integer replacing an integer, or a list of as many integers replacing a list
    (Segformer's per-stage ``hidden_sizes``); anything else (another length, a bool, a private key) is refused."""
    from pyfusion._member_files import _config_size

    assert _config_size("num_attention_heads", 6, 4)
    assert _config_size("hidden_sizes", [8, 24], [8, 16])
    assert not _config_size("hidden_sizes", [8], [8, 16])
    assert not _config_size("hidden_sizes", [8, True], [8, 16])
    assert not _config_size("hidden_sizes", [8, -1], [8, 16])
    assert not _config_size("hidden_sizes", 24, [8, 16])
    assert not _config_size("num_attention_heads", [6], 4)
    assert not _config_size("_attn_implementation_internal", 1, 0)


def test_single_head_attention_widens_into_one_head_per_member():
    """A one-head attention (Segformer's first stage): the view ``(B, N, C) -> (B, N, 1, C)`` makes its heads axis a
    unit of size 1, so q / k and v / o are unit groups of one head (not summed head dims) and widen into one head per
    member: alpha = 0.5 runs (the classifier's config view follows) and alpha = 1 is the ensemble."""
    factory = lambda: tf.SegformerForImageClassification(  # noqa: E731
        tf.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[1, 1], hidden_sizes=[8, 16],
                           patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                           num_labels=3))  # fmt: skip
    torch.manual_seed(0)
    a, b = _random(factory(), 1), _random(factory(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [_pixels(gen)]
    x = _pixels(gen)
    graph = trace_groups(a, data[0])
    one_head = [n for n in graph.groups if ".stages.0.blocks.0.attention." in n]
    assert len(one_head) == 2  # q / k and v
    assert all(graph.groups[n].size == graph.groups[n].unit_size == 8 for n in one_head)  # one unit: the head
    assert not any(graph.groups[n].contracted for n in one_head)
    before = [_state(a), _state(b)]
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=0.5, graph=graph)
    assert type(fused) is type(a)
    _check_segformer_view(fused, a)
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert type(fused) is type(a)
    with torch.no_grad():
        y, ya, yb = fused(x).logits, a(x).logits, b(x).logits
    assert float((y - 0.5 * (ya + yb)).abs().max() / (0.5 * (ya + yb)).abs().max()) < 1e-10
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
