"""The fast paths of pyfusion.match equal the general code bit for bit: the one-gather alignment of index maps
(apply_segment's gather / scatter) and the in-place squared distance (sqdist_from_gram)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfusion.graph.transform import apply_segment
from pyfusion.match.align import MatchedPairs, Permutation, _gather_index
from pyfusion.match.distance import _gram_parts, _row_sq_norms, sqdist, sqdist_from_gram


@pytest.mark.parametrize("expand", [1, 4])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_index_equals_apply_segment(axis: int, expand: int) -> None:
    rng = np.random.default_rng(axis * 10 + expand)
    n = 7
    shape = [5, 6, 3]
    shape[axis] = n * expand
    t = torch.randn(*shape, dtype=torch.float64)
    factors = (("unit", n),) + ((("rep", expand),) if expand > 1 else ())
    pairs = MatchedPairs(rng.permutation(n)[:4], rng.permutation(n)[:4])
    for m, sel in pairs.maps(n) + Permutation(torch.as_tensor(rng.permutation(n))).maps(n)[1:]:
        g = _gather_index(m, sel, factors)
        assert g is not None
        want = apply_segment(t, m, axis, factors, sel)
        got = t[(slice(None),) * axis + (g,)]
        assert got.shape == want.shape and torch.equal(got, want)


def test_gather_index_refuses_other_maps() -> None:
    n = 4
    m = torch.zeros(3, n, dtype=torch.float64)
    rows, cols = torch.arange(3), torch.tensor([2, 0, 3])
    assert _gather_index(m, (rows, cols, torch.tensor([1.0, 2.0, 1.0]), True), (("unit", n),)) is None  # scaled
    assert _gather_index(m, (rows[:2], cols[:2], None, True), (("unit", n),)) is None  # a slot left empty
    assert _gather_index(m, (rows, cols, None, False), (("unit", n),)) is None  # not injective
    assert _gather_index(m, "compute", (("unit", n),)) is None  # a dense map
    assert _gather_index(m, (rows, cols, None, True), (("rep", 2), ("unit", n))) is None  # rep before the unit


@pytest.mark.parametrize("shape", [(5, 7, 3), (64, 48, 300), (300, 200, 700), (1, 1, 1), (0, 3, 4)])
def test_sqdist_equals_sqdist_from_gram(shape: tuple[int, int, int]) -> None:
    na, nb, f = shape
    a = torch.randn(na, f, dtype=torch.float64)
    b = torch.randn(nb, f, dtype=torch.float64)
    for x, y in ((a, b), (a, a), (a, a + 1e-9)):  # a, a: the clamp of negative rounding matters
        # the same norms and inner products (_gram_parts: csrc/gemm's kernel where it applies, checked against
        # torch in tests/test_gemm_kernel.py): what is checked here is sqdist's in-place arithmetic on them
        want = sqdist_from_gram(*_gram_parts(x, y))
        got = sqdist(x, y)
        assert torch.equal(got, want) and bool((got >= 0).all())


@pytest.mark.usefixtures("one_thread")  # with 2 threads torch splits a long single-row sum: other bits than 3 rows
@pytest.mark.parametrize("shape", [(0, 5), (3, 40000), (300, 700), (513, 1000), (70000, 3)])
def test_row_sq_norms_equal_the_plain_sum(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.equal(_row_sq_norms(x), (x * x).sum(1))
    assert torch.equal(_row_sq_norms(x, chunk_bytes=64), (x * x).sum(1))  # one row per block
