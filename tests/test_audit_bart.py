"""Hugging Face BART (tiny float64 configs, every parameter re-drawn): what kept it from fusing, and what it gives now.

* ``BartEncoder`` reads ``inputs_embeds[:, :, -1]`` "for the shape only" (the positional embedding uses its shape):
  the tracer cut the stream into 15 | 1 at that select although nothing reads the value, so no LayerNorm on the
  stream held exactly its group and partial fusion refused alpha > 0 ("functional code inside that module"). The
  engine now skips values that reach neither the output nor an op with side effects.
* ``BartForSequenceClassification`` pools the stream with ``hidden_states[eos_mask, :]``: a boolean mask over the
  batch and token dims, whose row count depends on the data. The engine crashed with torch's raw
  ``GuardOnDataDependentSymNode`` reading that shape. Data-dependent sizes now take their values at the example
  inputs (one run of the exported graph), a boolean mask covers as many dims as it has, and a size without a value
  is an :class:`UnsupportedModuleError` naming the node, its module and the op.
* Both classification and generation return ``encoder_last_hidden_state``: the stream (encoder and decoder are one
  group through the shared token embedding) is pinned by the output on purpose, and alpha > 0 is refused saying so;
  a wrapper returning only the logits fuses exactly.
"""

from __future__ import annotations

import pytest
import torch
from _audit import F64, random_model, rel, run, state, unchanged
from torch import nn

import pyfusion
from pyfusion.graph import UnsupportedModuleError, trace_groups
from pyfusion.testing import permuted_copy

tf = pytest.importorskip("transformers")

V = 50
CONFIG = dict(
    d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=V, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
    eos_token_id=1, decoder_start_token_id=1,
)  # fmt: skip


class Pooled(nn.Module):
    """BartModel's last hidden state mean-pooled into a Linear head (a returned stream cannot be widened)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.head = base, nn.Linear(CONFIG["d_model"], 3)

    def forward(self, x):
        return self.head(self.base(x).last_hidden_state.mean(1))


class LogitsOnly(nn.Module):
    """A Hugging Face model returning only its logits (not the encoder's last hidden state)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x).logits


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, V, (4, 6), generator=g)


def _ids_eos(g: torch.Generator) -> torch.Tensor:
    """Token ids ending with the eos token (1), the one the classification head reads."""
    return torch.cat([torch.randint(3, V, (4, 5), generator=g), torch.ones(4, 1, dtype=torch.long)], 1)


def _classifier() -> nn.Module:
    return tf.BartForSequenceClassification(tf.BartConfig(num_labels=3, **CONFIG))


FAMILIES = {
    "pooled": (lambda: Pooled(tf.BartModel(tf.BartConfig(**CONFIG))), _ids),
    "lm_logits": (lambda: LogitsOnly(tf.BartForConditionalGeneration(tf.BartConfig(**CONFIG))), _ids),
    "classifier_logits": (lambda: LogitsOnly(_classifier()), _ids_eos),
}


def _members(name: str):
    factory, inputs = FAMILIES[name] if name in FAMILIES else UNWRAPPED[name]
    torch.manual_seed(0)
    a, b = random_model(factory(), 1), random_model(factory(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [inputs(gen) for _ in range(2)]
    return a, b, data, inputs(gen)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bart_permuted_copy_and_ensemble(name):
    """The stream's LayerNorms are member views; a permuted copy at alpha 0.5 gives the model back; alpha = 1 is the
    ensemble at no more FLOPs than it; the members are untouched."""
    a, b, data, x = _members(name)
    graph = trace_groups(a, data[0])
    assert graph.groups and not graph.pinned
    norms = [nz for g in graph.groups.values() for nz in g.normalizers]
    assert any(nz.module.endswith("encoder.layernorm_embedding") for nz in norms)
    assert all(nz.wrappable for nz in norms), [nz.module for nz in norms if not nz.wrappable]
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    y = run(a, x)
    assert rel(run(twin, x), y) < 1e-10
    before = [state(a), state(twin), state(b)]
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.5, graph=graph)
    assert rel(run(fused, x), y) < 1e-10
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert rel(run(fused, x), 0.5 * (run(a, x) + run(b, x))) < 1e-10
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.flops <= cost.ensemble_flops
    assert all(unchanged(m, s) for m, s in zip((a, twin, b), before))


UNWRAPPED = {
    "classifier": (_classifier, _ids_eos),
    "lm": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(**CONFIG)), _ids),
}


