"""pyfusion.nn: PartialLinear, PartialConv2d, EnsembleLinear, replace_ (equivalence with the dense
zero-block modules on standard layouts and member-mask segments, packing checks, state_dict (also of the earlier
3-buffer format), autograd, BatchNorm on slots, torch.compile)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _segments import K3_IN, K3_OUT, K4_IN, K4_OUT
from torch import nn

from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear, replace_
from pyfusion.ops.layout import as_segments, segment_plan, unpack_segment_weight

K2_OUT_OF_ORDER = ([(6, 0b11), (5, 0b01), (5, 0b10)], [(4, 0b01), (3, 0b11), (4, 0b10)])
LIN_LAYOUTS = [
    ([7, 5], [6, 3]),
    ([5, 3, 3], [4, 6, 6]),
    ([0, 4, 2, 3], [5, 0, 3, 2]),
    ([3, 2, 2, 2, 2, 2], [2] * 6),
    (K3_IN, K3_OUT),
    (K4_IN, K4_OUT),
    K2_OUT_OF_ORDER,
]
CONV_LAYOUTS = [
    ([4, 3, 3], [5, 2, 2]),
    ([0, 3, 2, 4], [5, 2, 0, 3]),
    ([2, 0, 0], [3, 2, 2]),
    ([0, 2, 2], [0, 3, 3]),
    (K3_IN, K3_OUT),
]


def skipped_mask(il, ol) -> torch.Tensor:
    """True where the dense weight must be zero (the member masks of the two segments do not intersect)."""
    return ~segment_plan(as_segments(il, "in"), as_segments(ol, "out")).dense_block_mask()


def width(segs) -> int:
    return sum(s for s, _ in as_segments(segs, "x"))


@pytest.mark.parametrize("il,ol", LIN_LAYOUTS)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
def test_partial_linear_equals_dense(il, ol, act):
    m = PartialLinear(il, ol, activation=act).double()
    dense = m.to_dense()
    assert bool((dense[0] if isinstance(dense, nn.Sequential) else dense).weight[skipped_mask(il, ol)].eq(0).all())
    x = torch.randn(3, 4, width(il), dtype=torch.float64)
    torch.testing.assert_close(m(x), dense(x))
    # from_dense(to_dense) rebuilds the same parameters
    lin = dense[0] if isinstance(dense, nn.Sequential) else dense
    m2 = PartialLinear.from_dense(lin.weight, lin.bias, il, ol, activation=act)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_partial_linear_stores_only_allowed_blocks():
    il, ol = [6, 4, 4], [5, 3, 3]
    m = PartialLinear(il, ol)
    names = {n: tuple(p.shape) for n, p in m.named_parameters()}
    allowed = int((~skipped_mask(il, ol)).sum())
    assert names == {"weight": (allowed,), "bias": (11,)}
    assert allowed == 5 * 14 + 6 * 10
    assert m.effective_params() == allowed + 11
    assert m.dense_params() == 11 * 14 + 11
    assert m.effective_flops(batch=8) == 2 * 8 * allowed
    assert m.in_layout == (6, 4, 4) and m.out_segments == ((5, 3), (3, 1), (3, 2))
    # alpha = 0 (all shared): effective == dense
    full = PartialLinear([14, 0], [11, 0])
    assert full.effective_params() == full.dense_params()
    # K = 3 with subset shared slots: no stored exact zero (the 3-buffer format stored the skipped subset blocks)
    m3 = PartialLinear(K3_IN, K3_OUT)
    assert m3.weight.numel() == int((~skipped_mask(K3_IN, K3_OUT)).sum()) < width(K3_IN) * width(K3_OUT)
    assert m3.in_layout is None and "in_segments=" in repr(m3)
    for o in range(len(K3_OUT)):
        assert m3.block(o).shape == (K3_OUT[o][0], segment_plan(m3.in_segments, m3.out_segments).k_of_out[o])


def test_from_dense_rejects_nonzero_skipped_blocks():
    for il, ol in (([3, 2, 2], [4, 3, 3]), (K3_IN, K3_OUT)):
        m = PartialLinear(il, ol)
        w = m.dense_weight().detach().clone()
        r, c = (int(v) for v in skipped_mask(il, ol).nonzero()[0])
        w[r, c] = 1e-30
        with pytest.raises(ValueError, match=r"must be exactly zero: the member masks"):
            PartialLinear.from_dense(w, m.bias, il, ol)
        with pytest.raises(ValueError, match=r"must be exactly zero"):
            PartialLinear.from_segments(w, m.bias, as_segments(il, "in"), as_segments(ol, "out"))
    with pytest.raises(ValueError, match=r"weight must have shape \(O_total, I_total, \.\.\.\) = \(10, 7"):
        PartialLinear.from_dense(torch.zeros(10, 8), None, [3, 2, 2], [4, 3, 3])
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        PartialLinear.from_dense(torch.zeros(10, 7), torch.zeros(9), [3, 2, 2], [4, 3, 3])


def test_partial_linear_state_dict_roundtrip_and_legacy_format():
    m = PartialLinear(K4_IN, K4_OUT, activation="gelu")
    sd = m.state_dict()
    assert sd["layout_in"].tolist() == [list(s) for s in K4_IN] and int(sd["activation_id"]) == 2
    m2 = PartialLinear.from_state_dict(sd)
    assert m2.in_segments == m.in_segments and m2.out_segments == m.out_segments and m2.activation == "gelu"
    x = torch.randn(3, width(K4_IN))
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    other = PartialLinear(K3_IN, K3_OUT)
    with pytest.raises(ValueError, match="from_state_dict"):
        other.load_state_dict(PartialLinear(K3_IN, [(n, m) for n, m in reversed(K3_OUT)]).state_dict())
    with pytest.raises(ValueError, match="activation 'relu'"):
        PartialLinear([3, 2, 2], [4, 3, 3], activation="gelu").load_state_dict(
            PartialLinear([3, 2, 2], [4, 3, 3], activation="relu").state_dict()
        )
    # the earlier 3-buffer format (weight_shared (O_s, I_total), weight_cross (O_B, I_s), weight_diag): converted
    il, ol = [3, 2, 2], [4, 3, 3]
    ref = PartialLinear(il, ol, activation="relu")
    dense = ref.dense_weight().detach()
    legacy = {
        "weight_shared": dense[:4].clone(),
        "weight_cross": dense[4:, :3].clone(),
        "weight_diag": torch.cat([dense[4:7, 3:5].reshape(-1), dense[7:10, 5:7].reshape(-1)]),
        "bias": ref.bias.detach().clone(),
        "layout": torch.tensor([il, ol]),
        "activation_id": torch.tensor(1),
    }
    for mod in (PartialLinear.from_state_dict(dict(legacy)), PartialLinear(il, ol, activation="relu")):
        mod.load_state_dict(dict(legacy))
        assert torch.equal(mod.weight, ref.weight)


def test_finetuning_never_fills_zero_blocks():
    il, ol = [4, 3, 3], [5, 4, 4]
    m = PartialLinear(il, ol, activation="silu")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, t = torch.randn(16, 10), torch.randn(16, 13)
    for _ in range(3):
        opt.zero_grad()
        loss = ((m(x) - t) ** 2).mean()
        loss.backward()
        opt.step()
    w = m.dense_weight()
    assert bool(w[skipped_mask(il, ol)].eq(0).all())
    # the gradients equal the dense layer's gradients on the allowed entries
    dense = m.to_dense()
    m.zero_grad()
    ((m(x) - t) ** 2).mean().backward()
    ((dense(x) - t) ** 2).mean().backward()
    g = unpack_segment_weight(m.weight.grad, as_segments(il, "in"), as_segments(ol, "out"))
    mask = ~skipped_mask(il, ol)
    torch.testing.assert_close(g[mask], dense[0].weight.grad[mask])
    torch.testing.assert_close(m.bias.grad, dense[0].bias.grad)


@pytest.mark.parametrize("il,ol", CONV_LAYOUTS)
@pytest.mark.parametrize("geom", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 1), stride=2, dilation=(1, 2))])
def test_partial_conv_equals_dense(il, ol, geom):
    c = PartialConv2d(il, ol, **geom).double()
    dense = c.to_dense()
    assert bool(dense.weight.permute(2, 3, 0, 1)[:, :, skipped_mask(il, ol)].eq(0).all())
    x = torch.randn(2, width(il), 9, 8, dtype=torch.float64)
    torch.testing.assert_close(c(x), dense(x))
    extra = {k: v for k, v in geom.items() if k != "kernel_size"}
    c2 = PartialConv2d.from_dense(dense.weight, dense.bias, il, ol, **extra)
    for a, b in zip(c.parameters(), c2.parameters()):
        assert torch.equal(a, b)
    # gradients exist only for stored blocks and match the dense conv on them
    x.requires_grad_(True)
    c(x).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    dense(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    kh, kw = c.kernel_size
    g = PartialConv2d.from_dense(
        dense.weight.grad * (~skipped_mask(il, ol))[:, :, None, None], dense.bias.grad, il, ol, **extra
    )
    for a, b in zip(c.parameters(), g.parameters()):
        if a.numel():  # an empty block (zero-size segment) takes no part in the forward
            torch.testing.assert_close(a.grad, b)
    assert c.effective_flops(2, (9, 8)) == 2 * 2 * dense(x).shape[2] * dense(x).shape[3] * (
        int((~skipped_mask(il, ol)).sum()) * kh * kw
    )


def test_partial_conv_from_dense_rejects_and_roundtrips_state():
    il, ol = [2, 2, 2], [3, 2, 2]
    c = PartialConv2d(il, ol, 3, padding=1)
    w = c.dense_weight().detach().clone()
    w[5, 2, 1, 1] = 1.0  # branch 2 output reads branch 1 input at one tap
    with pytest.raises(ValueError, match="must be exactly zero"):
        PartialConv2d.from_dense(w, None, il, ol, padding=1)
    with pytest.raises(ValueError, match="kernel_size is required"):
        PartialConv2d.from_state_dict(c.state_dict())
    with pytest.raises(ValueError, match=r"kernel \(5, 5\) with these segments"):
        PartialConv2d.from_state_dict(c.state_dict(), kernel_size=5)
    c2 = PartialConv2d.from_state_dict(c.state_dict(), kernel_size=3, padding=1)
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(c2(x), c(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 6, H, W\)"):
        c(torch.randn(1, 5, 5, 5))
    with pytest.raises(ValueError, match="input_size"):
        c.effective_flops(4)


def test_batchnorm_on_slots_equals_dense():
    # Plain BatchNorm2d over O_total channels is per slot: shared and branch slots keep their own stats.
    il, ol = [4, 3, 3], [5, 4, 4]
    torch.manual_seed(1)
    part = nn.Sequential(PartialConv2d(il, ol, 3, padding=1), nn.BatchNorm2d(13), nn.ReLU()).double()
    dense = nn.Sequential(part[0].to_dense(), copy.deepcopy(part[1]), nn.ReLU()).double()
    with torch.no_grad():
        part[1].weight.uniform_(0.5, 1.5)
        part[1].bias.uniform_(-0.5, 0.5)
        dense[1].load_state_dict(part[1].state_dict())
    for _ in range(2):
        x = torch.randn(4, 10, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(part(x), dense(x))  # train mode: batch statistics
    torch.testing.assert_close(part[1].running_mean, dense[1].running_mean)
    torch.testing.assert_close(part[1].running_var, dense[1].running_var)
    part.eval()
    dense.eval()
    x = torch.randn(3, 10, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(part(x), dense(x))


def test_ensemble_linear():
    torch.manual_seed(2)
    lins = [nn.Linear(6, 4) for _ in range(3)]
    e = EnsembleLinear.from_linears(lins, activation="relu")
    x = torch.randn(2, 5, 18)
    want = torch.cat([torch.relu(lin(x[..., 6 * k : 6 * k + 6])) for k, lin in enumerate(lins)], -1)
    torch.testing.assert_close(e(x), want)
    es = EnsembleLinear.from_linears(lins, shared_input=True)
    xs = torch.randn(7, 6)
    torch.testing.assert_close(es(xs), torch.cat([lin(xs) for lin in lins], -1))
    assert e.effective_params() == sum(p.numel() for lin in lins for p in lin.parameters())
    assert e.dense_params() == 12 * 18 + 12 and e.effective_flops(10) == 2 * 10 * 3 * 24
    es(xs).sum().backward()
    assert es.weight.grad.shape == (3, 4, 6)
    with pytest.raises(ValueError, match="same weight shape"):
        EnsembleLinear.from_linears([nn.Linear(6, 4), nn.Linear(5, 4)])


def test_replace_swaps_in_place_by_path():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.GELU()), nn.Linear(6, 2))
    other = copy.deepcopy(model)
    x = torch.randn(5, 8)
    want = model(x)

    def make(mod: nn.Module, fqn: str) -> nn.Module:
        return PartialLinear.from_dense(mod.weight, mod.bias, [mod.in_features, 0], [mod.out_features, 0])

    out = replace_(model, make, lambda m, fqn: isinstance(m, nn.Linear) and fqn != "3")
    assert out is model
    assert isinstance(model[0], PartialLinear) and isinstance(model[2][0], PartialLinear)
    assert isinstance(model[3], nn.Linear)  # filtered out by path
    assert all(type(m) is not PartialLinear for m in other.modules())  # no global patching
    torch.testing.assert_close(model(x), want)
    # children of a replaced module are not visited; make_module returning None keeps the module
    calls = []
    replace_(model, lambda m, f: calls.append(f), lambda m, f: isinstance(m, nn.Sequential))
    assert calls == ["2"] and isinstance(model[2], nn.Sequential)


def test_torch_compile_forward_and_backward():
    # One compiled case (compile costs ~20 s on this machine): fullgraph through two layers + backward.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.manual_seed(4)
    m = nn.Sequential(PartialLinear([5, 3, 3], [4, 6, 6], activation="gelu"), PartialLinear([4, 6, 6], [3, 2, 2]))
    x = torch.randn(7, 11)
    cm = torch.compile(m, fullgraph=True)
    y = cm(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    y0 = m(x)
    y0.square().sum().backward()
    torch.testing.assert_close(y, y0)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad)


# ---- saving: member-mask segments of every layout (pyfusion.save / load) ----------------------------------------


def test_save_and_load_keep_member_mask_segments(tmp_path):
    """K = 3 / 4 segments (no standard layout describes them) survive pyfusion.save / load, with the activation,
    the conv parameters and PartialMultiheadAttention's projections; a fresh process can load the file."""
    import subprocess
    import sys

    import pyfusion
    from pyfusion.nn import PartialMultiheadAttention

    torch.manual_seed(0)
    conv = PartialConv2d(K3_IN, K3_OUT, (3, 1), stride=(2, 1), padding=(1, 0), activation="relu")
    lin = PartialLinear(K4_IN, K4_OUT, activation="silu")
    heads = [(2, 0b11), (2, 0b01), (2, 0b10)]
    projs = [PartialLinear(heads, heads) for _ in range(4)]
    mha = PartialMultiheadAttention(*projs, num_heads=3, batch_first=True)
    model = nn.ModuleDict({"conv": conv, "lin": lin, "mha": mha})
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    loaded = pyfusion.load(path)
    assert loaded.conv.in_segments == conv.in_segments and loaded.conv.out_segments == conv.out_segments
    assert (loaded.conv.kernel_size, loaded.conv.stride, loaded.conv.padding) == ((3, 1), (2, 1), (1, 0))
    assert loaded.lin.in_layout is None and loaded.lin.out_segments == lin.out_segments
    assert loaded.lin.activation == "silu" and loaded.conv.activation == "relu"
    x = torch.randn(2, width(K3_IN), 5, 4)
    torch.testing.assert_close(loaded.conv(x), conv(x), rtol=0, atol=0)
    v = torch.randn(3, width(K4_IN))
    torch.testing.assert_close(loaded.lin(v), lin(v), rtol=0, atol=0)
    t = torch.randn(2, 4, 6)
    torch.testing.assert_close(loaded.mha(t, t, t)[0], mha(t, t, t)[0], rtol=0, atol=0)
    code = f"import pyfusion; m = pyfusion.load({str(path)!r}); print(type(m['mha']).__name__, m['lin'].out_segments)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[0] == "PartialMultiheadAttention"


