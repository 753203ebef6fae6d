"""Member-mask segments: the one layout of partially fused layers (DESIGN §7), shared by ``partial_linear`` and
``partial_conv2d``, and their packed weight ("segment rows").

**Segments.** The input features (channels) and the output features are each cut into segments
``[(size, member_mask), ...]``: bit k of a segment's mask is set when member k contributes to its slots. The weight
``W' = sum_k A_k W_k B_k`` of a fused layer can be non-zero in block (output segment o, input segment i) only
through a member k in ``mask_o & mask_i``: the block is **stored and computed iff the masks intersect**. Any order
of segments is allowed (blocks are chosen by mask, not by position), and any number of segments per side: a
segment per subset of members for K >= 3 shared slots, per head, per packed q | k | v projection, per
concatenated input, per gap. The standard layout ``[shared | branch_1 | ... | branch_K]`` (sizes
``[S, B_1, ..., B_K]``) is the case of masks ``[all K bits, 1 << 0, ..., 1 << (K-1)]``
(:func:`segments_from_layout`); everywhere a layout of plain ints is accepted it means that.

**Packed weight** (one flat tensor, what :class:`pyfusion.nn.PartialLinear` keeps as its parameter; the storage
format of ``csrc/partial_linear/panel_linear.h``): for each output segment o in order, ``W_o`` of shape
``(O_o, K_o)`` row-major, ``K_o`` = the sum of the sizes of the input segments it reads, whose columns are those
segments' columns concatenated in increasing segment order; the ``W_o`` concatenated (``W_o`` starts at
``offsets[o] = sum_{o' < o} O_o' K_o'``). A convolution stores ``W_o`` as ``(O_o, K_o, kh, kw)``: the same format
with every input size scaled by the taps, so an unfolded (im2col) convolution is the linear layer of the same
buffer. No skipped block is stored: for K >= 3 the 3-buffer format this replaces stored 5-15 % exact zeros.

Effective FLOPs per row: ``2 * sum_o O_o K_o`` (the stored weights).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "check_operands",
    "ACTIVATIONS",
    "MAX_MEMBERS",
    "Segments",
    "SegmentPlan",
    "as_segments",
    "canonical_segments",
    "kernel_segments",
    "layout_of_segments",
    "pack_segment_weight",
    "segment_plan",
    "segments_from_layout",
    "slice_segments",
    "segments_key",
    "standard_masks",
    "unpack_segment_weight",
]

ACTIVATIONS = ("none", "relu", "gelu", "silu")
MAX_MEMBERS = 63  # masks are torch int64 values in the op schema (bit 63 would be the sign)

Segments = tuple[tuple[int, int], ...]


def standard_masks(k: int) -> list[int]:
    """Masks of the layout ``[shared | branch_1 | ... | branch_K]``: ``[2^K - 1, 1, 2, ..., 2^(K-1)]``."""
    return [(1 << k) - 1] + [1 << j for j in range(k)]


def segments_from_layout(layout: Sequence[int]) -> Segments:
    """``[S, B_1, ..., B_K]`` -> ``((S, all), (B_1, 1 << 0), ..., (B_K, 1 << (K-1)))``."""
    sizes = [int(v) for v in layout]
    return tuple(zip(sizes, standard_masks(len(sizes) - 1)))


def layout_of_segments(segments: Segments) -> tuple[int, ...] | None:
    """The standard layout ``(S, B_1, ..., B_K)`` whose segments these are exactly, or None."""
    k = len(segments) - 1
    if k < 1 or [m for _, m in segments] != standard_masks(k):
        return None
    return tuple(s for s, _ in segments)


def as_segments(spec: object, name: str) -> Segments:
    """Normalise a layout argument: a standard layout ``[S, B_1, ..., B_K]`` (ints, K >= 1) or segments
    ``[(size, mask), ...]`` (a ``(S, 2)`` integer tensor too).

    Raises:
        ValueError: naming ``name``: not a sequence, a standard layout with fewer than 2 entries, sizes < 0, masks
            outside ``[1, 2^63)`` on a non-empty segment (a zero mask means no member owns the slots), entries that
            are neither ints nor pairs.
    """
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    if not isinstance(spec, (list, tuple)):
        raise ValueError(
            f"{name} must be a layout [shared, branch_1, ..., branch_K] or segments [(size, member_mask), ...]; "
            f"got {type(spec).__name__}"
        )
    items = list(spec)
    if items and all(isinstance(v, (int,)) or (isinstance(v, Tensor) and v.dim() == 0) for v in items):
        sizes = [int(v) for v in items]
        if len(sizes) < 2:
            raise ValueError(f"{name} must be [shared, branch_1, ..., branch_K] with K >= 1; got {sizes}")
        if any(v < 0 for v in sizes):
            raise ValueError(f"{name} sizes must be >= 0; got {sizes}")
        if len(sizes) - 1 > MAX_MEMBERS:
            raise ValueError(f"{name} has {len(sizes) - 1} branches; at most {MAX_MEMBERS} members are supported")
        return segments_from_layout(sizes)
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{name}[{j}] must be a (size, member_mask) pair; got {item!r}")
        size, mask = int(item[0]), int(item[1])
        if size < 0:
            raise ValueError(f"{name}[{j}]: size must be >= 0; got {size}")
        if mask < 0 or mask >= 1 << MAX_MEMBERS:
            raise ValueError(f"{name}[{j}]: member_mask must be in [0, 2^{MAX_MEMBERS}); got {mask}")
        if size > 0 and mask == 0:
            raise ValueError(f"{name}[{j}]: member_mask is 0 for a segment of {size} slots (no member owns them)")
        out.append((size, mask))
    return tuple(out)


def canonical_segments(segments: Segments) -> Segments:
    """Empty segments dropped and adjacent segments of equal masks merged: the same storage format (the merged
    rows / columns are consecutive in either form), fewer and larger blocks for the kernels."""
    out: list[list[int]] = []
    for size, mask in segments:
        if size == 0:
            continue
        if out and out[-1][1] == mask:
            out[-1][0] += size
        else:
            out.append([size, mask])
    return tuple((s, m) for s, m in out)


def slice_segments(segments: Segments, lo: int, hi: int) -> Segments:
    """The segments of the index range ``[lo, hi)`` of an axis described by ``segments`` (segments cut at the
    range's ends; empty ones dropped): e.g. the q, k or v rows of a packed ``in_proj`` weight.

    Raises:
        ValueError: ``0 <= lo <= hi <= total`` does not hold.
    """
    total = sum(s for s, _ in segments)
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"slice [{lo}, {hi}) must lie inside the {total} indices of the segments")
    out: list[tuple[int, int]] = []
    start = 0
    for size, mask in segments:
        a, b = max(lo, start), min(hi, start + size)
        if b > a:
            out.append((b - a, mask))
        start += size
    return tuple(out)


def segments_key(segments: Segments) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sizes, masks): the op schema's form."""
    return tuple(s for s, _ in segments), tuple(m for _, m in segments)


def kernel_segments(segments: Segments) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sizes, masks) of the canonical segments for the compiled kernels, which need at least one segment per side
    (an empty side becomes one empty segment)."""
    sizes, masks = segments_key(canonical_segments(segments))
    return (sizes, masks) if sizes else ((0,), (1,))


@dataclass(frozen=True, repr=False)
class SegmentPlan:
    """Derived facts of one (in, out) pair of segments; built once per pair (:func:`segment_plan`).

    Attributes:
        in_segments / out_segments: as given (not canonical).
        i_total / o_total: total input / output features.
        in_starts / out_starts: first feature of each segment.
        k_of_out: ``K_o`` per output segment.
        ranges: per output segment, its allowed input column ranges ``(column, length, q)`` with adjacent allowed
            segments merged (q: the range's first column inside ``W_o``).
        offsets: start of ``W_o`` in the packed weight; ``offsets[-1]`` is its size (the stored weights).
        canonical_in / canonical_out: :func:`canonical_segments` of the two sides (what the kernels get).
        standard: the standard layouts ``(in, out)`` when both sides are standard with the same K, else None.
        members: the number of members the masks name (highest bit + 1).
    """

    in_segments: Segments
    out_segments: Segments
    i_total: int
    o_total: int
    in_starts: tuple[int, ...]
    out_starts: tuple[int, ...]
    k_of_out: tuple[int, ...]
    ranges: tuple[tuple[tuple[int, int, int], ...], ...]
    offsets: tuple[int, ...]
    canonical_in: Segments
    canonical_out: Segments
    standard: tuple[tuple[int, ...], tuple[int, ...]] | None
    members: int

    def __repr__(self) -> str:
        return f"SegmentPlan(in={list(self.in_segments)}, out={list(self.out_segments)}, stored={self.stored})"

    @property
    def stored(self) -> int:
        """Stored weights (multiply-adds per row of a linear layer; per output position and tap of a conv)."""
        return self.offsets[-1]

    def dense_block_mask(self) -> Tensor:
        """(o_total, i_total) bool: True where the dense weight may be non-zero."""
        m = torch.zeros(self.o_total, self.i_total, dtype=torch.bool)
        for o, ranges in enumerate(self.ranges):
            r0, n_o = self.out_starts[o], self.out_segments[o][0]
            for col, n, _q in ranges:
                m[r0 : r0 + n_o, col : col + n] = True
        return m


@functools.lru_cache(maxsize=1024)
def segment_plan(in_segments: Segments, out_segments: Segments) -> SegmentPlan:
    """The :class:`SegmentPlan` of two validated segment tuples (cached: layers call it per forward)."""
    in_starts = [0]
    for s, _ in in_segments:
        in_starts.append(in_starts[-1] + s)
    out_starts, ks, all_ranges, offsets = [], [], [], [0]
    o0 = 0
    for o_size, o_mask in out_segments:
        merged: list[list[int]] = []
        for i, (n, m) in enumerate(in_segments):
            if n == 0 or (m & o_mask) == 0:
                continue
            if merged and merged[-1][0] + merged[-1][1] == in_starts[i]:
                merged[-1][1] += n
            else:
                merged.append([in_starts[i], n])
        ranges, q = [], 0
        for col, n in merged:
            ranges.append((col, n, q))
            q += n
        out_starts.append(o0)
        ks.append(q)
        all_ranges.append(tuple(ranges))
        offsets.append(offsets[-1] + o_size * q)
        o0 += o_size
    li, lo = layout_of_segments(in_segments), layout_of_segments(out_segments)
    standard = (li, lo) if li is not None and lo is not None and len(li) == len(lo) else None
    top = 0
    for _, m in (*in_segments, *out_segments):
        top |= m
    return SegmentPlan(
        in_segments=in_segments,
        out_segments=out_segments,
        i_total=in_starts[-1],
        o_total=o0,
        in_starts=tuple(in_starts[:-1]),
        out_starts=tuple(out_starts),
        k_of_out=tuple(ks),
        ranges=tuple(all_ranges),
        offsets=tuple(offsets),
        canonical_in=canonical_segments(in_segments),
        canonical_out=canonical_segments(out_segments),
        standard=standard,
        members=top.bit_length(),
    )


def pack_segment_weight(
    weight: Tensor, in_segments: Segments, out_segments: Segments, *, check_zero: bool = True, name: str = "weight"
) -> Tensor:
    """Dense weight ``(O_total, I_total, *taps)`` -> the packed flat weight (a new tensor).

    Raises:
        ValueError: the shape does not match the segments, or (``check_zero``) a skipped block (masks not
            intersecting) holds a non-zero entry (named by segment, with its index range and count).
    """
    plan = segment_plan(in_segments, out_segments)
    if weight.dim() < 2 or tuple(weight.shape[:2]) != (plan.o_total, plan.i_total):
        raise ValueError(
            f"{name} must have shape (O_total, I_total, ...) = ({plan.o_total}, {plan.i_total}, ...) for these "
            f"segments; got {tuple(weight.shape)}"
        )
    taps = int(torch.Size(weight.shape[2:]).numel())
    if check_zero:
        allowed = plan.dense_block_mask().to(weight.device)
        nz = weight.reshape(plan.o_total, plan.i_total, -1) != 0
        bad = nz.any(-1) & ~allowed
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            o = max(j for j, s in enumerate(plan.out_starts) if s <= r and out_segments[j][0] > 0)
            i = max(j for j, s in enumerate(plan.in_starts) if s <= c and in_segments[j][0] > 0)
            (o_n, o_m), (i_n, i_m) = out_segments[o], in_segments[i]
            o0, i0 = plan.out_starts[o], plan.in_starts[i]
            count = int(bad[o0 : o0 + o_n, i0 : i0 + i_n].sum())
            raise ValueError(
                f"{name} block (output segment {o} {out_segments[o]}, input segment {i} {in_segments[i]}) = "
                f"{name}[{o0}:{o0 + o_n}, {i0}:{i0 + i_n}] must be exactly zero: the member masks {o_m:#b} and "
                f"{i_m:#b} do not intersect (no member links these slots); it has {count} non-zero entries, the "
                f"first at [{r}, {c}]"
            )
    out = weight.new_empty(plan.stored * taps)
    for o, ranges in enumerate(plan.ranges):
        n_o, r0 = out_segments[o][0], plan.out_starts[o]
        if n_o == 0 or not ranges:
            continue
        blk = out[plan.offsets[o] * taps : plan.offsets[o + 1] * taps].view(n_o, plan.k_of_out[o], *weight.shape[2:])
        for col, n, q in ranges:
            blk[:, q : q + n].copy_(weight[r0 : r0 + n_o, col : col + n])
    return out


def unpack_segment_weight(
    packed: Tensor, in_segments: Segments, out_segments: Segments, taps_shape: Sequence[int] = ()
) -> Tensor:
    """Packed flat weight -> the dense ``(O_total, I_total, *taps_shape)`` weight with zero blocks (differentiable:
    a sum of padded blocks, so gradients flow to the stored entries only)."""
    plan = segment_plan(in_segments, out_segments)
    taps = int(torch.Size(tuple(taps_shape)).numel())
    rows = []
    for o, ranges in enumerate(plan.ranges):
        n_o = out_segments[o][0]
        if n_o == 0:
            continue
        blk = packed[plan.offsets[o] * taps : plan.offsets[o + 1] * taps].view(n_o, plan.k_of_out[o], *taps_shape)
        pieces, pos = [], 0
        for col, n, q in ranges:
            if col > pos:
                pieces.append(packed.new_zeros(n_o, col - pos, *taps_shape))
            pieces.append(blk[:, q : q + n])
            pos = col + n
        if pos < plan.i_total:
            pieces.append(packed.new_zeros(n_o, plan.i_total - pos, *taps_shape))
        rows.append(torch.cat(pieces, dim=1) if pieces else packed.new_zeros(n_o, 0, *taps_shape))
    if not rows:
        return packed.new_zeros(0, plan.i_total, *taps_shape)
    return torch.cat(rows, dim=0)


def check_operands(x: Tensor, weight: Tensor, bias: Tensor | None, o_total: int, activation: str | None) -> None:
    """The checks every partial op makes on its operands after the weight's size: ``weight`` and ``bias``
    (shape ``(o_total,)``) on ``x``'s dtype and device, a known ``activation``.

    Raises:
        ValueError: naming the operand, the expected and the actual value.
    """
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}; got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}; got {weight.device}")
    if bias is not None:
        if tuple(bias.shape) != (o_total,):
            raise ValueError(f"bias must have shape (O_total,) = ({o_total},); got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must match x's dtype/device ({x.dtype}, {x.device}); got ({bias.dtype}, {bias.device})"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None; got {activation!r}")
