"""Exporting fused models: torch.jit.trace records the ops (correct at every batch size), torch.export.export with a
dynamic batch is the supported export, torch.jit.script is refused with a clear error."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import pyfusion
from pyfusion import models
from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear, TorchScriptUnsupportedError
from pyfusion.testing import randomize_batchnorm


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fused_vgg():
    torch.manual_seed(0)
    ms = [randomize_batchnorm(models.vgg((8, "M", 8, "M"), in_channels=1, image_size=8, hidden=12)) for _ in range(2)]
    fused = pyfusion.fuse(ms, method="partial", alpha=0.5).eval()
    kinds = {type(m) for m in fused.modules()}
    assert PartialConv2d in kinds and PartialLinear in kinds
    return fused, (1, 8, 8)


def _fused_mlp():
    torch.manual_seed(0)
    ms = [models.mlp([10, 16, 16, 4]) for _ in range(3)]
    fused = pyfusion.fuse(ms, method="partial", alpha=0.5).eval()
    assert any(isinstance(m, PartialLinear) for m in fused.modules())
    return fused, (10,)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

BATCHES = (1, 4, 8, 9, 100)  # the compiled small-batch kernel runs up to 8 rows, the BLAS path above


@pytest.mark.parametrize("make", [_fused_vgg, _fused_mlp], ids=["vgg", "mlp"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_is_correct_at_every_batch_size(make, grad):
    fused, shape = make()
    x4 = torch.randn(4, *shape)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no "might not generalize" warning either
        traced = torch.jit.trace(fused, x4)
    code = traced.inlined_graph.str()
    assert "pyfusion::partial_linear" in code
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        for n in BATCHES:
            x = torch.randn(n, *shape)
            want = fused(x)
            torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


def test_jit_trace_of_single_modules():
    torch.manual_seed(1)
    lin = PartialLinear([3, 2, 2], [4, 3, 3], activation="relu")
    ens = EnsembleLinear(2, 5, 3, shared_input=True)
    conv = PartialConv2d([2, 1, 1], [3, 2, 2], 3, padding=1)
    for mod, shape in ((lin, (7,)), (ens, (5,)), (conv, (4, 5, 5))):
        with torch.no_grad():
            traced = torch.jit.trace(mod, torch.randn(2, *shape))
            for n in (1, 3, 50):
                x = torch.randn(n, *shape)
                torch.testing.assert_close(traced(x), mod(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        traced = torch.jit.trace(lin, torch.randn(2, 7))
    with pytest.raises(RuntimeError):  # the op checks the feature size of the recorded call
        traced(torch.randn(2, 6))


def test_jit_script_is_refused_with_a_clear_error():
    fused, _ = _fused_vgg()
    with pytest.raises(TorchScriptUnsupportedError, match=r"torch\.jit\.script does not support PartialConv2d"):
        torch.jit.script(fused)
    for mod in (PartialLinear([2, 1, 1], [2, 1, 1]), EnsembleLinear(2, 3, 4)):
        with pytest.raises(TorchScriptUnsupportedError, match=r"torch\.export\.export\(model"):
            torch.jit.script(mod)
    # the suggested fallback works: dense copies script (at dense cost)
    dense = torch.nn.Sequential(PartialLinear([2, 1, 1], [2, 1, 1], activation="relu").to_dense())
    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.jit.script(dense)(x), dense(x))


@pytest.mark.slow
def test_torch_export_with_a_dynamic_batch():
    """The supported export path: one export at batch 4, correct at other batch sizes."""
    fused, shape = _fused_vgg()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(fused, (torch.randn(4, *shape),), dynamic_shapes=({0: batch},))
    code = ep.graph_module.code
    assert "torch.ops.pyfusion.partial_conv2d" in code and "torch.ops.pyfusion.partial_linear" in code
    run = ep.module()
    with torch.no_grad():
        for n in (1, 3, 8, 33):
            x = torch.randn(n, *shape)
            torch.testing.assert_close(run(x), fused(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_saved_trace_and_export_load_in_a_fresh_process(tmp_path):
    """A saved trace / exported program needs the ops registered before loading: ``pyfusion.ops.register_all()``."""
    import subprocess
    import sys

    fused, shape = _fused_vgg()
    x = torch.randn(11, *shape)
    with torch.no_grad():
        want = fused(x)
        torch.jit.save(torch.jit.trace(fused, torch.randn(4, *shape)), str(tmp_path / "fused.pt"))
    ep = torch.export.export(fused, (torch.randn(4, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "fused.pt2"))
    torch.save({"x": x, "want": want}, str(tmp_path / "io.pt"))
    code = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import pyfusion.ops\n"
        "pyfusion.ops.register_all()\n"
        "d = torch.load(sys.argv[1] + '/io.pt')\n"
        "with torch.no_grad():\n"
        "    for y in (torch.jit.load(sys.argv[1] + '/fused.pt')(d['x']),\n"
        "              torch.export.load(sys.argv[1] + '/fused.pt2').module()(d['x'])):\n"
        "        torch.testing.assert_close(y, d['want'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(pyfusion.__file__)))  # where this pyfusion is imported from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
