"""The propagation engine: neuron groups from an exported ATen graph (notes/IR.md §2).

Every dim of every value carries a term of :mod:`pyfusion.graph.spaces`. Parameters start with a fresh atom per
axis; buffers, constants and user inputs are fixed (reps). Each op is handled by one rule:

* contractions with a parameter operand (``linear``, ``addmm``, ``mm``, ``matmul``, ``einsum``, convolutions,
  ``embedding``): the contracted axis of the parameter is unified with the input's space (consumer), its free
  axis carries on to the output (producer; the bias follows it);
* elementwise ops unify the spaces of aligned dims (a residual add, a gated FFN ``silu(gate) * up``); a
  parameter operand becomes a per-neuron reference (LayerNorm weight, layer-scale gamma, position embeddings);
  a fixed operand (a rotary cos / sin table, a mask that varies along the dim) pins the space;
* views, reshapes and permutes move / split / merge factors (768 -> 12 x 64 discovers heads; ``expand`` of a
  broadcast dim is a rep: grouped-query ``repeat_kv``); a reshape that does not factor cleanly pins; a view
  ``(B, T, C) -> (B, T, 1, C)`` makes a unit of size 1 (one head: multi-query attention's key / value head, a
  one-head attention), carried by the rules that know it and pinned by any other op that reads its size-1 dim;
* ``cat`` / ``split`` / ``slice`` / ``select`` make segments where boundaries allow (GPT-2's q | k | v), a packed
  ``unflatten(-1, (3, E))`` followed by ``select`` becomes three independent segments (nn.MultiheadAttention),
  anything else index-dependent pins;
* attention (``matmul`` / ``bmm`` between activations, ``scaled_dot_product_attention``): contracted dims
  unify (q / k inner dims), batch dims unify (the head dims of q, k and v: this ties the q/k and v/o groups);
* reductions, softmax and norms over a neuron dim make the group *normalized* (the module is recorded);
* elementwise unary ops pass (the activation is recorded for the group).

Anything else that touches a neuron dim raises :class:`UnsupportedModuleError` naming the node, the module path
and the op. Groups are then read off the parameter axes (:meth:`Engine.finish`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx, nn

from pyfusion.graph.groups import (
    PINNED_BY_OUTPUT,
    AxisRef,
    CapturePoint,
    NeuronGroup,
    Normalizer,
    PinnedNeurons,
    SharedParameter,
)
from pyfusion.graph.spaces import Spaces, Term

__all__ = ["Engine", "UnsupportedModuleError"]


class UnsupportedModuleError(ValueError):
    """A module or function the tracer cannot assign to neuron groups (declare the groups by hand instead)."""


HINT = "declare the groups with pyfusion.graph.declare_groups"

ACTIVATIONS = {
    "relu", "gelu", "silu", "tanh", "sigmoid", "elu", "celu", "selu", "leaky_relu", "hardtanh", "relu6", "softplus",
    "mish", "hardswish", "hardsigmoid", "log_sigmoid", "softsign", "threshold", "rrelu", "glu_act",
}  # fmt: skip
UNARY = {
    "neg", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "square", "reciprocal",
    "erf", "erfc", "erfinv", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos", "atan", "asinh", "acosh", "atanh",
    "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "dropout", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh", "to",
    "_to_copy", "clamp_min", "clamp_max", "nan_to_num", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite",
    "positive", "zero", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "hardshrink",
    "softshrink", "tanhshrink", "resolve_conj", "resolve_neg", "_conj", "conj", "bernoulli", "bitwise_left_shift",
    "bitwise_right_shift", "sigmoid_", "silu_", "relu_", "log_sigmoid_forward",
}  # fmt: skip
ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "maximum", "minimum",
    "fmax", "fmin", "pow", "atan2", "where", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "masked_fill",
    "lerp", "addcmul", "addcdiv", "copy", "hypot", "xlogy", "clamp", "clip", "fill", "logaddexp", "max", "min",
}  # fmt: skip
REDUCTIONS = {
    "sum", "mean", "amax", "amin", "var", "std", "var_mean", "std_mean", "logsumexp", "norm", "linalg_vector_norm",
    "prod", "all", "any", "nansum", "nanmean", "count_nonzero", "max", "min",
}  # fmt: skip
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
INDEX_ALONG = {
    "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort", "topk", "kthvalue", "argmax",
    "argmin", "flip", "roll", "diff", "median", "mode", "nanmedian",
}  # fmt: skip
VIEWS = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "view_copy",
         "_reshape_alias", "reshape_as"}  # fmt: skip
PERMUTES = {"permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "numpy_T", "mT", "adjoint"}
POOLS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d", "lp_pool1d",
    "lp_pool2d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
}  # fmt: skip
SCATTERS = {"index_put", "index_add", "index_copy", "index_fill", "scatter", "scatter_add", "scatter_reduce",
            "masked_scatter", "put", "index_reduce", "_index_put_impl"}  # fmt: skip
NO_OUTPUT = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
             "sym_constrain_range", "_print"}  # fmt: skip
# ops that may see a packed factor after it was selected without making its copies stale
_SELECTOR_SAFE = (
    {"select", "slice", "unbind", "split", "split_with_sizes", "chunk", "narrow", "unsafe_split"}
    | VIEWS
    | PERMUTES
    | {"contiguous", "clone", "alias", "detach", "to", "_to_copy", "lift_fresh_copy"}
)
# pure value-preserving ops through which a capture point's input is followed back
PASS_BACK = {"dropout", "clone", "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "lift_fresh_copy"}


def _dead_nodes(graph: fx.Graph) -> set[str]:
    """Names of the call nodes whose values reach neither the graph's output nor an op with side effects (an
    in-place ``copy_`` / ``fill_``, an assertion): they steer nothing, so the engine does not read them."""
    live: set[str] = set()
    for node in reversed(graph.nodes):
        if node.name in live or node.op == "output" or node.op == "call_function" and node.is_impure(False):
            live.add(node.name)
            live.update(a.name for a in node.all_input_nodes)
    return {n.name for n in graph.nodes if n.op == "call_function" and n.name not in live}


def _output_names(ep: Any) -> list[str]:
    """The names of the graph's output values in order: "" for mutated buffers, the user outputs by their path in
    the returned structure (a Hugging Face output's fields, a tuple's indices, "" for a single tensor)."""

    def leaves(spec: Any, prefix: str) -> list[str]:
        if spec is None or spec.is_leaf():
            return [prefix]
        kids = list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)
        ctx = spec.context
        keys = list(ctx) if isinstance(ctx, (list, tuple)) and len(ctx) == len(kids) else list(range(len(kids)))
        return [n for k, kid in zip(keys, kids) for n in leaves(kid, f"{prefix}.{k}" if prefix else str(k))]

    try:
        user = leaves(ep.call_spec.out_spec, "")
        kinds = [spec.kind.name for spec in ep.graph_signature.output_specs]
    except Exception:  # the names only make the errors clearer
        return []
    it = iter(user)
    return [next(it, "") if kind == "USER_OUTPUT" else "" for kind in kinds]


def _opname(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    pk = getattr(t, "overloadpacket", None)
    name = pk.__name__ if pk is not None else getattr(t, "__name__", str(t))
    return name


def _base(name: str) -> str:
    """``relu_`` -> ``relu`` (in-place variants share the rule of the functional op)."""
    if name.endswith("_") and not name.startswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    pos = list(node.args)
    for i, a in enumerate(schema.arguments):
        if i < len(pos) and not a.kwarg_only:
            out[a.name] = pos[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


class _DataDependentShape(Exception):
    """A size that depends on the data (an unbacked symbol of the export) and has no concrete value."""


def _size(s: Any, hints: dict) -> int:
    """A dim's size: an int, or a symbolic size (``hidden[eos_mask]`` has as many rows as the mask has True
    entries) evaluated at the example inputs' values of its symbols (``hints``)."""
    if not isinstance(s, torch.SymInt):
        return int(s)
    expr = s.node.expr
    if expr.free_symbols:
        expr = sympy.sympify(expr.xreplace(hints))
    if not expr.is_number:
        raise _DataDependentShape(str(s.node.expr))
    return int(expr)


def _shape(v: Any, hints: dict | None = None) -> tuple[int, ...] | None:
    if isinstance(v, torch.Tensor):
        return tuple(_size(s, hints or {}) for s in v.shape)
    return None


