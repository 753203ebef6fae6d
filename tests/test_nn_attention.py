"""PartialMultiheadAttention against nn.MultiheadAttention (float64): a block-sparse MHA packed from its dense form
computes the same outputs and weights with every option (batch_first or not, unbatched inputs, cross attention,
boolean / float attention masks, key padding masks, per-head weights, need_weights=False), stores only the allowed
blocks, refuses non-zero skipped blocks and unsupported configurations, and keeps gradients on the stored blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfusion.nn import PartialLinear, PartialMultiheadAttention, TorchScriptUnsupportedError
from pyfusion.ops.layout import segment_plan, slice_segments, unpack_segment_weight

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

F64 = torch.float64
E, H = 12, 4
# the stream: shared 4 | member 0: 4 | member 1: 4; heads (3 dims each): 1 shared head, 1 head per member, and one
# head of member 0 at the end (any order)
STREAM = ((4, 0b11), (4, 0b01), (4, 0b10))
HEADS = ((3, 0b11), (3, 0b01), (3, 0b10), (3, 0b01))
ROWS = HEADS * 3  # q | k | v rows


def _mha(batch_first: bool, seed: int = 0, bias: bool = True) -> tuple[nn.Module, PartialMultiheadAttention]:
    """A dense nn.MultiheadAttention with zero blocks and its PartialMultiheadAttention."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias, dtype=F64).eval()
    with torch.no_grad():
        w = torch.randn(segment_plan(STREAM, ROWS).stored, dtype=F64) / E**0.5
        mha.in_proj_weight.copy_(unpack_segment_weight(w, STREAM, ROWS))
        wo = torch.randn(segment_plan(HEADS, STREAM).stored, dtype=F64) / E**0.5
        mha.out_proj.weight.copy_(unpack_segment_weight(wo, HEADS, STREAM))
        if bias:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, PartialMultiheadAttention.from_dense(mha, STREAM, ROWS, HEADS, STREAM).eval()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_equals_multihead_attention(batch_first, need_weights, average):
    mha, part = _mha(batch_first)
    g = torch.Generator().manual_seed(1)
    b, t, s = 3, 5, 7
    shape = (lambda n: (b, n, E)) if batch_first else (lambda n: (n, b, E))
    q = torch.randn(shape(t), generator=g, dtype=F64)
    kv = torch.randn(shape(s), generator=g, dtype=F64)
    bool_mask = torch.rand(t, s, generator=g) < 0.3
    bool_mask[:, 0] = False  # no fully masked row (NaN either way)
    masks = {
        "none": {},
        "bool": {"attn_mask": bool_mask},
        "float": {"attn_mask": torch.randn(t, s, generator=g, dtype=F64)},
        "per_head": {"attn_mask": torch.randn(b * H, t, s, generator=g, dtype=F64)},
        "padding": {"key_padding_mask": torch.tensor([[False] * s, [False] * (s - 2) + [True] * 2, [False] * s])},
        "both": {"attn_mask": bool_mask, "key_padding_mask": torch.rand(b, s, generator=g) < 0.2},
    }
    masks["both"]["key_padding_mask"][:, 0] = False
    for name, kw in masks.items():
        pairs = [(kv, kv), (kv, torch.randn(shape(s), generator=g, dtype=F64))] + ([(q, q)] if name == "none" else [])
        for key, value in pairs:
            want = mha(q, key, value, need_weights=need_weights, average_attn_weights=average, **kw)
            got = part(q, key, value, need_weights=need_weights, average_attn_weights=average, **kw)
            _close(got[0], want[0])
            if need_weights:
                _close(got[1], want[1])
            else:
                assert got[1] is None and want[1] is None, name


def test_unbatched_and_causal_hint_and_stored_blocks():
    mha, part = _mha(batch_first=True, bias=False)
    x = torch.randn(6, E, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    for kw in ({}, {"attn_mask": causal, "is_causal": True}, {"key_padding_mask": torch.tensor([False] * 5 + [True])}):
        want, got = mha(x, x, x, **kw), part(x, x, x, **kw)
        _close(got[0], want[0])
        _close(got[1], want[1])
    with pytest.raises(RuntimeError, match="is_causal"):
        part(x, x, x, is_causal=True)
    # only the allowed blocks are stored: q, k, v and out each hold their segment plan's blocks
    for j, proj in enumerate((part.q_proj, part.k_proj, part.v_proj)):
        assert isinstance(proj, PartialLinear)
        rows = slice_segments(ROWS, j * E, (j + 1) * E)
        assert proj.weight.numel() == segment_plan(STREAM, rows).stored < E * E
    assert part.out_proj.weight.numel() == segment_plan(HEADS, STREAM).stored
    assert part.embed_dim == E and part.num_heads == H and part.head_dim == 3 and part.in_proj_weight is None


def test_refusals():
    mha, _ = _mha(batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight[E + 4, 9] = 1.0  # k row of a member-0 head (mask 0b01), a member-1 stream column (0b10)
    with pytest.raises(ValueError, match="zero"):
        PartialMultiheadAttention.from_dense(mha, STREAM, ROWS, HEADS, STREAM)
    odd = nn.MultiheadAttention(E, H, kdim=6, vdim=6, dtype=F64)
    with pytest.raises(ValueError, match="kdim = vdim = embed_dim"):
        PartialMultiheadAttention.from_dense(odd, STREAM, ROWS, HEADS, STREAM)
    lin = nn.Linear(E, E)
    with pytest.raises(ValueError, match="num_heads"):
        PartialMultiheadAttention(lin, lin, lin, lin, num_heads=5)
    with pytest.raises(ValueError, match="q_proj must map 12 -> 12"):
        PartialMultiheadAttention(nn.Linear(E, 6), lin, lin, lin, num_heads=4)
    with pytest.raises(ValueError, match="slice"):
        slice_segments(STREAM, 4, 13)
    _, part = _mha(batch_first=True)
    with pytest.raises(TorchScriptUnsupportedError):
        torch.jit.script(part)


def test_gradients_reach_the_stored_blocks_only():
    mha, part = _mha(batch_first=True)
    part.train()
    x = torch.randn(2, 4, E, dtype=F64, requires_grad=True)
    y, _ = part(x, x, x, need_weights=False)
    y.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    y_ref, _ = mha.train()(ref_x, ref_x, ref_x, need_weights=False)
    y_ref.square().sum().backward()
    _close(x.grad, ref_x.grad)
    # the packed q projection's gradient is the dense one on the stored blocks
    dense_grad = mha.in_proj_weight.grad[:E]
    rows = slice_segments(ROWS, 0, E)
    allowed = unpack_segment_weight(torch.ones(segment_plan(STREAM, rows).stored, dtype=F64), STREAM, rows) != 0
    got = unpack_segment_weight(part.q_proj.weight.grad, STREAM, rows)
    _close(got[allowed], dense_grad[allowed])
    assert not bool(allowed.all()) and bool((got[~allowed] == 0).all())
