"""pyfusion.ops.partial_conv2d: torch backend vs the float64 reference (dense zero-block weight), autograd of the
stored blocks only, validation, and PartialConv2d running through it.

Tolerances are earned: the op's error must stay within max(TOL[dtype], 2 * error of torch's dense F.conv2d with
the zero-block weight in the same dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyfusion.dispatch import NoBackendError
from pyfusion.nn import PartialConv2d
from pyfusion.ops import partial_conv2d
from pyfusion.ops.partial_conv2d import DISPATCHER, conv_block_shapes
from pyfusion.ops.reference import partial_conv2d_ref

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}

LAYOUTS = [
    ([3, 2], [4, 3]),  # K = 1
    ([4, 3, 3], [5, 2, 2]),  # K = 2, uniform: one grouped convolution
    ([0, 3, 3], [2, 4, 4]),  # no shared input
    ([2, 2, 2, 2], [0, 3, 3, 3]),  # K = 3, no shared output
    ([2, 0, 3], [1, 2, 0]),  # empty branch segments, non-uniform
    ([3, 1, 2, 1, 3, 2], [2, 1, 3, 2, 1, 1]),  # K = 5, odd non-uniform sizes
    ([4, 0, 0], [3, 2, 2]),  # branches read only the shared input (first layer)
    ([0, 2, 2], [0, 3, 3]),  # pure ensemble (block diagonal)
    ([3, 2, 2], [0, 0, 0]),  # no outputs
]
CONV = [((1, 1), (0, 0), (1, 1)), ((2, 2), (1, 1), (1, 1)), ((2, 1), (0, 1), (1, 2))]


def make(il, ol, kernel=(3, 3), dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [
        torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        for s in conv_block_shapes(il, ol, kernel)
    ]
    bias = torch.randn(sum(ol), generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return blocks, bias


def dense_weight(blocks, il, ol):
    return PartialConv2d.dense_weight.__get__(_Holder(blocks, il, ol))()


class _Holder:
    """Just enough of a PartialConv2d for its dense_weight() (the zero-block weight)."""

    def __init__(self, blocks, il, ol):
        self.weight_shared, self.weight_cross, self.weight_diag = blocks
        self.in_layout, self.out_layout = il, ol
        self.kernel_size = tuple(blocks[1].shape[2:])
        self.in_channels, self.out_channels = sum(il), sum(ol)


def assert_close_to_ref(y, x, blocks, bias, il, ol, conv):
    ref = partial_conv2d_ref(x, blocks, bias, il, ol, *conv)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if y.numel() == 0:
        return
    same = F.conv2d(x, dense_weight(blocks, il, ol), bias, *conv)  # torch, same dtype, dense zero-block weight
    scale = ref.abs().max().item() + 1.0
    err = (y.double() - ref).abs().max().item() / scale
    err_torch = (same.double() - ref).abs().max().item() / scale
    assert err <= max(TOL[x.dtype], 2 * err_torch), (err, err_torch)


@pytest.mark.parametrize("il,ol", LAYOUTS)
@pytest.mark.parametrize("conv", CONV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(il, ol, conv, dtype):
    blocks, bias = make(il, ol, dtype=dtype)
    x = torch.randn(2, sum(il), 7, 6, dtype=dtype)
    assert_close_to_ref(partial_conv2d(x, blocks, bias, il, ol, *conv), x, blocks, bias, il, ol, conv)
    assert_close_to_ref(partial_conv2d(x, blocks, None, il, ol, *conv), x, blocks, None, il, ol, conv)


def test_channels_last_and_strided_inputs():
    il, ol = [3, 2, 2], [4, 3, 3]
    blocks, bias = make(il, ol, dtype=torch.float32)
    for x in (
        torch.randn(2, sum(il), 6, 6).to(memory_format=torch.channels_last),
        torch.randn(2, 2 * sum(il), 6, 6)[:, ::2],
    ):
        assert_close_to_ref(partial_conv2d(x, blocks, bias, il, ol, 1, 1, 1), x, blocks, bias, il, ol, (1, 1, 1))


@pytest.mark.parametrize("il,ol", [([2, 2, 2], [2, 1, 1]), ([1, 2, 1, 2], [2, 1, 2, 0]), ([0, 2, 2], [1, 2, 2])])
def test_gradcheck(il, ol):
    blocks, bias = make(il, ol, kernel=(2, 3), requires_grad=True)
    x = torch.randn(2, sum(il), 4, 5, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, c, bias):
        return partial_conv2d(x, [a, b, c], bias, il, ol, (2, 1), (1, 0), (1, 1))

    assert torch.autograd.gradcheck(f, (x, *blocks, bias))


def test_gradients_equal_dense_restricted_to_stored_blocks():
    il, ol = [3, 2, 3], [4, 2, 3]  # non-uniform branches: one backward per branch block
    blocks, bias = make(il, ol, requires_grad=True)
    x = torch.randn(2, sum(il), 6, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, sum(ol), 6, 6, dtype=torch.float64)
    partial_conv2d(x, blocks, bias, il, ol, 1, 1, 1).backward(g)
    dense = dense_weight([b.detach() for b in blocks], il, ol).requires_grad_(True)
    x2, b2 = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    F.conv2d(x2, dense, b2, 1, 1, 1).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    gd = dense.grad  # the dense gradient restricted to the stored blocks: what the op's backward returns
    r, c, diag = ol[0], il[0], []
    for o_k, i_k in zip(ol[1:], il[1:]):
        diag.append(gd[r : r + o_k, c : c + i_k].reshape(-1))
        r, c = r + o_k, c + i_k
    for got, want in zip(blocks, (gd[: ol[0]], gd[ol[0] :, : il[0]], torch.cat(diag))):
        torch.testing.assert_close(got.grad, want)


def test_validation_errors_name_the_argument():
    il, ol = [3, 2, 2], [4, 3, 3]
    blocks, bias = make(il, ol, dtype=torch.float32)
    x = torch.randn(1, 7, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, sum\(in_layout\) = 7, H, W\)"):
        partial_conv2d(torch.randn(1, 8, 5, 5), blocks, bias, il, ol)
    with pytest.raises(ValueError, match=r"w_cross \(weight_blocks\[1\]\) must have shape \(6, 3, 3, 3\)"):
        partial_conv2d(x, [blocks[0], blocks[1][:, :2], blocks[2]], bias, il, ol)
    with pytest.raises(ValueError, match=r"w_diag .* must have shape \(108,\)"):
        partial_conv2d(x, [blocks[0], blocks[1], blocks[2][:-1]], bias, il, ol)
    with pytest.raises(ValueError, match="must have x's dtype"):
        partial_conv2d(x.double(), blocks, bias.double(), il, ol)
    with pytest.raises(ValueError, match=r"bias must have shape \(sum\(out_layout\),\) = \(10,\)"):
        partial_conv2d(x, blocks, bias[:-1], il, ol)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1"):
        partial_conv2d(x, blocks, bias, il, ol, stride=0)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints >= 0"):
        partial_conv2d(x, blocks, bias, il, ol, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="same number of branches"):
        partial_conv2d(x, blocks, bias, [3, 2, 1, 1], ol)
    with pytest.raises(ValueError, match="3 tensors"):
        partial_conv2d(x, blocks[:2], bias, il, ol)


def test_module_runs_the_op_and_honours_forced_backends(monkeypatch):
    il, ol = [3, 2, 2], [4, 3, 3]
    mod = PartialConv2d(il, ol, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 7, 9, 8)
    blocks = [mod.weight_shared.detach(), mod.weight_cross.detach(), mod.weight_diag.detach()]
    with torch.no_grad():
        y = mod(x)
        assert torch.equal(y, partial_conv2d(x, blocks, mod.bias, il, ol, 2, 1, 1))
        monkeypatch.setenv("PYFUSION_BACKEND", "partial_conv2d:reference")
        y_ref = mod(x)
    torch.testing.assert_close(y_ref, partial_conv2d_ref(x, blocks, mod.bias, il, ol, 2, 1, 1).float())
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_conv2d:cpp")
    with pytest.raises(NoBackendError, match=r"backend 'cpp' does not exist for op 'partial_conv2d'"):
        mod(x)
    monkeypatch.delenv("PYFUSION_BACKEND")
    assert DISPATCHER.select(x, *blocks, mod.bias, il, ol, [2, 2], [1, 1], [1, 1]).name == "torch"