@pytest.mark.parametrize("name", list(UNWRAPPED))
def test_bart_returned_encoder_stream_is_pinned(name):
    """The unwrapped models trace (the eos-mask pooling included) and fuse fully; alpha > 0 is refused because the
    model returns the stream, and the error says so; the members are untouched."""
    a, b, data, x = _members(name)
    graph = trace_groups(a, data[0])
    (pin,) = graph.pinned
    assert pin.size == CONFIG["d_model"] and "model.encoder.embed_tokens" in pin.producers
    assert pin.outputs == ("encoder_last_hidden_state",)
    before = [state(a), state(b)]
    match = r"pinned by the model's output \(returned as 'encoder_last_hidden_state'\).*A stream the model returns"
    with pytest.raises(UnsupportedModuleError, match=match):
        pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert unchanged(a, before[0]) and unchanged(b, before[1])
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    fused = pyfusion.fuse([a, twin], data, method="partial", alpha=0.0, graph=graph)
    assert rel(run(fused, x), run(a, x)) < 1e-10
    assert unchanged(a, before[0])


class MaskedRows(nn.Module):
    """A hidden layer whose rows (samples) are kept by a data-dependent boolean mask before the head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[x[:, 0] > 0])


def test_boolean_mask_rows_fuse_exactly():
    """A boolean mask along the batch dim leaves the neuron dim a group: alpha = 1 is the ensemble, a permuted
    copy comes back."""
    a, b = random_model(MaskedRows(), 1), random_model(MaskedRows(), 2)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 6, dtype=F64, generator=gen) for _ in range(2)]
    x = torch.randn(16, 6, dtype=F64, generator=gen)
    graph = trace_groups(a, data[0])
    assert [g.size for g in graph.groups.values()] == [8] and not graph.pinned
    before = [state(a), state(b)]
    fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0, graph=graph)
    assert rel(run(fused, x), 0.5 * (run(a, x) + run(b, x))) < 1e-10
    cost = pyfusion.cost(fused, x, members=[a, b])
    assert cost.flops <= cost.ensemble_flops
    twin = permuted_copy(a, torch.Generator().manual_seed(1), graph=graph)
    assert rel(run(pyfusion.fuse([a, twin], data, method="partial", alpha=0.5, graph=graph), x), run(a, x)) < 1e-10
    assert unchanged(a, before[0]) and unchanged(b, before[1])


def test_data_dependent_size_without_a_value_is_named(monkeypatch):
    """Where the example run cannot give a data-dependent size its value, the error names the node, its module and
    the op (it was torch's raw GuardOnDataDependentSymNode), and nothing is changed."""
    import pyfusion.graph.engine as engine
    from pyfusion.graph.export import clear_cache

    monkeypatch.setattr(engine, "_unbacked_hints", lambda ep: {})
    clear_cache()
    a, b, data, _x = _members("classifier")
    before = [state(a), state(b)]
    match = (
        r"node 'unique_consecutive' \(op 'unique_consecutive'\) in module '' of type BartForSequenceClassification: "
    )
    with pytest.raises(UnsupportedModuleError, match=match + r"its output's shape depends on the data"):
        pyfusion.fuse([a, b], data, method="partial", alpha=0.0)
    assert unchanged(a, before[0]) and unchanged(b, before[1])
    clear_cache()
