"""The C++ block scatter (pyfusion._C.scatter_blocks_f64, csrc/scatter) behind builder._scatter_dense_direct and
builder._scatter_packed: bit-equal to the torch scatter it replaces, and both equal to a float64 reference written
entry by entry, on random and structured plans (identity, shuffled slots, members that overlap or not, per-axis
factors, -0.0, lambda on or off, a Linear without taps, partial-fusion segment layouts); a bad map raises a
ValueError; without the extension the torch path runs."""

from __future__ import annotations

import pytest
import torch

from pyfusion import _ext
from pyfusion.fuse import builder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
needs_ext = pytest.mark.skipif(
    _ext._C is None or not hasattr(_ext._C, "scatter_blocks_f64"), reason=_ext.EXT_SKIP_REASON or "old extension"
)


def _torch_path(states, key, plans, shape, lambdas, has_out, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(builder, "_scatter_dense_kernel", lambda *a, **k: None)
        return builder._scatter_dense_direct(states, key, plans, shape, lambdas, has_out)


def _reference(states, key, plans, shape, lambdas, has_out):
    """Entry by entry, float64: 0, then member 0 put, later members added; value ((t * v_a) * v_b) * lambda."""
    out = torch.zeros(shape, dtype=torch.float64)
    for k, st in enumerate(states):
        t = st[key].double()
        dest = {0: torch.arange(t.shape[0]), 1: torch.arange(t.shape[1])}
        factors = []
        for axis, d, v, _e in plans[k]:
            dest[axis] = d
            if v is not None:
                factors.append((axis, v.double()))
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                x = t[i, j].clone()
                for axis, v in factors:
                    x = x * v[i if axis == 0 else j]
                if not has_out:
                    x = x * lambdas[k]
                r, c = int(dest[0][i]), int(dest[1][j])
                out[r, c] = x if k == 0 else out[r, c] + x
    return out


def _plan(gen, n_old, n_new, with_values, shuffle=True):
    dest = torch.randperm(n_new, generator=gen)[:n_old] if shuffle else torch.arange(n_old)
    v = torch.rand(n_old, generator=gen, dtype=torch.float64) + 0.5 if with_values else None
    return dest, v


CASES = [
    # (taps, n0, n1, N0, N1, values on axis 0 / 1, has_out, K, shuffle)
    ((3, 3), 7, 5, 11, 9, (True, True), False, 2, True),
    ((3, 3), 7, 5, 7, 5, (False, False), True, 2, False),  # identity maps: every member reaches every entry
    ((), 9, 6, 15, 10, (True, False), False, 3, True),  # a Linear
    ((2,), 4, 8, 4, 20, (False, True), True, 3, True),
    ((), 6, 6, 18, 18, (True, True), False, 3, True),  # disjoint-ish: many entries reached by one member only
]


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_torch_path_and_float64_reference(monkeypatch, case, seed):
    taps, n0, n1, N0, N1, (va, vb), has_out, K, shuffle = case
    gen = torch.Generator().manual_seed(seed)
    states, plans = [], []
    for _k in range(K):
        t = torch.randn(n0, n1, *taps, generator=gen, dtype=torch.float64)
        t[0, 0] = -0.0  # signed zeros must come out as the torch path gives them
        states.append({"w": t})
        d0, v0 = _plan(gen, n0, N0, va, shuffle)
        d1, v1 = _plan(gen, n1, N1, vb, shuffle)
        order = [(1, d1, v1, 1), (0, d0, v0, 1)] if seed else [(0, d0, v0, 1), (1, d1, v1, 1)]
        plans.append(order)
    lambdas = [float(x) for x in torch.rand(K, generator=gen, dtype=torch.float64)]
    shape = [N0, N1, *taps]
    got = builder._scatter_dense_kernel(states, "w", plans, shape, lambdas, has_out)
    assert got is not None
    want = _torch_path(states, "w", plans, shape, lambdas, has_out, monkeypatch)
    ref = _reference(states, "w", plans, shape, lambdas, has_out)
    assert got.shape == want.shape == ref.shape
    # bit-equal, signs of zeros included
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    assert torch.equal(got.view(torch.int64), ref.view(torch.int64))


@needs_ext
def test_float32_member_and_a_plan_on_axis_0_only(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(5, 4, 3, generator=gen)} for _ in range(2)]  # float32: cast exactly
    plans = [[(0, torch.tensor([0, 2, 4, 6, 8]), None, 1)], [(0, torch.tensor([1, 2, 3, 5, 7]), None, 1)]]
    shape = [9, 4, 3]
    got = builder._scatter_dense_kernel(states, "w", plans, shape, [0.3, 0.7], False)
    want = _torch_path(states, "w", plans, shape, [0.3, 0.7], False, monkeypatch)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    assert torch.equal(got, _reference(states, "w", plans, shape, [0.3, 0.7], False))


