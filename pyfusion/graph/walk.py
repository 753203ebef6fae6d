"""The module-walk fallback: the leaf modules in registration order, read as a chain.

Only used where no graph capture works (data-dependent control flow), and only when the walked groups pass the
verification (:func:`pyfusion.graph.verify_groups`): a chain reading of a model that is not a chain changes the
function when a group is permuted, so it is refused loudly instead of fusing wrongly. Linear / Conv2d start a new
group and consume the previous one; BatchNorm / LayerNorm add per-neuron parameters; activations, dropout and
pooling pass it through; Flatten expands a convolutional group over the positions of the next Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pyfusion.graph.engine import UnsupportedModuleError
from pyfusion.graph.groups import AxisRef, NeuronGroup

__all__ = ["walk_groups"]


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


def walk_groups(model: nn.Module) -> dict[str, NeuronGroup]:
    """Groups of ``model`` read as a chain of its leaf modules (see the module docstring)."""
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
