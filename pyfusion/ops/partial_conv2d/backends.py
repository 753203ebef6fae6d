"""Backends of ``pyfusion::partial_conv2d`` and its dispatcher (segments and the packed weight:
:mod:`pyfusion.ops.layout`, on channels, ``W_o`` stored as (O_o, K_o, kh, kw)).

``y = act(conv2d(x, W) + b)`` with ``W`` (O_total, I_total, kh, kw) zero outside the blocks whose member masks
intersect (DESIGN §7):

* ``triton`` (CUDA): one implicit-GEMM launch over the allowed (channel, tap) pairs
  (:mod:`pyfusion.triton_kernels.partial_conv2d`), bias and activation fused; range table cached per (segments,
  kernel, device), tap-major weight copy cached per weight version.
* ``torch`` (any device): one ``F.conv2d`` per run of consecutive output segments that read the same input
  channels (their ``W_o`` are consecutive in the packed weight, so the run's weight is one contiguous
  (O_run, K_o, kh, kw) slice: no weight copy), over those input channels gathered (a channel slice when they are
  one range, one ``torch.cat`` otherwise). The standard layout is ``1 + K`` convolutions (shared outputs over every
  input; branch k over [shared | branch_k]); a layer whose input is one segment (a first layer) is one convolution.
  Measured against the alternatives on the 2-core VM (bench/bench_partial_conv.py, bench/results/
  partial_conv2d_cpu.md): shared conv + one grouped conv over the branches was 1.1-3x slower at alpha 1 (oneDNN's
  CPU grouped convolution is slower than the separate convolutions: LeNet conv2 K=4 2137 vs 715 us, VGG 64-channel
  K=4 273 vs 197 ms, batch 32, 1 thread), and im2col (``F.unfold``) + GEMM 2-9x slower than either.
* ``reference``: the float64 dense weight with zero blocks (:func:`pyfusion.ops.reference.partial_conv2d_ref`).

Eager CPU inference (float32 / float64, nothing requires grad, ``PYFUSION_BACKEND`` unset) runs the strategy
measured fastest for the layer and input size (:func:`cpu_inference_forward`, :mod:`pyfusion.ops.partial_linear.
tuning`) among the convolutions per output run above (``runs``), shared conv + cross conv + one grouped convolution
of the diagonal blocks (``grouped``, uniform standard layouts; a view of the packed weight at alpha = 1) and one
convolution with the dense zero-block weight (``dense``), K member-shaped convolutions (``members``: member k over
[shared | branch k] inputs with outputs [shared | branch k], the shared outputs summed; standard layouts with shared
outputs; where the shared x shared zero blocks it multiplies are large, ``members_split`` instead: member 1 over
[shared | branch 1], member k >= 2 over branch k alone, one convolution adding the branches' rows on the shared
inputs, no input gathered) and, up to :data:`IM2COL_MAX_BATCH` samples, one unfold of the input + GEMMs per output
run (``im2col``).
The earlier measurement that grouped convolution was slower (above) held for LeNet / VGG-64 at alpha 1; at batch 1
on 8x8 maps the dense zero-block weight beat the 1 + K convolutions at alpha 0.25 (836 vs 1369 us,
bench/results/partial_linear_cpu.md), and at alpha 0.75 the output runs (a narrow 64-output shared convolution)
were 1.35x the members run one after another, which ``members`` matches, so the choice is measured per layer.
* ``triton_interpret``: the Triton kernel in the CPU interpreter (tests, forward only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion import backends
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops._weight_cache import entry_ref, track
from pyfusion.ops._weight_cache import forget as forget_derived
from pyfusion.ops.layout import SegmentPlan, kernel_segments
from pyfusion.ops.partial_linear.backends import (
    _PER_PLAN_MAX,
    _mode,
    dense_candidate,
    dense_is_view,
    dense_weight_of,
    derived_weight,
    member_blocks,
    member_layout,
    per_plan,
    plan_token,
    segment_runs,
)
from pyfusion.ops.partial_linear.tuning import StrategyTuner, row_bucket

__all__ = ["ARG_NAMES", "DISPATCHER", "FLOAT_DTYPES", "ConvGeom", "conv_out_hw", "conv_runs", "torch_forward"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARG_NAMES = ("x", "weight", "bias", "plan", "geom", "activation")


@dataclass(frozen=True)
class ConvGeom:
    """Kernel size, stride, padding and dilation (pairs of ints)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]


