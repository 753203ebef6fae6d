"""``SubEnsemble``: an executable ensemble of m networks (the "best m-of-K sub-ensemble" baseline, or an average of
fused sub-groups), whose cost is exactly the sum of its members' costs.

``y(x) = sum_i w_i f_i(x)`` (``combine="logits"``: the weighted mean of the members' outputs, the ensemble that
partial fusion reaches at alpha = 1), or ``y(x) = log sum_i w_i softmax(f_i(x))`` (``combine="probs"``: the
log of the mean probabilities; its argmax and cross-entropy are those of the probability ensemble). The weights
are renormalised lambdas of the chosen members; they are a buffer, so they are saved and loaded with the module.

**Class-weighted** (``class_weights=W``, shape (m, C), every column non-negative and summing to 1):
``y(x)[c] = log sum_k W[k, c] softmax(f_k(x))[c]``. Each member's vote for class c is weighted by how much it is
trusted on class c (e.g. its share of the class in the training data: the "class-share ensemble" of non-IID
splits, or weights fitted on calibration data, :func:`pyfusion.fuse.subsets.fit_class_weights`). The weighting is
on the probabilities, not on the logits, because a member's logits are only defined up to an additive constant per
sample (``softmax(z + a) = softmax(z)``): ``sum_k W[k, c] (z_k[c] + a_k)`` adds ``sum_k W[k, c] a_k``, which
depends on c unless W is constant along c, so per-class weights on logits would change the prediction with an
arbitrary shift of one member's logits; the probability mixture does not. ``W[:, c] = w`` for every c is the
plain ``combine="probs"`` ensemble; a one-hot ``W[j, :] = 1`` returns member j's log-probabilities. The output is
not normalised over c (softmax / argmax / cross-entropy of it are what a classifier reads). The cost is that of
the m members: the weighting is m x C multiplies per sample, negligible next to any member (and not counted by
``pyfusion.cost``, which counts Linear / Conv layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COMBINES", "SubEnsemble"]

COMBINES = ("logits", "probs")


def _logits(out: Any) -> Tensor:
    """A member's output tensor: the tensor itself or the ``logits`` of a Hugging Face model output."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"SubEnsemble averages tensor outputs (or outputs with .logits); a member returned {type(out)}")


class SubEnsemble(nn.Module):
    """The weighted ensemble of ``members`` (see the module docstring).

    Args:
        members: m >= 1 networks with outputs of one shape (N, ..., C).
        weights: m non-negative weights summing to 1 (default uniform).
        combine: "logits" (weighted mean of the outputs) or "probs" (log of the weighted mean of the softmaxes
            over the last dim); default "logits", and "probs" (the only one allowed) with ``class_weights``.
        class_weights: (m, C) per-class member weights, non-negative, each column summing to 1 (module
            docstring); exclusive with ``weights`` (``weights`` then holds the row means, for information).

    Shapes: ``forward(*args, **kwargs)`` calls every member with the same inputs; returns (N, ..., C).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | Tensor | None = None,
        combine: str | None = None,
        class_weights: Tensor | Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if combine is None:
            combine = "logits" if class_weights is None else "probs"
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}; got {combine!r}")
        m = len(members)
        cw = None
        if class_weights is not None:
            if weights is not None:
                raise ValueError("give weights (m,) or class_weights (m, C), not both")
            if combine != "probs":
                raise ValueError(
                    f"class_weights weight the members' probabilities (combine='probs'); got combine={combine!r}"
                )
            cw = _check_class_weights(class_weights, m)
            weights = cw.mean(1) / cw.mean(1).sum()
        if weights is None:
            w = torch.full((m,), 1.0 / max(m, 1), dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
            if w.numel() != m:
                raise ValueError(f"weights must have one value per member ({m}); got {w.numel()}")
            bad = not bool(torch.isfinite(w).all()) or bool((w < 0).any())
            if m and (bad or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9)):
                raise ValueError(f"weights must be finite, non-negative and sum to 1; got {w.tolist()}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        # float64: weights such as 1/3 rounded to float32 put a float64 ensemble 3e-8 off its exact value
        self.register_buffer("weights", w)
        self.register_buffer("class_weights", cw)

    @property
    def num_members(self) -> int:
        return int(self.weights.numel())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if len(self.members) != self.num_members:
            raise RuntimeError(f"SubEnsemble holds {len(self.members)} members for {self.num_members} weights")
        outs = [_logits(m(*args, **kwargs)) for m in self.members]
        if self.class_weights is not None:
            c = int(self.class_weights.shape[1])
            if outs[0].shape[-1] != c:
                raise ValueError(
                    f"class_weights has {c} classes (shape {tuple(self.class_weights.shape)}); the members output "
                    f"{outs[0].shape[-1]} in the last dim (shape {tuple(outs[0].shape)})"
                )
            logp = torch.stack([torch.log_softmax(o, dim=-1) for o in outs])  # (m, N, ..., C)
            logw = torch.log(self.class_weights.to(logp.dtype)).reshape(-1, *([1] * (logp.dim() - 2)), c)
            return torch.logsumexp(logp + logw, dim=0)
        w = self.weights.to(outs[0].dtype)
        if self.combine == "logits":
            y = w[0] * outs[0]
            for wi, o in zip(w[1:], outs[1:]):
                y = y + wi * o
            return y
        # log sum_i w_i softmax(z_i) = logsumexp_i (log w_i + log_softmax(z_i)); w_i = 0 gives -inf terms (ignored)
        logp = torch.stack([torch.log_softmax(o, dim=-1) for o in outs])
        logw = torch.log(w).reshape(-1, *([1] * (logp.dim() - 1)))
        return torch.logsumexp(logp + logw, dim=0)

    @property
    def num_classes(self) -> int | None:
        """C of the class weights (None for a plain sub-ensemble)."""
        return None if self.class_weights is None else int(self.class_weights.shape[1])

    def extra_repr(self) -> str:
        text = f"weights={[round(float(v), 6) for v in self.weights]}, combine={self.combine!r}"
        return text if self.class_weights is None else text + f", class_weights={tuple(self.class_weights.shape)}"

    # serialization (pyfusion.save / load): the members are saved children, the (class) weights buffers
    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"num_members": self.num_members, "combine": self.combine}
        if self.class_weights is not None:
            cfg["num_classes"] = self.num_classes
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SubEnsemble:
        n = int(config["num_members"])
        mod = cls([], combine=config["combine"])
        f64 = torch.float64
        mod.register_buffer("weights", torch.full((n,), 1.0 / max(n, 1), dtype=f64))
        c = config.get("num_classes")
        mod.register_buffer("class_weights", None if c is None else torch.full((n, int(c)), 1.0 / max(n, 1), dtype=f64))
        mod.members = nn.ModuleList()
        return mod


def _check_class_weights(class_weights: Any, m: int) -> Tensor:
    """(m, C) float64 copy of ``class_weights``, checked: finite, >= 0, every column summing to 1."""
    try:
        w = torch.as_tensor(class_weights, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"class_weights must be an (m, C) array of numbers; got {type(class_weights).__name__}"
        ) from exc
    if w.dim() != 2 or w.shape[0] != m or w.shape[1] < 1:
        raise ValueError(
            f"class_weights must have shape (m, C) = ({m}, C >= 1), one row per member; got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("class_weights must be finite and non-negative")
    sums = w.sum(0)
    if not bool(torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-6)):
        bad = int(torch.argmax((sums - 1).abs()))
        raise ValueError(
            f"class_weights: every column (class) must sum to 1 over the members; column {bad} sums to "
            f"{float(sums[bad]):.6g}"
        )
    return w
