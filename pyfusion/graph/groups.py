"""Neuron groups (DESIGN §2): the sets of weight axes that are indexed by the same neurons.

A :class:`NeuronGroup` lists every ``(module path, parameter name, axis)`` its neurons index:

* producers: output rows of a Linear / Conv2d weight (axis 0) and its bias (an Embedding's axis 1, GPT-2's
  ``Conv1D`` axis 1, ...);
* per-neuron parameters ("neuron"): BatchNorm weight / bias / running stats, LayerNorm / RMSNorm weight, a
  layer-scale gamma, learned position embeddings, a CLS token;
* consumers: input columns of the layers that read the group (axis 1 of a Linear / Conv2d).

The index layout of one reference is described by three fields (the IR of issue 12 / notes/IR.md §1):

* ``offset``: where the segment starts on the axis. One axis can hold several segments (a Linear reading
  ``torch.cat([a, b], -1)``, GPT-2's packed ``c_attn`` writing q | k | v) and untouched gaps (columns that read
  the raw input). No index of an axis is claimed twice.
* ``pattern``: the segment as row-major factors ``("unit", U)``, ``("inner", D)``, ``("rep", R)``. The group's
  neuron index is ``unit * D + inner``; rep factors are copies that take the same map entry. ``None`` is the
  legacy layout ``[("unit", units), ("inner", unit_size), ("rep", expand)]`` covering the whole axis: a flatten
  of H*W positions into a Linear is ``expand = H * W``, i.e. ``[("unit", C), ("rep", HW)]``. Heads: q rows
  ``[unit H, inner dh]``; o_proj columns under grouped-query attention ``[unit H_kv, rep n_rep, inner dh]``;
  q rows of a rotary q/k group (inner dims pinned) ``[unit H_kv, rep n_rep * dh]``.
* ``expand``: the legacy rep count (kept with its old meaning: consecutive copies per neuron).

A group with ``unit_size > 1`` (attention heads) has ``size = units * unit_size``. Methods match whole units
and, inside matched units, the inner neurons; a neuron-level map of such a group is block structured: block
(slot unit s, member unit u) is ``coef * P_{s,u}`` with ``P`` a permutation of the inner dims. Groups with the
same ``tie`` must get the same unit-level map (the q/k group and the v/o group of one attention layer).

Network inputs and outputs are not groups: the first layer reads raw inputs (B_k = I) and the last layer's
outputs are the logits (A_k = lambda_k I). A residual stream is a single group spanning several blocks; its
LayerNorms / RMSNorms are its ``normalizers`` (modules that read all its neurons at once).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AxisRef",
    "CapturePoint",
    "FusionGraph",
    "NeuronGroup",
    "Normalizer",
    "PinnedNeurons",
    "SharedParameter",
    "declare_groups",
]

ROLES = ("producer", "neuron", "consumer")
FACTOR_KINDS = ("unit", "inner", "rep")
Factor = tuple[str, int]


@dataclass(frozen=True)
class AxisRef:
    """One segment of one axis of one parameter (or buffer) indexed by a group's neurons.

    Attributes:
        module: module path (as in ``named_modules``), "" for the root.
        param: parameter or buffer name on that module ("weight", "bias", "running_mean", ...).
        axis: the tensor axis (0: output rows / per-neuron, 1: input columns).
        role: "producer", "neuron" (per-neuron parameter) or "consumer".
        expand: number of consecutive indices per neuron along ``axis`` (flatten into Linear: H*W); legacy
            layout only (``pattern is None``).
        offset: first index of the segment on the axis (0 for the legacy layout).
        pattern: the segment's row-major factors (see the module docstring), or None for the legacy layout
            ``[unit, inner, rep expand]`` covering the whole axis.
    """

    module: str
    param: str
    axis: int
    role: str
    expand: int = 1
    offset: int = 0
    pattern: tuple[Factor, ...] | None = None

    @property
    def key(self) -> str:
        """The state-dict key of the tensor, ``module.param``."""
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def is_simple(self) -> bool:
        """The legacy layout: the whole axis, ``[unit, rep expand]`` (what methods written for MLP / VGG / ResNet
        groups understand)."""
        return self.offset == 0 and self.pattern is None

    def factors(self, group: NeuronGroup) -> tuple[Factor, ...]:
        """The explicit row-major factors of this segment for ``group``."""
        if self.pattern is not None:
            return self.pattern
        out: list[Factor] = [("unit", group.units)]
        if group.unit_size > 1:
            out.append(("inner", group.unit_size))
        if self.expand > 1:
            out.append(("rep", self.expand))
        return tuple(out)

    def length(self, group: NeuronGroup) -> int:
        """Number of axis indices the segment covers."""
        return math.prod(s for _, s in self.factors(group))


@dataclass(frozen=True)
class Normalizer:
    """A module (or function) that reads all neurons of a group at once (LayerNorm, RMSNorm, a softmax or a mean
    over the feature axis). Under widening it is not a per-neuron operation (see pyfusion.nn.norm).

    Attributes:
        module: module path of the normalization ("" for functional code in the root module).
        kind: the module class name when ``wrappable`` ("LayerNorm", "LlamaRMSNorm"), else the op ("softmax").
        wrappable: the module is exactly the normalization (one input, one output, the group on the same axis of
            both), so the builder may replace it by a member-view module; False for functional code inside a
            bigger module (the group may then be permuted but never widened).
        node: the graph node that reduces over the group (None for declared groups).
        dim: the (negative) axis of the module's input and output that holds the group when ``wrappable``: -1
            for channels-last features, -3 for a channels-first normalizer of ``(N, C, H, W)`` maps.
        copies: how many times that axis holds the group in a row (1; 4 for Swin's patch merging, which
            normalizes the concatenation of four neighbours' features).
    """

    module: str
    kind: str
    wrappable: bool
    node: str | None = None
    dim: int = -1
    copies: int = 1

    def describe(self) -> str:
        """What normalizes the group, for error messages."""
        return (
            f"is normalized by {self.kind} in module {self.module!r} (node {self.node!r}), functional code inside "
            "that module"
        )


@dataclass(frozen=True)
class SharedParameter:
    """A parameter combined with a group's neurons but the same for all of its units (broadcast over the unit
    axis): a scalar scale, Phi's ``q_layernorm`` over the head dim applied to every head, a learned temperature
    shared by all heads. Any permutation of the units keeps the function, but a widened group cannot give each
    member's branch units their own member's value (there is one tensor): at alpha = 1 the members' values would
    be averaged, so the group may be permuted or merged, never widened.

    Attributes:
        param: the parameter's name (as in ``named_parameters``).
        where: the op that broadcasts it (node, op, module path and type).
    """

    param: str
    where: str

    def describe(self) -> str:
        return f"parameter {self.param!r} is shared by all its units at {self.where}"


@dataclass(frozen=True)
class CapturePoint:
    """A value of the traced graph where a group's neurons can be observed.

    Attributes:
        node: node name in the exported ATen graph (``FusionGraph.traced``).
        kind: "pre" (pre-activation: producer, per-neuron op or residual sum), "post" (after the activation) or
            "input" (the tensor a consumer reads).
        dim: the tensor dim holding the group (negative, counted from the end).
        offset: first index of the group's segment on that dim.
        pattern: the segment's factors (as :attr:`AxisRef.pattern`), or None when the dim holds exactly the
            group's neurons in order.
        module: path of the module whose output this value is (observable with a forward hook), or None.
        mean_dims: other dims of the value (negative) that hold another group's neurons (an MLP-Mixer's token
            mixing reads ``x.transpose(1, 2)``: its samples run over the channels). The members order those
            neurons differently, so their values there are not the same samples: the statistics take the mean over
            these dims first (invariant to their permutation).
    """

    node: str
    kind: str
    dim: int
    offset: int = 0
    pattern: tuple[Factor, ...] | None = None
    module: str | None = None
    mean_dims: tuple[int, ...] = ()


@dataclass
class NeuronGroup:
    """A neuron group: its size and every axis it indexes, plus where its activations can be observed.

    Attributes:
        name: group name (unique in the graph).
        size: number of neurons n (per member), ``units * unit_size``.
        refs: all axis references (producers, per-neuron params, consumers).
        pre_points: module paths whose outputs are the pre-activation values of the group (the producer, or the
            BatchNorm / LayerNorm after it). Empty when those values are only produced by functions (e.g. the
            output of ``a + b`` in a residual stream).
        post_points: module paths whose outputs are the post-activation values (the activation module).
        activation: name of the elementwise activation applied after the group ("relu", "gelu", ...; a functional
            call is recorded as "functional:relu"), or None.
        pre_nodes / post_nodes: graph node names of the same points (always set when the graph was traced;
            used to tap values that no module outputs, such as ``F.relu(out + shortcut)``). Only points where one
            tensor dim holds exactly this group's neurons in order are listed; :attr:`captures` has all.
        unit_size: neurons per unit (head dim of an attention head group; 1 for ordinary neurons).
        tie: groups with the same tie must get the same unit-level map (None: untied).
        normalizers: modules that read all the group's neurons at once (LayerNorm / RMSNorm of a stream).
        captures: every capture point of the group (see :class:`CapturePoint`).
        activation_ops: the ATen ops of the activation (("relu",), GPT-2's new GELU ("mul", "pow", "add",
            "tanh", ...)), so methods can tell positively homogeneous activations from others.
        shared_params: parameters broadcast over the group's units (:class:`SharedParameter`): the group (and its
            tie set) may be permuted or merged but not widened.
        contracted: ops (node, op, module) that sum the group's units against another activation (q . k over the
            head dims when the heads themselves are pinned, e.g. by Falcon's ALiBi): a widened unit would add every
            member's terms into one product, so the group may be permuted or merged but not widened.
    """

    name: str
    size: int
    refs: list[AxisRef] = field(default_factory=list)
    pre_points: list[str] = field(default_factory=list)
    post_points: list[str] = field(default_factory=list)
    activation: str | None = None
    pre_nodes: list[str] = field(default_factory=list)
    post_nodes: list[str] = field(default_factory=list)
    unit_size: int = 1
    tie: str | None = None
    normalizers: list[Normalizer] = field(default_factory=list)
    captures: list[CapturePoint] = field(default_factory=list)
    activation_ops: tuple[str, ...] = ()
    shared_params: list[SharedParameter] = field(default_factory=list)
    contracted: list[str] = field(default_factory=list)

    @property
    def width_pins(self) -> list[str]:
        """Why the group may not be widened (:attr:`shared_params`, :attr:`contracted`), one line each."""
        return [p.describe() for p in self.shared_params] + [
            f"its units are summed against another activation at {w}, so a widened unit would add the members' "
            "products together"
            for w in self.contracted
        ]

    @property
    def units(self) -> int:
        """Number of units (heads), ``size // unit_size``."""
        return self.size // self.unit_size

    @property
    def producers(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "producer"]

    @property
    def per_neuron(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "neuron"]

    @property
    def consumers(self) -> list[AxisRef]:
        return [r for r in self.refs if r.role == "consumer"]

    @property
    def is_simple(self) -> bool:
        """Ordinary neurons with legacy references only (what MLP / VGG / ResNet groups are)."""
        return self.unit_size == 1 and self.tie is None and all(r.is_simple for r in self.refs)

    def neuron_permutation(self, unit_perm: Tensor | Sequence[int], inner_perms: Any = None) -> Tensor:
        """Neuron-level index vector of a unit permutation: slot ``(s, d)`` holds neuron
        ``(unit_perm[s], inner_perms[s][d])``.

        Args:
            unit_perm: (units,) slot unit s holds member unit ``unit_perm[s]``.
            inner_perms: (units, unit_size) per slot unit, or None for the identity inside every unit.

        Returns:
            (size,) long tensor, usable with :meth:`pyfusion.fuse.Plan.from_permutations`.
        """
        u = torch.as_tensor(unit_perm, dtype=torch.long)
        if tuple(u.shape) != (self.units,) or sorted(u.tolist()) != list(range(self.units)):
            raise ValueError(f"group {self.name!r}: unit_perm must be a permutation of range({self.units}); got {u}")
        d = self.unit_size
        inner = torch.arange(d).expand(self.units, d) if inner_perms is None else torch.as_tensor(inner_perms)
        if tuple(inner.shape) != (self.units, d):
            raise ValueError(
                f"group {self.name!r}: inner_perms must have shape ({self.units}, {d}); got {tuple(inner.shape)}"
            )
        return (u[:, None] * d + inner.long()).reshape(-1)


