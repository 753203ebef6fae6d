"""pyfusion.ops.linear_assignment against scipy, brute force and the float64 reference."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pyfusion import _ext
from pyfusion.ops import assignment, linear_assignment
from pyfusion.ops.reference import augment_partial_cost, linear_assignment_ref

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason=_ext.EXT_SKIP_REASON or "extension missing")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def correlation_cost(rng: np.random.Generator, n: int, samples: int = 256, noise: float = 1.0) -> np.ndarray:
    """Negated correlations between n random 'neurons' and a noisy permuted copy of them."""
    acts = rng.standard_normal((samples, n))
    copy = acts[:, rng.permutation(n)] + noise * rng.standard_normal((samples, n))
    return -np.corrcoef(acts.T, copy.T)[:n, n:]


def make_cost(kind: str, rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    if kind == "uniform":
        return rng.random((n, m))
    if kind == "integer":  # many ties
        return rng.integers(0, 4, (n, m)).astype(np.float64)
    if kind == "offset":
        return 1e6 + rng.random((n, m))
    if kind == "negative":
        return rng.standard_normal((n, m)) * 100
    if kind == "correlation":
        assert n == m
        return correlation_cost(rng, n)
    raise AssertionError(kind)


def assert_valid(res, n: int, m: int, size: int) -> None:
    rows, cols = np.asarray(res.row_ind), np.asarray(res.col_ind)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert len(rows) == len(cols) == size
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly increasing"
    assert len(np.unique(cols)) == size
    assert np.all((rows >= 0) & (rows < n)) and np.all((cols >= 0) & (cols < m))
    assert sorted(np.concatenate([rows, np.asarray(res.unmatched_rows)]).tolist()) == list(range(n))
    assert sorted(np.concatenate([cols, np.asarray(res.unmatched_cols)]).tolist()) == list(range(m))


def scipy_objective(c: np.ndarray, maximize: bool = False) -> float:
    r, cc = linear_sum_assignment(c, maximize=maximize)
    return float(c[r, cc].sum())


def brute_force_partial(c: np.ndarray, k: int) -> float:
    n, m = c.shape
    best = np.inf
    for rows in itertools.combinations(range(n), k):
        for cols in itertools.permutations(range(m), k):
            best = min(best, float(c[list(rows), list(cols)].sum()) if k else 0.0)
    return best


# ----------------------------------------------------------------------------------------------------------
# full problems
# ----------------------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (2, 3), (3, 2), (7, 7), (17, 40), (40, 17), (64, 64), (100, 63), (63, 100), (257, 257)]


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "integer", "offset", "negative"])
@pytest.mark.parametrize("shape", SHAPES)
def test_objective_equals_scipy(kind, shape, rng):
    n, m = shape
    for _ in range(3):
        c = make_cost(kind, rng, n, m)
        before = c.copy()
        res = linear_assignment(c)
        assert_valid(res, n, m, min(n, m))
        expected = scipy_objective(c)
        assert res.cost == pytest.approx(expected, rel=1e-12, abs=1e-9)
        assert res.cost == pytest.approx(float(c[res.row_ind, res.col_ind].sum()), rel=1e-15, abs=0)
        np.testing.assert_array_equal(c, before)


@needs_ext
@pytest.mark.parametrize("n", [1, 2, 5, 31, 128, 500, 1000])
def test_correlation_structured_equals_scipy(n, rng):
    c = correlation_cost(rng, n)
    res = linear_assignment(c)
    assert_valid(res, n, n, n)
    assert res.cost == pytest.approx(scipy_objective(c), rel=1e-12, abs=1e-9)


@needs_ext
@pytest.mark.parametrize("n", [1000])
@pytest.mark.parametrize("kind", ["uniform", "integer"])
def test_large_equals_scipy(kind, n, rng):
    c = make_cost(kind, rng, n, n)
    res = linear_assignment(c)
    assert_valid(res, n, n, n)
    assert res.cost == pytest.approx(scipy_objective(c), rel=1e-12, abs=1e-9)


@needs_ext
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_empty(shape):
    res = linear_assignment(np.zeros(shape))
    assert res.cost == 0.0 and len(res.row_ind) == 0 and len(res.col_ind) == 0
    assert len(res.unmatched_rows) == shape[0] and len(res.unmatched_cols) == shape[1]


@needs_ext
@pytest.mark.parametrize("shape", [(9, 9), (6, 11), (11, 6), (120, 120)])
def test_maximize(shape, rng):
    c = rng.standard_normal(shape)
    res = linear_assignment(c, maximize=True)
    assert_valid(res, *shape, min(shape))
    assert res.cost == pytest.approx(scipy_objective(c, maximize=True), rel=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [(50, 50), (30, 70), (300, 300)])
def test_forbidden_entries(shape, rng):
    c = rng.random(shape)
    c[rng.random(shape) < 0.4] = np.inf
    c[np.arange(min(shape)), np.arange(min(shape))] = rng.random(min(shape))  # keep it feasible
    res = linear_assignment(c)
    assert np.all(np.isfinite(c[res.row_ind, res.col_ind]))
    assert res.cost == pytest.approx(scipy_objective(c), rel=1e-12)
    neg = -c
    res = linear_assignment(neg, maximize=True)
    assert res.cost == pytest.approx(scipy_objective(neg, maximize=True), rel=1e-12)


@needs_ext
@pytest.mark.parametrize("n", [20, 300])
def test_float32_vs_float64(n, rng):
    c32 = rng.random((n, n)).astype(np.float32)
    c64 = c32.astype(np.float64)
    exact = scipy_objective(c64)
    r32 = linear_assignment(c32)  # solved in float32
    r64 = linear_assignment(c32, dtype="float64")  # forced float64
    assert_valid(r32, n, n, n)
    assert r64.cost == pytest.approx(exact, rel=1e-12)
    # Float32 duals: the optimum is within float32 rounding of the exact one (sum of n values ~ 1).
    assert r32.cost == pytest.approx(exact, rel=n * 1e-6)
    assert r32.cost >= exact - 1e-9
    rt = linear_assignment(torch.from_numpy(c32), dtype=torch.float64)
    assert rt.cost == pytest.approx(exact, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# scipy's own test cases, through a small adapter (objectives, not indices)
# ----------------------------------------------------------------------------------------------------------


def _scipy_cases():
    mod = importlib.import_module("scipy.sparse.csgraph.tests.test_matching")
    # The module keeps the cases as an itertools.product over (sign, (matrix, expected costs)); rebuild it
    # from the module source rather than consume its iterator, which scipy's own tests may share.
    importlib.reload(mod)
    cases = list(mod.linear_sum_assignment_test_cases)
    assert len(cases) >= 10
    return cases


@needs_ext
@pytest.mark.parametrize("sign,case", _scipy_cases())
def test_scipy_small_inputs(sign, case):
    matrix, expected = case
    maximize = sign == -1
    c = sign * np.array(matrix, dtype=np.float64)
    for cm in (c, c.T):
        res = linear_assignment(cm, maximize=maximize)
        assert np.all(np.diff(res.row_ind) > 0)
        assert res.cost == pytest.approx(float(sign * np.sum(expected)))


@needs_ext
def test_scipy_sparse_feasibility_cases():
    """scipy's test_two_methods_give_same_result_on_many_sparse_inputs, with scipy as the oracle."""
    rng = np.random.default_rng(12342309)
    feasible = infeasible = 0
    for _ in range(40):
        dense = np.full((100, 100), np.inf)
        mask = rng.random((100, 100)) < 0.06
        dense[mask] = rng.integers(1, 100, mask.sum())
        try:
            expected = scipy_objective(dense)
        except ValueError:
            infeasible += 1
            with pytest.raises(ValueError, match="cost matrix is infeasible"):
                linear_assignment(dense)
            continue
        feasible += 1
        assert linear_assignment(dense).cost == expected
    assert feasible > 5 and infeasible > 5


