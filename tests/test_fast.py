"""pyfusion.fuse.fast: the swap decisions (cost model, ``always``, the reasons layers stay dense), tied weights, the
encoder layers' fused fast path, and the argument check of ``fuse(fast_modules=...)``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.fuse.fast import _no_fused_fast_path, predict_time, swap_partial_modules
from pyfusion.nn import PartialLinear
from pyfusion.ops.layout import segment_plan, segments_from_layout


def _plan(n: int, k: int, alpha: float):
    b = round(alpha * n)
    segs = segments_from_layout([n - b] + [b] * k)
    return segment_plan(segs, segs)


def test_cost_model_prefers_partial_on_wide_layers_and_dense_on_tiny_ones():
    """The predictions (arithmetic on the calibrated constants, no timing): a 1024-wide K = 2 layer at alpha 0.5
    skips a third of the dense layer's work and is predicted faster as PartialLinear at 32 and 256 rows; a 10-wide
    one at 256 rows (above the panel engine's crossover: several small GEMMs) is predicted slower than one dense
    GEMM."""
    wide, tiny = _plan(1024, 2, 0.5), _plan(10, 2, 0.5)
    for rows in (32, 256):
        assert predict_time("linear", wide, rows) < predict_time("linear", wide, rows, dense=True)
    assert predict_time("linear", tiny, 256) > predict_time("linear", tiny, 256, dense=True)


def test_decisions_always_and_reasons():
    torch.manual_seed(0)
    members = [models.mlp([6, 10, 8, 3]) for _ in range(2)]
    dense = pyfusion.fuse(members, method="partial", alpha=0.5, fast_modules=False)
    x = torch.randn(7, 6)
    # only the hidden 10 -> 8 layer skips blocks (the first reads the raw input, the last writes every member)
    auto = pyfusion.fuse(members, method="partial", alpha=0.5)
    assert auto.fusion_info["fast_modules"] == ["3"] and isinstance(auto.get_submodule("3"), PartialLinear)
    big_batch = copy.deepcopy(dense)
    decisions: dict[str, str] = {}
    assert swap_partial_modules(big_batch, 2, batch=256, decisions=decisions) == []
    assert decisions["3"].startswith("dense (predicted faster at batch 256")
    assert swap_partial_modules(big_batch, 2, batch=256, always=True) == ["3"]
    for m in (auto, big_batch):
        torch.testing.assert_close(m(x), dense(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fast_modules must be True, False or 'always'"):
        pyfusion.fuse(members, method="partial", alpha=0.5, fast_modules="yes")


def test_tied_weights_stay_dense():
    torch.manual_seed(0)
    members = [models.mlp([6, 10, 8, 8, 3]) for _ in range(2)]
    tied = pyfusion.fuse(members, method="partial", alpha=0.5, fast_modules=False)
    tied.extra = nn.Linear(1, 1)
    tied.extra.weight = tied.get_submodule("3").weight  # another module holds the same parameter
    decisions: dict[str, str] = {}
    swapped = swap_partial_modules(tied, 2, always=True, decisions=decisions)
    assert "tied" in decisions["3"] and isinstance(tied.get_submodule("3"), nn.Linear)
    assert swapped == ["5"]  # the other block-sparse layer is swapped


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_encoder_layer_with_swapped_modules_runs_its_python_path():
    """nn.TransformerEncoderLayer's inference fast path reads linear1.weight directly: after a swap the layer runs
    its Python path (module calls), the same function as the dense layer's fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).eval()
    enc = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=True).eval()
    swapped = copy.deepcopy(enc)
    for lay in swapped.layers:
        for name in ("linear1", "linear2"):
            lin = getattr(lay, name)
            n_in, n_out = lin.in_features, lin.out_features
            setattr(lay, name, PartialLinear.from_dense(lin.weight.detach(), lin.bias.detach(), [n_in, 0], [n_out, 0]))
    _no_fused_fast_path(swapped, ["layers.0.linear1", "layers.1.linear1"])
    assert all(lay.activation_relu_or_gelu is False for lay in swapped.layers) and not swapped.use_nested_tensor
    x = torch.randn(3, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):
            want, got = enc(x, **kw), swapped(x, **kw)
            keep = ~pad if kw else torch.ones(3, 5, dtype=torch.bool)  # padded positions are undefined outputs
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
