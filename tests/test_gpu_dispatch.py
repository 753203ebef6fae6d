"""End-to-end GPU dispatch (marked ``gpu``: skipped without a CUDA device): every CUDA backend the dispatchers
choose is compared with the float64 reference (scipy's objective for the assignment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _segments import K3_IN, K3_OUT, assert_close

pytestmark = pytest.mark.gpu


def test_linear_assignment_on_cuda_costs_is_scipy_exact():
    from scipy.optimize import linear_sum_assignment

    from pyfusion.ops import linear_assignment
    from pyfusion.ops.assignment import DISPATCHER

    rng = np.random.default_rng(0)
    costs = [rng.random((n, m)) for n, m in ((40, 40), (30, 50), (64, 64), (7, 3))]
    costs.append(rng.integers(0, 5, (50, 50)).astype(np.float64))  # ties: the objective, not the matching
    t = [torch.from_numpy(c).cuda() for c in costs]
    assert DISPATCHER.select(t, False, [-1] * len(t), None, 0).name == "cuda"
    res = linear_assignment(t)
    for c, cost in zip(costs, res.cost):
        r, cc = linear_sum_assignment(c)
        assert abs(cost - c[r, cc].sum()) <= 1e-9 * max(1.0, abs(c[r, cc].sum()))
    part = linear_assignment(t[:3], num_matches=[10, 5, 20])
    assert all(len(r) == k for r, k in zip(part.row_ind, (10, 5, 20)))


def test_correlation_on_cuda_matches_float64():
    from pyfusion.ops import correlation
    from pyfusion.ops.reference import correlation_ref

    x, y = torch.randn(4096, 96, device="cuda"), torch.randn(4096, 64, device="cuda")
    got = correlation(x, y)
    torch.testing.assert_close(got.double().cpu(), correlation_ref(x.cpu(), y.cpu()), rtol=0, atol=1e-6)


def test_partial_modules_on_cuda_match_float64():
    from pyfusion.nn import PartialConv2d, PartialLinear
    from pyfusion.ops.reference import partial_conv2d_ref, partial_linear_ref

    lin = PartialLinear(K3_IN, K3_OUT, activation="gelu").cuda().eval()
    x = torch.randn(65, lin.in_features, device="cuda")
    with torch.no_grad():
        assert_close(lin(x).cpu(), partial_linear_ref(x.cpu(), lin.weight.cpu(), lin.bias.cpu(), K3_IN, K3_OUT,
                                                      "gelu"), dtype=torch.float32)  # fmt: skip
    conv = PartialConv2d(K3_IN, K3_OUT, 3, padding=1).cuda().eval()
    xc = torch.randn(3, conv.in_channels, 9, 9, device="cuda")
    with torch.no_grad():
        ref = partial_conv2d_ref(xc.cpu(), conv.weight.cpu(), conv.bias.cpu(), K3_IN, K3_OUT, 3, 1, 1)
        torch.backends.cudnn.allow_tf32 = False
        try:
            assert_close(conv(xc).cpu(), ref, dtype=torch.float32)
        finally:
            torch.backends.cudnn.allow_tf32 = True


def test_fused_transformer_block_on_cuda_matches_float64():
    """A partially fused nn.MultiheadAttention block with its fast modules (PartialMultiheadAttention, PartialLinear
    FFN: the Triton kernel) on CUDA in float32 equals the float64 dense zero-block model on CPU."""
    from _ir_families import randomize
    from _ir_models import MHANet

    import pyfusion
    from pyfusion.graph import trace_groups
    from pyfusion.nn import PartialMultiheadAttention

    members = [randomize(MHANet(), seed) for seed in (1, 2)]
    data = [torch.randn(4, 5, 5, dtype=torch.float64) for _ in range(2)]
    kw = {"method": "partial", "alpha": 0.5, "reset_bn": False, "graph": trace_groups(members[0], data[0])}
    dense = pyfusion.fuse(members, data, fast_modules=False, **kw).eval()
    fast = pyfusion.fuse(members, data, fast_modules="always", **kw).eval()
    assert isinstance(fast.mha, PartialMultiheadAttention)
    x = torch.randn(33, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = dense(x)
        got = fast.float().cuda()(x.float().cuda()).cpu()
    assert_close(got, ref, dtype=torch.float32)
