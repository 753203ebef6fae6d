"""pyfusion.cost: effective / dense parameters and FLOPs, counted by hand on known architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear


def test_dense_mlp_counts():
    m = models.mlp([10, 7, 3])
    c = pyfusion.cost(m, (10,))
    assert c.params == c.dense_params == sum(p.numel() for p in m.parameters()) == 10 * 7 + 7 + 7 * 3 + 3
    assert c.flops == c.dense_flops == 2 * (10 * 7 + 7 * 3)
    assert c.layers == {"1": (70, 140, 70, 140), "3": (21, 42, 21, 42)}
    # an input tensor (batch of 5) gives the same per-example counts
    assert pyfusion.cost(m, torch.randn(5, 10)) == c


def test_conv_counts_with_output_sizes_and_shortcuts():
    m = models.resnet20(1, blocks=1, num_classes=5)
    c = pyfusion.cost(m, (3, 8, 8))
    # by hand: every conv's weights x its output positions (stride-2 stages halve the side)
    expected = 0
    sides = {"conv1": 8, "layer1": 8, "layer2": 4, "layer3": 2}
    for path, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            side = sides[path.split(".")[0]]
            expected += mod.weight.numel() * side * side
    expected += m.fc.weight.numel()
    assert c.flops == 2 * expected
    assert any("shortcut" in p for p in c.layers)  # 1x1 projections are counted
    assert c.params == sum(p.numel() for p in m.parameters())  # BN affine and biases included


def test_partial_modules_count_stored_blocks():
    il, ol = [3, 2, 4], [5, 1, 2]
    lin = PartialLinear(il, ol, bias=True)
    c = pyfusion.cost(nn.Sequential(lin), (9,))
    stored = 5 * 9 + 3 * 3 + (1 * 2 + 2 * 4)
    assert c.layers["0"] == (stored, 2 * stored, 8 * 9, 2 * 8 * 9)
    assert c.params == stored + 8 and c.dense_params == 8 * 9 + 8
    conv = PartialConv2d(il, ol, 3, stride=2, padding=1, bias=False)
    cc = pyfusion.cost(nn.Sequential(conv), (9, 6, 6))
    assert cc.layers["0"] == (9 * stored, 2 * 9 * stored * 9, 9 * 72, 2 * 9 * 72 * 9)  # 3x3 output positions
    ens = EnsembleLinear(3, 4, 5, shared_input=True)
    ce = pyfusion.cost(nn.Sequential(ens), (4,))
    assert ce.layers["0"] == (60, 120, 60, 120) and ce.dense_params == 15 * 4 + 15
    # dense equivalents: same function, effective = dense count
    dense = nn.Sequential(lin.to_dense())
    cd = pyfusion.cost(dense, (9,))
    assert cd.flops == cd.dense_flops == c.dense_flops


def test_fused_network_cost_between_single_and_ensemble():
    members = [models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10) for _ in range(2)]
    single = pyfusion.cost(members[0], (2, 8, 8))
    costs = [pyfusion.cost(pyfusion.fuse(members, method="partial", alpha=a), (2, 8, 8)) for a in (0.0, 0.5, 1.0)]
    assert costs[0].flops == single.flops
    assert costs[2].flops == 2 * single.flops  # the ensemble, logits layer read by both members' features
    assert costs[0].flops < costs[1].flops < costs[2].flops
    assert costs[1].flops < costs[1].dense_flops


def test_errors_and_modes_restored():
    m = models.mlp([4, 3, 2]).train()
    with pytest.raises(ValueError, match="positive input shape"):
        pyfusion.cost(m, (0,))
    with pytest.raises(ValueError, match="batch dimension"):
        pyfusion.cost(m, torch.zeros(0, 4))
    pyfusion.cost(m, (4,))
    assert m.training


# ---- attention (issue 12 item 7 / issue 14 item 4) ---------------------------------------------------------------


class _MHABlock(nn.Module):
    def __init__(self, e: int, h: int, batch_first: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(e, h, batch_first=batch_first)

    def forward(self, q, kv):
        return self.mha(q, kv, kv, need_weights=False)[0]


class _HandAttention(nn.Module):
    """Hand-written attention: q/k/v Linears, (B, H, T, d) heads, matmul + softmax or F.scaled_dot_product_attention."""

    def __init__(self, e: int, h: int, sdpa: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.h, self.sdpa = h, sdpa

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (p(x).reshape(b, t, self.h, e // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.sdpa:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / (e // self.h) ** 0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, e))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_flops_counted_by_hand_multihead_attention(batch_first):
    e, h, t, s, b = 8, 2, 5, 3, 5  # (t = b: cost divides out the first dimension, (T, B, E) without batch_first)
    m = _MHABlock(e, h, batch_first)
    q = torch.randn((b, t, e) if batch_first else (t, b, e))
    kv = torch.randn((b, s, e) if batch_first else (s, b, e))
    c = pyfusion.cost(m, ((q, kv), {}))
    d = e // h
    attention = 2 * (h * t * s * d + h * t * s * d)  # QK^T and AV, per example
    projections = 2 * (e * e * t + 2 * e * e * s + e * e * t)  # q on T tokens, k and v on S, out on T
    assert c.attention_flops == attention
    assert c.flops == c.dense_flops == projections + attention


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_attention_flops_counted_by_hand_written_attention(sdpa):
    e, h, t = 8, 4, 6
    c = pyfusion.cost(_HandAttention(e, h, sdpa), torch.randn(3, t, e))
    d = e // h
    assert c.attention_flops == 2 * 2 * h * t * t * d
    assert c.flops == 4 * 2 * e * e * t + c.attention_flops


def test_partial_multihead_attention_counts_as_the_dense_module():
    """A fused MHA block costs the same counted as nn.MultiheadAttention with zero blocks (recorded segments) and as
    the PartialMultiheadAttention the fast swap puts in its place; both below the ensemble at alpha 0.5."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _ir_models import MHANet

    torch.manual_seed(0)
    members = [MHANet().double() for _ in range(2)]
    data = [torch.randn(4, 5, 5, dtype=torch.float64) for _ in range(2)]
    from pyfusion.graph import trace_groups

    kw = {"method": "partial", "alpha": 0.5, "reset_bn": False, "graph": trace_groups(members[0], data[0])}
    dense = pyfusion.fuse(members, data, fast_modules=False, **kw)
    fast = pyfusion.fuse(members, data, fast_modules="always", **kw)
    from pyfusion.nn import PartialMultiheadAttention

    assert isinstance(fast.mha, PartialMultiheadAttention)
    x = data[0][:1]
    cd, cf = pyfusion.cost(dense, x), pyfusion.cost(fast, x)
    ens = sum(pyfusion.cost(m, x).flops for m in members)
    assert cd.flops == cf.flops < ens and cd.attention_flops == cf.attention_flops > 0
    assert cf.attention_flops == 2 * 2 * fast.mha.num_heads * 5 * 5 * fast.mha.head_dim


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_attention_flops_of_hugging_face_blocks_by_hand(family):
    """2 * 2 * heads * T^2 * head_dim per layer (QK^T and AV; Llama's grouped k / v heads are repeated to every
    query head, its rotary embedding is not a product)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _ir_models import hf_models

    models_ = hf_models()
    if family not in models_:
        pytest.skip("transformers is not installed")
    m = models_[family][0]().eval()
    t = 6
    c = pyfusion.cost(m, ((torch.randint(0, 100, (2, t)),), {}))
    cfg = m.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    assert c.attention_flops == 2 * 2 * heads * t * t * (cfg.hidden_size // heads) * layers