PINNED_BY_OUTPUT = "the model's output"  # PinnedNeurons.where of a stream the model returns


@dataclass(frozen=True)
class PinnedNeurons:
    """Hidden neurons that no group holds: produced by one weight layer and read by another, but pinned by an op
    the tracer reads as varying along them (a buffer or a constant table combined with them, an index that depends
    on them) or by the model's output (a stream the model returns, e.g. a Hugging Face base model's hidden
    states). No permutation of them is known to keep the function, so fusion can neither align them nor keep them
    per member: every member's neuron i is merged with the others' neuron i.

    Attributes:
        size: number of neurons.
        producers / consumers: module paths of the weight layers writing / reading them.
        where: the op that pinned them (node, op, module path and type), or "the model's output".
        buffer: the buffer that op combined with them (model state that a permutation of them would have to
            permute too: the tracer fixes buffers), or None (a table computed from indices, an index, the output:
            no permutation keeps the function).
        outputs: where the model's output pins them, the outputs that return them (``"encoder_last_hidden_state"``
            of a Hugging Face output; ``"0"``, ``"1"`` of a tuple; ``""`` for a single tensor).
    """

    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    where: str
    buffer: str | None = None
    outputs: tuple[str, ...] = ()

    def describe(self) -> str:
        buf = f" with buffer {self.buffer!r}" if self.buffer is not None else ""
        named = [o for o in self.outputs if o]
        out = f" (returned as {', '.join(repr(o) for o in named)})" if named else ""
        return (
            f"{self.size} neurons produced by {', '.join(self.producers)} and read by {', '.join(self.consumers)} "
            f"are pinned by {self.where}{buf}{out}"
        )