@needs_ext
def test_scipy_constant_and_bool_inputs():
    c = np.ones((8, 8))
    res = linear_assignment(c)
    assert res.cost == 8.0
    eye = np.identity(3)
    assert linear_assignment(eye.astype(np.bool_)).cost == linear_assignment(eye).cost == 0.0
    assert linear_assignment([[1, 2, 3], [4, 5, 6]]).cost == scipy_objective(np.array([[1.0, 2, 3], [4, 5, 6]]))


# ----------------------------------------------------------------------------------------------------------
# partial problems
# ----------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 2), (2, 4), (4, 4), (3, 5)])
@pytest.mark.parametrize("kind", ["uniform", "integer", "negative"])
def test_num_matches_brute_force(shape, kind, rng):
    n, m = shape
    c = make_cost(kind, rng, n, m)
    for k in range(min(n, m) + 1):
        res = linear_assignment(c, num_matches=k)
        assert_valid(res, n, m, k)
        assert res.cost == pytest.approx(brute_force_partial(c, k), abs=1e-12)
        resmax = linear_assignment(c, num_matches=k, maximize=True)
        assert resmax.cost == pytest.approx(-brute_force_partial(-c, k), abs=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", [(20, 20), (13, 29), (29, 13)])
@pytest.mark.parametrize("kind", ["uniform", "integer", "correlation"])
def test_num_matches_padded_scipy(shape, kind, rng):
    n, m = shape
    if kind == "correlation":
        c = correlation_cost(rng, max(n, m))[:n, :m]
    else:
        c = make_cost(kind, rng, n, m)
    for k in range(min(n, m) + 1):
        res = linear_assignment(c, num_matches=k)
        assert_valid(res, n, m, k)
        aug = augment_partial_cost(c, num_matches=k)
        expected = scipy_objective(aug) if aug.size else 0.0
        assert res.cost == pytest.approx(expected, abs=1e-9)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (6, 6), (5, 9), (40, 30), (80, 80)])