def conv_out_hw(
    h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int]:
    """Output spatial size of a convolution (as ``nn.Conv2d``)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


@dataclass(frozen=True)
class ConvRun:
    """Consecutive output segments reading the same input channel ranges: outputs ``[o0, o0 + n_out)``, input
    ranges ``((channel, count), ...)`` (K_o channels in all), weight ``W[w_off : w_off + n_out * K_o * taps]``."""

    o0: int
    n_out: int
    ranges: tuple[tuple[int, int], ...]
    k_o: int
    w_off: int


@per_plan
@functools.lru_cache(maxsize=1024)
def conv_runs(plan: SegmentPlan) -> tuple[tuple[ConvRun, ...], tuple[int, ...]]:
    """The convolutions of a plan (runs of output segments with identical input ranges), and the output segments
    that read nothing (bias or zero)."""
    runs, idle = segment_runs(plan)  # the same runs as the linear op's (one GEMM per run there, one conv here)
    return tuple(ConvRun(*r) for r in runs), idle


def _activation(y: Tensor, activation: str) -> Tensor:
    fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}.get(activation)
    return y if fn is None else fn(y)


def _gather(x: Tensor, ranges: tuple[tuple[int, int], ...]) -> Tensor:
    if len(ranges) == 1:
        col, n = ranges[0]
        return x if (col == 0 and n == x.shape[1]) else x[:, col : col + n]
    return torch.cat([x[:, col : col + n] for col, n in ranges], dim=1)


def torch_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom, activation: str = "none"
) -> Tensor:
    """One convolution per run of output segments over its gathered input channels; x (N, I_total, H, W) ->
    (N, O_total, H', W') contiguous."""
    kh, kw = geom.kernel
    taps = geom.taps
    runs, idle = conv_runs(plan)
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], geom.kernel, geom.stride, geom.padding, geom.dilation)

    def conv(run: ConvRun) -> Tensor:
        w = weight[run.w_off * taps : (run.w_off + run.n_out * run.k_o) * taps].view(run.n_out, run.k_o, kh, kw)
        b = None if bias is None else bias[run.o0 : run.o0 + run.n_out]
        return F.conv2d(_gather(x, run.ranges), w, b, geom.stride, geom.padding, geom.dilation)

    if len(runs) == 1 and not idle and runs[0].n_out == plan.o_total:
        return _activation(conv(runs[0]), activation).contiguous()
    parts: list[tuple[int, Tensor]] = [(r.o0, conv(r)) for r in runs]
    for o in idle:
        o0, n_o = plan.out_starts[o], plan.out_segments[o][0]
        z = x.new_zeros((x.shape[0], n_o, ho, wo))
        if bias is not None:
            z = z + bias[o0 : o0 + n_o].view(1, -1, 1, 1)
        parts.append((o0, z))
    if not parts:
        return x.new_zeros((x.shape[0], 0, ho, wo))
    parts.sort(key=lambda p: p[0])
    y = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts], dim=1)
    return _activation(y, activation).contiguous()


# ----------------------------------------------------------------------------------------------------------
# CPU inference: the measured choice among equivalent strategies (pyfusion.ops.partial_linear.tuning)
# ----------------------------------------------------------------------------------------------------------


def _dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                   activation: str = "none") -> Tensor:  # fmt: skip
    """One convolution with the dense zero-block weight (cached once per weight version, or the packed weight itself
    when it is the dense one)."""
    w = dense_weight_of(weight, plan, geom.kernel)
    return _activation_(F.conv2d(x, w, bias, geom.stride, geom.padding, geom.dilation), activation).contiguous()


def grouped_layout(plan: SegmentPlan) -> tuple[int, int, int, int, int] | None:
    """``(K, I_s, I_b, O_s, O_b)`` of a standard layout whose K >= 2 branches all have I_b >= 1 inputs and O_b >= 1
    outputs (what :func:`_grouped_forward` runs), else None."""
    if plan.standard is None:
        return None
    il, ol = plan.standard
    k = len(il) - 1
    if k < 2 or len(set(il[1:])) != 1 or len(set(ol[1:])) != 1 or il[1] == 0 or ol[1] == 0:
        return None
    return k, il[0], il[1], ol[0], ol[1]


def _grouped_weights(weight: Tensor, plan: SegmentPlan, geom: ConvGeom) -> tuple[Tensor | None, Tensor]:
    """(cross (K O_b, I_s, kh, kw) or None, diagonal (K O_b, I_b, kh, kw)) of a :func:`grouped_layout` plan: the
    branch blocks split by input (shared | own); a view of the packed weight when I_s = 0, else a copy cached once per
    weight version."""
    k, i_s, i_b, o_s, o_b = grouped_layout(plan)  # type: ignore[misc]
    kh, kw = geom.kernel
    taps = kh * kw
    base = o_s * plan.i_total * taps
    branches = weight[base : base + k * o_b * (i_s + i_b) * taps].view(k * o_b, i_s + i_b, kh, kw)
    if i_s == 0:
        return None, branches

    def build(src: Tensor) -> tuple[Tensor, Tensor]:
        br = src[base : base + k * o_b * (i_s + i_b) * taps].view(k * o_b, i_s + i_b, kh, kw)
        return br[:, :i_s].contiguous(), br[:, i_s:].contiguous()

    return derived_weight(weight, ("conv_grouped", plan_token(plan), geom.kernel), build)


def _grouped_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                     activation: str = "none") -> Tensor:  # fmt: skip
    """Shared conv + grouped conv: the shared outputs as one convolution over every input, the branch outputs as one
    convolution of the shared inputs (all branches' cross blocks at once) plus one grouped convolution (groups = K)
    of the branch inputs with the diagonal blocks."""
    k, i_s, i_b, o_s, o_b = grouped_layout(plan)  # type: ignore[misc]
    kh, kw = geom.kernel
    cross, diag = _grouped_weights(weight, plan, geom)
    conv = functools.partial(F.conv2d, stride=geom.stride, padding=geom.padding, dilation=geom.dilation)
    b_br = None if bias is None else bias[o_s:]
    xb = x if i_s == 0 else x[:, i_s:]
    if cross is None:
        yb = conv(xb, diag, b_br, groups=k)
    else:
        yb = conv(x[:, :i_s], cross, b_br)
        yb.add_(conv(xb, diag, None, groups=k))
    if o_s:
        w_s = weight[: o_s * plan.i_total * kh * kw].view(o_s, plan.i_total, kh, kw)
        ys = conv(x, w_s, None if bias is None else bias[:o_s])
        yb = torch.cat([ys, yb], dim=1)
    return _activation(yb, activation).contiguous()


def _member_weights(weight: Tensor, plan: SegmentPlan, geom: ConvGeom) -> tuple[Tensor, ...]:
    """Per member k, the (O_s + O_k, I_s + I_k, kh, kw) weight of one member-shaped convolution over [x_s | x_k]:
    rows [shared outputs | branch k], the shared outputs' block on the shared inputs in member 0's only (zero in the
    others'). Built from the dense zero-block weight once per weight version (:func:`derived_weight`)."""
    k, i_s, i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]

    def build(src: Tensor) -> tuple[Tensor, ...]:
        from pyfusion.ops.layout import unpack_segment_weight

        dense = unpack_segment_weight(src, plan.in_segments, plan.out_segments, geom.kernel)
        out, i0, o0 = [], i_s, o_s
        for j in range(k):
            cols = torch.cat([torch.arange(i_s), torch.arange(i0, i0 + i_b[j])])
            rows = torch.cat([torch.arange(o_s), torch.arange(o0, o0 + o_b[j])])
            wj = dense.index_select(0, rows).index_select(1, cols)
            if j:
                wj[:o_s, :i_s] = 0  # W_ss is member 0's: the shared outputs sum the members' partial results
            out.append(wj.contiguous())
            i0, o0 = i0 + i_b[j], o0 + o_b[j]
        return tuple(out)

    return derived_weight(weight, ("conv_members", plan_token(plan), geom.kernel), build)


def _member_biases(bias: Tensor, plan: SegmentPlan) -> tuple[Tensor, ...]:
    """Per member k, the bias of its convolution: [b_s | b_k] for member 0, [0 | b_k] for the others (the shared
    outputs' bias is added once); once per bias version."""
    k, _i_s, _i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]

    def build(src: Tensor) -> tuple[Tensor, ...]:
        out, o0 = [], o_s
        for j in range(k):
            head = src[:o_s] if j == 0 else src.new_zeros(o_s)
            out.append(torch.cat([head, src[o0 : o0 + o_b[j]]]))
            o0 += o_b[j]
        return tuple(out)

    return derived_weight(bias, ("conv_member_bias", plan_token(plan)), build)


