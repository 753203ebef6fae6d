"""The CUDA kernels of pyfusion._C called directly: the correlation accumulation (csrc/correlation/
correlation_cuda.cu) and the HF cost epilogue (csrc/interp/interp_cost_cuda.cu) against their float64 / CPU
references on a GPU (``gpu`` tests), and, on a machine without a GPU, the clear RuntimeError their bindings raise
(the module links cudart statically, so it imports without a driver). The assignment solver's CUDA tests are in
test_kernels_assignment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfusion import _ext

HAS_CUDA_KERNELS = _ext.EXT_AVAILABLE and hasattr(_ext._C, "corr_accumulate_cuda")
needs_cuda_build = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="the extension was built without CUDA")
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised without a driver / GPU")
def test_cuda_bindings_report_a_missing_driver():
    info = _ext.build_info()
    assert info["cuda_compiled"] and info["cuda_device_count"] == 0 and info["cuda_error"]
    with pytest.raises(RuntimeError, match="no usable CUDA device or driver"):
        _ext._C.corr_accumulate_cuda(16, 0, 4, 3, 3, 1, 16, 16, 16, 0)
    with pytest.raises(RuntimeError, match="hf_cost \\(CUDA\\): kernel launch failed"):
        _ext._C.hf_cost_cuda(*([16] * 11), 2, 2, False, 16, 0)


def corr_state_cuda(x: torch.Tensor, shift: torch.Tensor | None = None):
    n, d = x.shape
    if shift is None:
        shift = x[:256].double().mean(0).float().double()
    shift = shift.cuda()
    s1 = torch.zeros(d, dtype=torch.float64, device="cuda")
    s2 = torch.full((d, d), 7.0, dtype=torch.float64, device="cuda").triu(1)
    _ext._C.corr_accumulate_cuda(
        x.data_ptr(), _CODES[x.dtype], n, d, x.stride(0), x.stride(1), shift.data_ptr(), s1.data_ptr(), s2.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    torch.cuda.synchronize()
    return shift.cpu(), s1.cpu(), s2.cpu()


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("n,d", [(1, 1), (300, 127), (1000, 128), (2049, 129), (5000, 300), (20000, 257)])
def test_correlation_integer_data_is_exact(n, d):
    """Small integers and an integer shift: float32 products and 64-sample partial sums are exact, so s1 and the
    lower triangle of s2 equal the int64 sums; the upper triangle is never written."""
    g = torch.Generator().manual_seed(n + d)
    x = torch.randint(-6, 9, (n, d), generator=g).float()
    shift = torch.randint(-2, 3, (d,), generator=g).double()
    _, s1, s2 = corr_state_cuda(x.cuda(), shift)
    v = (x.double() - shift).to(torch.int64)
    assert torch.equal(s1, v.sum(0).double())
    assert torch.equal(torch.tril(s2).to(torch.int64), torch.tril(v.T @ v))
    assert torch.equal(torch.triu(s2, 1), torch.full((d, d), 7.0, dtype=torch.float64).triu(1))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_correlation_offset_data_against_float64(dtype):
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6000, 200, generator=g, dtype=torch.float64)
    z[:, 1::2] += 0.7 * z[:, ::2]
    x = (1e3 + z).to(dtype) if dtype == torch.float32 else (10 + z).to(dtype)
    for view in (x, x.t().contiguous().t()):  # row-major and column-major storage
        shift, s1, s2 = corr_state_cuda(view.cuda())
        n = view.shape[0]
        low = torch.tril(s2)
        cov = (low + torch.tril(low, -1).T - torch.outer(s1, s1) / n) / n
        xd = view.double()
        ref = (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / n
        sd = ref.diagonal().sqrt()
        assert ((cov - ref) / torch.outer(sd, sd)).abs().max().item() < 1e-6


@pytest.mark.gpu
@needs_cuda_build
def test_hf_cost_cuda_equals_the_cpu_kernel():
    rng = np.random.default_rng(3)
    n0, n1 = 70, 333
    mats = [torch.as_tensor(rng.standard_normal((n0, n1))) for _ in range(3)]
    v0 = [torch.as_tensor(rng.uniform(1, 3, n0)) for _ in range(4)]
    v1 = [torch.as_tensor(rng.uniform(1, 3, n1)) for _ in range(4)]
    for squared in (False, True):
        cpu = torch.empty(n0, n1, dtype=torch.float64)
        _ext._C.hf_cost(*[t.data_ptr() for t in mats + v0 + v1], n0, n1, squared, cpu.data_ptr(), 1)
        dev = [t.cuda() for t in mats + v0 + v1]
        gpu = torch.empty(n0, n1, dtype=torch.float64, device="cuda")
        _ext._C.hf_cost_cuda(*[t.data_ptr() for t in dev], n0, n1, squared, gpu.data_ptr(),
                             torch.cuda.current_stream().cuda_stream)  # fmt: skip
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-13, atol=1e-13)
