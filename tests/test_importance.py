"""Neuron importance scores: conductance against a brute-force definition and completeness, activation x gradient
against autograd by hand, normalisation, targets, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfusion.match.importance import attributions, neuron_importance
from pyfusion.models import mlp, vgg


def _tiny_mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return mlp([6, 5, 4, 3], activation="tanh").double().eval()


def _brute_conductance(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, layer: int, n_steps: int):
    """cond_j(x) = sum_m dF_y/da_j(alpha_m x) (a_j(alpha_m x) - a_j(alpha_{m-1} x)), one sample and step at a time,
    with the gradient taken through the rest of the network fed the layer output as a leaf tensor."""
    head, tail = model[: layer + 1], model[layer + 1 :]
    out = torch.zeros(x.shape[0], head(x[:1]).shape[1], dtype=torch.float64)
    for i in range(x.shape[0]):
        prev = head(0.0 * x[i : i + 1])[0]
        for m in range(1, n_steps + 1):
            a = head((m / n_steps) * x[i : i + 1])[0].detach().requires_grad_(True)
            f = tail(a[None])[0, y[i]]
            (g,) = torch.autograd.grad(f, a)
            out[i] += g * (a.detach() - prev.detach())
            prev = a
    return out


@pytest.mark.parametrize("layer,n_steps", [(1, 1), (1, 7), (3, 5)])
def test_conductance_matches_brute_force(layer, n_steps):
    model = _tiny_mlp()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    ours = attributions(model, x, y, [str(layer)], method="conductance", n_steps=n_steps)[str(layer)]
    ref = _brute_conductance(model, x, y, layer, n_steps)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # the aggregated score: mean over samples of |cond|
    agg = neuron_importance(model, [(x, y)], [str(layer)], method="conductance", n_steps=n_steps, normalize=False)
    torch.testing.assert_close(agg[str(layer)], ref.abs().mean(0), rtol=1e-10, atol=1e-12)


def test_conductance_completeness():
    """The conductances of a full layer sum to F_y(x) - F_y(0) (Riemann error shrinking with n_steps)."""
    model = _tiny_mlp()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    with torch.no_grad():
        diff = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    errs = []
    for n_steps in (4, 64, 1024):
        total = attributions(model, x, y, ["1"], n_steps=n_steps)["1"].sum(1)
        errs.append(float((total - diff).abs().max()))
    assert errs[2] < 2e-3 * float(diff.abs().max())
    assert errs[2] < errs[1] < errs[0]
    # the logits layer itself: the conductance of the target logit is exactly F_y(x) - F_y(0)
    last = attributions(model, x, y, ["5"], n_steps=3)["5"]
    torch.testing.assert_close(last.sum(1), diff, rtol=1e-10, atol=1e-12)


def test_conductance_conv_completeness():
    torch.manual_seed(1)
    model = vgg((3, "M", 4), in_channels=1, num_classes=5, image_size=8, hidden=6).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    with torch.no_grad():
        diff = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    att = attributions(model, x, y, ["1", "5"], n_steps=2000)  # BN outputs of both conv layers
    for p in ("1", "5"):
        torch.testing.assert_close(att[p].sum((1, 2, 3)), diff, rtol=0, atol=5e-3 * float(diff.abs().max()))


def test_activation_gradient_by_hand():
    torch.manual_seed(2)
    model = vgg((3, "M", 4), in_channels=1, num_classes=5, image_size=8, hidden=6).double().eval()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    att = attributions(model, x, y, ["0"], method="activation_gradient")["0"]
    a = model[0](x).detach().requires_grad_(True)
    f = model[1:](a).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(f, a)
    torch.testing.assert_close(att, a.detach() * g, rtol=1e-12, atol=1e-14)
    score = neuron_importance(model, [(x, y)], ["0"], method="activation_gradient", normalize=False)["0"]
    torch.testing.assert_close(score, (a.detach() * g).abs().mean((0, 2, 3)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["activation_gradient", "conductance"])
def test_an_in_place_relu_after_the_point_changes_nothing(method):
    """The point's activation and the gradient at it are taken before ``nn.ReLU(inplace=True)`` overwrites it."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double().eval()
    inplace = nn.Sequential(plain[0], nn.ReLU(inplace=True), plain[2]).eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    want = attributions(plain, x, y, ["0"], method=method)["0"]
    got = attributions(inplace, x, y, ["0"], method=method)["0"]
    assert bool((want != 0).any())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_normalisation_uniform_and_batches():
    model = _tiny_mlp()
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    s = neuron_importance(model, [(x, y)], ["1", "3"], method="conductance")
    for p, n in (("1", 5), ("3", 4)):
        assert s[p].shape == (n,)
        assert (s[p] > 0).all()
        assert abs(float(s[p].sum()) - (1.0 + n * 1e-8)) < 1e-12
    u = neuron_importance(model, [(x, y)], ["1"], method="uniform")["1"]
    torch.testing.assert_close(u, torch.full((5,), 0.2 + 1e-8, dtype=torch.float64))
    # batching and chunking do not change the scores
    raw = neuron_importance(model, [(x, y)], ["1"], method="conductance", normalize=False)["1"]
    split = neuron_importance(
        model, [(x[:13], y[:13]), (x[13:], y[13:])], ["1"], method="conductance", normalize=False, chunk_size=4
    )["1"]
    torch.testing.assert_close(raw, split, rtol=1e-12, atol=1e-15)


def test_targets_default_to_prediction():
    model = _tiny_mlp()
    x = torch.randn(10, 6, dtype=torch.float64)
    pred = model(x).argmax(1)
    a = neuron_importance(model, [x], ["1"], method="activation_gradient")
    b = neuron_importance(model, [(x, pred)], ["1"], method="activation_gradient")
    torch.testing.assert_close(a["1"], b["1"])
    c = neuron_importance(model, [(x, (pred + 1) % 3)], ["1"], method="activation_gradient")
    assert not torch.allclose(a["1"], c["1"])


def test_errors():
    model = _tiny_mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        neuron_importance(model, [x], ["1"], method="deeplift")
    with pytest.raises(ValueError, match="not a module path"):
        neuron_importance(model, [x], ["fc9"])
    with pytest.raises(ValueError, match="n_steps"):
        neuron_importance(model, [x], ["1"], n_steps=0)
    with pytest.raises(ValueError, match="empty"):
        neuron_importance(model, [], ["1"])
    with pytest.raises(ValueError, match="n_steps"):
        attributions(model, x, None, ["1"], n_steps=-2)
    assert not model.training
