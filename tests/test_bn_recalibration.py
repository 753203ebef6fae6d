"""BatchNorm recalibration touches only the slots fusion changed (DESIGN §8: calibration data never breaks alpha = 1).

Branch slots (and every slot that is one member's neuron with coefficient 1) keep the member's statistics exactly;
changed slots are recalibrated relative to the members: ``rm = rm_b + mu_f - sum_k A_k mu_k``,
``rv = rv_b v_f / sum_k A_k v_k`` (pyfusion.fuse.bn). Checked on VGG + BatchNorm and ResNet pairs at alpha = 0, 0.5,
1, with and without data, for partial fusion, full fusion (weight matching), OT (soft maps) and clustering.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.fuse.bn import changed_slots
from pyfusion.graph import trace_groups
from pyfusion.testing import permuted_copy, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ARCHS = {
    "vgg": (lambda: models.vgg((6, "M", 8, "M"), in_channels=2, image_size=8, hidden=10), (2, 8, 8)),
    "resnet": (lambda: models.resnet20(1, blocks=1, num_classes=5), (3, 8, 8)),
}
BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _members(arch, k=2, seed=0):
    torch.manual_seed(seed)
    return [randomize_batchnorm(ARCHS[arch][0]()).double().eval() for _ in range(k)]


def _data(arch, n=3, bs=12, shift=0.0):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(bs, *ARCHS[arch][1], generator=g, dtype=torch.float64) + shift for _ in range(n)]


def _x(arch, n=7):
    return torch.randn(n, *ARCHS[arch][1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _snapshot(ms):
    return [{k: v.detach().clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())} for m in ms]


def _bn_inputs(model, data):
    """Eval-mode (mean, unbiased var) per channel of every BatchNorm's input on the data, by hooks (float64)."""
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, p=p: acts.setdefault(p, []).append(a[0].detach()))
        for p, m in model.named_modules()
        if isinstance(m, BN)
    ]
    model.eval()
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for p, xs in acts.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)
        out[p] = (x.mean(1), x.var(1, unbiased=True))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("with_data", [False, True], ids=["no_data", "data"])
def test_alpha_one_is_exactly_the_ensemble(arch, with_data):
    members = _members(arch)
    data = _data(arch) if with_data else None
    snap = _snapshot(members)
    fused = pyfusion.fuse(members, data, method="partial", alpha=1.0).eval()
    x = _x(arch)
    with torch.no_grad():
        want = 0.5 * members[0](x) + 0.5 * members[1](x)
        torch.testing.assert_close(fused(x), want, rtol=1e-10, atol=1e-10)
    if with_data:
        info = fused.fusion_info
        assert info["bn_reset"] == "changed slots" and sum(info["bn_recalibrated"].values()) == 0
        assert info["bn_reset_samples"] == 0  # nothing changed: no pass was even run
    for m, s in zip(members, snap):  # members untouched (buffers, and eval mode)
        assert not m.training
        for k, v in list(m.named_parameters()) + list(m.named_buffers()):
            assert torch.equal(v, s[k]), k


@pytest.mark.parametrize("arch", list(ARCHS))
def test_alpha_one_float32_with_data(arch):
    members = [m.float() for m in _members(arch)]
    data = [d.float() for d in _data(arch)]
    fused = pyfusion.fuse(members, data, method="partial", alpha=1.0).eval()
    x = _x(arch).float()
    with torch.no_grad():
        want = 0.5 * members[0](x) + 0.5 * members[1](x)
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method,opts", [("partial", {"alpha": 0.5}), ("weight_matching", {})], ids=["partial", "wm"])
def test_lambda_one_hot_is_the_member_with_data(arch, method, opts):
    members = _members(arch)
    data = _data(arch, shift=0.7)  # data unlike the members' statistics: a full reset would move them
    x = _x(arch)
    for k, lam in ((0, [1.0, 0.0]), (1, [0.0, 1.0])):
        fused = pyfusion.fuse(members, data, method=method, lambdas=lam, **opts).eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), members[k](x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_data", [False, True], ids=["no_data", "data"])
def test_fusing_a_permuted_copy_gives_the_model_back(arch, alpha, with_data):
    (m,) = _members(arch, k=1)
    data = _data(arch, shift=0.7) if with_data else None
    copy = permuted_copy(m, torch.Generator().manual_seed(3)).double()
    fused = pyfusion.fuse([m, copy], data, method="partial", alpha=alpha, features="weights").eval()
    x = _x(arch)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-9, atol=1e-9)
    if with_data and alpha < 1.0:
        assert sum(fused.fusion_info["bn_recalibrated"].values()) > 0  # shared slots were recalibrated: to themselves


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["weight_matching", "ot"])
def test_full_fusion_of_a_permuted_copy_with_data(arch, method):
    (m,) = _members(arch, k=1)
    copy = permuted_copy(m, torch.Generator().manual_seed(4)).double()
    cost = {"cost": "weights"} if method == "ot" else {}
    fused = pyfusion.fuse([m, copy], _data(arch, shift=0.7), method=method, **cost).eval()
    x = _x(arch)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-9, atol=1e-9)


