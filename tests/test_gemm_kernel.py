"""The float64 A B^T kernel behind the squared-distance cost (pyfusion._C.gemm_abt_f64, csrc/gemm, used by
pyfusion.match.distance.sqdist): exact on integer operands (every partial sum representable, so any summation
order gives the same bits), within float64 rounding of torch's product on random ones, across odd shapes that are
not multiples of the tiles (8 x 24, depth panels of 192), non-contiguous, expanded and sliced operands, and the
same bits on one and two threads."""

from __future__ import annotations

import pytest
import torch

from pyfusion import _ext
from pyfusion.match import distance

needs_kernel = pytest.mark.skipif(
    _ext._C is None or not hasattr(_ext._C, "gemm_abt_f64") or not _ext._C.gemm_abt_f64_supported(),
    reason=_ext.EXT_SKIP_REASON or "no AVX-512F on this CPU, or an old extension",
)


@pytest.fixture
def kernel_route(monkeypatch):
    """sqdist takes the kernel wherever it runs: the vendor rule (:func:`distance._gemm_usable`) sends Intel CPUs
    to MKL, whose bits differ between thread counts, and these tests are about the kernel's route."""
    monkeypatch.setattr(distance, "_gemm_usable", lambda ext: bool(ext.gemm_abt_f64_supported()))


SHAPES = [(1, 1, 1), (7, 5, 3), (8, 24, 192), (9, 25, 193), (131, 77, 1001), (300, 50, 17), (33, 301, 390)]


def _call(a, b, threads=1):
    ext = _ext._C
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    a = a if a.stride(1) == 1 and a.stride(0) >= k else a.contiguous()
    b = b if b.stride(1) == 1 and b.stride(0) >= k else b.contiguous()
    out = torch.full((m, n), float("nan"), dtype=torch.float64)
    ext.gemm_abt_f64(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, a.stride(0), b.stride(0), n, threads)
    return out


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_on_integer_operands(shape):
    m, n, k = shape
    gen = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randint(-8, 9, (m, k), generator=gen).double()
    b = torch.randint(-8, 9, (n, k), generator=gen).double()
    want = (a.long() @ b.long().T).double()  # integer arithmetic: the exact products
    assert torch.equal(_call(a, b), want)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_random_operands_within_float64_rounding(shape):
    m, n, k = shape
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, k, generator=gen, dtype=torch.float64)
    got = _call(a, b)
    # |error| of a k-term float64 dot product <= k eps sum_p |a_p b_p| (either summation order)
    bound = k * torch.finfo(torch.float64).eps * (a.abs() @ b.abs().T)
    assert bool(((got - a @ b.T).abs() <= 2 * bound).all())


@needs_kernel
def test_strided_expanded_and_sliced_operands_through_sqdist(kernel_route):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(257, 700, generator=gen, dtype=torch.float64)
    cases = [
        (base[:, ::2], base[3:200, 1::2]),  # column stride 2: copied
        (
            base[:, 100:450],
            base[10:],
        ),  # row stride 700 > k = 350 with unit column stride: read in place
        (base.T.contiguous().T[:, :300], base[:90, :300]),  # column-major
        (base[:1, :300].expand(150, 300), base[:120, :300]),  # row stride 0: copied
    ]
    for a, b in cases:
        if b.shape[1] != a.shape[1]:
            b = b[:, : a.shape[1]]
        assert distance._gemm_kernel(a, b) is not None
        got = distance._cross(a, b)
        bound = a.shape[1] * torch.finfo(torch.float64).eps * (a.abs() @ b.abs().T)
        assert bool(((got - a @ b.T).abs() <= 2 * bound).all())
        d = distance.sqdist(a, b)
        want = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        torch.testing.assert_close(d, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_row_norms_from_the_packing(shape, kernel_route):
    m, n, k = shape
    gen = torch.Generator().manual_seed(m + 5)
    a = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b = torch.cat([a[: min(m, n)], torch.randn(max(0, n - m), k, generator=gen, dtype=torch.float64)])
    sq_a, sq_b, cross = distance._gram_parts(a, b)
    if distance._gemm_kernel(a, b) is not None:  # else (small): torch's norms and product
        assert torch.equal(cross, _call(a, b))
    ints = torch.randint(-8, 9, (m, k), generator=gen).double()
    assert torch.equal(distance._gram_parts(ints, ints)[0], (ints.long() ** 2).sum(1).double())  # exact
    bound = k * torch.finfo(torch.float64).eps * (a * a).sum(1)
    assert bool(((sq_a - (a * a).sum(1)).abs() <= 2 * bound).all())
    # an identical row of a and of b: identical bits (sqdist of a row with itself clamps to 0, not below)
    assert torch.equal(sq_a[: min(m, n)], sq_b[: min(m, n)])
    assert bool((distance.sqdist(a, b) >= 0).all())


@needs_kernel
def test_threads_give_the_same_bits(kernel_route):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(301, 500, generator=gen, dtype=torch.float64)
    b = torch.randn(130, 500, generator=gen, dtype=torch.float64)
    assert torch.equal(_call(a, b, 1), _call(a, b, 2))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = distance._gram_parts(a, b)
        torch.set_num_threads(2)
        two = distance._gram_parts(a, b)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_declines_what_it_does_not_take():
    a = torch.randn(200, 300, dtype=torch.float64)
    assert distance._gemm_kernel(a.float(), a.float()) is None  # float32: torch
    assert distance._gemm_kernel(a[:10, :10], a[:10, :10]) is None  # small: torch
    g = a.clone().requires_grad_(True)
    assert distance._gemm_kernel(g, a) is None  # autograd: torch
    with torch.no_grad():
        ok = distance._gemm_kernel(g, a)
    assert ok is None or ok is _ext._C
    d = distance.sqdist(g, a)
    d.sum().backward()
    assert g.grad is not None


@pytest.mark.parametrize("spec", ["reference", "torch"])
def test_a_global_forced_backend_takes_torchs_product(monkeypatch, spec):
    a = torch.randn(200, 300, dtype=torch.float64)
    monkeypatch.setenv("PYFUSION_BACKEND", spec)
    assert distance._gemm_kernel(a, a) is None
    sq_a, _sq_b, cross = distance._gram_parts(a, a)
    torch.testing.assert_close(cross, a @ a.T, rtol=0, atol=0)  # torch's own product, bit for bit
    torch.testing.assert_close(sq_a, (a * a).sum(1), rtol=1e-15, atol=0)


@needs_kernel
@pytest.mark.parametrize(("vendor", "takes"), [(None, False), ("amd", True), ("other", True)])
def test_vendor_rule_decides_the_route(monkeypatch, vendor, takes):
    """Intel CPUs (and non-MKL builds: ``mkl_avx2_vendor`` None) keep torch's product; where MKL runs AVX2 code the
    kernel is taken. The suite runs on both kinds of machine: each branch is forced here."""
    monkeypatch.setattr(_ext, "mkl_avx2_vendor", lambda: vendor)
    assert distance._gemm_usable.__wrapped__(_ext._C) is takes
    distance._gemm_usable.cache_clear()
    try:
        a = torch.randn(200, 300, dtype=torch.float64)
        assert (distance._gemm_kernel(a, a) is not None) is takes
    finally:
        distance._gemm_usable.cache_clear()