def _unbacked_hints(ep: Any) -> dict:
    """The example inputs' values of the export's data-dependent sizes (symbol -> int), read off one run of the
    exported graph on them; empty when the graph has none (or cannot be run: the sizes then raise)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch.utils import _pytree as pytree

    if not any(free_unbacked_symbols(n.meta.get("val")) for n in ep.graph.nodes):
        return {}
    hints: dict = {}

    def record(fake: Any, real: Any) -> None:
        if isinstance(fake, torch.SymInt) and fake.node.expr.is_Symbol and isinstance(real, int):
            hints[fake.node.expr] = real
        elif isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor) and fake.dim() == real.dim():
            for s, r in zip(fake.shape, real.shape):
                record(s, int(r))

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            fakes, reals = pytree.tree_leaves(n.meta.get("val")), pytree.tree_leaves(out)
            if len(fakes) == len(reals):
                for fake, real in zip(fakes, reals):
                    record(fake, real)
            return out

    example = getattr(ep, "example_inputs", None)
    if example is None:
        return {}
    try:
        flat = ep._graph_module_flat_inputs(*example)
        # buffers and inputs copied: an in-place op of the graph must not write into the member
        flat = [t.clone() if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) else t for t in flat]
        with torch.no_grad():
            Recorder(ep.graph_module).run(*flat)
    except Exception:  # the sizes without a value raise, naming their node
        return {}
    return hints


@dataclass
class _Use:
    tkey: str
    alias: str
    axis: int
    role: str
    order: int


@dataclass
class _Rec:
    node: str
    kind: str  # pre / post / input
    dim: int  # negative
    term: Term
    module: str | None
    order: int
    supersedes: list[str] = field(default_factory=list)


@dataclass
class _Norm:
    node: str
    module: str
    op: str
    terms: list[Term]
    dims: list[int]  # negative
    ndim: int
    order: int


@dataclass
class _Shared:
    """A parameter broadcast over one dim of a value it is combined with (that dim's term)."""

    node: str
    param: str
    term: Term
    order: int


@dataclass
class _Act:
    node: str
    op: str
    term: Term
    module: str
    order: int


class Engine:
    """Propagate spaces over one exported program (see the module docstring)."""

    def __init__(self, model: nn.Module, ep: Any):
        self.model = model
        self.ep = ep
        self.S = Spaces()
        sig = ep.graph_signature
        self.param_of: dict[str, str] = dict(sig.inputs_to_parameters)
        self.buffer_of: dict[str, str] = dict(sig.inputs_to_buffers)
        self.const_of: dict[str, str] = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        ids: dict[int, list[str]] = {}
        for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)
        ):
            ids.setdefault(id(t), []).append(n)
        self.aliases: dict[str, list[str]] = {}
        for names in ids.values():
            for n in names:
                self.aliases[n] = names
        self.reg: dict[str, list[Term | None]] = {}
        self.env: dict[str, Any] = {}
        self.prov: dict[str, tuple[str, tuple[int | None, ...]]] = {}
        self.shapes: dict[str, Any] = {}
        self.uses: list[_Use] = []
        self.recs: list[_Rec] = []
        self.norms: list[_Norm] = []
        self.acts: list[_Act] = []
        self.shared: list[_Shared] = []
        self.contracted: list[tuple[str, Term]] = []  # (node, term) summed between two activations
        # attention nodes whose q / k / v have a heads axis of size 1: a single head shows no unit structure (size-1
        # factors carry no atom), so its dims read as contracted units; the refusal says so
        self.single_head: set[str] = set()
        self.param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.nodes: dict[str, fx.Node] = {}
        self.order: dict[str, int] = {}
        self.mods = dict(model.named_modules(remove_duplicate=False))
        self._regions: dict[str, list[fx.Node]] | None = None
        self._key_path: dict[str, str] = {}
        self._io: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
        self.prov_list: dict[str, list[Any]] = {}
        self.hints = _unbacked_hints(ep)  # data-dependent sizes at the example inputs
        self.output_of: dict[int, list[str]] = {}  # leaf atom -> names of the outputs that return it

    # ---- helpers ----------------------------------------------------------------------------------
    def module_of(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        return str(list(stack.values())[-1][0])

    def where(self, node: fx.Node) -> str:
        path = self.module_of(node)
        mod = self.mods.get(path)
        kind = f" of type {type(mod).__name__}" if mod is not None else ""
        return f"node {node.name!r} (op {_opname(node)!r}) in module {path!r}{kind}"

    def unsupported(self, node: fx.Node, why: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(f"{self.where(node)}: {why}; {HINT}")

    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env.get(a.name)
        return None

    def vshape(self, v: Any) -> tuple[int, ...] | None:
        """The shape of a traced value (a fake tensor; data-dependent sizes at the example inputs)."""
        return _shape(v, self.hints)

    def shape(self, a: Any) -> tuple[int, ...] | None:
        if isinstance(a, fx.Node):
            return self.vshape(a.meta.get("val"))
        return None

    def has_atoms(self, v: Any) -> bool:
        if v is None:
            return False
        if isinstance(v, list):
            return any(self.has_atoms(x) for x in v)
        if len(v) == 2 and v[0] == "buffer":  # a buffer: only the axes already assigned to groups
            return any(t is not None and self.S.atoms(t) for t in self.reg[v[1]])
        return any(self.S.atoms(t) for t in v)

    def fixed(self, shape: tuple[int, ...]) -> tuple[Term, ...]:
        return tuple(((-s,) if s > 1 else ()) for s in shape)

    def out_val(self, node: fx.Node) -> Any:
        """All-fixed value(s) shaped like the node's output."""
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return self.fixed(self.vshape(v))
        if isinstance(v, (list, tuple)):
            return [self.fixed(self.vshape(x)) if isinstance(x, torch.Tensor) else None for x in v]
        return None

    def alias_for(self, tkey: str, module: str) -> str:
        names = self.aliases.get(tkey, [tkey])
        if len(names) == 1:
            return names[0]
        for n in names:
            if n.rpartition(".")[0] == module:
                return n
        for n in names:
            m = n.rpartition(".")[0]
            if module.startswith(m + ".") or m.startswith(module + ".") if module else False:
                return n
        return tkey

    def use(self, node: fx.Node, a: Any, dim: int, role: str) -> None:
        """Record that dim ``dim`` of operand ``a`` (a parameter / buffer or a view of one) is used with ``role``."""
        if not isinstance(a, fx.Node) or a.name not in self.prov:
            return
        tkey, axes = self.prov[a.name]
        shape = self.shape(a)
        if shape is None or shape[dim] == 1:
            return
        axis = axes[dim]
        if axis is None:  # a broadcast (expanded) dim: no axis of the parameter
            return
        self.uses.append(_Use(tkey, self.alias_for(tkey, self.module_of(node)), axis, role, self.order[node.name]))

    def is_param(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a.name in self.prov

    def broadcast(self, node: fx.Node, a: Any, dim: int, term: Term) -> None:
        """Record that parameter operand ``a`` is the same along the output dim whose term is ``term`` (``dim`` is
        the operand's own dim, negative or None where the operand has no such dim, or -1 past its shape): a group
        whose units lie on that dim cannot give each member its own value there (see
        :class:`~pyfusion.graph.groups.SharedParameter`). Buffers are not recorded: the tracer reads them as
        constants of the architecture (rotary tables), the same in every member."""
        if not isinstance(a, fx.Node) or a.name not in self.prov:
            return
        tkey, axes = self.prov[a.name]
        alias = self.alias_for(tkey, self.module_of(node))
        if alias not in self.param_names and tkey not in self.param_names:
            return
        shape = self.shape(a)
        if dim is not None and dim >= 0 and shape is not None and shape[dim] > 1 and axes[dim] is not None:
            return  # indexed along the dim: a per-neuron parameter, not a shared one
        if self.S.atoms(term):
            self.shared.append(_Shared(node.name, alias, term, self.order[node.name]))

    # ---- main loop --------------------------------------------------------------------------------
    def run(self) -> None:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        graph = self.ep.graph
        dead = _dead_nodes(graph)
        for i, node in enumerate(graph.nodes):
            try:
                self._run_node(i, node, dead)
            except (_DataDependentShape, GuardOnDataDependentSymNode) as exc:
                what = exc.args[0] if isinstance(exc, _DataDependentShape) else str(exc).strip().splitlines()[0]
                raise self.unsupported(node, f"its output's shape depends on the data ({what}) and has no value at "
                                       "the example inputs") from None  # fmt: skip

    def _run_node(self, i: int, node: fx.Node, dead: set[str]) -> None:
        """Read one node of the graph (see the module docstring for the rules)."""
        self.nodes[node.name] = node
        self.order[node.name] = i
        self.S.context = PINNED_BY_OUTPUT if node.op == "output" else None if node.op == "placeholder" else node
        if node.op == "placeholder":
            self._placeholder(node)
        elif node.op == "output":
            args = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            names = _output_names(self.ep)
            for a, name in zip(args, names + [""] * (len(args) - len(names))):
                v = self.val(a)
                for t in v if isinstance(v, tuple) and (not v or v[0] != "buffer") else []:
                    for leaf in {f for r in self.S.resolve(t) for f in r if f >= 0}:
                        self.output_of.setdefault(leaf, []).append(name)
                self._pin_val(v)
        elif node.op == "call_function":
            opaque = self._opaque(node)
            if node.name in dead and not any(self.is_param(a) for a in node.all_input_nodes):
                # a value nothing reads (BART's ``inputs_embeds[:, :, -1]``, "needed for the shape only"):
                # reading it would cut or pin the stream for nothing
                self.env[node.name] = self.out_val(node)
            elif opaque is not None:
                self._opaque_node(node, *opaque)
            else:
                self._call(node)
        elif node.op == "get_attr":
            self.env[node.name] = self.out_val(node)
        else:  # pragma: no cover - exported graphs only call functions
            raise self.unsupported(node, f"unexpected graph node kind {node.op!r}")

    def _stale_selectors(self, inputs: list[fx.Node]) -> None:
        for a in inputs:
            v = self.val(a)
            for t in v if isinstance(v, tuple) and (not v or v[0] != "buffer") else []:
                for f in t:
                    if f >= 0 and self.S.find(f) in self.S.copies:
                        self.S.stale_selector(self.S.find(f))

    def _opaque(self, node: fx.Node) -> tuple[str, str] | None:
        """(stack key, path) of the outermost module around ``node`` that declares itself opaque to the tracer
        (``__pyfusion_opaque__``, e.g. :class:`pyfusion.nn.norm.MemberViewNorm`), or None."""
        for key, (path, _t) in (node.meta.get("nn_module_stack") or {}).items():
            mod = self.mods.get(str(path))
            if mod is not None and getattr(type(mod), "__pyfusion_opaque__", None):
                return key, str(path)
        return None

    def _opaque_node(self, node: fx.Node, key: str, path: str) -> None:
        """An opaque module is read as a whole: a normalizer maps its input's space to its output unchanged."""
        nodes = self.regions()[key]
        ins, outs = self.region_io(nodes)
        mod = self.mods[path]
        if len(ins) != 1 or len(outs) != 1 or getattr(type(mod), "__pyfusion_opaque__", None) != "normalizer":
            raise self.unsupported(node, f"opaque module {path!r} must read one tensor and return one")
        if node is not outs[0]:
            self.env[node.name] = self.out_val(node)
            return
        v = self.tval(ins[0])
        self.env[node.name] = v
        d = int(getattr(mod, "dim", -1))  # MemberViewNorm's feature axis
        if v and len(v) >= -d:
            self.norms.append(_Norm(node.name, path, type(mod).__name__, [v[d]], [d], len(v), self.order[node.name]))

    def _pin_val(self, v: Any) -> None:
        if v is None:
            return
        if isinstance(v, list):
            for x in v:
                self._pin_val(x)
            return
        for t in v:
            self.S.pin_term(t)

    def _placeholder(self, node: fx.Node) -> None:
        shape = self.shape(node)
        if shape is None:
            self.env[node.name] = None
            return
        name = node.name
        if name in self.param_of:
            fqn = self.param_of[name]
            terms = self.reg.setdefault(fqn, [((self.S.new(s),) if s > 1 else ()) for s in shape])
            self.env[name] = tuple(terms)  # type: ignore[arg-type]
            self.prov[name] = (fqn, tuple(range(len(shape))))
        elif name in self.buffer_of:
            fqn = self.buffer_of[name]
            self.reg.setdefault(fqn, [None] * len(shape))
            self.env[name] = ("buffer", fqn)
            self.prov[name] = (fqn, tuple(range(len(shape))))
        else:
            self.env[name] = self.fixed(shape)

    def buffer_val(self, a: Any) -> Any:
        """A buffer's value: its assigned terms, fixed where unassigned (the first generic use fixes them)."""
        v = self.val(a)
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "buffer":
            fqn = v[1]
            shape = self.shape(a)
            terms = self.reg[fqn]
            for i, t in enumerate(terms):
                if t is None:
                    terms[i] = (-shape[i],) if shape[i] > 1 else ()
            return tuple(terms)  # type: ignore[arg-type]
        return v

    def tval(self, a: Any) -> Any:
        """Value of a tensor operand (buffers resolved)."""
        return self.buffer_val(a)

    # ---- dispatch -----------------------------------------------------------------------------------
    def _call(self, node: fx.Node) -> None:
        """Read one call; a size-1 unit on a size-1 dim of an input that the rule did not carry to the output is
        pinned (an op read it without a rule for it: a reduction, an index, a broadcast)."""
        if not self.S.units1:
            self._dispatch(node)
            return
        before = set()
        for a in node.all_input_nodes:
            v, s = self.val(a), self.shape(a)
            if isinstance(v, tuple) and s is not None and len(v) == len(s) and (not v or v[0] != "buffer"):
                before.update(u for t, n in zip(v, s) if n == 1 for u in self.S.units1_of(t))
        self._dispatch(node)
        if not before:
            return
        out = self.env.get(node.name)
        after = set()
        for v in out if isinstance(out, list) else [out]:
            if isinstance(v, tuple) and (not v or v[0] != "buffer"):
                after.update(u for t in v if isinstance(t, tuple) for u in self.S.units1_of(t))
        for u in before:
            if self.S.find(u) not in after and self.S.is_unit1(u):
                self.S.pin(u)

    def _dispatch(self, node: fx.Node) -> None:
        name = _opname(node)
        base = _base(name)
        if base in NO_OUTPUT or node.meta.get("val") is None and name != "getitem":
            self.env[node.name] = None
            return
        if name == "getitem":
            src = self.val(node.args[0])
            self.env[node.name] = src[node.args[1]] if isinstance(src, list) else None
            if isinstance(src, list) and node.args[0].name in self.prov_list:
                self.prov[node.name] = self.prov_list[node.args[0].name][node.args[1]]
            return
        if not isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)):
            if base in ("_local_scalar_dense", "item"):  # a value read out of a neuron dim steers nothing else
                for a in node.all_input_nodes:
                    self._pin_val(self.tval(a))
            self.env[node.name] = None
            return
        inputs = [a for a in node.all_input_nodes if self.val(a) is not None]
        if not any(self.has_atoms(self.val(a)) or self.is_param(a) for a in inputs):
            self.env[node.name] = self.out_val(node)
            return
        if self.S.copies and base not in _SELECTOR_SAFE:
            self._stale_selectors(inputs)
        handler = getattr(self, f"op_{base}", None)
        if handler is not None:
            handler(node)
            return
        if base in ACTIVATIONS or base in UNARY:
            self._unary(node, base)
            return
        if base in ELEMENTWISE:
            self._elementwise(node, base)
            return
        if base == "fill" or base == "zero":
            self._unary(node, base)
            return
        if base in VIEWS:
            self._view(node)
            return
        if base in PERMUTES:
            self._permute(node, base)
            return
        if base in POOLS:
            self._pool(node)
            return
        if base in SOFTMAX:
            self._softmax(node, base)
            return
        if base in REDUCTIONS:
            self._reduce(node, base)
            return
        if base in INDEX_ALONG:
            self._index_along(node, base)
            return
        if base in SCATTERS:
            for a in inputs:
                self._pin_val(self.tval(a))
            self.env[node.name] = self.out_val(node)
            return
        raise self.unsupported(node, "this op touches a neuron dimension and pyfusion.graph has no rule for it")

    # ---- generic rules ----------------------------------------------------------------------------
    def _unary(self, node: fx.Node, base: str) -> None:
        x = node.args[0]
        v = self.tval(x)
        out = node.meta.get("val")
        if isinstance(out, (list, tuple)):  # native_dropout, log_sigmoid_forward: (out, mask / buffer)
            fixed = self.out_val(node)
            self.env[node.name] = [v if self.vshape(o) == self.shape(x) else fixed[i] for i, o in enumerate(out)]
        else:
            self.env[node.name] = v
            self._keep_prov(node, x)
        if base in ACTIVATIONS:
            self._record_act(node, base, v)

    def _keep_prov(self, node: fx.Node, x: Any) -> None:
        """A parameter transformed alone (cast, scaled by a number) is still that parameter for its consumers."""
        if isinstance(x, fx.Node) and x.name in self.prov and self.shape(node) == self.shape(x):
            if not any(self.is_param(a) for a in node.all_input_nodes if a is not x):
                if not any(isinstance(a, fx.Node) and self.val(a) is not None for a in node.all_input_nodes
                           if a is not x):  # fmt: skip
                    self.prov[node.name] = self.prov[x.name]

    def op_type_as(self, node: fx.Node) -> None:
        self.env[node.name] = self.tval(node.args[0])
        self._keep_prov(node, node.args[0])

    def _record_act(self, node: fx.Node, op: str, v: Any) -> None:
        if v is None or not v:
            return
        nd = len(v)
        dim = 1 if nd == 4 else nd - 1
        term = v[dim] if nd > 1 else v[0]
        self.acts.append(_Act(node.name, op, term, self.module_of(node), self.order[node.name]))
        self.recs.append(_Rec(node.name, "post", dim - nd, term, None, self.order[node.name]))

    def _elementwise(self, node: fx.Node, base: str, operands: Sequence[Any] | None = None) -> None:
        if operands is None:
            operands = [a for a in node.args if isinstance(a, fx.Node)]
            operands += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
        # an operand expanded to the output's shape broadcasts like its source (``x / norm.expand_as(x)`` in
        # F.normalize): read the source, whose size-1 dims constrain nothing, not the expanded copies
        operands = [self._through_expand(a) for a in operands]
        out_shape = self.shape(node)
        vals = []
        for a in operands:
            v = self.tval(a)
            s = self.shape(a)
            if v is None or s is None:
                continue
            vals.append((a, v, s))
        nd = len(out_shape)
        # a parameter combined with activations is a per-neuron parameter; a parameter transformed alone (scaled,
        # exponentiated) stays that parameter for its later use (its provenance is kept below)
        mixes = any(not self.is_param(a) for a, _, _ in vals)
        out: list[Term] = []
        for d in range(nd):
            size = out_shape[d]
            terms = []
            broadcast = []  # parameters the same along this dim
            for a, v, s in vals:
                k = d - (nd - len(s))
                if k >= 0 and s[k] == 1 and self.S.units1_of(v[k]):
                    if size == 1:  # one head against one head (or a broadcast constant): the same unit
                        terms.append(v[k])
                    else:  # one head broadcast against several: its copies would not follow a widening
                        self.S.pin_term(v[k])
                    continue
                if k < 0 or s[k] == 1 or size == 1:
                    if size > 1 and mixes and self.is_param(a):
                        broadcast.append((a, None))
                    continue
                terms.append(v[k])
                if self.is_param(a) and mixes:
                    self.use(node, a, k, "neuron")
                    broadcast.append((a, k))  # an expanded parameter: indexed in shape, not in its own axes
            if not terms:
                out.append(() if size == 1 else (-size,))
                continue
            for t in terms[1:]:
                self.S.unify(terms[0], t)
            out.append(terms[0])
            for a, k in broadcast:
                self.broadcast(node, a, k, terms[0])
        self.env[node.name] = tuple(out)
        if len(vals) == 1:
            self._keep_prov(node, vals[0][0])
        # per-neuron parameters applied to activations (and residual sums of two groups) are pre-activation capture
        # points; a parameter transformed alone (Gemma's RMSNorm scale ``1 + weight``) holds no samples
        params = [a for a, _, _ in vals if self.is_param(a)]
        acts = [a for a, v, _ in vals if not self.is_param(a) and self.has_atoms(v)]
        residual = base in ("add", "sub") and len(acts) >= 2 and not params
        if residual or params and acts and base in ("mul", "add", "div"):
            dim = 1 if nd == 4 else nd - 1
            if nd >= 1 and self.S.atoms(out[dim]):
                region_in = self._region_input(node) if params else None
                sup = [self._back(a) for a in acts] + ([self._back(region_in)] if region_in is not None else [])
                self.recs.append(_Rec(node.name, "pre", dim - nd, out[dim], None, self.order[node.name], sup))

    def _through_expand(self, a: Any) -> Any:
        """The source of a chain of ``expand`` / ``expand_as`` / ``broadcast_to`` nodes (``a`` itself otherwise)."""
        while (
            isinstance(a, fx.Node)
            and a.op == "call_function"
            and _base(_opname(a)) in ("expand", "expand_as", "broadcast_to", "expand_copy")
            and isinstance(a.args[0], fx.Node)
            and self.val(a.args[0]) is not None
        ):
            a = a.args[0]
        return a

    def _back(self, a: Any) -> str:
        """Follow value-preserving ops back to the node that produced the value."""
        while isinstance(a, fx.Node) and _opname(a) in PASS_BACK and a.args and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        return a.name if isinstance(a, fx.Node) else ""

    def _view(self, node: fx.Node) -> None:
        x = node.args[0]
        v = self.tval(x)
        s_in, s_out = self.shape(x), self.shape(node)
        base = _base(_opname(node))
        if base == "unsqueeze" and len(s_out) == len(s_in) + 1:  # the new dim is known: nothing moves
            d = node.args[1] % len(s_out)
            self.env[node.name] = tuple(v[:d]) + ((),) + tuple(v[d:])
        else:
            if base == "squeeze":  # a head squeezed away is not a heads axis a widening could follow
                for t, n in zip(v, s_in):
                    if n == 1:
                        self.S.pin_term(t)
            heads = base in ("view", "_unsafe_view", "reshape", "unflatten", "view_copy", "_reshape_alias")
            self.env[node.name] = self.S.reshape(v, s_in, s_out, heads=heads)
        if x.name in self.prov:  # a view that only adds / removes size-1 dims keeps the parameter's axes
            if [s for s in s_in if s != 1] == [s for s in s_out if s != 1]:
                tkey, axes = self.prov[x.name]
                real = [a for a, s in zip(axes, s_in) if s != 1]
                it = iter(real)
                self.prov[node.name] = (tkey, tuple(next(it) if s != 1 else None for s in s_out))

    def _permute(self, node: fx.Node, base: str) -> None:
        x = node.args[0]
        v = self.tval(x)
        nd = len(v)
        b = _bind(node)
        if base == "permute":
            perm = [d % nd for d in b["dims"]]
        elif base in ("transpose", "swapaxes", "swapdims"):
            d0, d1 = (node.args[1] % nd, node.args[2] % nd) if nd else (0, 0)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif base in ("t", "numpy_T", "mT", "adjoint"):
            perm = list(range(nd))
            if nd >= 2:
                perm[-1], perm[-2] = perm[-2], perm[-1]
            if base == "numpy_T":
                perm = list(reversed(range(nd)))
        else:  # movedim
            src, dst = b["source"], b["destination"]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % nd for s in src], [d % nd for d in dst]
            rest = [d for d in range(nd) if d not in src]
            perm = [None] * nd
            for s_, d_ in zip(src, dst):
                perm[d_] = s_
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
        self.env[node.name] = tuple(v[p] for p in perm)
        if x.name in self.prov:
            tkey, axes = self.prov[x.name]
            self.prov[node.name] = (tkey, tuple(axes[p] for p in perm))

    def op_expand(self, node: fx.Node) -> None:
        x = node.args[0]
        v = self.tval(x)
        s_in, s_out = self.shape(x), self.shape(node)
        lead = len(s_out) - len(s_in)
        out = []
        for d, so in enumerate(s_out):
            k = d - lead
            if k < 0:
                out.append((-so,) if so > 1 else ())
            elif s_in[k] == so:
                out.append(v[k])
            else:  # a broadcast dim of size 1 expanded: copies (of one head: they would not follow a widening)
                self.S.pin_term(v[k])
                out.append((-so,))
        self.env[node.name] = tuple(out)
        if x.name in self.prov:
            tkey, axes = self.prov[x.name]
            self.prov[node.name] = (tkey, tuple(None if d < lead or s_in[d - lead] != so else axes[d - lead]
                                                for d, so in enumerate(s_out)))  # fmt: skip

    op_expand_copy = op_expand
    op_expand_as = op_expand  # F.normalize divides by ``norm.clamp_min(eps).expand_as(x)``
    op_broadcast_to = op_expand

    def op_repeat(self, node: fx.Node) -> None:
        x = node.args[0]
        v = self.tval(x)
        reps = list(node.args[1])
        s_in = self.shape(x)
        lead = len(reps) - len(s_in)
        out = []
        for d, r in enumerate(reps):
            k = d - lead
            if k < 0:
                out.append((-r,) if r > 1 else ())
            elif r == 1:
                out.append(v[k])
            else:  # r concatenated copies of the dim
                out.append(self.S.sum_term([v[k]] * r))
        self.env[node.name] = tuple(out)

    op_tile = op_repeat

    def op_repeat_interleave(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b.get("self")
        reps, dim = b.get("repeats"), b.get("dim")
        if not isinstance(x, fx.Node) or not isinstance(reps, int) or dim is None:
            raise self.unsupported(node, "repeat_interleave with tensor repeats or without dim")
        v = list(self.tval(x))
        dim %= len(v)
        v[dim] = tuple(v[dim]) + ((-reps,) if reps > 1 else ())
        self.env[node.name] = tuple(v)

    def _pool(self, node: fx.Node) -> None:
        x = node.args[0]
        v = self.tval(x)
        s_in = self.shape(x)
        out = node.meta.get("val")
        outs = out if isinstance(out, (list, tuple)) else [out]
        res = []
        nsp = 1 if "1d" in _opname(node) else 3 if "3d" in _opname(node) else 2
        for t in v[len(v) - nsp :]:  # the windows slide over positions: a Linear viewed as a map keeps its order
            self.S.pin_term(t)
        for o in outs:
            so = self.vshape(o)
            # channels pass, spatial dims are positions
            terms = []
            for d, s in enumerate(so):
                k = d - (len(so) - len(s_in))
                if d < len(so) - nsp and k >= 0 and s_in[k] == s:
                    terms.append(v[k])
                else:
                    terms.append((-s,) if s > 1 else ())
            res.append(tuple(terms))
        self.env[node.name] = res if isinstance(out, (list, tuple)) else res[0]

    def _softmax(self, node: fx.Node, base: str) -> None:
        x = node.args[0]
        v = self.tval(x)
        dim = node.args[1] % len(v)
        self._normalizer(node, base, v, [dim])
        self.env[node.name] = v

    def _normalizer(self, node: fx.Node, op: str, v: tuple, dims: list[int]) -> None:
        terms = [v[d] for d in dims]
        if any(self.S.atoms(t) for t in terms):
            nd = len(v)
            self.norms.append(
                _Norm(node.name, self.module_of(node), op, terms, [d - nd for d in dims], nd, self.order[node.name])
            )

    def _reduce(self, node: fx.Node, base: str) -> None:
        b = _bind(node)
        x = b.get("self", node.args[0])
        v = self.tval(x)
        nd = len(v)
        out = node.meta.get("val")
        if base in ("max", "min") and len([a for a in node.args if isinstance(a, fx.Node)]) > 1:
            return self._elementwise(node, base)
        dim = b.get("dim")
        if dim is None or dim == []:
            dims = list(range(nd))
        else:
            dims = [d % nd for d in ([dim] if isinstance(dim, int) else dim)]
        keep = bool(b.get("keepdim", False))
        if base in ("max", "min") and isinstance(out, (list, tuple)):
            for d in dims:  # values and indices: the index depends on the neuron order
                self.S.pin_term(v[d])
        else:
            self._normalizer(node, base, v, dims)
        terms = [(() if d in dims else v[d]) for d in range(nd)] if keep else [v[d] for d in range(nd) if d not in dims]
        res = tuple(terms)
        self.env[node.name] = [res for _ in out] if isinstance(out, (list, tuple)) else res

    def _index_along(self, node: fx.Node, base: str) -> None:
        b = _bind(node)
        x = b.get("self", node.args[0])
        v = self.tval(x)
        nd = len(v)
        dim = b.get("dim", b.get("dims", -1))
        if dim is None:
            dims = list(range(nd))
        else:
            dims = [d % nd for d in ([dim] if isinstance(dim, int) else dim)] if nd else []
        if base == "roll" and b.get("dims") in (None, []):
            dims = list(range(nd))
        for d in dims:
            self.S.pin_term(v[d])
        out = node.meta.get("val")
        outs = out if isinstance(out, (list, tuple)) else [out]
        res = []
        for o in outs:
            so = self.vshape(o)
            if so is None:
                res.append(None)
                continue
            if len(so) == nd:
                res.append(tuple(v[d] if so[d] == self.shape(x)[d] and d not in dims else ((-so[d],) if so[d] > 1
                                 else ()) for d in range(nd)))  # fmt: skip
            else:
                res.append(self.fixed(so))
        self.env[node.name] = res if isinstance(out, (list, tuple)) else res[0]

    # ---- structural ops -----------------------------------------------------------------------------
    def op_cat(self, node: fx.Node) -> None:
        tensors = [a for a in node.args[0] if isinstance(a, fx.Node)]
        dim = _bind(node).get("dim", 0)
        out_shape = self.shape(node)
        nd = len(out_shape)
        dim %= nd
        for a in tensors:  # a parameter concatenated in: it produces the cat-dim entries, per neuron elsewhere
            if self.is_param(a) and self.shape(a) is not None and len(self.shape(a)) == nd:
                for d in range(nd):
                    self.use(node, a, d, "producer" if d == dim else "neuron")
        vals = [(self.tval(a), self.shape(a)) for a in tensors]
        vals = [(v, s) for v, s in vals if s is not None and len(s) == nd and s[dim] > 0]
        out = []
        for d in range(nd):
            if d == dim:
                out.append(self.S.sum_term([v[d] for v, _ in vals]))
                continue
            if out_shape[d] == 1:  # one head in every piece (rotary's rotate_half) is one unit; else none
                terms = [v[d] for v, s in vals if self.S.units1_of(v[d])]
                if terms and len(terms) < len(vals):
                    for t in terms:
                        self.S.pin_term(t)
                    terms = []
            else:
                terms = [v[d] for v, s in vals if s[d] > 1]
            for t in terms[1:]:
                self.S.unify(terms[0], t)
            out.append(terms[0] if terms else ())
        self.env[node.name] = tuple(out)

    op_concat = op_cat
    op_concatenate = op_cat

    def op_stack(self, node: fx.Node) -> None:
        tensors = [a for a in node.args[0] if isinstance(a, fx.Node)]
        dim = _bind(node).get("dim", 0)
        out_shape = self.shape(node)
        dim %= len(out_shape)
        for a in tensors:
            if self.is_param(a):
                for d in range(len(self.shape(a))):
                    self.use(node, a, d, "neuron")
        vals = [self.tval(a) for a in tensors]
        nd = len(vals[0])
        base = []
        for d in range(nd):
            terms = [v[d] for v in vals]
            for t in terms[1:]:
                self.S.unify(terms[0], t)
            base.append(terms[0])
        k = len(tensors)
        base.insert(dim, (-k,) if k > 1 else ())
        self.env[node.name] = tuple(base)

    def _pieces(self, node: fx.Node, x: fx.Node, dim: int, pieces: list[tuple[int, int]], squeeze: bool) -> list:
        v = list(self.tval(x))
        nd = len(v)
        dim %= nd
        term = v[dim]
        f = self.S.packed_factor(term) if all(hi - lo == 1 for lo, hi in pieces) else None
        outs = []
        if f is not None:
            for lo, _hi in pieces:
                sub = self.S.select_packed(f, lo)
                terms = [self.S.substitute(t, sub) if d != dim else () for d, t in enumerate(v)]
                if squeeze:
                    terms.pop(dim)
                outs.append(tuple(terms))
            return outs
        cut = self.S.cut(term, pieces)
        for t in cut:
            terms = list(v)
            terms[dim] = t
            if squeeze:
                terms.pop(dim)
            outs.append(tuple(terms))
        return outs

    def op_select(self, node: fx.Node) -> None:
        x, dim, idx = node.args[0], node.args[1], node.args[2]
        size = self.shape(x)[dim]
        idx %= size
        self.env[node.name] = self._pieces(node, x, dim, [(idx, idx + 1)], True)[0]
        self._slice_prov(node, x, dim, drop=True)

    def _slice_prov(self, node: fx.Node, x: Any, dim: int, drop: bool) -> None:
        if isinstance(x, fx.Node) and x.name in self.prov:
            tkey, axes = self.prov[x.name]
            axes = list(axes)
            dim %= len(axes)
            if drop:
                axes.pop(dim)
            self.prov[node.name] = (tkey, tuple(axes))

    def op_slice(self, node: fx.Node) -> None:
        b = _bind(node)
        x, dim = b["self"], b.get("dim", 0)
        size = self.shape(x)[dim]
        start, end, step = b.get("start"), b.get("end"), b.get("step", 1)
        start = 0 if start is None else start
        end = size if end is None else end
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(start, min(size, end + size if end < 0 else end))
        if start == 0 and end == size and step == 1:
            self.env[node.name] = self.tval(x)
            if x.name in self.prov:
                self.prov[node.name] = self.prov[x.name]
            return
        if step != 1:
            v = list(self.tval(x))
            self.S.pin_term(v[dim % len(v)])
            v[dim % len(v)] = (-self.shape(node)[dim],)
            self.env[node.name] = tuple(v)
            return
        self.env[node.name] = self._pieces(node, x, dim, [(start, end)], False)[0]
        self._slice_prov(node, x, dim, drop=False)

    def op_narrow(self, node: fx.Node) -> None:
        x, dim, start, length = node.args[:4]
        if not isinstance(start, int):
            raise self.unsupported(node, "narrow with a tensor start")
        size = self.shape(x)[dim]
        start %= size
        self.env[node.name] = self._pieces(node, x, dim, [(start, start + length)], False)[0]
        self._slice_prov(node, x, dim, drop=False)

    def _split_common(self, node: fx.Node, x: fx.Node, dim: int, sizes: list[int], squeeze: bool = False) -> None:
        pieces, pos = [], 0
        for s in sizes:
            pieces.append((pos, pos + s))
            pos += s
        self.env[node.name] = self._pieces(node, x, dim, pieces, squeeze)
        if x.name in self.prov:
            tkey, axes = self.prov[x.name]
            axes = list(axes)
            if squeeze:
                axes.pop(dim % len(axes))
            self.prov_list[node.name] = [(tkey, tuple(axes))] * len(sizes)

    def op_split(self, node: fx.Node) -> None:
        b = _bind(node)
        x, dim = b["self"], b.get("dim", 0)
        size = self.shape(x)[dim]
        ss = b["split_size"] if "split_size" in b else b.get("split_sizes")
        if isinstance(ss, int):
            sizes = [min(ss, size - i) for i in range(0, size, ss)]
        else:
            sizes = list(ss)
        self._split_common(node, x, dim, sizes)

    op_split_with_sizes = op_split
    op_unsafe_split = op_split

    def op_chunk(self, node: fx.Node) -> None:
        x, chunks = node.args[0], node.args[1]
        dim = _bind(node).get("dim", 0)
        size = self.shape(x)[dim]
        step = -(-size // chunks)
        sizes = [min(step, size - i) for i in range(0, size, step)]
        self._split_common(node, x, dim, sizes)

    def op_unbind(self, node: fx.Node) -> None:
        x = node.args[0]
        dim = _bind(node).get("dim", 0)
        size = self.shape(x)[dim]
        self._split_common(node, x, dim, [1] * size, squeeze=True)

    def op_index(self, node: fx.Node) -> None:
        x, indices = node.args[0], node.args[1]
        v = self.tval(x)
        idx_dims: list[int] = []  # a boolean mask covers as many dims as it has (``hidden[eos_mask, :]``: 2)
        d = 0
        for i in indices:
            val = i.meta.get("val") if isinstance(i, fx.Node) else None
            span = val.dim() if isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8) else 1
            if i is not None:
                idx_dims += range(d, d + span)
            d += span
        for d in idx_dims:
            self.S.pin_term(v[d])
        for i in indices:
            if isinstance(i, fx.Node) and self.has_atoms(self.tval(i)):
                self._pin_val(self.tval(i))
        rest = [d for d in range(len(v)) if d not in idx_dims]
        if self.is_param(x):  # a table indexed by ids (an embedding written by hand): rows produce the values
            for d in rest:
                self.use(node, x, d, "producer")
        out_shape = self.shape(node)
        n_idx = len(out_shape) - len(rest)
        adjacent = idx_dims == list(range(idx_dims[0], idx_dims[-1] + 1)) if idx_dims else True
        terms: list[Term] = []
        if adjacent and idx_dims:
            before = [d for d in rest if d < idx_dims[0]]
            after = [d for d in rest if d > idx_dims[-1]]
            terms = [v[d] for d in before] + [None] * n_idx + [v[d] for d in after]  # type: ignore[list-item]
        else:
            terms = [None] * n_idx + [v[d] for d in rest]  # type: ignore[list-item]
        self.env[node.name] = tuple(t if t is not None else ((-s,) if s > 1 else ()) for t, s in zip(terms, out_shape))

    def op_index_select(self, node: fx.Node) -> None:
        x, dim = node.args[0], node.args[1]
        v = list(self.tval(x))
        dim %= len(v)
        self.S.pin_term(v[dim])
        s = self.shape(node)[dim]
        v[dim] = (-s,) if s > 1 else ()
        self.env[node.name] = tuple(v)

    def op_gather(self, node: fx.Node) -> None:
        for a in node.all_input_nodes:
            self._pin_val(self.tval(a))
        self.env[node.name] = self.out_val(node)

    op_take_along_dim = op_gather
    op__local_scalar_dense = op_gather

    def op_constant_pad_nd(self, node: fx.Node) -> None:
        x = node.args[0]
        v = list(self.tval(x))
        pad = list(node.args[1])
        s_out = self.shape(node)
        for i in range(len(pad) // 2):
            d = len(v) - 1 - i
            if pad[2 * i] or pad[2 * i + 1]:
                self.S.pin_term(v[d])
                v[d] = (-s_out[d],) if s_out[d] > 1 else ()
        self.env[node.name] = tuple(v)

    op_pad = op_constant_pad_nd
    op_reflection_pad1d = op_constant_pad_nd
    op_reflection_pad2d = op_constant_pad_nd
    op_replication_pad1d = op_constant_pad_nd
    op_replication_pad2d = op_constant_pad_nd

    # ---- parameters -----------------------------------------------------------------------------------
    def _contract(
        self, node: fx.Node, ops: list[Any], specs: list[str], out_spec: str, capture: bool = True
    ) -> tuple[Term, ...]:
        """Einsum-style contraction of ``ops`` (fx nodes) with per-operand index strings (one char per dim)."""
        vals = [self.tval(a) for a in ops]
        shapes = [self.shape(a) for a in ops]
        letters: dict[str, list[tuple[int, int]]] = {}
        for i, spec in enumerate(specs):
            for d, c in enumerate(spec):
                if shapes[i][d] != 1:
                    letters.setdefault(c, []).append((i, d))
        for occ in letters.values():
            for i, d in occ[1:]:
                self.S.unify(vals[occ[0][0]][occ[0][1]], vals[i][d])
        params = [i for i, a in enumerate(ops) if self.is_param(a)]
        if len(params) > 1:
            raise self.unsupported(node, "a product of two parameters (fold them into one weight first)")
        if not params:  # activations against activations (q @ k^T): a summed dim cannot be widened
            for c, occ in letters.items():
                if c not in out_spec and len({i for i, _ in occ}) > 1:
                    self.contracted.append((node.name, vals[occ[0][0]][occ[0][1]]))
        for i in params:
            for d, c in enumerate(specs[i]):
                if shapes[i][d] == 1:
                    continue
                others = [j for j, _ in letters.get(c, []) if j != i]
                if c not in out_spec:
                    self.use(node, ops[i], d, "consumer")
                    if capture:
                        for j, dj in letters[c]:
                            if j != i:
                                nd = len(vals[j])
                                self.recs.append(
                                    _Rec(ops[j].name, "input", dj - nd, vals[j][dj], None, self.order[node.name])
                                )
                elif not others:
                    self.use(node, ops[i], d, "producer")
                else:
                    raise self.unsupported(node, "a parameter axis that is also a batch axis of the product")
        out = []
        out_shape = self.shape(node)
        for d, c in enumerate(out_spec):
            occ = letters.get(c)
            if not occ and out_shape[d] == 1:  # a batch dim of one head in every operand: the same unit
                heads = [vals[i][k] for i, spec in enumerate(specs) for k, ch in enumerate(spec)
                         if ch == c and self.S.units1_of(vals[i][k])]  # fmt: skip
                for t in heads[1:]:
                    self.S.unify(heads[0], t)
                if heads:
                    out.append(heads[0])
                    continue
            out.append(vals[occ[0][0]][occ[0][1]] if occ else ((-out_shape[d],) if out_shape[d] > 1 else ()))
        return tuple(out)

    def _pre(self, node: fx.Node, v: tuple, dim: int) -> None:
        nd = len(v)
        dim %= nd
        if self.S.atoms(v[dim]):
            self.recs.append(_Rec(node.name, "pre", dim - nd, v[dim], None, self.order[node.name]))

    def _bias(self, node: fx.Node, bias: Any, out: tuple, dim: int = -1, role: str = "producer") -> None:
        if not isinstance(bias, fx.Node):
            return
        bv, bs = self.tval(bias), self.shape(bias)
        nd = len(out)
        for k in range(len(bs)):
            d = nd - len(bs) + k
            if bs[k] > 1:
                self.S.unify(out[d], bv[k])
                if self.is_param(bias):
                    self.use(node, bias, k, role)

    def op_linear(self, node: fx.Node) -> None:
        b = _bind(node)
        x, w = b["input"], b["weight"]
        nd = len(self.shape(x))
        letters = "abcdefghijklmnopqrstuvwxy"[: nd - 1]
        out = self._contract(node, [x, w], [letters + "z", "Oz"], letters + "O")
        self._bias(node, b.get("bias"), out)
        self.env[node.name] = out
        self._pre(node, out, -1)

    def op_mm(self, node: fx.Node) -> None:
        out = self._contract(node, [node.args[0], node.args[1]], ["nk", "km"], "nm")
        self.env[node.name] = out
        if any(self.is_param(a) for a in node.args[:2]):
            self._pre(node, out, -1 if self.is_param(node.args[1]) else 0)

    def op_addmm(self, node: fx.Node) -> None:
        bias, a, c = node.args[0], node.args[1], node.args[2]
        out = self._contract(node, [a, c], ["nk", "km"], "nm")
        self._bias(node, bias, out)
        self.env[node.name] = out
        if self.is_param(c) or self.is_param(a):
            self._pre(node, out, -1 if self.is_param(c) else 0)

    def op_bmm(self, node: fx.Node) -> None:
        self.env[node.name] = self._contract(node, [node.args[0], node.args[1]], ["bnk", "bkm"], "bnm")

    def op_baddbmm(self, node: fx.Node) -> None:
        out = self._contract(node, [node.args[1], node.args[2]], ["bnk", "bkm"], "bnm")
        self._bias(node, node.args[0], out)
        self.env[node.name] = out

    def op_matmul(self, node: fx.Node) -> None:
        a, c = node.args[0], node.args[1]
        sa, sc = self.shape(a), self.shape(c)
        pool = iter("abcdefghijlmnopqrstuvwxy")
        if len(sa) == 1 and len(sc) == 1:
            out = self._contract(node, [a, c], ["k", "k"], "")
        elif len(sc) == 1:
            batch = "".join(next(pool) for _ in range(len(sa) - 1))
            out = self._contract(node, [a, c], [batch + "k", "k"], batch)
        elif len(sa) == 1:
            batch = "".join(next(pool) for _ in range(len(sc) - 2))
            out = self._contract(node, [a, c], ["k", batch + "kM"], batch + "M")
        else:
            nb = max(len(sa), len(sc)) - 2
            batch = "".join(next(pool) for _ in range(nb))
            ba, bc = batch[nb - (len(sa) - 2) :], batch[nb - (len(sc) - 2) :]
            out = self._contract(node, [a, c], [ba + "Nk", bc + "kM"], batch + "NM")
        self.env[node.name] = out
        if self.is_param(c):
            self._pre(node, out, -1)

    def op_mv(self, node: fx.Node) -> None:
        self.env[node.name] = self._contract(node, [node.args[0], node.args[1]], ["nk", "k"], "n")

    def op_dot(self, node: fx.Node) -> None:
        self.env[node.name] = self._contract(node, [node.args[0], node.args[1]], ["k", "k"], "")

    op_vdot = op_dot

    def op_einsum(self, node: fx.Node) -> None:
        eq, ops = node.args[0], list(node.args[1])
        eq = eq.replace(" ", "")
        if "..." in eq:
            raise self.unsupported(node, "einsum with an ellipsis")
        lhs, _, rhs = eq.partition("->")
        specs = lhs.split(",")
        if not _:
            rhs = "".join(sorted(c for c in set(lhs.replace(",", "")) if lhs.replace(",", "").count(c) == 1))
        self.env[node.name] = self._contract(node, ops, specs, rhs)

    def op_convolution(self, node: fx.Node) -> None:
        b = _bind(node)
        self._conv(node, b["input"], b["weight"], b.get("bias"), int(b.get("groups", 1)), bool(b.get("transposed")))

    def op_conv1d(self, node: fx.Node) -> None:
        b = _bind(node)
        self._conv(node, b["input"], b["weight"], b.get("bias"), int(b.get("groups", 1)), False)

    op_conv2d = op_conv1d
    op_conv3d = op_conv1d

    def op_conv_transpose1d(self, node: fx.Node) -> None:
        b = _bind(node)
        self._conv(node, b["input"], b["weight"], b.get("bias"), int(b.get("groups", 1)), True)

    op_conv_transpose2d = op_conv_transpose1d
    op_conv_transpose3d = op_conv_transpose1d
    op__convolution = op_convolution

    def _conv(self, node: fx.Node, x: Any, w: Any, bias: Any, groups: int, transposed: bool) -> None:
        xv, wv = self.tval(x), self.tval(w)
        out_shape = self.shape(node)
        ws = self.shape(w)
        c_in = self.shape(x)[1]
        o_ax, i_ax = (1, 0) if transposed else (0, 1)
        if groups == 1:
            self.S.unify(wv[i_ax], xv[1])
            if self.is_param(w):
                self.use(node, w, i_ax, "consumer")
                self.recs.append(_Rec(x.name, "input", 1 - len(xv), xv[1], None, self.order[node.name]))
                self.use(node, w, o_ax, "producer")
            out_c = wv[o_ax]
            role = "producer"
        elif groups == c_in and not transposed and ws[1] == 1 and ws[0] == c_in:
            self.S.unify(wv[0], xv[1])  # depthwise: each output channel reads its own input channel
            if self.is_param(w):
                self.use(node, w, 0, "neuron")
            out_c = xv[1]
            role = "neuron"
        else:
            raise self.unsupported(node, f"grouped convolutions (groups={groups}) mix channel blocks")
        for k in range(2, len(ws)):  # kernel taps are not neurons
            self.S.pin_term(wv[k])
        for k in range(2, len(xv)):  # nor are the positions the taps slide over (a Linear viewed as a feature map)
            self.S.pin_term(xv[k])
        out = (self.fixed(out_shape[:1])[0],) + (out_c,) + self.fixed(out_shape[2:])
        self._bias(node, bias, out[:2], dim=1, role=role)
        self.env[node.name] = out
        self._pre(node, out, 1)

    def op_embedding(self, node: fx.Node) -> None:
        b = _bind(node)
        w, idx = b["weight"], b["indices"]
        wv = self.tval(w)
        self.S.pin_term(wv[0])  # the vocabulary is indexed by the (fixed) token ids
        if self.has_atoms(self.tval(idx)):
            self._pin_val(self.tval(idx))
        if self.is_param(w):
            self.use(node, w, 1, "producer")
        iv = self.tval(idx)
        out = tuple(iv) + (wv[1],)
        self.env[node.name] = out
        self._pre(node, out, -1)

    def op_layer_norm(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b["input"]
        v = self.tval(x)
        k = len(b["normalized_shape"])
        dims = list(range(len(v) - k, len(v)))
        for name in ("weight", "bias"):
            p = b.get(name)
            if isinstance(p, fx.Node):
                pv = self.tval(p)
                for j, d in enumerate(dims):
                    if self.shape(p)[j] > 1:
                        self.S.unify(pv[j], v[d])
                        self.use(node, p, j, "neuron")
                self._norm_broadcast(node, p, v, dims)
        self._normalizer(node, _opname(node), v, dims)
        out = node.meta.get("val")
        if isinstance(out, (list, tuple)):
            stat = tuple(() if d in dims else v[d] for d in range(len(v)))
            self.env[node.name] = [v] + [stat] * (len(out) - 1)
        else:
            self.env[node.name] = v
        self.recs.append(_Rec(node.name, "pre", -1, v[-1], None, self.order[node.name], [self._back(x)]))

    op_native_layer_norm = op_layer_norm

    def _norm_broadcast(self, node: fx.Node, p: fx.Node, v: tuple, dims: list[int]) -> None:
        """A norm's weight / bias is the same along every dim it does not normalize (Phi's ``q_layernorm`` over
        the head dim, applied to every head)."""
        for d in range(len(v)):
            if d not in dims:
                self.broadcast(node, p, None, v[d])

    def op_rms_norm(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b["input"]
        v = self.tval(x)
        k = len(b["normalized_shape"])
        dims = list(range(len(v) - k, len(v)))
        p = b.get("weight")
        if isinstance(p, fx.Node):
            pv = self.tval(p)
            for j, d in enumerate(dims):
                if self.shape(p)[j] > 1:
                    self.S.unify(pv[j], v[d])
                    self.use(node, p, j, "neuron")
            self._norm_broadcast(node, p, v, dims)
        self._normalizer(node, "rms_norm", v, dims)
        out = node.meta.get("val")
        if isinstance(out, (list, tuple)):
            self.env[node.name] = [v, tuple(() if d in dims else v[d] for d in range(len(v)))]
        else:
            self.env[node.name] = v
        self.recs.append(_Rec(node.name, "pre", -1, v[-1], None, self.order[node.name], [self._back(x)]))

    op__fused_rms_norm = op_rms_norm

    def _per_channel(self, node: fx.Node, x: Any, names: dict[str, Any]) -> tuple:
        v = self.tval(x)
        for p in names.values():
            if not isinstance(p, fx.Node):
                continue
            if self.shape(p)[0] > 1:
                val = self.val(p)
                if isinstance(val, tuple) and len(val) == 2 and val[0] == "buffer":
                    terms = self.reg[val[1]]
                    if terms[0] is None:
                        terms[0] = v[1]
                    else:
                        self.S.unify(terms[0], v[1])
                    self.use(node, p, 0, "neuron")
                else:
                    self.S.unify(self.tval(p)[0], v[1])
                    self.use(node, p, 0, "neuron")
        return v

    def op_batch_norm(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b["input"]
        ps = {k: b.get(k) for k in ("weight", "bias", "running_mean", "running_var")}
        v = self._per_channel(node, x, ps)
        out = node.meta.get("val")
        if isinstance(out, (list, tuple)):
            res: Any = [v] + [self.fixed(self.vshape(o)) if self.vshape(o) is not None else None for o in out[1:]]
            for i, o in enumerate(out[1:], start=1):
                if self.vshape(o) is not None and len(self.vshape(o)) == 1 and self.vshape(o)[0] == self.shape(x)[1]:
                    res[i] = (v[1],)
            self.env[node.name] = res
        else:
            self.env[node.name] = v
        self.recs.append(_Rec(node.name, "pre", 1 - len(v), v[1], None, self.order[node.name], [self._back(x)]))

    op__native_batch_norm_legit_no_training = op_batch_norm
    op__native_batch_norm_legit = op_batch_norm
    op__native_batch_norm_legit_functional = op_batch_norm
    op_native_batch_norm = op_batch_norm
    op_cudnn_batch_norm = op_batch_norm

    def op_instance_norm(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b["input"]
        v = self._per_channel(node, x, {k: b.get(k) for k in ("weight", "bias")})
        for k in ("running_mean", "running_var"):
            if isinstance(b.get(k), fx.Node):
                self._per_channel(node, x, {k: b.get(k)})
        self.env[node.name] = v
        self.recs.append(_Rec(node.name, "pre", 1 - len(v), v[1], None, self.order[node.name], [self._back(x)]))

    def op_group_norm(self, node: fx.Node) -> None:
        b = _bind(node)
        x = b["input"]
        g = int(b["num_groups"])
        c = self.shape(x)[1]
        v = self.tval(x)
        if g == c:
            self._per_channel(node, x, {k: b.get(k) for k in ("weight", "bias")})
        elif g == 1:
            self._per_channel(node, x, {k: b.get(k) for k in ("weight", "bias")})
            self._normalizer(node, "group_norm", v, list(range(1, len(v))))
        elif self.S.atoms(v[1]):
            raise self.unsupported(node, f"GroupNorm with {g} groups of {c} channels normalizes channel blocks")
        self.env[node.name] = v

    def op_prelu(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        v = self.tval(x)
        if self.shape(w)[0] > 1:
            self.S.unify(self.tval(w)[0], v[1 if len(v) > 1 else 0])
            self.use(node, w, 0, "neuron")
        elif v and self.is_param(w):  # nn.PReLU(): one slope for every channel
            self.broadcast(node, w, None, v[1 if len(v) > 1 else 0])
        self.env[node.name] = v
        self._record_act(node, "prelu", v)

    def op_glu(self, node: fx.Node) -> None:
        x = node.args[0]
        dim = _bind(node).get("dim", -1)
        size = self.shape(x)[dim]
        a, c = self._pieces(node, x, dim, [(0, size // 2), (size // 2, size)], False)
        dim %= len(a)
        self.S.unify(a[dim], c[dim])
        self.env[node.name] = a
        self._record_act(node, "glu", a)

    def op_scaled_dot_product_attention(self, node: fx.Node) -> None:
        b = _bind(node)
        q, k, v = b["query"], b["key"], b["value"]
        qv, kv, vv = self.tval(q), self.tval(k), self.tval(v)
        qs, ks, vs = self.shape(q), self.shape(k), self.shape(v)
        self.S.unify(qv[-1], kv[-1])  # q / k inner dims are contracted
        self.contracted.append((node.name, qv[-1]))
        if len(qs) == len(ks) == len(vs) == 4 and qs[1] == ks[1] == vs[1] == 1:
            self.single_head.add(node.name)
        nb = len(qs) - 2
        for d in range(nb):  # batch dims (heads): q, k and v move together
            dq, dk, dv = d, d - (nb - (len(ks) - 2)), d - (nb - (len(vs) - 2))
            terms = []
            if qs[dq] > 1 or self.S.units1_of(qv[dq]):
                terms.append((qv[dq], qs[dq]))
            for t, s, dd in ((kv, ks, dk), (vv, vs, dv)):
                if dd >= 0 and (s[dd] > 1 or self.S.units1_of(t[dd])):
                    terms.append((t[dd], s[dd]))
            if not terms:
                continue
            base, bs = terms[0]
            for t, s in terms[1:]:
                if s == bs:
                    self.S.unify(base, t)
                elif bs % s == 0 and b.get("enable_gqa"):  # grouped-query: q head = kv head * n_rep + r
                    self.S.unify(base, tuple(t) + (-(bs // s),))
                else:
                    raise self.unsupported(node, f"attention heads of sizes {bs} and {s}")
        mask = b.get("attn_mask")
        if isinstance(mask, fx.Node):
            mv, ms = self.tval(mask), self.shape(mask)
            scores = qv[:-1] + (kv[-2],)
            sshape = qs[:-1] + (ks[-2],)
            for j in range(len(ms)):
                d = len(sshape) - len(ms) + j
                if ms[j] > 1 and d >= 0 and sshape[d] == ms[j]:
                    self.S.unify(scores[d], mv[j])
                    if d < len(sshape) - 2 and self.S.atoms(mv[j]):
                        # a per-head additive bias (Swin's relative position table) is the only value where the
                        # neurons of its table group can be observed, as T5's bias is at its embedding's output
                        self.recs.append(_Rec(mask.name, "pre", j - len(ms), mv[j], None, self.order[mask.name]))
        self.env[node.name] = tuple(qv[:-1]) + (vv[-1],)

    def op__native_multi_head_attention(self, node: fx.Node) -> None:
        raise self.unsupported(node, "the fused multi-head attention kernel hides the heads (export in eval mode "
                               "with gradients enabled, or declare the groups)")  # fmt: skip

    op__transformer_encoder_layer_fwd = op__native_multi_head_attention

    # ---- regions (modules as subgraphs) ------------------------------------------------------------
    def regions(self) -> dict[str, list[fx.Node]]:
        """nn_module_stack key -> nodes of that module call (in graph order)."""
        if self._regions is None:
            out: dict[str, list[fx.Node]] = {}
            for node in self.ep.graph.nodes:
                for key, (path, _t) in (node.meta.get("nn_module_stack") or {}).items():
                    out.setdefault(key, []).append(node)
                    self._key_path[key] = str(path)
            self._regions = out
        return self._regions

    def region_of(self, node: fx.Node) -> tuple[str | None, list[fx.Node]]:
        """The innermost module call of a node (None for code of the root module) and its nodes."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None, []
        key = list(stack)[-1]
        if str(stack[key][0]) == "":
            return None, []
        return key, self.regions()[key]

    def region_io(self, nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        """(external tensor inputs, output nodes) of a region (parameters / buffers are not inputs)."""
        ck = nodes[0].name + ":" + nodes[-1].name + ":" + str(len(nodes))
        if ck not in self._io:
            self._io[ck] = self._region_io(nodes)
        return self._io[ck]

    def dynamic(self) -> set[str]:
        """Names of the nodes whose value depends on the user inputs (not only on parameters / buffers /
        constants): values such as a cast of a buffer may be shared by the export between module calls."""
        if not hasattr(self, "_dynamic"):
            dyn: set[str] = set()
            for n in self.ep.graph.nodes:
                if n.op == "placeholder":
                    if n.name not in self.param_of and n.name not in self.buffer_of and n.name not in self.const_of:
                        dyn.add(n.name)
                elif any(a.name in dyn for a in n.all_input_nodes):
                    dyn.add(n.name)
            self._dynamic = dyn
        return self._dynamic

    def _region_io(self, nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        dyn = self.dynamic()
        inside = {n.name for n in nodes}
        ins: list[fx.Node] = []
        outs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a.name in inside or a in ins:
                    continue
                if a.op == "placeholder" and (a.name in self.param_of or a.name in self.buffer_of or
                                              a.name in self.const_of):  # fmt: skip
                    continue
                if self.vshape(a.meta.get("val")) is None or a.name not in dyn:
                    continue
                ins.append(a)
            if any(u.name not in inside for u in n.users) and n.op != "output" and n.name in dyn:
                outs.append(n)
        # a value-preserving op on the input that the export shares with outside users (a no-op ``.to`` of the
        # residual in Hugging Face RMSNorms) is the input passed through, not an output of the module
        in_names = {a.name for a in ins}
        outs = [n for n in outs if self._back(n) not in in_names]
        return ins, outs

    def calls_of(self, path: str) -> int:
        self.regions()
        return sum(1 for p in self._key_path.values() if p == path)

    def module_output_path(self, node: fx.Node) -> str | None:
        """The module path whose (single) call returns exactly this node's value, if it is a leaf-ish call."""
        key, nodes = self.region_of(node)
        if key is None:
            return None
        _ins, outs = self.region_io(nodes)
        path = self._key_path[key]
        if outs == [node] and self.calls_of(path) == 1:
            return path
        return None

    def _region_input(self, node: fx.Node) -> fx.Node | None:
        key, nodes = self.region_of(node)
        if key is None:
            return None
        ins, outs = self.region_io(nodes)
        if outs == [node] and len(ins) == 1:
            return ins[0]
        return None


def _patterns(S: Spaces, term: Term | None) -> list[tuple[int, int, Any, tuple]]:
    """Segments of a resolved term: (offset, length, group key or None, factors)."""
    out: list[tuple[int, int, Any, tuple]] = []
    if term is None:
        return out
    pos = 0
    for t in S.resolve(term):
        s = S.tsize(t)
        atoms = [f for f in t if f >= 0]
        if atoms:
            u = atoms[0]
            d = atoms[1] if len(atoms) > 1 else None
            factors = []
            for f in t:
                if f < 0:
                    if factors and factors[-1][0] == "rep":
                        factors[-1] = ("rep", factors[-1][1] * -f)
                    else:
                        factors.append(("rep", -f))
                elif f == u:
                    factors.append(("unit", S.size[f]))
                else:
                    factors.append(("inner", S.size[f]))
            out.append((pos, s, (u, d), tuple(factors)))
        pos += s
    return out


@dataclass
class TraceResult:
    groups: dict[str, NeuronGroup]
    tied_params: list[tuple[str, ...]]
    pinned: list[PinnedNeurons] = field(default_factory=list)


def _lonely_pins(S: Spaces, term: Term | None, out: set[int]) -> None:
    """The pinned leaf atoms (size > 1) of a term that make up whole segments without a free atom (not the pinned
    inner dims of a free unit, e.g. rotary q / k dims), through products and sums."""
    flat: list[Any] = []  # leaves (ints >= 0) and sums (lists of terms) of the product, size-1 and reps dropped

    def expand(t: Term) -> None:
        for f in t:
            if f < 0:
                continue
            r = S.find(f)
            d = S.defn[r]
            if d is not None and d[0] == "prod":
                expand(d[1])
            elif d is not None and d[0] == "sum":
                flat.append(list(d[1]))
            elif S.size[r] > 1 and (d is None or d[0] == "rep") or S.is_unit1(r):  # a one-head unit is free
                flat.append(r)

    expand(term or ())
    if len(flat) == 1 and isinstance(flat[0], list):  # segments (a concatenation, a packed projection)
        for t in flat[0]:
            _lonely_pins(S, t, out)
        return
    leaves = [x for x in flat if not isinstance(x, list)]
    if leaves and not any(S.defn[x] is None for x in leaves):
        out.update(leaves)


def _module_of(u: Any) -> str:
    """The module path of a use's parameter alias (``"fc1.weight"`` -> ``"fc1"``)."""
    return u.alias.rpartition(".")[0] or u.alias


def _pinned_hidden(E: Engine) -> list[PinnedNeurons]:
    """Neurons a weight layer produces that are pinned by an op (not the model's output) whose result reaches the
    input of another weight layer: whole segments of a producer axis without any free atom."""
    S = E.S
    by_order = {i: n for n, i in E.order.items()}
    consumers: dict[str, set[str]] = {}  # node name -> modules whose weight it contracts
    for u in E.uses:
        if u.role == "consumer":
            consumers.setdefault(by_order[u.order], set()).add(_module_of(u))
    read: dict[int, set[str]] = {}  # pinned leaf -> modules that contract it (a stream pinned as a whole)
    for u in E.uses:
        if u.role == "consumer":
            leaves: set[int] = set()
            _lonely_pins(S, E.reg[u.tkey][u.axis], leaves)
            for r in leaves:
                read.setdefault(r, set()).add(_module_of(u))
    buffers = set(E.buffer_of.values())
    found: dict[str, tuple[int, set[str], set[str], str | None]] = {}
    returned: dict[str, set[str]] = {}  # the outputs that return neurons the model's output pins
    for u in E.uses:
        if u.role != "producer":
            continue
        leaves: set[int] = set()
        _lonely_pins(S, E.reg[u.tkey][u.axis], leaves)
        for r in leaves:
            at = S.pinned_at.get(r)
            if not isinstance(at, fx.Node):  # the model's output, or the group analysis: pinned after unification
                if r in read and read[r] - {_module_of(u)}:
                    size, prods, cons, _b = found.setdefault(str(at), (S.size[r], set(), set(), None))
                    prods.add(_module_of(u))
                    cons |= read[r]
                    returned.setdefault(str(at), set()).update(E.output_of.get(r, []))
                continue
            if any(E.prov.get(a.name, ("",))[0] == u.tkey for a in at.all_input_nodes):
                continue  # the tensor's own indexed use: a tied embedding's vocabulary axis (lookup and logits)
            seen, todo, reached = {at.name}, [at], set()
            while todo:  # the weight layers the pinned values reach first
                for user in todo.pop().users:
                    if user.name in seen:
                        continue
                    seen.add(user.name)
                    if user.name in consumers:
                        reached |= consumers[user.name]
                    else:
                        todo.append(user)
            if at.name in consumers:
                reached |= consumers[at.name]
            if reached:
                buffer = next((E.prov[a.name][0] for a in at.all_input_nodes
                               if a.name in E.prov and E.prov[a.name][0] in buffers), None)  # fmt: skip
                size, prods, cons, _b = found.setdefault(E.where(at), (S.size[r], set(), set(), buffer))
                prods.add(_module_of(u))
                cons |= reached
    return [
        PinnedNeurons(n, tuple(sorted(p)), tuple(sorted(c)), w, b, tuple(sorted(returned.get(w, ()))))
        for w, (n, p, c, b) in found.items()
    ]


def finish(E: Engine) -> TraceResult:
    """Read neuron groups off the parameter axes (see notes/IR.md §2, last paragraph)."""
    S = E.S
    S.context = "the neuron-group analysis (an axis used without its units, or a tie set without a producer)"
    result = _fixpoint(E)
    result.pinned = _pinned_hidden(E)
    used = {(u.tkey, u.axis) for u in E.uses}
    group_atoms = set()
    for u in E.uses:
        for _o, _l, key, _f in _patterns(S, E.reg[u.tkey][u.axis]):
            group_atoms.update(a for a in key if a is not None)
    for tkey, terms in E.reg.items():
        for axis, term in enumerate(terms):
            if term is None or (tkey, axis) in used:
                continue
            if any(a in group_atoms for a in S.atoms(term)):
                raise UnsupportedModuleError(
                    f"parameter {tkey!r} axis {axis} carries neurons of a group but reaches them through ops that "
                    f"give it no role (producer / per-neuron / consumer); {HINT}"
                )
    return result


def _fixpoint(E: Engine) -> TraceResult:
    S = E.S
    use_keys = sorted({(u.tkey, u.axis) for u in E.uses})
    for _ in range(100):
        changed = False
        ctx: dict[int, set] = {}
        for tkey, axis in use_keys:
            term = E.reg[tkey][axis]
            if term is None:
                continue
            for t in S.resolve(term):
                atoms = [f for f in t if f >= 0]
                heads1 = [a for a in atoms if S.size[a] == 1]
                if heads1 and (len(atoms) > 2 or atoms[0] not in heads1):
                    for a in heads1:  # a one-head unit that is not the leading one of two factors: no head
                        S.pin(a)
                    changed = True
                    break
                if len(set(atoms)) != len(atoms):
                    for a in atoms:
                        S.pin(a)
                    changed = True
                    break
                if len(atoms) > 2:
                    for a in atoms[2:]:
                        S.pin(a)
                    changed = True
                    break
                if len(atoms) == 1:
                    ctx.setdefault(atoms[0], set()).add(("alone",))
                elif len(atoms) == 2:
                    ctx.setdefault(atoms[0], set()).add(("unit", atoms[1]))
                    ctx.setdefault(atoms[1], set()).add(("inner", atoms[0]))
            if changed:
                break
        if changed:
            continue
        for a, cs in ctx.items():
            inner_of = {c[1] for c in cs if c[0] == "inner"}
            if inner_of and (len(cs) > 1 or len(inner_of) > 1):
                heads1 = [u for u in inner_of if S.size[u] == 1]
                if heads1:  # under a one-head unit here, alone there: it is no head; the unit goes, not the dim
                    for u in heads1:
                        S.pin(u)
                else:
                    S.pin(a)  # an inner dim used without (or under different) units: its permutation cannot vary
                changed = True
        if changed:
            continue
        # groups; a tie set without any producer is pinned (it is not produced by a layer of the members)
        keys: dict[tuple, list[_Use]] = {}
        for u in E.uses:
            term = E.reg[u.tkey][u.axis]
            for _off, _len, key, _f in _patterns(S, term):
                keys.setdefault(key, []).append(u)
        by_unit: dict[int, list[tuple]] = {}
        for key in keys:
            by_unit.setdefault(key[0], []).append(key)
        for unit, ks in by_unit.items():
            if not any(u.role == "producer" for k in ks for u in keys[k]):
                S.pin(unit)
                changed = True
        if not changed:
            break
    return _build_groups(E)


def _build_groups(E: Engine) -> TraceResult:
    S = E.S
    refs: dict[tuple, dict[tuple, AxisRef]] = {}
    first_prod: dict[tuple, tuple[int, str]] = {}
    roles: dict[tuple, str] = {}
    for u in sorted(E.uses, key=lambda x: x.order):
        term = E.reg[u.tkey][u.axis]
        full = S.tsize(term)
        module, _, param = u.alias.rpartition(".")
        for off, length, key, factors in _patterns(S, term):
            simple = off == 0 and length == full and key[1] is None and [k for k, _ in factors][:1] == ["unit"] and all(
                k == "rep" for k, _ in factors[1:])  # fmt: skip
            if simple:
                ref = AxisRef(module, param, u.axis, u.role, math.prod(s for k, s in factors if k == "rep"))
            else:
                ref = AxisRef(module, param, u.axis, u.role, 1, off, factors)
            rk = (u.alias, u.axis, off)
            if rk in roles and roles[rk] != u.role:
                raise UnsupportedModuleError(
                    f"parameter {u.alias!r} axis {u.axis} is used both as {roles[rk]} and as {u.role}; {HINT}"
                )
            roles[rk] = u.role
            refs.setdefault(key, {}).setdefault(rk, ref)
            if u.role == "producer" and key not in first_prod:
                first_prod[key] = (u.order, module)
    # order groups by their first producer (the order the forward pass creates them), then by first reference
    first_any = {}
    for u in sorted(E.uses, key=lambda x: x.order):
        for _o, _l, key, _f in _patterns(S, E.reg[u.tkey][u.axis]):
            first_any.setdefault(key, (u.order, u.alias.rpartition(".")[0]))
    unit_first: dict[int, tuple[int, str]] = {}
    for key in refs:
        fp = first_prod.get(key)
        if fp is not None and (key[0] not in unit_first or fp < unit_first[key[0]]):
            unit_first[key[0]] = fp
    ordered = sorted(refs, key=lambda k: (first_prod.get(k, (10**9, ""))[0], first_any[k][0]))
    groups: dict[str, NeuronGroup] = {}
    names: dict[tuple, str] = {}
    for i, key in enumerate(ordered):
        module = first_prod.get(key, first_any[key])[1]
        name = f"g{i}:{module}"
        names[key] = name
        u, d = key
        size = S.size[u] * (S.size[d] if d is not None else 1)
        groups[name] = NeuronGroup(name, size, list(refs[key].values()), unit_size=S.size[d] if d is not None else 1)
    by_unit: dict[int, list[str]] = {}
    for key, name in names.items():
        by_unit.setdefault(key[0], []).append(name)
    for _unit, ns in by_unit.items():
        if len(ns) > 1:
            tie = ns[0]
            for n in ns:
                groups[n].tie = tie
    _attach_points(E, groups, names)
    tied = []
    seen: set[int] = set()
    used = {u.alias for u in E.uses}
    for names_ in E.aliases.values():
        if len(names_) > 1 and id(names_) not in seen and any(n in used for n in names_):
            seen.add(id(names_))
            tied.append(tuple(names_))
    return TraceResult(groups, tied)


def _attach_points(E: Engine, groups: dict[str, NeuronGroup], names: dict[tuple, str]) -> None:
    S = E.S
    legacy_dims = {}
    for name in groups:
        legacy_dims[name] = []
    # capture points
    superseded: set[tuple[str, str]] = set()
    pre_by_node: dict[str, list[str]] = {}
    recs = sorted(E.recs, key=lambda r: r.order)
    for r in recs:
        for off, length, key, factors in _patterns(S, r.term):
            g = names.get(key)
            if g is None:
                continue
            full = S.tsize(r.term)
            gr = groups[g]
            simple = off == 0 and length == full and length == gr.size and factors in (
                (("unit", gr.size),), (("unit", gr.units), ("inner", gr.unit_size)))  # fmt: skip
            node = E.nodes[r.node]
            module = E.module_output_path(node) if r.kind != "input" else None
            mean_dims = _unaligned_dims(E, r, key, names)
            cp = CapturePoint(r.node, r.kind, r.dim, off, None if simple else factors, module, mean_dims)
            if cp not in gr.captures:
                gr.captures.append(cp)
            if r.kind == "pre":
                pre_by_node.setdefault(r.node, []).append(g)
                for s in r.supersedes:
                    superseded.add((s, g))
    _activation_module_points(E, groups)
    for gr in groups.values():
        pre, post = [], []
        for cp in gr.captures:
            node = E.nodes[cp.node]
            shape = E.vshape(node.meta.get("val"))
            if shape is None or cp.pattern is not None or cp.offset != 0 or cp.mean_dims:
                continue
            nd = len(shape)
            if cp.dim + nd != (1 if nd == 4 else nd - 1):
                continue
            if cp.kind == "pre" and (cp.node, gr.name) not in superseded:
                pre.append(cp)
            elif cp.kind == "post":
                post.append(cp)
        gr.pre_nodes = list(dict.fromkeys(c.node for c in pre))
        gr.post_nodes = list(dict.fromkeys(c.node for c in post))
        gr.pre_points = list(dict.fromkeys(c.module for c in pre if c.module is not None))
        gr.post_points = list(dict.fromkeys(c.module for c in post if c.module is not None))
    # activations
    for a in sorted(E.acts, key=lambda x: x.order):
        for _o, _l, key, _f in _patterns(S, a.term):
            g = names.get(key)
            if g is None or groups[g].activation is not None:
                continue
            label, ops = _activation_label(E, E.nodes[a.node], a.op)
            groups[g].activation = label
            groups[g].activation_ops = ops
    # normalizers
    for nrec in sorted(E.norms, key=lambda x: x.order):
        keys = set()
        for t in nrec.terms:
            for _o, _l, key, _f in _patterns(S, t):
                if key in names:
                    keys.add(key)
        if not keys:
            continue
        wrappable, kind, dim, copies = _wrappable(E, nrec, keys, names, groups)
        for key in keys:
            gr = groups[names[key]]
            if not any((n.module, n.kind, n.wrappable) == (nrec.module, kind, wrappable) for n in gr.normalizers):
                gr.normalizers.append(Normalizer(nrec.module, kind, wrappable, nrec.node, dim, copies))
    # parameters broadcast over the units of a group (one value for all of them): permuted or merged, not widened
    by_unit: dict[int, list[str]] = {}
    for key, name in names.items():
        by_unit.setdefault(key[0], []).append(name)
    for sh in sorted(E.shared, key=lambda x: x.order):
        units = {key[0] for _o, _l, key, _f in _patterns(S, sh.term)}
        for u in units:
            for name in by_unit.get(u, []):
                gr = groups[name]
                if not any(p.param == sh.param for p in gr.shared_params):
                    gr.shared_params.append(SharedParameter(sh.param, E.where(E.nodes[sh.node])))
    for node, term in E.contracted:
        units = {key[0] for _o, _l, key, _f in _patterns(S, term)}
        for u in units:
            for name in by_unit.get(u, []):
                gr = groups[name]
                where = E.where(E.nodes[node])
                if node in E.single_head:
                    where += (
                        " (a single attention head: no size-1 heads axis the trace could follow (a view (B, T, C) "
                        "-> (B, T, 1, C) read only by ops that carry it) tells the head dims from the heads, so "
                        "pyfusion cannot widen it into one head per member; a value projection the forward views by "
                        "the head dim needs alpha 0 too)"
                    )
                if where not in gr.contracted:
                    gr.contracted.append(where)


def _unaligned_dims(E: Engine, r: _Rec, key: tuple, names: dict[tuple, str]) -> tuple[int, ...]:
    """The dims (negative) of a capture record's value, other than its own, that hold neurons of another group
    (another unit atom): members order them differently, so the values along them are not common samples."""
    v = E.env.get(r.node)
    if not isinstance(v, tuple) or (len(v) == 2 and v[0] == "buffer"):
        return ()
    nd = len(v)
    out = []
    for d in range(nd):
        if d - nd == r.dim:
            continue
        if any(k in names and k[0] != key[0] for _o, _l, k, _f in _patterns(E.S, v[d])):
            out.append(d - nd)
    return tuple(out)


def _activation_region(E: Engine, node: fx.Node) -> tuple[set[str], fx.Node, str] | None:
    """(node names, output node, module path) of the activation module call a node belongs to, when that call is
    exactly an elementwise activation (one input, one output, elementwise ops only, no child modules), else None."""
    key, nodes = E.region_of(node)
    if key is None:
        return None
    path = E._key_path[key]
    mod = E.mods.get(path)
    ins, outs = E.region_io(nodes)
    elementwise = all(_base(_opname(n)) in ACTIVATIONS | UNARY | ELEMENTWISE for n in nodes)
    if mod is None or len(ins) != 1 or len(outs) != 1 or not elementwise or any(True for _ in mod.children()):
        return None
    return {n.name for n in nodes}, outs[0], path


def _activation_module_points(E: Engine, groups: dict[str, NeuronGroup]) -> None:
    """A composite activation module (GPT-2's NewGELU ``0.5 x (1 + tanh(c (x + 0.044715 x^3))))``, QuickGELU, ...):
    the group's post-activation value is the module's output, not the op the activation was recognised at (tanh),
    and the intermediate values inside the module (``x + 0.044715 x^3``) are not pre-activation points."""
    for a in sorted(E.acts, key=lambda x: x.order):
        region = _activation_region(E, E.nodes[a.node])
        if region is None:
            continue
        inside, out, path = region
        for gr in groups.values():
            if not any(cp.node == a.node and cp.kind == "post" for cp in gr.captures):
                continue
            caps = []
            for cp in gr.captures:
                if cp.node in inside and cp.node != out.name and cp.kind in ("pre", "post"):
                    if cp.kind == "post" and cp.node == a.node:
                        cp = CapturePoint(out.name, "post", cp.dim, cp.offset, cp.pattern, path, cp.mean_dims)
                    else:
                        continue
                if cp not in caps:
                    caps.append(cp)
            gr.captures = caps


def _activation_label(E: Engine, node: fx.Node, op: str) -> tuple[str, tuple[str, ...]]:
    key, nodes = E.region_of(node)
    if key is not None:
        path = E._key_path[key]
        mod = E.mods.get(path)
        ins, outs = E.region_io(nodes)
        elementwise = all(_base(_opname(n)) in ACTIVATIONS | UNARY | ELEMENTWISE for n in nodes)
        if (
            mod is not None
            and len(ins) == 1
            and len(outs) == 1
            and elementwise
            and not any(True for _ in mod.children())
        ):
            return type(mod).__name__.lower(), tuple(dict.fromkeys(_base(_opname(n)) for n in nodes))
    return f"functional:{op}", (op,)


def _wrappable(E: Engine, nrec: _Norm, keys: set, names: dict, groups: dict) -> tuple[bool, str, int, int]:
    """Whether the normalizer's module is exactly the normalization of one group (so the builder may replace it by
    a member-view module), on which axis, and over how many copies of it: every call of the module reads one tensor
    and returns one, both holding that group, in order, on the same axis (the last one for channels-last features;
    ConvNeXt's channels-first LayerNorm permutes it there and back) and no other axis holding any of its neurons --
    the axis may hold the group ``copies`` times in a row (Swin's patch merging normalizes the concatenation of
    four 2x2 neighbours, ``LayerNorm(4 C)``); every normalization inside the module reduces over that axis alone;
    the module has no child modules (a block around a norm holds layers of its own); and the module's own parameters
    are per-neuron parameters of the group. Returns (wrappable, kind, the axis
    counted from the end, copies). GroupNorm(1, C) qualifies too: its reduction over the positions holds no neurons."""
    refused = (False, nrec.op, -1, 1)
    node = E.nodes[nrec.node]
    if len(keys) != 1:
        return refused
    key, _nodes = E.region_of(node)
    if key is None:
        return refused
    path = E._key_path[key]
    mod = E.mods.get(path)
    if mod is None or any(True for _ in mod.children()):  # a block around the norm: its layers are not the norm's
        return refused
    (gkey,) = keys
    S = E.S
    gatoms = tuple(x for x in gkey if x is not None)

    def copies_of(t: Term) -> int:
        """How many times the term is the group in a row (0: it is something else)."""
        r = S.resolve(t)
        return len(r) if r and all(tuple(f) == gatoms for f in r) else 0

    def group_axis(v: tuple) -> tuple[int, int] | None:
        """(axis (negative), copies) of the one axis of ``v`` that is the group, when no other axis holds its atoms."""
        found = None
        for d, t in enumerate(v):
            atoms = {f for factors in S.resolve(t) for f in factors if f >= 0}
            if not atoms & set(gatoms):
                continue
            c = copies_of(t)
            if found is not None or c == 0:
                return None
            found = (d - len(v), c)
        return found

    axis = None
    for call, nodes in E.regions().items():
        if E._key_path.get(call) != path:
            continue
        ins, outs = E.region_io(nodes)
        if len(ins) != 1 or len(outs) != 1:
            return refused
        vi, vo = E.tval(ins[0]), E.env.get(outs[0].name)
        if not isinstance(vi, tuple) or not isinstance(vo, tuple) or len(vi) != len(vo) or not vi:
            return refused
        ai, ao = group_axis(vi), group_axis(vo)
        if ai is None or ai != ao or (axis is not None and ai != axis):
            return refused
        axis = ai
        inside = {n.name for n in nodes}
        for other in E.norms:  # axes without neurons (GroupNorm(1, C)'s spatial ones) do not matter
            reduced = [t for t in other.terms if any(f >= 0 for r in S.resolve(t) for f in r)]
            if other.node in inside and (len(reduced) != 1 or copies_of(reduced[0]) != ai[1]):
                return refused
    if axis is None:
        return refused
    gname = names[gkey]
    for p, _t in mod.named_parameters():
        full = f"{path}.{p}" if path else p
        if not any(r.key == full and r.role == "neuron" for r in groups[gname].refs):
            return refused
    return True, type(mod).__name__, axis[0], axis[1]