@dataclass
class FusionGraph:
    """The neuron groups of one architecture.

    Attributes:
        groups: name -> group, in the order the forward pass creates them.
        traced: the exported graph of the architecture (:class:`pyfusion.graph.capture.TracedGraph`), or None
            (module walk or hand-declared groups).
        tied_params: tensors that are one parameter in the members, as tuples of their state-dict keys
            (``named_parameters(remove_duplicate=False)``), e.g. GPT-2's ``("transformer.wte.weight",
            "lm_head.weight")``. Each key carries its own references (a producer for the embedding, a consumer
            for the output layer).
        example_inputs: ``(args, kwargs)`` the graph was traced and verified with (None if unknown).
        verified: every group passed the permutation check of :func:`pyfusion.graph.verify_groups`.
        source: "export" (traced), "walk" (module chain) or "declared".
        pinned: hidden neurons no group holds (:class:`PinnedNeurons`; traced graphs only): methods that align or
            keep neurons per member refuse a graph with neurons pinned by an op, see :func:`pyfusion.fuse.fuse`.
    """

    groups: dict[str, NeuronGroup]
    traced: object | None = None
    tied_params: list[tuple[str, ...]] = field(default_factory=list)
    example_inputs: Any = None
    verified: bool = False
    source: str = "declared"
    pinned: list[PinnedNeurons] = field(default_factory=list)

    def refs_by_key(self) -> dict[str, list[tuple[str, AxisRef]]]:
        """state-dict key -> list of (group name, axis ref) touching that tensor."""
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for g in self.groups.values():
            for r in g.refs:
                out.setdefault(r.key, []).append((g.name, r))
        return out

    def ties(self) -> dict[str, list[str]]:
        """tie -> names of the groups sharing it (only ties with a group)."""
        out: dict[str, list[str]] = {}
        for g in self.groups.values():
            if g.tie is not None:
                out.setdefault(g.tie, []).append(g.name)
        return out

    def tie_sets(self) -> list[list[str]]:
        """The groups as sets that move together (a tie's groups; every untied group alone), in graph order."""
        seen: set[str] = set()
        ties = self.ties()
        out = []
        for g in self.groups.values():
            if g.name in seen:
                continue
            names = ties[g.tie] if g.tie is not None else [g.name]
            seen.update(names)
            out.append(list(names))
        return out

    @property
    def is_simple(self) -> bool:
        """Every group is :attr:`NeuronGroup.is_simple` (no units, ties, segments or tied parameters)."""
        return all(g.is_simple for g in self.groups.values()) and not self.tied_params

    def validate(self, model: nn.Module) -> None:
        """Check that every reference exists in ``model`` with the right size, and no axis index is claimed twice.

        Raises:
            ValueError: naming the group, the reference and the expected vs actual size.
        """
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        claimed: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
        ties: dict[str, tuple[int, str]] = {}
        for g in self.groups.values():
            if g.size <= 0:
                raise ValueError(f"group {g.name!r}: size must be positive; got {g.size}")
            if g.unit_size <= 0 or g.size % g.unit_size:
                raise ValueError(f"group {g.name!r}: size {g.size} is not a multiple of unit_size {g.unit_size}")
            if g.tie is not None:
                other = ties.setdefault(g.tie, (g.units, g.name))
                if other[0] != g.units:
                    raise ValueError(
                        f"groups {other[1]!r} and {g.name!r} share tie {g.tie!r} but have {other[0]} and {g.units} "
                        "units"
                    )
            for r in g.refs:
                if r.role not in ROLES:
                    raise ValueError(f"group {g.name!r}: role of {r.key} must be one of {ROLES}; got {r.role!r}")
                t = tensors.get(r.key)
                if t is None:
                    raise ValueError(f"group {g.name!r} references {r.key!r}, which the model does not have")
                if r.axis >= t.ndim or r.axis < 0:
                    raise ValueError(f"group {g.name!r}: {r.key} has {t.ndim} axes; axis {r.axis} does not exist")
                if r.pattern is None:
                    if r.offset != 0:
                        raise ValueError(f"group {g.name!r}: {r.key} has offset {r.offset} but no pattern")
                    if t.shape[r.axis] != g.size * r.expand:
                        raise ValueError(
                            f"group {g.name!r}: {r.key} axis {r.axis} has size {t.shape[r.axis]}, expected "
                            f"size * expand = {g.size} * {r.expand}"
                        )
                    length = g.size * r.expand
                else:
                    _check_pattern(g, r)
                    length = r.length(g)
                    if r.offset < 0 or r.offset + length > t.shape[r.axis]:
                        raise ValueError(
                            f"group {g.name!r}: segment [{r.offset}, {r.offset + length}) of {r.key} axis {r.axis} "
                            f"is outside the axis of size {t.shape[r.axis]}"
                        )
                spans = claimed.setdefault((r.key, r.axis), [])
                for lo, hi, other_name in spans:
                    if r.offset < hi and lo < r.offset + length:
                        raise ValueError(
                            f"{r.key} axis {r.axis} is claimed by groups {other_name!r} and {g.name!r} "
                            f"(segments [{lo}, {hi}) and [{r.offset}, {r.offset + length}) overlap)"
                        )
                spans.append((r.offset, r.offset + length, g.name))
        for keys in self.tied_params:
            for key in keys:
                if key not in tensors:
                    raise ValueError(f"tied parameter {key!r} is not a tensor of the model")

    def __repr__(self) -> str:
        lines = [f"FusionGraph({len(self.groups)} groups, source={self.source!r}, verified={self.verified})"]
        for g in self.groups.values():
            extra = ""
            if g.unit_size > 1:
                extra += f" units={g.units}x{g.unit_size}"
            if g.tie is not None:
                extra += f" tie={g.tie!r}"
            if g.normalizers:
                extra += f" normalizers={[n.module for n in g.normalizers]}"
            if g.shared_params:
                extra += f" shared_params={[p.param for p in g.shared_params]}"
            lines.append(
                f"  {g.name}: n={g.size}{extra} producers={[r.key for r in g.producers]} "
                f"per_neuron={sorted({r.module for r in g.per_neuron})} consumers={[r.key for r in g.consumers]}"
            )
        if self.tied_params:
            lines.append(f"  tied: {self.tied_params}")
        return "\n".join(lines)


