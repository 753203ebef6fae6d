"""Every op has one shape (pyfusion.ops._registry): validated public function -> torch.library op -> one
dispatcher -> backends -> float64 reference. Registration (opcheck on CPU for every op), the eager path equals
the registered op, backend names, PYFUSION_BACKEND semantics, true dispatch reasons, error messages."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from pyfusion import backends, dispatch
from pyfusion.dispatch import BACKEND_NAMES, NoBackendError
from pyfusion.ops import OP_MODULES
from pyfusion.ops._registry import LAZY_OPS
from pyfusion.ops.layout import as_segments, segment_plan

# K = 3 segments with a subset shared slot: {0,1,2} | {0,1} | b0 | b1 | b2
_SEG_IN = [(2, 0b111), (1, 0b011), (2, 0b001), (1, 0b010), (2, 0b100)]
_SEG_OUT = [(2, 0b111), (2, 0b011), (1, 0b001), (2, 0b010), (1, 0b100)]


def _seg_lists(ins, outs):
    return [s for s, _ in ins], [m for _, m in ins], [s for s, _ in outs], [m for _, m in outs]


def _pl_args(rows=5, ins=_SEG_IN, outs=_SEG_OUT, act="gelu", requires_grad=False):
    plan = segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(plan.stored, generator=g).requires_grad_(requires_grad)
    bias = torch.randn(plan.o_total, generator=g).requires_grad_(requires_grad)
    x = torch.randn(rows, plan.i_total, generator=g).requires_grad_(requires_grad)
    return (x, weight, bias, *_seg_lists(plan.in_segments, plan.out_segments), act)


def _pc_args(ins=((2, 3), (3, 1), (3, 2)), outs=((4, 3), (2, 1), (2, 2)), kernel=(3, 2), requires_grad=False):
    plan = segment_plan(as_segments(list(ins), "in"), as_segments(list(outs), "out"))
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(plan.stored * kernel[0] * kernel[1], generator=g).requires_grad_(requires_grad)
    bias = torch.randn(plan.o_total, generator=g).requires_grad_(requires_grad)
    x = torch.randn(2, plan.i_total, 6, 5, generator=g).requires_grad_(requires_grad)
    return (x, weight, bias, *_seg_lists(plan.in_segments, plan.out_segments), list(kernel), [1, 2], [1, 0], [1, 1],
            "relu")  # fmt: skip


def _sample_args(name: str) -> tuple:
    """Arguments of the registered op (the validated form the public function hands it)."""
    rng = np.random.default_rng(0)
    if name == "partial_linear":
        return _pl_args(
            rows=200
        )  # > the panel engine's crossover (forward-only: it declines inside the op): BLAS in both
    if name == "partial_conv2d":
        return _pc_args()
    if name == "linear_assignment":
        return ([torch.from_numpy(rng.random((6, 8))), torch.from_numpy(rng.random((4, 3)))], False, [-1, 2], None, 1)
    if name == "weighted_kmeans":
        return (torch.from_numpy(rng.normal(size=(12, 4))), torch.ones(12, dtype=torch.float64), False, 3, 2,
                "ward", 3, 50, "hartigan", 0, 1)  # fmt: skip
    if name == "correlation":
        return (torch.randn(40, 5), torch.randn(40, 3))
    if name == "accumulate_moments":
        x = torch.randn(30, 6)
        shift = x[:8].double().mean(0).float().double()
        return (x, shift, torch.zeros(6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64))
    if name == "hf_cost":
        mats = [torch.from_numpy(rng.standard_normal((5, 7))) for _ in range(3)]
        vecs = [torch.from_numpy(rng.uniform(1, 3, n)) for n in (5, 5, 5, 5, 7, 7, 7, 7)]
        return (mats, vecs, False)
    raise AssertionError(name)


def _lazy(name: str):
    importlib.import_module(OP_MODULES[name])
    return LAZY_OPS[name]


def _clone(args):
    return tuple(
        a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, torch.Tensor)
        else [t.clone() for t in a]
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
        else a
        for a in args
    )


def _outputs(out):
    return [out] if isinstance(out, torch.Tensor) else [o for o in (out or ()) if isinstance(o, torch.Tensor)]


OPS = sorted(OP_MODULES)


def test_every_op_module_defines_one_lazy_op_with_standard_backend_names():
    for name in OPS:
        lazy = _lazy(name)
        assert lazy.name == name and lazy.dispatcher.op == name
        assert dispatch.REGISTRY[name] is lazy.dispatcher
        names = [b.name for b in lazy.dispatcher.backends]
        assert set(names) <= set(BACKEND_NAMES), (name, names)
        assert "reference" in names, name  # the float64 path has the same name in every op
        assert all(b.description for b in lazy.dispatcher.backends), name


@pytest.mark.parametrize("name", OPS)
def test_every_op_passes_opcheck_on_cpu(name):
    op = _lazy(name).op()
    torch.library.opcheck(op, _sample_args(name))
    if name in ("partial_linear", "partial_conv2d"):  # differentiable: the registered autograd too
        args = _pl_args(requires_grad=True) if name == "partial_linear" else _pc_args(requires_grad=True)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", OPS)
def test_eager_path_equals_the_registered_op(name):
    lazy = _lazy(name)
    args = _sample_args(name)
    eager_args, op_args = _clone(args), _clone(args)
    eager = lazy(*eager_args)  # eager, no autograd: straight through the dispatcher
    registered = lazy.op()(*op_args)
    if name == "accumulate_moments":  # mutates s1, s2
        eager, registered = eager_args[2:], op_args[2:]
    for a, b in zip(_outputs(eager), _outputs(registered), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autograd_goes_through_the_registered_op():
    from pyfusion.ops import partial_conv2d, partial_linear

    x, w, bias, *_lists, act = _pl_args(requires_grad=True)
    y = partial_linear(x, w, bias, _SEG_IN, _SEG_OUT, act)
    assert "partial_linear" in type(y.grad_fn).__name__ or y.grad_fn.name().startswith("pyfusion")
    x, w, bias, i_s, i_m, o_s, o_m, kernel, st, pd, dl, act = _pc_args(requires_grad=True)
    ins, outs = list(zip(i_s, i_m)), list(zip(o_s, o_m))
    y = partial_conv2d(x, w, bias, ins, outs, kernel, st, pd, dl, act)
    assert y.grad_fn is not None and LAZY_OPS["partial_conv2d"].registered
    with torch.no_grad():
        assert partial_conv2d(x, w, bias, ins, outs, kernel, st, pd, dl, act).grad_fn is None


# ---------------------------------------------------------------- PYFUSION_BACKEND


def _OP_DARGS(args):  # the partial_linear dispatcher's arguments for the op's arguments
    return _lazy("partial_linear").dispatcher_args(*args)


def _select(name: str):
    lazy = _lazy(name)
    return lazy.dispatcher.select(*lazy.dispatcher_args(*_sample_args(name))).name


def test_global_reference_applies_to_every_op(monkeypatch):
    monkeypatch.setenv("PYFUSION_BACKEND", "reference")
    for name in OPS:
        assert _select(name) == "reference", name


def test_global_backend_that_an_op_lacks_raises_naming_the_op(monkeypatch):
    monkeypatch.setenv("PYFUSION_BACKEND", "triton")
    with pytest.raises(NoBackendError, match=r"backend 'triton' does not exist for op 'linear_assignment'"):
        _select("linear_assignment")
    # ... and through the public function too, not only the dispatcher
    from pyfusion.ops import linear_assignment

    with pytest.raises(NoBackendError, match="linear_assignment"):
        linear_assignment(np.eye(3))
    monkeypatch.setenv("PYFUSION_BACKEND", "torch")
    with pytest.raises(NoBackendError, match=r"op 'weighted_kmeans'; its backends: \['cpp', 'reference'\]"):
        _select("weighted_kmeans")


def test_per_op_backend_applies_to_that_op_only(monkeypatch):
    monkeypatch.setenv("PYFUSION_BACKEND", "correlation:reference, partial_linear:torch")
    assert _select("correlation") == "reference"
    assert _select("partial_linear") == "torch"
    monkeypatch.delenv("PYFUSION_BACKEND")
    default = _select("accumulate_moments")
    monkeypatch.setenv("PYFUSION_BACKEND", "correlation:reference")
    assert _select("accumulate_moments") == default


def test_per_op_spec_naming_an_unknown_op_or_malformed_raises(monkeypatch):
    monkeypatch.setenv("PYFUSION_BACKEND", "linear_asignment:reference")  # typo: would silently do nothing
    with pytest.raises(NoBackendError, match=r"names op\(s\) \['linear_asignment'\] that do not exist"):
        _select("partial_linear")
    monkeypatch.setenv("PYFUSION_BACKEND", "hf_cost:reference,cpp")
    with pytest.raises(NoBackendError, match="entry 'cpp' must be 'op:backend'"):
        _select("hf_cost")


def test_forced_backend_that_declines_names_op_reasons_and_inputs(monkeypatch):
    from pyfusion.ops import partial_linear

    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:triton")
    x, w, bias, *_lists, act = _pl_args(rows=3)
    with pytest.raises(NoBackendError) as err:
        partial_linear(x, w, bias, _SEG_IN, _SEG_OUT, act)
    msg = str(err.value)
    assert "forces backend 'triton' for op 'partial_linear', but it declined" in msg
    assert "x: Tensor(shape=(3, 8), dtype=float32, device=cpu)" in msg
    assert f"weight: Tensor(shape=({w.numel()},), dtype=float32, device=cpu)" in msg
    assert "plan: SegmentPlan(in=[(2, 7), (1, 3), (2, 1), (1, 2), (2, 4)]" in msg


def test_no_backend_error_lists_every_backend_and_the_inputs():
    d = dispatch.Dispatcher(
        "_test_no_backend",
        [
            dispatch.Backend("cpp", lambda x, k: 0, supports=lambda x, k: [f"k = {k} is odd"]),
            dispatch.Backend("reference", lambda x, k: 1, available=lambda: ["switched off for the test"]),
        ],
        arg_names=("x", "k"),
    )
    try:
        with pytest.raises(NoBackendError) as err:
            d(torch.zeros(2, 3, dtype=torch.float16), 3)
        msg = str(err.value)
        assert "no backend of op '_test_no_backend' accepts these inputs" in msg
        assert "cpp: k = 3 is odd" in msg and "reference: switched off for the test" in msg
        assert "x: Tensor(shape=(2, 3), dtype=float16, device=cpu)" in msg and "k: 3" in msg
    finally:
        dispatch.REGISTRY.pop("_test_no_backend", None)


def test_a_deferring_backend_runs_only_when_forced_or_alone(monkeypatch):
    """``Backend.defers``: the automatic choice passes the backend over for a later one that accepts the inputs, takes
    it when none does, and ``PYFUSION_BACKEND`` still forces it; ``explain`` says so."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    d = dispatch.Dispatcher(
        "_test_defers",
        [
            dispatch.Backend("torch", lambda k: "torch", defers=lambda: ["slower here"]),
            dispatch.Backend("cpp", lambda k: "cpp", supports=lambda k: [] if k > 0 else ["k <= 0"]),
        ],
        arg_names=("k",),
    )
    try:
        assert d(1) == "cpp"
        assert d(0) == "torch"  # the only backend that accepts
        assert "ok (deferred: slower here)" in d.explain(1)
        monkeypatch.setenv("PYFUSION_BACKEND", "_test_defers:torch")
        assert d(1) == "torch"
    finally:
        dispatch.REGISTRY.pop("_test_defers", None)


