"""The direct k-cardinality (partial) assignment engine (csrc/assignment/lsap.cpp, KCardCore) against scipy on the
sink-padded square problem, POT's exact transport with a sink, brute force and the padded C++ engine, by objective
value (the optimal pairs themselves are not unique under ties)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from pyfusion import _ext
from pyfusion.ops import linear_assignment
from pyfusion.ops.reference import augment_partial_cost

pytestmark = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=_ext.EXT_SKIP_REASON or "extension missing")

ENGINES = ("direct", "padded", "auto")


def solve(c: np.ndarray, k: int | None = None, u: float | None = None, engine: str = "direct", maximize=False):
    """(col of each row, -1 unmatched; total of the matched entries) from the C++ engine."""
    c = np.ascontiguousarray(c)
    fn = _ext._C.lsap_solve_f32 if c.dtype == np.float32 else _ext._C.lsap_solve_f64
    cols, totals = fn([c], [-1 if k is None else k], maximize, u, 1, engine)
    return cols[0][: c.shape[0]], float(totals[0])


def check_matching(c: np.ndarray, cols: np.ndarray, total: float, size: int | None) -> None:
    rows = np.flatnonzero(cols >= 0)
    if size is not None:
        assert len(rows) == size
    assert len(np.unique(cols[rows])) == len(rows), "a column matched twice"
    assert np.isfinite(c[rows, cols[rows]]).all(), "a forbidden pair was used"
    assert total == pytest.approx(float(c[rows, cols[rows]].sum()), abs=1e-9)


def scipy_padded(c: np.ndarray, k: int) -> float:
    """Objective of the k-cardinality problem: scipy's linear_sum_assignment on the padded square problem."""
    aug = augment_partial_cost(c, num_matches=k)
    if aug.size == 0:
        return 0.0
    r, cc = linear_sum_assignment(aug)
    return float(aug[r, cc].sum())


def pot_sink(c: np.ndarray, k: int) -> float:
    """Objective of the same problem as exact transport with one sink per side (POT ot.emd): row masses 1 plus a
    sink of mass m - k, column masses 1 plus a sink of mass n - k, sink-sink forbidden (a large cost)."""
    import ot

    n, m = c.shape
    big = 1e3 * (1.0 + np.abs(c).max()) * (n + m)
    M = np.zeros((n + 1, m + 1))
    M[:n, :m] = c
    M[n, m] = big
    a = np.r_[np.ones(n), m - k].astype(np.float64)
    b = np.r_[np.ones(m), n - k].astype(np.float64)
    plan = ot.emd(a, b, M, numItermax=10_000_000)
    assert plan[n, m] < 1e-9, "POT sent mass sink to sink: the big cost is too small"
    return float((plan[:n, :m] * c).sum())


def brute_force(c: np.ndarray, k: int) -> float:
    n, m = c.shape
    best = np.inf
    for rows in itertools.combinations(range(n), k):
        for cols in itertools.permutations(range(m), k):
            best = min(best, float(c[list(rows), list(cols)].sum()))
    return 0.0 if k == 0 else best


def sq_euclidean(rng: np.random.Generator, n: int, m: int, d: int = 16) -> np.ndarray:
    a, b = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    return ((a[:, None] - b[None]) ** 2).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# random and structured costs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(30, 30), (17, 41), (41, 17)])
def test_random_equals_scipy_and_pot(engine, shape, rng):
    n, m = shape
    c = sq_euclidean(rng, n, m)
    for k in sorted({0, 1, 2, min(n, m) // 3, min(n, m) // 2, (4 * min(n, m)) // 5 + 1, min(n, m) - 1, min(n, m)}):
        cols, total = solve(c, k, engine=engine)
        check_matching(c, cols, total, k)
        assert total == pytest.approx(scipy_padded(c, k), abs=1e-9), k
        assert total == pytest.approx(pot_sink(c, k), abs=1e-7), k


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 3), (4, 3), (4, 5)])
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
def test_brute_force(shape, kind, rng):
    n, m = shape
    c = {"normal": rng.standard_normal(shape), "ties": rng.integers(0, 2, shape) * 1.0, "equal": np.full(shape, 3.0)}
    for k in range(min(n, m) + 1):
        for maximize in (False, True):
            cols, total = solve(c[kind], k, maximize=maximize)
            check_matching(c[kind], cols, total, k)
            want = -brute_force(-c[kind], k) if maximize else brute_force(c[kind], k)
            assert total == pytest.approx(want, abs=1e-12)


