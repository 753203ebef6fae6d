"""Bad arguments to ``pyfusion.fuse`` give ValueErrors that name the argument and the expected shape (issue 16):
``lambdas='ab'``, data of the wrong shape or dtype, string batches, one bare tensor, unknown options; the members
are never changed."""

from __future__ import annotations

import pytest
import torch

import pyfusion
from pyfusion import models
from pyfusion.fuse.validate import DataMismatchError


def _members(k: int = 2) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [models.mlp([64, 16, 10]) for _ in range(k)]


def _state(ms):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in ms]


def _unchanged(ms, before):
    for m, sd in zip(ms, before):
        after = m.state_dict()
        assert sd.keys() == after.keys() and all(torch.equal(sd[k], after[k]) for k in sd)


@pytest.mark.parametrize(
    ("lambdas", "needle"),
    [
        ("ab", "got str 'ab'"),
        (b"ab", "got bytes"),
        ({"a": 0.5, "b": 0.5}, "got dict"),
        ([0.5, "x"], "str 'x' is not a number"),
        ([0.5, None], "NoneType None is not a number"),
        (torch.ones(2, 1) / 2, r"tensor of shape \(2, 1\)"),
        (0.5, "got float 0.5"),
    ],
)
def test_bad_lambdas_name_the_argument_and_shape(lambdas, needle):
    ms = _members()
    before = _state(ms)
    with pytest.raises(
        ValueError,
        match=r"lambdas must be a sequence of 2 non-negative floats summing to 1 \(shape "
        rf"\(2,\)\); .*{needle}",
    ):
        pyfusion.fuse(ms, method="average", lambdas=lambdas)
    _unchanged(ms, before)


@pytest.mark.parametrize("method", ["average", "partial", "activation_matching"])
def test_wrong_input_width_names_data_batch_shape_and_expected_input(method):
    """It used to be torch's 'mat1 and mat2 shapes cannot be multiplied' from inside the statistics."""
    ms = _members()
    before = _state(ms)
    with pytest.raises(DataMismatchError) as err:
        pyfusion.fuse(ms, [torch.rand(4, 5)], method=method)
    msg = str(err.value)
    assert msg.startswith("data does not fit the members") and "(4, 5)" in msg
    assert "module '1' (Linear), which expects inputs (..., 64)" in msg
    assert isinstance(err.value, ValueError)
    assert err.value.batch_shape == (4, 5) and err.value.module == "1" and err.value.expected == "(..., 64)"
    _unchanged(ms, before)


def test_wrong_channels_and_dtype_on_a_cnn():
    torch.manual_seed(0)
    ms = [models.vgg((4, "M"), image_size=4) for _ in range(2)]
    ms[0].train()
    before = _state(ms)
    with pytest.raises(
        DataMismatchError,
        match=r"\(2, 1, 8, 8\).*module '0' \(Conv2d\), which expects inputs "
        r"\(N, 3, H, W\)",
    ):
        pyfusion.fuse(ms, [torch.rand(2, 1, 8, 8)], method="average")
    with pytest.raises(DataMismatchError, match=r"\(torch.float64\); .*module '0' \(Conv2d\)"):
        pyfusion.fuse(ms, [torch.rand(2, 3, 4, 4, dtype=torch.float64)], method="average")
    _unchanged(ms, before)
    assert ms[0].training and all(m.training for m in ms[0].modules())  # the probe restored the flags


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (["abc", "def"], "inputs of type str"),
        ([("abc", 1)], "inputs of type str"),
        ([[]], "empty list"),
        ([torch.zeros(0, 64)], r"shape \(0, 64\)"),
        ([torch.tensor(3.0)], r"shape \(\)"),
        ("abc", "got str"),
        (torch.rand(8, 64), r"one tensor of shape \(8, 64\)"),
        (3, "got int"),
    ],
)
def test_batches_that_are_not_tensors(data, needle):
    ms = _members()
    before = _state(ms)
    with pytest.raises(ValueError, match=needle) as err:
        pyfusion.fuse(ms, data, method="partial", alpha=0.5)
    assert "data" in str(err.value)
    _unchanged(ms, before)


@pytest.mark.parametrize("method", ["average", "partial", "weight_matching", "kf", "cluster"])
def test_unknown_option_is_a_value_error_listing_the_options(method):
    ms = _members()
    with pytest.raises(
        ValueError, match=rf"method {method!r} (has no option 'no_such_option'|takes no options)"
    ) as err:
        pyfusion.fuse(ms, [torch.rand(8, 1, 8, 8)], method=method, no_such_option=1)
    if method == "kf":  # the options listed are the ones the registered method declares, and they are accepted
        listed = str(err.value).split("are: ")[1].split(", ")
        assert listed == _declared_options("kf") and {"importance", "n_restarts", "seed"} <= set(listed)
        pyfusion.fuse(ms, [torch.rand(8, 1, 8, 8)], method="kf", n_restarts=1, seed=3)


def _declared_options(method: str) -> list[str]:
    """The keyword-only parameters of the registered method's function (its declared options)."""
    import inspect

    from pyfusion.fuse.registry import get_method

    params = inspect.signature(get_method(method).fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "config"]


def test_good_arguments_still_fuse():
    ms = _members()
    x = torch.rand(8, 1, 8, 8)
    fused = pyfusion.fuse(ms, [x], method="partial", alpha=1.0, lambdas=torch.tensor([0.25, 0.75]))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), 0.25 * ms[0](x) + 0.75 * ms[1](x), rtol=1e-5, atol=1e-6)
    pyfusion.fuse(ms, [(x, torch.zeros(8, dtype=torch.long))], method="average", lambdas=(0.5, 0.5))
