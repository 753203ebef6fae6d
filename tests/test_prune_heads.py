"""Pruning attention to a single head: the re-trace of the fused model cannot see head structure in one head, and
the width check must not call that a mismatch (it refused ViT at small widths)."""

import pytest
import torch
from _ir_families import randomize
from _ir_models import hf_models

import pyfusion

HF = hf_models()


@pytest.mark.skipif("vit" not in HF, reason="transformers is not installed")
def test_prune_vit_to_one_head_builds_and_runs():
    factory, (x,) = HF["vit"]
    members = [randomize(factory(), 1), randomize(factory(), 2)]
    data = [torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))]
    graph = pyfusion.graph.trace_groups(members[0], data[0])
    heads = {n: g for n, g in graph.groups.items() if g.unit_size > 1}
    assert heads
    fused = pyfusion.fuse(members, data, method="prune", width=0.25, graph=graph, fast_modules=False).eval()
    for name, g in heads.items():
        assert sum(fused.fusion_layouts[name]) == g.unit_size  # one head of the two members' eight
    with torch.no_grad():
        y = fused(x).logits
    assert y.shape == (2, 3) and bool(torch.isfinite(y).all())
