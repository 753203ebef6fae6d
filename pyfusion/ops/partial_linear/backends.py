"""Backends of ``pyfusion::partial_linear`` and its dispatcher (layouts: :mod:`pyfusion.ops.layout`).

``y = act(x @ W^T + b)`` with ``act`` in ``none | relu | gelu | silu`` (GELU is torch's default, exact erf form),
W block-sparse by the layouts (DESIGN §7). The packed blocks let each backend address every GEMM operand as a
view of the packed buffers (no per-call weight copy):

* ``torch`` (torch's BLAS, any device): ``y[:, shared] = x @ w_shared^T`` (one GEMM over the whole input, no
  slicing), ``y[:, branches] = x[:, shared] @ w_cross^T`` (one GEMM from the shared input to every branch
  output), then ``y[:, branch_k] += x[:, branch_k] @ W_kk^T`` for all k as one ``baddbmm`` when the branches
  have equal sizes and >= 8 rows (a loop of ``addmm_`` otherwise). All three write into views of one
  preallocated output.
* ``cpp``, small batches (<= ``CPP_MAX_ROWS`` rows, float32/float64, CPU, forward only): the compiled kernel
  (csrc/partial_linear/) computes every block, the bias and the activation in one call from data pointers,
  GEMV-style (AVX-512/AVX2 FMA), removing the per-call Python cost of the BLAS path's views.
* ``triton`` (CUDA): one Triton launch (:mod:`pyfusion.triton_kernels.partial_linear`), a grouped GEMM whose
  K-loop visits only the allowed input segments, bias and activation fused in the epilogue.
* ``reference``: the float64 dense matrix with zero blocks (:func:`pyfusion.ops.reference.partial_linear_ref`).
* ``triton_interpret``: the Triton kernel in the CPU interpreter (``TRITON_INTERPRET=1``; tests, forward only).

Inside the registered op (:mod:`.registration`, used for autograd and torch.compile) the forward-only
backends decline, and while the op's body is traced the ``torch`` backend uses its functional form and the
Triton launch goes through ``torch.library.wrap_triton`` (:func:`op_context`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyfusion import _ext, backends
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops.layout import ACTIVATIONS, uniform_branches

__all__ = ["CPP_MAX_ROWS", "DISPATCHER", "FLOAT_DTYPES", "TRITON_DTYPES", "op_context"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARG_NAMES = ("x", "w_shared", "w_cross", "w_diag", "bias", "in_layout", "out_layout", "activation")


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


# ----------------------------------------------------------------------------------------------------------
# torch backend (torch's BLAS), and the activation helpers
# ----------------------------------------------------------------------------------------------------------


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


# Below this many rows the branch blocks run as a loop of addmm_ (GEMV) instead of one baddbmm: torch's CPU
# bmm opens an OpenMP region even for M = 1; measured with 2 threads on the loaded 2-core VM (load ~12),
# ViT-S branches (K=2, 384->1536): M=1 baddbmm 23 ms vs loop 0.43 ms; M=8 both 0.27 ms.
_BMM_MIN_ROWS = 8


def _torch_forward_2d(
    x2: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
) -> Tensor:
    """Pre-activation ``x2 @ W^T + b`` for 2-D x2 (M, I_total) -> (M, O_total): three BLAS calls into views
    of one output; reads x2 in place (column slices are strided views, never copies)."""
    m = x2.shape[0]
    i_s, o_s = in_layout[0], out_layout[0]
    o_tot = sum(out_layout)
    kb = len(out_layout) - 1
    y = x2.new_empty((m, o_tot))
    if o_s > 0:
        ys = y[:, :o_s]
        if bias is not None:
            torch.addmm(bias[:o_s], x2, w_shared.t(), out=ys)
        else:
            torch.mm(x2, w_shared.t(), out=ys)
    if o_tot == o_s:
        return y
    yb = y[:, o_s:]
    if i_s > 0:
        if bias is not None:
            torch.addmm(bias[o_s:], x2[:, :i_s], w_cross.t(), out=yb)
        else:
            torch.mm(x2[:, :i_s], w_cross.t(), out=yb)
        beta = 1.0
    elif bias is not None:
        yb.copy_(bias[o_s:].expand_as(yb))
        beta = 1.0
    else:
        beta = 0.0  # baddbmm/addmm with beta=0 ignore the uninitialised output
    if sum(in_layout[1:]) == 0:
        if beta == 0.0:
            yb.zero_()
        return y
    if m >= _BMM_MIN_ROWS and uniform_branches(in_layout, out_layout):
        o_b, i_b = out_layout[1], in_layout[1]
        # (K, M, I_b), (K, M, O_b) and (K, I_b, O_b) views; one as_strided each (unflatten + transpose costs
        # ~7 us per view in eager mode, as much as a batch-1 GEMM of a 100x100 block).
        sm, sk = x2.stride()
        xb = x2.as_strided((kb, m, i_b), (i_b * sk, sm, sk), x2.storage_offset() + i_s * sk)
        yv = y.as_strided((kb, m, o_b), (o_b, o_tot, 1), o_s)
        wt = w_diag.as_strided((kb, i_b, o_b), (o_b * i_b, 1, i_b), w_diag.storage_offset())
        yv.baddbmm_(xb, wt, beta=beta)
        return y
    i0, o0, d0 = i_s, 0, 0
    for k in range(1, kb + 1):
        o_k, i_k = out_layout[k], in_layout[k]
        if o_k > 0:
            yk = yb[:, o0 : o0 + o_k]
            if i_k > 0:
                yk.addmm_(x2[:, i0 : i0 + i_k], w_diag[d0 : d0 + o_k * i_k].view(o_k, i_k).t(), beta=beta)
            elif beta == 0.0:
                yk.zero_()
        i0, o0, d0 = i0 + i_k, o0 + o_k, d0 + o_k * i_k
    return y


def _functional_forward_2d(
    x2: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
) -> Tensor:
    """Same result as :func:`_torch_forward_2d` without in-place writes into views: the form traced for
    torch.compile (functionalization cannot replay in-place ``baddbmm_`` into transposed output views)."""
    m = x2.shape[0]
    i_s, o_s = in_layout[0], out_layout[0]
    o_b = sum(out_layout[1:])
    kb = len(out_layout) - 1
    parts = []
    if o_s > 0:
        parts.append(F.linear(x2, w_shared, None if bias is None else bias[:o_s]))
    if o_b > 0:
        yb = F.linear(x2[:, :i_s], w_cross, None if bias is None else bias[o_s:])
        if sum(in_layout[1:]) > 0:
            if uniform_branches(in_layout, out_layout):
                o_k, i_k = out_layout[1], in_layout[1]
                xb = x2[:, i_s:].unflatten(1, (kb, i_k)).transpose(0, 1)
                zb = torch.bmm(xb, w_diag.view(kb, o_k, i_k).transpose(1, 2)).transpose(0, 1).reshape(m, o_b)
            else:
                zs, i0, d0 = [], i_s, 0
                for o_k, i_k in zip(out_layout[1:], in_layout[1:]):
                    zs.append(F.linear(x2[:, i0 : i0 + i_k], w_diag[d0 : d0 + o_k * i_k].view(o_k, i_k)))
                    i0, d0 = i0 + i_k, d0 + o_k * i_k
                zb = torch.cat(zs, dim=1)
            yb = yb + zb
        parts.append(yb)
    if not parts:
        return x2.new_zeros((m, 0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def flatten(x: Tensor) -> Tensor:
    # A view for 2-D inputs of any strides and for contiguous N-D inputs; only N-D inputs whose leading
    # dims cannot be merged are copied (torch.reshape semantics).
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def torch_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
    functional: bool = False,
) -> Tensor:
    fwd = _functional_forward_2d if functional else _torch_forward_2d
    y = fwd(flatten(x), w_shared, w_cross, w_diag, bias, in_layout, out_layout)
    y = _apply_activation_(y, activation) if not functional else _activation(y, activation)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


@functools.cache
def _triton_module():
    from pyfusion.triton_kernels import partial_linear as mod

    return mod


def triton_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
    launcher=None,
) -> Tensor:
    """One launch of the Triton kernel (compiled on CUDA, or the CPU interpreter); ``launcher``:
    ``torch.library.wrap_triton`` while the registered op is traced, else None (direct launch)."""
    mod = _triton_module()
    meta = mod.segment_meta(in_layout, out_layout, x.device)
    y = mod.partial_linear_fwd(
        flatten(x),
        w_shared.contiguous(),
        w_cross.contiguous(),
        w_diag.contiguous(),
        bias,
        in_layout,
        out_layout,
        activation,
        meta,
        launcher=launcher,
    )
    return y.view(*x.shape[:-1], y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# cpp backend: the compiled small-batch kernel
# ----------------------------------------------------------------------------------------------------------


# Small-batch CPU path: the compiled kernel (csrc/partial_linear/) computes every block, the bias and the
# activation in one call from data pointers. It replaces up to three BLAS calls, their output views and the
# activation (~15-25 us of Python and dispatch at batch 1, more than the GEMVs of a 512-wide layer).
# Up to this many rows (after flattening the leading dims) it is chosen over the BLAS path. Measured with
# bench/bench_partial_linear_batch1.py --crossover (alpha .5, K=2, 1 thread, 2-core AMD EPYC VM, load ~7),
# median us cpp / BLAS path at rows 1, 8, 12, 16, 32: MNIST 100x100 3.8/24, 8.8/22, 12/24, 15/25, 26/31;
# VGG fc 512 21/51, 76/124, 111/156, 173/189, 458/322; ViT-S 384->1536 47/87, 176/247, 262/323, 351/402,
# 1094/771; BERT 768->3072 210/357, 1301/3146, 6249/3280, 6867/6535, 13292/8131. At 8 rows the kernel won
# on every shape (1.4-2.5x), from 12-16 rows the BLAS GEMM (cache blocking) catches up on the large layers.
CPP_MAX_ROWS = 8
_CPP_DTYPES = (torch.float32, torch.float64)
_ACT_IDS = {a: i for i, a in enumerate(ACTIVATIONS)}  # the kernel's codes: 0 none, 1 relu, 2 gelu, 3 silu


def _rows(x: Tensor) -> int:
    """Number of rows of x flattened to (rows, I_total)."""
    if x.dim() == 2:
        return x.shape[0]
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


def _cpp_available() -> list[str]:
    why = backends.cpp_reasons()
    if not why and not hasattr(_ext._C, "PartialLinearPlan"):
        why = ["the compiled extension predates the partial_linear kernel; rebuild it (tools/dev_build.sh)"]
    return why


def _cpp_supports(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> list[str]:
    why = []
    if x.device.type != "cpu":
        why.append(f"x is on {x.device}, the compiled kernel runs on CPU tensors")
    if x.dtype not in _CPP_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float64")
    rows = _rows(x)
    if rows > CPP_MAX_ROWS:
        why.append(f"{rows} rows > CPP_MAX_ROWS = {CPP_MAX_ROWS} (torch's BLAS is faster on larger batches)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_shared, w_cross, w_diag, bias)):
        why.append("autograd is recording (a tensor requires grad): the kernel is forward-only, use 'torch'")
    if _mode() is not None:
        why.append(
            "the registered op runs (autograd or torch.compile): the kernel is forward-only and reads data pointers"
        )
    return why


@functools.lru_cache(maxsize=256)
def _cpp_plan(in_layout: tuple[int, ...], out_layout: tuple[int, ...], activation: str):
    """The compiled kernel's per-layout plan (segment offsets, work size), built once per layout.

    ``PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS`` (read when a plan is built) overrides the work size from
    which the kernel runs OpenMP threads (default ``pyfusion._C.PARTIAL_LINEAR_PARALLEL_MIN_MACS``).
    """
    plan = _ext._C.PartialLinearPlan(list(in_layout), list(out_layout), _ACT_IDS[activation])
    override = os.environ.get("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "").strip()
    if override:
        try:
            plan.parallel_min_macs = int(override)
        except ValueError:
            raise ValueError(
                f"PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS must be an integer; got {override!r}"
            ) from None
    return plan


def cpp_forward(
    x: Tensor,
    w_shared: Tensor,
    w_cross: Tensor,
    w_diag: Tensor,
    bias: Tensor | None,
    in_layout: Sequence[int],
    out_layout: Sequence[int],
    activation: str,
) -> Tensor:
    """Forward through the compiled small-batch kernel (CPU, float32/float64, no autograd).

    Pointers are read at every call (never cached): parameters replaced, moved with ``.to()`` or updated in
    place are always seen. x needs a unit column stride (any row stride); other inputs and non-contiguous
    weights are copied first (rare: parameters are contiguous).
    """
    x2 = flatten(x)
    m, i_total = x2.shape
    sm, sk = x2.stride()
    if sk != 1 and i_total > 1:
        x2 = x2.contiguous()
        sm = i_total
    if not (w_shared.is_contiguous() and w_cross.is_contiguous() and w_diag.is_contiguous()):
        w_shared, w_cross, w_diag = w_shared.contiguous(), w_cross.contiguous(), w_diag.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    plan = _cpp_plan(tuple(in_layout), tuple(out_layout), activation)
    y = x2.new_empty(m, plan.o_total)  # fresh and contiguous; ~0.3 us cheaper than torch.empty(size, dtype=)
    try:
        ptrs = (w_shared.data_ptr(), w_cross.data_ptr(), w_diag.data_ptr(), 0 if bias is None else bias.data_ptr())
        px, py = x2.data_ptr(), y.data_ptr()
    except RuntimeError:
        # Tensors without storage that still report a CPU device (FakeTensor, torch.func's vmap/grad wrappers):
        # the functional BLAS form (no out= / in-place writes, which vmap has no batching rules for).
        return torch_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, functional=True)
    run = plan.forward_f32 if x.dtype == torch.float32 else plan.forward_f64
    run(px, m, sm, *ptrs, py, torch.get_num_threads())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.o_total)


# ----------------------------------------------------------------------------------------------------------
# Reasons and the dispatcher
# ----------------------------------------------------------------------------------------------------------


def _triton_available() -> list[str]:
    return backends.triton_gpu_reasons(import_check=False)  # triton itself is imported for a CUDA input only


def _triton_supports(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> list[str]:
    why = []
    if x.device.type != "cuda":
        why.append(f"x is on {x.device}, the compiled Triton kernel needs a CUDA tensor")
    if x.dtype not in TRITON_DTYPES:
        why.append(f"dtype {x.dtype} is not float32/float16/bfloat16")
    return why or backends.triton_import_reasons()


def _triton_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> Tensor:
    launcher = torch.library.wrap_triton if _mode() == "traceable" else None
    return triton_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, launcher)


def _torch_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> Tensor:
    functional = _mode() == "traceable"
    return torch_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation, functional)


def _interp_available() -> list[str]:
    return backends.triton_interpreter_reasons(import_check=False)


def _interp_supports(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> list[str]:
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


def _interp_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> Tensor:
    return triton_forward(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation)


def _reference_fn(x, w_shared, w_cross, w_diag, bias, in_layout, out_layout, activation) -> Tensor:
    from pyfusion.ops.reference import partial_linear_ref

    return partial_linear_ref(x, [w_shared, w_cross, w_diag], bias, in_layout, out_layout, activation).to(x.dtype)


DISPATCHER = Dispatcher(
    "partial_linear",
    [
        Backend(
            "triton",
            _triton_fn,
            available=_triton_available,
            supports=_triton_supports,
            description="one Triton grouped-GEMM launch on CUDA, fused bias + activation",
        ),
        Backend(
            "cpp",
            cpp_forward,
            available=_cpp_available,
            supports=_cpp_supports,
            description=f"compiled small-batch kernel (<= {CPP_MAX_ROWS} rows, float32/64, CPU, inference): "
            "all blocks + bias + activation in one call",
        ),
        Backend(
            "torch",
            _torch_fn,
            description="3 BLAS calls (addmm, addmm, baddbmm) into views of one output, any device",
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
