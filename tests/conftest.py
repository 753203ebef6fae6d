"""Test configuration. Sets TRITON_INTERPRET=1 *before anything imports triton* when no GPU is present,
so that the Triton kernels run in the CPU interpreter (compiled launches need a GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (files that compare kernels bit for bit across paths, or
    whose small problems run slower on two threads: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data_dir() -> str:
    path = os.environ.get("PYFUSION_DATA", SHARED_DATA)
    if not os.path.isdir(os.path.join(path, "mnist")):
        pytest.skip(f"MNIST not found under {os.path.abspath(path)} (set PYFUSION_DATA to the data folder)")
    return path


@pytest.fixture
def blas_first(monkeypatch):
    """The automatic choice of ``accumulate_moments`` / ``correlation`` takes the BLAS path first, as on an Intel CPU
    (elsewhere oneMKL runs AVX2 code and the engine comes first: :func:`pyfusion.ops.moments._blas_defers`), so that
    tests of the BLAS path's selection hold on every machine."""
    from pyfusion.ops import moments

    monkeypatch.setattr(moments, "_blas_defers", lambda: [])


@pytest.fixture
def engine_first(monkeypatch):
    """The automatic choice takes the engine before the BLAS path, as on AVX-512 CPUs of other vendors than Intel."""
    from pyfusion.ops import moments

    monkeypatch.setattr(moments, "_blas_defers", lambda: ["(test) the engine first"])
