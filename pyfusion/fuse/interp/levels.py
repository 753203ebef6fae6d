"""Levels of neuron-interpolation fusion, derived from the neuron-group IR (Luenam et al. 2025, papers.md B.1).

The paper fuses "any architecture modularizable as a DAG of levels": a level ends where a neuron group's
representation is taken as the target, and the fused level is fitted to reproduce the targets from the fused
model's own inputs. Here the levels are read off the exported graph of the IR (:mod:`.program`), with no check of
module types:

**Sites.** Every op that applies a parameter tensor to an input-dependent value: ``linear``, ``conv2d``, ``addmm``
(GPT-2's ``Conv1D``), ``embedding`` (and any other op reading a group's producer tensor). A site is *fitted* in
closed form when its weight is a Linear / Conv2d (``groups = 1``, integer padding) / ``addmm`` matrix used by this
op only and not tied to another tensor (tied embeddings, shared layers and lookups are left to the maps).

**Targets.** From each site the graph is walked forward through the ops that keep its output an affine,
per-element function of it: identity ops (dropout in eval, aliases, casts, row reshapes that keep the neuron dim
last), BatchNorm in eval mode (*absorbed*: set to the identity, the fit reproduces its output), additions /
multiplications by input-independent tensors (biases, a layer-scale gamma, position embeddings: kept, and
compensated in the fit), and residual sums with another input-dependent value of the same group (the other
summand is a *passthrough*, taken from the fused model). The walk stops at a value read more than once or by
anything else (an activation, a normalization, a reshape that moves the neurons, the output). Where it stops is
the site's *target*: the pre-activation of a group (before ReLU / GELU / SiLU / CELU / anything, which is why any
elementwise activation works), a block's residual-stream sum, the logits. Sites ending at the same target are
fitted jointly (a ResNet block's conv2 + projection shortcut).

**Grouping.** A group's *points* are the targets where its neurons appear. A group (with the groups tied to it:
an attention layer's q/k and v/o heads) whose points can all be fitted at once from fused inputs that do not
depend on each other is grouped from the least-squares predictions of its members' neurons (HF / KF as in the
paper). A group whose points depend on each other - a residual stream, whose every block sum reads the earlier
ones - is grouped once, on the members' activations at all of its points (HF's cost on raw activations is the
authors' Git Re-Basin cost; KF's is k-means of the activations, KF-Gradient's grouping), and every block is fitted
to that one grouping: the paper's "group the residual-stream outputs of a block and fit the block to them".

**Steps** (closed form): one per target (or per tie set of co-fitted targets), in graph order.

**Levels** (KF-Gradient): segments of the graph between *cuts*, the targets after which the target's value is
the only parameter-dependent value the rest of the network reads (an articulation of the data flow): every layer
of a chain (MLP, VGG), every block of a ResNet (its output sum), every residual sublayer of a transformer (the
stream after attention and after the MLP: the paper's transformer-block level, split at its mid-block sum), the
logits. A level's parameters are trained together against its cut's targets; its inner groups (a ResNet block's
hidden channels, the heads and the MLP of a transformer block) get no target of their own.

Per family (see :meth:`InterpLevels.describe` for any model): MLP / VGG: one site, target and level per layer
(BatchNorm absorbed); ResNet: stem, then per block its hidden layer(s) and its output sum (conv2 + shortcut, the
identity shortcut a passthrough), the stream grouped on activations; ViT / BERT / GPT-2 / Llama: patch or token
embedding (lookups are not fitted), q / k / v projections jointly per layer (heads as units), the attention output
projection and the MLP output projection into the stream (passthrough: the stream), the MLP input projection(s)
(SwiGLU: gate and up jointly), the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from pyfusion.fuse.interp.program import Program, program_for
from pyfusion.graph.groups import Factor, FusionGraph

__all__ = ["BatchNormRef", "Fit", "InterpLevels", "Level", "Segment", "Site", "Step", "interp_levels"]

aten = torch.ops.aten

_IDENTITY = {
    aten.dropout.default,
    aten.alias.default,
    aten.clone.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_AFFINE_SCALAR = {aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.neg.default}
_BN = {aten.batch_norm.default}
_PRODUCERS = {aten.linear.default: "linear", aten.conv2d.default: "conv2d", aten.addmm.default: "addmm",
              aten.embedding.default: "embedding"}  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """A group's neurons on one dim of a value (a capture point of the IR): ``dim`` (negative), the first index
    ``offset`` and the explicit row-major ``factors`` (see :class:`pyfusion.graph.AxisRef`)."""

    group: str
    dim: int
    offset: int
    factors: tuple[Factor, ...]

    @property
    def length(self) -> int:
        return math.prod(s for _, s in self.factors)


@dataclass(frozen=True)
class BatchNormRef:
    """A BatchNorm (eval mode) absorbed into a fit: its node and state keys (None where absent) and eps."""

    node: str
    weight: str | None
    bias: str | None
    mean: str | None
    var: str | None
    eps: float


@dataclass
class Site:
    """An op applying a parameter tensor to an input-dependent value (see the module docstring).

    Attributes:
        node: the op's node name.
        kind: "linear", "conv2d", "addmm", "embedding" or "other".
        weight, bias: state keys (None where absent / not a state tensor).
        input: the node of the input it reads.
        conv: (stride, padding, dilation) of a conv2d.
        fitted: fitted in closed form; ``reason`` says why not.
        chain: nodes after the site up to its target (inclusive), in order.
        norms: the BatchNorms absorbed on the chain.
        target: the node its walk stops at.
    """

    node: str
    kind: str
    weight: str | None
    bias: str | None
    input: str | None
    conv: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    fitted: bool = False
    reason: str = ""
    chain: list[str] = field(default_factory=list)
    norms: list[BatchNormRef] = field(default_factory=list)
    target: str = ""

    @property
    def out_axis(self) -> int:
        """The weight axis that holds the site's outputs."""
        return 1 if self.kind in ("addmm", "embedding") else 0


