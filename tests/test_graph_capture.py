"""Statistics capture from the exported graph: immune to in-place ops, per member, any batch shape."""

from __future__ import annotations

import copy

import pytest
import torch
from _ir_models import CatNet, ConvLast
from torch import nn

from pyfusion import models
from pyfusion.graph import declare_groups, trace_groups
from pyfusion.stats.groups import group_statistics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mean(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim]).double().mean(0)


def test_pre_statistics_under_in_place_relu_are_pre_activation_values():
    """``nn.ReLU(inplace=True)`` overwrites the Linear's output; the exported graph's tap cloned it before."""
    torch.manual_seed(0)
    members = [CatNet().eval(), CatNet().eval()]
    graph = trace_groups(members[0], torch.randn(3, 5, 6))
    data = [torch.randn(4, 5, 6) for _ in range(3)] + [torch.randn(2, 5, 6)]  # a last, smaller batch: re-exported
    name = next(n for n, g in graph.groups.items() if g.producers[0].module == "a")
    pre = group_statistics(members, graph, data, point="pre", groups=[name])[name]
    post = group_statistics(members, graph, data, point="post", groups=[name])[name]
    for k, m in enumerate(members):
        with torch.no_grad():
            z = torch.cat([m.a(x).reshape(-1, 8) for x in data])
        torch.testing.assert_close(pre.mean(k), z.double().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(post.mean(k), z.relu().double().mean(0), rtol=1e-5, atol=1e-6)
        assert bool((pre.mean(k) < 0).any())  # real pre-activations: a post-ReLU mean is never negative


def test_functional_in_place_relu_after_batchnorm():
    torch.manual_seed(1)
    members = [ConvLast().eval(), ConvLast().eval()]
    for m in members:
        with torch.no_grad():
            m.bn.running_mean.normal_()
    graph = trace_groups(members[0], torch.randn(2, 2, 4, 4))
    g = next(g for g in graph.groups.values() if g.producers[0].module == "c1")
    assert g.pre_points == ["bn"]
    data = [torch.randn(3, 2, 4, 4) for _ in range(2)]
    st = group_statistics(members, graph, data, point="pre", groups=[g.name])[g.name]
    for k, m in enumerate(members):
        with torch.no_grad():
            bn = torch.cat([m.bn(m.c1(x)) for x in data])
        torch.testing.assert_close(st.mean(k), _mean(bn, 1), rtol=1e-5, atol=1e-6)


def test_hooked_points_of_declared_groups_are_cloned():
    """Without a traced graph the module outputs are hooked; an in-place ReLU after them must not leak in."""
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).eval()
    graph = declare_groups(
        net, {"h": {"producers": ["0.weight", "0.bias"], "consumers": ["2.weight"], "pre_points": ["0"]}}
    )
    assert graph.traced is None
    data = [torch.randn(8, 5) for _ in range(2)]
    st = group_statistics([net, copy.deepcopy(net)], graph, data, point="pre")["h"]
    with torch.no_grad():
        z = torch.cat([net[0](x) for x in data])
    torch.testing.assert_close(st.mean(0), z.double().mean(0), rtol=1e-5, atol=1e-6)


def test_members_use_their_own_weights_and_are_not_modified():
    torch.manual_seed(2)
    a, b = models.mlp([6, 5, 3]), models.mlp([6, 5, 3])
    graph = trace_groups(a)
    snap = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    data = [torch.randn(4, 6)]
    st = next(iter(group_statistics([a, b], graph, data, point="pre").values()))
    with torch.no_grad():
        for k, m in enumerate((a, b)):
            torch.testing.assert_close(st.mean(k), m[1](data[0]).double().mean(0), rtol=1e-5, atol=1e-6)
    for m, s in zip((a, b), snap):
        assert all(torch.equal(v, m.state_dict()[key]) for key, v in s.items())
