"""Minimal, deterministic training and evaluation helpers for members, fused models and ensembles.

These are the utilities the examples, tests and benchmarks share: train a member under a seed,
measure accuracy, collect logits and evaluate a (weighted) ensemble of members.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ensemble_accuracy", "evaluate", "predict_logits", "train"]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    seed: int = 0,
    device: str | torch.device | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` with cross-entropy, in place.

    Deterministic under ``seed`` on CPU: the torch RNG (dropout, initialisation done inside) is
    seeded here, and a shuffling loader must carry its own seeded generator (see
    :func:`pyfusion.data.make_loader`); that generator advances with every epoch, so build the loader
    afresh for a repeated run. The global RNG state is restored afterwards.

    Args:
        model: the network; it is moved to ``device`` (default: where its parameters are).
        loader: iterable of ``(x, y)`` batches, y int64 class labels.
        epochs: number of passes over ``loader`` (>= 0).
        lr: learning rate (> 0).
        optimizer: "adam" or "sgd" (with ``momentum``).
        seed: seed of the torch RNG during training.
        device: where to train.
        weight_decay: L2 penalty passed to the optimizer.
        momentum: SGD momentum.
        progress: print the mean loss of each epoch.

    Returns:
        The mean training loss of each epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history: list[float] = []
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * y.shape[0]
                count += y.shape[0]
            history.append(total / max(count, 1))
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` over ``loader`` (eval mode, on the model's device).

    Returns:
        ``(logits (N, C), labels (N,))`` on the CPU.
    """
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    outs, labels = [], []
    try:
        for x, y in loader:
            outs.append(model(x.to(dev)).detach().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("loader yielded no batches")
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in [0, 1]."""
    logits, labels = predict_logits(model, loader)
    return float((logits.argmax(1) == labels).double().mean())


def ensemble_accuracy(
    models: Sequence[nn.Module],
    loader: Iterable,
    weights: Sequence[float] | torch.Tensor | None = None,
    per_class_weights: torch.Tensor | None = None,
    combine: str = "logits",
) -> float:
    """Accuracy of the weighted ensemble ``sum_k lambda_k f_k(x)``.

    Args:
        models: the K members.
        loader: evaluation batches (iterated once per member, so it must be re-iterable).
        weights: lambda (K,), default uniform 1/K.
        per_class_weights: (K, C) weights per member and class (e.g. each member's share of each class,
            from :func:`pyfusion.data.class_shares`); the output of class c is
            ``sum_k w[k, c] f_k(x)[c]``. Multiplies with ``weights`` when both are given.
        combine: "logits" (sum of logits, the alpha = 1 limit of partial fusion) or "probs" (sum of
            softmax probabilities).
    """
    if len(models) == 0:
        raise ValueError("models must hold at least one member")
    if combine not in ("logits", "probs"):
        raise ValueError(f"combine must be 'logits' or 'probs'; got {combine!r}")
    k = len(models)
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    if lam.shape != (k,):
        raise ValueError(f"weights must have shape ({k},); got {tuple(lam.shape)}")
    total: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    for i, model in enumerate(models):
        logits, y = predict_logits(model, loader)
        out = logits.double() if combine == "logits" else torch.softmax(logits.double(), dim=1)
        if per_class_weights is not None:
            pcw = torch.as_tensor(per_class_weights).double()
            if pcw.shape != (k, out.shape[1]):
                raise ValueError(f"per_class_weights must have shape ({k}, {out.shape[1]}); got {tuple(pcw.shape)}")
            out = out * pcw[i]
        out = lam[i] * out
        if labels is not None and not torch.equal(labels, y):
            raise ValueError("loader must yield the same samples in the same order for every member")
        labels = y
        total = out if total is None else total + out
    assert total is not None and labels is not None
    return float((total.argmax(1) == labels).double().mean())
