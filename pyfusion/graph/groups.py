"""Neuron groups (DESIGN §2): the sets of weight axes that are indexed by the same neurons.

A :class:`NeuronGroup` lists every ``(module path, parameter name, axis)`` its neurons index:

* producers: output rows of a Linear / Conv2d weight (axis 0) and its bias;
* per-neuron parameters: BatchNorm weight / bias / running stats, LayerNorm weight / bias (axis 0);
* consumers: input columns of the layers that read the group (axis 1). After a flatten, each neuron of a
  convolutional group covers ``expand = H * W`` consecutive input columns of the next Linear (channel-major,
  as ``torch.flatten`` orders them), so the input map is ``B kron I_hw``.

Network inputs and outputs are not groups: the first layer reads raw inputs (B_k = I) and the last layer's
outputs are the logits (A_k = lambda_k I). A residual stream is a single group spanning several blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["AxisRef", "NeuronGroup", "FusionGraph", "declare_groups"]

ROLES = ("producer", "neuron", "consumer")


@dataclass(frozen=True)
class AxisRef:
    """One axis of one parameter (or buffer) indexed by a group's neurons.

    Attributes:
        module: module path (as in ``named_modules``), "" for the root.
        param: parameter or buffer name on that module ("weight", "bias", "running_mean", ...).
        axis: the tensor axis (0: output rows / per-neuron, 1: input columns).
        role: "producer", "neuron" (per-neuron parameter) or "consumer".
        expand: number of consecutive indices per neuron along ``axis`` (flatten into Linear: H*W).
    """

    module: str
    param: str
    axis: int
    role: str
    expand: int = 1

    @property
    def key(self) -> str:
        """The state-dict key of the tensor, ``module.param``."""
        return f"{self.module}.{self.param}" if self.module else self.param


@dataclass
class NeuronGroup:
    """A neuron group: its size and every axis it indexes, plus where its activations can be observed.

    Attributes:
        name: group name (unique in the graph).
        size: number of neurons n (per member).
        refs: all axis references (producers, per-neuron params, consumers).
        pre_points: module paths whose outputs are the pre-activation values of the group (the producer, or the
            BatchNorm / LayerNorm after it). Empty when those values are only produced by functions (e.g. the
            output of ``a + b`` in a residual stream).
        post_points: module paths whose outputs are the post-activation values (the activation module).
        activation: name of the elementwise activation applied after the group ("relu", "gelu", ...; a functional
            call is recorded as "functional:relu"), or None.
        pre_nodes / post_nodes: torch.fx node names of the same points (always set when the graph was traced;
            used to tap values that no module outputs, such as ``F.relu(out + shortcut)``).
    """

    name: str
    size: int
    refs: list[AxisRef] = field(default_factory=list)
    pre_points: list[str] = field(default_factory=list)
    post_points: list[str] = field(default_factory=list)
    activation: str | None = None
    pre_nodes: list[str] = field(default_factory=list)
    post_nodes: list[str] = field(default_factory=list)

    @property
    def producers(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "producer"]

    @property
    def per_neuron(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "neuron"]

    @property
    def consumers(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "consumer"]


@dataclass
class FusionGraph:
    """The neuron groups of one architecture.

    Attributes:
        groups: name -> group, in the order the forward pass creates them.
        traced: the torch.fx GraphModule of the architecture, or None (module walk or hand-declared groups).
    """

    groups: dict[str, NeuronGroup]
    traced: object | None = None

    def refs_by_key(self) -> dict[str, list[tuple[str, AxisRef]]]:
        """state-dict key -> list of (group name, axis ref) touching that tensor."""
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for g in self.groups.values():
            for r in g.refs:
                out.setdefault(r.key, []).append((g.name, r))
        return out

    def validate(self, model: nn.Module) -> None:
        """Check that every reference exists in ``model`` with the right size, and no axis is claimed twice.

        Raises:
            ValueError: naming the group, the reference and the expected vs actual size.
        """
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        seen: dict[tuple[str, int], str] = {}
        for g in self.groups.values():
            if g.size <= 0:
                raise ValueError(f"group {g.name!r}: size must be positive; got {g.size}")
            for r in g.refs:
                if r.role not in ROLES:
                    raise ValueError(f"group {g.name!r}: role of {r.key} must be one of {ROLES}; got {r.role!r}")
                t = tensors.get(r.key)
                if t is None:
                    raise ValueError(f"group {g.name!r} references {r.key!r}, which the model does not have")
                if r.axis >= t.ndim:
                    raise ValueError(f"group {g.name!r}: {r.key} has {t.ndim} axes; axis {r.axis} does not exist")
                if t.shape[r.axis] != g.size * r.expand:
                    raise ValueError(
                        f"group {g.name!r}: {r.key} axis {r.axis} has size {t.shape[r.axis]}, expected "
                        f"size * expand = {g.size} * {r.expand}"
                    )
                if (r.key, r.axis) in seen:
                    raise ValueError(
                        f"{r.key} axis {r.axis} is claimed by groups {seen[(r.key, r.axis)]!r} and {g.name!r}"
                    )
                seen[(r.key, r.axis)] = g.name

    def __repr__(self) -> str:
        lines = [f"FusionGraph({len(self.groups)} groups)"]
        for g in self.groups.values():
            lines.append(
                f"  {g.name}: n={g.size} producers={[r.key for r in g.producers]} "
                f"per_neuron={sorted({r.module for r in g.per_neuron})} consumers={[r.key for r in g.consumers]}"
            )
        return "\n".join(lines)


def _parse_ref(item: AxisRef | Sequence | str, role: str) -> AxisRef:
    if isinstance(item, AxisRef):
        return item
    if isinstance(item, str):
        module, _, param = item.rpartition(".")
        return AxisRef(module, param, 1 if role == "consumer" else 0, role)
    item = tuple(item)
    if len(item) not in (2, 3):
        raise ValueError(f"a {role} reference must be 'module.param', (key, axis) or (key, axis, expand); got {item}")
    module, _, param = str(item[0]).rpartition(".")
    expand = int(item[2]) if len(item) == 3 else 1
    return AxisRef(module, param, int(item[1]), role, expand)


def declare_groups(model: nn.Module, groups: Mapping[str, Mapping[str, Iterable]]) -> FusionGraph:
    """Declare neuron groups by hand, for models the tracer does not support.

    Args:
        model: a member (used to check sizes).
        groups: name -> {"producers": [...], "neurons": [...], "consumers": [...], "pre_points": [...],
            "post_points": [...]}. A reference is "module.param" (axis 0 for producers / neurons, 1 for consumers),
            ("module.param", axis) or ("module.param", axis, expand).

    Returns:
        A validated :class:`FusionGraph`.

    Example::

        g = declare_groups(net, {"h": {"producers": ["fc1.weight", "fc1.bias"], "consumers": ["fc2.weight"]}})
    """
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    out: dict[str, NeuronGroup] = {}
    for name, spec in groups.items():
        unknown = set(spec) - {"producers", "neurons", "consumers", "pre_points", "post_points", "activation"}
        if unknown:
            raise ValueError(f"group {name!r}: unknown keys {sorted(unknown)}")
        refs = [_parse_ref(x, "producer") for x in spec.get("producers", [])]
        refs += [_parse_ref(x, "neuron") for x in spec.get("neurons", [])]
        refs += [_parse_ref(x, "consumer") for x in spec.get("consumers", [])]
        if not any(r.role == "producer" for r in refs):
            raise ValueError(f"group {name!r} needs at least one producer reference")
        first = refs[0]
        if first.key not in tensors:
            raise ValueError(f"group {name!r} references {first.key!r}, which the model does not have")
        size = tensors[first.key].shape[first.axis] // first.expand
        out[name] = NeuronGroup(
            name,
            int(size),
            refs,
            pre_points=list(spec.get("pre_points", [])),
            post_points=list(spec.get("post_points", [])),
            activation=spec.get("activation"),
        )
    graph = FusionGraph(out, None)
    graph.validate(model)
    return graph