def _check_rule(members, fused, built, data):
    """Every BatchNorm of ``fused``: unchanged slots equal the builder's (= the member's) statistics bit for bit,
    changed slots follow the rule, against statistics measured here by hooks on the members and on the final fused
    network (whose BatchNorm inputs are what the sequential recalibration measured)."""
    graph = trace_groups(members[0])
    plan = fused.fusion_plan
    member_in = [_bn_inputs(m, data) for m in members]
    fused_in = _bn_inputs(fused, data)
    n_changed = 0
    for path, bn in fused.named_modules():
        if not isinstance(bn, BN):
            continue
        (gname,) = [n for n, g in graph.groups.items() if any(r.module == path and r.role == "neuron" for r in g.refs)]
        maps = plan.groups[gname].A
        ch = changed_slots(maps)
        ref = built.get_submodule(path)
        assert torch.equal(bn.running_mean[~ch], ref.running_mean[~ch]), path
        assert torch.equal(bn.running_var[~ch], ref.running_var[~ch]), path
        assert torch.equal(bn.weight, ref.weight) and torch.equal(bn.bias, ref.bias)
        if not bool(ch.any()):
            continue
        n_changed += int(ch.sum())
        m_b = sum(a @ mi[path][0] for a, mi in zip(maps, member_in))
        v_b = sum(a @ mi[path][1] for a, mi in zip(maps, member_in))
        mu_f, v_f = fused_in[path]
        torch.testing.assert_close(bn.running_mean[ch], (ref.running_mean + mu_f - m_b)[ch], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(bn.running_var[ch], (ref.running_var * v_f / v_b)[ch], rtol=1e-9, atol=1e-9)
        # recalibration did something (after the first layer, which is linear in the shared input, only the variance
        # moves: the fused mean is exactly the combination of the members')
        assert not torch.allclose(bn.running_var[ch], ref.running_var[ch], rtol=1e-6, atol=0), path
    return n_changed


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_branch_slots_keep_member_statistics_shared_slots_follow_the_rule(arch, alpha):
    members = _members(arch)
    data = _data(arch)
    fused = pyfusion.fuse(members, data, method="partial", alpha=alpha, fast_modules=False)
    built = pyfusion.fuse(members, data, method="partial", alpha=alpha, fast_modules=False, reset_bn=False)
    n_changed = _check_rule(members, fused, built, data)
    assert n_changed > 0
    assert sum(fused.fusion_info["bn_kept"].values()) > 0 if alpha > 0 else True
    assert fused.fusion_info["bn_reset_samples"] == 36


@pytest.mark.parametrize("method,opts", [("ot", {"masses": "l2"}), ("ot", {"cost": "weights", "reg": 0.05}),
                                         ("cluster", {"width": 1.5, "n_restarts": 5})])  # fmt: skip
def test_soft_maps_and_clusters_follow_the_rule(method, opts):
    """OT's soft slots are changed even for one member's neurons (barycentres); singleton clusters are kept."""
    members = _members("vgg")
    data = _data("vgg")
    fused = pyfusion.fuse(members, data, method=method, fast_modules=False, **opts)
    built = pyfusion.fuse(members, data, method=method, fast_modules=False, reset_bn=False, **opts)
    assert _check_rule(members, fused, built, data) > 0
    if method == "cluster":
        assert sum(fused.fusion_info["bn_kept"].values()) > 0  # singleton clusters: one member's neuron, kept


def test_consistent_members_give_the_fused_networks_data_statistics():
    """Members whose running statistics are their eval-mode data statistics: the changed slots get exactly the
    fused network's own data statistics (the plain reset, in eval mode)."""
    members = _members("vgg")
    data = _data("vgg")
    for m in members:  # make each member's statistics describe the data, layer by layer in forward order
        for path, bn in m.named_modules():
            if isinstance(bn, BN):
                mean, var = _bn_inputs(m, data)[path]
                with torch.no_grad():
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
    fused = pyfusion.fuse(members, data, method="partial", alpha=0.5, fast_modules=False)
    graph = trace_groups(members[0])
    got = _bn_inputs(fused, data)
    for path, bn in fused.named_modules():
        if isinstance(bn, BN):
            (gname,) = [n for n, g in graph.groups.items() if any(r.module == path for r in g.per_neuron)]
            ch = changed_slots(fused.fusion_plan.groups[gname].A)
            torch.testing.assert_close(bn.running_mean[ch], got[path][0][ch], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(bn.running_var[ch], got[path][1][ch], rtol=1e-9, atol=1e-9)


def test_changed_slots_rule():
    one, half = torch.eye(3, dtype=torch.float64), 0.5 * torch.eye(3, dtype=torch.float64)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert not changed_slots([one, zero]).any()  # lambda one-hot: member 0's neurons
    assert changed_slots([half, half]).all()  # shared
    assert changed_slots([half, zero]).all()  # coefficient 0.5: a changed neuron
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert changed_slots([soft, zero]).tolist() == [True, False, False]
    two = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # a cluster of two, a singleton
    assert changed_slots([two, torch.zeros(2, 3, dtype=torch.float64)]).tolist() == [True, False]


def test_reset_all_and_bad_values():
    members = _members("vgg")
    data = _data("vgg")
    full = pyfusion.fuse(members, data, method="partial", alpha=1.0, reset_bn="all").eval()
    assert full.fusion_info["bn_reset"] == "all" and full.fusion_info["bn_reset_samples"] == 36
    x = _x("vgg")
    with torch.no_grad():  # the plain reset moves even the branch slots: alpha = 1 is no longer the ensemble
        assert (full(x) - 0.5 * members[0](x) - 0.5 * members[1](x)).abs().max() > 1e-3
    for bad in ("changed", 2, "ALL"):
        with pytest.raises(ValueError, match="reset_bn must be None, True, False or 'all'"):
            pyfusion.fuse(members, data, method="partial", alpha=0.5, reset_bn=bad)
    with pytest.raises(ValueError, match="reset_bn='all' needs calibration data"):
        pyfusion.fuse(members, method="partial", alpha=0.5, reset_bn="all")


def test_max_batches_reads_the_same_batches_in_every_pass():
    """bn_batches: the members and every fused pass read the same first batches (a shuffling loader would
    otherwise compare different samples): the permuted copy is still given back."""
    (m,) = _members("resnet", k=1)
    copy = permuted_copy(m, torch.Generator().manual_seed(8)).double()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 3, 8, 8, dtype=torch.float64)),
                                         batch_size=8, shuffle=True)  # fmt: skip
    fused = pyfusion.fuse([m, copy], loader, method="weight_matching", bn_batches=2).eval()
    assert fused.fusion_info["bn_reset_samples"] == 16
    x = _x("resnet")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_one_pass_equals_a_pass_per_batchnorm(arch, alpha, monkeypatch):
    """All calibration samples as one batch, each BatchNorm recalibrated by its pre-hook before it runs: the
    statistics of one pass per BatchNorm that stops at it (forced by a zero memory budget), in one pass."""
    from pyfusion.fuse import bn as bn_mod

    members, data = _members(arch), _data(arch)
    one = pyfusion.fuse(members, data, method="partial", alpha=alpha, fast_modules=False)
    monkeypatch.setattr(bn_mod, "ONE_PASS_BYTES", 0)
    per_bn = pyfusion.fuse(members, data, method="partial", alpha=alpha, fast_modules=False)
    assert one.fusion_info["bn_passes"] == 1 and per_bn.fusion_info["bn_passes"] > 1
    stats = [(k, v) for k, v in one.state_dict().items() if k.endswith(("running_mean", "running_var"))]
    assert stats
    other = per_bn.state_dict()
    for k, v in stats:
        torch.testing.assert_close(v, other[k], rtol=1e-10, atol=1e-12, msg=k)