@dataclass
class Fit:
    """A target and the sites summed into it.

    Attributes:
        target: the target node.
        sites: every site whose walk ends here (``fitted`` ones are solved jointly).
        chain: nodes between the fitted sites and the target (inclusive).
        passthrough: input-dependent values summed into the target that are not fitted here (a residual stream, a
            lookup, an unfitted site's output), taken from the fused model.
        segments: the groups on the target's neuron dim.
        dim: the neuron dim of the target (negative).
        width: its size.
    """

    target: str
    sites: list[Site]
    chain: list[str]
    passthrough: list[str]
    segments: list[Segment]
    dim: int
    width: int

    @property
    def fitted(self) -> list[Site]:
        return [s for s in self.sites if s.fitted]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(s.group for s in self.segments))


@dataclass
class Step:
    """Closed-form step: fits solved together (and the tie sets first grouped here).

    Attributes:
        fits: the fits.
        decide: tie sets (tuples of group names) grouped at this step.
        how: per decided tie set, "ls" (least-squares predictions from this step's statistics) or "activations".
        position: the first site of the step (the fused model is run up to just before it).
    """

    fits: list[Fit]
    decide: list[tuple[str, ...]]
    how: dict[tuple[str, ...], str]
    position: int


@dataclass
class Level:
    """A KF-Gradient level: the graph between two cuts.

    Attributes:
        start: position of the previous cut (the level reads the fused frontier there).
        end: position of its cut.
        target: the cut node (the logits for the last level).
        steps: indices of the closed-form steps inside.
        params: state keys of the parameters only this level reads (trained).
        last: the level that ends at the logits.
    """

    start: int
    end: int
    target: str
    steps: list[int]
    params: list[str]
    last: bool = False


