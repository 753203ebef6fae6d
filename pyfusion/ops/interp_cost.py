"""HF interpolation cost from Gram products (Luenam et al. 2025, papers.md B.3 and C.2 item 3).

Hungarian neuron-interpolation fusion pairs neuron i of member 0 with neuron j of member 1 at the cost

    cost_ij = s0_i f(||p_ij - a0_i||^2) + s1_j f(||p_ij - a1_j||^2),   p_ij = X (u w0_i + v w1_j),

with ``u = s0_i / (s0_i + s1_j)``, ``v = 1 - u``, f the identity ("sqeuclidean") or sqrt (the authors' L2 norm),
X the fused model's inputs of the layer, w the least-squares weights and a the members' targets. The authors
materialise every p_ij in 8 x 8 chunks (O(n0 n1 m) work and memory traffic over m samples); here both squared
norms come from the Gram products ``M = W0^T G W1``, ``Q10 = C0^T W1``, ``Q01 = W0^T C1`` (G = X^T X,
C_k = X^T A_k) and per-neuron vectors, so this op is an elementwise epilogue over (n0, n1):

    ||p_ij - a0_i||^2 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u e0_i - 2v Q10_ij + n0_i
    ||p_ij - a1_j||^2 = u^2 d0_i + v^2 d1_j + 2uv M_ij - 2u Q01_ij - 2v e1_j + n1_j

(d_k = diag(W_k^T G W_k), e_k = diag(W_k^T C_k), n_k = squared target norms). Negative rounding clamps to 0.
Backends: ``cpp`` (csrc/interp, OpenMP), ``cuda`` (csrc/interp, device buffers), ``reference`` (float64 torch,
:func:`pyfusion.ops.reference.hf_cost_ref`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyfusion import _ext
from pyfusion.backends import cpp_reasons, cuda_reasons
from pyfusion.dispatch import Backend, Dispatcher
from pyfusion.ops._registry import LazyOp
from pyfusion.ops.reference import hf_cost_ref

__all__ = ["DISPATCHER", "OP", "hf_cost"]

_VEC_NAMES = ("d0", "e0", "n0", "s0", "d1", "e1", "n1", "s1")


def _cpp_supports(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> list[str]:
    if mats[0].device.type != "cpu":
        return [f"inputs are on {mats[0].device}, the C++ kernel takes CPU tensors"]
    if not hasattr(_ext._C, "hf_cost"):
        return ["this build of pyfusion._C has no hf_cost (rebuild the extension)"]
    return []


def _cuda_supports(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> list[str]:
    if mats[0].device.type != "cuda":
        return [f"inputs are on {mats[0].device}, not a CUDA device"]
    if not hasattr(_ext._C, "hf_cost_cuda"):
        return ["this build of pyfusion._C has no CUDA hf_cost"]
    if mats[0].shape[0] >= 65536:
        return [f"rows = {mats[0].shape[0]} >= 65536 (grid limit of the CUDA kernel)"]
    return []


def _addr(ts: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in ts]


def _cpp(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> Tensor:
    n0, n1 = mats[0].shape
    out = torch.empty(n0, n1, dtype=torch.float64)
    _ext._C.hf_cost(*_addr(mats), *_addr(vecs), n0, n1, bool(squared), out.data_ptr(), 0)  # type: ignore[union-attr]
    return out


def _cuda(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> Tensor:
    n0, n1 = mats[0].shape
    out = torch.empty(n0, n1, dtype=torch.float64, device=mats[0].device)
    stream = torch.cuda.current_stream(out.device).cuda_stream
    with torch.cuda.device(out.device):
        _ext._C.hf_cost_cuda(  # type: ignore[union-attr]
            *_addr(mats), *_addr(vecs), n0, n1, bool(squared), out.data_ptr(), stream
        )
    return out


def _reference(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> Tensor:
    return hf_cost_ref(*mats, *vecs, squared=squared)


DISPATCHER = Dispatcher(
    "hf_cost",
    [
        Backend("cuda", _cuda, cuda_reasons, _cuda_supports, "CUDA elementwise epilogue, one thread per pair"),
        Backend("cpp", _cpp, cpp_reasons, _cpp_supports, "C++ epilogue, OpenMP over rows, AVX-512/AVX2 clones"),
        Backend("reference", _reference, description="float64 torch formula (ops.reference.hf_cost_ref)"),
    ],
    arg_names=("mats [M, Q01, Q10]", "vecs [d0, e0, n0, s0, d1, e1, n1, s1]", "squared"),
)


def _register() -> None:
    @torch.library.custom_op("pyfusion::hf_cost", mutates_args=())
    def _hf_cost_op(mats: list[Tensor], vecs: list[Tensor], squared: bool) -> Tensor:
        """(n0, n1) float64 cost from mats (M, Q01, Q10) and the 8 vectors; forward only."""
        return DISPATCHER(mats, vecs, squared)

    @_hf_cost_op.register_fake
    def _(mats, vecs, squared):
        torch._check(len(mats) == 3 and len(vecs) == 8, lambda: "hf_cost takes 3 matrices and 8 vectors")
        return mats[0].new_empty(mats[0].shape, dtype=torch.float64)


OP = LazyOp("hf_cost", DISPATCHER, _register)


def hf_cost(
    M: Tensor,
    Q01: Tensor,
    Q10: Tensor,
    d0: Tensor,
    e0: Tensor,
    n0: Tensor,
    s0: Tensor,
    d1: Tensor,
    e1: Tensor,
    n1: Tensor,
    s1: Tensor,
    *,
    squared: bool = False,
) -> Tensor:
    """The (n0, n1) HF interpolation cost from Gram products (see the module docstring for the formula).

    Args:
        M: (n0, n1) ``W0^T G W1``.
        Q01: (n0, n1) ``W0^T C1`` (prediction of neuron i against target j).
        Q10: (n0, n1) ``C0^T W1`` (target i against prediction of neuron j).
        d0, e0, n0, s0: (n0,) ``diag(W0^T G W0)``, ``diag(W0^T C0)``, target squared norms, importance (> 0).
        d1, e1, n1, s1: (n1,) the same for member 1.
        squared: sum of squared distances (True) or of L2 norms as the authors (False).

    Returns:
        (n0, n1) float64 cost on the inputs' device.

    Raises:
        ValueError: wrong shapes, devices, non-finite values or non-positive importance.
    """
    mats = [M, Q01, Q10]
    vecs = [d0, e0, n0, s0, d1, e1, n1, s1]
    for name, t in zip(("M", "Q01", "Q10", *_VEC_NAMES), mats + vecs):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if M.ndim != 2:
        raise ValueError(f"M must have shape (n0, n1); got shape {tuple(M.shape)}")
    r, c = M.shape
    for name, t in (("Q01", Q01), ("Q10", Q10)):
        if tuple(t.shape) != (r, c):
            raise ValueError(f"{name} must have shape ({r}, {c}) like M; got {tuple(t.shape)}")
    for name, t in zip(_VEC_NAMES, vecs):
        want = r if name.endswith("0") else c
        if tuple(t.shape) != (want,):
            raise ValueError(f"{name} must have shape ({want},); got {tuple(t.shape)}")
    if len({t.device for t in mats + vecs}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(t.device) for t in mats + vecs})}")
    mats = [t.detach().to(torch.float64).contiguous() for t in mats]
    vecs = [t.detach().to(torch.float64).contiguous() for t in vecs]
    for name, t in zip(("M", "Q01", "Q10", *_VEC_NAMES), mats + vecs):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if bool((vecs[3] <= 0).any()) or bool((vecs[7] <= 0).any()):
        raise ValueError("importance s0 and s1 must be > 0")
    return OP(mats, vecs, bool(squared))
