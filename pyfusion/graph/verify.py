"""Self-verified groups (DESIGN §9, notes/IR.md §3): permuting a group must not change the function.

For every group (traced, walked or declared), a float64 copy of the model with slightly perturbed parameters
(so that symmetric initialisations such as LayerNorm weights of ones cannot hide a wrong reference) is permuted:
one random unit derangement per tie set (shared by its tied groups), a random inner derangement per unit where
the inner dims are free. The permutation goes through :func:`pyfusion.graph.transform.permuted_state`, the code
path of the builder. The outputs on the example batch (every tensor of the output structure, Hugging Face
``ModelOutput`` included) must agree to ``rtol`` (1e-9 relative to the output scale, float64; 1e-5 when the model
itself computes in float32, as Hugging Face RMSNorm and rotary tables do). All tie sets are
checked at once first; when that fails, each is checked alone so the error names the failing group, its
modules and the largest output difference, with a hint to ``declare_groups``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyfusion.graph.groups import FusionGraph, NeuronGroup
from pyfusion.graph.transform import permuted_state

__all__ = ["GroupVerificationError", "verify_groups", "random_group_permutations", "derangement"]


class GroupVerificationError(ValueError):
    """A neuron group whose random permutation changes the model's function (a tracing or declaration mistake).

    Attributes:
        groups: names of the failing groups.
        difference: largest absolute output difference.
        scale: largest absolute output value.
    """

    def __init__(self, message: str, groups: list[str], difference: float, scale: float):
        super().__init__(message)
        self.groups, self.difference, self.scale = groups, difference, scale


def derangement(n: int, gen: torch.Generator) -> Tensor:
    """A random permutation of ``range(n)`` without fixed points (the identity for n < 2): every neuron moves, so
    a group of two neurons cannot pass the check by drawing the identity."""
    if n < 2:
        return torch.arange(n)
    while True:
        p = torch.randperm(n, generator=gen)
        if not bool((p == torch.arange(n)).any()):
            return p


def random_group_permutations(
    graph: FusionGraph, gen: torch.Generator, groups: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Neuron-level permutations (slot -> neuron) of ``groups`` (default all): a unit derangement shared by each
    tie set, an inner derangement per unit for groups with ``unit_size > 1``."""
    wanted = set(graph.groups) if groups is None else set(groups)
    out: dict[str, Tensor] = {}
    for names in graph.tie_sets():
        names = [n for n in names if n in wanted]
        if not names:
            continue
        units = graph.groups[names[0]].units
        up = derangement(units, gen)
        for n in names:
            g = graph.groups[n]
            inner = torch.stack([derangement(g.unit_size, gen) for _ in range(g.units)]) if g.unit_size > 1 else None
            out[n] = g.neuron_permutation(up, inner)
    return out


def _cast(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v) for k, v in x.items()}
    return x


def _few_samples(args: tuple, kwargs: dict, n: int = 2) -> tuple[tuple, dict]:
    """The first ``n`` samples when every tensor input has the same leading (batch) size, else the inputs as
    given: a float64 forward of a whole calibration batch would only cost time (the check needs a few samples)."""
    leaves = [t for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor)]
    sizes = {t.shape[0] for t in leaves if t.dim() > 0}
    if len(sizes) != 1 or any(t.dim() == 0 for t in leaves) or next(iter(sizes)) <= n:
        return args, kwargs
    cut = {id(t): t[:n] for t in leaves}
    return tuple(cut.get(id(a), a) for a in args), {k: cut.get(id(v), v) for k, v in kwargs.items()}


def _tensors(y: Any) -> list[Tensor]:
    if isinstance(y, Tensor):
        return [y]
    if hasattr(y, "to_tuple") and callable(y.to_tuple):  # Hugging Face ModelOutput
        y = y.to_tuple()
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _tensors(v)]
    return []


def _perturbed_copy(model: nn.Module, gen: torch.Generator) -> nn.Module:
    ref = copy.deepcopy(model).double().eval()
    seen: set[int] = set()
    with torch.no_grad():
        for p in ref.parameters():  # once per tensor: tied parameters stay tied
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            scale = 0.1 * (float(p.abs().mean()) + 0.1)
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.mul_(
                    torch.exp(0.1 * torch.randn(m.running_var.shape, generator=gen, dtype=torch.float64))
                )
    return ref