@dataclass
class InterpLevels:
    """The levels of one architecture (see the module docstring).

    Attributes:
        program: the analysed exported graph.
        graph: the neuron groups.
        sites: every site by node.
        fits: by target node, in graph order.
        steps: closed-form steps in execution order.
        levels: KF-Gradient levels in order.
        points: group -> its target nodes (in order).
        tie_sets: the graph's tie sets (tuples of group names).
        how: tie set -> "ls" or "activations" (how it is grouped).
    """

    program: Program
    graph: FusionGraph
    sites: dict[str, Site]
    fits: dict[str, Fit]
    steps: list[Step]
    levels: list[Level]
    points: dict[str, list[str]]
    tie_sets: list[tuple[str, ...]]
    how: dict[tuple[str, ...], str]

    def segments_at(self, node: str) -> list[Segment]:
        return self.fits[node].segments

    def describe(self) -> str:
        """A readable listing: per level its cut, per step its fits (sites, fitted or why not, passthroughs)."""
        prog = self.program
        lines = []
        for li, lv in enumerate(self.levels):
            lines.append(f"level {li}: ({lv.start}, {lv.end}] -> {lv.target} ({len(lv.params)} parameters)")
            for si in lv.steps:
                st = self.steps[si]
                dec = ", ".join(f"{'+'.join(t)} by {st.how[t]}" for t in st.decide)
                lines.append(f"  step {si}" + (f" groups {dec}" if dec else ""))
                for f in st.fits:
                    sites = ", ".join(
                        f"{s.kind} {s.weight or s.node}" + ("" if s.fitted else f" (not fitted: {s.reason})")
                        for s in f.sites
                    )
                    extra = f" + passthrough {f.passthrough}" if f.passthrough else ""
                    grp = ",".join(f.groups) or "output"
                    lines.append(f"    {f.target}@{prog.pos[f.target]} [{grp}] <- {sites}{extra}")
        return "\n".join(lines)


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value
    return out


def _state_key(prog: Program, arg: Any, user: fx.Node) -> str | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target in prog.state_keys:
        return prog.key_for(arg, user)
    return None


def _factors(graph: FusionGraph, group: str, pattern: Any) -> tuple[Factor, ...]:
    if pattern is not None:
        return tuple(pattern)
    g = graph.groups[group]
    return (("unit", g.units),) + ((("inner", g.unit_size),) if g.unit_size > 1 else ())


def _pre_captures(graph: FusionGraph) -> dict[str, dict[str, list[Segment]]]:
    """node -> group -> the group's segments on that value (q and k rows of a packed qkv are two)."""
    out: dict[str, dict[str, list[Segment]]] = {}
    for g in graph.groups.values():
        for c in g.captures:
            if c.kind == "pre" and not c.mean_dims:  # samples along another group's neurons are not aligned
                seg = Segment(g.name, c.dim, c.offset, _factors(graph, g.name, c.pattern))
                lst = out.setdefault(c.node, {}).setdefault(g.name, [])
                if seg not in lst:
                    lst.append(seg)
    return out


def _chain_op(prog: Program, w: fx.Node, v: fx.Node) -> str | None:
    """How ``w`` transforms ``v`` on a site's chain: "identity", "view", "bn", "affine", "residual" or None."""
    t = w.target
    if w.op != "call_function":
        return None
    if t in _IDENTITY:
        if w.args[0] is not v:
            return None
        if t is aten.dropout.default and bool(_bind(w)["train"]):
            return None
        return "identity"
    if t in _VIEWS:
        return "view" if w.args[0] is v else None
    if t in _BN:
        b = _bind(w)
        return "bn" if b["input"] is v and not bool(b["training"]) else None
    if t in _AFFINE_SCALAR:
        return "affine" if w.args[0] is v else None
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
        a, b = w.args[0], w.args[1]
        if a is v and b is v:
            return None
        other = b if a is v else a
        if t is aten.div.Tensor and a is not v:
            return None
        if not isinstance(other, fx.Node) or other.name not in prog.dep:
            return "affine"
        return "residual" if t in (aten.add.Tensor, aten.sub.Tensor) else None
    return None