def test_from_config_refuses_bad_configs():
    from pyfusion.nn import PartialMultiheadAttention

    good = PartialLinear(K3_IN, K3_OUT).get_config()
    assert PartialLinear.from_config(good).get_config() == good
    legacy = {"in_layout": [3, 2, 2], "out_layout": [1, 2, 2], "bias": True, "activation": None}
    assert PartialLinear.from_config(legacy).in_layout == (3, 2, 2)  # files of the earlier format
    with pytest.raises(ValueError, match="unexpected \\['weights'\\]"):
        PartialLinear.from_config({**good, "weights": 1})
    with pytest.raises(ValueError, match="missing \\['activation'\\]"):
        PartialLinear.from_config({k: v for k, v in good.items() if k != "activation"})
    with pytest.raises(ValueError, match="'bias' must be a bool"):
        PartialLinear.from_config({**good, "bias": 1})
    with pytest.raises(ValueError, match="'in_segments' must be a list"):
        PartialLinear.from_config({**good, "in_segments": [[2, "3"]]})
    with pytest.raises(ValueError, match="member_mask"):
        PartialLinear.from_config({**good, "in_segments": [[2, 0]]})
    conv = PartialConv2d([2, 1, 1], [1, 1, 1], 3).get_config()
    with pytest.raises(ValueError, match="'stride' must be a list"):
        PartialConv2d.from_config({**conv, "stride": [1.5, 1]})
    mcfg = {"embed_dim": 6, "num_heads": 3, "batch_first": True, "dropout": 0.0}
    assert PartialMultiheadAttention.from_config(mcfg).get_config() == mcfg
    with pytest.raises(ValueError, match="dropout"):
        PartialMultiheadAttention.from_config({**mcfg, "dropout": 2.0})
    with pytest.raises(ValueError, match="keys"):
        PartialMultiheadAttention.from_config({**mcfg, "kdim": 4})
