"""``SubEnsemble``: an executable ensemble of m networks (the "best m-of-K sub-ensemble" baseline, or an average of
fused sub-groups), whose cost is exactly the sum of its members' costs.

``y(x) = sum_i w_i f_i(x)`` (``combine="logits"``: the weighted mean of the members' outputs, the ensemble that
partial fusion reaches at alpha = 1), or ``y(x) = log sum_i w_i softmax(f_i(x))`` (``combine="probs"``: the
log of the mean probabilities; its argmax and cross-entropy are those of the probability ensemble). The weights
are renormalised lambdas of the chosen members; they are a buffer, so they are saved and loaded with the module.
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
            over the last dim).

    Shapes: ``forward(*args, **kwargs)`` calls every member with the same inputs; returns (N, ..., C).
    """

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float] | Tensor | None = None, combine: str = "logits"
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}; got {combine!r}")
        m = len(members)
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
        self.register_buffer("weights", w.float())

    @property
    def num_members(self) -> int:
        return int(self.weights.numel())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if len(self.members) != self.num_members:
            raise RuntimeError(f"SubEnsemble holds {len(self.members)} members for {self.num_members} weights")
        outs = [_logits(m(*args, **kwargs)) for m in self.members]
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

    def extra_repr(self) -> str:
        return f"weights={[round(float(v), 6) for v in self.weights]}, combine={self.combine!r}"

    # serialization (pyfusion.save / load): the members are saved children, the weights a buffer
    def get_config(self) -> dict[str, Any]:
        return {"num_members": self.num_members, "combine": self.combine}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SubEnsemble:
        n = int(config["num_members"])
        mod = cls([], combine=config["combine"])
        mod.register_buffer("weights", torch.full((n,), 1.0 / max(n, 1)))
        mod.members = nn.ModuleList()
        return mod