def _check_pattern(g: NeuronGroup, r: AxisRef) -> None:
    kinds = [k for k, _ in r.pattern or ()]
    if any(k not in FACTOR_KINDS for k in kinds) or any(int(s) < 1 for _, s in r.pattern or ()):
        raise ValueError(f"group {g.name!r}: pattern of {r.key} must list (kind, size>=1), kinds {FACTOR_KINDS}")
    if kinds.count("unit") != 1 or kinds.count("inner") > 1:
        raise ValueError(f"group {g.name!r}: pattern of {r.key} needs exactly one unit factor; got {r.pattern}")
    sizes = dict((k, s) for k, s in r.pattern if k != "rep")  # type: ignore[union-attr]
    if sizes["unit"] != g.units:
        raise ValueError(f"group {g.name!r}: unit factor of {r.key} is {sizes['unit']}, the group has {g.units} units")
    if g.unit_size > 1 and sizes.get("inner") != g.unit_size:
        raise ValueError(
            f"group {g.name!r}: {r.key} needs an inner factor of size {g.unit_size}; got pattern {r.pattern}"
        )
    if g.unit_size == 1 and "inner" in sizes and sizes["inner"] != 1:
        raise ValueError(f"group {g.name!r}: {r.key} has an inner factor but the group's unit_size is 1")
    if "inner" in kinds and kinds.index("inner") < kinds.index("unit"):
        raise ValueError(f"group {g.name!r}: in {r.key}'s pattern the inner factor must follow the unit factor")


