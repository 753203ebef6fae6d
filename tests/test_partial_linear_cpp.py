"""The CPU panel engine as the ``cpp`` backend of partial_linear: where it is chosen, its packed weights (derived
once per weight version, never per call), and modules that replace, move or update their parameters.

Results are compared with the float64 reference (ops.reference.partial_linear_ref).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _segments import ACTS, K3_IN, K3_OUT, K4_IN, K4_OUT, assert_close, make_weight
from torch import nn

from pyfusion import _ext
from pyfusion.dispatch import NoBackendError
from pyfusion.nn import EnsembleLinear, PartialLinear
from pyfusion.ops import _weight_cache, partial_linear
from pyfusion.ops.layout import as_segments, segment_plan
from pyfusion.ops.reference import partial_linear_ref

PL = importlib.import_module("pyfusion.ops.partial_linear.backends")
DISPATCHER = PL.DISPATCHER

pytestmark = pytest.mark.skipif(
    bool(PL._cpp_available()), reason="; ".join(PL._cpp_available()) or "compiled extension available"
)


def plan_of(ins, outs):
    return segment_plan(as_segments(ins, "in"), as_segments(outs, "out"))


def _args(rows, dtype=torch.float32, requires_grad=False, device="cpu", ins=(4, 3, 3), outs=(5, 2, 2)):
    plan = plan_of(list(ins), list(outs))
    w, b = make_weight(list(ins), list(outs), dtype)
    w, b = w.to(device).requires_grad_(requires_grad), b.to(device).requires_grad_(requires_grad)
    x = torch.randn(rows, plan.i_total, dtype=dtype, device=device)
    return x, w, b, plan, "none"


def test_dispatcher_chooses_cpp_up_to_the_measured_crossover(monkeypatch):
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    plan = _args(1)[3]
    top = PL.cpp_max_rows(plan)
    assert top == PL.CPP_MAX_ROWS
    assert DISPATCHER.select(*_args(1)).name == "cpp"
    assert DISPATCHER.select(*_args(top, torch.float64)).name == "cpp"
    assert DISPATCHER.select(*_args(0)).name == "cpp"
    x3 = torch.randn(2, 2, 10)  # 4 rows after flattening
    assert DISPATCHER.select(x3, *_args(1)[1:]).name == "cpp"
    x3 = torch.randn(top, 2, 10)
    assert "measured crossover" in DISPATCHER.explain(x3, *_args(1)[1:])
    assert DISPATCHER.select(x3, *_args(1)[1:]).name == "torch"
    assert DISPATCHER.select(*_args(top + 1)).name == "torch"
    for dtype in (torch.float16, torch.bfloat16):
        assert DISPATCHER.select(*_args(1, dtype)).name == "torch"
    assert "meta" in DISPATCHER.explain(*_args(1, device="meta"))
    args = _args(1, requires_grad=True)
    assert DISPATCHER.select(*args).name == "torch"
    assert "autograd" in DISPATCHER.explain(*args)
    with torch.no_grad():
        assert DISPATCHER.select(*args).name == "cpp"
    wide = plan_of([0, 2048, 2048], [0, 2048, 2048])  # 8.4 M stored weights: the wide-layer crossover
    assert PL.cpp_max_rows(wide) == PL.CPP_MAX_ROWS_WIDE < PL.CPP_MAX_ROWS
    monkeypatch.setenv("PYFUSION_BACKEND", "partial_linear:cpp")
    x, w, b, _p, _a = _args(top + 1)
    with pytest.raises(NoBackendError, match="measured crossover"):
        partial_linear(x, w, b, [4, 3, 3], [5, 2, 2])


@pytest.mark.parametrize("ins,outs", [([37, 70, 70], [33, 17, 17]), (K3_IN, K3_OUT), (K4_IN, K4_OUT), ([0, 0], [3, 2])])
def test_cpp_matches_reference_for_every_row_count_it_takes(ins, outs):
    plan = plan_of(ins, outs)
    for dtype in (torch.float32, torch.float64):
        w, b = make_weight(ins, outs, dtype)
        for rows in (1, 2, 7, 8, 9, 31, 64, PL.cpp_max_rows(plan)):
            x = torch.randn(rows, plan.i_total, dtype=dtype)
            for act in ACTS:
                assert_close(PL.cpp_forward(x, w, b, plan, act), partial_linear_ref(x, w, b, ins, outs, act))


def test_cpp_openmp_region_matches_reference(monkeypatch):
    # Large enough work that the engine's OpenMP region opens (parallel_min_macs lowered for the test).
    PL._panel_plan.cache_clear()
    monkeypatch.setenv("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ins, outs = K3_IN, K3_OUT
        plan = plan_of(ins, outs)
        w, b = make_weight(ins, outs, torch.float64)
        x = torch.randn(50, plan.i_total, dtype=torch.float64)
        assert_close(PL.cpp_forward(x, w, b, plan, "gelu"), partial_linear_ref(x, w, b, ins, outs, "gelu"))
    finally:
        torch.set_num_threads(n)
        PL._panel_plan.cache_clear()


@pytest.fixture
def packs(monkeypatch):
    """Counts packings of a weight into the engine's panels (each must happen once per weight version)."""
    calls = []
    orig = _weight_cache.derived_weight

    def spy(weight, key, build):
        def counted(src):
            calls.append(key[0])
            return build(src)

        return orig(weight, key, counted)

    monkeypatch.setattr(PL, "derived_weight", spy)
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "0")  # the default strategy (the engine), not the measured one
    return calls