class _SharedBN(nn.Module):
    """One BatchNorm module applied at two places: no single pre-hook call sees all its inputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.head(torch.relu(self.bn(self.c2(h))).mean((2, 3)))


def test_a_batchnorm_called_twice_takes_the_per_batchnorm_passes(monkeypatch):
    from pyfusion.fuse import bn as bn_mod

    one_batch = bn_mod._one_batch

    def refuse(*args, **kwargs):
        whole = one_batch(*args, **kwargs)
        assert whole is None, "a BatchNorm applied twice must not be recalibrated by one pre-hook call"
        return whole

    monkeypatch.setattr(bn_mod, "_one_batch", refuse)
    members = [randomize_batchnorm(_SharedBN()).double().eval() for _ in range(2)]
    fused = pyfusion.fuse(members, _data("vgg"), method="partial", alpha=0.0, fast_modules=False)
    assert fused.fusion_info["bn_recalibrated"]["bn"] > 0 and fused.fusion_info["bn_passes"] == 1


class _SeqFirst(nn.Module):
    """Inputs (T, N, C) through a sequence-first encoder layer, then a BatchNorm over the channels."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=False)
        self.fc, self.bn, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.enc(self.inp(x)).mean(0)
        return self.head(torch.relu(self.bn(self.fc(h))))


def test_sequence_first_models_take_the_per_batchnorm_passes(monkeypatch):
    """Batches joined on dim 0 would be longer sequences, not more samples: the one pass is not used."""
    from pyfusion.fuse import bn as bn_mod

    monkeypatch.setattr(bn_mod, "_one_batch", lambda *a, **k: pytest.fail("one pass on a sequence-first model"))
    members = [randomize_batchnorm(_SeqFirst()).double().eval() for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(5, 6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    fused = pyfusion.fuse(members, data, method="partial", alpha=0.0, fast_modules=False)
    assert fused.fusion_info["bn_recalibrated"]["bn"] > 0
