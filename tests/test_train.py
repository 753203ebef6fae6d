"""Training and evaluation helpers on scikit-learn's digits (offline, seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyfusion import data
from pyfusion.train import ensemble_accuracy, evaluate, predict_logits, train


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(autouse=True)
def _one_thread():
    # A 64-32-10 MLP gains nothing from intra-op threads, and on a loaded 2-core machine they cost 10x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    xtr, ytr = data.load_digits("train")
    xte, yte = data.load_digits("test")
    return xtr, ytr, xte, yte


def test_tiny_mlp_learns_digits_deterministically(digits):
    xtr, ytr, xte, yte = digits
    test_loader = data.make_loader(xte, yte, 256)
    accs, states = [], []
    for _ in range(2):
        model = _mlp(0)
        hist = train(model, data.make_loader(xtr, ytr, 64, shuffle=True, seed=1), epochs=8, lr=1e-2, seed=3)
        assert hist[-1] < hist[0]
        accs.append(evaluate(model, test_loader))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert accs[0] > 0.85
    assert accs[0] == accs[1]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


def test_sgd_and_ensemble(digits):
    xtr, ytr, xte, yte = digits
    test_loader = data.make_loader(xte, yte, 256)
    models = []
    for s in range(2):
        m = _mlp(s)
        train(m, data.make_loader(xtr, ytr, 64, shuffle=True, seed=s), epochs=8, lr=0.1, optimizer="sgd", seed=s)
        models.append(m)
    single = [evaluate(m, test_loader) for m in models]
    assert min(single) > 0.85
    # The ensemble with one-hot weights is exactly that member.
    assert ensemble_accuracy(models, test_loader, weights=[1.0, 0.0]) == single[0]
    assert ensemble_accuracy(models, test_loader, weights=[0.0, 1.0], combine="probs") == single[1]
    # Uniform ensemble against a direct computation from the logits.
    la, y = predict_logits(models[0], test_loader)
    lb, _ = predict_logits(models[1], test_loader)
    direct = float(((la.double() + lb.double()).argmax(1) == y).double().mean())
    assert ensemble_accuracy(models, test_loader) == direct
    # Per-class weights that zero member 1 on every class give member 0 alone.
    pcw = torch.ones(2, 10, dtype=torch.float64)
    pcw[1] = 0.0
    assert ensemble_accuracy(models, test_loader, per_class_weights=pcw) == single[0]


def test_errors(digits):
    xtr, ytr, _, _ = digits
    loader = data.make_loader(xtr[:10], ytr[:10], 5)
    m = _mlp(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer must be"):
        train(m, loader, epochs=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be"):
        train(m, loader, epochs=1, lr=0.0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="weights must have shape"):
        ensemble_accuracy([m, m], loader, weights=[1.0])
    with pytest.raises(ValueError, match="combine must be"):
        ensemble_accuracy([m], loader, combine="vote")
    with pytest.raises(ValueError, match="per_class_weights must have shape"):
        ensemble_accuracy([m], loader, per_class_weights=torch.ones(2, 10))
