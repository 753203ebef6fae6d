"""Running a model level by level: the exported ATen graph of the neuron-group IR, executed range by range.

Neuron interpolation fits the fused network level by level on the *fused* model's own inputs (papers.md B.1), so it
must run any architecture up to a point, stop, change weights, and continue from there. The IR already holds the
architecture's ``torch.export`` program (:attr:`pyfusion.graph.FusionGraph.traced`); :class:`Program` analyses its
unlifted graph (node order, which values depend on the input, last uses, the logits) and :class:`Runner` executes
one set of weights (a member's, or the fused model's state dict) through it, node range by node range, on all
calibration samples in chunks, keeping only the *frontier*: the input-dependent values that later nodes still read
(a residual stream's skip, an attention mask built from the input, the raw input a late layer concatenates).

Details that make this exact and generic:

* Parameters and buffers are read from the runner's state dict at every use (``get_attr``), and values that depend
  on no input (weight transposes, rotary tables, masks built from shapes) are recomputed in every chunk, so a
  weight written after a level was run never leaves a stale copy behind.
* The program is exported with static shapes (view sizes hold the batch size), so each chunk size has its own
  program (exported once and cached; every node must match the IR program's by name and op). Chunks are padded
  to the program's batch size by repeating their last sample and the padded rows are dropped: in eval mode the
  samples do not interact, so this is exact.
* Stored values have their batch dim moved first (``nn.MultiheadAttention`` computes in ``(T, B, d)``) and carry
  ``m`` rows per sample (``m = 1`` for most; GPT-2's ``view(-1, d)`` of a ``(B, T, d)`` tensor has ``m = T``). The
  batch dim of every value is read off the program exported at two batch sizes; a value without one (a batch
  statistic) is an error. A merged dim may hold the samples inner (``nn.MultiheadAttention``'s ``(T * B, d)``
  before its output projection): such values are found by evaluation (:meth:`Runner.token_major`) and stored
  sample-major too, so padding, chunk slices and sample selections stay exact.
* Side-effect checks of the export (``_guards_fn``, ``aten._assert_tensor_metadata``) are not executed and do not
  count as users of a value.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from pyfusion.graph.groups import FusionGraph

__all__ = ["Program", "Runner", "model_state", "program_for"]

aten = torch.ops.aten
_SKIP_TARGETS = {aten._assert_tensor_metadata.default}


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of ``model`` under every name (tied tensors under each of theirs)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _skipped(node: fx.Node) -> bool:
    return node.op == "call_module" or (node.op == "call_function" and node.target in _SKIP_TARGETS)


def _signature(nodes: Sequence[fx.Node]) -> list[tuple[str, str, str]]:
    return [(n.op, n.name, str(n.target)) for n in nodes if n.op != "get_attr"]


class Program:
    """Analysis of the exported graph of one architecture (shared by every member and the fused model).

    Attributes:
        nodes: the unlifted graph's nodes in topological order (index = position).
        pos: node name -> position.
        dep: names of the values that depend on the network input (the only ones ever stored).
        pdep: names of the values that depend on a parameter or buffer.
        last_use: name -> position of its last real user (``len(nodes)`` for values the output returns).
        batch: the batch size the IR program was exported with.
        logits: name of the first floating output tensor (the prediction importance and the last level use).
        outputs: names of the output tensors (in output order).
    """

    def __init__(self, graph: FusionGraph, member0: nn.Module):
        traced = graph.traced
        if traced is None or not hasattr(traced, "program"):
            raise ValueError(
                "neuron interpolation runs the model level by level through its exported graph: the graph must come "
                f"from pyfusion.graph.trace_groups with a torch.export capture (got a graph with source "
                f"{graph.source!r}); pass graph=None to let pyfusion.fuse trace the members"
            )
        if graph.example_inputs is None:
            raise ValueError("the graph has no example_inputs (needed to export other batch sizes)")
        self.graph = graph
        self.member0 = member0
        ep = traced.program
        cache = ep.__dict__.setdefault("_pyfusion_interp_gm", {})
        if "gm" not in cache:
            cache["gm"] = ep.module()
        self.gm: fx.GraphModule = cache["gm"]
        self._programs: dict[int, list[fx.Node]] = cache.setdefault("by_batch", {})
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.pos = {n.name: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output_node = next(n for n in self.nodes if n.op == "output")
        args, kwargs = graph.example_inputs
        leaves = [x for x in pytree.tree_leaves((tuple(args), dict(kwargs)))]
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if not tensors:
            raise ValueError("the graph's example inputs hold no tensor")
        self.batch = int(tensors[0].shape[0])
        self._programs.setdefault(self.batch, self.nodes)
        self._batch_dims: dict[str, tuple[int, int] | str] | None = None
        # values whose merged batch dim is token-major ((m, B) flattened; see Runner.token_major), once per program
        self._token_major: set[str] | None = None
        self.state_keys = set(model_state(member0))
        # a tied tensor is one get_attr in the graph; each use means the name of its own module (the embedding
        # reads ``wte.weight``, the head ``lm_head.weight``), which fusion may untie
        self._tied_use: dict[tuple[str, str], str] = {}
        tied = {k: keys for keys in graph.tied_params for k in keys}
        for n in self.nodes:
            if n.op == "get_attr" and n.target in tied:
                pname = str(n.target).rpartition(".")[2]
                for u in n.users:
                    stack = list(u.meta.get("nn_module_stack", {}).values())
                    path = stack[-1][0] if stack else ""
                    key = f"{path}.{pname}" if path else pname
                    if key in tied[n.target]:
                        self._tied_use[(u.name, n.name)] = key
        self.dep: set[str] = set()
        self.pdep: set[str] = set()
        for n in self.nodes:
            ins = n.all_input_nodes
            if n.op == "placeholder" or any(i.name in self.dep for i in ins):
                self.dep.add(n.name)
            if (n.op == "get_attr" and n.target in self.state_keys) or any(i.name in self.pdep for i in ins):
                self.pdep.add(n.name)
        end = len(self.nodes)
        self.last_use: dict[str, int] = {}
        for n in self.nodes:
            users = [u for u in n.users if not _skipped(u)]
            self.last_use[n.name] = max((end if u.op == "output" else self.pos[u.name]) for u in users) if users else -1
        outs = [x for x in pytree.tree_leaves(self.output_node.args) if isinstance(x, fx.Node)]
        self.outputs = [o.name for o in outs]
        # the prediction: the first floating output of at least 2 dims (a Hugging Face output may start with a loss)
        self.logits = next((o.name for o in outs if _is_float(o) and o.meta["val"].dim() >= 2), None)
        if self.logits is None:
            raise ValueError("the model returns no floating-point tensor (logits)")

    # ---- structure -------------------------------------------------------------------------------------------
    def key_for(self, attr: fx.Node, user: fx.Node) -> str:
        """The state key a ``get_attr`` node means for one of its users (tied tensors: the user's module's name)."""
        return self._tied_use.get((user.name, attr.name), str(attr.target))

    def users(self, name: str) -> list[fx.Node]:
        """The real users of a value (no side-effect checks)."""
        return [u for u in self.by_name[name].users if not _skipped(u)]

    def shape(self, name: str) -> tuple[int, ...] | None:
        val = self.by_name[name].meta.get("val")
        return tuple(val.shape) if isinstance(val, Tensor) else None

    def batch_dim(self, name: str, example: Callable[[int], tuple[tuple, dict]]) -> tuple[int, int]:
        """(d, m): the value's samples lie along dim ``d``, ``m`` consecutive entries per sample (``m > 1`` where
        the batch is merged with another dim, e.g. GPT-2's ``view(-1, d)``). Read off the shapes of the program at
        two batch sizes (one more export, once per architecture).

        Raises:
            ValueError: a value without a batch dimension (cannot be carried between levels in chunks).
        """
        if self._batch_dims is None:
            other = next((b for b in self._programs if b != self.batch), self.batch + 1)
            nodes = self.nodes_for(other, example)
            dims: dict[str, tuple[int, int] | str] = {}
            for a, b in zip(self.nodes, nodes):
                va, vb = a.meta.get("val"), b.meta.get("val")
                if a.name not in self.dep or not isinstance(va, Tensor) or not isinstance(vb, Tensor):
                    continue
                diff = [i for i, (x, y) in enumerate(zip(va.shape, vb.shape)) if x != y]
                if va.dim() != vb.dim() or len(diff) != 1:
                    dims[a.name] = f"shapes {tuple(va.shape)} / {tuple(vb.shape)} at batch {self.batch} / {other}"
                    continue
                d = diff[0]
                m, r = divmod(int(va.shape[d]), self.batch)
                m2, r2 = divmod(int(vb.shape[d]), other)
                dims[a.name] = (d, m) if r == 0 and r2 == 0 and m == m2 else f"dim {d} of {tuple(va.shape)}"
            self._batch_dims = dims
        got = self._batch_dims.get(name)
        if not isinstance(got, tuple):
            raise ValueError(
                f"node {name!r} has no batch dimension ({got}); neuron interpolation cannot carry it between levels"
            )
        return got

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """All nodes the given ones are computed from (inclusive)."""
        out: set[str] = set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            stack.extend(i.name for i in self.by_name[n].all_input_nodes)
        return out

    def frontier(self, position: int) -> set[str]:
        """The input-dependent values computed at or before ``position`` that a later node reads."""
        return {n.name for n in self.nodes[: position + 1] if n.name in self.dep and self.last_use[n.name] > position}

    # ---- programs per batch size -----------------------------------------------------------------------------
    def nodes_for(self, batch: int, example: Callable[[int], tuple[tuple, dict]]) -> list[fx.Node]:
        """The nodes of the program exported at ``batch`` samples (aligned by position with :attr:`nodes`)."""
        if batch not in self._programs:
            from pyfusion.graph.export import export_program

            args, kwargs = example(batch)
            ep = export_program(self.member0, args, kwargs)
            nodes = list(ep.module().graph.nodes)
            if _signature(nodes) != _signature(self.nodes):
                raise ValueError(
                    f"the model exports to a different graph for a batch of {batch} samples than for "
                    f"{self.batch} (its forward depends on the batch size); neuron interpolation needs one graph"
                )
            by = {n.name: n for n in nodes}
            self._programs[batch] = [by[n.name] for n in self.nodes]
        return self._programs[batch]

    def constant(self, target: str) -> Any:
        """A ``get_attr`` target that is not a member tensor (a lifted constant, a submodule of a higher-order op)."""
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj


def _is_float(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return isinstance(val, Tensor) and val.is_floating_point()


def program_for(graph: FusionGraph, member0: nn.Module) -> Program:
    """The :class:`Program` of a traced graph (cached on the exported program)."""
    ep = graph.traced.program if graph.traced is not None else None
    cache = ep.__dict__.setdefault("_pyfusion_interp_program", {}) if ep is not None else {}
    key = id(graph)
    prog = cache.get(key)
    if prog is None or prog.graph is not graph:
        prog = Program(graph, member0)
        cache.clear()
        cache[key] = prog
    return prog


class Runner:
    """One set of weights run through a :class:`Program`, range by range, on all calibration samples.

    Args:
        prog: the program.
        state: parameters and buffers by name (a member's, or the fused model's; read at every use).
        inputs: the placeholder values for all N samples (batch-major), in placeholder order.
        chunk: samples per forward chunk.
        example: ``batch -> (args, kwargs)``, inputs to export the program at another batch size.
    """

    def __init__(
        self,
        prog: Program,
        state: Mapping[str, Tensor],
        inputs: Sequence[Any],
        chunk: int,
        example: Callable[[int], tuple[tuple, dict]],
    ):
        if len(inputs) != len(prog.placeholders):
            raise ValueError(f"the program has {len(prog.placeholders)} inputs; got {len(inputs)}")
        self.prog = prog
        self.state = state
        self.n = int(next(x for x in inputs if isinstance(x, Tensor)).shape[0])
        self.chunk = int(chunk)
        self.example = example
        self.env: dict[str, Any] = {p.name: v for p, v in zip(prog.placeholders, inputs)}
        self.position = max(prog.pos[p.name] for p in prog.placeholders)
        self._plans: dict[tuple, tuple[list[int], list[str]]] = {}

    # ---- execution -------------------------------------------------------------------------------------------
    def _plan(self, positions: Sequence[int], lo: int) -> tuple[list[int], list[str]]:
        """Positions to evaluate (the input-independent ancestors first, then ``positions``) and the frontier
        values read (input-dependent values at or before ``lo``)."""
        prog = self.prog
        rng = [p for p in positions if prog.nodes[p].op == "call_function" and not _skipped(prog.nodes[p])]
        inside = {prog.nodes[p].name for p in rng}
        static: set[int] = set()
        reads: set[str] = set()
        stack = [i for p in rng for i in prog.nodes[p].all_input_nodes]
        seen: set[str] = set()
        while stack:
            node = stack.pop()
            if node.name in seen or node.name in inside:
                continue
            seen.add(node.name)
            p = prog.pos[node.name]
            if node.name in prog.dep:
                reads.add(node.name)
            elif node.op == "call_function":
                static.add(p)
                stack.extend(node.all_input_nodes)
        return sorted(static) + rng, sorted(reads, key=prog.pos.get)

    def _range_plan(self, lo: int, hi: int) -> tuple[list[int], list[str]]:
        key = (lo, hi)
        if key not in self._plans:
            self._plans[key] = self._plan(range(lo + 1, hi + 1), lo)
        return self._plans[key]

    def run_chunk(
        self,
        lo: int,
        hi: int,
        env: Mapping[str, Any],
        batch: int,
        want: Iterable[str],
        hooks: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        state: Mapping[str, Tensor] | None = None,
        order: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Evaluate the nodes (lo, hi] (or the positions ``order``) on one chunk of ``batch`` samples whose
        frontier values are ``env``.

        ``hooks`` replace a node's value right after it is computed (importance probes); ``state`` overrides the
        runner's state (training). Returns the values named in ``want``.
        """
        prog = self.prog
        nodes = prog.nodes_for(batch, self.example)
        if order is None:
            order, _reads = self._range_plan(lo, hi)
        st = self.state if state is None else state
        local: dict[str, Any] = dict(env)
        base = prog.nodes

        for p in order:
            node = nodes[p]
            user = base[p]

            def look(n: fx.Node, user: fx.Node = user) -> Any:
                if n.name in local:
                    return local[n.name]
                if n.op == "get_attr":
                    t = st.get(prog.key_for(n, user))
                    return prog.constant(n.target) if t is None else t
                raise KeyError(f"value {n.name!r} is not available (a bug in the level ranges)")

            args = fx.node.map_arg(node.args, look)
            kwargs = fx.node.map_arg(node.kwargs, look)
            val = node.target(*args, **kwargs)
            if hooks is not None and node.name in hooks:
                val = hooks[node.name](val)
            local[node.name] = val
        return {w: local[w] for w in want}

    def evaluate(
        self, names: Sequence[str], env: Mapping[str, Any], batch: int, state: Mapping[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """Evaluate the named nodes (and the input-independent values they read) on inputs ``env`` given for every
        input-dependent value they read (e.g. a fit's chain on probe values)."""
        prog = self.prog
        positions = sorted(prog.pos[n] for n in names)
        order, reads = self._plan(positions, -1)
        missing = [r for r in reads if r not in env]
        if missing:
            raise KeyError(f"evaluate: no value given for {missing}")
        return self.run_chunk(-1, -1, env, batch, names, state=state, order=order)

    def batch_dim(self, name: str) -> int:
        """The dim that holds the samples of a value (stored values have it moved to dim 0)."""
        if self.prog.by_name[name].op == "placeholder":
            return 0
        return self.prog.batch_dim(name, self.example)[0]

    def token_major(self) -> set[str]:
        """The values whose batch dim is merged with another dim (``m > 1``) with the samples *inner*: ``(m, B)``
        flattened, e.g. ``nn.MultiheadAttention``'s ``permute(2, 0, 1, 3).reshape(T * B, d)`` before its output
        projection, against GPT-2's sample-major ``view(B * T, d)``. Shapes cannot tell the two apart, so it is
        read off two evaluations of the program on one chunk of calibration samples, the second with the samples
        rolled by one: a layout holds when the rolled value is the value with its sample blocks rolled. A merged
        value for which neither layout holds has no batch layout (an error where it must be stored).

        With one calibration sample (every chunk the same sample) the two cannot be told apart: sample-major.
        """
        prog = self.prog
        if prog._token_major is not None:
            return prog._token_major
        names = [nd.name for nd in prog.nodes if nd.name in prog.dep and nd.op == "call_function" and not _skipped(nd)]
        merged = []
        for name in names:
            try:
                if prog.batch_dim(name, self.example)[1] > 1:
                    merged.append(name)
            except ValueError:
                continue
        out: set[str] = set()
        if merged:
            b = prog.batch
            ph = [p.name for p in prog.placeholders]
            env = self.chunk_env(ph, 0, min(b, self.n), b, plain=True)
            roll = torch.roll(torch.arange(b), 1)
            rolled = {k: v[roll] if isinstance(v, Tensor) else v for k, v in env.items()}  # placeholders: batch dim 0
            start = max(prog.pos[p] for p in ph)
            end = max(prog.pos[n] for n in merged)
            with torch.no_grad():
                one = self.run_chunk(start, end, env, b, merged)
                two = self.run_chunk(start, end, rolled, b, merged)
            for name in merged:
                d, m = prog.batch_dim(name, self.example)
                u, v = one[name].movedim(d, 0), two[name].movedim(d, 0)
                rest = tuple(u.shape[1:])
                tol = 1e-5 * (float(u.abs().max()) if u.numel() else 1.0) + 1e-30
                sample = bool(((u.reshape(b, m, *rest)[roll] - v.reshape(b, m, *rest)).abs() <= tol).all())
                token = bool(((u.reshape(m, b, *rest)[:, roll] - v.reshape(m, b, *rest)).abs() <= tol).all())
                if token and not sample:
                    out.add(name)
                elif not sample:
                    assert prog._batch_dims is not None
                    prog._batch_dims[name] = f"dim {d} of {tuple(one[name].shape)} mixes samples with another dim"
        prog._token_major = out
        return out

    def to_stored(self, name: str, value: Any) -> Any:
        """A value in the graph's layout as stored rows: batch dim first, ``m`` consecutive rows per sample."""
        if not isinstance(value, Tensor):
            return value
        d = self.batch_dim(name)
        v = value.movedim(d, 0) if d else value
        if self.prog.by_name[name].op != "placeholder" and name in self.token_major():
            m = self.prog.batch_dim(name, self.example)[1]
            v = v.reshape(m, v.shape[0] // m, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        return v

    def to_graph(self, name: str, rows: Any) -> Any:
        """Stored rows (sample-major) back in the graph's layout: the inverse of :meth:`to_stored`."""
        if not isinstance(rows, Tensor):
            return rows
        v = rows
        if self.prog.by_name[name].op != "placeholder" and name in self.token_major():
            m = self.prog.batch_dim(name, self.example)[1]
            v = v.reshape(v.shape[0] // m, m, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        d = self.batch_dim(name)
        return v.movedim(0, d) if d else v

    def chunk_env(
        self,
        names: Sequence[str],
        start: int,
        real: int,
        size: int,
        source: Mapping[str, Any] | None = None,
        plain: bool = False,
    ) -> dict[str, Any]:
        """The stored values (of ``source``, default the frontier) of samples [start, start + real), padded to
        ``size`` samples and in the graph's own layout (:meth:`to_graph`; ``plain``: batch dim back in place
        only, for values known to be sample-major such as the inputs)."""
        src = self.env if source is None else source
        env = {}
        for name in names:
            v = _rows(src[name], self.n, start, real, size)
            if plain or not isinstance(v, Tensor):
                d = self.batch_dim(name) if isinstance(v, Tensor) else 0
                env[name] = v.movedim(0, d) if d else v
            else:
                env[name] = self.to_graph(name, v)
        return env

    def stored(self, name: str, value: Any, real: int, size: int) -> Any:
        """A chunk's value of a node as stored: batch dim first, padding removed."""
        return _unpad(self.to_stored(name, value), real, size)

    def _chunks(self, names: Sequence[str]) -> Iterable[tuple[int, int, dict[str, Any]]]:
        """(start, real size, env) per chunk: the frontier values sliced, the last chunk padded."""
        c = self.chunk
        for s in range(0, self.n, c):
            real = min(c, self.n - s)
            yield s, real, self.chunk_env(names, s, real, c)

    def compute(
        self,
        lo: int,
        hi: int,
        want: Sequence[str],
        hooks: Callable[[int, int], Mapping[str, Callable[[Tensor], Tensor]]] | None = None,
        grad: bool = False,
    ) -> dict[str, Any]:
        """Evaluate (lo, hi] on all samples from the frontier at ``lo`` (which must be :attr:`env`); the values
        named in ``want`` for all samples (the padding removed)."""
        _order, reads = self._range_plan(lo, hi)
        missing = [r for r in reads if r not in self.env]
        if missing:
            raise KeyError(f"values {missing} were dropped before the range ({lo}, {hi}] (a bug in the levels)")
        parts: dict[str, list[Any]] = {w: [] for w in want}
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for s, real, env in self._chunks(reads):
                out = self.run_chunk(lo, hi, env, self.chunk, want, None if hooks is None else hooks(s, real))
                for w in want:
                    parts[w].append(self.stored(w, out[w], real, self.chunk))
        return {w: _cat(v) for w, v in parts.items()}

    def advance(self, upto: int, keep: Iterable[str] = ()) -> None:
        """Compute every node up to position ``upto``; keep the frontier (and the values named in ``keep``)."""
        if upto < self.position:
            raise ValueError(f"cannot run backwards (at {self.position}, asked {upto})")
        keep = set(keep)
        prog = self.prog
        if upto > self.position:
            lo = self.position
            need = [
                n.name
                for n in prog.nodes[lo + 1 : upto + 1]
                if n.name in prog.dep
                and not _skipped(n)
                and n.op == "call_function"
                and (prog.last_use[n.name] > upto or n.name in keep)
            ]
            for name in need:
                self.batch_dim(name)
            new = self.compute(lo, upto, need)
            self.env.update(new)
            self.position = upto
        self.env = {
            k: v for k, v in self.env.items() if k in keep or prog.last_use.get(k, -1) > upto or k in prog.outputs
        }

    def value(self, name: str) -> Any:
        try:
            return self.env[name]
        except KeyError:
            raise KeyError(f"value {name!r} is not kept at position {self.position}") from None

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        return self.position, dict(self.env)

    def restore(self, snap: tuple[int, dict[str, Any]]) -> None:
        self.position, env = snap
        self.env = dict(env)


def _rows(v: Any, n: int, start: int, real: int, chunk: int) -> Any:
    """Rows of samples [start, start + real) of a batch-major value, padded to ``chunk`` samples."""
    if not isinstance(v, Tensor):
        return v
    m = v.shape[0] // n
    part = v[start * m : (start + real) * m]
    if real < chunk:
        last = part[(real - 1) * m : real * m]
        part = torch.cat([part, last.repeat((chunk - real,) + (1,) * (part.dim() - 1))])
    return part


def _unpad(v: Any, real: int, chunk: int) -> Any:
    if not isinstance(v, Tensor) or real == chunk:
        return v
    m = v.shape[0] // chunk
    return v[: real * m]


def _cat(parts: list[Any]) -> Any:
    if parts and isinstance(parts[0], Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if parts and all(p is parts[0] for p in parts):
        return parts[0]
    raise ValueError("a value crossing a level boundary is not a tensor")


# operator.getitem is how the graph reads tuple outputs (split, max_pool2d_with_indices)
GETITEM = operator.getitem
