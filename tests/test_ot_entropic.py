"""OT fusion: importance masses through a flatten (conv -> flatten -> linear), and entropic OT (``reg=``, Sinkhorn)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import pyfusion
from pyfusion import models
from pyfusion.graph import trace_groups
from pyfusion.match.solvers import SINKHORN_LOG_BELOW, entropic_transport
from pyfusion.testing import permuted_copy, randomize_batchnorm

ot = pytest.importorskip("ot")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _vgg_pair():
    torch.manual_seed(3)
    make = lambda: randomize_batchnorm(models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10))  # noqa: E731
    return [make().double() for _ in range(2)]


def _data(n=3, bs=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(bs, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(n)]


def _flatten_linear_reference(members, fused):
    """The fused Linear after the flatten, from the plan by the formula W' = sum_k A_k W_k (B_k kron I_e)
    computed here (float64, dense)."""
    graph = trace_groups(members[0])
    plan = fused.fusion_plan
    by_key = graph.refs_by_key()
    (in_group, ref) = next((g, r) for g, r in by_key["9.weight"] if r.role == "consumer")
    (out_group, _) = next((g, r) for g, r in by_key["9.weight"] if r.role == "producer")
    want = 0
    for k, m in enumerate(members):
        a = plan.groups[out_group].A[k]
        b = torch.kron(plan.groups[in_group].B[k].contiguous(), torch.eye(ref.expand, dtype=torch.float64))
        want = want + a @ m[9].weight.detach() @ b
    return want


@pytest.mark.parametrize("masses", ["l1", "l2"])
@pytest.mark.parametrize("reg", [None, 0.05])
def test_importance_masses_through_a_flatten(masses, reg):
    """conv -> flatten -> linear with dense (soft) maps: used to crash inside the builder (torch.kron of a transposed
    map); the fused Linear must equal the formula computed independently."""
    members = _vgg_pair()
    for cost, data in (("weights", None), ("activations", _data())):
        fused = pyfusion.fuse(members, data, method="ot", masses=masses, cost=cost, reg=reg, reset_bn=False)
        assert fused.fusion_info["masses"] == masses
        torch.testing.assert_close(fused[9].weight.detach(), _flatten_linear_reference(members, fused), rtol=1e-12,
                                   atol=1e-12)  # fmt: skip
        soft = any(int((gp.B[1] != 0).sum()) > gp.B[1].shape[0] for gp in fused.fusion_plan.groups.values())
        assert soft  # dense maps: the path that crashed
        x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
        assert torch.isfinite(fused(x)).all()


def _problem(n, m, seed, outlier=False):
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    x, y = rng.standard_normal((n, 4)), rng.standard_normal((m, 4))
    if outlier:  # a neuron far from all others, the others close together: its whole cost row is near the maximum
        x[0] += 30.0
        y *= 0.1
    c = ((x[:, None] - y[None]) ** 2).sum(-1) * 7.5  # a cost scale far from 1: reg is relative to it
    return (torch.from_numpy(a / a.sum()), torch.from_numpy(b / b.sum()), torch.from_numpy(c))


@pytest.mark.parametrize("reg", [0.5, 0.05, 5e-3, 2e-3, 5e-4])
def test_entropic_transport_equals_pot_sinkhorn(reg):
    """Same coupling as POT's Sinkhorn on the normalised cost, to 1e-9, in both regimes (plain and log-domain)."""
    a, b, c = _problem(9, 7, seed=int(reg * 1e4), outlier=reg < 1e-3)
    t, _, res = entropic_transport(a, b, c, reg)
    method = "sinkhorn" if reg >= SINKHORN_LOG_BELOW else "sinkhorn_log"
    assert res.solver == method and res.converged and res.iterations >= 1
    assert res.cost_scale == pytest.approx(float(c.max()))
    want = ot.sinkhorn(a.numpy(), b.numpy(), (c / c.max()).numpy(), reg, method=method, numItermax=100_000,
                       stopThr=1e-9)  # fmt: skip
    assert np.abs(t.numpy() - want).max() <= 1e-9
    torch.testing.assert_close(t.sum(1), a, rtol=1e-9, atol=1e-12)  # the row scaling comes last: exact
    assert float((t.sum(0) - b).norm()) < 1e-9


