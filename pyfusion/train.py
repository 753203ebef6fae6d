"""Minimal, deterministic training and evaluation helpers for members, fused models and ensembles.

These are the utilities the examples, tests and benchmarks share: train a member under a seed,
measure accuracy, collect logits and evaluate a (weighted) ensemble of members.

Classifiers return logits ``(N, C)`` for labels ``(N,)``; causal language models return logits
``(N, T, V)`` for next-token targets ``(N, T)`` (the loss and :func:`perplexity` average over all N * T
tokens). Models that return a Hugging Face ``ModelOutput`` or a tuple are read through :func:`as_logits`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["as_logits", "ensemble_accuracy", "evaluate", "lm_perplexity", "perplexity", "predict_logits", "train"]


def as_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a model's output: the tensor itself, a ``ModelOutput``'s ``.logits`` (Hugging Face
    ``...ForImageClassification`` / ``...ForCausalLM``), or the first element of a tuple / list.

    Raises:
        TypeError: none of these holds a tensor (the message names the output's type).
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"model output must be a logits tensor, an object with a .logits tensor or a tuple starting with one; "
        f"got {type(output).__name__}"
    )


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; ``(N, T, V)`` logits with ``(N, T)`` targets are flattened to N * T tokens."""
    if logits.dim() == 3 and targets.dim() == 2:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return nn.functional.cross_entropy(logits, targets)


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
    grad_clip: float | None = None,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
) -> list[float]:
    """Train ``model`` with cross-entropy, in place.

    Deterministic under ``seed`` on CPU: the torch RNG (dropout, initialisation done inside) is
    seeded here, and a shuffling loader must carry its own seeded generator (see
    :func:`pyfusion.data.make_loader`); that generator advances with every epoch, so build the loader
    afresh for a repeated run. The global RNG state is restored afterwards.

    Args:
        model: the network; it is moved to ``device`` (default: where its parameters are).
        loader: iterable of ``(x, y)`` batches, y int64 class labels ``(B,)`` or next-token targets ``(B, T)``
            for a model returning ``(B, T, V)`` logits (cross-entropy over all tokens).
        epochs: number of passes over ``loader`` (>= 0).
        lr: learning rate (> 0).
        optimizer: "adam", "adamw" (decoupled weight decay, Loshchilov & Hutter 2019) or "sgd" (with ``momentum``).
        seed: seed of the torch RNG during training.
        device: where to train.
        weight_decay: L2 penalty passed to the optimizer.
        momentum: SGD momentum.
        progress: print the mean loss of each epoch.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        lr_schedule: "constant", or "cosine": linear warm-up from 0 over ``warmup_steps`` steps, then
            ``lr * (1 + cos(pi * t / T)) / 2`` down to 0 at the last step (T = epochs * len(loader) - warmup; the
            loader must have a length).
        warmup_steps: warm-up steps of the cosine schedule (>= 0).

    Returns:
        The mean training loss of each epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd'; got {optimizer!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None; got {grad_clip}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {lr_schedule!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps}")
    total_steps = 0
    if lr_schedule == "cosine":
        if not hasattr(loader, "__len__"):
            raise ValueError("lr_schedule='cosine' needs a loader with a length (the number of batches per epoch)")
        total_steps = epochs * len(loader)  # type: ignore[arg-type]
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: list[float] = []
    step = 0

    def lr_at(t: int) -> float:
        if t < warmup_steps:
            return lr * (t + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(t - warmup_steps, span) / span))

    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                opt.zero_grad(set_to_none=True)
                loss = _cross_entropy(as_logits(model(x)), y)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                if lr_schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step)
                opt.step()
                step += 1
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
        ``(logits (N, C), labels (N,))`` on the CPU (language models: ``(N, T, V)`` and ``(N, T)``); the output
        is read through :func:`as_logits`.
    """
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    outs, labels = [], []
    try:
        for x, y in loader:
            outs.append(as_logits(model(x.to(dev))).detach().cpu())
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


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Perplexity ``exp(-(1/M) sum_t log softmax(z_t)[y_t])`` over all M target tokens, in float64.

    Args:
        logits: ``(N, T, V)`` or ``(M, V)``.
        targets: ``(N, T)`` or ``(M,)`` int64 token ids in ``[0, V)``.

    Raises:
        ValueError: shapes that do not match, or an empty input.
    """
    if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logits must be (..., V) with targets of shape logits.shape[:-1]; got logits {tuple(logits.shape)} and "
            f"targets {tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        raise ValueError("perplexity of an empty input is undefined (targets has 0 tokens)")
    logp = torch.log_softmax(logits.double().reshape(-1, logits.shape[-1]), dim=1)
    nll = -logp.gather(1, targets.reshape(-1, 1).long()).mean()
    return math.exp(float(nll))


def lm_perplexity(model: nn.Module, loader: Iterable) -> float:
    """Perplexity of a causal language model over ``loader`` of ``(input ids (B, T), next-token targets (B, T))``:
    every target token counts once (:func:`perplexity` of the concatenated logits)."""
    logits, targets = predict_logits(model, loader)
    return perplexity(logits, targets)
