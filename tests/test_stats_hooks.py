"""Issue 15 item 1 fast paths of activation matching: hooks on plain chains instead of the traced graph
(graph.capture.plain_chain), the permutation hint of Plan.from_permutations, lazily computed dead-neuron features,
and the per-panel shift of ops.correlation's BLAS path: float64 references on random and structured inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyfusion
import pyfusion.stats.groups as stats_groups
from pyfusion import _ext
from pyfusion.fuse.permuted import permutation_maps
from pyfusion.fuse.plan import Plan
from pyfusion.graph import trace_groups
from pyfusion.graph.capture import plain_chain
from pyfusion.match import activations
from pyfusion.models import mlp
from pyfusion.ops import correlation, moments
from pyfusion.ops.reference import correlation_ref

needs_ext = pytest.mark.skipif(not _ext.EXT_AVAILABLE, reason="the C++ extension is not built")
needs_blocks = pytest.mark.skipif(
    not (_ext.EXT_AVAILABLE and hasattr(_ext._C, "corr_accumulate_blocks")),
    reason="the C++ extension predates corr_accumulate_blocks (rebuild it: tools/dev_build.sh)",
)


def _pair(seed: int = 0, dead: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    out = []
    for _ in range(2):
        m = mlp([6, 20, 16, 3]).double().eval()
        if dead:
            with torch.no_grad():  # dead ReLUs: constant (zero) columns in the statistics
                m[1].bias[:dead] = -1e3
        out.append(m)
    return out


def test_plain_chain_accepts_pure_sequentials_only():
    assert plain_chain(mlp([4, 8, 2]))
    assert plain_chain(nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.GELU(), nn.Linear(4, 2))))
    assert not plain_chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)))
    relu = nn.ReLU()
    assert not plain_chain(nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu))  # one module used twice

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert not plain_chain(nn.Sequential(MyLinear(3, 4), nn.ReLU()))
    hooked = mlp([4, 8, 2])
    h = hooked[2].register_forward_hook(lambda m, a, o: o * 0)
    assert not plain_chain(hooked)
    h.remove()
    assert plain_chain(hooked)
    assert not plain_chain(nn.ModuleList([nn.Linear(2, 2)]))


def _reference_corr(models, data, idx):
    """float64 correlation of the hooked ReLU outputs (two-pass), per group."""
    acts = [[], []]
    with torch.no_grad():
        for x in data:
            for k, m in enumerate(models):
                h, outs = x, []
                for layer in m:
                    h = layer(h)
                    if isinstance(layer, nn.ReLU):
                        outs.append(h)
                acts[k].append(outs[idx])
    return correlation_ref(torch.cat(acts[0]), torch.cat(acts[1]))


@pytest.mark.parametrize("sizes", [[1], [7, 1, 33, 2], [40, 40, 9]])
@pytest.mark.parametrize("dead", [0, 3])
def test_hook_path_equals_traced_path_and_float64(monkeypatch, sizes, dead):
    """Unequal batches, a single sample, dead (constant) neurons: the hook path gives the traced path's statistics
    and the float64 correlation of the activations."""
    models = _pair(dead=dead)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in sizes]
    graph = trace_groups(models[0], data[0])
    assert stats_groups._hookable(models, stats_groups.group_points(graph, "post"), list(graph.groups))
    hooked = stats_groups.group_statistics(models, graph, data, pairs=[(0, 1)])
    monkeypatch.setattr(stats_groups, "_hookable", lambda *a: False)
    traced = stats_groups.group_statistics(models, graph, data, pairs=[(0, 1)])
    for i, name in enumerate(graph.groups):
        assert hooked[name].count == sum(sizes)
        torch.testing.assert_close(hooked[name].corr(0, 1), traced[name].corr(0, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(hooked[name].mean(), traced[name].mean(), rtol=0, atol=1e-12)
        if sum(sizes) > 1:
            torch.testing.assert_close(hooked[name].corr(0, 1), _reference_corr(models, data, i), rtol=0, atol=1e-9)
        if dead and i == 0:
            assert bool((hooked[name].corr(0, 1)[:dead] == 0).all())


def test_in_place_relu_takes_the_traced_path(monkeypatch):
    """A member with an in-place ReLU is not a plain chain: its pre-activation statistics come from the traced
    graph's clones, so they are the Linear outputs, not the ReLU-overwritten values."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)).double() for _ in range(2)]
    x = torch.randn(50, 5, dtype=torch.float64)
    graph = trace_groups(models[0], x)
    assert not stats_groups._hookable(models, stats_groups.group_points(graph, "pre"), list(graph.groups))
    st = stats_groups.group_statistics(models, graph, [x], point="pre")
    name = next(iter(graph.groups))
    with torch.no_grad():
        pre = models[0][0](x)
    torch.testing.assert_close(st[name].mean(0), pre.mean(0), rtol=0, atol=1e-12)
    assert bool((pre < 0).any())  # the in-place ReLU would have changed them


