"""``pyfusion.cost``: effective parameters and FLOPs of a (partially fused) network, and the dense counts.

One forward pass with hooks on every leaf module (batch of one example) records what each call costs:

* ``PartialLinear`` / ``PartialConv2d`` / ``EnsembleLinear``: only their stored (non-zero) blocks; dense counts
  are those of the equivalent dense layer with zero blocks;
* ``nn.Linear`` / ``nn.Conv2d`` (1x1 shortcut projections included): their full size (effective = dense);
* convolutions multiply by their output positions H' * W' (from the hooked output);
* FLOPs = 2 * multiply-accumulates of these layers (biases, BatchNorm, activations and pooling are not counted
  in FLOPs); parameters count every parameter once (weights, biases, BatchNorm / LayerNorm affine parameters).

A module called several times is counted at every call (FLOPs) but its parameters once. FLOPs are per example
(the input's leading batch dimension is divided out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Cost", "cost"]


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass per example.

    Attributes:
        params: effective parameters (stored non-zero blocks, biases, normalisation parameters).
        flops: effective FLOPs = 2 * MACs of the weight layers' stored blocks.
        dense_params: parameters of the equivalent dense network (zero blocks included).
        dense_flops: FLOPs of the equivalent dense network.
        layers: module path -> (effective params, effective FLOPs, dense params, dense FLOPs) of each weight layer.
    """

    params: int
    flops: int
    dense_params: int
    dense_flops: int
    layers: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"Cost(params={self.params:,} (dense {self.dense_params:,}), "
            f"FLOPs={self.flops:,} (dense {self.dense_flops:,}))"
        )


def _weight_layer_counts(mod: nn.Module, out: Tensor) -> tuple[int, int, int, int] | None:
    """(effective weight params, effective MACs, dense weight params, dense MACs) of one call, per example."""
    from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear

    rows = out.numel() // out.shape[-1] if out.dim() > 0 else 1
    if isinstance(mod, PartialLinear):
        eff = sum(w.numel() for w in mod.weight_blocks)
        dense = mod.in_features * mod.out_features
        return eff, eff * rows, dense, dense * rows
    if isinstance(mod, EnsembleLinear):
        eff = mod.weight.numel()
        dense = sum(mod.in_layout) * sum(mod.out_layout)
        return eff, eff * rows, dense, dense * rows
    if isinstance(mod, PartialConv2d):
        eff = mod.weight_shared.numel() + mod.weight_cross.numel() + mod.weight_diag.numel()
        dense = mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        pos = out.numel() // out.shape[1]
        return eff, eff * pos, dense, dense * pos
    if isinstance(mod, nn.Linear):
        n = mod.weight.numel()
        return n, n * rows, n, n * rows
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        n = mod.weight.numel()
        pos = out.numel() // out.shape[1]
        return n, n * pos, n, n * pos
    return None


def cost(model: nn.Module, example: Tensor | Sequence[int] | torch.Size | Any) -> Cost:
    """Effective and dense parameters / FLOPs of ``model`` for one example.

    Args:
        model: any network (fused or not); not modified (its training mode is restored).
        example: an input tensor (its first dimension is the batch) or an input shape without the batch
            dimension, e.g. ``(3, 32, 32)`` (a float32 zero tensor on the model's device is used).

    Returns:
        :class:`Cost`.

    Raises:
        ValueError: an input shape with non-positive entries, or an input without a batch dimension.
    """
    p0 = next(iter(model.parameters()), None)
    if isinstance(example, Tensor):
        x = example
    else:
        shape = tuple(int(s) for s in example)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"example must be an input tensor or a positive input shape; got {example!r}")
        dev = p0.device if p0 is not None else None
        dt = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
        x = torch.zeros((1, *shape), device=dev, dtype=dt)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"example must have a non-empty batch dimension; got shape {tuple(x.shape)}")
    batch = int(x.shape[0])
    layers: dict[str, list[int]] = {}
    handles = []
    owners: dict[nn.Module, str] = {}
    for path, mod in model.named_modules():
        owners.setdefault(mod, path)

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, Tensor):
            return
        counts = _weight_layer_counts(mod, out)
        if counts is None:
            return
        path = owners[mod]
        e_p, e_m, d_p, d_m = counts
        entry = layers.setdefault(path, [e_p, 0, d_p, 0])
        entry[1] += e_m // batch
        entry[3] += d_m // batch

    from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, PartialLinear, PartialConv2d, EnsembleLinear)
    for mod in owners:
        if isinstance(mod, kinds):
            handles.append(mod.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    # Parameters: every parameter once; weight layers contribute effective vs dense weights, the rest in full.
    weight_params_eff = sum(v[0] for v in layers.values())
    weight_params_dense = sum(v[2] for v in layers.values())
    weight_tensors = 0
    for path in layers:
        mod = model.get_submodule(path)
        if isinstance(mod, (PartialLinear, PartialConv2d)):
            weight_tensors += sum(w.numel() for w in (mod.weight_shared, mod.weight_cross, mod.weight_diag))
        else:
            weight_tensors += mod.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    other = total - weight_tensors  # biases, normalisation parameters, layers never called
    out = {k: (v[0], 2 * v[1], v[2], 2 * v[3]) for k, v in layers.items()}
    return Cost(
        params=weight_params_eff + other,
        flops=sum(v[1] for v in out.values()),
        dense_params=weight_params_dense + other,
        dense_flops=sum(v[3] for v in out.values()),
        layers=out,
    )
