"""The correlation engine (csrc/correlation through pyfusion._C) and the one-shot op pyfusion.ops.correlation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pyfusion import _ext
from pyfusion.ops import correlation
from pyfusion.ops.reference import correlation_ref

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=_ext.EXT_SKIP_REASON or "extension missing")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _isas() -> list[str]:
    if not _ext.EXT_AVAILABLE:
        return []
    best = _ext._C.corr_best_isa()
    return {"avx512": ["avx512", "avx2", "scalar"], "avx2": ["avx2", "scalar"]}.get(best, ["scalar"])


def _engine(x: torch.Tensor, isa: str = "auto", threads: int = 0, shift: torch.Tensor | None = None):
    """Run the raw kernel; returns (mean, full covariance) in float64 from its shifted sums."""
    n, d = x.shape
    if shift is None:
        shift = x[:256].double().mean(0).float().double()
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.full((d, d), 3.0, dtype=torch.float64).triu(1)  # upper triangle is scratch: must never matter
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    _ext._C.corr_accumulate(
        x.data_ptr(), code, n, d, x.stride(0), x.stride(1), shift.data_ptr(), s1.data_ptr(), s2.data_ptr(), threads, isa
    )
    low = torch.tril(s2)
    full = low + torch.tril(low, -1).T
    mean = shift + s1 / n
    return mean, (full - torch.outer(s1, s1) / n) / n


def _ref(x: torch.Tensor):
    xd = x.double()
    m = xd.mean(0)
    return m, (xd - m).T @ (xd - m) / xd.shape[0]


@needs_ext
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (5, 1), (255, 13), (257, 97), (600, 130), (1000, 33)])
def test_kernel_matches_float64(isa, n, d):
    x = torch.randn(n, d) * 3 + 0.5
    mean, cov = _engine(x, isa)
    rm, rc = _ref(x)
    torch.testing.assert_close(mean, rm, rtol=0, atol=1e-6)
    # float32 products summed over <= 64 samples, then float64: relative error ~3e-7 of the diagonal scale.
    torch.testing.assert_close(cov, rc, rtol=0, atol=2e-6 * rc.diagonal().max().item())


@needs_ext
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("n", [700, 2600])  # 2600 >= 2 threads x 1024 rows: the row-split path
def test_kernel_threads_and_isas_agree(isa, n):
    x = torch.randn(n, 150)
    _, c1 = _engine(x, isa, threads=1)
    _, c2 = _engine(x, isa, threads=2)
    # s2 entries are summed in the same order whatever the thread count; s1 is summed in float32 per panel
    # and thread (<= 256 terms, then float64), so the covariances agree to ~1e-8 of the variance scale.
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-7 * c1.diagonal().max().item())
    torch.testing.assert_close(c2, _ref(x)[1], rtol=0, atol=2e-6 * c1.diagonal().max().item())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_is_upcast_exactly(dtype):
    x = torch.randn(400, 40).to(dtype)
    mean, cov = _engine(x)
    rm, rc = _ref(x.float())  # the float64 reference on the same (rounded) values
    torch.testing.assert_close(mean, rm, rtol=0, atol=1e-6)
    torch.testing.assert_close(cov, rc, rtol=0, atol=2e-6 * rc.diagonal().max().item())


@needs_ext
def test_kernel_strided_input():
    base = torch.randn(90, 700)
    views = [base.t(), base.t()[::3, 5:60], torch.randn(300, 80)[:, ::2], torch.randn(1, 64).expand(200, 64)]
    for x in views:
        assert not x.is_contiguous()
        mean, cov = _engine(x)
        rm, rc = _ref(x.contiguous())
        torch.testing.assert_close(mean, rm, rtol=0, atol=1e-6)
        torch.testing.assert_close(cov, rc, rtol=0, atol=2e-6 * max(rc.diagonal().max().item(), 1.0))


@needs_ext
def test_kernel_rejects_bad_arguments():
    x = torch.randn(4, 3)
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="isa must be one of"):
        _ext._C.corr_accumulate(x.data_ptr(), 0, 4, 3, 3, 1, s.data_ptr(), s.data_ptr(), s2.data_ptr(), 1, "sse9")
    with pytest.raises(ValueError, match="dtype code"):
        _ext._C.corr_accumulate(x.data_ptr(), 7, 4, 3, 3, 1, s.data_ptr(), s.data_ptr(), s2.data_ptr(), 1, "auto")
    with pytest.raises(ValueError, match="non-negative shape"):
        _ext._C.corr_accumulate(x.data_ptr(), 0, -1, 3, 3, 1, s.data_ptr(), s.data_ptr(), s2.data_ptr(), 1, "auto")


# ---- the op -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,dx,dy", [(1, 1, 1), (2, 3, 2), (100, 1, 7), (333, 20, 45)])
def test_correlation_op_matches_reference(n, dx, dy):
    x, y = torch.randn(n, dx), torch.randn(n, dy)
    y[:, 0] = x[:, 0] * 2 + 1  # an exactly correlated pair
    out = correlation(x, y)
    assert out.dtype == torch.float64 and out.shape == (dx, dy)
    torch.testing.assert_close(out, correlation_ref(x, y), rtol=0, atol=1e-6)
    if n > 2:
        assert abs(out[0, 0].item() - 1.0) < 1e-6


def test_correlation_op_offset_and_constant_columns():
    x = torch.randn(500, 6, dtype=torch.float64) * 1e-2 + 1e3
    y = torch.randn(500, 4, dtype=torch.float64) * 1e-2 - 1e3
    x[:, 2] = 1e3  # constant column: its correlations are 0 by the documented rule
    xf, yf = x.float(), y.float()
    out = correlation(xf, yf)
    ref = correlation_ref(xf, yf)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_correlation_op_validation():
    with pytest.raises(ValueError, match=r"x must have shape \(N, Dx\)"):
        correlation(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"y must have shape \(4, Dy\)"):
        correlation(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="at least one sample"):
        correlation(torch.randn(0, 2), torch.randn(0, 2))
    with pytest.raises(ValueError, match="must be float16, bfloat16, float32 or float64"):
        correlation(torch.ones(3, 2, dtype=torch.int64), torch.randn(3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        correlation(torch.tensor([[1.0], [float("nan")]]), torch.randn(2, 1))


def test_correlation_opcheck():
    from pyfusion.ops.moments import CORRELATION_OP

    for x, y in [(torch.randn(50, 6), torch.randn(50, 3)), (torch.randn(20, 7).t()[:, :4].t(), torch.randn(4, 2))]:
        torch.library.opcheck(CORRELATION_OP.op(), (x, y))


def test_bench_quick_runs(tmp_path):
    out = tmp_path / "quick.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_correlation.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "| method |" in text and "numpy.corrcoef" in text