def _members_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                     activation: str = "none") -> Tensor:  # fmt: skip
    """K member-shaped convolutions (:func:`_member_weights`), member k over [x_s | x_k] with outputs [shared |
    branch k]; the shared outputs are the sum of the members' partial results. The same convolutions as the K
    unfused members (at most O_s I_s (K - 1) taps of zeros more than the stored weights): at alpha 0.75 on VGG's
    256-channel 8x8 layer, K = 2, batch 1, 1 thread, 1348 us as the members' 1340 us, where the output runs (a
    64-output shared convolution over 448 inputs, the narrow convolution oneDNN runs at 2/3 of the others' rate, and
    two 192-output ones) took 1634 us."""
    k, i_s, i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]
    ws = _member_weights(weight, plan, geom)
    bs = _member_biases(bias, plan) if bias is not None else (None,) * k
    ys, i0 = [], i_s
    for j in range(k):
        if j == 0:
            xj = x[:, : i_s + i_b[0]]
        elif i_s:
            xj = torch.cat([x[:, :i_s], x[:, i0 : i0 + i_b[j]]], 1)
        else:
            xj = x[:, i0 : i0 + i_b[j]]
        ys.append(F.conv2d(xj, ws[j], bs[j], geom.stride, geom.padding, geom.dilation))
        i0 += i_b[j]
    y = torch.cat([ys[0]] + [yj[:, o_s:] for yj in ys[1:]], 1)
    head = y[:, :o_s]
    for yj in ys[1:]:
        head.add_(yj[:, :o_s])
    return _activation_(y, activation).contiguous()


