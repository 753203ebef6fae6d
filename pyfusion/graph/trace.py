"""Find the neuron groups of a model automatically (torch.fx symbolic trace; a module walk where tracing fails).

The tracer propagates a *space* along the data flow: the raw input space (fixed), or a neuron group (with a
flag saying whether the tensor is spatial (N, C, H, W) or flattened). Linear / Conv2d start a new group at
their output and become consumers of their input's group; BatchNorm / LayerNorm add per-neuron parameters;
elementwise activations, dropout and pooling pass the group through; ``a + b`` unites the groups of both
operands (a residual stream becomes one group across blocks); whatever reaches the network output, or is
added to the raw input, is fixed (not a group). Anything else raises a ValueError naming the module path and
type (or the function), so silent wrong fusions cannot happen.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from pyfusion.graph.groups import AxisRef, FusionGraph, NeuronGroup

__all__ = ["trace_groups", "UnsupportedModuleError"]


class UnsupportedModuleError(ValueError):
    """A module or function the tracer cannot assign to neuron groups (declare the groups by hand instead)."""


ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.leaky_relu: "leaky_relu", F.elu: "elu", F.softplus: "softplus", F.hardtanh: "hardtanh",
    F.mish: "mish", F.sigmoid: "sigmoid", F.tanh: "tanh", F.selu: "selu", F.hardswish: "hardswish",
}  # fmt: skip
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}
PASS_FUNCTIONS = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout}
POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}  # fmt: skip
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
SCALE_FUNCTIONS = {operator.mul, operator.truediv, operator.imul, torch.mul}
FLATTEN_FUNCTIONS = {torch.flatten}
VIEW_METHODS = {"view", "reshape", "flatten"}
PASS_METHODS = {"contiguous", "clone", "detach"}


@dataclass(frozen=True)
class _Space:
    """Where a tensor's feature axis lives: fixed (raw input / network output) or a group id."""

    gid: int | None  # None: fixed space
    spatial: bool = False  # (N, C, *spatial) layout with the group on dim 1
    flat: bool = False  # a flattened spatial group (C * HW columns)


@dataclass
class _G:
    size: int
    refs: list[AxisRef] = field(default_factory=list)
    pre: list[tuple[str | None, str | None]] = field(default_factory=list)  # (node name, module path)
    post: list[tuple[str | None, str | None]] = field(default_factory=list)
    activation: str | None = None
    fixed: bool = False


