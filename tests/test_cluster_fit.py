"""method="cluster_fit": the cluster plan with every slot fitted by least squares (pyfusion.fuse.cluster_fit)."""

from __future__ import annotations

import pytest
import torch
from _trained import trained_mlps
from torch import nn

import pyfusion
from pyfusion.graph import trace_groups
from pyfusion.models import mlp, vgg
from pyfusion.testing import permuted_copy, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _trained_mlps(k: int, seed: int = 0, sizes=(8, 16, 16, 3)) -> tuple[list[nn.Module], torch.Tensor]:
    members, x, _y = trained_mlps(k, seed, sizes)
    return members, x


def _batches(x: torch.Tensor, size: int = 40) -> list[torch.Tensor]:
    return [x[s : s + size] for s in range(0, x.shape[0], size)]


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    return int(pyfusion.cost(model, x[:1]).flops)


def test_the_hidden_layer_is_closer_to_its_cluster_targets_than_the_averaged_one():
    """The first layer's clustered weights already give its slots' mean targets (the layer is linear in the input);
    the second layer reads the same fused inputs in both models, so its least-squares fit (ridge towards the
    clustered weights) can only lower its distance to the slot targets T = sum_k A_k a_k on the fit data."""
    members, x = _trained_mlps(2, seed=3)
    data = _batches(x)
    plain = pyfusion.fuse(members, data, method="cluster", width=0.5, n_restarts=4, fast_modules=False)
    fit = pyfusion.fuse(members, data, method="cluster_fit", width=0.5, n_restarts=4, fast_modules=False)
    assert fit.fusion_weights_fitted and fit.fusion_info["fit"]["fitted"]
    plan = plain.fusion_plan  # the same clustering (same seed and restarts)
    graph = trace_groups(members[0])
    name = next(n for n, g in graph.groups.items() if any(r.module == "3" and r.role == "producer" for r in g.refs))
    a_maps = plan.groups[name].A
    with torch.no_grad():
        target = sum(a.float() @ m[:4](x).T for a, m in zip(a_maps, members)).T
        torch.testing.assert_close(fit[:2](x), plain[:2](x), rtol=1e-4, atol=1e-5)
        d_plain = float(((plain[:4](x) - target) ** 2).mean())
        d_fit = float(((fit[:4](x) - target) ** 2).mean())
    assert d_fit < 0.9 * d_plain
    torch.testing.assert_close(fit.fusion_plan.groups[name].A[0], a_maps[0])  # the fit kept the clustering
    assert _flops(fit, x) == _flops(plain, x)  # ... hence the layout and the cost


def test_a_member_and_its_permuted_copy_at_full_width_is_the_member():
    torch.manual_seed(0)
    m = mlp([10, 12, 12, 4]).eval()
    x = torch.randn(64, 10)
    fused = pyfusion.fuse([m, permuted_copy(m)], _batches(x, 32), method="cluster_fit", width=1.0, n_restarts=8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-4)


def test_conv_batchnorm_fit_beats_the_clustered_model_on_the_ensemble_distance_at_the_same_cost():
    members = []
    for i in range(2):
        torch.manual_seed(i)
        m = vgg(widths=[4, "M", 8, "M"], in_channels=1, num_classes=3, image_size=8, hidden=8)
        randomize_batchnorm(m)
        members.append(m.eval())
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    data = _batches(x, 32)
    plain = pyfusion.fuse(members, data, method="cluster", width=0.75, n_restarts=4)
    fit = pyfusion.fuse(members, data, method="cluster_fit", width=0.75, n_restarts=4)
    assert _flops(fit, x) == _flops(plain, x)
    with torch.no_grad():
        ens = sum(m(x) for m in members) / 2
        d_plain = float(((plain(x) - ens) ** 2).mean())
        d_fit = float(((fit(x) - ens) ** 2).mean())
    assert d_fit < d_plain


def test_options_are_checked_and_data_is_required():
    members, x = _trained_mlps(2)
    with pytest.raises(ValueError, match="output_target"):
        pyfusion.fuse(members, _batches(x), method="cluster_fit", width=0.5, output_target="mean")
    with pytest.raises(ValueError, match="ridge"):
        pyfusion.fuse(members, _batches(x), method="cluster_fit", width=0.5, ridge=-1.0)
    with pytest.raises(ValueError, match="data"):
        pyfusion.fuse(members, None, method="cluster_fit", width=0.5)
