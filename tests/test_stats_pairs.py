"""Statistics restricted to the block pairs a method reads (``ActivationStats(pairs=...)``, the engine's ``rects``),
and ``ops.correlation`` on its cross block / on ``correlation(x, x)``: float64 references, and bit-for-bit
equality with the unrestricted state where the same macro blocks are computed."""

from __future__ import annotations

import pytest
import torch

from pyfusion import _ext
from pyfusion.ops import correlation
from pyfusion.ops.moments import accumulate_moments, moment_shift
from pyfusion.ops.reference import correlation_ref
from pyfusion.stats import ActivationStats

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason="the C++ extension is not built")


def _correlated(n: int, sizes: list[int], offset: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, max(sizes), generator=g)
    return [
        (base[:, :s] + 0.5 * torch.randn(n, s, generator=g)) * torch.rand(s, generator=g).add(0.5) + offset
        for s in sizes
    ]


@needs_ext
@pytest.mark.parametrize("sizes", [[100, 130], [37, 96, 200]])
def test_engine_rects_give_the_requested_blocks_and_diagonal(sizes):
    """Blocks that straddle the 96-wide macro blocks: the requested cross blocks and the diagonal match float64."""
    x = torch.cat(_correlated(700, sizes, offset=3.0), 1)
    d = x.shape[1]
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    rects = []
    for k in range(1, len(sizes)):
        rects += [off[k], off[k + 1], 0, off[1]]
    shift = moment_shift(x)
    s1, s2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    assert accumulate_moments(x, shift, s1, s2, rects) == "cpp"
    v = x.double() - shift
    want = v.T @ v
    torch.testing.assert_close(s1, v.sum(0), rtol=1e-6, atol=1e-4)  # float32 rounding of each x - c
    torch.testing.assert_close(torch.diagonal(s2), torch.diagonal(want), rtol=2e-7, atol=1e-6)
    for k in range(1, len(sizes)):
        blk = (slice(off[k], off[k + 1]), slice(0, off[1]))
        torch.testing.assert_close(s2[blk], want[blk], rtol=2e-7, atol=1e-3)
    if len(sizes) == 3:  # the (2, 1) block was not requested: the engine skipped (some of) it
        assert bool((s2[off[2] :, off[1] : off[2]] == 0).any())


@needs_ext
def test_pairs_state_equals_the_full_state_on_what_it_holds():
    """Same macro blocks, same arithmetic: the restricted state's entries are the full state's, bit for bit, through
    several batches with a re-centring (a jump of the offset)."""
    xs = _correlated(900, [50, 70, 60], seed=1)
    full, part, diag = ActivationStats([50, 70, 60]), ActivationStats([50, 70, 60], pairs=[(1, 0), (0, 2)]), None
    diag = ActivationStats([50, 70, 60], pairs="diag")
    for lo, hi, jump in ((0, 300, 0.0), (300, 600, 0.0), (600, 900, 40.0)):
        batch = [t[lo:hi] + jump for t in xs]
        for st in (full, part, diag):
            st.update(batch)
    assert full.recentred_batches == part.recentred_batches == diag.recentred_batches >= 1
    for a, b in ((0, 1), (1, 0), (0, 2)):
        assert torch.equal(part.corr(a, b), full.corr(a, b))
        assert torch.equal(part.sqdist(a, b), full.sqdist(a, b))
    for st in (part, diag):
        assert torch.equal(st.var(), full.var())
        assert torch.equal(st.mean(), full.mean())
    with pytest.raises(ValueError, match=r"blocks \(1, 2\) were not accumulated"):
        part.corr(1, 2)
    with pytest.raises(ValueError, match="means and variances only"):
        diag.cov(0, 0)
    with pytest.raises(ValueError, match="not accumulated"):
        part.gram()
    with pytest.raises(ValueError, match="block pairs"):
        full.merge(part)


def test_pairs_argument_is_checked():
    with pytest.raises(ValueError, match="pairs must be None, 'diag'"):
        ActivationStats([3, 3], pairs="cross")
    with pytest.raises(ValueError, match="block index pairs"):
        ActivationStats([3, 3], pairs=[(0, 2)])
    with pytest.raises(ValueError, match="4 integers per rectangle"):
        accumulate_moments(torch.randn(5, 4), torch.zeros(4, dtype=torch.float64), *_state(4), [0, 1, 2])
    with pytest.raises(ValueError, match="lower triangle"):
        accumulate_moments(torch.randn(5, 4), torch.zeros(4, dtype=torch.float64), *_state(4), [0, 2, 2, 4])


def _state(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_correlation_of_x_with_itself_and_with_another(offset):
    x, y = _correlated(2000, [150, 110], offset=offset, seed=2)
    x[:, 7] = 5.0  # a constant column: 0 everywhere, its diagonal entry included
    cxx = correlation(x, x)
    want = correlation_ref(x, x)
    assert cxx.shape == (150, 150) and torch.equal(cxx, cxx.T)
    torch.testing.assert_close(cxx, want, rtol=0, atol=2e-6)
    assert bool((cxx[7] == 0).all())
    torch.testing.assert_close(correlation(x, y), correlation_ref(x, y), rtol=0, atol=2e-6)
    torch.testing.assert_close(correlation(x[:, :40], x), correlation_ref(x[:, :40], x), rtol=0, atol=2e-6)


def test_recentring_of_a_few_neurons_updates_their_rows_and_columns_only():
    """One neuron jumps (dead on the first batch, offset 50 later): the O(D m) re-centring of its row and column
    gives the float64 statistics, as the full re-centring does."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 40, generator=g)
    x[:, 20:] += 0.5 * x[:, :20]
    x[:200, 3] = 0.0
    x[200:, 3] = 50.0 + torch.randn(2800, generator=g)
    st = ActivationStats([40])
    for lo in range(0, 3000, 200):
        st.update(x[lo : lo + 200])
    assert st.recentred_batches >= 1
    torch.testing.assert_close(st.corr(), correlation_ref(x, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(st.mean(), x.double().mean(0), rtol=1e-9, atol=1e-7)