def test_cached_choice_follows_pyfusion_backend(monkeypatch):
    from pyfusion.ops.partial_linear import DISPATCHER

    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    args = _OP_DARGS(_pl_args(rows=400))
    assert DISPATCHER.select_cached(("test-key",), *args).name == "torch"
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:reference")
    assert DISPATCHER.select_cached(("test-key",), *args).name == "reference"
    monkeypatch.setenv("PYFUSION_BACKEND", "reference")
    assert DISPATCHER.select_cached(("test-key",), *args).name == "reference"
    monkeypatch.delenv("PYFUSION_BACKEND")
    assert DISPATCHER.select_cached(("test-key",), *args).name == "torch"


# ---------------------------------------------------------------- dispatch reasons are true (simulated GPU)


def _fake_cuda_pl_args(dtype=torch.float32):
    """partial_linear arguments as FakeTensors on a CUDA device (no GPU needed: only metadata is read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plan = segment_plan(as_segments(_SEG_IN, "in"), as_segments(_SEG_OUT, "out"))
    with FakeTensorMode():
        w = torch.empty(plan.stored, device="cuda", dtype=dtype)
        x = torch.empty(64, plan.i_total, device="cuda", dtype=dtype)
        bias = torch.empty(plan.o_total, device="cuda", dtype=dtype)
    return (x, w, bias, plan, "none")


def _fake_cuda_pc_args(dtype=torch.float32):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyfusion.ops.partial_conv2d import conv_geom

    plan = segment_plan(as_segments(_SEG_IN, "in"), as_segments(_SEG_OUT, "out"))
    with FakeTensorMode():
        w = torch.empty(plan.stored * 9, device="cuda", dtype=dtype)
        x = torch.empty(4, plan.i_total, 8, 8, device="cuda", dtype=dtype)
        bias = torch.empty(plan.o_total, device="cuda", dtype=dtype)
    return (x, w, bias, plan, conv_geom(3, 1, 1), "relu")


def _triton_can_run(monkeypatch, can: bool) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setattr(backends, "torch_cuda_available", lambda: True)
    if can:
        monkeypatch.setattr(backends, "_triton_installed_reason", lambda: None)
        monkeypatch.setattr(backends, "triton_import_reasons", lambda: [])
    else:
        monkeypatch.setattr(backends, "_triton_installed_reason", lambda: "triton is not installed (simulated)")


def test_cuda_without_triton_runs_the_torch_backend_not_the_reference(monkeypatch):
    from pyfusion.ops.partial_linear import DISPATCHER

    args = _fake_cuda_pl_args()
    _triton_can_run(monkeypatch, False)
    assert DISPATCHER.select(*args).name == "torch"
    text = DISPATCHER.explain(*args)
    assert "triton     declined: triton is not installed (simulated)" in text
    assert "torch      ok" in text
    _triton_can_run(monkeypatch, True)
    assert DISPATCHER.select(*args).name == "triton"


def test_cuda_triton_declines_float64_and_torch_takes_it(monkeypatch):
    from pyfusion.ops.partial_linear import DISPATCHER

    _triton_can_run(monkeypatch, True)
    args = _fake_cuda_pl_args(torch.float64)
    assert DISPATCHER.select(*args).name == "torch"
    assert "dtype torch.float64 is not float32/float16/bfloat16" in DISPATCHER.explain(*args)


def test_cuda_conv_dispatches_to_the_implicit_gemm_kernel(monkeypatch):
    from pyfusion.ops.partial_conv2d import DISPATCHER

    _triton_can_run(monkeypatch, True)
    assert DISPATCHER.select(*_fake_cuda_pc_args()).name == "triton"
    args = _fake_cuda_pc_args(torch.float64)
    assert DISPATCHER.select(*args).name == "torch"
    assert "dtype torch.float64 is not float32/float16/bfloat16" in DISPATCHER.explain(*args)
    _triton_can_run(monkeypatch, False)
    assert DISPATCHER.select(*_fake_cuda_pc_args()).name == "torch"


def _cuda_kernels_available(monkeypatch, attr: str, can: bool) -> None:
    """Simulate a CUDA build of the extension on a visible GPU (or its absence)."""
    from pyfusion import _ext

    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setattr(backends, "cuda_kernels_reason", lambda: None if can else "no CUDA GPU (simulated)")
    if can and not hasattr(_ext._C, attr):
        monkeypatch.setattr(_ext._C, attr, lambda *a, **k: None, raising=False)


def test_cuda_costs_dispatch_to_the_batched_gpu_assignment(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyfusion.ops.assignment import DISPATCHER

    DISPATCHER.clear_cache()
    _cuda_kernels_available(monkeypatch, "lsap_solve_cuda", True)
    with FakeTensorMode():
        costs = [torch.empty(6, 8, device="cuda"), torch.empty(5, 5, device="cuda")]
        mixed = [torch.empty(6, 8, device="cuda"), torch.empty(5, 5, device="cuda", dtype=torch.float64)]
    args = (costs, False, [-1, 3], None, 1)
    assert DISPATCHER.select(*args).name == "cuda"
    assert "must share one dtype" in DISPATCHER.explain(mixed, False, [-1, 3], None, 1)
    cpu = ([torch.zeros(3, 3)], False, [-1], None, 1)
    assert DISPATCHER.select(*cpu).name == "cpp"
    assert "costs are on cpu" in DISPATCHER.explain(*cpu)
    with FakeTensorMode():
        half = [torch.empty(3, 3, device="cuda", dtype=torch.float16)]
    assert "float16" in DISPATCHER.explain(half, False, [-1], None, 1)
    _cuda_kernels_available(monkeypatch, "lsap_solve_cuda", False)
    assert DISPATCHER.select(*args).name == "cpp"  # copied to the host and solved there
    assert "no CUDA GPU (simulated)" in DISPATCHER.explain(*args)
    DISPATCHER.clear_cache()


def test_cuda_inputs_of_the_moments_ops_dispatch_to_the_cuda_kernels(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyfusion.ops import moments

    _cuda_kernels_available(monkeypatch, "corr_accumulate_cuda", True)
    with FakeTensorMode():
        x = torch.empty(64, 6, device="cuda")
        shift = torch.empty(6, device="cuda", dtype=torch.float64)
        s1 = torch.empty(6, device="cuda", dtype=torch.float64)
        s2 = torch.empty(6, 6, device="cuda", dtype=torch.float64)
        y = torch.empty(64, 3, device="cuda")
    assert moments.ACCUMULATE.select(x, shift, s1, s2).name == "cuda"
    assert moments.CORRELATION.select(x, y).name == "cuda"
    _cuda_kernels_available(monkeypatch, "corr_accumulate_cuda", False)
    assert moments.CORRELATION.select(x, y).name == "reference"


def test_cpu_machine_never_imports_triton_to_decline_it(monkeypatch):
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from pyfusion.ops.partial_linear import DISPATCHER\n"
        "x = torch.randn(3, 4)\n"
        "from pyfusion.ops.layout import segment_plan\n"
        "p = segment_plan(((2, 3), (1, 1), (1, 2)), ((2, 3), (1, 1)))\n"
        "print(DISPATCHER.explain(x, torch.randn(p.stored), None, p, 'none'))\n"
        "print('triton imported:', 'triton' in sys.modules)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: triton's availability is checked by importing it")
    assert "triton imported: False" in out, out
