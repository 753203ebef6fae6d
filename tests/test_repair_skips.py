"""REPAIR says which layers it leaves uncorrected and why (a warning and ``fusion_info["repair"]["skipped"]``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion.fuse.repair import RepairSkippedWarning
from pyfusion.graph import trace_groups
from pyfusion.stats.groups import group_statistics


def _mixed():
    """Hidden layer 0 with a bias (repairable), hidden layer 2 without (its mean cannot be moved)."""
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)).double()


def test_layers_without_bias_are_reported_not_silently_skipped():
    torch.manual_seed(0)
    members = [_mixed() for _ in range(2)]
    data = [torch.randn(32, 6, dtype=torch.float64) for _ in range(2)]
    graph = trace_groups(members[0])
    first, second = list(graph.groups)
    with pytest.warns(RepairSkippedWarning) as rec:
        fused = pyfusion.fuse(members, data, method="weight_matching", repair=True)
    msg = str(rec[0].message)
    assert f"corrected 1 of 2 neuron groups and skipped 1: {second} (2): Linear without bias" in msg
    assert "the mean cannot be moved" in msg
    rep = fused.fusion_info["repair"]
    assert rep["repaired"] == [first]
    assert rep["skipped"] == {
        second: {
            "modules": ["2"],
            "reason": "Linear without bias and no BatchNorm / LayerNorm after it: the mean cannot be moved",
        }
    }
    # the repaired group does reach its target, the skipped one is left as built
    from pyfusion.fuse.repair import repair_targets

    t_mu, t_sd = repair_targets(members, graph, fused.fusion_plan, data)[first]
    st = group_statistics([fused], graph, data, point="pre")[first]
    torch.testing.assert_close(st.mean(0), t_mu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st.var(0).sqrt(), t_sd, rtol=1e-9, atol=1e-9)
    plain = pyfusion.fuse(members, data, method="weight_matching")
    torch.testing.assert_close(fused[2].weight, plain[2].weight, rtol=0, atol=0)


def test_all_layers_repairable_gives_no_warning():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double() for _ in range(2)]
    data = [torch.randn(32, 6, dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepairSkippedWarning)
        fused = pyfusion.fuse(members, data, method="weight_matching", repair=True)
    assert fused.fusion_info["repair"]["skipped"] == {}


def test_batchnorm_without_affine_is_reported():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 16, 3),
    ).double().eval()  # fmt: skip
    members = [make() for _ in range(2)]
    data = [torch.randn(8, 2, 4, 4, dtype=torch.float64)]
    with pytest.warns(RepairSkippedWarning, match=r"\(1\): BatchNorm2d without affine weight and bias"):
        fused = pyfusion.fuse(members, data, method="weight_matching", repair=True, reset_bn=False)
    (entry,) = fused.fusion_info["repair"]["skipped"].values()
    assert entry["modules"] == ["1"]