# The split members are offered where the W_ss zeros that ``members`` multiplies are at least this fraction of the
# stored weights (K = 2: alpha 0.5 is 1/7, alpha 0.25 0.39, alpha 0.75 1/31); below it the extra convolution and the
# extra adds cost more than the zeros (measured, see :func:`_members_split_forward`).
MEMBERS_SPLIT_MIN_ZEROS = 0.1


def members_split_candidate(plan: SegmentPlan) -> bool:
    """Whether :func:`_members_split_forward` is offered for a plan (see :data:`MEMBERS_SPLIT_MIN_ZEROS`)."""
    lay = member_layout(plan)
    if lay is None or lay[1] == 0:  # without shared inputs the members multiply no zero and gather nothing
        return False
    k, i_s, _i_b, o_s, _o_b = lay
    return (k - 1) * o_s * i_s >= MEMBERS_SPLIT_MIN_ZEROS * plan.stored


def _member_split_weights(
    weight: Tensor, plan: SegmentPlan, geom: ConvGeom
) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The weights of :func:`_members_split_forward` for a :func:`member_layout` plan, copied from the packed weight's
    blocks once per weight version (:func:`derived_weight`): member 1's (O_s + O_1, I_s + I_1, kh, kw) over [x_s |
    x_1] (W_ss is member 1's), member k >= 2's (O_s + O_k, I_k, kh, kw) over x_k alone, and the rows of branches
    2..K on the shared inputs stacked, (O_2 + ... + O_K, I_s, kh, kw) (None without shared inputs or without those
    rows). The stored weights once in all."""
    kh, kw = geom.kernel

    def build(src: Tensor) -> tuple[tuple[Tensor, ...], Tensor | None]:
        out, cross = member_blocks(src, plan, kh * kw)
        return tuple(w.view(w.shape[0], w.shape[1], kh, kw) for w in out), (
            None if cross is None else cross.view(cross.shape[0], cross.shape[1], kh, kw)
        )

    return derived_weight(weight, ("conv_members_split", plan_token(plan), geom.kernel), build)


def _members_split_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                           activation: str = "none") -> Tensor:  # fmt: skip
    """The linear ``members`` split (:func:`pyfusion.ops.partial_linear.backends.members_forward`) on channels:
    member 1's convolution over [x_s | x_1] (a channel slice, outputs [shared | branch 1], its bias), member k >= 2's
    over x_k alone (outputs [shared | branch k], no bias), one convolution of x_s with the branches 2..K rows (their
    bias); no input gathered, no zero block multiplied (the effective FLOPs exactly, in K + 1 convolutions). F.conv2d
    has no ``out=``: each piece lands in y by one add or copy (the shared outputs: member 1's + member 2's into y,
    then += the others'; branch k >= 2: its member's rows + the cross rows into y; branch 1: a copy).

    A channel slice of a batch > 1 is a strided view that F.conv2d copies (``aten::contiguous``) before oneDNN runs:
    the same copy as the gather of ``members``, of fewer channels (N = 32, 32 -> 64 at 32x32, 1 thread: 73 us of a
    6.2 ms convolution). Measured on the 2-core VM against ``members`` (VGG-like 3x3 layers 64 @ 32x32, 128 @ 16x16,
    256 @ 8x8, batch 1 / 32, K = 2 / 4, 1 and 2 threads): 0.57-0.97x at alpha 0.25 and 0.5 in 41 of 48 cases, slower
    on 128 channels at 16x16, batch 1, alpha 0.5 (1.33-1.42x) and 64 @ 32x32, batch 1, K = 2, 2 threads (1.07-1.11x);
    in the prototype 1.10-1.23x at alpha 0.75 (1/31 zeros: the extra convolution and adds cost more). So it replaces
    ``members`` where the zeros are large (:func:`members_split_candidate`), and the tuner measures it against the
    other strategies per layer."""
    k, i_s, i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]
    ws, cross = _member_split_weights(weight, plan, geom)
    conv = functools.partial(F.conv2d, stride=geom.stride, padding=geom.padding, dilation=geom.dilation)
    n0 = o_s + o_b[0]
    y0 = conv(x[:, : i_s + i_b[0]], ws[0], None if bias is None else bias[:n0])
    yc = None if cross is None else conv(x[:, :i_s], cross, None if bias is None else bias[n0:])
    y = y0.new_empty((x.shape[0], plan.o_total, y0.shape[2], y0.shape[3]))
    head = y[:, :o_s]
    i0, o0, c0 = i_s + i_b[0], n0, 0
    for j in range(1, k):
        yj = conv(x[:, i0 : i0 + i_b[j]], ws[j], None)
        if j == 1:
            torch.add(y0[:, :o_s], yj[:, :o_s], out=head)
        else:
            head.add_(yj[:, :o_s])
        dst = y[:, o0 : o0 + o_b[j]]
        if yc is not None:
            torch.add(yj[:, o_s:], yc[:, c0 : c0 + o_b[j]], out=dst)
        elif bias is not None:
            torch.add(yj[:, o_s:], bias[o0 : o0 + o_b[j]].view(1, -1, 1, 1), out=dst)
        else:
            dst.copy_(yj[:, o_s:])
        i0, o0, c0 = i0 + i_b[j], o0 + o_b[j], c0 + o_b[j]
    y[:, o_s:n0].copy_(y0[:, o_s:])
    return _activation_(y, activation)


# Batches up to this many samples are offered the unfolded strategy (one im2col + GEMMs per sample).
IM2COL_MAX_BATCH = 4


def _unfold(x: Tensor, geom: ConvGeom, ho: int, wo: int) -> Tensor:
    """``F.unfold(x, kernel, dilation, padding, stride)`` (N, C kh kw, H'W') as one copy of a strided view of the
    padded input: 221 vs 395 us for F.unfold of a (1, 448, 8, 8) input, 3x3 kernel, 1 thread."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom.kernel, geom.stride, geom.padding, geom.dilation
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    n, c = x.shape[:2]
    p = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[:, :, :ho, :wo, ::dh, ::dw]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _im2col_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                    activation: str = "none") -> Tensor:  # fmt: skip
    """Per sample, the input unfolded once (``F.unfold``: (I_total kh kw, H'W'), channel-major as the packed weight's
    columns) and per run of output segments one GEMM per allowed input range, accumulated into the run's rows of the
    (O_total, H'W') output (already the NCHW layout: no copy): the effective FLOPs exactly. What PyTorch's own CPU
    convolution does at batch 1 (its im2col + GEMM path, used for inputs of <= 20480 entries and 3x3 kernels) for
    one member, once for the whole layer."""
    taps = geom.taps
    runs, idle = conv_runs(plan)
    n = x.shape[0]
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], geom.kernel, geom.stride, geom.padding, geom.dilation)
    cols = _unfold(x, geom, ho, wo)  # (N, I_total * taps, L)
    y = x.new_empty((n, plan.o_total, ho * wo))
    for s in range(n):
        c, ys = cols[s], y[s]
        for run in runs:
            k = run.k_o * taps
            w = weight[run.w_off * taps : run.w_off * taps + run.n_out * k].view(run.n_out, k)
            out = ys[run.o0 : run.o0 + run.n_out]
            q = 0
            for j, (col, cnt) in enumerate(run.ranges):
                wj, cj = w[:, q * taps : (q + cnt) * taps], c[col * taps : (col + cnt) * taps]
                if j:
                    out.addmm_(wj, cj)
                elif bias is not None:
                    torch.addmm(bias[run.o0 : run.o0 + run.n_out, None], wj, cj, out=out)
                else:
                    torch.mm(wj, cj, out=out)
                q += cnt
        for o in idle:
            o0, n_o = plan.out_starts[o], plan.out_segments[o][0]
            if bias is not None:
                ys[o0 : o0 + n_o].copy_(bias[o0 : o0 + n_o, None].expand(n_o, ho * wo))
            else:
                ys[o0 : o0 + n_o].zero_()
    return _activation_(y.view(n, plan.o_total, ho, wo), activation)