def test_module_packs_once_per_weight_version(packs):
    ins, outs = K3_IN, K3_OUT
    mod = PartialLinear(ins, outs, activation="gelu").eval()
    x = torch.randn(3, mod.in_features)

    def check(m, xin):
        with torch.no_grad():
            y = m(xin)
        assert_close(y, partial_linear_ref(xin, m.weight.detach(), m.bias.detach(), ins, outs, "gelu"))
        return y

    y0 = check(mod, x)
    for _ in range(5):
        check(mod, x)
    assert packs == ["panels"]  # one packing for six calls
    with torch.no_grad():
        mod.weight.mul_(3.0)  # in place: same data_ptr, new version
        mod.bias.add_(0.5)
    y1 = check(mod, x)
    assert not torch.equal(y0, y1) and len(packs) == 2
    mod.weight = nn.Parameter(torch.randn(mod.weight.shape))  # replaced
    check(mod, x)
    assert len(packs) == 3
    with torch.no_grad():
        mod.weight.data = torch.randn(mod.weight.shape)  # .data swap: same tensor object, new storage
    check(mod, x)
    assert len(packs) == 4
    mod.load_state_dict(PartialLinear(ins, outs, activation="gelu").state_dict())  # copied in place
    check(mod, x)
    assert len(packs) == 5
    mod.double()  # new storages
    y64 = check(mod, x.double())
    assert y64.dtype == torch.float64 and len(packs) == 6
    # autograd: the op's BLAS path, no packing
    xg = x.double().requires_grad_(True)
    mod(xg).sum().backward()
    assert len(packs) == 6 and xg.grad is not None


def test_cache_entries_go_with_their_weights(monkeypatch):
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "0")  # the engine (one derived entry), not the measured choice
    _weight_cache.clear()
    mod = PartialLinear([6, 4, 4], [5, 3, 3]).eval()
    with torch.no_grad():
        mod(torch.randn(2, 14))
    assert _weight_cache.entries() == 1
    del mod
    import gc

    gc.collect()
    assert _weight_cache.entries() == 0


def test_ensemble_linear_view_is_packed_once(packs):
    ens = EnsembleLinear(3, 5, 4).eval()
    x = torch.randn(2, 15)
    with torch.no_grad():
        for _ in range(3):
            y = ens(x)
    assert packs == ["panels"]  # weight.reshape(-1) is a new view at every call: cached under the parameter
    want = torch.cat([x[:, 5 * k : 5 * k + 5] @ ens.weight[k].T + ens.bias[k] for k in range(3)], 1)
    torch.testing.assert_close(y, want.detach())


def test_tensors_without_storage_fall_back_to_blas(packs):
    # torch.func.vmap hands the module BatchedTensors (CPU device, no data pointer): the functional BLAS form
    # runs them (the in-place BLAS path has no batching rule for addmm.out).
    ins, outs = [5, 4, 4], [6, 3, 3]
    mod = PartialLinear(ins, outs, activation="silu").eval()
    x = torch.randn(3, 1, 13)
    with torch.no_grad():
        y = torch.func.vmap(mod)(x)
    assert_close(y, partial_linear_ref(x, mod.weight.detach(), mod.bias.detach(), ins, outs, "silu"))


def test_module_parameter_access_paths(packs):
    # forward reads _parameters directly; functional_call, parametrize and bias=False must still be honoured.
    ins, outs = [4, 3, 3], [5, 2, 2]
    x = torch.randn(2, 10)
    mod = PartialLinear(ins, outs, bias=False).eval()
    with torch.no_grad():
        y = mod(x)
    assert_close(y, partial_linear_ref(x, mod.weight.detach(), None, ins, outs))
    swap = {"weight": torch.randn_like(mod.weight)}
    with torch.no_grad():
        y = torch.func.functional_call(mod, swap, (x,))
    assert_close(y, partial_linear_ref(x, swap["weight"], None, ins, outs))

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(mod, "weight", Double())
    assert "weight" not in mod._parameters
    with torch.no_grad():
        y = mod(x)
    assert_close(y, partial_linear_ref(x, 2 * mod.parametrizations.weight.original.detach(), None, ins, outs))


def test_parallel_threshold_env_override(monkeypatch):
    PL._panel_plan.cache_clear()
    monkeypatch.setenv("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "123")
    try:
        assert PL._panel_plan(plan_of([3, 2, 2], [4, 1, 1]), "relu").parallel_min_macs == 123
        monkeypatch.setenv("PYFUSION_PARTIAL_LINEAR_PARALLEL_MIN_MACS", "many")
        with pytest.raises(ValueError, match="PARALLEL_MIN_MACS"):
            PL._panel_plan(plan_of([3, 2, 1], [4, 1, 1]), "relu")
    finally:
        PL._panel_plan.cache_clear()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_every_simd_variant_matches_reference(isa):
    best = _ext._C.panel_linear_isa()
    order = ["default", "avx2", "avx512"]
    if order.index(isa) > order.index(best):
        pytest.skip(f"this CPU runs up to the {best} variant")
    ins, outs = K4_IN, K4_OUT
    plan = plan_of(ins, outs)
    try:
        _ext._C.panel_linear_set_isa(isa)
        assert _ext._C.panel_linear_isa() == isa
        for dtype in (torch.float32, torch.float64):
            w, b = make_weight(ins, outs, dtype)
            for rows in (1, 3, 9, 40):
                x = torch.randn(rows, plan.i_total, dtype=dtype)
                assert_close(PL.cpp_forward(x, w, b, plan, "gelu"), partial_linear_ref(x, w, b, ins, outs, "gelu"))
    finally:
        _ext._C.panel_linear_set_isa("auto")
    assert _ext._C.panel_linear_isa() == best
