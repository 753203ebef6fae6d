"""The exported graph of an architecture, and activation capture through it (immune to in-place ops).

:class:`TracedGraph` holds the ``torch.export`` program the groups were read from. For statistics it builds one
runner per member: the program's graph (unlifted to a GraphModule) called with that member's own parameters and
buffers (``torch.func.functional_call``: no copy of the weights), with a tap after every capture node. A tap
returns a *clone* of the value as it is when the node has run, so an in-place op that runs later
(``nn.ReLU(inplace=True)``, ``x.relu_()``, ``out += shortcut``) cannot change what was captured: ``point="pre"``
statistics really are pre-activation values.

The program is exported with static shapes; a batch of another shape (the last, smaller calibration batch) is
exported again for that shape (cached), and the capture nodes must exist in it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pyfusion.graph.groups import CapturePoint

__all__ = ["TracedGraph", "capture_view", "input_signature", "plain_chain"]

# Modules whose forward is a pure function of their input (no in-place op on it or on an earlier value): in a
# Sequential of these alone, every module's output is exactly the value of its node in the exported graph and
# nothing later overwrites it, so forward hooks on the member itself observe what the traced graph's taps would,
# without the taps' clones and the functional_call of the exported graph (12-19% slower than the module's own
# forward on an MLP-1024 pair, bench/e2e_activation_matching.py).
_PURE_MODULES = (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
    nn.Softplus, nn.Flatten, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)  # fmt: skip


def plain_chain(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` (nested ones allowed) of the pure modules above only: exact types
    (a subclass may override forward), none ``inplace``, no module used twice (a shared ReLU's hook would fire for
    two groups), no forward hooks or pre-hooks on any of them and no global ones (a hook may change an output)."""
    if type(model) is not nn.Sequential:
        return False
    from torch.nn.modules import module as _mod

    if _mod._global_forward_hooks or _mod._global_forward_pre_hooks:
        return False
    mods = list(model.modules())
    if len(mods) != len(list(model.named_modules(remove_duplicate=False))):
        return False
    for m in mods:
        if type(m) not in _PURE_MODULES or getattr(m, "inplace", False):
            return False
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