def _activation_(y: Tensor, activation: str) -> Tensor:
    """The activation in place on a fresh output."""
    if activation == "relu":
        return y.relu_()
    if activation == "none":
        return y
    return _activation(y, activation)


STRATEGIES = {
    "runs": torch_forward,
    "grouped": _grouped_forward,
    "members": _members_forward,
    "members_split": _members_split_forward,
    "im2col": _im2col_forward,
    "dense": _dense_forward,
}
TUNER = StrategyTuner("partial_conv2d")
_CANDIDATES: dict[tuple, tuple[SegmentPlan, dict, str]] = {}


def _candidates(plan: SegmentPlan, geom: ConvGeom, small: bool) -> tuple[dict, str]:
    """(strategy name -> function, default) for a plan; ``small``: a batch of at most :data:`IM2COL_MAX_BATCH`."""
    names = ["runs"]
    if grouped_layout(plan) is not None:
        names.append("grouped")
    if members_split_candidate(plan):  # faster than the gathered members here (_members_split_forward)
        names.append("members_split")
    elif member_layout(plan) is not None:
        names.append("members")
    if small and any(len(run.ranges) > 1 for run in conv_runs(plan)[0]):
        # one unfold instead of a gathered copy (+ the convolution's own unfold) per run reading several input
        # ranges; where every run reads one range (alpha 1: the members' own convolutions) it is the same work as
        # the runs, and offering it only let a noisy first measurement pick it (K=4 alpha 1 batch 1, 1 thread, load
        # 5: kept at 3523 us where the runs took 2965)
        names.append("im2col")
    if dense_candidate(plan, geom.taps):
        names.append("dense")
    if dense_is_view(plan):  # one convolution either way
        names = ["dense"]
    return {n: STRATEGIES[n] for n in names}, names[0]