class _Builder:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.g: list[_G] = []
        self.superseded: set[str] = set()
        self.called: dict[str, str] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.g.append(_G(size))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: _Space, b: _Space, where: str) -> _Space:
        if a.gid is None or b.gid is None:
            for s in (a, b):
                if s.gid is not None:
                    self.g[self.find(s.gid)].fixed = True
            return _Space(None, a.spatial or b.spatial)
        ra, rb = self.find(a.gid), self.find(b.gid)
        if a.flat != b.flat or a.spatial != b.spatial:
            raise UnsupportedModuleError(f"{where}: adds tensors of different layouts; declare the groups by hand")
        if ra != rb:
            ra, rb = min(ra, rb), max(ra, rb)  # the earlier group names the stream
            ga, gb = self.g[ra], self.g[rb]
            if ga.size != gb.size:
                raise UnsupportedModuleError(f"{where}: adds groups of sizes {ga.size} and {gb.size}")
            self.parent[rb] = ra
            ga.refs += gb.refs
            ga.pre += gb.pre
            ga.post += gb.post
            ga.fixed = ga.fixed or gb.fixed
            ga.activation = ga.activation or gb.activation
        return _Space(ra, a.spatial, a.flat)

    def group(self, s: _Space) -> _G | None:
        return None if s.gid is None else self.g[self.find(s.gid)]

    # ---- modules ---------------------------------------------------------------------------------
    def module(self, path: str, mod: nn.Module, x: _Space, node: str | None, in_node: str | None) -> _Space:
        where = f"module {path!r} ({type(mod).__name__})"
        if path in self.called and isinstance(
            mod, (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
        ):
            raise UnsupportedModuleError(f"{where} is called more than once (shared weights are not supported)")
        self.called[path] = node or path
        grp = self.group(x)
        if isinstance(mod, nn.Linear):
            if x.spatial and not x.flat:
                raise UnsupportedModuleError(f"{where} is applied to a (N, C, H, W) tensor; flatten it first")
            if grp is not None:
                if mod.in_features % grp.size:
                    raise UnsupportedModuleError(
                        f"{where}: in_features={mod.in_features} is not a multiple of the input group size {grp.size}"
                    )
                expand = mod.in_features // grp.size
                if expand != 1 and not x.flat:
                    raise UnsupportedModuleError(f"{where}: input size {mod.in_features} != group size {grp.size}")
                grp.refs.append(AxisRef(path, "weight", 1, "consumer", expand))
            gid = self.new(mod.out_features)
            self._producer(gid, path, mod, node)
            return _Space(gid)
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise UnsupportedModuleError(f"{where}: grouped / depthwise convolutions (groups={mod.groups})")
            if x.flat:
                raise UnsupportedModuleError(f"{where} is applied to a flattened tensor")
            if grp is not None:
                grp.refs.append(AxisRef(path, "weight", 1, "consumer"))
            gid = self.new(mod.out_channels)
            self._producer(gid, path, mod, node)
            return _Space(gid, spatial=True)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            if isinstance(mod, nn.LayerNorm) and (len(mod.normalized_shape) != 1 or x.spatial):
                raise UnsupportedModuleError(f"{where}: only LayerNorm over the last (feature) axis is supported")
            if grp is not None:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(mod, p, None) is not None:
                        grp.refs.append(AxisRef(path, p, 0, "neuron"))
                grp.pre.append((node, path))
                if in_node is not None:
                    self.superseded.add(in_node)
                else:
                    self.superseded.add(self._last_pre_path(grp))
            return x
        if isinstance(mod, ACTIVATION_MODULES):
            if grp is not None:
                grp.post.append((node, path))
                grp.activation = grp.activation or type(mod).__name__.lower()
            return x
        if isinstance(mod, PASS_MODULES):
            return x
        if isinstance(mod, POOL_MODULES):
            if x.flat:
                raise UnsupportedModuleError(f"{where} is applied to a flattened tensor")
            return x
        if isinstance(mod, nn.Flatten):
            if mod.start_dim != 1:
                raise UnsupportedModuleError(f"{where}: only Flatten(start_dim=1) is supported")
            return _Space(x.gid, spatial=x.spatial, flat=x.spatial or x.flat)
        raise UnsupportedModuleError(
            f"unsupported module {path!r} of type {type(mod).__name__}: pyfusion.graph cannot tell which of its axes "
            "share neurons; declare the groups with pyfusion.graph.declare_groups"
        )

    def _last_pre_path(self, grp: _G) -> str:
        return grp.pre[-1][1] if grp.pre else ""

    def _producer(self, gid: int, path: str, mod: nn.Module, node: str | None) -> None:
        grp = self.g[gid]
        grp.refs.append(AxisRef(path, "weight", 0, "producer"))
        if getattr(mod, "bias", None) is not None:
            grp.refs.append(AxisRef(path, "bias", 0, "producer"))
        grp.pre.append((node, path))

    def finish(self) -> dict[str, NeuronGroup]:
        out: dict[str, NeuronGroup] = {}
        for i in range(len(self.g)):
            if self.find(i) != i or self.g[i].fixed:
                continue
            g = self.g[i]
            # pre-activation points: values not immediately renormalised / summed into the same group
            pre = [(n, p) for n, p in g.pre if (n if n is not None else p) not in self.superseded]
            name = f"g{len(out)}:{next(r.module for r in g.refs if r.role == 'producer')}"
            out[name] = NeuronGroup(
                name,
                g.size,
                list(g.refs),
                pre_points=[p for _, p in pre if p is not None],
                post_points=list(dict.fromkeys(p for _, p in g.post if p is not None)),
                activation=g.activation,
                pre_nodes=[n for n, _ in pre if n is not None],
                post_nodes=[n for n, _ in g.post if n is not None],
            )
        return out


def _spaces_in(arg, env: dict[str, _Space | None]) -> list[_Space]:
    out: list[_Space] = []

    def visit(a) -> None:
        if isinstance(a, fx.Node):
            s = env.get(a.name)
            if s is not None:
                out.append(s)
        elif isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(arg)
    return out


def _trace_fx(model: nn.Module) -> tuple[dict[str, NeuronGroup], fx.GraphModule]:
    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    b = _Builder()
    env: dict[str, _Space | None] = {}
    for node in gm.graph.nodes:
        where = f"node {node.name!r}"
        if node.op == "placeholder":
            env[node.name] = _Space(None)
            continue
        if node.op == "output":
            for s in _spaces_in(node.args, env):
                grp = b.group(s)
                if grp is not None:
                    grp.fixed = True
            continue
        if node.op == "get_attr":
            raise UnsupportedModuleError(
                f"{where} reads parameter/buffer {node.target!r} directly in forward; declare the groups by hand"
            )
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and env.get(a.name) is not None]
        first = env.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            mod = mods[node.target]
            if first is None:
                raise UnsupportedModuleError(f"module {node.target!r} ({type(mod).__name__}) has no tensor input")
            in_node = node.args[0].name
            env[node.name] = b.module(node.target, mod, first, node.name, in_node)
            continue
        if (
            node.op == "call_method"
            and node.target in ("size", "dim")
            or (node.op == "call_function" and node.target is getattr)
        ):
            env[node.name] = None  # shape metadata, not a tensor in feature space
            continue
        if not _spaces_in((node.args, node.kwargs), env):
            env[node.name] = None
            continue
        t = node.target
        if node.op == "call_function" and t in ADD_FUNCTIONS or node.op == "call_method" and t in ("add", "add_"):
            spaces = [env[a.name] for a in tensor_args]
            s = spaces[0]
            for o in spaces[1:]:
                s = b.union(s, o, where)
            grp = b.group(s)
            if grp is not None and len(spaces) > 1:
                grp.pre.append((node.name, None))
                for a in tensor_args:
                    b.superseded.add(a.name)
            env[node.name] = s
            continue
        if len(tensor_args) != 1:
            raise UnsupportedModuleError(f"{where}: function {getattr(t, '__name__', t)!r} combines several tensors")
        if (
            node.op == "call_function"
            and t in ACTIVATION_FUNCTIONS
            or node.op == "call_method"
            and t in ACTIVATION_METHODS
        ):
            grp = b.group(first)
            if grp is not None:
                grp.post.append((node.name, None))
                grp.activation = grp.activation or "functional:" + (ACTIVATION_FUNCTIONS.get(t) or str(t).rstrip("_"))
            env[node.name] = first
            continue
        if (
            node.op == "call_function"
            and (t in PASS_FUNCTIONS or t in SCALE_FUNCTIONS)
            or (node.op == "call_method" and t in PASS_METHODS | {"mul", "div"})
        ):
            env[node.name] = first
            continue
        if node.op == "call_function" and t in POOL_FUNCTIONS:
            env[node.name] = first
            continue
        if node.op == "call_method" and t == "mean" or node.op == "call_function" and t is torch.mean:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            if first.spatial and not first.flat and all(isinstance(d, int) and d not in (0, 1, -3, -4) for d in dims):
                keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
                env[node.name] = first if keep else _Space(first.gid)
                continue
            raise UnsupportedModuleError(f"{where}: mean over dims {dims} of a group tensor")
        if node.op == "call_function" and t in FLATTEN_FUNCTIONS or node.op == "call_method" and t in VIEW_METHODS:
            env[node.name] = _Space(first.gid, spatial=first.spatial, flat=first.spatial or first.flat)
            continue
        raise UnsupportedModuleError(
            f"{where}: unsupported {node.op} {getattr(t, '__name__', t)!r}; declare the groups with "
            "pyfusion.graph.declare_groups"
        )
    return b.finish(), gm


