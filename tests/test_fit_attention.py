"""partial_fit / cluster_fit on ``nn.MultiheadAttention`` (pyfusion.fuse.partial_fit, pyfusion.fuse.mha_fit): the
packed q | k | v rows of ``in_proj_weight`` fitted on the module's query / key / value inputs, ``out_proj`` on the
attention context recomputed from the fitted in_proj. Tiny float64 models (tests/_ir_models.py)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _ir_models import EncoderNet, MHANet
from torch import nn

import pyfusion
import pyfusion.fuse.partial_fit as partial_fit
from pyfusion.fuse.mha_fit import attention_context, mha_unfit_reason, no_fastpath
from pyfusion.graph import trace_groups
from pyfusion.nn import PartialMultiheadAttention
from pyfusion.testing import permuted_copy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CrossNet(nn.Module):
    """Cross-attention inside one stream: the first two tokens query all tokens (query is not key; key is value)."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.emb = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.mha(h[:, :2], h, h)
        return self.out((h[:, :2] + a).mean(1))


class CausalNet(nn.Module):
    """A sequence-first (``batch_first=False``) ``nn.TransformerEncoder`` with a causal mask and ``is_causal``."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=24, dropout=0.0, batch_first=False)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(d, 3)

    def forward(self, x):  # (B, T, 5)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.out(self.enc(self.inp(x).transpose(0, 1), mask=mask, is_causal=True).mean(0))


class TinyViT(nn.Module):
    """A pre-LN ViT on ``nn.TransformerEncoderLayer``: patch conv, CLS token, position embedding, GELU MLPs."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):  # (B, 1, 8, 8)
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.enc(h))[:, 0])


MODELS = {"mhanet": MHANet, "encoder": EncoderNet, "cross": CrossNet, "causal": CausalNet, "vit": TinyViT}
MHAS = {
    "mhanet": ["mha"],
    "encoder": ["enc.layers.0.self_attn", "enc.layers.1.self_attn"],
    "cross": ["mha"],
    "causal": ["enc.layers.0.self_attn"],
    "vit": ["enc.layers.0.self_attn", "enc.layers.1.self_attn"],
}


def _inputs(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if name == "vit":
        return torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=gen)
    return torch.randn(n, 5, 5, dtype=torch.float64, generator=gen)


@functools.cache
def _setup(name: str):
    """(member, another member (seed 2), its permuted copy, calibration batches, held-out inputs, graph)."""
    torch.manual_seed(1)
    a = MODELS[name]().double().eval()
    torch.manual_seed(2)
    b = MODELS[name]().double().eval()
    gen = torch.Generator().manual_seed(3)
    cal, held = _inputs(name, 48, gen), _inputs(name, 48, gen)
    graph = trace_groups(a, cal[:2])
    twin = permuted_copy(a, torch.Generator().manual_seed(5), graph=graph)
    return a, b, twin, [cal[:24], cal[24:]], held, graph


def _fuse(name: str, members, method: str, **kw) -> nn.Module:
    *_, data, _held, graph = _setup(name)
    return pyfusion.fuse(members, data, method=method, graph=graph, **kw).eval()


def _mha_reported(fit: dict, name: str) -> None:
    assert fit["skipped"] == {}
    for p in MHAS[name]:
        assert fit["fitted"][p] > 0 and fit["fitted"][f"{p}.out_proj"] > 0


# ---- (c) the attention context -------------------------------------------------------------------------------------


def _reference_context(mha: nn.MultiheadAttention, q, k, v, attn_mask=None, key_padding_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + masks) v per head, heads concatenated, written out by hand (batch first)."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qs, ks, vs = (F.linear(t, w[j * e : (j + 1) * e], b[j * e : (j + 1) * e]) for j, t in enumerate((q, k, v)))
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    qs, ks, vs = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (qs, ks, vs))  # (N, H, L, d)
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(d)
    bias = torch.zeros(n, 1, lq, lk, dtype=q.dtype)
    if attn_mask is not None:
        bias = bias + (
            torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, -math.inf)
            if attn_mask.dtype == torch.bool
            else attn_mask
        )
    if key_padding_mask is not None:
        bias = bias + torch.zeros(n, 1, 1, lk, dtype=q.dtype).masked_fill(key_padding_mask[:, None, None], -math.inf)
    ctx = torch.softmax(logits + bias, -1) @ vs
    return ctx.transpose(1, 2).reshape(n, lq, e)