def cpu_inference_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                          activation: str, hot: tuple | None = None) -> Tensor:  # fmt: skip
    """Eager CPU inference (float32/float64, nothing requires grad, no ``PYFUSION_BACKEND``): the strategy measured
    fastest for this (layer, kernel, input size, dtype, row bucket, threads) among one convolution per run of output
    segments (:func:`torch_forward`), shared conv + grouped conv (:func:`grouped_layout` plans), the member-shaped
    convolutions (:func:`member_layout` plans), the unfolded input + GEMMs (batches up to
    :data:`IM2COL_MAX_BATCH`) and the dense zero-block weight
    (:func:`pyfusion.ops.partial_linear.backends.dense_candidate`).

    Once a key is measured its strategy runs from one lookup keyed by ints (``TUNER.fast``): the measuring path's
    key hashes the ConvGeom dataclass (its four tuples) at every call, ~2 us on the loaded VM.

    ``hot``: the module's :func:`hot_key` for these (x, weight): once the strategy is settled, the pair's entry is
    installed in ``_HOT_CALLS`` (see :func:`hot_forward`)."""
    if plan.o_total == 0:  # no output channel: F.conv2d refuses an empty weight, which the dense candidate is
        return torch_forward(x, weight, bias, plan, geom, activation)
    n, _c, h, w = x.shape
    fast = (id(plan), id(geom), x.dtype, activation, n if n <= 4 else 1 << (n - 1).bit_length(), h, w,
            torch.get_num_threads())  # fmt: skip
    hit = _FAST.get(fast)
    if hit is not None and hit[0] is plan and hit[1] is geom:
        if hot is not None:
            _install_hot(hot, weight, plan, geom, hit[2])
        return hit[2](x, weight, bias, plan, geom, activation)
    small = n <= IM2COL_MAX_BATCH
    pk = (id(plan), plan.stored, plan.o_total, plan.i_total, geom, small)
    ent = _CANDIDATES.get(pk)
    if ent is None or ent[0] is not plan:
        if len(_CANDIDATES) > _PER_PLAN_MAX:
            _CANDIDATES.clear()
        ent = _CANDIDATES[pk] = (plan, *_candidates(plan, geom, small))
    _plan, fns, default = ent
    key = (pk, x.dtype, activation, row_bucket(x.shape[0]), x.shape[2], x.shape[3], torch.get_num_threads())
    y = TUNER.run(key, fns, (x, weight, bias, plan, geom, activation), default, _drop_derived)
    name = TUNER.settled(key, fns, default)
    if name is not None:
        if len(_FAST) > _PER_PLAN_MAX:
            _FAST.clear()
        _FAST[fast] = (plan, geom, fns[name])
        if hot is not None:
            _install_hot(hot, weight, plan, geom, fns[name])
    return y


