"""The one-gather path of pyfusion.match.align equals apply_segment's gather / scatter bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyfusion.graph.transform import apply_segment
from pyfusion.match.align import MatchedPairs, Permutation, _gather_index


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
