"""PartialConv2d's one-lookup module call (partial_conv2d.backends._HOT_CALLS): a repeat call of a settled layer
runs its strategy from one entry, and every change the entry cannot stand for (the weight changed in place, its
``.data`` reassigned, dtype / device moves, the thread count, inference tensors, autograd, jit tracing,
torch.compile, PYFUSION_BACKEND) takes the checked path. Every output is compared with the float64 reference
(F.conv2d on the dense zero-block weight), exactly on small-integer values."""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from _segments import assert_close, make_weight

from pyfusion.nn import PartialConv2d
from pyfusion.ops.partial_linear import tuning

PC = importlib.import_module("pyfusion.ops.partial_conv2d.backends")

# (in, out, the one strategy offered): the dense view (alpha 0), a dense copy, the output runs, the member
# convolutions, the unfolded GEMMs, shared + grouped
CASES = [
    ([6, 0, 0], [5, 0, 0], "dense"),
    ([5, 3, 3], [4, 2, 2], "dense"),
    ([5, 3, 3], [4, 2, 2], "runs"),
    ([5, 3, 3], [4, 2, 2], "members"),
    ([5, 3, 3], [4, 2, 2], "members_split"),
    ([5, 3, 3], [4, 2, 2], "im2col"),
    ([5, 3, 3], [4, 2, 2], "grouped"),
]


def _only(monkeypatch, name: str) -> None:
    """The tuner offered only ``name``: settled at the first call (deterministic hot entries)."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setattr(PC, "_candidates", lambda plan, geom, small: ({name: PC.STRATEGIES[name]}, name))
    PC._CANDIDATES.clear()
    tuning.clear()


def _module(ins, outs, activation, stride=1):
    conv = PartialConv2d(ins, outs, 3, stride=stride, padding=1, activation=activation).double().eval()
    w, b = make_weight(ins, outs, torch.float64, taps=(3, 3), integer=True, seed=7)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


def _ref(conv: PartialConv2d, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d in float64 with the dense zero-block weight, then the activation."""
    with torch.no_grad():
        w, b = conv.dense_weight().double(), conv.bias.double()
        y = F.conv2d(x.double(), w, b, conv.stride, conv.padding, conv.dilation)
    return {"none": y, "relu": F.relu(y)}[conv.activation]


def _hits(conv: PartialConv2d, x: torch.Tensor) -> bool:
    key = PC.hot_key(x, conv.weight, conv._geom, conv.activation)
    with torch.no_grad():
        return PC.hot_forward(key, x, conv.weight, conv.bias, conv._plan, conv._geom, conv.activation) is not None


@pytest.mark.parametrize("ins,outs,name", CASES)
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_hot_calls_follow_the_weight(monkeypatch, ins, outs, name, activation):
    """Installed once the strategy is settled; missed (and the output still exact) after an in-place update, a
    ``.data`` swap, ``load_state_dict``, a float32 round trip and a thread-count change; the entry goes with the
    weight."""
    _only(monkeypatch, name)
    conv = _module(ins, outs, activation)
    x = (torch.randn(2, conv.in_channels, 5, 6, dtype=torch.float64) * 2).round()

    def check(inp=x, exact=True):
        with torch.no_grad():
            y = conv(inp)
        assert y.dtype == inp.dtype and y.is_contiguous()
        assert_close(y, _ref(conv, inp), exact=exact, dtype=inp.dtype)

    check()
    assert _hits(conv, x)
    check()  # from the entry
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the version changes
    assert not _hits(conv, x)
    check()
    assert _hits(conv, x)
    conv.weight.data = conv.weight.data * -1  # a new storage, same version
    assert not _hits(conv, x)
    check()
    assert _hits(conv, x)
    sd = {k: (v * 3 if k == "weight" else v) for k, v in conv.state_dict().items()}
    conv.load_state_dict(sd)  # copy_ into the parameter: in place
    assert not _hits(conv, x)
    check()
    conv.float()  # .data reassigned with float32 copies
    assert not _hits(conv, x.float())
    with torch.no_grad(), pytest.raises(ValueError, match="dtype and device"):
        conv(x)  # the float64 input no longer matches: a precise error, not the old entry
    check(x.float(), exact=False)
    assert _hits(conv, x.float())
    conv.double()
    check()
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    try:
        torch.set_num_threads(other)
        assert not _hits(conv, x)  # the thread count is part of the key
        check()
        assert _hits(conv, x)
    finally:
        torch.set_num_threads(threads)
    assert sum(1 for k in PC._HOT_CALLS if len(k) == 6 and k[0] == id(conv.weight)) >= 2
    ref = weakref.ref(conv.weight)
    conv = None
    gc.collect()
    assert ref() is None
    assert not [v for k, v in PC._HOT_CALLS.items() if len(k) == 6 and v[2]() is None]