def input_signature(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Shapes / dtypes of tensor inputs (and values of the others): what a static export specializes on."""

    def sig(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), str(x.dtype), x.device.type)
        if isinstance(x, (tuple, list)):
            return (type(x).__name__, tuple(sig(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, sig(v)) for k, v in sorted(x.items())))
        return ("V", repr(x))

    return (sig(tuple(args)), sig(dict(kwargs)))


def capture_view(x: torch.Tensor, point: CapturePoint) -> torch.Tensor:
    """The neurons of a capture point as (samples, n): the segment ``[offset, offset + length)`` of dim
    ``point.dim``, split into the point's factors; the unit and inner factors become the neuron index
    (``unit * inner_size + inner``), rep factors (the pinned dims of a rotary q/k unit, the spatial positions of a
    channels-last flatten, grouped-query copies) and every other dim become samples. A point without a pattern is
    the whole dim, in order. The point's ``mean_dims`` (another group's neurons, not aligned samples) are averaged
    out first."""
    if point.mean_dims:
        x = x.mean(dim=point.mean_dims, keepdim=True)
    x = x.movedim(point.dim, -1)
    if point.pattern is None:
        return x.reshape(-1, x.shape[-1])
    kinds = [k for k, _ in point.pattern]
    sizes = [int(s) for _, s in point.pattern]
    x = x.narrow(-1, point.offset, math.prod(sizes))
    lead = x.dim() - 1
    x = x.reshape(*x.shape[:-1], *sizes)
    neuron = [lead + kinds.index("unit")] + ([lead + kinds.index("inner")] if "inner" in kinds else [])
    reps = [lead + i for i, k in enumerate(kinds) if k == "rep"]
    x = x.permute(*range(lead), *reps, *neuron)
    n = math.prod(x.shape[x.dim() - len(neuron) :])
    return x.reshape(-1, n)


class _Tap(nn.Module):
    """A capture point of one member: returns a clone of its input (what forward hooks on it observe), or of the
    :func:`capture_view` of a :class:`~pyfusion.graph.CapturePoint`."""

    def __init__(self, point: CapturePoint | None = None):
        super().__init__()
        self.point = point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        return x.clone() if self.point is None else capture_view(x, self.point).clone()


class _Switch(nn.Module):
    """The tap node in the shared graph: forwards to the taps of the member being run (one per capture of the
    node)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.active: list[list[nn.Module]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.active
        if taps is None:
            return x
        for tap in taps[self.index]:
            tap(x)
        return x


class TracedGraph:
    """An exported program of an architecture (see the module docstring).

    Attributes:
        program: the ``torch.export.ExportedProgram`` the groups were read from.
        signature: its input signature (:func:`input_signature`).
    """

    def __init__(self, program: Any, signature: tuple):
        self.program = program
        self.signature = signature
        self._programs: dict[tuple, Any] = {signature: program}
        self._tapped: dict[tuple, tuple[Any, list[_Switch], tuple[str, ...]]] = {}

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def node_names(self) -> list[str]:
        return [n.name for n in self.program.graph.nodes]

    def _program_for(self, model: nn.Module, args: tuple, kwargs: dict, sig: tuple) -> Any:
        if sig not in self._programs:
            from pyfusion.graph.export import export_program

            self._programs[sig] = export_program(model, args, kwargs)
        return self._programs[sig]

    def _module_for(self, model: nn.Module, args: tuple, kwargs: dict, nodes: tuple[str, ...]) -> tuple:
        sig = input_signature(args, kwargs)
        key = (sig, nodes)
        if key not in self._tapped:
            prog = self._program_for(model, args, kwargs, sig)
            # the tapped module depends only on the program and the nodes: share it between graphs of one
            # architecture (unlifting and recompiling costs ~50 ms; runs never leave taps active)
            shared = prog.__dict__.setdefault("_pyfusion_tapped", {})
            if nodes in shared:
                self._tapped[key] = shared[nodes]
                return shared[nodes]
            targets = {n.name: n.target for n in self.program.graph.nodes}
            gm = prog.module()
            by_name = {n.name: n for n in gm.graph.nodes}
            switches = []
            for i, name in enumerate(nodes):
                node = by_name.get(name)
                if node is None or node.target != targets.get(name):
                    raise ValueError(
                        f"cannot capture node {name!r}: the exported graph for inputs {sig} differs from the one the "
                        "groups were traced with; use calibration batches of one shape"
                    )
                sw = _Switch(i)
                gm.add_submodule(f"_pf_tap_{i}", sw)
                with gm.graph.inserting_after(node):
                    gm.graph.call_module(f"_pf_tap_{i}", (node,))
                switches.append(sw)
            gm.recompile()
            names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
            names |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
            self._tapped[key] = shared[nodes] = (gm, switches, tuple(sorted(names)))
        return self._tapped[key]

    def runners(
        self, members: Sequence[nn.Module], taps: Mapping[str, Sequence[str | CapturePoint]]
    ) -> tuple[list[nn.Module], dict[str, list[str]]]:
        """One runner per member (called like the member) and, per group, the module paths of its taps in the
        runners (for :func:`pyfusion.stats.collect_stats`).

        Args:
            members: the K members (their own weights are used; nothing is copied or modified).
            taps: group -> what to observe: node names of the exported graph (the tap gives the node's value), or
                :class:`~pyfusion.graph.CapturePoint` s (the tap gives its :func:`capture_view`, (samples, n)).
        """
        captures = tuple(dict.fromkeys(c for cs in taps.values() for c in cs))
        nodes = tuple(dict.fromkeys(c if isinstance(c, str) else c.node for c in captures))
        index = {c: i for i, c in enumerate(captures)}
        points = {g: [f"taps.{index[c]}" for c in cs] for g, cs in taps.items()}
        return [_Runner(self, m, nodes, captures) for m in members], points


class _Runner(nn.Module):
    """Runs one member's weights through the exported graph, with that member's taps active."""

    def __init__(
        self, traced: TracedGraph, member: nn.Module, nodes: tuple[str, ...], captures: tuple[str | CapturePoint, ...]
    ):
        super().__init__()
        self.taps = nn.ModuleList([_Tap(None if isinstance(c, str) else c) for c in captures])
        node_of = {n: i for i, n in enumerate(nodes)}
        by_node: list[list[nn.Module]] = [[] for _ in nodes]
        for tap, c in zip(self.taps, captures):
            by_node[node_of[c if isinstance(c, str) else c.node]].append(tap)
        object.__setattr__(self, "_traced", traced)
        object.__setattr__(self, "_member", member)
        object.__setattr__(self, "_nodes", nodes)
        object.__setattr__(self, "_by_node", by_node)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        member = self._member
        gm, switches, names = self._traced._module_for(member, args, kwargs, self._nodes)
        state = dict(member.named_parameters(remove_duplicate=False))
        state.update(dict(member.named_buffers(remove_duplicate=False)))
        state = {k: v for k, v in state.items() if k in names}
        for sw in switches:
            sw.active = self._by_node
        try:
            return torch.func.functional_call(gm, state, args, kwargs)
        finally:
            for sw in switches:
                sw.active = None