MASKS = ["none", "bool", "float", "padding", "causal", "bool+padding"]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", MASKS)
def test_the_context_is_the_modules(masks, batch_first, need_weights):
    """``out_proj(attention_context(...))`` is the module's output to 1e-10 (float64), and the context is the
    hand-written per-head softmax(q k^T / sqrt(d) + mask) v; self-attention and cross-attention (a shorter query)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).double().eval()
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, 12, dtype=torch.float64, generator=gen)
    for q, kv in ((h, h), (h[:, :3].contiguous(), h)):
        lq, lk = q.shape[1], kv.shape[1]
        kw: dict = {}
        if masks in ("bool", "bool+padding"):
            kw["attn_mask"] = torch.rand(lq, lk, generator=gen) < 0.3
            kw["attn_mask"][:, 0] = False  # no query with every key masked
        if masks == "float":
            kw["attn_mask"] = torch.randn(lq, lk, dtype=torch.float64, generator=gen)
        if masks in ("padding", "bool+padding"):
            kw["key_padding_mask"] = torch.zeros(4, lk, dtype=torch.bool)
            kw["key_padding_mask"][1, 4:] = True
            kw["key_padding_mask"][3, 2:] = True
        if masks == "causal":
            if q is not kv:
                continue
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq, dtype=torch.float64)
            kw["is_causal"] = True
        ref = _reference_context(mha, q, kv, kv, kw.get("attn_mask"), kw.get("key_padding_mask"))
        qq, kk = (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))
        vv = qq if kv is q else kk
        with torch.no_grad():
            out = mha(qq, kk, vv, need_weights=need_weights, **kw)[0]
            ctx = attention_context(mha, query=qq, key=kk, value=vv, need_weights=need_weights, **kw)
            torch.testing.assert_close(mha.out_proj(ctx), out, rtol=0, atol=1e-10)
            got = ctx if batch_first else ctx.transpose(0, 1)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_the_context_of_unbatched_inputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()
    h = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        ctx = attention_context(mha, query=h, key=h, value=h)
        torch.testing.assert_close(mha.out_proj(ctx), mha(h, h, h)[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(ctx, _reference_context(mha, h[None], h[None], h[None])[0], rtol=0, atol=1e-10)


# ---- (a) a member and its permuted copy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "method", "alpha"),
    [
        ("encoder", "partial_fit", 0.5),
        ("encoder", "cluster_fit", 0.5),
        ("mhanet", "partial_fit", 0.0),
        ("cross", "partial_fit", 0.5),
        ("causal", "cluster_fit", 0.5),
        ("vit", "cluster_fit", 0.5),
    ],
)
def test_a_member_and_its_permuted_copy_is_the_member(name, method, alpha):
    """The averaged weights already give the targets (the copy's heads and neurons are the member's, permuted), so
    the fit returns them: a q / k / v row given another block's or head's target, an out_proj fitted on a context
    in another position order or computed with other weights would move the outputs by O(1)."""
    a, _b, twin, _data, held, _graph = _setup(name)
    fused = _fuse(name, [a, twin], method, alpha=alpha)
    _mha_reported(fused.fusion_info["fit"], name)
    with torch.no_grad():
        y = a(held)
        assert float((fused(held) - y).abs().max()) <= 1e-10 * max(1.0, float(y.abs().max()))


def test_three_members_keep_the_member_blocks():
    """K = 3: a shared slot of a member subset is fitted on its members' input columns only (in_proj rows and
    out_proj rows), so the blocks PartialMultiheadAttention skips stay exactly zero (``from_dense`` refuses a
    non-zero one) and the packed model gives the dense one's outputs."""
    a, b, _twin, _data, held, _graph = _setup("mhanet")
    torch.manual_seed(3)
    c = MHANet().double().eval()
    dense = _fuse("mhanet", [a, b, c], "partial_fit", alpha=0.5, fast_modules=False)
    packed = _fuse("mhanet", [a, b, c], "partial_fit", alpha=0.5, fast_modules="always")
    assert isinstance(packed.mha, PartialMultiheadAttention)
    _mha_reported(dense.fusion_info["fit"], "mhanet")
    with torch.no_grad():
        torch.testing.assert_close(packed(held), dense(held), rtol=0, atol=1e-10)


