"""Pure-Python layout helpers shared by the Triton kernels (no triton import here).

A *masked-segment* layout (csrc/partial_linear/panel_linear.h) cuts the input columns and the output rows into
segments with member masks; output segment o reads input segment i iff ``out_masks[o] & in_masks[i] != 0``. The
standard layout ``[shared | branch_1 | ... | branch_K]`` is the case of masks ``[all, bit 0, ..., bit K-1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentRanges:
    """Per output segment: its size, first output row, and the allowed input ranges ``(column, length, q)`` where q is
    the range's first column inside the segment's K_o allowed columns; plus K_o and the storage offsets."""

    out_sizes: tuple[int, ...]
    out_starts: tuple[int, ...]
    ranges: tuple[tuple[tuple[int, int, int], ...], ...]
    k_of_out: tuple[int, ...]
    offsets: tuple[int, ...]  # start of W_o (O_o, K_o) in the flat storage; offsets[-1] is the total
    i_total: int


def masked_ranges(
    in_sizes: Sequence[int], in_masks: Sequence[int], out_sizes: Sequence[int], out_masks: Sequence[int]
) -> SegmentRanges:
    """Allowed input ranges of every output segment (adjacent allowed input segments merged).

    Raises:
        ValueError: mismatched lengths, negative sizes or a zero mask on a non-empty segment.
    """
    is_, im, os_, om = ([int(v) for v in seq] for seq in (in_sizes, in_masks, out_sizes, out_masks))
    if len(is_) != len(im) or len(os_) != len(om) or not is_ or not os_:
        raise ValueError(
            f"in_sizes/in_masks and out_sizes/out_masks must be non-empty pairs of equal length; got "
            f"{len(is_)}/{len(im)} and {len(os_)}/{len(om)}"
        )
    for name, sizes, masks in (("in", is_, im), ("out", os_, om)):
        for s, (n, m) in enumerate(zip(sizes, masks)):
            if n < 0:
                raise ValueError(f"{name}_sizes must be >= 0; got {name}_sizes[{s}] = {n}")
            if n > 0 and m == 0:
                raise ValueError(f"{name}_masks[{s}] is 0 for a non-empty segment (no member owns its slots)")
    starts = [0]
    for n in is_:
        starts.append(starts[-1] + n)
    out_starts, all_ranges, ks, offsets = [], [], [], [0]
    o_start = 0
    for o_size, o_mask in zip(os_, om):
        merged: list[list[int]] = []
        for i, (n, m) in enumerate(zip(is_, im)):
            if n == 0 or (m & o_mask) == 0:
                continue
            if merged and merged[-1][0] + merged[-1][1] == starts[i]:
                merged[-1][1] += n
            else:
                merged.append([starts[i], n])
        ranges, q = [], 0
        for col, n in merged:
            ranges.append((col, n, q))
            q += n
        out_starts.append(o_start)
        all_ranges.append(tuple(ranges))
        ks.append(q)
        offsets.append(offsets[-1] + o_size * q)
        o_start += o_size
    return SegmentRanges(tuple(os_), tuple(out_starts), tuple(all_ranges), tuple(ks), tuple(offsets), starts[-1])


def standard_masks(k: int) -> list[int]:
    """Masks of the layout ``[shared | branch_1 | ... | branch_K]``."""
    return [(1 << k) - 1] + [1 << j for j in range(k)]
