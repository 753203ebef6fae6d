"""Backends of ``pyfusion::partial_linear`` and its dispatcher (segments and the packed weight:
:mod:`pyfusion.ops.layout`).

``y = act(x @ W^T + b)`` with ``act`` in ``none | relu | gelu | silu`` (GELU: torch's default, exact erf form) and
``W`` block sparse by member-mask segments: output segment o reads input segment i iff their masks intersect. The
packed weight (``W_o`` (O_o, K_o) per output segment, concatenated) lets every backend address each GEMM operand as
a view of the one flat buffer (no per-call weight copy):

* ``triton`` (CUDA): one Triton launch (:mod:`pyfusion.triton_kernels.partial_linear`), a grouped GEMM whose
  K-loop visits only the allowed input ranges, bias and activation fused in the epilogue; the range table is built
  once per (segments, device) and cached.
* ``cpp`` (CPU, float32 / float64, forward only, up to :func:`cpp_max_rows` rows): the panel engine
  ``_C.PanelLinearPlan`` (csrc/partial_linear/panel_linear.h), every block + bias + activation in one call. Its
  panel-packed weight is derived once per weight version (:func:`packed_panels`; never per call).
* ``torch`` (torch's BLAS, any device): per allowed input range one GEMM into a view of one preallocated output;
  output segments that read the same input range with the same row stride share one GEMM (the standard layout's
  branch rows on the shared input), equal blocks on consecutive input and output ranges one ``baddbmm`` (the
  standard layout's diagonal branch blocks). The standard layout is 3 BLAS calls.
* ``reference``: the float64 dense matrix with zero blocks (:func:`pyfusion.ops.reference.partial_linear_ref`).

Eager CPU inference (float32 / float64, nothing requires grad, ``PYFUSION_BACKEND`` unset) does not go through the
dispatcher: :func:`cpu_inference_forward` runs the strategy measured fastest for the layer (:mod:`.tuning`) among the
panel engine (``cpp``, up to :func:`cpp_max_rows` rows), the BLAS steps (``blas``), one GEMM per run of output
segments over its gathered inputs (``segments``: the members' GEMMs plus the shared rows), the members' own GEMMs
with the shared outputs summed (``members``: standard layouts with K >= 2 and shared outputs, :func:`members_forward`)
and the dense zero-block matrix (``dense``, where :func:`dense_candidate` allows it). No fixed rule was right
everywhere: measured on the 2-core VM the panel engine lost to the members run one after another at batch 1 on 27/60
shapes, and the BLAS steps lost 2.7x to the dense matrix on a 512 -> 10 classifier at batch 1024
(bench/results/partial_linear_cpu.md).
* ``triton_interpret``: the Triton kernel in the CPU interpreter (``TRITON_INTERPRET=1``; tests, forward only).

Backend functions take ``(x, weight, bias, plan, activation)`` with ``plan`` the cached
:class:`~pyfusion.ops.layout.SegmentPlan` (the registered op rebuilds it from its int lists). Inside the registered
op (:mod:`.registration`: autograd, torch.compile, torch.jit.trace) the forward-only backends decline, and while
the op's body is traced the ``torch`` backend uses its functional form and the Triton launch goes through
``torch.library.wrap_triton`` (:func:`op_context`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion import _ext, backends
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops._weight_cache import _version, derived_weight, entry_ref, track
from pyfusion.ops._weight_cache import forget as forget_derived
from pyfusion.ops.layout import ACTIVATIONS, SegmentPlan, kernel_segments
from pyfusion.ops.partial_linear.tuning import StrategyTuner

__all__ = [
    "CPP_MAX_ROWS",
    "DISPATCHER",
    "FLOAT_DTYPES",
    "TRITON_DTYPES",
    "blas_steps",
    "cpp_max_rows",
    "derived_weight",
    "op_context",
    "packed_panels",
    "torch_forward",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARG_NAMES = ("x", "weight", "bias", "plan", "activation")


# ----------------------------------------------------------------------------------------------------------
# Where the dispatcher runs: eagerly (the public function), or inside the registered op
# ----------------------------------------------------------------------------------------------------------

_STATE = threading.local()


@contextlib.contextmanager
def op_context(traceable: bool) -> Iterator[None]:
    """Marks dispatch from inside the registered op: forward-only backends decline; with ``traceable``
    (the op's body, which torch.compile and FakeTensor tracing run) the torch backend is functional and the
    Triton launch is wrapped with ``torch.library.wrap_triton``."""
    prev = getattr(_STATE, "mode", None)
    _STATE.mode = "traceable" if traceable else "op"
    try:
        yield
    finally:
        _STATE.mode = prev


def _mode() -> str | None:
    return getattr(_STATE, "mode", None)


def flatten(x: Tensor) -> Tensor:
    # A view for 2-D inputs of any strides and for contiguous N-D inputs; only N-D inputs whose leading
    # dims cannot be merged are copied (torch.reshape semantics).
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def rows_of(x: Tensor) -> int:
    """Number of rows of x flattened to (rows, I_total)."""
    if x.dim() == 2:
        return x.shape[0]
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


# ----------------------------------------------------------------------------------------------------------
# torch backend: the BLAS steps of a segment plan
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmStep:
    """``y[:, o0 : o0 + n_out] (+)= x[:, col : col + n_in] @ Wv^T`` with ``Wv`` the (n_out, n_in) view of the packed
    weight at ``w_off`` with row stride ``w_stride`` (rows of consecutive output segments of equal K_o are
    equally spaced, so several segments can share one step). ``first``: the step writes (bias or beta = 0)."""

    o0: int
    n_out: int
    col: int
    n_in: int
    w_off: int
    w_stride: int
    first: bool


@dataclass(frozen=True)
class BatchedStep:
    """``count`` equal blocks on consecutive input and output ranges, one ``baddbmm``: block b reads x columns
    ``col + b * n_in``, writes outputs ``o0 + b * n_out``, its weight at ``w_off + b * w_batch`` (row stride
    ``w_stride``)."""

    o0: int
    n_out: int
    col: int
    n_in: int
    w_off: int
    w_stride: int
    w_batch: int
    count: int
    first: bool


def _merge_and_batch(cur: list[tuple[int, int, int, int, tuple[int, int, int]]], first: bool) -> list:
    """Steps of one round: ``cur`` lists (o0, n_out, K_o, W_o offset, (col, n, q)) of consecutive output segments.
    Consecutive segments reading the same range (same column, same q, same K_o, adjacent rows) merge into one GEMM;
    runs of equal blocks whose input and output ranges follow each other become one batched GEMM."""
    merged: list[GemmStep] = []
    for o0, n_o, k_o, off, (col, n, q) in cur:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and prev.col == col
            and prev.n_in == n
            and prev.w_stride == k_o
            and prev.o0 + prev.n_out == o0
            and prev.w_off + prev.n_out * k_o == off + q
        ):
            merged[-1] = GemmStep(prev.o0, prev.n_out + n_o, col, n, prev.w_off, k_o, first)
        else:
            merged.append(GemmStep(o0, n_o, col, n, off + q, k_o, first))
    steps: list[GemmStep | BatchedStep] = []
    i = 0
    while i < len(merged):
        a = merged[i]
        run = 1
        while i + run < len(merged):
            b, prev = merged[i + run], merged[i + run - 1]
            if not (
                b.n_out == a.n_out
                and b.n_in == a.n_in
                and b.w_stride == a.w_stride
                and b.o0 == prev.o0 + prev.n_out
                and b.col == prev.col + prev.n_in
                and b.w_off - prev.w_off == merged[i + 1].w_off - a.w_off
            ):
                break
            run += 1
        if run >= 2:
            w_batch = merged[i + 1].w_off - a.w_off
            steps.append(BatchedStep(a.o0, a.n_out, a.col, a.n_in, a.w_off, a.w_stride, w_batch, run, first))
        else:
            steps.append(a)
        i += run
    return steps


def _rounds(segs: list[tuple[int, int, int, int, tuple]], first: bool) -> list:
    """Steps for output segments with range lists: round j takes every segment's j-th range."""
    steps: list = []
    depth = max((len(s[4]) for s in segs), default=0)
    for j in range(depth):
        cur = [(o0, n_o, k_o, off, rg[j]) for o0, n_o, k_o, off, rg in segs if j < len(rg)]
        steps += _merge_and_batch(cur, first and j == 0)
    return steps


def _merge_pieces(pieces: Sequence[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    out: list[list[int]] = []
    for col, n, q in pieces:
        if out and out[-1][0] + out[-1][1] == col and out[-1][2] + out[-1][1] == q:
            out[-1][1] += n
        else:
            out.append([col, n, q])
    return tuple((c, n, q) for c, n, q in out)


_PLAN_IDS: dict[int, tuple[SegmentPlan, int]] = {}
_PLAN_COUNT = itertools.count()


def plan_token(plan: SegmentPlan) -> int:
    """A small int naming this plan object, for hot-path cache keys: hashing a SegmentPlan hashes all its nested
    tuples at every call (2-5 us on the loaded VM, as much as a batch-1 GEMV of a 100x100 layer)."""
    ent = _PLAN_IDS.get(id(plan))
    if ent is None or ent[0] is not plan:
        if len(_PLAN_IDS) > _PER_PLAN_MAX:
            _PLAN_IDS.clear()
        ent = _PLAN_IDS[id(plan)] = (plan, next(_PLAN_COUNT))
    return ent[1]


# Entries kept per plan object before a memo starts over (segment_plan's own cache holds 1024 plans).
_PER_PLAN_MAX = 4096


def per_plan(fn):
    """``fn(plan, *rest)`` (an lru_cached function) remembered per plan object, looked up without hashing the plan
    (:func:`plan_token`); ``cache_clear()`` clears both."""
    memo: dict[tuple, tuple[SegmentPlan, object]] = {}

    @functools.wraps(fn)
    def wrapper(plan, *rest):
        k = (id(plan), *rest)
        ent = memo.get(k)
        if ent is not None and ent[0] is plan:
            return ent[1]
        if len(memo) > _PER_PLAN_MAX:
            memo.clear()
        value = fn(plan, *rest)
        memo[k] = (plan, value)
        return value

    def cache_clear() -> None:
        memo.clear()
        fn.cache_clear()

    wrapper.cache_clear = cache_clear
    return wrapper


# What a batch-1 strategy derives from a weight (its dense view or copy, the engine's panels), remembered by the
# weight object itself: _HOT[(id(weight), tag)] = (weakref to weight, plan, data_ptr, version, detached alias, value).
# A hit costs a dict lookup, a weakref call and two int reads (~0.4 us on the loaded VM), where derived_weight's
# general lookup (views keyed by their base, storage offset and size) costs ~1 us and ``weight.view(O, I)`` of a
# Parameter 0.75-1.8 us: measured in one process, interleaved, 15 rounds of 3000 calls (load 6 from other jobs), a
# 100 -> 100 alpha-0 layer's dense strategy at batch 1 took 8.9 us through dense_weight_of and 5.8 us from this cache
# (the bare F.linear with a plain weight: 5.4 us). The entry is valid while the weight is the same object with the
# same storage address (``param.data = other`` moves it: the alias held here keeps the old storage alive, so its
# address cannot be reused) and the same version (in-place updates: a derived copy is rebuilt, the dense view would
# stay right but is rebuilt too, at no cost that matters); it goes with the weight (weakref callback). Views made
# anew at each call (``param.reshape(-1)``) are not kept here (their identity changes every call): they take the
# general cache.
_HOT: dict[tuple[int, str], tuple] = {}


def hot_derived(weight: Tensor, plan: SegmentPlan, tag: str, build: Callable[[Tensor, SegmentPlan], object]) -> object:
    """``build(weight, plan)`` (a value derived from the weight for this plan, itself cached per weight version),
    remembered by the weight object (see ``_HOT``); never for an inference tensor (no version counter: an in-place
    change inside inference mode would go unseen, ``pyfusion.ops._weight_cache``)."""
    if _version(weight) < 0:
        return build(weight, plan)
    track(weight)
    k = (id(weight), tag)
    ent = _HOT.get(k)
    if (
        ent is not None
        and ent[0]() is weight
        and ent[1] is plan
        and ent[2] == weight.data_ptr()
        and ent[3] == _version(weight)
    ):
        return ent[5]
    value = build(weight, plan)
    if isinstance(value, Tensor) and value._base is weight:
        value = value.detach()  # a view of the weight would keep the weight (and so its entry) alive
    if weight._base is None:
        if len(_HOT) > _PER_PLAN_MAX:
            _HOT.clear()

        _HOT[k] = (entry_ref(_HOT, k, weight, 0), plan, weight.data_ptr(), _version(weight), weight.detach(), value)
    return value


def forget_hot(weight: Tensor, tag: str) -> None:
    """Drop the entry of ``hot_derived(weight, ..., tag)``, if any."""
    _HOT.pop((id(weight), tag), None)


@per_plan
@functools.lru_cache(maxsize=1024)
def blas_steps(plan: SegmentPlan, taps: int = 1) -> tuple[tuple[GemmStep | BatchedStep, ...], tuple[int, ...]]:
    """The GEMMs of a plan for the torch backend (cached per plan), and the output segments no range reaches
    (their outputs are the bias, or zero).

    Two covers of the stored blocks are built and the one with fewer BLAS calls is kept:

    * per output segment its maximal column ranges, visited in rounds (round j = every segment's j-th range; round
      0 writes, later rounds accumulate), merged across segments and batched (:func:`_merge_and_batch`);
    * the same after a *common prefix* step: a run of consecutive output segments with equal K_o whose W_o start
      with the same input segments gets one GEMM for those columns over all its rows (the standard layout's branch
      rows on the shared input), the rest in rounds (the diagonal blocks as one batched GEMM). The standard layout
      is then 3 calls: shared rows; branch rows x shared input; the diagonal blocks.

    ``taps`` scales input columns and K_o (a convolution's unfolded input, channel-major).
    """
    segs, pieces_of, idle = [], [], []
    for o, ranges in enumerate(plan.ranges):
        n_o = plan.out_segments[o][0]
        if n_o == 0:
            continue
        if not ranges:
            idle.append(o)
            continue
        segs.append((plan.out_starts[o], n_o, plan.k_of_out[o] * taps, plan.offsets[o] * taps,
                     tuple((c * taps, n * taps, q * taps) for c, n, q in ranges)))  # fmt: skip
        pieces, q = [], 0  # the allowed input segments one by one
        for i, (n_i, m_i) in enumerate(plan.in_segments):
            if n_i and m_i & plan.out_segments[o][1]:
                pieces.append((plan.in_starts[i] * taps, n_i * taps, q))
                q += n_i * taps
        pieces_of.append(tuple(pieces))
    plain = _rounds(segs, True)
    prefixed: list = []
    i = 0
    while i < len(segs):
        j = i + 1
        while j < len(segs) and segs[j][2] == segs[i][2] and segs[j][0] == segs[j - 1][0] + segs[j - 1][1]:
            j += 1
        if j - i >= 2:
            common = 0
            while (
                all(common < len(pieces_of[t]) for t in range(i, j))
                and len({pieces_of[t][common] for t in range(i, j)}) == 1
            ):
                common += 1
            if common:
                o0, n_rows = segs[i][0], segs[j - 1][0] + segs[j - 1][1] - segs[i][0]
                for r, (col, n, q) in enumerate(_merge_pieces(pieces_of[i][:common])):
                    prefixed.append(GemmStep(o0, n_rows, col, n, segs[i][3] + q, segs[i][2], r == 0))
                rest = [(s[0], s[1], s[2], s[3], _merge_pieces(pieces_of[t][common:])) for t, s in
                        zip(range(i, j), segs[i:j])]  # fmt: skip
                prefixed += _rounds(rest, False)
                i = j
                continue
        prefixed += _rounds(segs[i:j], True)
        i = j
    best = prefixed if len(prefixed) < len(plain) else plain
    return tuple(best), tuple(idle)


def _apply_activation_(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return y.relu_()
    if activation == "gelu":
        return F.gelu(y)
    if activation == "silu":
        return F.silu(y, inplace=True)
    return y


def _activation(y: Tensor, activation: str) -> Tensor:
    fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}.get(activation)
    return y if fn is None else fn(y)


# Below this many rows a batched step runs as a loop of addmm_ (GEMV) instead of one baddbmm: torch's CPU bmm
# opens an OpenMP region even for M = 1; measured with 2 threads on the loaded 2-core VM (load ~12), ViT-S
# branches (K=2, 384->1536): M=1 baddbmm 23 ms vs loop 0.43 ms; M=8 both 0.27 ms.
_BMM_MIN_ROWS = 8


def _blas_forward_2d(x2: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, taps: int = 1) -> Tensor:
    """Pre-activation ``x2 @ W^T + b`` for 2-D x2 (M, I_total * taps) -> (M, O_total): the :func:`blas_steps` into
    views of one output; reads x2 in place (column slices are strided views, never copies)."""
    m = x2.shape[0]
    o_tot = plan.o_total
    y = x2.new_empty((m, o_tot))
    steps, idle = blas_steps(plan, taps)
    sm, sk = x2.stride()
    w_base = weight.storage_offset()
    for st in steps:
        if isinstance(st, GemmStep):
            ys = y[:, st.o0 : st.o0 + st.n_out]
            xs = x2[:, st.col : st.col + st.n_in]
            wv = weight.as_strided((st.n_out, st.n_in), (st.w_stride, 1), w_base + st.w_off)
            if not st.first:
                ys.addmm_(xs, wv.t())
            elif bias is not None:
                torch.addmm(bias[st.o0 : st.o0 + st.n_out], xs, wv.t(), out=ys)
            else:
                torch.mm(xs, wv.t(), out=ys)
            continue
        c, no, ni = st.count, st.n_out, st.n_in
        if m < _BMM_MIN_ROWS:
            for b in range(c):
                ys = y[:, st.o0 + b * no : st.o0 + (b + 1) * no]
                xs = x2[:, st.col + b * ni : st.col + (b + 1) * ni]
                wv = weight.as_strided((no, ni), (st.w_stride, 1), w_base + st.w_off + b * st.w_batch)
                if not st.first:
                    ys.addmm_(xs, wv.t())
                elif bias is not None:
                    torch.addmm(bias[st.o0 + b * no : st.o0 + (b + 1) * no], xs, wv.t(), out=ys)
                else:
                    torch.mm(xs, wv.t(), out=ys)
            continue
        # (count, M, n_in), (count, M, n_out) and (count, n_in, n_out) views; one as_strided each (unflatten +
        # transpose costs ~7 us per view in eager mode, as much as a batch-1 GEMM of a 100x100 block).
        xb = x2.as_strided((c, m, ni), (ni * sk, sm, sk), x2.storage_offset() + st.col * sk)
        yv = y.as_strided((c, m, no), (no, o_tot, 1), st.o0)
        wt = weight.as_strided((c, ni, no), (st.w_batch, 1, st.w_stride), w_base + st.w_off)
        if st.first:
            if bias is not None:
                yv.copy_(bias[st.o0 : st.o0 + c * no].view(c, 1, no).expand(c, m, no))
                yv.baddbmm_(xb, wt)
            else:
                yv.baddbmm_(xb, wt, beta=0.0)
        else:
            yv.baddbmm_(xb, wt)
    for o in idle:
        o0, n_o = plan.out_starts[o], plan.out_segments[o][0]
        if bias is not None:
            y[:, o0 : o0 + n_o].copy_(bias[o0 : o0 + n_o].expand(m, n_o))
        else:
            y[:, o0 : o0 + n_o].zero_()
    return y


def _functional_forward_2d(x2: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, taps: int = 1) -> Tensor:
    """Same result as :func:`_blas_forward_2d` without in-place writes into views: the form traced for
    torch.compile / torch.export / torch.jit.trace (functionalization cannot replay in-place BLAS into views)."""
    m = x2.shape[0]
    parts = []
    for o, ranges in enumerate(plan.ranges):
        n_o = plan.out_segments[o][0]
        if n_o == 0:
            continue
        k_o = plan.k_of_out[o] * taps
        off = plan.offsets[o] * taps
        w_o = weight[off : off + n_o * k_o].view(n_o, k_o)
        b_o = None if bias is None else bias[plan.out_starts[o] : plan.out_starts[o] + n_o]
        z = None
        for col, n, q in ranges:
            col, n, q = col * taps, n * taps, q * taps
            t = F.linear(x2[:, col : col + n], w_o[:, q : q + n], b_o if z is None else None)
            z = t if z is None else z + t
        if z is None:
            z = x2.new_zeros((m, n_o)) if b_o is None else b_o.expand(m, n_o).clone()
        parts.append(z)
    if not parts:
        return x2.new_zeros((m, plan.o_total))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def torch_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str, functional: bool = False
) -> Tensor:
    fwd = _functional_forward_2d if functional else _blas_forward_2d
    y = fwd(flatten(x), weight, bias, plan)
    y = _activation(y, activation) if functional else _apply_activation_(y, activation)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# triton backend
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _triton_module():
    from pyfusion.triton_kernels import partial_linear as mod

    return mod


@functools.lru_cache(maxsize=512)
def _triton_meta(plan: SegmentPlan, device: torch.device):
    """The kernel's range table for a plan on a device, built once (a host-to-device copy per call otherwise)."""
    (i_s, i_m), (o_s, o_m) = kernel_segments(plan.in_segments), kernel_segments(plan.out_segments)
    return _triton_module().masked_segment_meta(i_s, i_m, o_s, o_m, device)


def triton_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str, launcher=None
) -> Tensor:
    """One launch of the Triton kernel (compiled on CUDA, or the CPU interpreter); ``launcher``:
    ``torch.library.wrap_triton`` while the registered op is traced, else None (direct launch)."""
    mod = _triton_module()
    meta = _triton_meta(plan, x.device)
    x2 = flatten(x)
    if x2.shape[1] == 0 or plan.o_total == 0:  # nothing to multiply: the bias (or zeros)
        y = x2.new_zeros((x2.shape[0], plan.o_total)) if bias is None else bias.expand(x2.shape[0], -1).clone()
        y = _activation(y, activation)
    else:
        y = mod.partial_linear_segments_fwd(x2, weight.contiguous(), bias, meta, activation, launcher=launcher)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# cpp backend: the panel engine
# ----------------------------------------------------------------------------------------------------------

# Rows up to which the panel engine runs instead of torch's BLAS. Measured with
# bench/bench_partial_linear.py --crossover (float32, K = 2 and 4, alpha 0.25-1, widths 100-3072, 1 and 2
# threads, 2-core AMD EPYC VM): see _CROSSOVER_NOTE for the numbers. The engine has no cache blocking over the
# input columns (a panel row streams K_o values per output tile), so BLAS wins once the input block no longer
# fits in L2 at large batch; below the crossover it wins by 1.1-3x (one call, fused epilogue, no Python views).
CPP_MAX_ROWS = 128
# Above this many stored weights (multiply-adds per row) the crossover is CPP_MAX_ROWS_WIDE instead.
CPP_WIDE_WEIGHTS = 1 << 22
CPP_MAX_ROWS_WIDE = 64
_CROSSOVER_NOTE = "see bench/results/partial_linear_cpu.md (crossover section)"

_CPP_DTYPES = (torch.float32, torch.float64)
_ACT_IDS = {a: i for i, a in enumerate(ACTIVATIONS)}  # the engine's codes: 0 none, 1 relu, 2 gelu, 3 silu


def cpp_max_rows(plan: SegmentPlan) -> int:
    """Rows up to which the panel engine runs for this layer (the measured crossover with torch's BLAS)."""
    return CPP_MAX_ROWS_WIDE if plan.stored > CPP_WIDE_WEIGHTS else CPP_MAX_ROWS


def _cpp_available() -> list[str]:
    why = backends.cpp_reasons()
    if not why and not hasattr(_ext._C, "PanelLinearPlan"):
        why = ["the compiled extension predates the panel engine; rebuild it (tools/dev_build.sh)"]
    return why


def _cpp_supports(x, weight, bias, plan, activation) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the panel engine runs on CPU tensors")
    if x.dtype not in _CPP_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float64")
    rows, top = rows_of(x), cpp_max_rows(plan)
    if rows > top:
        why.append(
            f"{rows} rows > {top} (the measured crossover for {plan.stored} stored weights: torch's BLAS is faster "
            "on larger batches)"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        why.append("autograd is recording (a tensor requires grad): the engine is forward-only, use 'torch'")
    if _mode() is not None:
        why.append(
            "the registered op runs (autograd, torch.compile or torch.jit.trace): the engine is forward-only and "
            "reads data pointers"
        )
    return why


@per_plan
@functools.lru_cache(maxsize=1024)
def _panel_plan(plan: SegmentPlan, activation: str):
    """The engine's plan of a segment plan (canonical segments), built once per (layout, activation).

    ``PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS`` (read when a plan is built) overrides the work size from which the
    engine runs OpenMP threads.
    """
    engine = _ext._C.PanelLinearPlan(*_panel_plan_args(plan, activation))
    override = os.environ.get("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "").strip()
    if override:
        try:
            engine.parallel_min_macs = int(override)
        except ValueError:
            raise ValueError(
                f"PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS must be an integer; got {override!r}"
            ) from None
    return engine


def packed_panels(weight: Tensor, plan: SegmentPlan, activation: str) -> tuple[object, Tensor]:
    """(engine plan, panel-packed weight) of ``weight`` for this plan, packed once per weight version
    (:func:`pyfusion.ops._weight_cache.derived_weight`: rebuilt after in-place updates, ``.data`` swaps, for new
    tensors). The packing reads the storage format once (``pack_segments``, O(stored weights))."""
    engine = _panel_plan(plan, activation)

    def build(src: Tensor) -> Tensor:
        src = src.contiguous()
        panels = torch.empty(max(engine.packed_size(src.element_size()), 1), dtype=src.dtype)
        pack = engine.pack_segments_f32 if src.dtype == torch.float32 else engine.pack_segments_f64
        pack(src.data_ptr(), panels.data_ptr())
        return panels

    return engine, derived_weight(weight, ("panels", engine), build)


@per_plan
@functools.lru_cache(maxsize=1024)
def _panel_plan_threaded(plan: SegmentPlan, activation: str):
    """The engine's plan of :func:`_panel_plan` with OpenMP from any work size (``parallel_min_macs = 0``): the
    ``cpp_threads`` strategy, which runs the same packed panels (the execution format does not depend on the thread
    rule) on every thread where the engine's fixed threshold would run one. The threshold (2^19 multiply-adds) was
    measured on the AMD VM; on the Intel Xeon VM (4 MiB L2 per core) at 2 threads, batch 1, 512 -> 512 K=2 alpha
    0.75 (508k stored weights, just under it) the engine took 41-46 us on one thread and 18-20 us on two, where the
    two members as nn.Linear took 30-32 us (1000 back-to-back calls, min of 7, idle machine). Which side of the
    break-even a layer falls on depends on the machine and its load, so the tuner measures both."""
    engine = _ext._C.PanelLinearPlan(*_panel_plan_args(plan, activation))
    engine.parallel_min_macs = 0
    return engine


def _panel_plan_args(plan: SegmentPlan, activation: str) -> tuple:
    (i_s, i_m), (o_s, o_m) = kernel_segments(plan.in_segments), kernel_segments(plan.out_segments)
    return list(i_s), list(i_m), list(o_s), list(o_m), _ACT_IDS[activation]


# The work (rows x stored weights) from which the threaded engine is a candidate, below the engine's threshold: under
# 2^16 multiply-adds a parallel region's wake-up costs more than the split saves (AMD VM, --threshold: 29k MACs 1.6 us
# on one thread, 4.1 us on two; 115k 4.3 / 4.7).
CPP_THREADS_MIN_MACS = 1 << 16


def cpp_threads_candidate(plan: SegmentPlan, activation: str, rows: int) -> bool:
    """Whether ``cpp_threads`` differs from ``cpp`` and may pay: more than one thread, and a work size between
    :data:`CPP_THREADS_MIN_MACS` and the engine's own threshold (from which ``cpp`` is threaded too)."""
    work = rows * plan.stored
    return (
        torch.get_num_threads() > 1 and CPP_THREADS_MIN_MACS <= work < _panel_plan(plan, activation).parallel_min_macs
    )


_CPP_TAGS = {a: "panels_" + a for a in ACTIVATIONS}
_PACKERS = {a: functools.partial(lambda w, p, a: packed_panels(w, p, a), a=a) for a in ACTIVATIONS}


def cpp_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str, threaded: bool = False
) -> Tensor:
    """Forward through the panel engine (CPU, float32/float64, no autograd).

    x needs a unit column stride (any row stride); other inputs are copied first. The packed panels come from
    :func:`packed_panels` (the weight's version and storage are checked at every call). ``threaded``: OpenMP from
    any work size (:func:`_panel_plan_threaded`), else from the engine's threshold.
    """
    x2 = flatten(x)
    m, i_total = x2.shape
    sm, sk = x2.stride()
    if sk != 1 and i_total > 1:
        x2 = x2.contiguous()
        sm = i_total
    if bias is not None:
        if bias.dtype != x.dtype or not bias.is_cpu:  # the engine reads it through its address as x's dtype
            raise ValueError(f"bias must have x's dtype and device ({x.dtype}, cpu); got ({bias.dtype}, {bias.device})")
        if not bias.is_contiguous():
            bias = bias.contiguous()
    try:
        engine, panels = hot_derived(weight, plan, _CPP_TAGS[activation], _PACKERS[activation])
        y = x2.new_empty(m, plan.o_total)
        px, py, pb = x2.data_ptr(), y.data_ptr(), 0 if bias is None else bias.data_ptr()
    except RuntimeError:
        # Tensors without storage that still report a CPU device (FakeTensor, torch.func's vmap/grad wrappers):
        # the functional BLAS form (no out= / in-place writes, which vmap has no batching rules for).
        return torch_forward(x, weight, bias, plan, activation, functional=True)
    if threaded:
        engine = _panel_plan_threaded(plan, activation)
    run = engine.forward_f32 if x.dtype == torch.float32 else engine.forward_f64
    run(px, m, sm, panels.data_ptr(), pb, py, plan.o_total, torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.o_total)


def cpp_threads_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> Tensor:
    """The panel engine on every thread whatever the work size (:func:`_panel_plan_threaded`)."""
    return cpp_forward(x, weight, bias, plan, activation, threaded=True)


# ----------------------------------------------------------------------------------------------------------
# CPU inference: the measured choice among equivalent strategies
# ----------------------------------------------------------------------------------------------------------


@per_plan
@functools.lru_cache(maxsize=1024)
def segment_runs(plan: SegmentPlan) -> tuple[tuple[tuple[int, int, tuple[tuple[int, int], ...], int, int], ...],
                                             tuple[int, ...]]:  # fmt: skip
    """Runs of consecutive output segments that read the same input ranges: ``(o0, n_out, ((col, n), ...), K_o,
    w_off)`` (their ``W_o`` are consecutive in the packed weight: one contiguous (n_out, K_o) matrix), and the output
    segments that read nothing."""
    runs: list[tuple[int, int, tuple[tuple[int, int], ...], int, int]] = []
    idle: list[int] = []
    for o, ranges in enumerate(plan.ranges):
        n_o = plan.out_segments[o][0]
        if n_o == 0:
            continue
        if not ranges:
            idle.append(o)
            continue
        rg = tuple((col, n) for col, n, _q in ranges)
        if runs and runs[-1][2] == rg and runs[-1][0] + runs[-1][1] == plan.out_starts[o]:
            o0, n, _rg, k_o, off = runs[-1]
            runs[-1] = (o0, n + n_o, rg, k_o, off)
        else:
            runs.append((plan.out_starts[o], n_o, rg, plan.k_of_out[o], plan.offsets[o]))
    return tuple(runs), tuple(idle)


def segment_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> Tensor:
    """One GEMM per run of output segments (:func:`segment_runs`) over its input columns, gathered into one
    contiguous block when they are several ranges (the standard layout's branch k reads [shared | branch_k]): the
    K members' GEMMs with the shared rows added, each with a contiguous weight (at alpha = 1 exactly the members
    run one after another)."""
    x2 = flatten(x)
    m = x2.shape[0]
    y = x2.new_empty((m, plan.o_total))
    runs, idle = segment_runs(plan)
    for o0, n_out, rg, k_o, off in runs:
        xs = x2[:, rg[0][0] : rg[0][0] + rg[0][1]] if len(rg) == 1 else torch.cat([x2[:, c : c + n] for c, n in rg], 1)
        w = weight[off : off + n_out * k_o].view(n_out, k_o)
        ys = y[:, o0 : o0 + n_out]
        if bias is not None:
            torch.addmm(bias[o0 : o0 + n_out], xs, w.t(), out=ys)
        else:
            torch.mm(xs, w.t(), out=ys)
    for o in idle:
        o0, n_o = plan.out_starts[o], plan.out_segments[o][0]
        if bias is not None:
            y[:, o0 : o0 + n_o].copy_(bias[o0 : o0 + n_o].expand(m, n_o))
        else:
            y[:, o0 : o0 + n_o].zero_()
    y = _apply_activation_(y, activation)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.o_total)


@per_plan
@functools.lru_cache(maxsize=1024)
def member_layout(plan: SegmentPlan) -> tuple[int, int, tuple[int, ...], int, tuple[int, ...]] | None:
    """``(K, I_s, (I_1..I_K), O_s, (O_1..O_K))`` of a standard layout that the member-shaped strategies run (the
    linear :func:`members_forward`, the convolution's ``members``): K >= 2, shared outputs O_s >= 1, every branch
    with inputs; else None. Without shared outputs the member products are the output runs themselves
    (:func:`segment_forward`); a layout of member subsets has no member-shaped blocks."""
    if plan.standard is None:
        return None
    il, ol = plan.standard
    k = len(il) - 1
    if k < 2 or ol[0] == 0 or min(il[1:]) == 0:
        return None
    return k, il[0], tuple(il[1:]), ol[0], tuple(ol[1:])


def member_blocks(src: Tensor, plan: SegmentPlan, taps: int = 1) -> tuple[list[Tensor], Tensor | None]:
    """The member-shaped weights of a :func:`member_layout` plan cut from its packed weight ``src`` (flat, ``taps``
    values per (output, input) pair: 1 for a linear layer, kh kw for a convolution), as new contiguous tensors: per
    member k, rows [shared outputs | branch k], (O_s + O_k, I_s + I_1, taps) over [x_s | x_1] for member 1 (W_ss is
    member 1's) and (O_s + O_k, I_k, taps) over x_k alone for the others; and the rows of branches 2..K on the
    shared inputs stacked, (O_2 + ... + O_K, I_s, taps) (None without shared inputs or without those rows). Each
    stored weight once in all (the linear :func:`members_forward`, the convolution's ``members_split``)."""
    k, i_s, i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]
    i_tot, offs = plan.i_total, plan.offsets
    # standard layout: out segment 0 (shared) reads every input, out segment j + 1 (branch j) [x_s | x_j]
    w_s = src[offs[0] * taps : (offs[0] + o_s * i_tot) * taps].view(o_s, i_tot, taps)
    w_b = [
        src[offs[j + 1] * taps : (offs[j + 1] + o_b[j] * (i_s + i_b[j])) * taps].view(o_b[j], i_s + i_b[j], taps)
        for j in range(k)
    ]
    out = [torch.cat([w_s[:, : i_s + i_b[0]], w_b[0]])]
    i0 = i_s + i_b[0]
    for j in range(1, k):
        out.append(torch.cat([w_s[:, i0 : i0 + i_b[j]], w_b[j][:, i_s:]]))
        i0 += i_b[j]
    cross = torch.cat([w_b[j][:, :i_s] for j in range(1, k)]) if i_s and sum(o_b[1:]) else None
    return out, cross


