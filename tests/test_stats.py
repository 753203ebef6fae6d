"""pyfusion.stats: ActivationStats (streaming, merge, finalizers, all_reduce) and the hook collector."""

from __future__ import annotations

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from pyfusion import _ext
from pyfusion.stats import ActivationStats, as_samples, collect_stats

ENGINE = "cpp" if _ext.EXT_AVAILABLE else "reference"


def ref_stats(blocks: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 numpy reference of every finalizer on the concatenated blocks."""
    x = np.concatenate([b.double().numpy() for b in blocks], axis=1)
    m = x.mean(0)
    xc = x - m
    cov = xc.T @ xc / x.shape[0]
    return {"x": x, "mean": m, "cov": cov}


def split(sizes: list[int], a: int) -> slice:
    off = np.cumsum([0, *sizes])
    return slice(int(off[a]), int(off[a + 1]))


def check_all(stats: ActivationStats, blocks: list[torch.Tensor], tol: float = 1e-6) -> None:
    """Every finalizer of ``stats`` against float64 numpy on ``blocks`` (or one (N, D) tensor split by sizes).

    Tolerances: covariances to ``tol`` of the largest entry; correlations and cosines to ``tol`` absolute;
    Gram entries to ``tol`` * ||x_ai|| ||x_bj|| (the Cauchy-Schwarz scale of the entry).
    """
    if len(blocks) == 1 and len(stats.sizes) > 1:
        blocks = list(torch.split(blocks[0], stats.sizes, dim=1))
    r = ref_stats(blocks)
    sizes = [b.shape[1] for b in blocks]
    x, m, cov = r["x"], r["mean"], r["cov"]
    sd = np.sqrt(np.diag(cov))
    scale = max(float(np.abs(cov).max()), 1e-300)
    np.testing.assert_allclose(stats.mean().numpy(), m, rtol=1e-12, atol=tol * (np.abs(m).max() * 1e-6 + sd.max()))
    np.testing.assert_allclose(stats.cov().numpy(), cov, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(stats.var().numpy(), np.diag(cov), rtol=0, atol=tol * scale)
    for a in range(len(sizes)):
        for b in range(len(sizes)):
            sa, sb = split(sizes, a), split(sizes, b)
            np.testing.assert_allclose(stats.cov(a, b).numpy(), cov[sa, sb], rtol=0, atol=tol * scale)
            denom = np.outer(sd[sa], sd[sb])
            ok = denom > 0
            corr = np.where(ok, cov[sa, sb] / np.where(ok, denom, 1), 0.0)
            np.testing.assert_allclose(stats.corr(a, b).numpy(), corr, rtol=0, atol=tol)
            gram = x[:, sa].T @ x[:, sb]
            nrm = np.outer(np.linalg.norm(x[:, sa], axis=0), np.linalg.norm(x[:, sb], axis=0))
            assert (np.abs(stats.gram(a, b).numpy() - gram) <= tol * nrm + 1e-12).all()
            sq = ((x[:, sa][:, :, None] - x[:, sb][:, None, :]) ** 2).mean(0)
            np.testing.assert_allclose(stats.sqdist(a, b).numpy(), sq, rtol=1e-6, atol=tol * scale)
            cos = np.where(nrm > 0, gram / np.where(nrm > 0, nrm, 1), 0.0)
            np.testing.assert_allclose(stats.cosine(a, b).numpy(), cos, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 37, 600])
def test_random_blocks_match_float64(k, n):
    sizes = [5, 1, 12, 7][:k]
    blocks = [torch.randn(n, s) * (a + 1) + a for a, s in enumerate(sizes)]
    st = ActivationStats(sizes).update(blocks)
    assert st.count == n and st.last_backend == ENGINE
    check_all(st, blocks)


def test_d1_and_float64_input_use_reference_path():
    x = torch.randn(50, 1, dtype=torch.float64)
    st = ActivationStats([1]).update(x)
    assert st.last_backend == "reference"
    check_all(st, [x], tol=1e-12)
    st32 = ActivationStats([1]).update(x.float())
    check_all(st32, [x.float()])


def test_offset_1e3_small_variance_and_float32_one_pass_fails():
    n, d = 4000, 24
    base = torch.randn(n, d, dtype=torch.float64)
    base[:, 1] = base[:, 0] * 0.8 + 0.6 * base[:, 1]
    x = (1e3 + 1e-2 * base).float()
    st = ActivationStats([12, 12]).update([x[:, :12], x[:, 12:]])
    r = ref_stats([x])
    sd = np.sqrt(np.diag(r["cov"]))
    ref_corr = r["cov"] / np.outer(sd, sd)
    ours = np.abs(st.corr().numpy() - ref_corr).max()
    # The one-pass float32 formula E[x x^T] - E[x] E[x]^T (ZipIt-style) on the same input.
    xf = x.float()
    m = xf.mean(0)
    cov1 = xf.T @ xf / n - torch.outer(m, m)
    sd1 = cov1.diagonal().clamp_min(1e-30).sqrt()
    one_pass = np.abs((cov1 / torch.outer(sd1, sd1)).double().numpy() - ref_corr).max()
    assert ours <= 1e-6
    assert one_pass > 0.1, one_pass  # catastrophic cancellation: the float32 one-pass result is meaningless
    check_all(st, [x[:, :12], x[:, 12:]])


def test_constant_neurons_give_finite_zero_correlation():
    x = torch.randn(300, 6)
    x[:, 1] = 5.0  # constant
    x[:, 4] = 0.0  # all zero: its cosine similarities are 0 too
    y = torch.full((300, 2), -3e3)  # constant at a large offset
    st = ActivationStats([6, 2]).update([x, y])
    c = st.corr()
    assert torch.isfinite(c).all()
    for j in (1, 4, 6, 7):
        assert torch.equal(c[j], torch.zeros(8, dtype=torch.float64))
        assert torch.equal(c[:, j], torch.zeros(8, dtype=torch.float64))
    assert st.var(0)[1].item() == 0 and st.var(1).abs().max().item() == 0
    cos = st.cosine(0, 0)
    assert torch.isfinite(cos).all() and torch.equal(cos[4], torch.zeros(6, dtype=torch.float64))
    assert torch.isfinite(st.cosine(0, 1)).all()
    check_all(st, [x, y])


def test_n1_statistics():
    x = torch.randn(1, 4)
    st = ActivationStats([2, 2]).update(x)
    assert torch.equal(st.cov(), torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(st.corr(), torch.zeros(4, 4, dtype=torch.float64))
    torch.testing.assert_close(st.mean(), x[0].double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_strided_input(dtype):
    x = (torch.randn(40, 500) * 2 + 3).t()[:, ::2]  # (500, 20), strided
    xh = x.to(dtype)
    st = ActivationStats([10, 10]).update(xh)
    check_all(st, [xh[:, :10].float(), xh[:, 10:].float()])
    st2 = ActivationStats([10, 10]).update([x[:, :10], x[:, 10:]])
    check_all(st2, [x[:, :10], x[:, 10:]])


@pytest.mark.parametrize("batch", [1, 7, 256, 1000])
def test_streaming_equals_one_shot(batch):
    x = torch.randn(1000, 30) * 2 + 10
    one = ActivationStats([10, 20]).update(x)
    st = ActivationStats([10, 20])
    for i in range(0, 1000, batch):
        st.update(x[i : i + batch])
    assert st.count == 1000
    torch.testing.assert_close(st.mean(), one.mean(), rtol=0, atol=1e-8)
    torch.testing.assert_close(st.var(), one.var(), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.cov(), one.cov(), rtol=0, atol=1e-6 * one.var().max().item())
    torch.testing.assert_close(st.corr(0, 1), one.corr(0, 1), rtol=0, atol=1e-6)


def test_merge_equals_one_state_and_handles_empty():
    x = torch.randn(900, 16) * 3 + 100
    x[600:] += 5  # the second part has another mean: Chan's correction term matters
    whole = ActivationStats([8, 8]).update(x)
    a = ActivationStats([8, 8]).update(x[:600])
    b = ActivationStats([8, 8]).update(x[600:])
    a.merge(b).merge(ActivationStats([8, 8]))
    assert a.count == 900
    torch.testing.assert_close(a.mean(), whole.mean(), rtol=0, atol=1e-9)
    torch.testing.assert_close(a.cov(), whole.cov(), rtol=0, atol=1e-6 * whole.var().max().item())
    empty = ActivationStats([8, 8]).merge(b)
    torch.testing.assert_close(empty.cov(), b.cov(), rtol=0, atol=1e-12)
    a.update(x[:10])  # updates after a merge continue from the merged shift
    check_all(a, [torch.cat([x, x[:10]])])


def test_validation_changes_nothing():
    st = ActivationStats([3, 2]).update(torch.randn(10, 5))
    before = (st.count, st.cov().clone())
    with pytest.raises(ValueError, match=r"x must have shape \(N, 5\)"):
        st.update(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"xs\[1\] must have shape \(N, 2\)"):
        st.update([torch.randn(4, 3), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="NaN or inf"):
        st.update(torch.tensor([[1.0, 2, 3, 4, float("inf")]]))
    with pytest.raises(ValueError, match="cannot merge"):
        st.merge(ActivationStats([5]))
    with pytest.raises(ValueError, match="sizes must be"):
        ActivationStats([])
    with pytest.raises(ValueError, match="no samples"):
        ActivationStats([2]).cov()
    assert st.count == before[0] and torch.equal(st.cov(), before[1])


# ---- distributed -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(700, 12, generator=g) * 2 + 50
        x[400:] -= 3
        part = x[:400] if rank == 0 else x[400:]
        st = ActivationStats([5, 7]).update([part[:, :5], part[:, 5:]])
        st.all_reduce()
        # the cross block only (its state's other entries are uninitialised memory, masked before the reduce)
        cross = ActivationStats([5, 7], pairs=[(0, 1)]).update([part[:, :5], part[:, 5:]]).all_reduce()
        torch.save(
            {"count": st.count, "mean": st.mean(), "cov": st.cov(), "corr": st.corr(0, 1), "cross": cross.corr(0, 1)},
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_one_process():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "state")
        mp.spawn(_dist_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(700, 12, generator=g) * 2 + 50
        x[400:] -= 3
        one = ActivationStats([5, 7]).update(x)
        for rank in (0, 1):
            got = torch.load(f"{out}.{rank}")
            assert got["count"] == 700
            torch.testing.assert_close(got["mean"], one.mean(), rtol=0, atol=1e-9)
            torch.testing.assert_close(got["cov"], one.cov(), rtol=0, atol=1e-6 * one.var().max().item())
            torch.testing.assert_close(got["corr"], one.corr(0, 1), rtol=0, atol=1e-6)
            torch.testing.assert_close(got["cross"], one.corr(0, 1), rtol=0, atol=1e-6)


def test_all_reduce_needs_process_group():
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        ActivationStats([2]).update(torch.randn(3, 2)).all_reduce()


# ---- collector -------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.conv(x))


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):  # (N, T, 4) -> (N, T, 6)
        return self.proj(x)


def test_collector_mlp_pre_and_post_activation_k3():
    models = [MLP() for _ in range(3)]
    data = [(torch.randn(16, 6), torch.zeros(16)) for _ in range(5)]
    post = collect_stats(models, data, {"h": ["act"]}, progress=False)["h"]
    pre_relu = collect_stats(models, data, {"h": ["fc1"]}, transform=torch.relu, progress=False)["h"]
    pre = collect_stats(models, data, {"h": ["fc1"], "out": ["fc2"]}, progress=True)
    xs = torch.cat([b[0] for b in data])
    with torch.no_grad():
        hand_pre = [m.fc1(xs) for m in models]
        hand_out = [m(xs) for m in models]
    check_all(post, [torch.relu(h) for h in hand_pre])
    check_all(pre_relu, [torch.relu(h) for h in hand_pre])
    check_all(pre["h"], hand_pre)
    check_all(pre["out"], hand_out)
    assert post.count == 80 and post.sizes == [9, 9, 9]


class InPlaceNet(nn.Module):
    """fc1's output is overwritten by an in-place ReLU, fc2's by ``out += shortcut``, after their hooks ran."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 9), nn.ReLU(inplace=True), nn.Linear(9, 9)

    def forward(self, x):
        h = self.act(self.fc1(x))
        out = self.fc2(h)
        out += h
        return out


def test_collector_sees_the_values_before_in_place_changes():
    models = [InPlaceNet() for _ in range(2)]
    data = [torch.randn(16, 6) for _ in range(3)]
    got = collect_stats(models, data, {"h": ["fc1"], "o": ["fc2"]}, progress=False)
    xs = torch.cat(data)
    with torch.no_grad():
        hand_h = [m.fc1(xs) for m in models]
        hand_o = [m.fc2(torch.relu(h)) for m, h in zip(models, hand_h)]
    assert bool((hand_h[0] < 0).any())  # the ReLU would have changed them
    check_all(got["h"], hand_h)
    check_all(got["o"], hand_o)
    assert got["h"].count == 48


def test_collector_conv_input_capture_and_stacked_paths():
    models = [ConvNet(), ConvNet()]
    for m in models:
        m.bn.running_mean.uniform_(-1, 1)
    data = [torch.randn(3, 3, 5, 4) for _ in range(3)]
    got = collect_stats(models, data, {"c": ["bn"]}, capture="input", progress=False)
    stacked = collect_stats(models, data, {"s": ["conv", "bn"]}, progress=False)["s"]
    xs = torch.cat(data)
    assert all(m.training for m in models)  # the collector restores the members' modes
    with torch.no_grad():
        for m in models:
            m.eval()
        hand = [m.conv(xs) for m in models]
        hand_bn = [m.bn(h) for m, h in zip(models, hand)]
    assert got["c"].count == 9 * 5 * 4  # N*H*W samples of C neurons
    check_all(got["c"], [as_samples(h) for h in hand])
    # Two paths of one point: their samples are stacked (e.g. the points of one residual stream).
    assert stacked.count == 2 * 9 * 5 * 4
    check_all(stacked, [torch.cat([as_samples(h), as_samples(b)]) for h, b in zip(hand, hand_bn)])
    with pytest.raises(ValueError, match="no batches"):
        collect_stats(models, [], {"c": ["bn"]}, progress=False)
    with pytest.raises(ValueError, match="does not have"):
        collect_stats(models, data, {"c": ["nope"]}, progress=False)


def test_collector_sequences_and_max_batches():
    models = [SeqNet(), SeqNet()]
    data = [torch.randn(2, 7, 4) for _ in range(4)]
    got = collect_stats(models, iter(data), {"p": ["proj"]}, max_batches=3, progress=False)["p"]
    xs = torch.cat(data[:3])
    with torch.no_grad():
        hand = [m(xs).reshape(-1, 6) for m in models]
    assert got.count == 3 * 2 * 7
    check_all(got, hand)


# ---- GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_engine_matches_float64(dtype):
    x = (torch.randn(5000, 300) * 2e-2 + 1e3).to(dtype)
    xs = torch.randn(300, 900).t()[:, ::3].to(dtype)  # strided (900, 100)
    for data in (x, xs):
        dev = data.cuda()
        st = ActivationStats([data.shape[1] // 3, data.shape[1] - data.shape[1] // 3], device="cuda").update(dev)
        has_kernel = _ext.EXT_AVAILABLE and hasattr(_ext._C, "corr_accumulate_cuda")
        assert st.last_backend == ("cuda" if has_kernel else "reference")
        cpu = ActivationStats(st.sizes)
        cpu.merge(st)  # merging a GPU state into a CPU one moves it
        check_all(cpu, [data.float()])
