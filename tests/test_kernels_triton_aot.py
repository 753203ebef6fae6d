"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100 / H200) without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic but not Triton's compiler: type rules of compiled
Triton (a loop-carried variable may not change type, pointer / integer promotions) and code generation are only
checked by compiling. ``triton.compile`` with a ``GPUTarget("cuda", 90, 32)`` does that on a machine without a GPU
(ptxas ships with Triton), in a subprocess without TRITON_INTERPRET. Each kernel is compiled in float16 and
float32 (IEEE products) with the smallest tile of the autotune set (a cold compile of the largest tiles took ~20 s
each on the loaded 2-core VM; the type rules do not depend on the tile); tools/gpu_check.sh compiles the whole set
on the GPU. Every dtype must also have autotune configs that fit the 227 KiB of shared memory a Hopper block may use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r"""
import json, sys
import pyfusion  # registers pyfusion.triton_kernels from the checkout
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyfusion.triton_kernels import partial_conv2d as pc, partial_linear as pl

def compile_one(jitfn, dt, consts, warps, stages):
    types = {n: "i32" for n in jitfn.arg_names}
    for n in ("x_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "b_ptr", "y_ptr"):
        types[n] = "*" + dt
    types["meta_ptr"] = "*i64"
    sig = {n: ("constexpr" if n in consts else types[n]) for n in jitfn.arg_names}
    src = ASTSource(jitfn, sig, constexprs={(jitfn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return int(k.metadata.shared)

out = []
kernels = (("linear", pl, pl._partial_linear_kernel, 2), ("conv2d", pc, pc._partial_conv2d_kernel, 1))
for name, mod, kernel, act in kernels:
    configs = mod.autotune_configs()
    area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_K"] * c.num_stages
    c = min(configs, key=area)
    for dt, ieee in (("fp16", False), ("fp32", True)):
        info = {"kernel": name, "dtype": dt, "ieee": ieee, "config": str(c.kwargs)}
        try:
            info["shared"] = compile_one(kernel.fn, dt, dict(HAS_BIAS=True, ACT=act, DOT_IEEE=ieee, **c.kwargs),
                                         c.num_warps, c.num_stages)
        except Exception as exc:  # noqa: BLE001
            info["error"] = repr(exc)[:3000]
        out.append(info)
    # Shared memory of every config (elements per stage x stages), for the fit check.
    for dt, size in (("fp16", 2), ("fp32", 4)):
        fits = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_O"]) * c.kwargs["BLOCK_K"] * size
                * c.num_stages <= 232448]
        out.append({"kernel": name, "dtype": dt, "fitting_configs": len(fits), "configs": len(configs)})
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYFUSION_TRITON_AUTOTUNE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip(f"triton's CUDA backend cannot compile here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    errors = [r for r in results if "error" in r]
    assert not errors, errors
    compiled = [r for r in results if "shared" in r]
    assert len(compiled) == 4
    # The largest tiles may exceed a block's shared memory in float32 (the autotuner drops a config that fails to
    # launch), but every dtype needs several configs that fit.
    for r in results:
        if "fitting_configs" in r:
            assert r["fitting_configs"] >= 3, r