def _walk(prog: Program, caps: dict[str, dict[str, list[Segment]]], site: Site, neuron_dim: int) -> None:
    """Walk forward from a site to its target (fills ``chain``, ``norms``, ``target``)."""
    v = prog.by_name[site.node]
    groups = set(caps.get(v.name, {}))
    site.target = v.name
    pending: list[str] = []
    pend_norms: list[BatchNormRef] = []
    while True:
        users = prog.users(v.name)
        if len(users) != 1 or users[0].op != "call_function":
            break
        w = users[0]
        kind = _chain_op(prog, w, v)
        if kind is None:
            break
        sv, sw = prog.shape(v.name), prog.shape(w.name)
        if sv is None or sw is None:
            break
        if kind == "view":
            if neuron_dim != -1 or sv[-1] != sw[-1] or math.prod(sv) != math.prod(sw):
                break
        elif sw != sv:
            break
        if kind == "bn":
            if len(sv) + neuron_dim != 1:  # BatchNorm normalises dim 1: it must be the neuron dim
                break
            b = _bind(w)
            pend_norms.append(
                BatchNormRef(w.name, _state_key(prog, b["weight"], w), _state_key(prog, b["bias"], w),
                             _state_key(prog, b["running_mean"], w), _state_key(prog, b["running_var"], w),
                             float(b["eps"]))
            )  # fmt: skip
        here = caps.get(w.name, {})
        if groups and kind in ("bn", "affine", "residual") and not groups <= set(here):
            break
        pending.append(w.name)
        if kind not in ("view", "identity") or not groups:
            site.chain.extend(pending)
            site.norms.extend(pend_norms)
            pending, pend_norms = [], []
            site.target = w.name
        v = w


def _sites(prog: Program, graph: FusionGraph) -> dict[str, Site]:
    """Every site of the graph, with its fittability."""
    producer_keys = {r.key for g in graph.groups.values() for r in g.producers}
    tied = {k for keys in graph.tied_params for k in keys}
    uses: dict[str, int] = {}
    for n in prog.nodes:
        if n.op == "get_attr" and n.target in prog.state_keys:
            uses[str(n.target)] = uses.get(str(n.target), 0) + len(prog.users(n.name))
    out: dict[str, Site] = {}
    for n in prog.nodes:
        if n.op != "call_function" or n.name not in prog.dep:
            continue
        kind = _PRODUCERS.get(n.target)
        if kind is not None:
            b = _bind(n)
            if kind == "linear":
                w, bias, inp = b["weight"], b["bias"], b["input"]
            elif kind == "conv2d":
                w, bias, inp = b["weight"], b["bias"], b["input"]
            elif kind == "addmm":
                w, bias, inp = b["mat2"], b["self"], b["mat1"]
            else:
                w, bias, inp = b["weight"], None, b["indices"]
            wkey = _state_key(prog, w, n)
            if wkey is None:
                kind = None
        if kind is None:
            reads = [a for a in n.all_input_nodes if _state_key(prog, a, n) in producer_keys]
            if not reads:
                continue
            site = Site(n.name, "other", _state_key(prog, reads[0], n), None, None, reason=f"op {n.target}")
            out[n.name] = site
            continue
        site = Site(n.name, kind, wkey, _state_key(prog, bias, n), inp.name if isinstance(inp, fx.Node) else None)
        reason = ""
        if kind == "embedding":
            reason = "a lookup table (no input to fit from)"
        elif kind == "conv2d":
            stride, padding, dilation, groups = b["stride"], b["padding"], b["dilation"], b["groups"]
            if int(groups) != 1 or not all(isinstance(p, int) for p in padding):
                reason = f"conv2d with groups={groups}, padding={padding!r}"
            else:
                site.conv = (tuple(stride), tuple(padding), tuple(dilation))
        elif kind == "addmm" and (_bind(n)["beta"] != 1 or _bind(n)["alpha"] != 1):
            reason = "addmm with beta / alpha != 1"
        if not reason:
            if wkey in tied or (site.bias is not None and site.bias in tied):
                reason = "a tied parameter (fitting would untie it)"
            elif uses.get(wkey, 0) != 1 or (site.bias is not None and uses.get(site.bias, 0) != 1):
                reason = "a parameter read by more than one op"
            elif bias is not None and site.bias is None:
                reason = "a bias that is not a parameter"
            elif site.input is None or site.input not in prog.dep:
                reason = "no input-dependent input"
        site.fitted = not reason
        site.reason = reason
        out[n.name] = site
    return out


def _neuron_dim(kind: str) -> int:
    return -3 if kind == "conv2d" else -1