_FAST = TUNER.fast

# The module's one-lookup path (partial_conv2d_module_forward), as partial_linear's (its _HOT_CALLS): per (weight
# object, geometry object, x.shape, x.dtype, activation, threads) the settled strategy, and for the dense strategy the
# dense zero-block weight itself, so that a repeat call is one dict lookup, a few identity / int tests and the
# strategy (F.conv2d for the dense one). The exact shape stands for the rank, channel, batch-bucket and spatial-size
# checks the entry was installed after. The entry holds a weakref to the weight (dropped with it), its storage address
# and version when installed (an in-place update or a ``.data`` swap, dtype and device moves included, misses; a
# detached alias keeps the old storage alive so that its address cannot be reused while the entry exists). No entry
# for weights whose version cannot be read (inference tensors) nor for views made anew per call. Kept in TUNER.fast
# (emptied with the choices); its 6-tuples never equal the measuring path's 8-tuples.
_HOT_CALLS = TUNER.fast


def hot_key(x: Tensor, weight: Tensor, geom: ConvGeom, activation: str) -> tuple:
    """The ``_HOT_CALLS`` key of a module call (see :func:`hot_forward`)."""
    return (id(weight), id(geom), x.shape, x.dtype, activation, torch.get_num_threads())


def _install_hot(hot: tuple, weight: Tensor, plan: SegmentPlan, geom: ConvGeom, fn: Callable) -> None:
    if weight._base is not None:  # a view made anew at each call: never hit again
        return
    try:
        ver = weight._version
    except RuntimeError:  # an inference tensor: no version counter to see an in-place change by
        return
    track(weight)
    dense = None
    if fn is _dense_forward:
        dense = dense_weight_of(weight, plan, geom.kernel)
        if dense._base is not None:
            dense = dense.detach()  # a view of the weight would keep the weight (and so the entry) alive
    if len(_HOT_CALLS) > _PER_PLAN_MAX:
        _HOT_CALLS.clear()

    ref = entry_ref(_HOT_CALLS, hot, weight, 2)
    _HOT_CALLS[hot] = (plan, geom, ref, weight.data_ptr(), ver, weight.detach(), fn, dense)


def hot_forward(hot: tuple, x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom,
                activation: str) -> Tensor | None:  # fmt: skip
    """The settled strategy of ``hot`` (:func:`hot_key`) run from its entry, or None when there is none valid for
    this weight (same object, storage and version as when installed, on the CPU), plan and geometry. The caller has
    checked what the key does not stand for (eager, no autograd, no tracing, a plain CPU x, no PYFUSION_BACKEND)."""
    ent = _HOT_CALLS.get(hot)
    if ent is None or ent[0] is not plan or ent[1] is not geom or ent[2]() is not weight:
        return None
    if ent[3] != weight.data_ptr() or ent[4] != weight._version or not weight.is_cpu:
        return None
    dense = ent[7]
    if dense is None:
        return ent[6](x, weight, bias, plan, geom, activation)
    y = F.conv2d(x, dense, bias, geom.stride, geom.padding, geom.dilation)
    return _activation_(y, activation).contiguous()


def _drop_derived(name: str, args: tuple, _kept: str) -> None:
    _x, weight, bias, plan, geom, _act = args
    if name == "dense" and not dense_is_view(plan):
        forget_derived(weight, ("dense", plan_token(plan), geom.kernel))
    elif name == "grouped":
        forget_derived(weight, ("conv_grouped", plan_token(plan), geom.kernel))
    elif name == "members":
        forget_derived(weight, ("conv_members", plan_token(plan), geom.kernel))
        if bias is not None:
            forget_derived(bias, ("conv_member_bias", plan_token(plan)))
    elif name == "members_split":
        forget_derived(weight, ("conv_members_split", plan_token(plan), geom.kernel))


# ----------------------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _triton_module():
    from pyfusion.triton_kernels import partial_conv2d as mod

    return mod


@functools.lru_cache(maxsize=512)
def _triton_meta(plan: SegmentPlan, kernel: tuple[int, int], device: torch.device):
    (i_s, i_m), (o_s, o_m) = kernel_segments(plan.in_segments), kernel_segments(plan.out_segments)
    return _triton_module().masked_conv_segment_meta(i_s, i_m, o_s, o_m, kernel, device)


