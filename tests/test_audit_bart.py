"""Hugging Face BART (tiny float64 configs, every parameter re-drawn): what kept it from fusing, and what it gives now.

* ``BartEncoder`` reads ``inputs_embeds[:, :, -1]`` "for the shape only" (the positional embedding uses its shape):
  the tracer cut the stream into 15 | 1 at that select although nothing reads the value, so no LayerNorm on the
  stream held exactly its group and partial fusion refused alpha > 0 ("functional code inside that module"). The
  engine now skips values that reach neither the output nor an op with side effects.
"""

from __future__ import annotations

import pytest
import torch
from _audit import random_model, rel, run, state, unchanged
from torch import nn

import pyfusion
from pyfusion.graph import trace_groups
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


FAMILIES = {
    "pooled": (lambda: Pooled(tf.BartModel(tf.BartConfig(**CONFIG))), _ids),
    "lm_logits": (lambda: LogitsOnly(tf.BartForConditionalGeneration(tf.BartConfig(**CONFIG))), _ids),
}


def _members(name: str):
    factory, inputs = FAMILIES[name]
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