def test_log_domain_needed_below_the_threshold():
    """Below SINKHORN_LOG_BELOW the plain iteration breaks on an outlier row (the measurement behind the constant):
    the log-domain plan is the right one, and ours is it."""
    a, b, c = _problem(12, 12, seed=4, outlier=True)
    assert float(c[0].min() / c.max()) > 0.95
    reg = 1.2e-3  # row 0: cost / reg > 0.95 / 1.2e-3 = 792 > 745, exp(-cost / reg) underflows in float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ot.sinkhorn(a.numpy(), b.numpy(), (c / c.max()).numpy(), reg, method="sinkhorn", numItermax=100_000)
    t, _, res = entropic_transport(a, b, c, reg)
    assert res.solver == "sinkhorn_log" and res.converged
    torch.testing.assert_close(t.sum(1), a, rtol=1e-9, atol=1e-12)
    assert float((t.sum(0) - b).norm()) < 1e-9
    assert not (np.isfinite(plain).all() and np.abs(plain.sum(0) - b.numpy()).max() < 1e-6)


def test_entropic_objective_tends_to_the_exact_plan():
    """<T_reg, C> decreases to the EMD objective as reg -> 0, within the entropic bound
    reg * c_max * min(H(a), H(b))."""
    a, b, c = _problem(10, 8, seed=9)
    exact = float(ot.emd2(a.numpy(), b.numpy(), c.numpy()))
    h = min(float(-(a * a.log()).sum()), float(-(b * b.log()).sum()))
    gaps = []
    for reg in (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3):
        t, _, _ = entropic_transport(a, b, c, reg)
        gap = float((t * c).sum()) - exact
        assert -1e-9 <= gap <= reg * float(c.max()) * h + 1e-7, (reg, gap)
        gaps.append(gap)
    assert all(g1 >= g2 - 1e-9 for g1, g2 in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-2 * gaps[0]


def test_fuse_with_reg_records_solver_and_iterations():
    torch.manual_seed(0)
    members = [models.mlp([6, 8, 7, 3]).double() for _ in range(2)]
    fused = pyfusion.fuse(members, method="ot", cost="weights", reg=0.02)
    info = fused.fusion_info
    assert info["reg"] == 0.02 and info["solver"] == "sinkhorn"
    assert set(info["sinkhorn_iterations"]) == set(fused.fusion_plan.groups)
    assert all(len(v) == 1 and v[0] >= 1 for v in info["sinkhorn_iterations"].values())
    assert info["sinkhorn_unconverged"] == []
    for gp in fused.fusion_plan.groups.values():  # soft maps even with uniform masses; rows barycentric
        assert int((gp.A[1] > 0).sum()) > gp.A[1].shape[0]
        torch.testing.assert_close(gp.A[1].sum(1), torch.full((gp.A[1].shape[0],), 0.5, dtype=torch.float64))
    # a permuted copy: small reg (log domain) gives the model back up to the entropic blur
    m = members[0]
    small = pyfusion.fuse([m, permuted_copy(m)], method="ot", cost="weights", reg=2e-3)
    assert small.fusion_info["solver"] == "sinkhorn_log" and small.fusion_info["sinkhorn_unconverged"] == []
    x = torch.randn(20, 6, dtype=torch.float64)
    torch.testing.assert_close(small(x), m(x), rtol=1e-6, atol=1e-6)
    exact = pyfusion.fuse(members, method="ot", cost="weights")
    assert exact.fusion_info["solver"] == "linear_assignment" and exact.fusion_info["reg"] is None
    assert "sinkhorn_iterations" not in exact.fusion_info
    l1 = pyfusion.fuse(members, method="ot", cost="weights", masses="l1")
    assert l1.fusion_info["solver"] == "emd"


def test_unconverged_sinkhorn_warns_and_is_recorded():
    torch.manual_seed(0)
    members = [models.mlp([6, 8, 3]).double() for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="did not converge in 2 iterations"):
        fused = pyfusion.fuse(members, method="ot", cost="weights", reg=1e-3, max_iter=2)
    assert fused.fusion_info["sinkhorn_unconverged"]


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.1", True])
def test_bad_reg_is_refused_before_any_work(bad):
    members = [models.mlp([6, 8, 3]) for _ in range(2)]
    with pytest.raises(ValueError, match=r"OTConfig\.reg must be None \(exact transport\) or a finite number > 0"):
        pyfusion.fuse(members, method="ot", reg=bad)
    with pytest.raises(ValueError, match=r"OTConfig\.max_iter must be an integer >= 1"):
        pyfusion.fuse(members, method="ot", reg=0.1, max_iter=0)
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        entropic_transport(torch.ones(2) / 2, torch.ones(2) / 2, torch.rand(2, 2, dtype=torch.float64), bad)