def _tap_major(weight: Tensor, plan: SegmentPlan, kernel: tuple[int, int]) -> Tensor:
    """The packed weight with each W_o as (O_o, kh, kw, K_o) (channels contiguous), what the kernel reads."""
    kh, kw = kernel
    parts = []
    for o, (n_o, _m) in enumerate(plan.out_segments):
        k_o = plan.k_of_out[o]
        if n_o and k_o:
            off = plan.offsets[o] * kh * kw
            blk = weight[off : off + n_o * k_o * kh * kw].view(n_o, k_o, kh, kw)
            parts.append(blk.permute(0, 2, 3, 1).reshape(-1))
    return torch.cat(parts) if parts else weight.new_zeros(1)


def triton_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, geom: ConvGeom, activation: str, launcher=None
) -> Tensor:
    """One launch of the implicit-GEMM kernel (compiled on CUDA, or the CPU interpreter)."""
    mod = _triton_module()
    meta = _triton_meta(plan, geom.kernel, x.device)
    if launcher is None:  # eager: the tap-major copy once per weight version
        wt = derived_weight(weight, ("conv_tap_major", plan, geom.kernel), lambda w: _tap_major(w, plan, geom.kernel))
    else:  # traced (torch.compile): a functional copy in the graph
        wt = _tap_major(weight, plan, geom.kernel)
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], geom.kernel, geom.stride, geom.padding, geom.dilation)
    if x.shape[1] == 0 or plan.o_total == 0 or plan.stored == 0:
        y = x.new_zeros((x.shape[0], plan.o_total, ho, wo))
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return _activation(y, activation)
    return mod._launch(x, wt, wt, wt, bias, meta, geom.kernel, geom.stride, geom.padding, geom.dilation, activation,
                       launcher)  # fmt: skip


def _triton_available() -> list[str]:
    return backends.triton_gpu_reasons(import_check=False)


def _triton_supports(x, weight, bias, plan, geom, activation) -> list[str]:
    why = []
    if x.device.type != "cuda":
        why.append(f"x is on {x.device}, the compiled Triton kernel needs a CUDA tensor")
    if x.dtype not in TRITON_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float16/bfloat16")
    return why or backends.triton_import_reasons()


def _triton_fn(x, weight, bias, plan, geom, activation) -> Tensor:
    launcher = torch.library.wrap_triton if _mode() == "traceable" else None
    return triton_forward(x, weight, bias, plan, geom, activation, launcher)


def _interp_available() -> list[str]:
    return backends.triton_interpreter_reasons(import_check=False)


def _interp_supports(x, weight, bias, plan, geom, activation) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append("the Triton interpreter runs on CPU tensors")
    if x.dtype not in (torch.float32, torch.float16):
        why.append(f"the Triton interpreter supports float32/float16 here, not {x.dtype}")
    if _mode() is not None:
        why.append("the interpreter launch is forward-only and not traceable (the registered op runs); use 'torch'")
    return why or backends.triton_import_reasons()


def _interp_fn(x, weight, bias, plan, geom, activation) -> Tensor:
    return triton_forward(x, weight, bias, plan, geom, activation)


def _torch_fn(x, weight, bias, plan, geom, activation) -> Tensor:
    return torch_forward(x, weight, bias, plan, geom, activation)


def _reference_fn(x, weight, bias, plan, geom, activation) -> Tensor:
    from pyfusion.ops.reference import partial_conv2d_ref

    y = partial_conv2d_ref(x, weight, bias, plan.in_segments, plan.out_segments, geom.kernel, geom.stride,
                           geom.padding, geom.dilation, activation)  # fmt: skip
    return y.to(x.dtype)


DISPATCHER = Dispatcher(
    "partial_conv2d",
    [
        Backend(
            "triton",
            _triton_fn,
            available=_triton_available,
            supports=_triton_supports,
            description="one implicit-GEMM Triton launch on CUDA over the allowed (channel, tap) blocks, fused bias "
            "+ activation",
        ),
        Backend(
            "torch",
            _torch_fn,
            description="one conv per run of output segments over its gathered input channels, any device",
        ),
        Backend(
            "reference",
            _reference_fn,
            description="float64 dense weight with zero blocks (ops.reference.partial_conv2d_ref)",
        ),
        Backend(
            "triton_interpret",
            _interp_fn,
            available=_interp_available,
            supports=_interp_supports,
            description="the Triton kernel in the CPU interpreter (TRITON_INTERPRET=1; tests only, forward only)",
        ),
    ],
    arg_names=ARG_NAMES,
)
