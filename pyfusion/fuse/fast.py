"""Swap the dense layers of a partially fused network for the block-sparse execution modules (DESIGN §7).

The builder returns plain ``nn.Linear`` / ``nn.Conv2d`` layers whose weights are zero outside the blocks the
layouts allow. :func:`swap_partial_modules` replaces every such layer whose input and output groups both have
branch segments (the layers with zero blocks to skip) by :class:`pyfusion.nn.PartialLinear` /
:class:`pyfusion.nn.PartialConv2d` (``from_dense``, which checks that the skipped blocks are exactly zero), so the
network runs at a cost proportional to its effective FLOPs. The other layers (full fusion, the first layer on the
shared input, the head writing shared logits) stay dense: they cost the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pyfusion.nn import PartialConv2d, PartialLinear, replace_
from pyfusion.ops.partial_linear import ACTIVATIONS

__all__ = ["swap_partial_modules", "module_layouts"]


def _full(layout: Sequence[int] | None, size: int, k: int) -> tuple[int, ...]:
    return (size,) + (0,) * k if layout is None else tuple(int(x) for x in layout)


def module_layouts(
    model: nn.Module, layouts: Mapping[str, Mapping[str, object]], path: str, num_members: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(in_layout, out_layout) in features / channels of the Linear / Conv2d at ``path``, or None if not recorded.

    A network input (no input group) is all "shared" input, a network output (no output group, e.g. the logits)
    all "shared" output; a flatten consumer (``in_expand`` = e positions per channel) scales the input segments
    by e (channel-major flatten keeps the segments contiguous).
    """
    entry = layouts.get(path)
    mod = model.get_submodule(path)
    if entry is None:
        return None
    if isinstance(mod, nn.Linear):
        n_in, n_out = mod.in_features, mod.out_features
    else:
        n_in, n_out = mod.in_channels, mod.out_channels
    e = int(entry.get("in_expand", 1) or 1)
    lin = entry.get("in")
    il = _full(None, n_in, num_members) if lin is None else tuple(int(x) * e for x in lin)  # type: ignore[union-attr]
    ol = _full(entry.get("out"), n_out, num_members)  # type: ignore[arg-type]
    if sum(il) != n_in or sum(ol) != n_out:
        return None
    return il, ol


def _pack(mod: nn.Linear | nn.Conv2d, il: Sequence[int], ol: Sequence[int], path: str) -> nn.Module:
    """The execution module of a dense layer, its blocks sliced straight from the weight (one pass; the generic
    ``from_dense`` packs a convolution tap by tap, 5x slower on VGG11 layers). The skipped blocks are checked to
    be exactly zero, as ``from_dense`` does."""
    w = mod.weight.detach()
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(mod, nn.Linear):
        new = torch.nn.utils.skip_init(PartialLinear, il, ol, bias=mod.bias is not None, **kw)
    else:
        new = torch.nn.utils.skip_init(
            PartialConv2d, il, ol, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
            bias=mod.bias is not None, **kw,
        )  # fmt: skip
    ro = [0]
    co = [0]
    for i, o in zip(il, ol):
        co.append(co[-1] + i)
        ro.append(ro[-1] + o)
    k_all = len(ol) - 1
    for a in range(1, k_all + 1):
        for b in range(1, k_all + 1):
            if a != b:
                blk = w[ro[a] : ro[a + 1], co[b] : co[b + 1]]
                if blk.numel() and bool(blk.any()):
                    raise ValueError(
                        f"{path}: weight block (output branch {a}, input branch {b}) must be exactly zero for the "
                        f"layouts in={list(il)}, out={list(ol)}; it has {int(blk.count_nonzero())} non-zero entries"
                    )
    with torch.no_grad():
        new.weight_shared.copy_(w[: ol[0]].reshape(new.weight_shared.shape))
        new.weight_cross.copy_(w[ol[0] :, : il[0]].reshape(new.weight_cross.shape))
        # each diagonal block straight into its slice of weight_diag (a torch.cat first would copy it twice)
        flat = new.weight_diag.view(-1)
        pos = 0
        for k in range(1, k_all + 1):
            blk = w[ro[k] : ro[k + 1], co[k] : co[k + 1]]
            flat[pos : pos + blk.numel()].view(blk.shape).copy_(blk)
            pos += blk.numel()
        if mod.bias is not None:
            new.bias.copy_(mod.bias.detach())
        # skip_init leaves buffers uninitialised: the layout / activation buffers are set as _register_layout does
        new.layout.copy_(torch.tensor([list(il), list(ol)], dtype=torch.int64))
        new.activation_id.fill_(ACTIVATIONS.index(new.activation))
    return new


def swap_partial_modules(model: nn.Module, num_members: int) -> list[str]:
    """Replace (in place) the layers with branch segments by PartialLinear / PartialConv2d.

    Args:
        model: a built fused network with ``fusion_module_layouts`` (see :func:`pyfusion.fuse.build`).
        num_members: K.

    Returns:
        The module paths that were swapped: the layers with branch segments on both their input and output (the
        others have no zero block, so the dense layer costs the same). Convolutions with groups != 1, non-zero
        padding modes or string padding stay dense.
    """
    layouts = getattr(model, "fusion_module_layouts", None) or {}
    swapped: list[str] = []

    def select(mod: nn.Module, fqn: str) -> bool:
        if type(mod) not in (nn.Linear, nn.Conv2d):
            return False
        if isinstance(mod, nn.Conv2d) and (
            mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)
        ):
            return False
        lay = module_layouts(model, layouts, fqn, num_members)
        # Zero blocks (output branch a, input branch b != a) exist only when both sides have branch segments; a layer
        # reading the shared network input or writing the shared logits has none to skip and stays dense (its
        # PartialLinear / PartialConv2d would cost the same, and code such as Hugging Face ViT's forward reads the
        # patch projection's ``.weight``, which the execution modules do not have).
        return lay is not None and sum(lay[0][1:]) > 0 and sum(lay[1][1:]) > 0

    def make(mod: nn.Module, fqn: str) -> nn.Module:
        il, ol = module_layouts(model, layouts, fqn, num_members)  # type: ignore[misc]
        swapped.append(fqn)
        new = _pack(mod, il, ol, fqn)
        new.train(mod.training)
        for p_new, p_old in zip(new.parameters(), mod.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new

    replace_(model, make, select)
    return swapped
