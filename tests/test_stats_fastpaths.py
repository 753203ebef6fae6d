"""The fast paths of issue 15 item 1, each against what it replaces.

* ``accumulate_moments`` / ``correlation`` backend ``torch`` (C++ shift prepass + float32 torch.mm over panels,
  float64 across panels): against the float64 reference and the C++ engine, on fresh random and structured inputs
  (large mean and small variance, rank-deficient, constant neurons, float16 / strided input).
* The builder's pure-permutation path (:mod:`pyfusion.fuse.permuted`): bit for bit the general path's tensors and
  segments, on an MLP, a VGG with BatchNorm and a ResNet.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _trained import family_pair

from pyfusion import _ext, models
from pyfusion.ops import correlation, moments
from pyfusion.ops.reference import accumulate_moments_ref, correlation_ref

needs_ext = pytest.mark.skipif(
    not (_ext.EXT_AVAILABLE and hasattr(_ext._C, "corr_shift")), reason="the C++ extension (corr_shift) is not built"
)


def _structured(kind: str, n: int, da: int, db: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = da + db
    if kind == "random":
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "offset":  # mean 1e3, std 1e-2: the shift must carry the mean
        x = 1e3 + 1e-2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "rank":  # rank 5: member b a linear image of member a's first neurons, plus constant neurons
        z = torch.randn(n, 5, generator=g, dtype=torch.float64)
        x = z @ torch.randn(5, d, generator=g, dtype=torch.float64)
        x[:, 3] = 0.0
        x[:, da + 7] = 4.25
    else:
        raise AssertionError(kind)
    return x.float()


@needs_ext
@pytest.mark.parametrize("kind", ["random", "offset", "rank"])
def test_blas_accumulate_matches_reference(kind, blas_first):
    da, db, n = 160, 136, 1100  # three panels, the last one partial
    x = _structured(kind, n, da, db, seed=1)
    rects = [0, 0, 0, 0, da, da + db, 0, da]
    shift = moments.moment_shift(x)
    assert moments.ACCUMULATE.select(x, shift, torch.zeros(1), torch.zeros(1), rects).name == "torch"
    d = da + db
    got = [torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)]
    want = [torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)]
    assert moments.accumulate_moments(x, shift, *got, rects) == "torch"
    accumulate_moments_ref(x, shift, *want)
    v = (x.double() - shift).abs()
    scale = float((v * v).sum(0).max())
    # the engines round x - c to float32 (exact for |x - c| << |c|): s1 and the squares carry that rounding only
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1.2e-7 * float(v.sum(0).max()))
    torch.testing.assert_close(got[1].diagonal(), want[1].diagonal(), rtol=2.5e-7, atol=1e-12 * scale)
    torch.testing.assert_close(got[1][da:, :da], want[1][da:, :da], rtol=0, atol=2e-6 * scale)


@needs_ext
@pytest.mark.parametrize("kind", ["random", "offset", "rank"])
def test_blas_correlation_matches_reference(kind, blas_first):
    x = _structured(kind, 1300, 200, 144, seed=2)
    a, b = x[:, :200], x[:, 200:]
    assert moments.CORRELATION.select(a, b).name == "torch"
    got = correlation(a, b)
    want = correlation_ref(a, b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if kind == "rank":  # the constant neurons give 0, never NaN
        assert bool((got[3] == 0).all()) and bool((got[:, 7] == 0).all())
    # the engine on the same data agrees (both float32 products over short runs, float64 across them)
    monkey = moments.CORRELATION._by_name["cpp"].fn(a, b)
    torch.testing.assert_close(got, monkey, rtol=0, atol=1e-6)


@needs_ext
def test_blas_takes_float16_and_strided_input(blas_first):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(700, 2 * 300, generator=g)
    a = base[:, ::2]  # column stride 2
    b = base[:, 1::2].half()
    assert moments.CORRELATION.select(a, b).name == "torch"
    torch.testing.assert_close(correlation(a, b), correlation_ref(a, b.float()), rtol=0, atol=2e-6)


@needs_ext
def test_blas_declines_with_reasons():
    x = torch.randn(600, 300)
    shift = moments.moment_shift(x)
    s1, s2 = torch.zeros(300, dtype=torch.float64), torch.zeros(300, 300, dtype=torch.float64)
    blas = moments.ACCUMULATE._by_name["torch"]
    assert any("SYRK" in w for w in blas.reasons(x, shift, s1, s2, None))
    assert any("SYRK" in w for w in blas.reasons(x, shift, s1, s2, [0, 150, 0, 150]))
    assert any("narrower" in w for w in blas.reasons(x, shift, s1, s2, [200, 300, 0, 200]))
    assert any("rows" in w for w in blas.reasons(x[:100], shift, s1, s2, [150, 300, 0, 150]))  # < BLAS_MIN_ROWS
    assert blas.reasons(x, shift, s1, s2, [150, 300, 0, 150]) == []
    assert moments.ACCUMULATE.select(x, shift, s1, s2, None).name == "cpp"
    assert any("SYRK" in w for w in moments.CORRELATION._by_name["torch"].reasons(x, x))


@needs_ext
def test_activation_stats_blas_path_matches_engine(monkeypatch):
    """The statistics of activation matching (cross block + variances) through the BLAS path and through the
    engine agree with a float64 reference, over batches of 512 with a mean that drifts (re-centring)."""
    from pyfusion.stats import ActivationStats

    g = torch.Generator().manual_seed(4)
    z = torch.randn(3072, 6, generator=g, dtype=torch.float64)
    x = z @ torch.randn(6, 320, generator=g, dtype=torch.float64) + 0.1 * torch.randn(3072, 320, generator=g)
    x = x + torch.linspace(0, 50, 3072, dtype=torch.float64)[:, None]  # drifting mean
    x = x.float()
    out = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("PYFUSION_BACKEND", f"accumulate_moments:{backend}")
        st = ActivationStats([160, 160], pairs=[(0, 1)])
        for blk in x.split(512):
            st.update([blk[:, :160], blk[:, 160:]])
        assert st.last_backend == backend
        out[backend] = st
    xd = x.double()
    want = correlation_ref(xd[:, :160], xd[:, 160:])
    for st in out.values():
        torch.testing.assert_close(st.corr(0, 1), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(st.var(), xd.var(0, unbiased=False), rtol=1e-6, atol=0)


# ---- the builder's permutation path -------------------------------------------------------------------------
def _permuted_plan(graph, seed):
    from pyfusion.fuse import Plan

    g = torch.Generator().manual_seed(seed)
    perms = {name: [torch.arange(gr.size), torch.randperm(gr.size, generator=g)] for name, gr in graph.groups.items()}
    return Plan.from_permutations(graph, perms, (0.3, 0.7))


@pytest.mark.parametrize("family", ["mlp", "vgg_bn", "resnet"])
def test_permutation_path_is_the_general_path_bit_for_bit(family, monkeypatch):
    from pyfusion.fuse.builder import _group_maps, fused_tensors, member_segments
    from pyfusion.fuse.permuted import permutation_maps, permutation_segments, permutation_tensors
    from pyfusion.graph.trace import trace_groups

    members, example = family_pair(family)
    graph = trace_groups(members[0], example)
    plan = _permuted_plan(graph, 1)
    maps = permutation_maps(graph, plan)
    if not graph.is_simple:
        assert maps is None
        return
    assert maps is not None
    states = [dict(list(m.named_parameters()) + list(m.named_buffers())) for m in members]
    fast = permutation_tensors(states, graph, plan, maps)
    assert fast is not None
    slow = fused_tensors(states, graph, plan)
    assert fast.keys() == slow.keys()
    for key in slow:
        assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), key
    assert permutation_segments(members[0], graph, plan, maps) == member_segments(
        members[0], graph, plan, _group_maps(graph, plan)
    )
    # and the built model is the same function as the one the general path builds (the fast path made to decline)
    import pyfusion.fuse.builder as builder
    import pyfusion.fuse.permuted as permuted

    fused = builder.build(members, graph, plan)
    monkeypatch.setattr(permuted, "permutation_maps", lambda *a, **k: None)
    general = builder.build(members, graph, plan)
    torch.testing.assert_close(fused(example), general(example), rtol=0, atol=0)
    assert fused.fusion_module_layouts == general.fusion_module_layouts


def test_permutation_path_declines_non_permutation_plans():
    from pyfusion.fuse import Plan
    from pyfusion.fuse.permuted import permutation_maps
    from pyfusion.graph.trace import trace_groups

    m = models.mlp([6, 8, 3])
    graph = trace_groups(m, torch.randn(2, 6))
    plan = _permuted_plan(graph, 2)
    soft = copy.deepcopy(plan)
    name = next(iter(soft.groups))
    soft.groups[name].A[1] = soft.groups[name].A[1] * 0.5 + 0.01  # a soft map: not a permutation
    assert permutation_maps(graph, plan) is not None
    assert permutation_maps(graph, soft) is None
    assert isinstance(plan, Plan)


def test_member_perm_reads_exact_permutations_only():
    from pyfusion.fuse.permuted import _member_perm

    perm = torch.tensor([2, 0, 3, 1])
    b = torch.zeros(4, 4, dtype=torch.float64)
    b[perm, torch.arange(4)] = 1.0  # slot s holds neuron perm[s]
    a = 0.25 * b.T
    got = _member_perm(a, b)
    assert got is not None and torch.equal(got[0], perm) and torch.equal(got[1], torch.full((4,), 0.25, dtype=a.dtype))
    two = b.clone()
    two[0, 0] = 1.0  # neuron 0 in two slots
    assert _member_perm(a, two) is None
    half = b.clone()
    half[perm[1], 1] = 0.5
    assert _member_perm(a, half) is None
    extra = a.clone()
    extra[0, 0] = 1e-3  # A reads a neuron B does not put there
    assert _member_perm(extra, b) is None


@pytest.mark.skipif(
    not (_ext.EXT_AVAILABLE and hasattr(_ext._C, "corr_accumulate_blocks")),
    reason="the C++ extension predates corr_accumulate_blocks (rebuild it: tools/dev_build.sh)",
)
@pytest.mark.parametrize("kind", ["random", "offset", "rank"])
def test_engine_correlation_reads_x_and_y_in_place(kind, monkeypatch):
    """The engine's correlation of two float32 inputs reads them in place (``corr_accumulate_blocks``): bit for bit
    the result on their concatenation, and the float64 reference to float32 rounding (strided x included)."""
    x = _structured(kind, 900, 150, 130, seed=7)
    a, b = x[:, :150], x[:, 150:]
    a_strided = torch.cat([a, a], 1)[:, ::2]
    plain = moments._acc_cpp
    for xa in (a, a_strided):
        got = moments._corr_cpp(xa, b)
        torch.testing.assert_close(got, correlation_ref(xa, b), rtol=0, atol=1e-6)
        with monkeypatch.context() as m:
            m.setattr(moments, "_acc_cpp", lambda *args: plain(*args))  # not the in-place path: concatenates
            assert torch.equal(moments._corr_via_engine(xa, b, moments._acc_cpp), got)