@needs_ext
def test_bad_maps_raise():
    states = [{"w": torch.randn(3, 2, dtype=torch.float64)}]
    out_of_range = [[(0, torch.tensor([0, 1, 5]), None, 1)]]
    with pytest.raises(ValueError, match="outside"):
        builder._scatter_dense_kernel(states, "w", out_of_range, [4, 2], [1.0], True)
    not_injective = [[(1, torch.tensor([1, 1]), None, 1)]]
    with pytest.raises(ValueError, match="injective"):
        builder._scatter_dense_kernel(states, "w", not_injective, [3, 2], [1.0], True)


def test_without_the_extension_the_torch_path_runs(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    states = [{"w": torch.randn(4, 3, generator=gen, dtype=torch.float64)} for _ in range(2)]
    plans = [[(0, torch.tensor([0, 1, 2, 3]), None, 1)], [(0, torch.tensor([0, 4, 5, 6]), None, 1)]]
    monkeypatch.setattr(_ext, "_C", None)
    assert builder._scatter_dense_kernel(states, "w", plans, [7, 3], [0.5, 0.5], False) is None
    got = builder._scatter_dense_direct(states, "w", plans, [7, 3], [0.5, 0.5], False)
    assert torch.equal(got, _reference(states, "w", plans, [7, 3], [0.5, 0.5], False))


def _packed_torch(states, plans, shape, lambdas, has_out, ins, outs, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(builder, "_scatter_packed_kernel", lambda *a, **k: None)
        return builder._scatter_packed(states, "w", plans, shape, lambdas, has_out, ins, outs)


@needs_ext
@pytest.mark.parametrize("taps", [(), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_kernel_equals_torch_packing_and_the_dense_reference(monkeypatch, taps, seed):
    """Partial-fusion layouts [shared | branch 0 | branch 1] on both axes (K = 2) and [shared | b0 | b1 | b2]
    (K = 3): the packed weight equals the torch packing bit for bit (signs of zeros included) and holds the dense
    float64 reference's entries at the stored blocks."""
    from pyfusion.ops.layout import segment_plan

    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed % 2
    n_in, n_out = 6, 5
    sh_in, sh_out = 3, 2 + seed % 2  # shared slots
    states, plans = [], []
    N1 = sh_in + k * (n_in - sh_in)
    N0 = sh_out + k * (n_out - sh_out)
    for m in range(k):
        t = torch.randn(n_out, n_in, *taps, generator=gen, dtype=torch.float64)
        t[1, 2] = -0.0
        states.append({"w": t})

        def slots(n, shared, total, m=m):
            own = torch.arange(shared + m * (n - shared), shared + (m + 1) * (n - shared))
            dest = torch.cat([torch.randperm(shared, generator=gen), own])
            return dest[torch.randperm(n, generator=gen)]

        v = torch.rand(n_out, generator=gen, dtype=torch.float64) + 0.5
        plans.append([(0, slots(n_out, sh_out, N0), v, 1), (1, slots(n_in, sh_in, N1), None, 1)])
    every = (1 << k) - 1
    ins = ((sh_in, every), *(((n_in - sh_in), 1 << m) for m in range(k)))
    outs = ((sh_out, every), *(((n_out - sh_out), 1 << m) for m in range(k)))
    shape = [N0, N1, *taps]
    lambdas = [float(x) for x in torch.rand(k, generator=gen, dtype=torch.float64)]
    has_out = bool(seed % 2)
    plan = segment_plan(ins, outs)
    got = builder._scatter_packed_kernel(states, "w", plans, shape, lambdas, has_out, plan, outs)
    assert got is not None
    want = _packed_torch(states, plans, shape, lambdas, has_out, ins, outs, monkeypatch)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    # the stored blocks hold the dense reference's entries
    ref = _reference(states, "w", plans, shape, lambdas, has_out)
    t = int(torch.Size(taps).numel())
    for o, ranges in enumerate(plan.ranges):
        n_o, r0 = outs[o][0], plan.out_starts[o]
        seg = got[plan.offsets[o] * t : plan.offsets[o + 1] * t].view(n_o, plan.k_of_out[o], *taps)
        for col, n, q in ranges:
            assert torch.equal(seg[:, q : q + n], ref[r0 : r0 + n_o, col : col + n])


# ---------------------------------------------------------------------------------------------------------------
# Shapes past the engine's prefetch distance (64 columns), outputs past 2 MB (the huge-page advice)
# ---------------------------------------------------------------------------------------------------------------


def _reference_vectorized(states, key, plans, shape, lambdas, has_out):
    """_reference's values (the same products in the same order, then 0 + member 0, later members added) with
    whole-tensor float64 ops, for shapes too big to loop over."""
    out = torch.zeros(shape, dtype=torch.float64)
    for k, st in enumerate(states):
        x = st[key].double().clone()
        dest = {0: torch.arange(x.shape[0]), 1: torch.arange(x.shape[1])}
        for axis, d, v, _e in plans[k]:
            dest[axis] = d
            if v is not None:
                at = [1] * x.dim()
                at[axis] = -1
                x = x * v.double().view(at)
        if not has_out:
            x = x * lambdas[k]
        r, c = dest[0][:, None], dest[1][None, :]
        out[r, c] = x if k == 0 else out[r, c] + x
    return out


BIG_CASES = [
    # (taps, n0, n1, N0, N1, values on axis 0 / 1, has_out, non-contiguous members)
    ((3, 3), 150, 131, 190, 171, (False, False), True, False),  # the plain copy / add loop, 9 taps, 2.3 MB
    ((3, 3), 97, 203, 121, 257, (True, True), False, True),  # scaled entries, transposed members (copied)
    ((), 300, 517, 379, 701, (True, False), False, False),  # a Linear (1 tap: no prefetch), 2.1 MB
    ((5,), 70, 90, 95, 129, (False, True), True, True),  # a tap count without its own loop (runtime taps)
]


@needs_ext
@pytest.mark.parametrize("case", BIG_CASES)
def test_kernel_past_the_prefetch_distance_and_the_huge_page_size(monkeypatch, case):
    taps, n0, n1, N0, N1, (va, vb), has_out, strided = case
    gen = torch.Generator().manual_seed(11)
    states, plans = [], []
    for _k in range(2):
        t = torch.randn(n0, n1, *taps, generator=gen, dtype=torch.float64)
        t[3, 5] = -0.0
        if strided:  # the same values in a non-contiguous tensor (axes 0 and 1 swapped in memory)
            t = t.transpose(0, 1).contiguous().transpose(0, 1)
            assert not t.is_contiguous()
        states.append({"w": t})
        d0, v0 = _plan(gen, n0, N0, va)
        d1, v1 = _plan(gen, n1, N1, vb)
        plans.append([(0, d0, v0, 1), (1, d1, v1, 1)])
    shape = [N0, N1, *taps]
    got = builder._scatter_dense_kernel(states, "w", plans, shape, [0.25, 0.75], has_out)
    want = _torch_path(states, "w", plans, shape, [0.25, 0.75], has_out, monkeypatch)
    ref = _reference_vectorized(states, "w", plans, shape, [0.25, 0.75], has_out)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    assert torch.equal(got.view(torch.int64), ref.view(torch.int64))


@needs_ext
def test_packed_kernel_on_wide_segments(monkeypatch):
    """A [shared | b0 | b1] layout with segments wider than the prefetch distance, 3x3 taps, the packed weight
    past 2 MB: bit-equal to the torch packing."""
    from pyfusion.ops.layout import segment_plan

    gen = torch.Generator().manual_seed(4)
    n, sh = 151, 113
    N = sh + 2 * (n - sh)
    states, plans = [], []
    for m in range(2):
        states.append({"w": torch.randn(n, n, 3, 3, generator=gen, dtype=torch.float64)})

        def slots(m=m):
            own = torch.arange(sh + m * (n - sh), sh + (m + 1) * (n - sh))
            dest = torch.cat([torch.randperm(sh, generator=gen), own])
            return dest[torch.randperm(n, generator=gen)]

        plans.append([(0, slots(), None, 1), (1, slots(), None, 1)])
    segs = ((sh, 3), (n - sh, 1), (n - sh, 2))
    plan = segment_plan(segs, segs)
    got = builder._scatter_packed_kernel(states, "w", plans, [N, N, 3, 3], [0.5, 0.5], True, plan, segs)
    want = _packed_torch(states, plans, [N, N, 3, 3], [0.5, 0.5], True, segs, segs, monkeypatch)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
