"""The layers of the data flow (DESIGN §5): graph -> stats -> match -> fuse, and the public shape of pyfusion.fuse.

A layer imports only layers below it (``pyfusion.match`` never imports ``pyfusion.fuse``, ...), at module level or
inside functions; and ``pyfusion.fuse`` is one object, the callable package, whatever was imported first.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pyfusion"
ORDER = ["graph", "stats", "match", "fuse"]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported pyfusion module) of every import statement of a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("pyfusion")]
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("pyfusion")
        ):
            out += [(node.lineno, node.module)]
            if node.module == "pyfusion":  # from pyfusion import fuse, stats, ...
                out += [(node.lineno, f"pyfusion.{a.name}") for a in node.names]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


@pytest.mark.parametrize("layer", ORDER)
def test_a_layer_imports_only_layers_below_it(layer):
    rank = ORDER.index(layer)
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for line, module in _imports(path):
            other = _layer(module)
            if other is not None and ORDER.index(other) > rank:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_importing_match_loads_no_method_and_importing_fuse_no_engine():
    out = _run(
        "import sys\n"
        "def loaded(prefix): return sorted(k for k in sys.modules if k.startswith(prefix))\n"
        "import pyfusion.match as m\n"
        "print(loaded('pyfusion.fuse'))\n"
        "import pyfusion.fuse\n"  # methods load on the first registry lookup, the engines (ops) with them
        "print(loaded('pyfusion.ops'), [k for k in loaded('pyfusion.fuse.') if k.split('.')[2] in {methods!r}])\n"
        "p = m.partial_plan\n"  # the compatibility alias resolves from pyfusion.fuse on first access
        "print(p is pyfusion.fuse.partial_plan, m.Plan is pyfusion.fuse.Plan, 'partial_plan' in dir(m))\n".format(
            methods={"activation_matching", "average", "cluster", "interp", "ot", "partial", "weight_matching"}
        )
    )
    assert out.splitlines() == ["[]", "[] []", "True True True"]


FUSE_SHAPE = """
import sys, torch
{first}
import pyfusion
from pyfusion.fuse import fuse
from pyfusion.models import mlp
pkg = sys.modules["pyfusion.fuse"]
assert pyfusion.fuse is pkg, pyfusion.fuse
assert callable(pyfusion.fuse) and fuse is pkg.fuse and callable(fuse)
assert "partial" in pyfusion.fuse.available_methods()
members = [mlp([4, 5, 3]) for _ in range(2)]
x = torch.randn(2, 4)
a = pyfusion.fuse(members, method="average")
b = fuse(members, method="average")
assert torch.equal(a(x), b(x))
import pyfusion.fuse.partial
assert pyfusion.fuse is pkg
print("ok")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import pyfusion; pyfusion.fuse",  # the lazy top-level attribute first
        "from pyfusion.fuse import fuse",  # the function first
        "import pyfusion.fuse.partial",  # a method module first
    ],
)
def test_pyfusion_fuse_is_one_callable_package_in_any_import_order(first):
    assert _run(FUSE_SHAPE.format(first=first)).strip() == "ok"
