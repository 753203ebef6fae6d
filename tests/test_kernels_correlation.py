"""Low-level tests of the CPU correlation kernel ``pyfusion._C.corr_accumulate`` (csrc/correlation/correlation_cpu.cpp).

The kernel adds ``s1 += sum_n (x_n - c)`` and the lower triangle of ``s2 += sum_n (x_n - c)(x_n - c)^T`` to a float64
state. Checked here against float64 / exact integer references on shapes that cross every blocking boundary of the
kernel (48-column panels, 96-entry macro blocks, 64-sample micro-kernel depth, 8192-sample chunks), for every
instruction-set variant this CPU runs, several thread counts, strided and half-precision inputs.
"""

from __future__ import annotations

import pytest
import torch

from pyfusion import _ext

pytestmark = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=_ext.EXT_SKIP_REASON or "extension missing")

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _isas() -> list[str]:
    if not _ext.EXT_AVAILABLE:
        return ["scalar"]
    best = _ext._C.corr_best_isa()
    return {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(best, ["scalar"])


def _accumulate(x, shift, s1, s2, threads=1, isa="auto") -> str:
    n, d = x.shape
    return _ext._C.corr_accumulate(
        x.data_ptr(), _CODES[x.dtype], n, d, x.stride(0), x.stride(1), shift.data_ptr(), s1.data_ptr(), s2.data_ptr(),
        threads, isa,
    )  # fmt: skip


def _state(d: int, upper: float = 7.0):
    """Zero state whose upper triangle holds a marker: the kernel must never write above the diagonal."""
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.full((d, d), upper, dtype=torch.float64).triu(1)
    return s1, s2


def _exact_gram(v: torch.Tensor) -> torch.Tensor:
    """Lower triangle of v^T v in int64 (exact)."""
    vi = v.to(torch.int64)
    return torch.tril(vi.T @ vi)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize(
    "n,d",
    [(1, 1), (3, 47), (129, 48), (127, 49), (300, 95), (256, 96), (130, 97), (1000, 145), (8300, 5), (20000, 3)],
)
def test_integer_data_is_exact(isa, n, d):
    """Small integers with an integer shift: every product and every partial sum is exact in float32 (|sum| < 2^24),
    so s1 and the lower triangle of s2 must equal the int64 sums exactly, whatever the blocking."""
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randint(-6, 9, (n, d), generator=g).to(torch.float32)
    shift = torch.randint(-2, 3, (d,), generator=g).to(torch.float64)
    s1, s2 = _state(d)
    used = _accumulate(x, shift, s1, s2, threads=2 if n > 8000 else 1, isa=isa)  # several chunks: threaded
    assert used == isa
    v = x.double() - shift
    assert torch.equal(s1, v.sum(0))
    assert torch.equal(torch.tril(s2).to(torch.int64), _exact_gram(v))
    assert torch.equal(torch.triu(s2, 1), torch.full((d, d), 7.0, dtype=torch.float64).triu(1))


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_identical_second_moment(threads):
    """Each macro block is summed by one thread in a fixed sample order: s2 is bit-identical for any thread count;
    s1 partials are merged in thread order (float64), so they agree to rounding."""
    x = torch.randn(2500, 230) * 2 + 0.25
    shift = x[:256].double().mean(0).float().double()
    a1, a2 = _state(230)
    b1, b2 = _state(230)
    _accumulate(x, shift, a1, a2, threads=1)
    _accumulate(x, shift, b1, b2, threads=threads)
    assert torch.equal(a2, b2)
    torch.testing.assert_close(a1, b1, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("isa", _isas())
def test_random_offset_data_against_float64(isa):
    """Mean 1e3, unit-scale variation: the shifted float32 products keep the covariance to float64-grade error
    (the float32 composite X^T X - N mu mu^T loses everything at this offset)."""
    g = torch.Generator().manual_seed(3)
    n, d = 3000, 150
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z[:, 1::2] += 0.8 * z[:, ::2]  # correlated pairs
    x = (1e3 + z).to(torch.float32)
    shift = x[:256].double().mean(0).float().double()
    s1, s2 = _state(d)
    _accumulate(x, shift, s1, s2, isa=isa)
    low = torch.tril(s2)
    full = low + torch.tril(low, -1).T
    cov = (full - torch.outer(s1, s1) / n) / n
    xd = x.double()
    ref = (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / n
    sd = ref.diagonal().sqrt()
    err = ((cov - ref) / torch.outer(sd, sd)).abs().max().item()
    assert err < 1e-6, err
    torch.testing.assert_close(shift + s1 / n, xd.mean(0), rtol=0, atol=1e-9)


def test_accumulates_onto_existing_state():
    """Two calls on halves of the data equal one call on all of it (the kernel adds, it never overwrites)."""
    x = torch.randint(-5, 6, (700, 100)).float()
    shift = torch.zeros(100, dtype=torch.float64)
    a1, a2 = _state(100)
    _accumulate(x[:333], shift, a1, a2)
    _accumulate(x[333:], shift, a1, a2)
    b1, b2 = _state(100)
    _accumulate(x, shift, b1, b2)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


@pytest.mark.parametrize("isa", _isas())
def test_strided_inputs(isa):
    base = torch.randint(-4, 5, (130, 400)).float()
    views = [base.t()[:, 3:120], base[::3, 7:300:2], torch.randint(-3, 4, (1, 64)).float().expand(150, 64)]
    for x in views:
        assert not x.is_contiguous()
        d = x.shape[1]
        shift = torch.zeros(d, dtype=torch.float64)
        s1, s2 = _state(d)
        _accumulate(x, shift, s1, s2, threads=2, isa=isa)
        assert torch.equal(s1, x.double().sum(0))
        assert torch.equal(torch.tril(s2).to(torch.int64), _exact_gram(x.double()))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast_exactly(isa, dtype):
    """Halves convert to float32 exactly (vector F16C / shift paths and the scalar path): integer values and
    half-integer shifts give exact sums; random values match the float64 Gram of the rounded values."""
    x = torch.randint(-8, 9, (300, 70)).to(dtype)
    shift = torch.full((70,), 0.5, dtype=torch.float64)
    s1, s2 = _state(70)
    _accumulate(x, shift, s1, s2, isa=isa)
    v = x.double() - 0.5
    assert torch.equal(s1, v.sum(0))
    assert torch.equal(torch.tril(s2), torch.tril(v.T @ v))
    # Non-integer values, including float16 subnormals and a bfloat16 column slice (strided conversion path).
    y = (torch.randn(200, 90) * torch.logspace(-6, 1, 90)).to(dtype)
    for view in (y, y[:, 1::2]):
        d = view.shape[1]
        s1, s2 = _state(d)
        _accumulate(view, torch.zeros(d, dtype=torch.float64), s1, s2, isa=isa)
        yd = view.double()
        torch.testing.assert_close(s1, yd.sum(0), rtol=1e-12, atol=1e-12)
        ref = torch.tril(yd.T @ yd)
        scale = torch.outer(yd.norm(dim=0), yd.norm(dim=0))
        assert ((torch.tril(s2) - ref).abs() <= 1e-6 * scale + 1e-30).all()


def test_empty_inputs_change_nothing():
    x = torch.zeros(0, 5)
    s1, s2 = _state(5)
    before = s2.clone()
    _accumulate(x, torch.zeros(5, dtype=torch.float64), s1, s2)
    assert torch.equal(s2, before) and torch.equal(s1, torch.zeros(5, dtype=torch.float64))


def test_unsupported_isa_is_a_clear_error():
    x = torch.randn(4, 3)
    s1, s2 = _state(3)
    with pytest.raises(ValueError, match="isa must be one of"):
        _accumulate(x, torch.zeros(3, dtype=torch.float64), s1, s2, isa="neon")
