"""The package skeleton: imports, info, dispatcher, CI/README agreement, layout rules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyfusion
from pyfusion import dispatch

ROOT = Path(__file__).resolve().parent.parent


def test_info_runs_and_lists_backends():
    out = subprocess.run([sys.executable, "-m", "pyfusion.info"], capture_output=True, text=True, check=True)
    for name in ("C++ CPU", "CUDA", "Triton (GPU", "Triton interpreter", "references"):
        assert name in out.stdout
    # Every unavailable backend says why.
    for line in out.stdout.splitlines():
        if line.strip().startswith("[ ]"):
            assert len(line.split(maxsplit=3)) >= 3 and len(line.strip()) > 40, line


def test_extension_is_built_in_ci():
    # The README's install builds the extension; a CI run without it would test only the references.
    from pyfusion import _ext

    if os.environ.get("CI"):
        assert _ext.EXT_AVAILABLE, _ext.EXT_SKIP_REASON


def test_package_imports_without_extension():
    code = "import pyfusion, pyfusion.ops, pyfusion.stats; from pyfusion import _ext; print(_ext.EXT_AVAILABLE)"
    env = dict(os.environ, PYFUSION_SKIP_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_triton_kernels_live_under_pyfusion():
    import importlib.util

    assert importlib.util.find_spec("pyfusion.triton_kernels") is not None


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"TEST_COMMAND='([^']+)'", ci)
    assert m, ".ci/run must define TEST_COMMAND"
    assert m.group(1) in readme, "the README must show exactly the command .ci/run runs"


def test_dispatcher_explains_and_honours_override(monkeypatch):
    d = dispatch.Dispatcher(
        "_test_op",
        [
            dispatch.Backend("fast", lambda x: "fast", supports=lambda x: [] if x > 0 else ["x must be positive"]),
            dispatch.Backend("reference", lambda x: "ref"),
        ],
    )
    try:
        assert d(1) == "fast"
        assert d(-1) == "ref"
        assert "x must be positive" in d.explain(-1)
        monkeypatch.setenv("PYFUSION_BACKEND", "_test_op:fast")
        with pytest.raises(dispatch.NoBackendError, match="x must be positive"):
            d(-1)
        monkeypatch.setenv("PYFUSION_BACKEND", "reference")
        assert d(1) == "ref"
        monkeypatch.setenv("PYFUSION_BACKEND", "_test_op:nope")
        with pytest.raises(dispatch.NoBackendError, match="does not exist"):
            d(1)
    finally:
        dispatch.REGISTRY.pop("_test_op", None)


def test_lazy_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        pyfusion.does_not_exist  # noqa: B018


def test_ruff_clean():
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    if ruff.returncode != 0 and "No module named ruff" in ruff.stderr:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
