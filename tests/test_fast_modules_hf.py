"""``fast_modules=True`` on a Hugging Face ViT: the swap must keep the model runnable and equal to the dense one.

HF ``ViTModel.forward`` reads ``embeddings.patch_embeddings.projection.weight.dtype``; the patch projection reads
the network input (all shared), so it has no zero block to skip and must stay a plain ``nn.Conv2d`` (swapping it
for a ``PartialConv2d``, which has no ``weight``, broke the forward with an AttributeError). Only layers with a
zero block, i.e. branch segments on both their input and output, are swapped.
"""

from __future__ import annotations

import pytest
import torch
from _ir_families import randomize
from _ir_models import hf_models

import pyfusion
from pyfusion.nn import PartialConv2d, PartialLinear

HF = hf_models()


@pytest.mark.skipif("vit" not in HF, reason="transformers is not installed")
def test_partial_vit_with_fast_modules_runs_and_equals_dense():
    factory, (x,) = HF["vit"]
    torch.manual_seed(0)
    members = [randomize(factory(), 1), randomize(factory(), 2)]
    data = [torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))]
    kw = {"method": "partial", "alpha": 0.5, "reset_bn": False}
    dense = pyfusion.fuse(members, data, fast_modules=False, **kw).eval()
    fast = pyfusion.fuse(members, data, fast_modules="always", **kw).eval()  # tiny layers: skip the cost model
    swapped = fast.fusion_info["fast_modules"]
    assert swapped, "the attention / FFN layers between widened streams have zero blocks and must be swapped"
    assert "vit.embeddings.patch_embeddings.projection" not in swapped
    assert type(fast.vit.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    for path in swapped:
        mod = fast.get_submodule(path)
        assert isinstance(mod, (PartialLinear, PartialConv2d))
        full = (1 << 2) - 1  # a segment read by both members
        assert any(mask != full for _, mask in mod.in_segments), path  # a branch input segment: a zero block
        assert any(mask != full for _, mask in mod.out_segments), path
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, dense(x).logits, rtol=0, atol=1e-12)
    cost_fast, cost_dense = pyfusion.cost(fast, x[:1]), pyfusion.cost(dense, x[:1])
    # the same effective cost whichever modules execute it (pyfusion.cost skips the zero blocks of both)
    assert cost_fast.flops == cost_dense.flops and cost_fast.dense_flops == cost_dense.dense_flops
    assert cost_fast.flops < cost_fast.dense_flops