def _walk(model: nn.Module) -> dict[str, NeuronGroup]:
    b = _Builder()
    x = _Space(None)
    for path, mod in model.named_modules():
        if any(True for _ in mod.children()):
            continue
        x = b.module(path, mod, x, None, None)
    grp = b.group(x)
    if grp is not None:
        grp.fixed = True
    return b.finish()


def trace_groups(model: nn.Module, *, allow_walk: bool = True) -> FusionGraph:
    """Find the neuron groups of ``model``.

    Args:
        model: a member network (not modified).
        allow_walk: where ``torch.fx.symbolic_trace`` fails (data-dependent control flow), fall back to walking the
            leaf modules in registration order as a chain (valid for Sequential-like models; a warning says so).

    Returns:
        A validated :class:`FusionGraph` (``traced`` holds the fx GraphModule when tracing worked).

    Raises:
        UnsupportedModuleError: an unsupported module (named by path and type) or function.
    """
    try:
        groups, gm = _trace_fx(model)
    except UnsupportedModuleError:
        raise
    except Exception as exc:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        if not allow_walk:
            raise
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); walking the leaf modules "
            "as a chain in registration order instead",
            stacklevel=2,
        )
        graph = FusionGraph(_walk(model), None)
        graph.validate(model)
        return graph
    graph = FusionGraph(groups, gm)
    graph.validate(model)
    return graph