def test_from_permutations_hint_is_checked_against_the_maps():
    models = _pair()
    graph = trace_groups(models[0], torch.randn(4, 6, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    perms = {name: [torch.arange(gr.size), torch.randperm(gr.size, generator=g)] for name, gr in graph.groups.items()}
    plan = Plan.from_permutations(graph, perms, [0.5, 0.5])
    name = next(iter(graph.groups))
    gp = plan.groups[name]
    p = perms[name][1]
    n = len(p)
    assert torch.equal(gp.A[1], 0.5 * torch.eye(n, dtype=torch.float64)[p])
    assert torch.equal(gp.B[1], torch.eye(n, dtype=torch.float64)[p].T)
    maps = permutation_maps(graph, plan)
    assert torch.equal(maps[name][1][0], p) and bool((maps[name][1][1] == 0.5).all())
    # maps edited after the plan was made: the hint is contradicted and ignored, the search decides
    q = p.roll(1)
    gp.A[1] = 0.5 * torch.eye(n, dtype=torch.float64)[q]
    gp.B[1] = torch.eye(n, dtype=torch.float64)[q].T.contiguous()
    assert torch.equal(permutation_maps(graph, plan)[name][1][0], q)
    gp.A[1][0, q[1]] = 0.25  # no longer a permutation map
    assert permutation_maps(graph, plan) is None
    gp.A[1][0, q[1]] = 0.0
    gp.perms = [gp.perms[0], torch.zeros(n, dtype=torch.long)]  # a hint that is no permutation
    assert torch.equal(permutation_maps(graph, plan)[name][1][0], q)
    with pytest.raises(ValueError, match="must be a permutation"):
        Plan.from_permutations(graph, {name: [torch.arange(n), torch.zeros(n, dtype=torch.long)]}, [0.5, 0.5])


@pytest.mark.parametrize("dead", [0, 3])
def test_dead_neuron_features_only_when_needed(monkeypatch, dead):
    models = _pair(dead=dead)
    data = [torch.randn(64, 6, dtype=torch.float64)]
    calls = []
    real = activations.neuron_features
    monkeypatch.setattr(activations, "neuron_features", lambda *a: calls.append(a[2]) or real(*a))
    fused = pyfusion.fuse(models, data, method="activation_matching")
    first = next(iter(fused.fusion_plan.groups))
    assert (first in calls) == bool(dead)
    assert len(calls) == (2 if dead else 0)  # both members of the one group with dead neurons, once each
    if dead:  # a permuted copy is still recovered exactly where neurons are dead (the tie-break ran)
        perm = torch.randperm(20)
        copy = mlp([6, 20, 16, 3]).double().eval()
        sd = {k: v.clone() for k, v in models[0].state_dict().items()}
        sd["1.weight"], sd["1.bias"], sd["3.weight"] = sd["1.weight"][perm], sd["1.bias"][perm], sd["3.weight"][:, perm]
        copy.load_state_dict(sd)
        out = pyfusion.fuse([models[0], copy], data, method="activation_matching")
        x = torch.randn(10, 6, dtype=torch.float64)
        torch.testing.assert_close(out(x), models[0](x), rtol=0, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("n", [1025, 512, 300])
def test_blas_correlation_panels_of_any_length(n, blas_first):
    """Panels of BLAS_PANEL rows and a last one of 1 (n = 1025), exactly one (512) or a short one (300), on offset
    data with a constant column: float64 reference."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, 150, generator=g)
    a = 1e3 + base + 0.3 * torch.randn(n, 150, generator=g)
    b = 1e3 + base[:, torch.randperm(150, generator=g)] + 0.3 * torch.randn(n, 150, generator=g)
    b[:, 5] = 7.0
    assert moments.CORRELATION.select(a, b).name == "torch"
    got = correlation(a, b)
    torch.testing.assert_close(got, correlation_ref(a, b), rtol=0, atol=1e-6)
    assert bool((got[:, 5] == 0).all())


def _structured_blocks(kind: str, n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """K float32 blocks of correlated columns: random, offset (mean 1e3, std 1), with constant columns, with
    duplicated columns (within and across members), or float16 / bfloat16 / strided views."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g, dtype=torch.float64)
    mix = [torch.randn(8, s, generator=g, dtype=torch.float64) for s in sizes]
    xs = [base @ m + 0.3 * torch.randn(n, m.shape[1], generator=g) for m in mix]
    if kind == "offset":
        xs = [1e3 + t / t.std(0) for t in xs]
    if kind == "constant":
        xs[0][:, 3] = 2.5
        xs[1][:, :2] = 0.0
    if kind == "duplicated":
        xs[0][:, 5] = xs[0][:, 1]
        xs[1][:, 7] = xs[0][:, 2]
    xs = [t.float() for t in xs]
    if kind == "half":
        xs = [t.half() for t in xs]
    if kind == "bfloat16":
        xs = [t.bfloat16() for t in xs]
    if kind == "strided":
        xs = [torch.cat([t, t], 1)[:, ::2] for t in xs]
    return xs


@needs_blocks
@pytest.mark.parametrize("kind", ["random", "offset", "constant", "duplicated", "half", "bfloat16", "strided"])
@pytest.mark.parametrize("pairs", [[(0, 1)], None, "diag", [(1, 1), (1, 0)]])
def test_engine_block_accumulation_matches_concatenation_and_float64(kind, pairs, engine_first):
    """Where the engine comes first (AVX-512 CPUs of vendors other than Intel, where oneMKL runs AVX2 code), K blocks
    given separately go to the engine without the (N, D) concatenation (``corr_accumulate_blocks``), every batch even
    of one row: the op equals the engine on the concatenation bit for bit (each row is gathered, then packed as
    before); the statistics (a tiny first batch: re-centring) equal the concatenated path's and the float64
    reference to float32 rounding (the drift check's float32 column sums are per block, so a re-centring may round
    the new shift differently); constant columns give 0, duplicated ones 1."""
    from pyfusion.stats import ActivationStats

    sizes = [130, 150]
    xs = _structured_blocks(kind, 1500, sizes, seed=21)
    blocks_st, cat_st = ActivationStats(sizes, pairs=pairs), ActivationStats(sizes, pairs=pairs)
    for lo, hi in ((0, 1), (1, 300), (300, 400), (400, 1500)):
        batch = [t[lo:hi] for t in xs]
        blocks_st.update(batch)
        assert blocks_st.last_backend == "cpp"
        cat_st.update(torch.cat(batch, 1))
        assert cat_st.last_backend == "cpp"
    # the op: same state in, same state out, bit for bit
    rects = blocks_st._rects
    ops = []
    for fn in (moments.accumulate_moments_blocks, lambda b, *st: moments.accumulate_moments(torch.cat(b, 1), *st)):
        st = (blocks_st._shift.clone(), blocks_st._s1.clone(), blocks_st._s2.clone())
        assert fn([t[:700] for t in xs], *st, rects) == "cpp"
        ops.append(st)
    mask = blocks_st._accumulated()
    mask = torch.ones(280, 280, dtype=torch.bool).tril() if mask is None else mask & torch.ones_like(mask).tril()
    assert torch.equal(ops[0][1], ops[1][1]) and torch.equal(ops[0][2][mask], ops[1][2][mask])
    full = torch.cat([t.double() for t in xs], 1)
    scale = 1 + float(full.abs().max())
    torch.testing.assert_close(blocks_st.mean(), cat_st.mean(), rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(blocks_st.var(), full.var(0, unbiased=False), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(blocks_st.var(), cat_st.var(), rtol=2e-6, atol=1e-9)
    if pairs == "diag":
        return
    a, b = (0, 1) if pairs != [(1, 1), (1, 0)] else (1, 1)
    got = blocks_st.corr(a, b)
    sl = [slice(0, 130), slice(130, 280)]
    torch.testing.assert_close(got, correlation_ref(full[:, sl[a]], full[:, sl[b]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, cat_st.corr(a, b), rtol=0, atol=1e-6)
    if kind == "constant" and (a, b) == (0, 1):
        assert bool((got[3] == 0).all()) and bool((got[:, :2] == 0).all())
    if kind == "duplicated" and (a, b) == (0, 1):
        assert abs(float(got[2, 7]) - 1.0) < 1e-6


@needs_ext
@pytest.mark.parametrize(
    "rects",
    [
        [1000, 2030, 0, 1000],  # the cross block of two members, off the macro grid
        [0, 0, 0, 0],  # the diagonal only
        [400, 1100, 0, 400, 1100, 2030, 0, 400],  # two rectangles meeting one macro block
        [400, 1100, 400, 1100, 1100, 2030, 400, 1100],  # a within-block square and a cross block below it
    ],
)
def test_engine_rectangles_match_reference_and_the_whole_triangle(rects):
    """The engine's rectangle mode (macro blocks clipped to the rectangles, the diagonal from its own tiles): every
    accumulated entry (rectangles and diagonal) equals the whole triangle's bit for bit, and the float64 reference to
    float32 rounding, on offset data (mean 1e3, std 1) with a constant column."""
    from pyfusion.ops.reference import accumulate_moments_ref

    d = 2030
    g = torch.Generator().manual_seed(31)
    x = 1e3 + torch.randn(300, d, generator=g)
    x[:, 1500] = 3.0
    shift = moments.moment_shift(x)
    states = {name: (torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)) for name in "rfe"}
    for lo, hi in ((0, 100), (100, 300)):
        for name, r in (("r", rects), ("f", [])):
            s1, s2 = states[name]
            xb = x[lo:hi]
            _ext._C.corr_accumulate(
                xb.data_ptr(), 0, hi - lo, d, d, 1, shift.data_ptr(), s1.data_ptr(), s2.data_ptr(), 1, "auto", r
            )
        accumulate_moments_ref(x[lo:hi], shift, *states["e"])
    mask = torch.zeros(d, d, dtype=torch.bool)
    mask.diagonal().fill_(True)
    for i in range(0, len(rects), 4):
        r0, r1, c0, c1 = rects[i : i + 4]
        mask[r0:r1, c0:c1] = True
    mask &= torch.ones(d, d, dtype=torch.bool).tril()
    (s1r, s2r), (s1f, s2f), s2e = states["r"], states["f"], states["e"][1]
    assert torch.equal(s1r, s1f) and torch.equal(s2r[mask], s2f[mask])
    scale = float(s2e.diagonal().max())
    torch.testing.assert_close(s2r[mask], s2e[mask], rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("pairs", [[(0, 1)], [(1, 1)], "diag"])
def test_restricted_state_ignores_its_uninitialised_entries(pairs):
    """With ``pairs`` the entries outside the accumulated blocks are never initialised: poisoned with NaN here, they
    change nothing the finalizers read, before or after a merge (which masks them)."""
    from pyfusion.stats import ActivationStats

    g = torch.Generator().manual_seed(5)
    x = torch.randn(900, 9, generator=g, dtype=torch.float64) * 3 + 40
    x[:, 2] = 1.5  # a constant column
    sizes = [4, 5]

    def make() -> ActivationStats:
        st = ActivationStats(sizes, pairs=pairs)
        st._s2[~st._accumulated()] = float("nan")
        return st

    one = ActivationStats(sizes).update([x[:, :4], x[:, 4:]])
    a = make().update([x[:1, :4], x[:1, 4:]]).update([x[1:300, :4], x[1:300, 4:]])
    b = make().update([x[300:, :4], x[300:, 4:]])
    a.merge(b)
    for st in (a, make().update([x[:, :4], x[:, 4:]])):
        torch.testing.assert_close(st.var(), one.var(), rtol=1e-12, atol=1e-12)
        if pairs == [(0, 1)]:
            torch.testing.assert_close(st.corr(0, 1), one.corr(0, 1), rtol=0, atol=1e-12)
        if pairs == [(1, 1)]:
            torch.testing.assert_close(st.cov(1, 1), one.cov(1, 1), rtol=0, atol=1e-10)
        assert bool(torch.isfinite(st._centered()[1]).all())


@needs_ext
@pytest.mark.parametrize("kind", ["random", "offset", "constant", "half", "strided"])
def test_block_accumulation_matches_concatenation_and_float64(kind, blas_first):
    """K blocks given separately take the BLAS path without concatenating (ops.moments.accumulate_moments_blocks);
    unequal batches (one sample and a short batch go through the engine on the concatenation), a jump of the
    offset (re-centring), constant columns, float16 and strided blocks: float64 reference and the concatenated
    path agree."""
    from pyfusion.stats import ActivationStats

    g = torch.Generator().manual_seed(11)
    n, sizes = 1700, [130, 140]
    base = torch.randn(n, 140, generator=g)
    xs = [base[:, :130] + 0.4 * torch.randn(n, 130, generator=g), base + 0.4 * torch.randn(n, 140, generator=g)]
    if kind == "offset":
        xs = [t + 1e3 for t in xs]
        xs[1][1200:] += 30.0  # a jump: the shift must follow
    if kind == "constant":
        xs[0][:, 4] = 2.5
        xs[1][:, :3] = 0.0
    if kind == "half":
        xs = [t.half() for t in xs]
    if kind == "strided":
        xs = [torch.cat([t, t], 1)[:, ::2] for t in xs]
    blocks_st, cat_st = ActivationStats(sizes, pairs=[(0, 1)]), ActivationStats(sizes, pairs=[(0, 1)])
    backends = []
    for lo, hi in ((0, 1), (1, 300), (300, 400), (400, 1200), (1200, 1700)):
        batch = [t[lo:hi] for t in xs]
        blocks_st.update(batch)
        backends.append(blocks_st.last_backend)
        cat_st.update(torch.cat(batch, 1))
    assert backends[0] != "torch" and backends[2] != "torch"  # 1 and 100 rows: below BLAS_MIN_ROWS
    assert backends[1] == backends[3] == backends[4] == "torch"
    full = torch.cat([t.double() for t in xs], 1)
    want = correlation_ref(full[:, :130], full[:, 130:])
    got = blocks_st.corr(0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, cat_st.corr(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(blocks_st.var(), full.var(0, unbiased=False), rtol=1e-5, atol=1e-9)
    # the means carry the float32 rounding of x - shift, within which the two paths may differ
    torch.testing.assert_close(blocks_st.mean(), full.mean(0), rtol=0, atol=1e-7 * (1 + full.abs().max().item()))
    torch.testing.assert_close(blocks_st.mean(), cat_st.mean(), rtol=0, atol=1e-7 * (1 + full.abs().max().item()))
    if kind == "constant":
        assert bool((got[4] == 0).all()) and bool((got[:, :3] == 0).all())


def _script_perms(models: list[nn.Module], data: list[torch.Tensor]) -> list[np.ndarray]:
    """The plain script's matching: hooked ReLU outputs, numpy float64 correlation of the cross block, scipy's
    linear_sum_assignment (maximise) per layer."""
    from scipy.optimize import linear_sum_assignment

    acts: list[list[list[np.ndarray]]] = [[], []]
    with torch.no_grad():
        for k, m in enumerate(models):
            outs: list[list[np.ndarray]] = []
            for x in data:
                h, i = x, 0
                for layer in m:
                    h = layer(h)
                    if isinstance(layer, nn.ReLU):
                        if len(outs) <= i:
                            outs.append([])
                        outs[i].append(h.numpy())
                        i += 1
            acts[k] = outs
    perms = []
    for la, lb in zip(*acts):
        a, b = np.concatenate(la).astype(np.float64), np.concatenate(lb).astype(np.float64)
        a, b = a - a.mean(0), b - b.mean(0)
        sa, sb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
        corr = (a.T @ b) / np.outer(np.where(sa > 0, sa, 1.0), np.where(sb > 0, sb, 1.0))
        perms.append(linear_sum_assignment(corr, maximize=True)[1])
    return perms


@needs_ext
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["engine_first", "blas_first"])
def test_activation_matching_finds_the_float64_scripts_permutations(seed, order, request):
    """float32 members, member 1 a hidden-neuron permutation of member 0 with weights perturbed by 0.15 of their
    spread (the bench's well-posed pair, small): activation matching on either cross-block backend finds exactly the
    permutations of the plain float64 script (numpy correlation + scipy), over batches of 256 with a last short one."""
    request.getfixturevalue(order)
    torch.manual_seed(seed)
    width = 160
    a, b = mlp([30, width, width, 5]).eval(), mlp([30, width, width, 5]).eval()
    sd = {k: v.detach().clone() for k, v in a.state_dict().items()}
    prev = None
    for j, name in enumerate(["1", "3", "5"]):
        w, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]
        if prev is not None:
            w = w[:, prev]
        if j < 2:
            p = torch.randperm(width)
            w, bias, prev = w[p], bias[p], p
        sd[f"{name}.weight"] = w + 0.15 * w.std() * torch.randn_like(w)
        sd[f"{name}.bias"] = bias + 0.15 * bias.std() * torch.randn_like(bias)
    b.load_state_dict(sd)
    data = list(torch.relu(torch.randn(1100, 30)).split(256))
    fused = pyfusion.fuse([a, b], data, method="activation_matching")
    want = _script_perms([a, b], data)
    got = [gp.A[1].argmax(1).numpy() for gp in fused.fusion_plan.groups.values()]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
