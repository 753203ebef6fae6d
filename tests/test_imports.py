"""Import laziness (inference code imports only what inference needs) and ``python -m pyfusion.info``.

Each check runs in a fresh interpreter and compares ``sys.modules`` with the modules that ``import torch`` alone
loads (torch itself imports tqdm, through torch.hub): what is left is what pyfusion imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

# Never imported by loading and running a saved model on CPU (the fusion layers, their dependencies, and
# torch.compile's machinery, which creating or first calling a torch.library op pulls in).
FORBIDDEN = (
    "pyfusion.fuse",
    "pyfusion.match",
    "pyfusion.stats",
    "pyfusion.graph",
    "pyfusion.cli",
    "pyfusion.ops.assignment",
    "pyfusion.ops.cluster",
    "pyfusion.ops.interp_cost",
    "pyfusion.ops.moments",
    "scipy",
    "sklearn",
    "matplotlib",
    "tqdm",
    "triton",
    "torch._dynamo",
    "torch._inductor",
)

_PROBE = r"""
import json, sys
import torch
baseline = set(sys.modules)
{body}
new = sorted(set(sys.modules) - baseline)
print(json.dumps({{"new": new, "extra": extra}}))
"""


def _run(body: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # what a user's process sees
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _imported(new: list[str], prefix: str) -> list[str]:
    return [m for m in new if m == prefix or m.startswith(prefix + ".")]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import pyfusion
    from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear

    torch.manual_seed(0)
    model = nn.Sequential(
        PartialConv2d([1, 1, 1], [2, 2, 2], 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        PartialLinear([6 * 16, 0, 0], [4, 3, 3], activation="relu"),
        EnsembleLinear(1, 10, 3),
    )
    path = tmp_path_factory.mktemp("model") / "partial.safetensors"
    pyfusion.save(model.eval(), path)
    return path


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_load_and_forward_import_only_what_inference_needs(saved_model, mode):
    body = f"""
import pyfusion
m = pyfusion.load({str(saved_model)!r})
with torch.{mode}():
    y = m(torch.randn(2, 3, 4, 4))
    y1 = m(torch.randn(1, 3, 4, 4))  # batch 1: the compiled small-batch kernel where it is built
from pyfusion.ops._registry import LAZY_OPS
extra = {{"shape": list(y.shape), "registered": sorted(n for n, o in LAZY_OPS.items() if o.registered)}}
"""
    res = _run(body)
    assert res["extra"]["shape"] == [2, 3]
    assert res["extra"]["registered"] == []  # no torch.library op was created
    leaked = {p: _imported(res["new"], p) for p in FORBIDDEN}
    assert not any(leaked.values()), {p: v for p, v in leaked.items() if v}


def test_import_pyfusion_ops_and_nn_is_light():
    res = _run("import pyfusion.ops, pyfusion.nn\nextra = None")
    for prefix in FORBIDDEN:
        assert not _imported(res["new"], prefix), prefix
    assert "pyfusion.ops.partial_linear" in res["new"] and "pyfusion.nn.partial" not in res["new"]


def test_fusion_time_ops_load_on_first_access():
    res = _run("import pyfusion.ops as ops\nf = ops.linear_assignment\nextra = f.__module__")
    assert res["extra"] == "pyfusion.ops.assignment"
    assert "pyfusion.ops.assignment" in res["new"] and "pyfusion.ops.cluster" not in res["new"]
    assert not _imported(res["new"], "scipy")  # the reference imports scipy only when it runs


def test_autograd_registers_the_op_and_still_computes_the_same(saved_model):
    body = f"""
import pyfusion
m = pyfusion.load({str(saved_model)!r})
x = torch.randn(2, 3, 4, 4)
with torch.no_grad():
    ref = m(x)
y = m(x)  # parameters require grad: autograd records the ops, which need their registration
y.sum().backward()
from pyfusion.ops._registry import LAZY_OPS
extra = {{
    "diff": float((y - ref).abs().max()),
    "registered": sorted(n for n, o in LAZY_OPS.items() if o.registered),
    "grad": m[4].weight.grad is not None,
}}
"""
    res = _run(body)
    assert res["extra"]["registered"] == ["partial_conv2d", "partial_linear"]
    assert res["extra"]["grad"] and res["extra"]["diff"] < 1e-5


def test_info_lists_every_op_and_backend_with_reasons():
    from pyfusion import dispatch
    from pyfusion.ops import OP_MODULES, register_all

    register_all()
    out = subprocess.run([sys.executable, "-m", "pyfusion.info"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    for name in OP_MODULES:
        assert f"  {name}" in lines, name
        start = lines.index(f"  {name}")
        rows = lines[start + 1 : start + 1 + len(dispatch.REGISTRY[name].backends)]
        for b, row in zip(dispatch.REGISTRY[name].backends, rows, strict=True):
            assert row.strip().startswith(("[x] " + b.name, "[ ] " + b.name)), (name, row)
            if row.strip().startswith("[ ]"):
                assert "unavailable: " in row and len(row.split("unavailable: ")[1]) > 10, row
            else:
                assert b.description in row
    assert "[x] reference" in out and "[x] torch" in out


def test_ops_and_nn_import_no_layer_above_them():
    """Layering (COMMON.md): ops and nn sit below graph / stats / match / fuse / cli and never import them."""
    import ast

    above = ("pyfusion.graph", "pyfusion.stats", "pyfusion.match", "pyfusion.fuse", "pyfusion.cli")
    bad = []
    for folder in ("ops", "nn"):
        for path in sorted((ROOT / "pyfusion" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith(above)]
    assert not bad, bad