def test_greedy_choice_is_wrong():
    # The cheapest entry (0, 0) is not in the optimal pair of two: 2 + 2 < 1 + 100. The successive shortest paths
    # take (0, 0) first, then must reroute row 0 (augmenting path 1 -> 0 -> 0 -> 1, cost 3 = 4 - 1).
    c = np.array([[1.0, 2.0], [2.0, 100.0]])
    cols, total = solve(c, 1)
    assert total == 1.0 and cols.tolist() == [0, -1]
    cols, total = solve(c, 2)
    assert total == 4.0 and cols.tolist() == [1, 0]
    # A longer reroute: greedy picks the diagonal 1s and then needs the 50; the optimum avoids the 1 at (1, 1).
    c = np.array([[1.0, 2.0, 50.0], [2.0, 1.0, 50.0], [50.0, 2.0, 50.0]])
    assert solve(c, 2)[1] == 2.0
    assert solve(c, 3)[1] == pytest.approx(brute_force(c, 3))


@pytest.mark.parametrize("engine", ENGINES)
def test_integer_costs_with_many_ties(engine, rng):
    for n, m in [(40, 40), (25, 60), (60, 25)]:
        c = rng.integers(0, 3, (n, m)).astype(np.float64)
        for k in range(0, min(n, m) + 1, 3):
            cols, total = solve(c, k, engine=engine)
            check_matching(c, cols, total, k)
            assert total == scipy_padded(c, k)


@pytest.mark.parametrize("engine", ENGINES)
def test_all_equal_costs(engine):
    c = np.full((50, 70), 0.25)
    for k in (0, 1, 25, 49, 50):
        cols, total = solve(c, k, engine=engine)
        check_matching(c, cols, total, k)
        assert total == 0.25 * k


def test_forbidden_entries(rng):
    c = rng.random((6, 6))
    c[:, 0] = np.inf  # column 0 is unusable: at most 5 pairs
    c[2, 1:] = np.inf  # row 2 is unusable: at most 5 pairs, and exactly 5 need the other rows and columns
    for k in range(6):
        cols, total = solve(c, k)
        check_matching(c, cols, total, k)
        assert total == pytest.approx(scipy_padded(np.where(np.isinf(c), 1e9, c), k), abs=1e-9)
    with pytest.raises(ValueError, match=r"no assignment of num_matches=6 pairs avoids the forbidden \(\+inf\)"):
        linear_assignment(c, num_matches=6)


@pytest.mark.parametrize(
    "bad, message", [(np.nan, "contains NaN at \\(1, 2\\)"), (-np.inf, "contains -inf at \\(1, 2\\)")]
)
def test_nan_and_wrong_infinity_rejected(bad, message, rng):
    c = rng.random((4, 5))
    c[1, 2] = bad
    before = c.copy()
    for kwargs in ({"num_matches": 2}, {"unmatched_cost": 0.3}):
        with pytest.raises(ValueError, match=message):
            linear_assignment(c, **kwargs)
    np.testing.assert_array_equal(c, before)
    with pytest.raises(ValueError, match="contains \\+inf at \\(0, 0\\)"):
        linear_assignment(np.array([[np.inf, 1.0]]), num_matches=1, maximize=True)
    # the direct engine validates inside its column minima (no separate pass): k = 0 (no augmentation), a
    # maximisation (its negated copy turns +inf into -inf), float32, and the last entry of the matrix
    for k in (0, 2):
        with pytest.raises(ValueError, match=message):
            linear_assignment(c.astype(np.float32), num_matches=k)
    m = rng.random((4, 5))
    m[3, 4] = np.inf
    with pytest.raises(ValueError, match="contains \\+inf at \\(3, 4\\)"):
        linear_assignment(m, num_matches=2, maximize=True)
    m[3, 4] = np.nan
    with pytest.raises(ValueError, match="contains NaN at \\(3, 4\\)"):
        linear_assignment(m, unmatched_cost=0.2, maximize=True)


def test_engine_argument_checked():
    with pytest.raises(ValueError, match="partial_engine must be 'auto', 'direct' or 'padded'; got 'fast'"):
        solve(np.ones((2, 2)), 1, engine="fast")