@pytest.mark.parametrize("u", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_unmatched_cost_against_reference(shape, u, maximize, rng):
    n, m = shape
    c = rng.random(shape)
    res = linear_assignment(c, unmatched_cost=u, maximize=maximize)
    r, cc, tot = linear_assignment_ref(c, unmatched_cost=u, maximize=maximize)
    size = len(res.row_ind)
    assert_valid(res, n, m, size)
    # Compare the full objectives (matched entries plus u per unmatched row and column).
    got = res.cost + u * (n + m - 2 * size)
    want = tot + u * (n + m - 2 * len(r))
    assert got == pytest.approx(want, abs=1e-9)
    if not maximize and u > 0:  # a pair is used only if it beats leaving both ends alone
        assert np.all(c[res.row_ind, res.col_ind] <= 2 * u + 1e-12)


# ----------------------------------------------------------------------------------------------------------
# batches, threads, torch, backends
# ----------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("num_threads", [1, 2])
def test_batch_equals_loop(num_threads, rng):
    equal = rng.random((6, 40, 40))
    res = linear_assignment(equal, num_threads=num_threads)
    assert res.batched and res.cost.shape == (6,)
    for b in range(6):
        single = linear_assignment(equal[b])
        np.testing.assert_array_equal(res.row_ind[b], single.row_ind)
        np.testing.assert_array_equal(res.col_ind[b], single.col_ind)
        assert res.cost[b] == single.cost
    sizes = [(3, 5), (50, 50), (0, 4), (20, 7), (64, 64), (1, 1)]
    mixed = [rng.random(s) for s in sizes]
    ks = [min(s) // 2 for s in sizes]
    for kwargs in ({}, {"num_matches": ks}, {"unmatched_cost": 0.2}, {"maximize": True}):
        res = linear_assignment(mixed, num_threads=num_threads, **kwargs)
        for b, c in enumerate(mixed):
            single_kwargs = dict(kwargs)
            if "num_matches" in kwargs:
                single_kwargs["num_matches"] = ks[b]
            single = linear_assignment(c, **single_kwargs)
            np.testing.assert_array_equal(res.row_ind[b], single.row_ind)
            np.testing.assert_array_equal(res.col_ind[b], single.col_ind)
            np.testing.assert_array_equal(res.unmatched_cols[b], single.unmatched_cols)
            assert res.cost[b] == single.cost


@needs_ext
def test_torch_inputs_return_tensors(rng):
    c = torch.from_numpy(rng.random((5, 30, 30)))
    res = linear_assignment(c)
    assert isinstance(res.row_ind[0], torch.Tensor) and res.row_ind[0].device == c.device
    for b in range(5):
        assert res.cost[b] == pytest.approx(scipy_objective(c[b].numpy()), rel=1e-12)
    single = linear_assignment(c[0].float())
    assert isinstance(single.col_ind, torch.Tensor) and single.col_ind.dtype == torch.int64


@pytest.mark.gpu
def test_cuda_input_solved_on_host_indices_on_device(rng):
    c = torch.from_numpy(rng.random((20, 25))).cuda()
    res = linear_assignment(c)
    assert res.col_ind.device == c.device
    assert res.cost == pytest.approx(scipy_objective(c.cpu().numpy()), rel=1e-12)


@needs_ext
def test_reference_backend_agrees(monkeypatch, rng):
    c = rng.random((4, 15, 12))
    fast = linear_assignment(c, num_matches=[3, 5, 0, 12])
    monkeypatch.setenv("PYFUSION_BACKEND", "linear_assignment:reference")
    ref = linear_assignment(c, num_matches=[3, 5, 0, 12])
    np.testing.assert_allclose(fast.cost, ref.cost, rtol=1e-12)
    with pytest.raises(ValueError, match=r"cost\[1\] contains NaN at \(2, 3\)"):
        bad = c.copy()
        bad[1, 2, 3] = np.nan
        linear_assignment(bad)


@needs_ext
def test_opcheck(rng):
    costs = [torch.from_numpy(rng.random((6, 8))), torch.from_numpy(rng.random((4, 3)))]
    torch.library.opcheck(assignment.OP.op().default, (costs, False, [-1, 2], None, 1))
    costs32 = [torch.from_numpy(rng.random((5, 5)).astype(np.float32))]
    torch.library.opcheck(assignment.OP.op().default, (costs32, True, [-1], 0.3, 0))


# ----------------------------------------------------------------------------------------------------------
# errors (every message pinned); bad input changes nothing
# ----------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (5, 3)])  # square minimise checks inside the column reduction
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_entry_errors(backend, shape, dtype, monkeypatch):
    monkeypatch.setenv("PYFUSION_BACKEND", f"linear_assignment:{backend}")
    c = np.ones(shape, dtype=dtype)
    c[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^cost contains NaN at \(1, 2\); costs must be numbers"):
        linear_assignment(c)
    assert np.isnan(c[1, 2]) and np.sum(np.isnan(c)) == 1
    c[1, 2] = -np.inf
    with pytest.raises(ValueError, match=r"cost contains -inf at \(1, 2\); when minimising only \+inf"):
        linear_assignment(c)
    c[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"cost contains \+inf at \(1, 2\); when maximising only -inf"):
        linear_assignment(c, maximize=True)
    with pytest.raises(ValueError, match=r"cost\[1\] contains NaN at \(0, 0\)"):
        linear_assignment([np.ones((2, 2)), np.full((2, 2), np.nan)])


@needs_ext
def test_infeasible_errors():
    c = np.identity(3)
    c[:, 0] = np.inf
    with pytest.raises(ValueError, match=r"^cost matrix is infeasible: no complete assignment avoids the forbidden"):
        linear_assignment(c)
    with pytest.raises(ValueError, match=r"infeasible: .* forbidden \(-inf\) entries"):
        linear_assignment(-c, maximize=True)
    wide = np.full((2, 5), np.inf)
    wide[:, 3] = 1.0
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        linear_assignment(wide)
    assert linear_assignment(wide, num_matches=1).cost == 1.0
    with pytest.raises(ValueError, match=r"no assignment of num_matches=2 pairs avoids the forbidden \(\+inf\)"):
        linear_assignment(wide, num_matches=2)
    with pytest.raises(ValueError, match=r"^cost\[1\]: cost matrix is infeasible"):
        linear_assignment([np.ones((2, 2)), c])


@needs_ext
def test_argument_errors(rng):
    c = rng.random((3, 4))
    with pytest.raises(ValueError, match=r"cost must have shape \(n, m\) or \(B, n, m\); got shape \(3,\)"):
        linear_assignment(np.ones(3))
    with pytest.raises(ValueError, match=r"got a tensor of shape \(1, 2, 3, 4\)"):
        linear_assignment(torch.ones(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"cost\[1\] must have shape \(n, m\); got shape \(2, 2, 2\)"):
        linear_assignment([np.ones((2, 2)), np.ones((2, 2, 2))])
    with pytest.raises(ValueError, match=r"num_matches must be in \[0, min\(n, m\)\] = \[0, 3\] for cost of shape"):
        linear_assignment(c, num_matches=4)
    with pytest.raises(ValueError, match=r"num_matches must be in \[0, min\(n, m\)\] = \[0, 3\].*got -1"):
        linear_assignment(c, num_matches=-1)
    with pytest.raises(ValueError, match=r"num_matches\[1\] must be in \[0, min\(n, m\)\] = \[0, 1\] for cost\[1\]"):
        linear_assignment([c, np.ones((1, 5))], num_matches=[1, 2])
    with pytest.raises(ValueError, match="num_matches must have one entry per problem: expected length 2, got 3"):
        linear_assignment([c, c], num_matches=[1, 1, 1])
    with pytest.raises(ValueError, match="num_matches must be an int; got float 1.5"):
        linear_assignment(c, num_matches=1.5)
    with pytest.raises(ValueError, match="give at most one of num_matches and unmatched_cost"):
        linear_assignment(c, num_matches=1, unmatched_cost=0.5)
    with pytest.raises(ValueError, match=r"unmatched_cost must be finite and >= 0; got -0.5"):
        linear_assignment(c, unmatched_cost=-0.5)
    with pytest.raises(ValueError, match=r"unmatched_cost must be finite and >= 0; got nan"):
        linear_assignment(c, unmatched_cost=float("nan"))
    with pytest.raises(ValueError, match=r"unmatched_cost must be finite and >= 0; got inf"):
        linear_assignment(c, unmatched_cost=float("inf"))
    with pytest.raises(ValueError, match="num_threads must be a non-negative int or None; got -1"):
        linear_assignment(c, num_threads=-1)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        linear_assignment(c, dtype="float16")
    with pytest.raises(ValueError, match="cost must hold real numbers; got dtype complex128"):
        linear_assignment(c.astype(np.complex128))


def test_bench_quick_mode_runs(tmp_path):
    """The benchmark's --quick mode keeps working (no timing is asserted)."""
    pytest.importorskip("lap")
    if not _ext.EXT_AVAILABLE:
        pytest.skip(_ext.EXT_SKIP_REASON)
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "a.md"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_assignment.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| uniform" in out.read_text()


@needs_ext
@pytest.mark.parametrize("level", ["avx512", "avx2", "default"])
def test_every_simd_variant(level, rng):
    """Each kernel variant (picked by CPU features at run time) solves to scipy's optimum; variants the CPU
    lacks fall back to the best supported one."""
    _ext._C._lsap_set_simd_level(level)
    try:
        order = ["default", "avx2", "avx512"]
        active = _ext._C.lsap_simd_path().split(" ")[0]
        assert order.index(active) <= order.index(level)
        cases = [((37, 37), "uniform"), ((64, 64), "integer"), ((29, 51), "uniform"), ((80, 80), "offset")]
        for dtype in (np.float64, np.float32):
            for shape, kind in cases:
                c = make_cost(kind, rng, *shape).astype(dtype)
                res = linear_assignment(c)
                exact = scipy_objective(c.astype(np.float64))
                assert res.cost == pytest.approx(exact, rel=1e-12 if dtype == np.float64 else 1e-5)
            c = rng.random((30, 30)).astype(dtype)
            r = linear_assignment(c, unmatched_cost=0.1)
            rr, _, tot = linear_assignment_ref(c, unmatched_cost=0.1)
            assert r.cost + 0.1 * (60 - 2 * len(r.row_ind)) == pytest.approx(tot + 0.1 * (60 - 2 * len(rr)), abs=1e-5)
            bad = np.ones((9, 9), dtype=dtype)
            bad[4, 7] = np.nan
            with pytest.raises(ValueError, match=r"cost contains NaN at \(4, 7\)"):
                linear_assignment(bad)
    finally:
        _ext._C._lsap_set_simd_level("auto")
    with pytest.raises(ValueError, match="simd level must be"):
        _ext._C._lsap_set_simd_level("sse9")
