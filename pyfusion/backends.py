"""Machine-level availability of the backends (shared by ops, tests and ``pyfusion.info``)."""

from __future__ import annotations

import functools
import importlib.util
import os

from pyfusion._ext import EXT_AVAILABLE, EXT_SKIP_REASON, build_info, cuda_kernels_reason

__all__ = [
    "cpp_reasons",
    "cuda_reasons",
    "triton_gpu_reasons",
    "triton_import_reasons",
    "triton_interpreter_reasons",
    "triton_interpret_enabled",
    "torch_cuda_available",
]


def cpp_reasons() -> list[str]:
    return [] if EXT_AVAILABLE else [EXT_SKIP_REASON]


def cuda_reasons() -> list[str]:
    why = cuda_kernels_reason()
    return [] if why is None else [why]


@functools.cache
def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def _triton_installed_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'pyfusion[triton]')"
    return None


@functools.cache
def _triton_import_reason() -> str | None:
    why = _triton_installed_reason()
    if why:
        return why
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return f"triton failed to import: {exc}"
    return None


def triton_import_reasons() -> list[str]:
    """Reasons triton cannot be imported (imports it: about 1 s the first time)."""
    why = _triton_import_reason()
    return [why] if why else []


def triton_gpu_reasons(import_check: bool = True) -> list[str]:
    """Reasons compiled Triton kernels cannot run (empty: they can).

    The cheap checks come first (installed? interpreter mode? a GPU?), so that a machine without a GPU never
    imports triton to find out; ``import_check=False`` skips the import itself (a dispatcher makes it only for
    a CUDA input).
    """
    why = _triton_installed_reason()
    if why:
        return [why]
    if triton_interpret_enabled():
        return ["TRITON_INTERPRET=1 is set: kernels run in the CPU interpreter, not compiled"]
    if not torch_cuda_available():
        return ["no CUDA GPU is visible to torch"]
    return triton_import_reasons() if import_check else []


def triton_interpreter_reasons(import_check: bool = True) -> list[str]:
    """Reasons the Triton interpreter (CPU, for tests) cannot run (empty: it can)."""
    why = _triton_installed_reason()
    if why:
        return [why]
    if not triton_interpret_enabled():
        return ["TRITON_INTERPRET=1 is not set (it must be set before triton is imported)"]
    return triton_import_reasons() if import_check else []


def extension_summary() -> dict[str, object]:
    return build_info()
