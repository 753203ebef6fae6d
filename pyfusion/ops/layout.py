"""Layouts of partially fused layers and their packed weights (DESIGN §7), shared by ``partial_linear`` and
``partial_conv2d``.

``in_layout = [I_s, I_1, ..., I_K]`` splits the input features (channels) and ``out_layout = [O_s, O_1, ...,
O_K]`` the outputs into ``[shared | branch_1 | ... | branch_K]`` (K >= 1; any size may be 0). Shared outputs
read every input segment; branch k outputs read the shared input and branch k's input only. The dense
equivalent ``W`` (O_total, I_total) is zero elsewhere.

Packed weight (``weight_blocks``, three tensors, only the allowed blocks stored):

* ``w_shared`` (O_s, I_total): the shared output rows, all input columns;
* ``w_cross``  (O_B, I_s), O_B = O_1 + ... + O_K: every branch output row, shared input columns
  (branches stacked in order);
* ``w_diag``   (sum_k O_k * I_k,): branch k's own block ``W[o_k, i_k]`` of shape (O_k, I_k), row-major,
  the K blocks concatenated (one flat buffer; block k starts at ``sum_{j<k} O_j * I_j``).

A convolution stores the same blocks with the kernel taps trailing: (O_s, I_total, kh, kw),
(O_B, I_s, kh, kw) and (sum_k O_k I_k kh kw,).

Effective FLOPs per row: ``2 * (O_s * I_total + O_B * I_s + sum_k O_k * I_k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "block_shapes",
    "pack_partial_weight",
    "partial_linear_flops",
    "partial_linear_params",
    "unpack_partial_weight",
    "validate_layouts",
]

ACTIVATIONS = ("none", "relu", "gelu", "silu")


def validate_layouts(in_layout: Sequence[int], out_layout: Sequence[int]) -> tuple[list[int], list[int]]:
    """Check two layouts ``[shared, branch_1, ..., branch_K]`` and return them as lists of ints.

    Raises:
        ValueError: naming the argument, when a layout has fewer than 2 entries, a negative entry, or the
            two layouts have different numbers of branches.
    """
    il, ol = [int(v) for v in in_layout], [int(v) for v in out_layout]
    for name, lay in (("in_layout", il), ("out_layout", ol)):
        if len(lay) < 2:
            raise ValueError(f"{name} must be [shared, branch_1, ..., branch_K] with K >= 1; got {lay}")
        if any(v < 0 for v in lay):
            raise ValueError(f"{name} sizes must be >= 0; got {lay}")
    if len(il) != len(ol):
        raise ValueError(
            f"in_layout and out_layout must have the same number of branches; got in_layout={il} "
            f"({len(il) - 1} branches) and out_layout={ol} ({len(ol) - 1} branches)"
        )
    return il, ol


def block_shapes(in_layout: Sequence[int], out_layout: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Expected shapes of ``(w_shared, w_cross, w_diag)``."""
    i_s, o_s = in_layout[0], out_layout[0]
    o_b = sum(out_layout[1:])
    n_diag = sum(o * i for o, i in zip(out_layout[1:], in_layout[1:]))
    return (o_s, sum(in_layout)), (o_b, i_s), (n_diag,)


def uniform_branches(in_layout: Sequence[int], out_layout: Sequence[int]) -> bool:
    """Whether every branch has the same input size and the same output size (one batched GEMM / grouped conv)."""
    return len(set(in_layout[1:])) == 1 and len(set(out_layout[1:])) == 1


def partial_linear_params(in_layout: Sequence[int], out_layout: Sequence[int], bias: bool = True) -> int:
    """Number of stored (effective) weights and biases."""
    n = sum(int(torch.Size(s).numel()) for s in block_shapes(in_layout, out_layout))
    return n + (sum(out_layout) if bias else 0)


def partial_linear_flops(in_layout: Sequence[int], out_layout: Sequence[int], rows: int) -> int:
    """Effective multiply-add FLOPs ``2 * rows * (stored weights)`` of one forward (bias/activation ignored)."""
    return 2 * int(rows) * partial_linear_params(in_layout, out_layout, bias=False)


def pack_partial_weight(
    weight: Tensor, in_layout: Sequence[int], out_layout: Sequence[int], *, check_zero: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense (O_total, I_total) weight -> packed ``(w_shared, w_cross, w_diag)`` (copies).

    Raises:
        ValueError: if ``weight`` has the wrong shape, or (``check_zero``) a skipped block (branch k output,
            branch j != k input) holds a non-zero entry.
    """
    il, ol = validate_layouts(in_layout, out_layout)
    if weight.dim() != 2 or tuple(weight.shape) != (sum(ol), sum(il)):
        raise ValueError(
            f"weight must have shape (sum(out_layout), sum(in_layout)) = {(sum(ol), sum(il))}; "
            f"got {tuple(weight.shape)}"
        )
    io = [0]
    oo = [0]
    for i, o in zip(il, ol):
        io.append(io[-1] + i)
        oo.append(oo[-1] + o)
    if check_zero:
        for k in range(1, len(ol)):
            for j in range(1, len(il)):
                if j == k:
                    continue
                blk = weight[oo[k] : oo[k + 1], io[j] : io[j + 1]]
                if blk.numel() and bool((blk != 0).any()):
                    nz = int((blk != 0).sum())
                    raise ValueError(
                        f"weight block (output branch {k}, input branch {j}) = weight[{oo[k]}:{oo[k + 1]}, "
                        f"{io[j]}:{io[j + 1]}] must be zero for this layout (branches read only shared and "
                        f"their own inputs); it has {nz} non-zero entries (max |w| = {blk.abs().max().item():.3g})"
                    )
    w_shared = weight[: oo[1]].clone().contiguous()
    w_cross = weight[oo[1] :, : io[1]].clone().contiguous()
    diag = [weight[oo[k] : oo[k + 1], io[k] : io[k + 1]].reshape(-1) for k in range(1, len(ol))]
    w_diag = torch.cat(diag) if diag else weight.new_zeros(0)
    return w_shared, w_cross, w_diag.contiguous()


def unpack_partial_weight(
    w_shared: Tensor, w_cross: Tensor, w_diag: Tensor, in_layout: Sequence[int], out_layout: Sequence[int]
) -> Tensor:
    """Packed blocks -> the dense (O_total, I_total) weight with zero blocks (differentiable)."""
    il, ol = validate_layouts(in_layout, out_layout)
    i_s = il[0]
    rows = [w_shared]
    d = 0
    i_tot = sum(il)
    for k in range(1, len(ol)):
        o_k, i_k = ol[k], il[k]
        before = sum(il[1:k])
        after = i_tot - i_s - before - i_k
        c0 = sum(ol[1:k])
        blk = w_diag[d : d + o_k * i_k].reshape(o_k, i_k)
        d += o_k * i_k
        rows.append(
            torch.cat(
                [w_cross[c0 : c0 + o_k], w_shared.new_zeros(o_k, before), blk, w_shared.new_zeros(o_k, after)],
                dim=1,
            )
        )
    return torch.cat(rows, dim=0)
