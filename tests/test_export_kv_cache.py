"""Hugging Face language models keep their default ``use_cache=True``: tracing and fusing work, the config is
restored, and the fused model still generates with its cache."""

import pytest
import torch

import pyfusion
from pyfusion.graph import trace_groups

tf = pytest.importorskip("transformers")


def _gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    assert cfg.use_cache is True
    return tf.GPT2LMHeadModel(cfg).double().eval()


def test_gpt2_with_kv_cache_traces_fuses_and_keeps_its_config():
    a, b = _gpt2(0), _gpt2(1)
    x = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    graph = trace_groups(a, x)
    assert a.config.use_cache is True and b.config.use_cache is True
    assert any(g.unit_size > 1 for g in graph.groups.values())  # the heads are found
    fused = pyfusion.fuse([a, b], [x], method="partial", alpha=1.0, graph=graph, fast_modules=False).eval()
    assert fused.config.use_cache is True
    with torch.no_grad():
        want = 0.5 * (a(x).logits + b(x).logits)
        got = fused(x)
        assert got.past_key_values is not None  # generation state is still produced
        torch.testing.assert_close(got.logits, want, rtol=1e-9, atol=1e-9)
        # the cache works in the fused head layout: a step with the cache equals the full forward
        full = fused(x).logits[:, -1]
        step = fused(x[:, -1:], past_key_values=fused(x[:, :-1]).past_key_values).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-9, atol=1e-9)


def test_export_failure_is_named_before_the_walk_refusal():
    class DataDependent(torch.nn.Module):  # data-dependent control flow: torch.export refuses it
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, ids):
            h = self.emb(ids).mean(1)
            return self.fc(h) if bool(h.sum() > 0) else -self.fc(h)

    from pyfusion.graph import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError, match=r"torch.export could not trace DataDependent \(.*\), and the "
                       r"leaf modules cannot be read as a chain: unsupported module 'emb'"):  # fmt: skip
        trace_groups(DataDependent(), torch.randint(0, 10, (2, 3)))
