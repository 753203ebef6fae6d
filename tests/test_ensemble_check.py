"""Partial fusion at alpha = 1 is the ensemble, checked (pyfusion.fuse.fast.is_ensemble_plan / ensemble_error).

Found by the family sweep: a model that applies a non-linear function after the layer that sums the members'
contributions was silently not the ensemble at alpha = 1. The widened network computes ``phi(sum_k lambda_k z_k)``,
the ensemble ``sum_k lambda_k phi(z_k)``: Gemma-2's final logit soft-cap ``tanh(z / 30) * 30`` was 2.5e-3 off (on
random tiny members; trained logits reach the cap), a ``log_softmax`` output 6.5e-2, a sigmoid 8.4e-2, a product of
two outputs 0.35. The built alpha = 1 network is now compared with the members' weighted outputs on the example
inputs; when it is off, the members' SubEnsemble (the same cost) is returned and ``fusion_info["ensemble_check"]``
says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _audit import F64, random_model, rel, run, state, unchanged
from torch import nn

import pyfusion
from pyfusion.fuse.fast import ensemble_error

HEADS = {
    "log_softmax": lambda y: F.log_softmax(y, -1),
    "sigmoid": torch.sigmoid,
    "soft_cap": lambda y: 3.0 * torch.tanh(y / 3.0),
    "product": lambda y: y * y,
    "affine": lambda y: 2.0 * y + 1.0,  # linear: the widened network is the ensemble
    "pooled_sum": lambda y: y.sum(-1, keepdim=True) - y,  # linear too
}


class Net(nn.Module):
    def __init__(self, head: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3), head

    def forward(self, x):
        return HEADS[self.head](self.out(F.relu(self.fc2(F.gelu(self.fc1(x))))))


def _members(head: str, k: int = 2):
    models = [random_model(Net(head), s) for s in range(1, k + 1)]
    gen = torch.Generator().manual_seed(0)
    return models, [torch.randn(32, 5, dtype=F64, generator=gen) for _ in range(2)], torch.randn(9, 5, dtype=F64)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("k", [2, 3])
def test_alpha_one_is_the_ensemble_whatever_follows_the_last_layer(head, k):
    models, data, x = _members(head, k)
    for m in models:
        m.train()  # modes are restored after the check's eval-mode forwards
    before = [state(m) for m in models]
    lambdas = [1.0 / k] * k
    fused = pyfusion.fuse(models, data, method="partial", alpha=1.0)
    ens = sum(lam * run(m, x) for lam, m in zip(lambdas, models))
    assert rel(run(fused, x), ens) < 1e-10
    check = fused.fusion_info["ensemble_check"]
    linear = head in ("affine", "pooled_sum")
    assert check["checked"] and check["exact"] is linear
    if linear:
        assert type(fused) is Net and check["relative_error"] < 1e-12
    else:
        assert isinstance(fused, pyfusion.nn.SubEnsemble) and "non-linear function after" in check["reason"]
        assert check["relative_error"] > 1e-3  # what the widened network was off by
    assert all(m.training for mod in models for m in mod.modules())
    assert all(unchanged(m, s) for m, s in zip(models, before))


def test_intermediate_alpha_keeps_the_fused_network():
    """Below alpha = 1 nothing claims to be the ensemble: the fused network is returned as is (no check)."""
    models, data, x = _members("log_softmax")
    fused = pyfusion.fuse(models, data, method="partial", alpha=0.5)
    assert type(fused) is Net and "ensemble_check" not in fused.fusion_info


def test_ensemble_error_measures_the_claim():
    models, _data, x = _members("affine")
    assert ensemble_error(models[0], models, [1.0, 0.0], x) == 0.0
    e = ensemble_error(models[0], models, [0.5, 0.5], x)
    ya, yb = run(models[0], x), run(models[1], x)
    ref = 0.5 * (ya + yb)
    assert e == pytest.approx(float((ya - ref).abs().max() / ref.abs().max()), rel=1e-12)


def test_gemma2_final_logit_soft_cap():
    tf = pytest.importorskip("transformers")

    def factory(cap):
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
            intermediate_size=24, vocab_size=50, use_cache=False, final_logit_softcapping=cap))  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(2, 50, (4, 6), generator=gen) for _ in range(2)]
    x = torch.randint(2, 50, (4, 6), generator=gen)
    for cap in (30.0, None):
        torch.manual_seed(0)
        a, b = random_model(factory(cap), 1), random_model(factory(cap), 2)
        fused = pyfusion.fuse([a, b], data, method="partial", alpha=1.0)
        assert rel(run(fused, x), 0.5 * (run(a, x) + run(b, x))) < 1e-10
        assert fused.fusion_info["ensemble_check"]["exact"] is (cap is None)
        assert isinstance(fused, pyfusion.nn.SubEnsemble) is (cap is not None)
