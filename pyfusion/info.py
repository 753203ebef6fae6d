"""``python -m pyfusion.info``: versions, and which backends are available here (and why not)."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backend_table() -> list[tuple[str, bool, str]]:
    """(backend, available, why-not or detail) for every backend family."""
    from pyfusion import backends

    rows: list[tuple[str, bool, str]] = []
    info = backends.extension_summary()
    cpp = backends.cpp_reasons()
    detail = (
        f"OpenMP {'on' if info.get('openmp') else 'off'}, {info.get('openmp_max_threads', 1)} threads, "
        f"{info.get('compiler', '')}"
        if not cpp
        else "; ".join(cpp)
    )
    rows.append(("C++ CPU (pyfusion._C)", not cpp, detail))
    cuda = backends.cuda_reasons()
    rows.append(
        ("CUDA kernels (pyfusion._C)", not cuda, "; ".join(cuda) or f"{info.get('cuda_device_count')} device(s)")
    )
    tg = backends.triton_gpu_reasons()
    rows.append(("Triton (GPU, compiled)", not tg, "; ".join(tg) or "ok"))
    ti = backends.triton_interpreter_reasons()
    rows.append(("Triton interpreter (CPU)", not ti, "; ".join(ti) or "TRITON_INTERPRET=1"))
    rows.append(("torch / float64 references", True, "always available"))
    return rows


def op_table() -> list[str]:
    """Every op's backends in priority order, each with its availability on this machine (and why not)."""
    from pyfusion import dispatch
    from pyfusion.ops import OP_MODULES

    lines = []
    for module in sorted(set(OP_MODULES.values())):
        try:
            importlib.import_module(module)
        except Exception as exc:  # pragma: no cover - a broken op module should still let info print
            lines.append(f"  ({module} failed to import: {exc})")
    for name in sorted(OP_MODULES):
        disp = dispatch.REGISTRY.get(name)
        if disp is None:
            lines.append(f"  {name}: (not loaded)")
            continue
        lines.append(f"  {name}")
        for b in disp.backends:
            why = b.available()
            state = "x" if not why else " "
            text = b.description if not why else "unavailable: " + "; ".join(why)
            later = b.defers() if not why else []
            if later:
                text += " (chosen after the others here: " + "; ".join(later) + ")"
            lines.append(f"    [{state}] {b.name:17s} {text}")
    return lines


def report() -> str:
    import pyfusion

    lines = [
        f"pyfusion {pyfusion.__version__}",
        f"python   {sys.version.split()[0]} ({platform.platform()})",
        f"torch    {_version('torch')}",
        f"numpy    {_version('numpy')}",
        f"scipy    {_version('scipy')}",
        f"triton   {_version('triton')}",
        f"POT      {_version('pot')}",
        "",
        "backends:",
    ]
    for name, ok, detail in backend_table():
        lines.append(f"  [{'x' if ok else ' '}] {name:28s} {detail}")
    lines += [
        "",
        "ops (backends in priority order; PYFUSION_BACKEND=<backend> or <op>:<backend>,... forces one):",
        *op_table(),
        "",
        f"sqdist (the matching's float64 cost a @ b.T): {_sqdist_product()}",
    ]
    return "\n".join(lines)


def _sqdist_product() -> str:
    """Which product :func:`pyfusion.match.distance.sqdist` takes for large float64 CPU operands, and why."""
    import torch

    from pyfusion.match import distance

    a = torch.zeros(256, 256, dtype=torch.float64)
    if distance._gemm_kernel(a, a) is not None:
        return "csrc/gemm AVX-512 kernel (non-Intel CPU with AVX-512F, where torch's MKL runs AVX2 code)"
    return "torch's BLAS (an Intel CPU, no AVX-512F, no extension, or PYFUSION_BACKEND forces a non-cpp backend)"


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
