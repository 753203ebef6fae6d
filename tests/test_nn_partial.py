"""pyfusion.nn: PartialLinear, PartialConv2d, EnsembleLinear, replace_ (equivalence with the dense
zero-block modules, packing checks, state_dict, autograd, BatchNorm on slots, torch.compile)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear, replace_
from pyfusion.ops.layout import unpack_partial_weight

LIN_LAYOUTS = [([7, 5], [6, 3]), ([5, 3, 3], [4, 6, 6]), ([0, 4, 2, 3], [5, 0, 3, 2]), ([3, 2, 2, 2, 2, 2], [2] * 6)]
CONV_LAYOUTS = [([4, 3, 3], [5, 2, 2]), ([0, 3, 2, 4], [5, 2, 0, 3]), ([2, 0, 0], [3, 2, 2]), ([0, 2, 2], [0, 3, 3])]


def skipped_mask(il, ol) -> torch.Tensor:
    """True where the dense weight must be zero (branch k output, branch j != k input)."""
    m = torch.zeros(sum(ol), sum(il), dtype=torch.bool)
    io, oo = [0], [0]
    for i, o in zip(il, ol):
        io.append(io[-1] + i)
        oo.append(oo[-1] + o)
    for k in range(1, len(ol)):
        for j in range(1, len(il)):
            if j != k:
                m[oo[k] : oo[k + 1], io[j] : io[j + 1]] = True
    return m


@pytest.mark.parametrize("il,ol", LIN_LAYOUTS)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
def test_partial_linear_equals_dense(il, ol, act):
    m = PartialLinear(il, ol, activation=act).double()
    dense = m.to_dense()
    assert bool((dense[0] if isinstance(dense, nn.Sequential) else dense).weight[skipped_mask(il, ol)].eq(0).all())
    x = torch.randn(3, 4, sum(il), dtype=torch.float64)
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
    assert names == {"weight_shared": (5, 14), "weight_cross": (6, 6), "weight_diag": (24,), "bias": (11,)}
    allowed = int((~skipped_mask(il, ol)).sum())
    assert m.effective_params() == allowed + 11
    assert m.dense_params() == 11 * 14 + 11
    assert m.effective_flops(batch=8) == 2 * 8 * allowed
    # alpha = 0 (all shared): effective == dense
    full = PartialLinear([14, 0], [11, 0])
    assert full.effective_params() == full.dense_params()


def test_from_dense_rejects_nonzero_skipped_blocks():
    il, ol = [2, 3, 3], [2, 2, 2]
    w = torch.randn(6, 8)
    w[skipped_mask(il, ol)] = 0
    PartialLinear.from_dense(w, None, il, ol)
    w[4, 3] = 0.5  # branch 2 output row 4 reads branch 1 input column 3
    with pytest.raises(ValueError, match=r"output branch 2, input branch 1.*must be zero"):
        PartialLinear.from_dense(w, None, il, ol)
    with pytest.raises(ValueError, match=r"weight must have shape .* \(6, 8\)"):
        PartialLinear.from_dense(w[:, :7], None, il, ol)
    with pytest.raises(ValueError, match="activation must be one of"):
        PartialLinear(il, ol, activation="tanh")


def test_partial_linear_state_dict_roundtrip():
    il, ol = [5, 3, 3], [4, 6, 6]
    m = PartialLinear(il, ol, activation="gelu")
    sd = m.state_dict()
    assert sd["layout"].tolist() == [il, ol]
    m2 = PartialLinear.from_state_dict(sd)
    assert m2.in_layout == m.in_layout and m2.out_layout == m.out_layout and m2.activation == "gelu"
    x = torch.randn(7, 11)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m3 = PartialLinear(il, ol, activation="gelu")
    m3.load_state_dict(sd)
    torch.testing.assert_close(m3(x), m(x), rtol=0, atol=0)
    # prefixed (inside a model) and through safetensors
    model = nn.Sequential(m, nn.ReLU())
    from safetensors.torch import load, save

    sd2 = load(save(model.state_dict()))
    m4 = PartialLinear.from_state_dict(sd2, prefix="0.")
    torch.testing.assert_close(m4(x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"holds layouts in=\[5, 3, 3\]"):
        PartialLinear([5, 4, 2], [4, 6, 6], activation="gelu").load_state_dict(sd)
    with pytest.raises(ValueError, match="activation"):
        PartialLinear(il, ol, activation="relu").load_state_dict(sd)


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
    g = unpack_partial_weight(m.weight_shared.grad, m.weight_cross.grad, m.weight_diag.grad, il, ol)
    mask = ~skipped_mask(il, ol)
    torch.testing.assert_close(g[mask], dense[0].weight.grad[mask])
    torch.testing.assert_close(m.bias.grad, dense[0].bias.grad)


@pytest.mark.parametrize("il,ol", CONV_LAYOUTS)
@pytest.mark.parametrize("geom", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 1), stride=2, dilation=(1, 2))])
def test_partial_conv_equals_dense(il, ol, geom):
    c = PartialConv2d(il, ol, **geom).double()
    dense = c.to_dense()
    assert bool(dense.weight.permute(2, 3, 0, 1)[:, :, skipped_mask(il, ol)].eq(0).all())
    x = torch.randn(2, sum(il), 9, 8, dtype=torch.float64)
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
    with pytest.raises(ValueError, match="must be zero"):
        PartialConv2d.from_dense(w, None, il, ol, padding=1)
    c2 = PartialConv2d.from_state_dict(c.state_dict(), padding=1)
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