def _load(model: nn.Module, state: dict[str, Tensor]) -> None:
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def _difference(y0: list[Tensor], y1: list[Tensor]) -> tuple[float, float]:
    diff, scale = 0.0, 0.0
    for a, b in zip(y0, y1):
        if a.shape != b.shape:
            return float("inf"), 1.0
        if not a.is_floating_point():
            diff = max(diff, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
        diff = max(diff, float((a - b).abs().max()) if a.numel() else 0.0)
    return diff, scale


# tolerance when the model computes in a lower precision internally: a few hundred ulps of that precision
# (float32: permuting a 64-wide RMSNorm moves outputs by ~1e-7 relative; a wrong group moves them by ~1e-1)
_LOW_RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class _LowPrecision(TorchDispatchMode):
    """Notes the lowest floating precision of any op output during a forward pass run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype: torch.dtype | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype in _LOW_RTOL:
                if self.dtype is None or _LOW_RTOL[t.dtype] > _LOW_RTOL[self.dtype]:
                    self.dtype = t.dtype
        return out


def _modules(g: NeuronGroup) -> list[str]:
    return list(dict.fromkeys(r.module for r in g.refs))


def verify_groups(
    model: nn.Module,
    graph: FusionGraph,
    *,
    example_inputs: Any = None,
    groups: Sequence[str] | None = None,
    rtol: float = 1e-9,
    seed: int = 0,
) -> None:
    """Check that permuting each group (with its tie set) leaves ``model``'s function unchanged.

    Args:
        model: a member (not modified; a float64 copy is permuted).
        graph: the groups to check.
        example_inputs: the batch (default ``graph.example_inputs``; see
            :func:`pyfusion.graph.inputs.normalize_inputs`).
        groups: check only these groups (default all).
        rtol: tolerance on the largest output difference, relative to the largest output value.
        seed: seed of the private random generator (the global random state is not touched).

    Raises:
        GroupVerificationError: naming the failing group(s), their modules and the output difference.
        ValueError: no example inputs.
    """
    from pyfusion.graph.inputs import normalize_inputs

    example = example_inputs if example_inputs is not None else graph.example_inputs
    if example is None:
        raise ValueError("verify_groups needs example_inputs (the graph has none recorded)")
    args, kwargs = _few_samples(*normalize_inputs(example))
    args, kwargs = _cast(args), _cast(kwargs)
    gen = torch.Generator().manual_seed(seed)
    ref = _perturbed_copy(model, gen)
    state = dict(ref.named_parameters(remove_duplicate=False))
    state.update(dict(ref.named_buffers(remove_duplicate=False)))
    state = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        y0 = _tensors(ref(*args, **kwargs))
    if not y0:
        raise ValueError(f"{type(model).__name__} returned no tensor on the example inputs: nothing to compare")
    names = list(graph.groups) if groups is None else list(groups)
    if not names:
        graph.verified = True
        return
    perms = random_group_permutations(graph, gen, names)
    work = copy.deepcopy(ref)

    def check(sub: dict[str, Tensor]) -> tuple[float, float]:
        _load(work, permuted_state(state, graph, sub))
        with torch.no_grad():
            y1 = _tensors(work(*args, **kwargs))
        return _difference(y0, y1)

    diff, scale = check(perms)
    if diff > rtol * max(scale, 1e-30):
        # does the model compute in float32 (or lower) itself (Hugging Face RMSNorm, rotary tables)? Then its own
        # rounding bounds how exactly a permutation can reproduce it (checked only now: the probe costs a forward)
        with torch.no_grad(), _LowPrecision() as low:
            ref(*args, **kwargs)
        if low.dtype is not None:
            rtol = max(rtol, _LOW_RTOL[low.dtype])
    if diff <= rtol * max(scale, 1e-30):
        if groups is None:
            graph.verified = True
        return
    failing: list[tuple[str, float]] = []
    for tie_set in graph.tie_sets():
        sub = {n: perms[n] for n in tie_set if n in perms}
        if not sub:
            continue
        d, _s = check(sub)
        if d > rtol * max(scale, 1e-30):
            failing.append((tie_set[0] if len(tie_set) == 1 else " + ".join(tie_set), d))
    if not failing:
        failing = [("(all groups together)", diff)]
    label, d = max(failing, key=lambda x: x[1])
    first = label.split(" + ")[0]
    mods = _modules(graph.groups[first]) if first in graph.groups else []
    more = f" ({len(failing) - 1} more failing)" if len(failing) > 1 else ""
    raise GroupVerificationError(
        f"neuron group {label!r} failed verification: permuting it changes the output of {type(model).__name__} by "
        f"{d:.3g} (largest output value {scale:.3g}); its modules: {mods}{more}. The tracer (or the declaration) "
        "got this group wrong: declare the groups with pyfusion.graph.declare_groups",
        [name for name, _ in failing],
        d,
        scale,
    )