def member_weights(weight: Tensor, plan: SegmentPlan) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The weights of :func:`members_forward` for a :func:`member_layout` plan, transposed (the GEMMs' right
    operands; contiguous before the transpose), copied from the packed weight's blocks once per weight version
    (:func:`derived_weight`): per member k the weight of its member-shaped product, rows [shared outputs | branch
    k], over [x_s | x_1] for member 1 (W_ss is member 1's) and over x_k alone for the others; and the rows of
    branches 2..K on the shared inputs, stacked ((O_2 + ... + O_K, I_s) before the transpose; None without shared
    inputs or without those rows). The stored weights once in all."""

    def build(src: Tensor) -> tuple[tuple[Tensor, ...], Tensor | None]:
        out, cross = member_blocks(src, plan)
        return tuple(w.squeeze(2).t() for w in out), None if cross is None else cross.squeeze(2).t()

    return derived_weight(weight, ("members", plan_token(plan)), build)


def members_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> Tensor:
    """The K members' GEMMs (:func:`member_weights`, remembered by :func:`hot_derived`) for a :func:`member_layout`
    plan: member 1 over [x_s | x_1] with outputs [shared | branch 1], member k >= 2 over x_k with outputs [shared |
    branch k], the shared outputs the sum of the members' partial results; then one GEMM adds the branches 2..K
    rows on x_s. The effective FLOPs exactly (no zero block), in K + 1 GEMMs whose shapes are the members'.

    Member k >= 2 reads x_k alone (a column slice) rather than a gathered [x_s | x_k] (the convolution's members
    do): on the 2-core VM at 2 threads, 100 -> 100 K=2 alpha 0.75, batch 1024, float32, the gather (torch.cat, or
    copies into column slices, of two column ranges of the (1024, 175) input) took 43-48 us, more than the
    1024 x 25 -> 75 GEMM on x_s accumulated into y (32 us), and multiplies the (K - 1) O_s I_s zeros of W_ss. The
    whole strategy: 310 us, against 330 for the BLAS steps and 249 for the two members run one after another
    (which write two separate outputs: no shared sums, no bias columns to place).

    No output is copied: members K..2 run first, each writing its rows straight into y at ``[start of branch k -
    O_s, end of branch k)``, its shared part landing on columns that a lower member writes later (read into the
    shared accumulator at once); member 1 last, into ``[0, O_s + O_1)``, then the accumulator and the cross rows
    are added, and the bias once over the whole (contiguous) y: one op instead of member 1's addmm (a bias copy
    into a column slice of y) plus one add per branch slice; 304 against 310 us in all (same case as above,
    within the noise, one op less)."""
    k, i_s, i_b, o_s, o_b = member_layout(plan)  # type: ignore[misc]
    ws, cross = hot_derived(weight, plan, "members", member_weights)
    x2 = flatten(x)
    m = x2.shape[0]
    y = x2.new_empty((m, plan.o_total))
    acc = None
    o_end, i_end = plan.o_total, plan.i_total
    for j in range(k - 1, 0, -1):
        o0, i0 = o_end - o_b[j], i_end - i_b[j]
        out = y[:, o0 - o_s : o_end]
        torch.mm(x2[:, i0:i_end], ws[j], out=out)
        if acc is None:
            acc = out[:, :o_s].clone()
        else:
            acc.add_(out[:, :o_s])
        o_end, i_end = o0, i0
    n0 = o_s + o_b[0]
    torch.mm(x2[:, : i_s + i_b[0]], ws[0], out=y[:, :n0])
    y[:, :o_s].add_(acc)
    if cross is not None:
        y[:, n0:].addmm_(x2[:, :i_s], cross)
    if bias is not None:
        y.add_(bias)
    y = _apply_activation_(y, activation)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.o_total)


def dense_is_view(plan: SegmentPlan) -> bool:
    """True when the packed weight is the dense (O_total, I_total) matrix itself (one output run reading every
    input column: alpha = 0, a layer whose segments all intersect)."""
    runs, idle = segment_runs(plan)
    return not idle and len(runs) == 1 and runs[0][1] == plan.o_total and runs[0][2] == ((0, plan.i_total),)


# The dense zero-block matrix is a candidate when it is at most this many times the stored weights, or at most
# DENSE_SMALL entries: it is cached next to the weight (once per weight version), so it costs that much memory, and
# where it is larger it does proportionally more work and never won (bench/results/partial_linear_cpu.md: dense_zero
# at K=2 alpha 0.5 is 0.82-1.08x ours at batch 1024 on 100-768 wide layers, at ratio 1.3; it wins on tiny layers,
# 512 -> 10 at 2.7x ours, where one BLAS call beats the 3-5 calls of the block paths).
DENSE_MAX_RATIO = 1.5
DENSE_SMALL = 1 << 18  # 1 MiB of float32


def dense_candidate(plan: SegmentPlan, taps: int = 1) -> bool:
    """Whether the dense zero-block weight is worth trying for this plan (see DENSE_MAX_RATIO)."""
    dense = plan.o_total * plan.i_total * taps
    return dense <= DENSE_MAX_RATIO * plan.stored * taps or dense <= DENSE_SMALL


def dense_weight_of(weight: Tensor, plan: SegmentPlan, taps_shape: tuple[int, ...] = ()) -> Tensor:
    """The dense (O_total, I_total, *taps) zero-block weight: a view of the packed weight when it is the dense matrix
    (:func:`dense_is_view`), else built once per weight version and cached (:func:`derived_weight`)."""
    if dense_is_view(plan):
        return weight.view(plan.o_total, plan.i_total, *taps_shape)

    def build(src: Tensor) -> Tensor:
        from pyfusion.ops.layout import unpack_segment_weight

        return unpack_segment_weight(src, plan.in_segments, plan.out_segments, taps_shape).contiguous()

    return derived_weight(weight, ("dense", plan_token(plan), taps_shape), build)


def dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> Tensor:
    """One BLAS call with the dense zero-block weight (:func:`dense_weight_of`, remembered by :func:`hot_derived`)."""
    y = F.linear(x, hot_derived(weight, plan, "dense", dense_weight_of), bias)
    return y if activation == "none" else _apply_activation_(y, activation)


def blas_forward(x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str) -> Tensor:
    return torch_forward(x, weight, bias, plan, activation)


STRATEGIES = {
    "cpp": cpp_forward,
    "cpp_threads": cpp_threads_forward,
    "blas": blas_forward,
    "segments": segment_forward,
    "members": members_forward,
    "dense": dense_forward,
}
TUNER = StrategyTuner("partial_linear")
_CANDIDATES: dict[tuple, tuple[SegmentPlan, dict, str]] = {}


def _candidates(plan: SegmentPlan, small: bool, threads: bool = False) -> tuple[dict, str]:
    """(strategy name -> function, default) for a plan; ``small``: the panel engine may run (rows <= its
    crossover); ``threads``: its threaded form is worth measuring too (:func:`cpp_threads_candidate`)."""
    names: list[str] = []
    if small and not _cpp_available():
        names.append("cpp")
        if threads:
            names.append("cpp_threads")
    names += ["blas", "segments"]
    if member_layout(plan) is not None:  # (its FLOPs are the effective FLOPs exactly: no zero block to bound)
        names.append("members")
    if dense_candidate(plan):
        names.append("dense")
    if dense_is_view(plan):  # one block: the three BLAS paths are the same one GEMM
        names = [n for n in names if n not in ("blas", "segments")]
    return {n: STRATEGIES[n] for n in names}, ("cpp" if "cpp" in names else names[0])


def cpu_inference_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: SegmentPlan,
    activation: str,
    hot: tuple | None = None,
) -> Tensor:
    """Eager CPU inference (float32/float64, nothing requires grad, no ``PYFUSION_BACKEND``): the strategy measured
    fastest for this (layer, dtype, activation, row bucket, threads) (:mod:`.tuning`) among the panel engine (rows
    up to :func:`cpp_max_rows`), torch's BLAS steps, one GEMM per output run (:func:`segment_forward`), the
    members' GEMMs (:func:`members_forward`, :func:`member_layout` plans) and the dense zero-block weight
    (:func:`dense_candidate`).

    Once a key is measured its strategy is run from one dict lookup (``TUNER.fast``): the whole dispatch costs
    ~1 us, where the tuple keys and lookups of the measuring path cost ~3 us on the loaded VM (a batch-1 call of a
    100x100 layer's kernel is ~7 us).

    ``hot``: the caller's :func:`hot_key` for these (x, weight): once the strategy is settled, the pair's entry is
    installed in ``_HOT_CALLS`` (see :func:`hot_forward`)."""
    rows = x.shape[0] if x.dim() == 2 else rows_of(x)
    key = (id(plan), x.dtype, activation, rows if rows <= 4 else 1 << (rows - 1).bit_length(), torch.get_num_threads())
    ent = _FAST.get(key)
    if ent is not None and ent[0] is plan:
        if hot is not None:
            _install_hot(hot, weight, plan, activation, ent[1])
        return ent[1](x, weight, bias, plan, activation)
    return _measured_forward(x, weight, bias, plan, activation, rows, key, hot)


_FAST = TUNER.fast

# The modules' one-lookup path (partial_linear_module_forward): per (weight object, x.shape, x.dtype, activation,
# threads) the settled strategy, and for the dense strategy the dense zero-block weight itself, so that a call is one
# dict lookup, four identity/int tests and F.linear (for the panel engine on 2-D inputs, its panels and entry point:
# one engine call). The exact shape in the key stands for the width, rank, row
# bucket and dtype checks the entry was installed after (a new shape takes the checked path once). The entry holds
# a weakref to the weight (dropped with it), the weight's storage address and version when installed (an in-place
# update or a ``.data`` swap misses; a detached alias keeps the old storage alive so that its address cannot be
# reused while the entry exists) and nothing else of the weight. Weights whose version cannot be read (inference
# tensors) get no entry. Kept in TUNER.fast (emptied with the choices); its keys (id, torch.Size, ...) never equal
# the measuring path's (id, dtype, ...).
_HOT_CALLS = TUNER.fast


def hot_key(x: Tensor, weight: Tensor, activation: str) -> tuple:
    """The ``_HOT_CALLS`` key of a call (see :func:`hot_forward`)."""
    return (id(weight), x.shape, x.dtype, activation, torch.get_num_threads())


def _install_hot(hot: tuple, weight: Tensor, plan: SegmentPlan, activation: str, fn: Callable) -> None:
    if weight._base is not None:  # a view made anew at each call (EnsembleLinear's reshape): never hit again
        return
    try:
        ver = weight._version
    except RuntimeError:  # an inference tensor: no version counter to invalidate a derived weight by
        return
    track(weight)
    dense = hot_derived(weight, plan, "dense", dense_weight_of) if fn is dense_forward else None
    cpp = None
    if fn in (cpp_forward, cpp_threads_forward) and len(hot[1]) == 2:  # the engine called directly (hot_forward)
        engine, panels = hot_derived(weight, plan, _CPP_TAGS[activation], _PACKERS[activation])
        if fn is cpp_threads_forward:
            engine = _panel_plan_threaded(plan, activation)
        cpp = (engine.forward_f32 if weight.dtype == torch.float32 else engine.forward_f64, panels)
    if len(_HOT_CALLS) > _PER_PLAN_MAX:
        _HOT_CALLS.clear()

    _HOT_CALLS[hot] = (plan, entry_ref(_HOT_CALLS, hot, weight, 1), weight.data_ptr(), ver, weight.detach(), fn, dense,
                       cpp)  # fmt: skip


def hot_forward(
    hot: tuple, x: Tensor, weight: Tensor, bias: Tensor | None, plan: SegmentPlan, activation: str
) -> Tensor | None:
    """The settled strategy of ``hot`` (:func:`hot_key`) run from its entry, or None when there is none valid for
    this weight (same object, storage and version as when installed) and plan. The caller has checked everything
    the key does not stand for (eager, no autograd, no tracing, plain CPU x, no PYFUSION_BACKEND)."""
    ent = _HOT_CALLS.get(hot)
    # read on the weight itself (a TrackedParameter: each read costs 0.08 us more than on a plain Parameter), not
    # on the alias the entry holds: torch.utils.swap_tensors moves the version counter with the tensor's contents
    if ent is None or ent[0] is not plan or ent[1]() is not weight or ent[2] != weight.data_ptr():
        return None
    if ent[3] != weight._version:  # (weights whose version cannot be read have no entry)
        return None
    dense = ent[6]
    if dense is not None:
        y = F.linear(x, dense, bias)
        return y if activation == "none" else _apply_activation_(y, activation)
    cpp = ent[7]
    if (
        cpp is not None
        and x.stride(1) == 1
        and (bias is None or (bias.dtype is x.dtype and bias.is_cpu and bias.is_contiguous()))
    ):
        # the panel engine straight from the entry (its panels, its entry point for the dtype): what cpp_forward
        # does after its flattening, stride and cache checks. 1 thread, batch 1, 150 -> 150 K=2 alpha 0.5, 100 ->
        # 100 alpha 0 and 784 -> 100 first layer: the module call 0.9-1.9 us faster (p25 of 30 interleaved rounds
        # in one process, load 4.5), at or below the dense zero-block nn.Linear
        m = x.shape[0]
        y = x.new_empty(m, plan.o_total)
        cpp[0](x.data_ptr(), m, x.stride(0), cpp[1].data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
               plan.o_total, hot[4])  # fmt: skip
        return y
    return ent[5](x, weight, bias, plan, activation)


def _measured_forward(x, weight, bias, plan, activation, rows: int, key: tuple, hot: tuple | None = None) -> Tensor:
    small = rows <= cpp_max_rows(plan)
    threads = small and not _cpp_available() and cpp_threads_candidate(plan, activation, rows)
    pk = (id(plan), plan.stored, plan.o_total, plan.i_total, small, threads)
    ent = _CANDIDATES.get(pk)
    if ent is None or ent[0] is not plan:
        if len(_CANDIDATES) > _PER_PLAN_MAX:
            _CANDIDATES.clear()
        fns, default = _candidates(plan, small, threads)
        ent = _CANDIDATES[pk] = (plan, fns, default)
    _plan, fns, default = ent
    full = (pk, *key[1:])
    y = TUNER.run(full, fns, (x, weight, bias, plan, activation), default, _drop_derived)
    name = TUNER.settled(full, fns, default)
    if name is not None:
        if len(_FAST) > _PER_PLAN_MAX:
            _FAST.clear()
        _FAST[key] = (plan, fns[name])
        if hot is not None:
            _install_hot(hot, weight, plan, activation, fns[name])
    return y


def _drop_derived(name: str, args: tuple, kept: str = "") -> None:
    """Free what a measured strategy ``name`` derived from the weight (panels, the dense copy) when the ``kept`` one
    does not use it (both engine strategies run the same panels)."""
    _x, weight, _bias, plan, activation = args
    if name in ("cpp", "cpp_threads") and kept not in ("cpp", "cpp_threads"):
        forget_derived(weight, ("panels", _panel_plan(plan, activation)))
        forget_hot(weight, _CPP_TAGS[activation])
    elif name == "dense":
        forget_hot(weight, "dense")
        if not dense_is_view(plan):
            forget_derived(weight, ("dense", plan_token(plan), ()))
    elif name == "members":
        forget_hot(weight, "members")
        forget_derived(weight, ("members", plan_token(plan)))


# ----------------------------------------------------------------------------------------------------------
# Reasons and the dispatcher
# ----------------------------------------------------------------------------------------------------------


def _triton_available() -> list[str]:
    return backends.triton_gpu_reasons(import_check=False)  # triton itself is imported for a CUDA input only


def _triton_supports(x, weight, bias, plan, activation) -> list[str]:
    why = []
    if x.device.type != "cuda":
        why.append(f"x is on {x.device}, the compiled Triton kernel needs a CUDA tensor")
    if x.dtype not in TRITON_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float16/bfloat16")
    return why or backends.triton_import_reasons()


def _triton_fn(x, weight, bias, plan, activation) -> Tensor:
    launcher = torch.library.wrap_triton if _mode() == "traceable" else None
    return triton_forward(x, weight, bias, plan, activation, launcher)


def _torch_fn(x, weight, bias, plan, activation) -> Tensor:
    return torch_forward(x, weight, bias, plan, activation, functional=_mode() == "traceable")


def _interp_available() -> list[str]:
    return backends.triton_interpreter_reasons(import_check=False)


def _interp_supports(x, weight, bias, plan, activation) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append("the Triton interpreter runs on CPU tensors")
    if x.dtype not in (torch.float32, torch.float16):
        why.append(f"the Triton interpreter supports float32/float16 here, not {x.dtype}")
    if _mode() is not None:
        why.append(
            "the interpreter launch is forward-only and not traceable (the registered op runs: autograd or "
            "torch.compile); use the 'torch' backend"
        )
    return why or backends.triton_import_reasons()


def _interp_fn(x, weight, bias, plan, activation) -> Tensor:
    return triton_forward(x, weight, bias, plan, activation)


def _reference_fn(x, weight, bias, plan, activation) -> Tensor:
    from pyfusion.ops.reference import partial_linear_ref

    return partial_linear_ref(x, weight, bias, plan.in_segments, plan.out_segments, activation).to(x.dtype)


DISPATCHER = Dispatcher(
    "partial_linear",
    [
        Backend(
            "triton",
            _triton_fn,
            available=_triton_available,
            supports=_triton_supports,
            description="one Triton grouped-GEMM launch on CUDA over the allowed blocks, fused bias + activation",
        ),
        Backend(
            "cpp",
            cpp_forward,
            available=_cpp_available,
            supports=_cpp_supports,
            description=f"panel engine (<= {CPP_MAX_ROWS} rows, float32/64, CPU, inference): every allowed block + "
            "bias + activation in one call, weights packed once per version",
        ),
        Backend(
            "torch",
            _torch_fn,
            description="one BLAS call per allowed input range (merged across segments) into views of one output",
        ),
        Backend(
            "reference",
            _reference_fn,
            description="float64 dense matrix with zero blocks (ops.reference.partial_linear_ref)",
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
