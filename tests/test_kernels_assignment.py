"""The batched GPU assignment algorithm (csrc/assignment/lsap_batch.h): its host/device core run on the CPU with an
emulated team of W lanes (``pyfusion._C.lsap_solve_team_f64/_f32``, same lane decomposition and reductions as a CUDA
warp / block), and the CUDA path itself (``lsap_solve_cuda``, ``gpu`` tests), compared with scipy by objective value:
exactly equal on integer-valued costs, to 1e-12 relative on real-valued ones; partial forms against scipy on the
sink-padded square matrices; errors with the CPU engine's messages; the no-driver error of the CUDA binding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pyfusion import _ext

pytestmark = pytest.mark.skipif(
    not (_ext.EXT_AVAILABLE and hasattr(_ext._C, "lsap_solve_team_f64")), reason=_ext.EXT_SKIP_REASON or "no team core"
)
LANES = [1, 7, 32, 256]
HAS_CUDA_PATH = _ext.EXT_AVAILABLE and hasattr(_ext._C, "lsap_solve_cuda")


def team_solve(costs, lanes, maximize=False, num_matches=None, unmatched_cost=None, dtype=np.float64):
    arrs = [np.ascontiguousarray(c, dtype=dtype) for c in costs]
    ks = [-1 if num_matches is None else int(k) for k in (num_matches or [None] * len(arrs))]
    fn = _ext._C.lsap_solve_team_f64 if dtype == np.float64 else _ext._C.lsap_solve_team_f32
    return fn(arrs, ks, bool(maximize), unmatched_cost, int(lanes))


def check_assignment(c, cmap, total, complete=True):
    n, m = c.shape
    rows = np.flatnonzero(cmap[:n] >= 0)
    cols = cmap[:n][rows]
    assert len(set(cols.tolist())) == len(cols) and ((cols >= 0) & (cols < m)).all()
    if complete:
        assert len(rows) == min(n, m)
    np.testing.assert_allclose(c[rows, cols].sum(), total, rtol=1e-12, atol=1e-12)


def padded_num_matches(c, k):
    n, m = c.shape
    s = n + m - k
    big = np.zeros((s, s))
    big[:n, :m] = c
    big[n:, m:] = np.inf
    return big


def padded_unmatched(c, u):
    n, m = c.shape
    big = np.full((n + m, n + m), np.inf)
    big[:n, :m] = c
    big[np.arange(n), m + np.arange(n)] = u
    big[n + np.arange(m), np.arange(m)] = u
    big[n:, m:] = 0
    return big


SHAPES = [(1, 1), (1, 6), (6, 1), (5, 5), (17, 17), (20, 33), (33, 20), (64, 64), (40, 300)]


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_problems_match_scipy(lanes, shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    ints = rng.integers(0, 25, shape).astype(np.float64)  # many ties: exercises the tie-breaking order
    real = rng.random(shape) * 10 - 3
    for c, exact in ((ints, True), (real, False)):
        for maximize in (False, True):
            cols, totals = team_solve([c], lanes, maximize=maximize)
            r, cc = linear_sum_assignment(c, maximize=maximize)
            ref = c[r, cc].sum()
            if exact:
                assert totals[0] == ref
            else:
                assert abs(totals[0] - ref) <= 1e-12 * max(1.0, abs(ref))
            check_assignment(c, cols[0], totals[0])


def test_result_does_not_depend_on_the_team_size():
    """Ties are broken by a total order (distance, free column, index): every team size picks the same matching."""
    rng = np.random.default_rng(1)
    c = rng.integers(0, 4, (50, 50)).astype(np.float64)
    ref = team_solve([c], 1)[0]
    for lanes in LANES[1:]:
        assert np.array_equal(team_solve([c], lanes)[0], ref)


@pytest.mark.parametrize("lanes", [1, 32])
def test_batch_of_mixed_shapes_and_float32(lanes):
    rng = np.random.default_rng(2)
    costs = [rng.integers(-50, 50, s).astype(np.float64) for s in [(8, 8), (3, 9), (12, 5), (30, 30), (0, 4), (4, 0)]]
    cols, totals = team_solve(costs, lanes)
    assert cols.shape == (len(costs), 30)
    for b, c in enumerate(costs):
        if c.size == 0:
            assert totals[b] == 0 and (cols[b] == -1).all()
            continue
        r, cc = linear_sum_assignment(c)
        assert totals[b] == c[r, cc].sum()
        check_assignment(c, cols[b], totals[b])
        assert (cols[b, c.shape[0] :] == -1).all()
    c32 = [c.astype(np.float32) for c in costs[:4]]
    cols32, totals32 = team_solve(c32, lanes, dtype=np.float32)
    np.testing.assert_array_equal(totals32, totals[:4])  # small integers: exact in float32 too


@pytest.mark.parametrize("lanes", [1, 7, 32])
def test_forbidden_pairs_and_infeasible_problems(lanes):
    c = np.array([[1.0, np.inf, 3.0], [np.inf, 2.0, np.inf], [4.0, np.inf, 1.0]])
    cols, totals = team_solve([c], lanes)
    assert totals[0] == 4.0
    bad = np.array([[1.0, np.inf], [2.0, np.inf]])
    with pytest.raises(ValueError, match="infeasible: no complete assignment avoids the forbidden"):
        team_solve([bad], lanes)
    rect = np.array([[np.inf, np.inf, 1.0], [np.inf, np.inf, 2.0]])  # both rows need column 2
    with pytest.raises(ValueError, match="infeasible"):
        team_solve([rect], lanes)
    with pytest.raises(ValueError, match=r"cost\[1\]: cost matrix is infeasible"):
        team_solve([c, bad], lanes)


def test_bad_entries_name_value_and_position():
    c = np.zeros((3, 4))
    c[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"cost contains NaN at \(2, 1\)"):
        team_solve([c], 32)
    c = np.zeros((3, 4))
    c[1, 3] = -np.inf
    with pytest.raises(ValueError, match=r"cost contains -inf at \(1, 3\); when minimising"):
        team_solve([c], 32)
    c[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"cost contains \+inf at \(1, 3\); when maximising"):
        team_solve([c], 32, maximize=True)


@pytest.mark.parametrize("lanes", [1, 32, 256])
@pytest.mark.parametrize("shape,k", [((10, 10), 6), ((8, 13), 5), ((13, 8), 8), ((6, 6), 0)])
def test_num_matches_matches_scipy_on_the_padded_matrix(lanes, shape, k):
    rng = np.random.default_rng(k + shape[1])
    c = rng.integers(0, 30, shape).astype(np.float64)
    cols, totals = team_solve([c], lanes, num_matches=[k])
    big = padded_num_matches(c, k)
    r, cc = linear_sum_assignment(big)
    assert totals[0] == big[r, cc].sum()
    assert (cols[0] >= 0).sum() == k
    check_assignment(c, cols[0], totals[0], complete=False)


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("maximize", [False, True])
def test_unmatched_cost_matches_scipy_on_the_padded_matrix(lanes, maximize):
    rng = np.random.default_rng(3)
    c = rng.integers(0, 20, (9, 12)).astype(np.float64)
    u = 6.0
    cols, totals = team_solve([c], lanes, maximize=maximize, unmatched_cost=u)
    sign = -1.0 if maximize else 1.0
    big = padded_unmatched(sign * c, sign * u)
    r, cc = linear_sum_assignment(big)
    matched = (cols[0][:9] >= 0).sum()
    objective = sign * totals[0] + sign * u * (9 + 12 - 2 * matched)
    assert objective == big[r, cc].sum()
    check_assignment(c, cols[0], totals[0], complete=False)


def test_agrees_with_the_cpu_engine_on_partial_forms():
    rng = np.random.default_rng(4)
    costs = [rng.random((20, 25)), rng.random((25, 20))]
    for kw in ({"num_matches": [11, 7]}, {"unmatched_cost": 0.2}):
        ks = kw.get("num_matches", [-1, -1])
        u = kw.get("unmatched_cost")
        cpu = _ext._C.lsap_solve_f64(costs, ks, False, u, 1)
        team = team_solve(costs, 32, num_matches=kw.get("num_matches"), unmatched_cost=u)
        np.testing.assert_allclose(team[1], cpu[1], rtol=1e-12)


def test_argument_errors():
    with pytest.raises(ValueError, match="team_lanes"):
        team_solve([np.zeros((2, 2))], 0)
    with pytest.raises(ValueError, match="num_matches"):
        team_solve([np.zeros((2, 3))], 4, num_matches=[3])
    with pytest.raises(ValueError, match="one entry per problem"):
        _ext._C.lsap_solve_team_f64([np.zeros((2, 2))], [], False, None, 4)


# ------------------------------------------------------------------------------------------------- CUDA path


@pytest.mark.skipif(not HAS_CUDA_PATH, reason="the extension was built without CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a driver / GPU")
def test_cuda_binding_reports_a_missing_driver():
    out = np.zeros(1, dtype=np.int64)
    with pytest.raises(RuntimeError, match="no usable CUDA device or driver"):
        _ext._C.lsap_solve_cuda([1], [2], [2], [-1], 1, False, None, out.ctypes.data, 2, out.ctypes.data, 0)


def cuda_solve(costs, maximize=False, num_matches=None, unmatched_cost=None):
    dtype = costs[0].dtype
    ts = [c.contiguous() for c in costs]
    max_n = max(t.shape[0] for t in ts)
    out = torch.full((len(ts), max_n), -1, dtype=torch.int64, device="cuda")
    totals = torch.empty(len(ts), dtype=torch.float64, device="cuda")
    ks = [-1] * len(ts) if num_matches is None else list(num_matches)
    _ext._C.lsap_solve_cuda(
        [t.data_ptr() for t in ts], [t.shape[0] for t in ts], [t.shape[1] for t in ts], ks,
        0 if dtype == torch.float32 else 1, maximize, unmatched_cost, out.data_ptr(), max_n, totals.data_ptr(),
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    return out.cpu().numpy(), totals.cpu().numpy()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_PATH, reason="the extension was built without CUDA")
def test_cuda_matches_scipy_warp_and_block_teams():
    rng = np.random.default_rng(5)
    shapes = [(64, 64), (100, 130), (130, 100), (1100, 1100), (900, 1500)]  # <= 1024 cols: warps; above: blocks
    ints = [rng.integers(0, 1000, s).astype(np.float64) for s in shapes]
    reals = [rng.random(s) for s in shapes]
    for costs, exact in ((ints, True), (reals, False)):
        cols, totals = cuda_solve([torch.from_numpy(c).cuda() for c in costs])
        for b, c in enumerate(costs):
            r, cc = linear_sum_assignment(c)
            ref = c[r, cc].sum()
            assert totals[b] == ref if exact else abs(totals[b] - ref) <= 1e-12 * abs(ref)
            check_assignment(c, cols[b], totals[b])
    # The GPU and the emulated team run the same core: identical matchings.
    emu_cols, _ = team_solve(ints[:3], 32)
    gpu_cols, _ = cuda_solve([torch.from_numpy(c).cuda() for c in ints[:3]])
    assert np.array_equal(gpu_cols[:, : emu_cols.shape[1]], emu_cols)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_PATH, reason="the extension was built without CUDA")
def test_cuda_partial_forms_float32_and_errors():
    rng = np.random.default_rng(6)
    c = rng.integers(0, 50, (40, 60)).astype(np.float64)
    cols, totals = cuda_solve([torch.from_numpy(c).cuda()], num_matches=[25])
    big = padded_num_matches(c, 25)
    r, cc = linear_sum_assignment(big)
    assert totals[0] == big[r, cc].sum()
    c32 = torch.from_numpy(c.astype(np.float32)).cuda()
    _, t32 = cuda_solve([c32], unmatched_cost=10.0)
    _, ref = team_solve([c.astype(np.float32)], 32, unmatched_cost=10.0, dtype=np.float32)
    assert t32[0] == ref[0]
    bad = torch.zeros(3, 3, dtype=torch.float64, device="cuda")
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"cost contains NaN at \(1, 2\)"):
        cuda_solve([bad])


@pytest.mark.parametrize("lanes", [1, 32])
def test_structured_costs_exercise_the_row_reduction(lanes):
    """Constant matrices, constant rows, rank-one costs, near-permutation correlation costs and a larger uniform
    problem: the column reduction leaves many free rows and ties, which the transfer and row reduction resolve."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((64, 120))
    perm = rng.permutation(120)
    corr = -np.corrcoef(a.T, (a[:, perm] + 0.3 * rng.standard_normal((64, 120))).T)[:120, 120:]
    cases = [
        np.zeros((40, 40)),
        np.repeat(rng.integers(0, 5, (40, 1)), 40, axis=1).astype(np.float64),
        np.outer(rng.integers(1, 6, 35), rng.integers(1, 6, 35)).astype(np.float64),
        corr,
        rng.random((300, 300)),
    ]
    for c in cases:
        cols, totals = team_solve([c], lanes)
        r, cc = linear_sum_assignment(c)
        ref = c[r, cc].sum()
        assert abs(totals[0] - ref) <= 1e-12 * max(1.0, abs(ref))
        check_assignment(c, cols[0], totals[0])
