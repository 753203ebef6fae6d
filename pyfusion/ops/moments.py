"""Shifted first and second moments of activations: the accumulation step of the statistics engine, and the
one-shot neuron correlation built on it.

``pyfusion::accumulate_moments`` adds a batch x (N, D) to a *shifted* state (DESIGN §5): with a shift vector
c close to the mean (:func:`moment_shift`), ``s1 += sum_n (x_n - c)`` (D,) and the lower triangle of
``s2 += sum_n (x_n - c)(x_n - c)^T`` (D, D), both float64. Because c is close to the mean, the centered second
moment ``M2 = s2 - s1 s1^T / N`` suffers no cancellation: a mean offset of 1e3 with unit or smaller variance
costs no accuracy, unlike the one-pass ``E[x x^T] - E[x] E[x]^T`` in float32. Backends: ``torch`` (the BLAS path,
for off-diagonal rectangles such as the cross block of two members: a C++ prepass shifts the batch to float32 with s1
and the diagonal in float64, then float32 ``torch.mm`` over panels of ``BLAS_PANEL`` rows, each added to the float64
state; 1.2-1.4x the engine where it applies on Intel CPUs, see the measurements beside ``BLAS_PANEL``; on other
vendors' AVX-512 CPUs oneMKL runs AVX2 code and the engine comes first, :func:`_blas_defers`), ``cpp``
(csrc/correlation: cache-blocked lower-triangle SYRK in float32 over panels of 256 samples with float64
accumulation, OpenMP; only the requested rectangles and the diagonal when given), ``cuda`` (tiled SYRK with float64
atomics) and ``reference`` (float64 torch,
:func:`pyfusion.ops.reference.accumulate_moments_ref`; also the path for float64 input).
:class:`pyfusion.stats.ActivationStats` streams batches through it.

``pyfusion::correlation`` is the Pearson correlation between the columns of x (N, Dx) and y (N, Dy): the
moments of ``[x | y]`` from one accumulation of its cross block and diagonal (of x alone for ``correlation(x, x)``),
then the (x, y) block (backends ``cpp``, ``cuda``; ``torch``: x and y shifted by the prepass and one float32
``torch.mm`` per panel, without the state of ``[x | y]``), or the
two-pass float64 :func:`pyfusion.ops.reference.correlation_ref` (``reference``, also for float64 input).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from pyfusion import _ext
from pyfusion._finite import all_finite
from pyfusion.backends import cpp_reasons, cuda_reasons
from pyfusion.dispatch import Backend, Dispatcher, forced_backend
from pyfusion.ops._registry import LazyOp
from pyfusion.ops.reference import accumulate_moments_ref, correlation_ref

__all__ = [
    "ACCUMULATE",
    "CONST_RTOL",
    "CORRELATION",
    "SHIFT_SAMPLES",
    "accumulate_moments",
    "accumulate_moments_blocks",
    "all_finite",
    "correlation",
    "moment_shift",
    "shift_probe",
]

# A neuron is treated as constant (zero variance) when std <= CONST_RTOL * |mean|, or its variance is exactly 0.
# 1e-7 is about one float32 ulp of the mean: below it the variation of float32 activations is rounding noise.
CONST_RTOL = 1e-7

# Samples used to choose the shift c: enough that |mean - c| is ~std/16, so the cancellation in s2 - s1 s1^T/N
# is negligible, while costing one small pass over the batch. They are spread evenly over the batch (every
# ceil(N / 256)-th row), so that a batch sorted by value, or with a jump inside it, still gives its mean.
SHIFT_SAMPLES = 256

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shift_probe(x: Tensor) -> Tensor:
    """At most ``SHIFT_SAMPLES`` rows of x (N, D) spread evenly over it (every ceil(N / SHIFT_SAMPLES)-th row),
    as float64 (S, D): what the shift is estimated from."""
    step = -(-x.shape[0] // SHIFT_SAMPLES)
    return (x[::step] if step > 1 else x).to(torch.float64)


def moment_shift(x: Tensor) -> Tensor:
    """The shift c for a state's first batch x (N, D): the mean of :func:`shift_probe`'s rows, float64 rounded to
    float32 (so that x - c is exact or correctly rounded in the float32 kernels), (D,)."""
    return shift_probe(x).mean(0).to(torch.float32).to(torch.float64)


# ---- accumulate_moments: backends --------------------------------------------------------------------------
def _kernel_args(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor) -> tuple[int, ...]:
    """The pointer / size / stride arguments shared by the CPU and CUDA accumulation kernels."""
    return (
        x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], x.stride(0), x.stride(1),
        shift.data_ptr(), s1.data_ptr(), s2.data_ptr(),
    )  # fmt: skip


def _acc_cpp(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> None:
    _ext._C.corr_accumulate(  # type: ignore[union-attr]
        *_kernel_args(x, shift, s1, s2), torch.get_num_threads(), "auto", list(rects or ())
    )


def _acc_cuda(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> None:
    # the CUDA kernel accumulates the whole lower triangle (a superset of any rects)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        _ext._C.corr_accumulate_cuda(*_kernel_args(x, shift, s1, s2), stream)  # type: ignore[union-attr]


# The BLAS path (backend "torch"): a C++ prepass forms v = x - c in float32 (s1 and the diagonal of s2 in float64 in
# the same pass), then every requested off-diagonal rectangle of s2 gets torch.mm (MKL / oneDNN sgemm) of column
# blocks of v over panels of BLAS_PANEL rows, each float32 product block added to the float64 state in C++.
# Speed against the engine, cross block of two members (rects = [D, 2D) x [0, D)), loaded 2-core VM (load ~4),
# 1 thread, interleaved, min of 7: n = 2048 rows: D = 128 / 512 / 1024 per member 1.32x / 1.41x / 1.28x; n = 512:
# 1.18x / 1.19x / 1.16x; n = 256: 1.26x / 1.28x / 1.39x; n = 128: 1.11x / 1.21x / 0.87x; D = 64: 0.73x (n = 128)
# to 1.07x (n = 2048). Hence BLAS_MIN_ROWS and BLAS_MIN_SIDE.
# Correlation error against float64 (n = 16384, D = 256 + 256 correlated columns, offset 0 / 1e3; engine: 3.3e-8 /
# 4.2e-8): panels of 128 rows 4.7e-8 / 3.7e-8, 256: 8.4e-8 / 7.3e-8, 512: 8.0e-8 / 7.6e-8, 1024: 1.2e-7 / 1.1e-7,
# 2048: 1.6e-7 / 1.3e-7 (the float32 composite: ~2.5e-7). 512 keeps the float32 sums as short as MKL's own K
# blocking and costs one float64 add per 512 rows.
BLAS_PANEL = 512
BLAS_MIN_ROWS = 256
BLAS_MIN_SIDE = 128


# Those measurements are Intel's. oneMKL (torch's BLAS on x86) picks its code path by CPU vendor and runs AVX2 kernels
# on any other vendor's CPU, AVX-512 or not, while the engine's micro-kernel is AVX-512 wherever the CPU has it. AMD
# EPYC (Zen 5, family 26), 1 thread, cross block of 512 rows x (1024 + 1024) columns: torch.mm 109 GFLOP/s (the BLAS
# path with its prepass and float64 add: 102), the engine 186 GFLOP/s (N = 4096 in one call: 92 against 172); an
# activation matching of an MLP 784-1024x3-10 pair on 4096 samples: 0.76 s on the BLAS path, 0.64 s on the engine.
# There the automatic choice takes the engine first (the BLAS path still runs when PYFUSION_BACKEND forces it).
def _blas_defers() -> list[str]:
    """Why the automatic choice passes the BLAS path over for the engine on this machine (empty: it does not)."""
    return list(_mkl_without_avx512())


@functools.cache
def _mkl_without_avx512() -> tuple[str, ...]:
    c = _ext._C
    vendor = _ext.mkl_avx2_vendor()
    if c is None or vendor is None or c.corr_best_isa() != "avx512":
        return ()
    return (
        f"torch's float32 GEMM is oneMKL, which runs its AVX2 kernels on this {vendor} CPU: the engine's AVX-512 "
        "kernel is faster (1.8x on a cross block of 512 rows on AMD Zen 5)",
    )


def _blas_rects(rects: list[int] | None) -> list[tuple[int, int, int, int]]:
    """The non-empty rectangles of ``rects`` (the engine's [0, 0, 0, 0] placeholder for "diagonal only" drops)."""
    out = []
    for i in range(0, len(rects or ()), 4):
        r0, r1, c0, c1 = rects[i : i + 4]  # type: ignore[index]
        if r1 > r0 and c1 > c0:
            out.append((r0, r1, c0, c1))
    return out


def _shifted(x: Tensor, shift: Tensor, s1: Tensor, sq: Tensor, sq_stride: int = 1, out: Tensor | None = None) -> Tensor:
    """v = x - shift as a row-major float32 (N, D) (the C++ prepass; into ``out``, contiguous (N, D) float32, when
    given), with ``s1 += sum_n v`` and ``sq[j * sq_stride] += sum_n v_j^2`` in float64 (sq_stride = D + 1: the
    diagonal of a (D, D) state)."""
    n, d = x.shape
    v = torch.empty((n, d), dtype=torch.float32) if out is None else out
    _ext._C.corr_shift(  # type: ignore[union-attr]
        x.data_ptr(), _DTYPE_CODES[x.dtype], n, d, x.stride(0), x.stride(1), shift.data_ptr(), s1.data_ptr(),
        sq.data_ptr(), sq_stride, v.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return v


def _acc_blas(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> None:
    n, d = x.shape
    v = _shifted(x, shift, s1, s2, d + 1)
    for r0, r1, c0, c1 in _blas_rects(rects):
        for p in range(0, n, BLAS_PANEL):
            panel = v[p : p + BLAS_PANEL]
            _add_f32(s2[r0:r1, c0:c1], torch.mm(panel[:, r0:r1].T, panel[:, c0:c1]))


def _add_f32(dst: Tensor, src: Tensor) -> None:
    """dst (float64, unit column stride) += src (float32, contiguous), in C++: torch's mixed-dtype add into a
    strided block ran at a fifth of its speed (1024 x 1024 block of a 2048 x 2048 state: 3.9 ms against 0.8 ms)."""
    _ext._C.corr_add_f32(  # type: ignore[union-attr]
        dst.data_ptr(),
        dst.stride(0),
        src.data_ptr(),
        src.stride(0),
        src.shape[0],
        src.shape[1],
        torch.get_num_threads(),
    )


def _acc_blas_supports(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> list[str]:
    why = _layout_reasons(x, shift, s1, s2)
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the BLAS path runs on CPU tensors")
    elif not (hasattr(_ext._C, "corr_shift") and hasattr(_ext._C, "corr_add_f32")):
        why.append("the extension predates the BLAS path's corr_shift / corr_add_f32 (rebuild it)")
    boxes = _blas_rects(rects)
    if not boxes:
        why.append("no rectangles: the whole lower triangle is a SYRK (half a GEMM's work), the engine's job")
    elif any((r0, r1) == (c0, c1) for r0, r1, c0, c1 in boxes):
        why.append("a within-block rectangle is a SYRK (half a GEMM's work), the engine's job")
    elif min(min(r1 - r0, c1 - c0) for r0, r1, c0, c1 in boxes) < BLAS_MIN_SIDE:
        why.append(f"a rectangle narrower than {BLAS_MIN_SIDE}: the engine is as fast there (BLAS_MIN_SIDE)")
    if x.shape[0] < BLAS_MIN_ROWS:
        why.append(
            f"x has {x.shape[0]} rows < {BLAS_MIN_ROWS}: the float64 add of each GEMM result costs more than the "
            "engine's fused accumulation (BLAS_MIN_ROWS)"
        )
    return why


def _layout_reasons(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> list[str]:
    why = []
    if x.dtype not in _DTYPE_CODES:
        why.append(f"x has dtype {x.dtype}; the engine takes float32, float16 or bfloat16 (float64 uses reference)")
    if any(st < 0 for st in x.stride()):
        why.append(f"x has negative strides {x.stride()}")
    if not (s1.is_contiguous() and s2.is_contiguous() and shift.is_contiguous()):
        why.append("the state buffers are not contiguous")
    return why


def _acc_cpp_supports(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> list[str]:
    why = _layout_reasons(x, shift, s1, s2)
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the C++ engine runs on CPU tensors")
    return why


def _acc_cuda_supports(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> list[str]:
    why = _layout_reasons(x, shift, s1, s2)
    if x.device.type != "cuda":
        why.append(f"x is on {x.device}, the CUDA kernel runs on CUDA tensors")
    elif not hasattr(_ext._C, "corr_accumulate_cuda"):
        why.append("the extension was built without the CUDA correlation kernel")
    return why


ACCUMULATE = Dispatcher(
    "accumulate_moments",
    [
        Backend(
            "torch",
            _acc_blas,
            cpp_reasons,
            _acc_blas_supports,
            "off-diagonal rectangles by torch.mm (float32 BLAS) of the C++-shifted batch, float64 across panels",
            defers=lambda: _blas_defers(),
        ),
        Backend("cpp", _acc_cpp, cpp_reasons, _acc_cpp_supports, "C++ lower-triangle SYRK (AVX-512/AVX2, OpenMP)"),
        Backend("cuda", _acc_cuda, cuda_reasons, _acc_cuda_supports, "CUDA tiled SYRK with float64 atomics"),
        Backend("reference", accumulate_moments_ref, description="float64 torch matmul (also for float64 input)"),
    ],
    arg_names=("x", "shift", "s1", "s2", "rects"),
)


def _register_accumulate() -> None:
    @torch.library.custom_op("pyfusion::accumulate_moments", mutates_args=("s1", "s2"))
    def _accumulate_moments_op(
        x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None
    ) -> None:
        """In place: s1 (D,) += sum (x - shift); lower triangle of s2 (D, D) += sum (x - shift)(x - shift)^T (at
        least the diagonal and the rectangles ``rects`` of it when given)."""
        ACCUMULATE(x, shift, s1, s2, rects)

    @_accumulate_moments_op.register_fake
    def _(x, shift, s1, s2, rects=None):
        torch._check(x.dim() == 2 and s1.shape == (x.shape[1],), lambda: "x must be (N, D) and s1 (D,)")
        return None


ACCUMULATE_OP = LazyOp("accumulate_moments", ACCUMULATE, _register_accumulate)


def _check_state(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"x must have shape (N, D); got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    d = x.shape[1]
    for name, t, shape in (("shift", shift, (d,)), ("s1", s1, (d,)), ("s2", s2, (d, d))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}; got {tuple(t.shape)}")
        if t.dtype != torch.float64:
            raise ValueError(f"{name} must be float64; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def accumulate_moments(x: Tensor, shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None = None) -> str:
    """Add a batch to a shifted moment state, in place (see the module docstring).

    Args:
        x: (N, D) float16 / bfloat16 / float32 / float64, any non-negative strides, finite (not checked here:
            :meth:`pyfusion.stats.ActivationStats.update` checks it).
        shift: (D,) float64, the state's shift c (:func:`moment_shift` of its first batch).
        s1: (D,) float64, ``+= sum_n (x_n - c)``.
        s2: (D, D) float64, lower triangle ``+= sum_n (x_n - c)(x_n - c)^T`` (the strict upper triangle is
            scratch: the engines leave it, the reference writes the full matrix).
        rects: restrict the second moment to the diagonal and these rectangles of the lower triangle, 4 integers
            each (rows [r0, r1) x columns [c0, c1), r0 >= c1 or the same range: e.g. the cross block of two
            members); the other entries are unspecified afterwards (the C++ engine skips their macro blocks: the
            cross block of two equal members costs half the lower triangle). None: the whole lower triangle.

    Returns:
        The name of the backend that ran (``cpp``, ``cuda`` or ``reference``).

    Raises:
        ValueError: wrong shapes, dtypes or devices (nothing is changed then).
    """
    _check_state(x, shift, s1, s2)
    rl = _check_rects(rects, x.shape[1])
    return ACCUMULATE_OP.call_with_backend(x, shift, s1, s2, rl)[1]


def accumulate_moments_blocks(
    blocks: Sequence[Tensor], shift: Tensor, s1: Tensor, s2: Tensor, rects: list[int] | None, dry_run: bool = False
) -> str | None:
    """:func:`accumulate_moments` of x = ``[b_0 | ... | b_{K-1}]`` (column blocks, (N, n_k) each, CPU) without
    forming x (24 concatenations were 0.02-0.07 s of an MLP-1024 pair's activation matching), on the backend
    :func:`accumulate_moments` would choose for x:

    * ``torch`` (the BLAS path): each block is shifted into its own float32 buffer (s1 and the diagonal of s2 in
      float64 in the same pass) and each rectangle gets one float32 ``torch.mm`` of two blocks' buffers per BLAS_PANEL
      rows, added to the float64 state: the same products and sums as the BLAS path on the concatenation;
    * ``cpp`` (the engine, where the BLAS path declines or defers to it, :func:`_blas_defers`): the engine reads each
      row from the blocks (``corr_accumulate_blocks``), bit for bit its result on the concatenation.

    Returns the backend's name, or None (nothing changed) when neither applies: blocks of different dtypes, float64
    or not on the CPU, a rectangle that does not align with the blocks (BLAS path), an extension without the entry,
    or ``PYFUSION_BACKEND`` forcing another backend; the caller then concatenates and calls
    :func:`accumulate_moments`. ``dry_run``: only say which would run (the state is not touched).
    """
    forced = forced_backend("accumulate_moments")
    if forced not in (None, "torch", "cpp") or not blocks:
        return None
    dtype, n = blocks[0].dtype, blocks[0].shape[0]
    offsets = [0]
    for b in blocks:
        if b.ndim != 2 or b.dtype != dtype or b.device.type != "cpu" or b.shape[0] != n:
            return None
        offsets.append(offsets[-1] + b.shape[1])
    d = offsets[-1]
    if tuple(shift.shape) != (d,) or tuple(s2.shape) != (d, d) or any(st < 0 for b in blocks for st in b.stride()):
        return None
    rl = _check_rects(rects, d)
    if forced == "torch" or (forced is None and not _blas_defers()):
        pairs = _blas_block_pairs(offsets, n, dtype, shift, s1, s2, rl)
        if pairs is not None:
            if not dry_run:
                _acc_blas_blocks(blocks, offsets, pairs, shift, s1, s2, n)
            return "torch"
        if forced == "torch":
            return None
    c = _ext._C
    if c is None or not hasattr(c, "corr_accumulate_blocks") or dtype not in _DTYPE_CODES:
        return None
    if not (s1.is_contiguous() and s2.is_contiguous() and shift.is_contiguous()):
        return None
    if not dry_run:
        c.corr_accumulate_blocks(
            [b.data_ptr() for b in blocks], _DTYPE_CODES[dtype], n, [b.shape[1] for b in blocks],
            [b.stride(0) for b in blocks], [b.stride(1) for b in blocks], shift.data_ptr(), s1.data_ptr(),
            s2.data_ptr(), torch.get_num_threads(), "auto", rl,
        )  # fmt: skip
    return "cpp"


def _blas_block_pairs(
    offsets: list[int], n: int, dtype: torch.dtype, shift: Tensor, s1: Tensor, s2: Tensor, rl: list[int]
) -> list[tuple[int, int, int, int, int, int]] | None:
    """(block of the rows, block of the columns, r0, r1, c0, c1) for each rectangle of ``rl``, or None when the BLAS
    path does not take the blocks (a rectangle that does not align with them, or any reason of the BLAS backend)."""
    index = {o: k for k, o in enumerate(offsets[:-1])}
    ends = {o: k for k, o in enumerate(offsets[1:])}
    pairs = []
    for r0, r1, c0, c1 in _blas_rects(rl):
        kr, kc = index.get(r0), index.get(c0)
        if kr is None or kc is None or ends.get(r1) != kr or ends.get(c1) != kc:
            return None
        pairs.append((kr, kc, r0, r1, c0, c1))
    # the BLAS backend's own conditions, on a zero-copy stand-in of x's shape (its reasons read shapes, dtype,
    # device and strides only)
    probe = torch.empty((n, offsets[-1]), dtype=dtype, device="meta")
    why = cpp_reasons() + _acc_blas_supports(probe, shift, s1, s2, rl)
    return None if [w for w in why if "is on meta" not in w] else pairs


def _acc_blas_blocks(
    blocks: Sequence[Tensor], offsets: list[int], pairs: list, shift: Tensor, s1: Tensor, s2: Tensor, n: int
) -> None:
    diag = torch.diagonal(s2)
    d = offsets[-1]
    vs = []
    for k, b in enumerate(blocks):
        o0, o1 = offsets[k], offsets[k + 1]
        vs.append(_shifted(b, shift[o0:o1], s1[o0:o1], diag[o0:o1], d + 1))
    for kr, kc, r0, r1, c0, c1 in pairs:
        for p in range(0, n, BLAS_PANEL):
            _add_f32(s2[r0:r1, c0:c1], torch.mm(vs[kr][p : p + BLAS_PANEL].T, vs[kc][p : p + BLAS_PANEL]))


def _check_rects(rects: list[int] | None, d: int) -> list[int]:
    """``rects`` as a flat list of ints, checked: 4 per rectangle, inside [0, d) and in the lower triangle."""
    if rects is None:
        return []
    rl = [int(v) for v in rects]
    if len(rl) % 4:
        raise ValueError(f"rects must hold 4 integers per rectangle (r0, r1, c0, c1); got {len(rl)} integers")
    for i in range(0, len(rl), 4):
        r0, r1, c0, c1 = rl[i : i + 4]
        if not (0 <= r0 <= r1 <= d and 0 <= c0 <= c1 <= d) or not (r0 >= c1 or (r0, r1) == (c0, c1)):
            raise ValueError(
                f"rects[{i // 4}] = rows [{r0}, {r1}) x columns [{c0}, {c1}) must lie in [0, {d}) and in the lower "
                "triangle (r0 >= c1, or a diagonal block with the same rows and columns)"
            )
    return rl


# ---- correlation ---------------------------------------------------------------------------------------------
def _same_tensor(x: Tensor, y: Tensor) -> bool:
    return x is y or (
        x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
    )


def _corr_via_engine(x: Tensor, y: Tensor, accumulate) -> Tensor:
    """Moments of [x | y] from one accumulation of the (y, x) cross block and the diagonal only (about one GEMM of
    x^T y, not the SYRK of [x | y]: twice the work for Dx = Dy), then the (Dx, Dy) correlation block (population
    moments; 0 for pairs with a constant column, the :class:`pyfusion.stats.ActivationStats` rule). For
    ``correlation(x, x)`` the lower triangle of x alone (half of x^T x: a quarter of the SYRK of [x | x])."""
    n, dx = x.shape
    d = dx + (0 if _same_tensor(x, y) else y.shape[1])
    s1 = torch.zeros(d, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    rects = None if d == dx else [dx, d, 0, dx]
    blocks_ok = accumulate is _acc_cpp and x.dtype == y.dtype and hasattr(_ext._C, "corr_accumulate_blocks")
    if rects is not None and blocks_ok:
        # x and y read in place (no (N, Dx + Dy) copy: ~10% of the op at N = 4096, D = 1024 + 1024); the shift is
        # column-wise, so that of the concatenation; bit for bit the engine on [x | y]
        shift = torch.cat([moment_shift(x), moment_shift(y)])
        _ext._C.corr_accumulate_blocks(  # type: ignore[union-attr]
            [x.data_ptr(), y.data_ptr()], _DTYPE_CODES[x.dtype], n, [dx, d - dx], [x.stride(0), y.stride(0)],
            [x.stride(1), y.stride(1)], shift.data_ptr(), s1.data_ptr(), s2.data_ptr(), torch.get_num_threads(),
            "auto", rects,
        )  # fmt: skip
    else:
        if rects is None:
            xy = x
        else:
            dtype = torch.promote_types(x.dtype, y.dtype)
            xy = torch.cat([x.to(dtype), y.to(dtype)], dim=1)
        shift = moment_shift(xy)
        accumulate(xy, shift, s1, s2, rects)
    mu = shift + s1 / n
    var = ((torch.diagonal(s2) - s1 * s1 / n) / n).clamp_min(0)
    std = var.sqrt()
    const = (var == 0) | (std <= CONST_RTOL * mu.abs())
    inv = torch.where(const, torch.zeros_like(std), 1.0 / torch.where(const, torch.ones_like(std), std))
    if rects is None:  # symmetric: the lower triangle, mirrored
        cov = torch.tril(s2)
        cov += torch.tril(s2, -1).T
        cov.addr_(s1, s1, alpha=-1.0 / n).div_(n)
        cov.mul_(torch.outer(inv, inv)).clamp_(-1.0, 1.0)
        out = torch.tril(cov)  # the lower triangle mirrored: exactly symmetric (addr_ rounds its SIMD lanes and
        out += torch.tril(cov, -1).T  # its scalar tail differently, 1e-17 apart)
        return out
    # (y, x) block: strictly below the diagonal, so it is stored; cov_xy = (s2_xy - s1_x s1_y^T / N) / N.
    cov = s2[dx:, :dx].T.clone().addr_(s1[:dx], s1[dx:], alpha=-1.0 / n).div_(n)
    return cov.mul_(inv[:dx, None]).mul_(inv[None, dx:]).clamp_(-1.0, 1.0).contiguous()


def _corr_engine_supports(device_type: str, what: str):
    """Reasons of the engine backends: the engine reads [x | y] (contiguous) in their promoted dtype."""

    def supports(x: Tensor, y: Tensor) -> list[str]:
        why = []
        dtype = torch.promote_types(x.dtype, y.dtype)
        if dtype not in _DTYPE_CODES:
            why.append(
                f"inputs promote to {dtype}; the engine takes float32, float16 or bfloat16 (float64 uses reference)"
            )
        if x.device.type != device_type:
            why.append(f"x is on {x.device}, the {what} runs on {device_type.upper()} tensors")
        elif device_type == "cuda" and not hasattr(_ext._C, "corr_accumulate_cuda"):
            why.append("the extension was built without the CUDA correlation kernel")
        return why

    return supports


def _corr_cpp(x: Tensor, y: Tensor) -> Tensor:
    return _corr_via_engine(x, y, _acc_cpp)


def _corr_cuda(x: Tensor, y: Tensor) -> Tensor:
    return _corr_via_engine(x, y, _acc_cuda)


def _corr_blas(x: Tensor, y: Tensor) -> Tensor:
    """The (x, y) block from the BLAS path without the state of [x | y]: each side shifted by its own
    :func:`moment_shift` (the C++ prepass, s1 and sum of squares in float64), then sum over panels of BLAS_PANEL rows
    of the float32 ``v_x^T v_y`` in float64 (population moments; 0 for pairs with a constant column).

    Each panel is shifted into a reused (BLAS_PANEL, D) buffer just before its product, which then reads it from
    cache: shifting all of x and y first wrote and re-read two (N, D) float32 copies, and the op only tied the
    float32 composite (N = 16384, D = 1024 + 1024, 1 thread, loaded VM: 0.98x; per panel: see the bench)."""
    n = x.shape[0]
    shifts = [moment_shift(t) for t in (x, y)]
    s1s = [torch.zeros(t.shape[1], dtype=torch.float64) for t in (x, y)]
    sqs = [torch.zeros(t.shape[1], dtype=torch.float64) for t in (x, y)]
    rows = min(BLAS_PANEL, n)
    bufs = [torch.empty((rows, t.shape[1]), dtype=torch.float32) for t in (x, y)]
    prod = torch.empty((x.shape[1], y.shape[1]), dtype=torch.float32)
    cov = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    for p in range(0, n, BLAS_PANEL):
        m = min(BLAS_PANEL, n - p)
        vx, vy = (
            _shifted(t[p : p + m], c, s1, sq, out=b[:m]) for t, c, s1, sq, b in zip((x, y), shifts, s1s, sqs, bufs)
        )
        _add_f32(cov, torch.mm(vx.T, vy, out=prod))
    inv = []
    for shift, s1, sq in zip(shifts, s1s, sqs):
        mu = shift + s1 / n
        var = ((sq - s1 * s1 / n) / n).clamp_min(0)
        std = var.sqrt()
        const = (var == 0) | (std <= CONST_RTOL * mu.abs())
        inv.append(torch.where(const, torch.zeros_like(std), 1.0 / torch.where(const, torch.ones_like(std), std)))
    cov.addr_(s1s[0], s1s[1], alpha=-1.0 / n).div_(n)
    return cov.mul_(inv[0][:, None]).mul_(inv[1][None, :]).clamp_(-1.0, 1.0)


def _corr_blas_supports(x: Tensor, y: Tensor) -> list[str]:
    why = _corr_engine_supports("cpu", "BLAS path")(x, y)
    if not why and not (hasattr(_ext._C, "corr_shift") and hasattr(_ext._C, "corr_add_f32")):
        why.append("the extension predates the BLAS path's corr_shift / corr_add_f32 (rebuild it)")
    if not why and _same_tensor(x, y):  # (data pointers only of CPU tensors: never of a fake CUDA input)
        why.append("correlation(x, x) is a SYRK (half a GEMM's work), the engine's job")
    if min(x.shape[1], y.shape[1]) < BLAS_MIN_SIDE:
        why.append(f"x or y has fewer than {BLAS_MIN_SIDE} columns: the engine is as fast there (BLAS_MIN_SIDE)")
    if x.shape[0] < BLAS_MIN_ROWS:
        why.append(
            f"x has {x.shape[0]} rows < {BLAS_MIN_ROWS}: the float64 add of each GEMM result costs more than the "
            "engine's fused accumulation (BLAS_MIN_ROWS)"
        )
    return why


def _corr_reference(x: Tensor, y: Tensor) -> Tensor:
    return correlation_ref(x, y).contiguous()


CORRELATION = Dispatcher(
    "correlation",
    [
        Backend(
            "torch",
            _corr_blas,
            cpp_reasons,
            _corr_blas_supports,
            "x and y shifted by the C++ prepass, then torch.mm (float32 BLAS) over panels, float64 across panels",
            defers=lambda: _blas_defers(),
        ),
        Backend(
            "cpp",
            _corr_cpp,
            cpp_reasons,
            _corr_engine_supports("cpu", "C++ engine"),
            "moments of [x | y] on the C++ engine, then the (x, y) block",
        ),
        Backend(
            "cuda",
            _corr_cuda,
            cuda_reasons,
            _corr_engine_supports("cuda", "CUDA kernel"),
            "moments of [x | y] on the CUDA engine, then the (x, y) block",
        ),
        Backend("reference", _corr_reference, description="float64 two-pass (ops.reference.correlation_ref)"),
    ],
    arg_names=("x", "y"),
)


def _register_correlation() -> None:
    @torch.library.custom_op("pyfusion::correlation", mutates_args=())
    def _correlation_op(x: Tensor, y: Tensor) -> Tensor:
        """(Dx, Dy) float64 Pearson correlation of the columns; forward only."""
        return CORRELATION(x, y)

    @_correlation_op.register_fake
    def _(x: Tensor, y: Tensor) -> Tensor:
        torch._check(x.ndim == 2 and y.ndim == 2, lambda: "x and y must be 2-D")
        torch._check(x.shape[0] == y.shape[0], lambda: "x and y must have the same number of samples")
        return x.new_empty((x.shape[1], y.shape[1]), dtype=torch.float64)


CORRELATION_OP = LazyOp("correlation", CORRELATION, _register_correlation)


def _check_xy(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"x must have shape (N, Dx); got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, Tensor) or y.ndim != 2:
        raise ValueError(f"y must have shape (N, Dy); got shape {tuple(getattr(y, 'shape', ()))}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]}, Dy) like x's N; got shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x and y must have at least one sample (N >= 1); got N = 0")
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device; got {x.device} and {y.device}")
    if not torch.compiler.is_compiling():
        for name, t in (("x", x), ("y", y)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or inf")


def correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation between the neurons (columns) of x and y.

    Args:
        x: (N, Dx) activations (float16 / bfloat16 / float32 / float64, any strides).
        y: (N, Dy) activations on the same samples and device.

    Returns:
        (Dx, Dy) float64: corr[i, j] = cov(x_i, y_j) / (std(x_i) std(y_j)) with population moments, in
        [-1, 1]; 0 for pairs involving a constant column (std <= 1e-7 |mean|, or exactly 0): never NaN.
        Always float64 (whatever the input dtype): correlations feed assignment costs, where float32
        rounding of near-ties changes matchings. Forward only (no autograd formula).

    Raises:
        ValueError: wrong shapes, dtypes or devices, or non-finite input.
    """
    _check_xy(x, y)
    return CORRELATION_OP(x, y)
