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


# the one pass and its fallback (pyfusion.fuse.repair module docstring, "Cost") ---------------------------------------


def _both_ways(members, data, monkeypatch, **kw):
    """The fusion with REPAIR, and again with the per-group passes forced (ONE_PASS_BYTES = 0)."""
    from pyfusion.fuse import repair as repair_mod

    one = pyfusion.fuse(members, data, repair=True, fast_modules=False, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(repair_mod, "ONE_PASS_BYTES", 0)
        per_group = pyfusion.fuse(members, data, repair=True, fast_modules=False, **kw)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(v, per_group.state_dict()[k], rtol=1e-10, atol=1e-12, msg=k)
    return one.fusion_info["repair"], per_group.fusion_info["repair"]


class _Twice(nn.Module):
    """fc1 applied twice: its group's statistics stack both calls, which no single hook call sees."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x)))))


def test_a_module_run_twice_takes_the_per_group_passes(monkeypatch):
    from pyfusion.graph import declare_groups

    torch.manual_seed(0)
    members = [_Twice().double() for _ in range(2)]
    spec = {"h": {"producers": ["fc1.weight", "fc1.bias"], "consumers": [("fc1.weight", 1), ("fc2.weight", 1)],
                  "pre_points": ["fc1"]}}  # fmt: skip
    graph = declare_groups(members[0], spec, verify=False)  # (not a symmetry: fc1's first input is not permuted)
    data = [torch.randn(16, 6, dtype=torch.float64) for _ in range(2)]
    info, per_group = _both_ways(members, data, monkeypatch, method="weight_matching", graph=graph)
    assert info["repaired"] == ["h"] and info["passes"] == 2  # the attempt, then one pass for the group
    assert info["one_pass_refused"] == "fc1 runs more than once per forward or out of the groups' order"


def test_groups_declared_out_of_forward_order_take_the_per_group_passes(monkeypatch):
    """Groups are corrected in the graph's order; a hook that fires before the group due is refused (the weights
    are restored) and the per-group passes run in the graph's order."""
    from pyfusion.graph import declare_groups

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
               for _ in range(2)]  # fmt: skip
    spec = {
        "b": {"producers": ["2.weight", "2.bias"], "consumers": ["4.weight"], "pre_points": ["2"]},
        "a": {"producers": ["0.weight", "0.bias"], "consumers": ["2.weight"], "pre_points": ["0"]},
    }
    graph = declare_groups(members[0], spec)
    data = [torch.randn(16, 6, dtype=torch.float64) for _ in range(2)]
    info, per_group = _both_ways(members, data, monkeypatch, method="weight_matching", graph=graph)
    assert info["repaired"] == ["b", "a"] and info["passes"] == 3
    assert info["one_pass_refused"] == "0 runs more than once per forward or out of the groups' order"


def test_batches_of_different_shapes_take_the_per_group_passes(monkeypatch):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(5, 3),
    ).double()  # fmt: skip
    members = [make() for _ in range(2)]
    data = [torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randn(8, 2, 5, 5, dtype=torch.float64)]
    info, per_group = _both_ways(members, data, monkeypatch, method="weight_matching")
    assert info["repaired"] == per_group["repaired"] and len(info["repaired"]) == 2
    assert info["passes"] == 2 and info["one_pass_refused"].startswith("the calibration inputs are not tensors")
    # one shape: one pass
    info, _ = _both_ways(members, [data[0], data[0] + 1], monkeypatch, method="weight_matching")
    assert info["passes"] == 1 and "one_pass_refused" not in info


def test_several_processes_take_the_per_group_passes(monkeypatch):
    """With torch.distributed every rank runs its own shard and the statistics are all-reduced per group, so each
    group takes its pass (tests/test_distributed.py checks the ranks against one process on the union)."""
    from pyfusion.fuse import repair as repair_mod

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
               for _ in range(2)]  # fmt: skip
    data = [torch.randn(16, 6, dtype=torch.float64)]
    monkeypatch.setattr(repair_mod, "current_group", lambda: ("a group", 2))  # (the statistics stay local)
    fused = pyfusion.fuse(members, data, method="weight_matching", repair=True)
    info = fused.fusion_info["repair"]
    assert info["passes"] == 2 and info["one_pass_refused"] == "several processes (torch.distributed)"


class _SeqFirst(nn.Module):
    """A sequence-first transformer layer (inputs (T, N, 5)): joining batches along dim 0 makes longer sequences
    (the one pass gave weights 1e-2 away from the per-group passes before it refused such models)."""

    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=24, dropout=0.0, batch_first=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(self.inp(x))[0])


def test_a_sequence_first_model_takes_the_per_group_passes(monkeypatch):
    from pyfusion.graph import trace_groups

    torch.manual_seed(0)
    members = [_SeqFirst().double().eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(6, 4, 5, dtype=torch.float64, generator=g) for _ in range(3)]
    graph = trace_groups(members[0], data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepairSkippedWarning)  # the residual stream, the heads
        info, _ = _both_ways(members, data, monkeypatch, method="partial", alpha=0.5, graph=graph)
    assert info["repaired"] and info["passes"] == len(info["repaired"])
    assert info["one_pass_refused"] == "layer.self_attn has batch_first=False: dim 0 of the inputs is not the samples"
