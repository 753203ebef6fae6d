"""Argument checks shared by ``pyfusion.fuse`` and the methods (bad input raises and changes nothing)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_lambdas", "check_members", "check_reference", "prepare_data"]


class MemberMismatchError(ValueError):
    """Members that are not one architecture (or hold NaN / inf), with which member and what differs.

    Attributes:
        member: index of the offending member (compared with member 0).
        kind: "modules", "shapes" or "nonfinite".
        detail: the first differences, as printed in the message.
    """

    def __init__(self, message: str, member: int, kind: str, detail: Any):
        super().__init__(message)
        self.member, self.kind, self.detail = member, kind, detail


def check_members(models: Any, min_members: int = 2) -> list[nn.Module]:
    """K >= ``min_members`` modules of one architecture (same module types per path, same tensor names and
    shapes), finite.

    Raises:
        MemberMismatchError: (a ValueError) naming the member and the first difference.
        ValueError: fewer than ``min_members`` modules, or not modules.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ValueError(f"models must be a list of K >= {min_members} nn.Module members; got {type(models).__name__}")
    models = list(models)
    if len(models) < min_members:
        raise ValueError(f"models must hold K >= {min_members} members; got {len(models)}")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ValueError(f"models[{k}] must be an nn.Module; got {type(m).__name__}")
    ref_types = {p: type(m) for p, m in models[0].named_modules()}
    ref_shapes = {n: tuple(t.shape) for n, t in list(models[0].named_parameters()) + list(models[0].named_buffers())}
    for k, m in enumerate(models[1:], start=1):
        types = {p: type(x) for p, x in m.named_modules()}
        if types != ref_types:
            diff = sorted(set(types.items()) ^ set(ref_types.items()), key=str)[:3]
            raise MemberMismatchError(
                f"models[{k}] has a different architecture from models[0]: modules differ at {diff}", k, "modules", diff
            )
        shapes = {n: tuple(t.shape) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        if shapes != ref_shapes:
            bad = [(n, ref_shapes.get(n), shapes.get(n)) for n in sorted(set(shapes) | set(ref_shapes))
                   if shapes.get(n) != ref_shapes.get(n)][:3]  # fmt: skip
            raise MemberMismatchError(
                f"models[{k}] has mismatched tensor shapes (name, expected, actual): {bad}", k, "shapes", bad
            )
    for k, m in enumerate(models):
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            if torch.is_floating_point(t) and not all_finite(t):
                raise MemberMismatchError(f"models[{k}] tensor {n!r} contains NaN or inf values", k, "nonfinite", n)
    return models


def all_finite(t: Tensor) -> bool:
    """Whether a floating-point tensor has no NaN / inf, without a full-size boolean temporary.

    A finite sum proves every entry finite (one NaN makes the sum NaN, an inf makes it inf or NaN); only when
    the sum is not finite (a bad entry, or finite entries overflowing) is the exact elementwise test run. The
    sum reads the tensor once; ``isfinite(t).all()`` also writes a bool tensor of the same size (27 -> 8 ms on
    a VGG11 pair's parameters, 1 thread).
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_lambdas(lambdas: Any, k: int) -> tuple[float, ...]:
    """Member weights: default uniform; K non-negative finite values summing to 1 (tolerance 1e-6)."""
    if lambdas is None:
        return tuple([1.0 / k] * k)
    if isinstance(lambdas, torch.Tensor):
        lambdas = lambdas.tolist()
    try:
        lam = tuple(float(x) for x in lambdas)
    except TypeError as exc:
        raise ValueError(f"lambdas must be a sequence of {k} floats; got {lambdas!r}") from exc
    if len(lam) != k:
        raise ValueError(f"lambdas must have one weight per member ({k}); got {len(lam)}")
    if any(not math.isfinite(x) or x < 0 for x in lam):
        raise ValueError(f"lambdas must be finite and non-negative; got {lam}")
    if abs(sum(lam) - 1.0) > 1e-6:
        raise ValueError(f"lambdas must sum to 1; got sum {sum(lam)!r} for {lam}")
    return lam


def check_reference(reference: int, k: int) -> int:
    """The reference member's index (a method config checked it is an int >= 0), checked against K members.

    Raises:
        ValueError: ``reference`` not in [0, K).
    """
    if not 0 <= reference < k:
        raise ValueError(f"reference must be a member index in [0, {k}); got {reference!r}")
    return int(reference)


def prepare_data(data: Any) -> Any:
    """Calibration data as a re-iterable: a DataLoader / list stays, a one-shot iterator is materialised.

    Raises:
        ValueError: when the data yields no batch.
    """
    if data is None:
        return None
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be a DataLoader or an iterable of batches; got {type(data).__name__}")
    if iter(data) is data:  # generator / iterator: can be traversed once only
        data = list(data)
    it = iter(data)
    try:
        next(it)
    except StopIteration:
        raise ValueError("data is empty: the calibration data yielded no batch") from None
    return data
