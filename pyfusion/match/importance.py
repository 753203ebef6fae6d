"""Neuron importance scores for neuron-interpolation fusion (Luenam et al. 2025, papers.md B.2).

A score says how much a neuron (an output channel of a layer) contributes to the member's prediction of the true
class. Three methods, computed on calibration batches ``(x, y)`` (without labels the member's own prediction
``argmax f(x)`` is the target):

* ``"uniform"``: every neuron 1.
* ``"activation_gradient"``: ``|a_j(x) * dF_y/da_j(x)|`` with ``F_y`` the target-class logit (first-order Taylor
  attribution).
* ``"conductance"``: layer conductance (Dhamdhere et al. 2019, captum's ``LayerConductance``) along the straight
  path from the zero baseline, ``x(alpha) = alpha x``, with a right Riemann sum over ``n_steps`` intervals:

      cond_j(x) = sum_{m=1..n} dF_y/da_j(x(alpha_m)) * (a_j(x(alpha_m)) - a_j(x(alpha_{m-1}))),  alpha_m = m / n.

  By the chain rule ``sum_j cond_j(x) -> F_y(x) - F_y(0)`` as n grows (completeness, when F depends on x only
  through the layer). All layers are attributed in one pass: each batch runs once with its ``n_steps + 1``
  scaled copies, and the gradients of every hooked layer come from one backward.

Reduction and normalisation (documented choice): the per-sample attribution is made absolute, then averaged over
samples and spatial / token positions, giving one value per neuron; with ``normalize=True`` (default) the scores of
a layer are divided by their sum (they sum to 1 per layer and member, so members whose logits have different scales
weigh alike; the authors do this for uniform scores in KF only) and ``1e-8`` is added, as in the authors' code, so
that every score is strictly positive (k-means weights and interpolation ratios need s > 0).
The computation is ours (no captum needed); captum's LayerConductance uses Gauss-Legendre points by default, so
its numbers differ from the Riemann sum at small ``n_steps``.

Two front ends share one attribution core (:func:`attribute`, which takes any forward function returning the
logits and the observed values): :func:`neuron_importance` / :func:`attributions` observe module outputs through
forward hooks; neuron interpolation observes the values of its levels (any node of the exported graph, any layout)
through :mod:`pyfusion.fuse.interp.scores`. The prediction may be ``(N, C)`` logits with labels ``(N,)`` or
``(N, T, C)`` with ``(N, T)`` (a language model: the target logit of every position is summed). Conductance
interpolates the inputs from zero, so it needs floating-point inputs (not token ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IMPORTANCE_METHODS", "attribute", "attributions", "neuron_importance"]

IMPORTANCE_METHODS = ("uniform", "activation_gradient", "conductance")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _neurons_last(t: Tensor) -> Tensor:
    """(N, C) stays; (N, C, *spatial) -> (N, positions, C); (N, T, C) tokens -> (N, T, C)."""
    if t.ndim == 2:
        return t[:, None, :]
    if t.ndim == 3:
        return t
    return t.flatten(2).transpose(1, 2)


def _check_method(method: str, n_steps: int) -> None:
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {IMPORTANCE_METHODS}; got {method!r}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1; got {n_steps}")


def _hook_outputs(model: nn.Module, points: Sequence[str]) -> tuple[dict[str, Tensor], list[Any]]:
    """Forward hooks that store each point's latest output in the returned dict; remove the handles after use.

    Raises:
        ValueError: a point that is not a module path of ``model`` (nothing is registered then).
    """
    modules = dict(model.named_modules())
    for p in points:
        if p not in modules:
            raise ValueError(f"point {p!r} is not a module path of the model")
    captured: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor | None:
            # the model gets a copy: an in-place op after the point (nn.ReLU(inplace=True), ``out += shortcut``)
            # must not change the captured activation nor the tensor its gradient is taken at
            if torch.is_grad_enabled() and isinstance(out, Tensor) and out.is_floating_point():
                # a zero probe: d target / d probe = d target / d out, even when no parameter requires grad
                out = out + torch.zeros_like(out).requires_grad_(True)
                captured[name] = out
                return out.clone()
            captured[name] = out
            return out.clone() if isinstance(out, Tensor) else None

        return hook

    return captured, [modules[p].register_forward_hook(make_hook(p)) for p in points]


def neuron_importance(
    model: nn.Module,
    data: Iterable[Any],
    points: Sequence[str],
    *,
    method: str = "conductance",
    n_steps: int = 10,
    normalize: bool = True,
    max_batches: int | None = None,
    chunk_size: int = 64,
) -> dict[str, Tensor]:
    """Importance of every neuron at the outputs of the modules ``points`` of ``model``.

    Args:
        model: one member (put in eval mode for the computation; its mode is restored).
        data: calibration batches ``(x, y)`` (or bare ``x``: the target is then ``argmax model(x)``).
        points: module paths whose outputs are the neurons (e.g. a Conv2d / BatchNorm / Linear). The neurons are
            dim 1 of a (N, C) or (N, C, H, W) output and the last dim of a (N, T, C) output.
        method: "uniform", "activation_gradient" or "conductance".
        n_steps: Riemann intervals of the conductance path (>= 1).
        normalize: divide each layer's scores by their sum and add 1e-8 (see the module docstring).
        max_batches: use at most this many batches.
        chunk_size: samples per forward pass (conductance runs ``(n_steps + 1) * chunk_size`` rows at once).

    Returns:
        point -> (C,) float64 scores (> 0 when ``normalize``).

    Raises:
        ValueError: unknown method or point, bad ``n_steps``, empty data.
    """
    _check_method(method, n_steps)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    points = list(points)
    captured, handles = _hook_outputs(model, points)
    sums: dict[str, Tensor] = {}
    count = 0
    was_training = model.training
    model.eval()
    dev = next((q.device for q in model.parameters()), torch.device("cpu"))
    try:
        for b, batch in enumerate(data):
            if max_batches is not None and b >= max_batches:
                break
            xb, yb = _split_batch(batch)
            for s in range(0, xb.shape[0], chunk_size):
                x = xb[s : s + chunk_size].to(dev)
                y = None if yb is None else yb[s : s + chunk_size].to(dev)
                attrs = _attribute(model, x, y, points, captured, method, int(n_steps))
                for p, a in attrs.items():
                    v = _neurons_last(a.abs()).sum(0).mean(0).double()  # sum over samples, mean over positions
                    sums[p] = v if p not in sums else sums[p] + v
                count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("data is empty: the calibration data yielded no sample")
    out = {}
    for p in points:
        score = (sums[p] / count).cpu()
        if normalize:
            total = float(score.sum())
            score = (score / total if total > 0 else torch.full_like(score, 1.0 / score.numel())) + 1e-8
        out[p] = score
    return out


def attributions(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    points: Sequence[str],
    *,
    method: str = "conductance",
    n_steps: int = 10,
) -> dict[str, Tensor]:
    """Signed per-sample attributions of the neurons at ``points`` for one batch (see the module docstring).

    Args:
        model: the network (evaluated as it is: put it in eval mode first for BatchNorm / dropout).
        x: (N, ...) inputs.
        y: (N,) target classes, or None for ``argmax model(x)``.
        points: module paths.
        method: "uniform" (ones), "activation_gradient" or "conductance".
        n_steps: conductance Riemann intervals.

    Returns:
        point -> (N, C, ...) attributions, the shape of the module's output.
    """
    _check_method(method, n_steps)
    captured, handles = _hook_outputs(model, points)
    try:
        return _attribute(model, x, y, list(points), captured, method, int(n_steps))
    finally:
        for h in handles:
            h.remove()


def _target(logits: Tensor, y: Tensor) -> Tensor:
    """Sum of the target logits: (N, C) with (N,) labels, or (N, T, C) with (N, T)."""
    if logits.dim() < 2:
        raise ValueError(f"the model output must have a class dim; got shape {tuple(logits.shape)}")
    if tuple(y.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels of shape {tuple(y.shape)} do not fit logits of shape {tuple(logits.shape)}")
    return logits.gather(-1, y[..., None].long()).sum()


def _grads(target: Tensor, vals: Sequence[Any]) -> tuple[list[Tensor], list[Tensor | None]]:
    """The values (copies concatenated) and d target / d value (None where the target does not depend on it)."""
    flat = [t for v in vals for t in (v if isinstance(v, (list, tuple)) else [v])]
    gs = torch.autograd.grad(target, flat, allow_unused=True)
    out_v, out_g, i = [], [], 0
    for v in vals:
        parts = list(v) if isinstance(v, (list, tuple)) else [v]
        g = gs[i : i + len(parts)]
        i += len(parts)
        out_v.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        if all(x is None for x in g):
            out_g.append(None)
        else:
            out_g.append(torch.cat([torch.zeros_like(p) if x is None else x for p, x in zip(parts, g)]))
    return out_v, out_g


def attribute(
    forward: Callable[[Sequence[float]], tuple[Tensor, Sequence[Tensor]]],
    y: Tensor | None,
    *,
    method: str = "conductance",
    n_steps: int = 10,
) -> list[Tensor]:
    """Signed per-sample attributions of the values a forward pass observes (the core of both front ends).

    Args:
        forward: ``alphas -> (logits, values)``: runs the model on its inputs scaled by each alpha (the conductance
            path from the zero baseline; ``[1.0]`` is the plain forward), the copies stacked alpha-major along dim
            0, and returns the logits and the observed values, which must be part of the autograd graph when
            gradients are enabled (e.g. through a zero probe that requires grad). A value may also be given as a
            list of the graph tensors of consecutive copies (a forward that runs the copies one by one).
        y: target classes (the logits' shape without its last dim, for one copy), or None for ``argmax logits``.
        method: "uniform" (ones), "activation_gradient" or "conductance" (see the module docstring).
        n_steps: conductance Riemann intervals.

    Returns:
        One tensor per value, of its shape for one copy.
    """
    _check_method(method, n_steps)
    if method == "uniform":
        with torch.no_grad():
            _logits, vals = forward([1.0])
        return [torch.ones_like(torch.cat(list(v)) if isinstance(v, (list, tuple)) else v) for v in vals]
    if y is None:
        with torch.no_grad():
            y = forward([1.0])[0].argmax(-1)
    if method == "activation_gradient":
        with torch.enable_grad():
            logits, vals = forward([1.0])
            vals, grads = _grads(_target(logits, y), vals)
        return [(a * (g if g is not None else 0.0)).detach() for a, g in zip(vals, grads)]
    steps = int(n_steps)
    with torch.enable_grad():
        logits, vals = forward([m / steps for m in range(steps + 1)])
        yy = y.repeat(steps + 1, *([1] * (y.dim() - 1)))
        vals, grads = _grads(_target(logits, yy), vals)
    out = []
    for a, g in zip(vals, grads):
        a = a.detach().reshape(steps + 1, -1, *a.shape[1:])
        if g is None:
            out.append(torch.zeros_like(a[0]))
            continue
        g = g.reshape(steps + 1, -1, *g.shape[1:])
        out.append((g[1:] * (a[1:] - a[:-1])).sum(0))
    return out


def _attribute(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    points: list[str],
    captured: dict[str, Tensor],
    method: str,
    n_steps: int,
) -> dict[str, Tensor]:
    """Per-sample attributions (N, C, ...) of every module point for one chunk."""
    if method == "conductance" and not x.is_floating_point():
        raise ValueError("conductance interpolates the inputs from zero and needs floating-point inputs")

    def forward(alphas: Sequence[float]) -> tuple[Tensor, list[Tensor]]:
        captured.clear()
        if list(alphas) == [1.0]:
            xs = x
        else:
            a = torch.tensor(list(alphas), dtype=x.dtype, device=x.device)
            xs = (a.view(-1, *([1] * x.dim())) * x.unsqueeze(0)).reshape(-1, *x.shape[1:])
        logits = model(xs)
        return logits, [captured[p] for p in points]

    return dict(zip(points, attribute(forward, y, method=method, n_steps=n_steps)))