def interp_levels(model: nn.Module, graph: FusionGraph) -> InterpLevels:
    """The levels of ``model`` (a member) for its traced neuron groups ``graph``.

    Raises:
        ValueError: a graph without an exported program; a group none of whose producer ops reaches a capture of
            it (named); tied groups whose fits depend on each other.
    """
    prog = program_for(graph, model)
    caps = _pre_captures(graph)
    sites = _sites(prog, graph)
    for s in sites.values():
        segs = caps.get(s.node, {})
        dim = next(iter(segs.values()))[0].dim if segs else _neuron_dim(s.kind)
        _walk(prog, caps, s, dim)
    for s in sites.values():  # BatchNorms shared with another use cannot be absorbed
        for bn in s.norms:
            keys = [k for k in (bn.weight, bn.bias, bn.mean, bn.var) if k is not None]
            if any(_uses(prog, k) != 1 for k in keys) and s.fitted:
                s.fitted, s.reason = False, f"BatchNorm {bn.node} shares its parameters"
    # fits: sites grouped by target
    by_target: dict[str, list[Site]] = {}
    for s in sites.values():
        by_target.setdefault(s.target, []).append(s)
    fits: dict[str, Fit] = {}
    for tgt in sorted(by_target, key=prog.pos.get):
        ss = by_target[tgt]
        segs = [sg for lst in caps.get(tgt, {}).values() for sg in lst]
        dims = {sg.dim for sg in segs}
        if len(dims) > 1:
            raise ValueError(f"target {tgt!r} holds groups on different dims {sorted(dims)}")
        dim = dims.pop() if dims else _neuron_dim(ss[0].kind)
        shape = prog.shape(tgt)
        if shape is None:
            raise ValueError(f"target {tgt!r} has no tensor shape")
        chain_nodes: set[str] = set()
        for s in ss:
            if s.fitted:
                chain_nodes.update(s.chain)
        fitted_nodes = {s.node for s in ss if s.fitted}
        passthrough: list[str] = []
        for c in sorted(chain_nodes, key=prog.pos.get):
            for a in prog.by_name[c].all_input_nodes:
                if a.name in prog.dep and a.name not in chain_nodes and a.name not in fitted_nodes:
                    passthrough.append(a.name)
        chain = sorted(chain_nodes, key=prog.pos.get)
        segs = sorted(segs, key=lambda x: x.offset)
        fits[tgt] = Fit(tgt, ss, chain, list(dict.fromkeys(passthrough)), segs, dim, int(shape[dim]))
    points: dict[str, list[str]] = {g: [] for g in graph.groups}
    for tgt, f in fits.items():
        for g in f.groups:
            points[g].append(tgt)
    for g, pts in points.items():
        if not pts:
            raise ValueError(
                f"group {g!r}: no producer op of it reaches a value where its neurons are observed; neuron "
                "interpolation cannot fit or group it (declare the model's groups differently or use another method)"
            )
    tie_sets = [tuple(ts) for ts in graph.tie_sets()]
    how: dict[tuple[str, ...], str] = {}
    for ts in tie_sets:
        how[ts] = "ls" if _co_fittable(prog, [fits[p] for g in ts for p in points[g]]) else "activations"
    steps = _steps(prog, fits, points, tie_sets, how)
    levels = _levels(prog, fits, steps, model)
    return InterpLevels(prog, graph, sites, fits, steps, levels, points, tie_sets, how)


def _uses(prog: Program, key: str) -> int:
    return sum(len(prog.users(n.name)) for n in prog.nodes if n.op == "get_attr" and n.target == key)


def _needs(f: Fit, sites: Sequence[Site] | None = None) -> list[str]:
    """Fused values a fit reads: its fitted sites' inputs and its passthroughs."""
    ss = f.fitted if sites is None else sites
    return list(dict.fromkeys([s.input for s in ss if s.input] + f.passthrough))


def _co_fittable(prog: Program, fs: list[Fit]) -> bool:
    """The fits can be solved at once: each has a fitted site, and none reads a value computed from another's."""
    fs = list({f.target: f for f in fs}.values())
    if any(not f.fitted for f in fs):
        return False
    site_nodes = {s.node for f in fs for s in f.fitted}
    return not (prog.ancestors(n for f in fs for n in _needs(f)) & site_nodes)


