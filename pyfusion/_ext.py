"""Loads the compiled extension ``pyfusion._C`` if it is there, and records why not otherwise.

The package must import and run (on the torch references) without the extension, so nothing here
raises: callers check :data:`EXT_AVAILABLE` and report :data:`EXT_SKIP_REASON`.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

_C: ModuleType | None = None
EXT_SKIP_REASON: str = ""

if os.environ.get("PYFUSION_SKIP_EXT", "") not in ("", "0"):
    EXT_SKIP_REASON = "PYFUSION_SKIP_EXT is set"
else:
    try:
        from pyfusion import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built, or built for another Python
        EXT_SKIP_REASON = (
            f"the compiled extension pyfusion._C could not be imported ({exc}); "
            "install with `pip install -c constraints.txt -e .` or run tools/dev_build.sh"
        )

EXT_AVAILABLE: bool = _C is not None


@functools.cache
def mkl_avx2_vendor() -> str | None:
    """The CPU vendor (``corr_cpu_vendor``: "amd" or "other") where torch's BLAS is oneMKL on a non-Intel CPU: MKL
    picks its code path by vendor and runs its AVX2 kernels there whatever the CPU has, so the extension's AVX-512
    kernels beat it (the correlation engine, :func:`pyfusion.ops.moments._blas_defers`; the float64 product of
    :func:`pyfusion.match.distance.sqdist`). None on Intel, without MKL, or without the extension."""
    if _C is None or not hasattr(_C, "corr_cpu_vendor"):
        return None
    vendor = str(_C.corr_cpu_vendor())
    if vendor == "intel":
        return None
    import torch  # here, not at import: this module loads before torch is needed

    return vendor if torch.backends.mkl.is_available() else None


def build_info() -> dict[str, Any]:
    """Facts about the compiled extension (OpenMP threads, CUDA, compiler); empty without it."""
    return dict(_C.build_info()) if _C is not None else {}


def cuda_kernels_reason() -> str | None:
    """None when the extension's CUDA kernels can run here, else the reason they cannot."""
    if _C is None:
        return EXT_SKIP_REASON
    info = build_info()
    if not info.get("cuda_compiled"):
        return str(info.get("cuda_error") or "the extension was built without CUDA")
    if info.get("cuda_device_count", 0) == 0:
        return f"no CUDA device is visible ({info.get('cuda_error') or 'device count is 0'})"
    return None