def _parse_ref(item: AxisRef | Sequence | Mapping | str, role: str) -> AxisRef:
    if isinstance(item, AxisRef):
        return item
    if isinstance(item, str):
        module, _, param = item.rpartition(".")
        return AxisRef(module, param, 1 if role == "consumer" else 0, role)
    if isinstance(item, Mapping):
        module, _, param = str(item["key"]).rpartition(".")
        pattern = item.get("pattern")
        return AxisRef(
            module,
            param,
            int(item.get("axis", 1 if role == "consumer" else 0)),
            role,
            int(item.get("expand", 1)),
            int(item.get("offset", 0)),
            None if pattern is None else tuple((str(k), int(s)) for k, s in pattern),
        )
    item = tuple(item)
    if len(item) not in (2, 3):
        raise ValueError(f"a {role} reference must be 'module.param', (key, axis) or (key, axis, expand); got {item}")
    module, _, param = str(item[0]).rpartition(".")
    expand = int(item[2]) if len(item) == 3 else 1
    return AxisRef(module, param, int(item[1]), role, expand)


def declare_groups(
    model: nn.Module,
    groups: Mapping[str, Mapping[str, Any]],
    *,
    example_inputs: Any = None,
    verify: bool = True,
    tied_params: Iterable[Sequence[str]] = (),
) -> FusionGraph:
    """Declare neuron groups by hand, for models the tracer does not support (or to override it).

    Args:
        model: a member (used to check sizes, and for the verification).
        groups: name -> {"producers": [...], "neurons": [...], "consumers": [...], "pre_points": [...],
            "post_points": [...], "activation": str, "unit_size": int, "tie": str, "normalizers": [module paths]}.
            A reference is "module.param" (axis 0 for producers / neurons, 1 for consumers), ("module.param", axis),
            ("module.param", axis, expand), an :class:`AxisRef`, or {"key", "axis", "offset", "pattern"}.
        example_inputs: inputs for the verification (a tensor, a tuple of positional arguments, or ``(args,
            kwargs)``); synthesized for simple first layers and Hugging Face configs when omitted.
        verify: permute every group at random in a float64 copy and check the function is unchanged
            (:func:`pyfusion.graph.verify_groups`); ``False`` only for experts who checked the groups otherwise.
        tied_params: tuples of state-dict keys that are one tensor in the members.

    Returns:
        A validated (and, with ``verify``, verified) :class:`FusionGraph`.

    Example::

        g = declare_groups(net, {"h": {"producers": ["fc1.weight", "fc1.bias"], "consumers": ["fc2.weight"]}})
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    known = {"producers", "neurons", "consumers", "pre_points", "post_points", "activation", "unit_size", "tie"}
    known.add("normalizers")
    out: dict[str, NeuronGroup] = {}
    for name, spec in groups.items():
        unknown = set(spec) - known
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
        if first.pattern is not None:
            size = math.prod(s for k, s in first.pattern if k != "rep")
        else:
            size = tensors[first.key].shape[first.axis] // first.expand
        mods = dict(model.named_modules())
        norms = []
        for p in spec.get("normalizers", []):
            if p not in mods:
                raise ValueError(f"group {name!r}: normalizer {p!r} is not a module of the model")
            norms.append(Normalizer(p, type(mods[p]).__name__, True))
        out[name] = NeuronGroup(
            name,
            int(size),
            refs,
            pre_points=list(spec.get("pre_points", [])),
            post_points=list(spec.get("post_points", [])),
            activation=spec.get("activation"),
            unit_size=int(spec.get("unit_size", 1)),
            tie=spec.get("tie"),
            normalizers=norms,
        )
    graph = FusionGraph(out, None, tied_params=[tuple(t) for t in tied_params], source="declared")
    graph.validate(model)
    if verify:
        from pyfusion.graph.inputs import example_inputs_for
        from pyfusion.graph.verify import verify_groups

        graph.example_inputs = example_inputs_for(model, example_inputs)
        verify_groups(model, graph)
    return graph