# ---- (b) nearer the ensemble than the averaged attention -----------------------------------------------------------


def _skip_mha(monkeypatch) -> None:
    """The fit as before nn.MultiheadAttention was fitted: every MHA left averaged (the rest fitted)."""
    monkeypatch.setattr(partial_fit, "mha_unfit_reason", lambda mod: "left averaged (test)")


@pytest.mark.parametrize(
    ("name", "method", "kw"),
    [
        ("encoder", "partial_fit", {"alpha": 0.25}),
        ("encoder", "cluster_fit", {"width": 0.75}),
        ("vit", "partial_fit", {"alpha": 0.0}),
    ],
)
def test_the_fitted_attention_is_nearer_the_ensemble(monkeypatch, name, method, kw):
    """Two independently initialised members: with the attention fitted, the fused model is nearer the ensemble's
    logits on held-out inputs than the same fit with every MHA left averaged, at the same layout and FLOPs (measured
    squared distances: 0.82, 0.87 and 0.90 of the averaged attention's; an empirical margin, not a theorem: the later
    layers' fit can make up for part of an averaged attention)."""
    a, b, _twin, _data, held, _graph = _setup(name)
    new = _fuse(name, [a, b], method, **kw)
    with monkeypatch.context() as mp:
        _skip_mha(mp)
        old = _fuse(name, [a, b], method, **kw)
    assert set(old.fusion_info["fit"]["skipped"]) == {p for m in MHAS[name] for p in (m, f"{m}.out_proj")}
    _mha_reported(new.fusion_info["fit"], name)
    assert new.fusion_layouts == old.fusion_layouts
    assert int(pyfusion.cost(new, held[:1]).flops) == int(pyfusion.cost(old, held[:1]).flops)
    with torch.no_grad():
        ens = (a(held) + b(held)) / 2
        d_new = float(((new(held) - ens) ** 2).mean())
        d_old = float(((old(held) - ens) ** 2).mean())
    assert d_new < d_old, (d_new, d_old)