def _steps(
    prog: Program,
    fits: dict[str, Fit],
    points: dict[str, list[str]],
    tie_sets: list[tuple[str, ...]],
    how: dict[tuple[str, ...], str],
) -> list[Step]:
    tie_of = {g: ts for ts in tie_sets for g in ts}
    merged: dict[str, int] = {}
    groups_steps: list[list[Fit]] = []
    for ts in tie_sets:
        if how[ts] != "ls":
            continue
        tgts = sorted({p for g in ts for p in points[g]}, key=prog.pos.get)
        idx = None
        for t in tgts:
            if t in merged:
                idx = merged[t]
        if idx is None:
            idx = len(groups_steps)
            groups_steps.append([])
        for t in tgts:
            if t not in merged:
                merged[t] = idx
                groups_steps[idx].append(fits[t])
    for t, f in fits.items():
        if t not in merged:
            merged[t] = len(groups_steps)
            groups_steps.append([f])

    def first(fs: list[Fit]) -> int:
        return min(prog.pos[s.node] for f in fs for s in f.sites)

    ordered = sorted(groups_steps, key=first)
    steps: list[Step] = []
    decided: set[tuple[str, ...]] = set()
    for fs in ordered:
        dec: list[tuple[str, ...]] = []
        for f in fs:
            for g in f.groups:
                ts = tie_of[g]
                if ts not in decided:
                    decided.add(ts)
                    dec.append(ts)
        pos = min((prog.pos[s.node] for f in fs for s in f.fitted), default=first(fs))
        steps.append(Step(list(fs), dec, {t: how[t] for t in dec}, pos))
    # a step may only read fused values that no later step's fitted site computes
    later_sites: set[str] = set()
    for st in reversed(steps):
        needs = [n for f in st.fits for n in _needs(f)]
        bad = prog.ancestors(needs) & later_sites if needs else set()
        if bad:
            raise ValueError(
                f"the fits at {[f.target for f in st.fits]} read values computed by sites fitted later ({sorted(bad)});"
                " tied groups whose producers depend on each other are not supported by neuron interpolation"
            )
        later_sites.update(s.node for f in st.fits for s in f.fitted)
    return steps


def _levels(prog: Program, fits: dict[str, Fit], steps: list[Step], model: nn.Module) -> list[Level]:
    """KF-Gradient levels: cut at every target whose value is the only parameter-dependent value read later."""
    cuts = []
    for t in fits:
        p = prog.pos[t]
        live = {n for n in prog.frontier(p) if n in prog.pdep}
        if live <= {t} and t != prog.logits:
            cuts.append(p)
    end = max(prog.pos[o] for o in prog.outputs)
    cuts = sorted(set(cuts))
    cuts = [c for c in cuts if c < end] + [end]
    params = set(dict(model.named_parameters(remove_duplicate=False)))
    key_nodes: dict[str, list[int]] = {}
    for n in prog.nodes:
        if n.op == "get_attr" and n.target in params:
            for u in prog.users(n.name):
                key_nodes.setdefault(str(n.target), []).append(
                    prog.pos[u.name] if u.op != "output" else len(prog.nodes)
                )
    levels = []
    start = max(prog.pos[p.name] for p in prog.placeholders)
    for c in cuts:
        inside = [k for k, ps in key_nodes.items() if ps and all(start < p <= c for p in _static_users(prog, k, ps))]
        lv = Level(start, c, prog.nodes[c].name if c != end else prog.logits, [], sorted(inside), last=c == end)
        levels.append(lv)
        start = c
    for i, st in enumerate(steps):
        lv = next((lv for lv in levels if lv.start < st.position <= lv.end), levels[-1])
        lv.steps.append(i)
    return levels


def _static_users(prog: Program, key: str, direct: list[int]) -> list[int]:
    """Positions of the input-dependent nodes reading a tensor (through input-independent ops such as a
    transpose of the weight)."""
    out = []
    stack = [prog.nodes[p] for p in direct if p < len(prog.nodes)]
    seen: set[str] = set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in prog.dep or n.op == "output":
            out.append(prog.pos[n.name])
        else:
            stack.extend(prog.users(n.name))
    return out or direct