@pytest.mark.parametrize("maximize", [False, True])
def test_unmatched_cost_equals_padded(maximize, rng):
    for shape in [(30, 30), (20, 45), (45, 20)]:
        c = sq_euclidean(rng, *shape) / 16
        for u in (0.0, 0.2, 0.6, 1.0, 5.0):
            want_cols, want = solve(c, u=u, engine="padded", maximize=maximize)
            cols, got = solve(c, u=u, engine="direct", maximize=maximize)
            check_matching(c, cols, got, None)
            sign = -1.0 if maximize else 1.0
            objective = got + sign * u * (sum(shape) - 2 * int((cols >= 0).sum()))
            expected = want + sign * u * (sum(shape) - 2 * int((want_cols >= 0).sum()))
            assert objective == pytest.approx(expected, abs=1e-9), (shape, u)


def test_cost_is_convex_in_k(rng):
    # Successive shortest paths: the optimal k-cardinality cost f(k) has non-decreasing increments.
    c = sq_euclidean(rng, 40, 50)
    f = np.array([solve(c, k)[1] for k in range(41)])
    assert np.all(np.diff(f, 2) >= -1e-9)
    assert f[-1] == pytest.approx(float(c[linear_sum_assignment(c)].sum()), abs=1e-9)


def test_float32_costs(rng):
    c = sq_euclidean(rng, 60, 60).astype(np.float32)
    for k in (10, 30, 47, 55):
        cols, total = solve(c, k)
        check_matching(c.astype(np.float64), cols, total, k)
        assert total == pytest.approx(scipy_padded(c.astype(np.float64), k), rel=1e-5)


def test_batch_and_public_function(rng):
    costs = [sq_euclidean(rng, n, m) for n, m in [(30, 30), (12, 40), (40, 12), (1, 1), (0, 5)]]
    ks = [21, 12, 5, 1, 0]
    res = linear_assignment(costs, num_matches=ks)
    for c, k, r, cc, tot in zip(costs, ks, res.row_ind, res.col_ind, res.cost):
        assert len(r) == k and len(np.unique(cc)) == k
        assert tot == pytest.approx(scipy_padded(c, k), abs=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 9).flatmap(
        lambda n: st.integers(1, 9).flatmap(
            lambda m: st.tuples(
                arrays(np.float64, (n, m), elements=st.integers(-3, 3).map(float) | st.floats(-10, 10, width=32)),
                st.integers(0, min(n, m)),
            )
        )
    ),
    st.sampled_from(ENGINES),
    st.booleans(),
)
def test_property_objective_equals_scipy(problem, engine, maximize):
    c, k = problem
    cols, total = solve(c, k, engine=engine, maximize=maximize)
    check_matching(c, cols, total, k)
    want = -scipy_padded(-c, k) if maximize else scipy_padded(c, k)
    assert total == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("shape", [(120, 120), (70, 150), (150, 70)])
@pytest.mark.parametrize("kind", ["sqdist", "duplicates", "binary", "forbidden"])
def test_wide_rows_equal_scipy(shape, kind, rng):
    """Rows wider than the engine's sorted short lists (32 entries): a search relaxes a row on its short list when
    that suffices and on the whole row otherwise (every entry of a {0, 1} row's list ties with the first entry left
    out, so those rows take the full path); either way the objective is scipy's on the padded problem."""
    n, m = shape
    if kind == "sqdist":
        c = sq_euclidean(rng, n, m)
    elif kind == "duplicates":  # member rows repeated, columns nearly repeated: many exact and near ties
        a = rng.standard_normal((n // 3 + 1, 8))[rng.integers(0, n // 3 + 1, n)]
        b = a[rng.integers(0, n, m)] + 1e-9 * rng.standard_normal((m, 8))
        c = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    elif kind == "binary":
        c = rng.integers(0, 2, shape).astype(np.float64)
    else:
        c = rng.random(shape)
        c[rng.random(shape) < 0.5] = np.inf
    kmax = min(n, m)
    for k in (1, kmax // 4, kmax // 2, (3 * kmax) // 4, (9 * kmax) // 10):
        cols, total = solve(c, k, engine="direct")
        check_matching(c, cols, total, k)
        assert total == pytest.approx(scipy_padded(np.where(np.isinf(c), 1e9, c), k), abs=1e-9), (kind, k)