def _mha_io(model: nn.Module, path: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input, the attention output) of the self-attention at ``path`` over ``x``, batch first, as rows."""
    got = []
    h = model.get_submodule(path).register_forward_hook(
        lambda m, args, kwargs, out: got.append((args[0].detach().clone(), out[0].detach().clone())), with_kwargs=True
    )
    try:
        with torch.no_grad(), no_fastpath():
            model(x)
    finally:
        h.remove()
    return got[0][0], got[0][1]


def _group_at(graph, module: str, param: str, offset: int) -> str:
    return next(
        n
        for n, g in graph.groups.items()
        if any(r.module == module and r.role == "producer" and r.param == param and r.offset == offset for r in g.refs)
    )


def test_the_fitted_rows_are_nearer_their_targets(monkeypatch):
    """The encoder's first MHA reads the same fused inputs with and without its fit (its inputs come from the same
    fitted ``inp`` layer), so its least-squares q / k / v rows (ridge towards the averaged rows) must be nearer the
    targets computed here from the members: slot s of block j ``sum_k sum_i A_k[s, i] (x_k W_kj^T + b_kj)_i``. The
    fitted out_proj must be nearer its targets ``sum_k A_k[:shared] o_k`` than the averaged out_proj applied to the
    same (fitted) context."""
    name, path = "encoder", "enc.layers.0.self_attn"
    a, b, _twin, data, _held, graph = _setup(name)
    cal = torch.cat(data)
    new = _fuse(name, [a, b], "partial_fit", alpha=0.5, fast_modules=False)
    with monkeypatch.context() as mp:
        _skip_mha(mp)
        old = _fuse(name, [a, b], "partial_fit", alpha=0.5, fast_modules=False)
    plan = new.fusion_plan
    members = [(m, *_mha_io(m, path, cal)) for m in (a, b)]
    x_new, out_new = _mha_io(new, path, cal)
    x_old, _ = _mha_io(old, path, cal)
    torch.testing.assert_close(x_new, x_old, rtol=0, atol=1e-12)  # the same inputs
    e = a.get_submodule(path).embed_dim
    m_new, m_old = new.get_submodule(path), old.get_submodule(path)
    e_f = m_new.embed_dim
    for j, group in enumerate(_group_at(graph, path, "in_proj_weight", o) for o in (0, e, 2 * e)):
        gp = plan.groups[group]
        sh = gp.layout[0]
        assert sh > 0
        target = sum(
            F.linear(x, mm.get_submodule(path).in_proj_weight.detach()[j * e : (j + 1) * e],
                     mm.get_submodule(path).in_proj_bias.detach()[j * e : (j + 1) * e]) @ amap[:sh].T
            for (mm, x, _o), amap in zip(members, gp.A)
        )  # fmt: skip
        err = {}
        for key, mod in (("new", m_new), ("old", m_old)):
            rows = slice(j * e_f, j * e_f + sh)
            got = F.linear(x_new, mod.in_proj_weight.detach()[rows], mod.in_proj_bias.detach()[rows])
            err[key] = float(((got - target) ** 2).sum() / (target**2).sum())
        assert err["new"] < 0.9 * err["old"], (j, err)
    # out_proj: the fitted one against the averaged one, on the fused model's fitted context
    gp = plan.groups[_group_at(graph, f"{path}.out_proj", "weight", 0)]
    sh = gp.layout[0]
    target = sum(o @ amap[:sh].T for (_m, _x, o), amap in zip(members, gp.A))
    with torch.no_grad():
        ctx = attention_context(m_new, query=x_new, key=x_new, value=x_new, need_weights=False)
        torch.testing.assert_close(m_new.out_proj(ctx), out_new, rtol=0, atol=1e-10)
        err = {}
        for key, mod in (("new", m_new), ("old", m_old)):
            got = F.linear(ctx, mod.out_proj.weight[:sh], mod.out_proj.bias[:sh])
            err[key] = float(((got - target) ** 2).sum() / (target**2).sum())
    assert err["new"] < 0.9 * err["old"], err


# ---- what stays skipped ---------------------------------------------------------------------------------------------


def test_configurations_the_fit_does_not_read_have_reasons():
    class Sub(nn.MultiheadAttention):
        pass

    assert mha_unfit_reason(nn.MultiheadAttention(8, 2)) is None
    assert mha_unfit_reason(nn.MultiheadAttention(8, 2, bias=False)) is None
    assert "subclass" in mha_unfit_reason(Sub(8, 2))
    assert "kdim / vdim (4 / 8) != embed_dim (8)" in mha_unfit_reason(nn.MultiheadAttention(8, 2, kdim=4))
    assert "bias_k" in mha_unfit_reason(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert "add_zero_attn" in mha_unfit_reason(nn.MultiheadAttention(8, 2, add_zero_attn=True))


def test_a_subclass_is_left_averaged_with_its_reason():
    """A subclass of nn.MultiheadAttention may compute something else: its in_proj and out_proj stay averaged, both
    listed with the reason; the rest is fitted (alpha 0: the builder resizes no attention)."""

    class Sub(nn.MultiheadAttention):
        pass

    a, b, _twin, data, _held, _graph = _setup("mhanet")
    members = []
    for m in (a, b):
        m = permuted_copy(m, torch.Generator().manual_seed(0), example_inputs=data[0][:2])  # a fresh copy
        sub = Sub(16, 4, batch_first=True).double()
        sub.load_state_dict(m.mha.state_dict())
        m.mha = sub.eval()
        members.append(m.eval())
    fused = pyfusion.fuse(members, data, method="partial_fit", alpha=0.0)
    fit = fused.fusion_info["fit"]
    assert set(fit["skipped"]) == {"mha", "mha.out_proj"}
    assert "subclass" in fit["skipped"]["mha"] and "output projection of 'mha'" in fit["skipped"]["mha.out_proj"]
    assert {"emb", "ff1", "ff2", "out"} <= set(fit["fitted"])
