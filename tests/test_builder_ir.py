"""The builder on the IR (notes/IR.md §4): permuted copies come back, the ensemble plan is the ensemble."""

from __future__ import annotations

import pytest
import torch
from _ir_families import check_ensemble, check_permuted_copy, randomize

from pyfusion import models

OLD = {
    "mlp": (lambda: models.mlp([7, 6, 5, 3]), (torch.randn(3, 7, dtype=torch.float64),)),
    "vgg_bn": (
        lambda: models.vgg((4, "M", 6, "M"), in_channels=2, image_size=8, hidden=5),
        (torch.randn(3, 2, 8, 8, dtype=torch.float64),),
    ),
    "resnet": (lambda: models.resnet20(1, blocks=1), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)),
    "bottleneck": (lambda: models.bottleneck_resnet(), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("family", list(OLD))
def test_old_families_permuted_copy_and_ensemble(family):
    factory, x = OLD[family]
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph, _ = check_permuted_copy(a, x)
    assert graph.is_simple  # MLP / VGG / ResNet groups keep the legacy layout
    check_ensemble([a, b], x, graph)


def test_plans_for_head_groups_must_move_whole_heads():
    """A permutation that moves inner dims across heads (or ties q/k and v/o heads differently) is refused."""
    from _ir_models import MHANet

    from pyfusion.fuse.plan import Plan
    from pyfusion.graph import trace_groups

    m = randomize(MHANet(), 1)
    x = (torch.randn(2, 5, 5, dtype=torch.float64),)
    graph = trace_groups(m, x)
    qk = next(g for g in graph.groups.values() if g.unit_size > 1)
    vo = next(g for g in graph.groups.values() if g.tie == qk.tie and g is not qk)
    good = qk.neuron_permutation(torch.tensor([1, 0, 3, 2]), torch.stack([torch.randperm(4) for _ in range(4)]))
    ok = Plan.from_permutations(
        graph,
        {
            qk.name: [torch.arange(16), good],
            vo.name: [torch.arange(16), vo.neuron_permutation(torch.tensor([1, 0, 3, 2]))],
        },
        (0.5, 0.5),
    )
    ok.validate(graph)
    across = torch.arange(16)
    across[[3, 4]] = across[[4, 3]]  # swaps an inner dim of head 0 with one of head 1
    with pytest.raises(ValueError, match="must map whole units"):
        Plan.from_permutations(graph, {qk.name: [torch.arange(16), across]}, (0.5, 0.5)).validate(graph)
    with pytest.raises(ValueError, match="need the same unit-level map"):
        Plan.from_permutations(graph, {qk.name: [torch.arange(16), good]}, (0.5, 0.5)).validate(graph)
