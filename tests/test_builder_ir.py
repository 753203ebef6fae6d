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


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", list(OLD))
def test_old_families_permuted_copy_and_ensemble(family):
    factory, x = OLD[family]
    a, b = randomize(factory(), 1), randomize(factory(), 2)
    graph, _ = check_permuted_copy(a, x)
    assert graph.is_simple  # MLP / VGG / ResNet groups keep the legacy layout
    check_ensemble([a, b], x, graph)