def test_hot_calls_keep_the_checks_and_the_other_paths(monkeypatch):
    """With an entry installed: wrong inputs still raise, another batch size or spatial size takes its own entry, a
    second module sharing the weight with another stride gets its own result, PYFUSION_BACKEND applies at the next
    call, autograd runs the registered op (differentiable), and torch.jit.trace records the op (right at another
    batch size)."""
    _only(monkeypatch, "members")
    conv = _module([5, 3, 3], [4, 2, 2], "relu")
    x = (torch.randn(2, 11, 5, 5, dtype=torch.float64) * 2).round()
    with torch.no_grad():
        conv(x)
        assert _hits(conv, x)
        with pytest.raises(ValueError, match=r"shape \(N, 11, H, W\)"):
            conv(torch.randn(2, 10, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="dtype and device"):
            conv(x.float())
        for shape in ((3, 11, 5, 5), (2, 11, 7, 4), (1, 11, 5, 5)):
            xs = (torch.randn(*shape, dtype=torch.float64) * 2).round()
            assert not _hits(conv, xs)
            assert_close(conv(xs), _ref(conv, xs), exact=True)
        strided = PartialConv2d([5, 3, 3], [4, 2, 2], 3, stride=2, padding=1, activation="relu").double().eval()
        strided.weight, strided.bias = conv.weight, conv.bias  # the same Parameter objects
        assert_close(strided(x), _ref(strided, x), exact=True)
        assert_close(conv(x), _ref(conv, x), exact=True)
        xc = x.contiguous(memory_format=torch.channels_last)  # same shape, other strides: same entry
        assert_close(conv(xc), _ref(conv, x), exact=True)
        monkeypatch.setenv("PYFUSION_BACKEND", "reference")
        assert_close(conv(x), _ref(conv, x), exact=True)
        monkeypatch.setenv("PYFUSION_BACKEND", "no_such_backend")
        with pytest.raises(Exception, match="no_such_backend"):
            conv(x)
        monkeypatch.delenv("PYFUSION_BACKEND")
    xg = x.clone().requires_grad_(True)
    y = conv(xg)  # grad enabled: the registered op
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None and conv.weight.grad is not None
    assert_close(y.detach(), _ref(conv, x), exact=True)
    with torch.no_grad():
        traced = torch.jit.trace(conv, x)
    assert "pyfusion::partial_conv2d" in str(traced.graph)
    x5 = (torch.randn(5, 11, 5, 5, dtype=torch.float64) * 2).round()
    with torch.no_grad():
        assert_close(traced(x5), _ref(conv, x5), exact=True)


def test_hot_calls_under_torch_compile(monkeypatch):
    """torch.compile (the eager backend: dynamo's graph, no inductor build) of a layer with an entry installed
    traces the registered op: right before and after an in-place weight update."""
    _only(monkeypatch, "members")
    conv = _module([5, 3, 3], [4, 2, 2], "none")
    x = (torch.randn(2, 11, 5, 5, dtype=torch.float64) * 2).round()
    with torch.no_grad():
        conv(x)
        assert _hits(conv, x)
        compiled = torch.compile(conv, backend="eager", fullgraph=True)
        assert_close(compiled(x), _ref(conv, x), exact=True)
        conv.weight.mul_(-2)
        assert_close(compiled(x), _ref(conv, x), exact=True)
        assert_close(conv(x), _ref(conv, x), exact=True)


def test_no_hot_calls_for_inference_weights_and_in_place_changes_in_inference_mode_are_seen(monkeypatch):
    """A module built in inference mode (inference-tensor weights, no version counter) gets no entry and follows
    in-place changes; a module built outside and changed in place inside inference mode misses its entry (the
    version counter of a normal tensor still moves there)."""
    _only(monkeypatch, "dense")
    x = (torch.randn(2, 11, 5, 5, dtype=torch.float64) * 2).round()
    with torch.inference_mode():
        conv = _module([5, 3, 3], [4, 2, 2], "none")
        assert conv.weight.is_inference()
        for _ in range(3):
            assert_close(conv(x), _ref(conv, x), exact=True)
            assert not any(len(k) == 6 and k[0] == id(conv.weight) for k in PC._HOT_CALLS)
            conv.weight.mul_(2)
    conv = _module([5, 3, 3], [4, 2, 2], "none")
    with torch.inference_mode():
        assert_close(conv(x), _ref(conv, x), exact=True)
        assert _hits(conv, x)
        conv.weight.mul_(3)
        assert not _hits(conv, x)
        assert_close(conv(x), _ref(conv, x), exact=True)


def test_hot_calls_only_once_the_choice_is_final(monkeypatch):
    """With several candidates, the entry is installed once the tuner's choice is final (after its second
    measurement), and the output is the reference at every call."""
    monkeypatch.delenv("PYFUSION_BACKEND", raising=False)
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "1")
    PC._CANDIDATES.clear()
    tuning.clear()
    conv = _module([5, 3, 3], [4, 2, 2], "relu")
    x = (torch.randn(1, 11, 4, 4, dtype=torch.float64) * 2).round()
    installed = []
    with torch.no_grad():
        for _ in range(tuning._RECHECK_CALLS + 3):
            assert_close(conv(x), _ref(conv, x), exact=True)
            installed.append(_hits(conv, x))
    assert not installed[0] and installed[-1]
    (kept,) = {v[0] for k, v in tuning.choices()["partial_conv2d"].items() if k[0][0] == id(conv._plan)}
    assert PC._HOT_CALLS[PC.hot_key(x, conv.weight, conv._geom, "relu")][6] is PC.STRATEGIES[kept]
