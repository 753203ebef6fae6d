"""Every ```python block of README.md runs (so a snippet cannot rot): each block is executed on its own, in a fresh
namespace and a temporary working directory (the snippets write files such as ``fused.safetensors``).

The snippets are self-contained (they build small stand-in members instead of loading trained ones); a block that
needs something from outside would fail here, which is the point.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every fenced block whose info string is ``python``."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


BLOCKS = _python_blocks()


def test_readme_has_python_blocks():
    # the two sections with Python examples; a regex that silently matched nothing would make the test below vacuous
    assert len(BLOCKS) >= 2
    assert any("pyfusion.fuse.available_methods()" in code for _, code in BLOCKS)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
