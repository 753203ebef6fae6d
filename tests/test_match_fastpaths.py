"""The fast paths of pyfusion.match equal the general code bit for bit: the one-gather alignment of index maps
(apply_segment's gather / scatter) and the in-place squared distance (sqdist_from_gram); the C++ feature gather
(csrc/gather) copies what index_select copies and its row norms equal float64 sums to rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyfusion import _ext
from pyfusion.graph.transform import apply_segment
from pyfusion.match import align
from pyfusion.match.align import MatchedPairs, Permutation, _gather_index, _gather_with_norms, aligned_features
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


needs_gather = pytest.mark.skipif(
    _ext._C is None or not hasattr(_ext._C, "gather_axis1_f64"), reason="the extension's feature gather (csrc/gather)"
)


def _norm_bound(x: torch.Tensor) -> torch.Tensor:
    """A rounding bound of any order's float64 sum of squares of each row of x: (F + 1) u sum_f x_f^2 (F - 1 adds
    and one square per term, each within a factor 1 + u; u = 2^-53), with the reference's own error on top."""
    f = math.prod(x.shape[1:])
    return 2 * (f + 1) * 2.0**-53 * (x * x).flatten(1).sum(1)


@needs_gather
@pytest.mark.parametrize(
    "shape, n_index",
    [((5, 7, 3, 3), 4), ((64, 512, 3, 3), 384), ((13, 11), 11), ((3, 37, 5), 50), ((1, 1, 1), 1), ((0, 4, 9), 3),
     ((6, 5, 2, 2), 0), ((2, 2000), 1999)],
)  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_engine_equals_index_select(shape: tuple[int, ...], n_index: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + n_index)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, shape[1], (n_index,), generator=gen)  # any order, repeats allowed
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, sq = _gather_with_norms(t, idx)
    finally:
        torch.set_num_threads(n)
    want = t.index_select(1, idx)
    assert out.shape == want.shape and torch.equal(out, want)
    ref = (want * want).flatten(1).sum(1)
    assert sq.shape == (shape[0],) and bool(((sq - ref).abs() <= _norm_bound(want)).all())


@needs_gather
def test_gather_engine_norms_exact_on_integers_and_equal_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(-1000, 1000, (9, 40, 3, 3), generator=gen).to(torch.float64)
    t[4] = t[1]  # equal rows get equal bits
    idx = torch.randperm(40, generator=gen)[:33]
    out, sq = _gather_with_norms(t, idx)
    assert torch.equal(sq, (out * out).flatten(1).sum(1))  # integers: every order is exact
    t = torch.randn(9, 40, 3, 3, generator=gen, dtype=torch.float64)
    t[4] = t[1]
    assert _gather_with_norms(t, idx)[1][4] == _gather_with_norms(t, idx)[1][1]


@needs_gather
def test_gather_engine_declines_and_checks() -> None:
    t = torch.randn(6, 8, 3, dtype=torch.float64)
    idx = torch.tensor([3, 1, 0])
    assert _gather_with_norms(t.transpose(0, 2).contiguous().transpose(0, 2), idx) is None  # not contiguous
    assert _gather_with_norms(t.float(), idx) is None  # float32
    assert _gather_with_norms(t[:, 0].contiguous(), idx[1:]) is not None  # 2-D
    assert _gather_with_norms(t[0, 0], idx) is None  # 1-D
    with torch.enable_grad():
        assert _gather_with_norms(t.clone().requires_grad_(), idx) is None
    with pytest.raises(ValueError, match=r"gather_axis1: index 1 is 8, outside \[0, 8\)"):
        _gather_with_norms(t, torch.tensor([0, 8]))


def _conv_pair():
    from pyfusion.graph import trace_groups
    from pyfusion.models import vgg

    torch.manual_seed(8)
    members = [vgg((6, "M", 10, "M"), in_channels=3, image_size=8, hidden=7).double() for _ in range(2)]
    graph = trace_groups(members[0])
    states = [{k: v.detach() for k, v in m.named_parameters()} for m in members]
    return graph, states


@needs_gather
def test_aligned_features_norms_are_the_rows_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    graph, (ref, mem) = _conv_pair()
    rng = np.random.default_rng(2)
    names = list(graph.groups)
    n0 = graph.groups[names[0]].size
    maps = {names[0]: MatchedPairs(rng.permutation(n0)[:4], rng.permutation(n0)[:4])}
    g = graph.groups[names[1]]
    sq: list = []
    feats = aligned_features(ref, mem, graph, names[1], g.producers, maps, sq_norms=sq)
    assert len(sq) == len(feats) and any(s is not None for s in sq)
    for (a, b), s in zip(feats, sq):
        if s is None:
            continue
        for x, n in ((a, s[0]), (b, s[1])):
            assert bool(((n - (x * x).sum(1)).abs() <= _norm_bound(x)).all())
    # the features themselves are the torch path's (index_select), norms or not
    monkeypatch.setattr(align, "_gather_with_norms", lambda t, gather: None)
    plain_sq: list = []
    plain = aligned_features(ref, mem, graph, names[1], g.producers, maps, sq_norms=plain_sq)
    assert all(s is None for s in plain_sq)
    for (a, b), (c, d) in zip(feats, plain):
        assert torch.equal(a, c) and torch.equal(b, d)


@needs_gather
def test_weight_cost_with_gather_norms_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyfusion.match.weights import weight_cost

    graph, (ref, mem) = _conv_pair()
    rng = np.random.default_rng(5)
    maps = {
        name: MatchedPairs(rng.permutation(g.size)[: g.size - 2], rng.permutation(g.size)[: g.size - 2])
        for name, g in graph.groups.items()
    }
    got = {name: weight_cost(ref, mem, graph, name, maps, outgoing=True) for name in graph.groups}
    monkeypatch.setattr(align, "_gather_with_norms", lambda t, gather: None)
    for name in graph.groups:
        want = weight_cost(ref, mem, graph, name, maps, outgoing=True)
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_sqdist_takes_given_norms() -> None:
    a = torch.randn(40, 300, dtype=torch.float64)
    b = torch.randn(30, 300, dtype=torch.float64)
    sa, sb = (a * a).sum(1), (b * b).sum(1)
    torch.testing.assert_close(sqdist(a, b, sq_norms=(sa, sb)), sqdist(a, b), rtol=1e-12, atol=1e-10)
    # the norms given are the ones used (here deliberately shifted)
    got = sqdist(a, b, sq_norms=(sa + 1.0, sb))
    torch.testing.assert_close(got, sqdist(a, b) + 1.0, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="sq_norms must have shapes"):
        sqdist(a, b, sq_norms=(sb, sa))
