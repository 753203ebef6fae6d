"""The driver shared by ``method="hf"``, ``"kf"`` and ``"kf_gradient"``: level by level, group, fit, train.

See the package docstring (:mod:`pyfusion.fuse.interp`) for the methods and :mod:`.levels` for what a level is.
The options are one config per method (:class:`~pyfusion.fuse.config.HFConfig`,
:class:`~pyfusion.fuse.config.KFConfig`, :class:`~pyfusion.fuse.config.KFGradientConfig`, fields in
:class:`~pyfusion.fuse.config.InterpConfig`).

The fused network is held as a state dict (every tensor under every name, tied ones separately) that the fused
model's :class:`~.program.Runner` reads; it starts as member 0's tensors and every tensor is replaced once its
groups are decided: fitted sites by least squares, the tensors nothing fits (normalization weights, embeddings,
position embeddings, attention internals of unfitted ops, BatchNorms after unfitted ops) by the builder's formula
``sum_k A_k W_k B_k`` (:func:`pyfusion.fuse.builder.fused_tensors`). At the end it is written into a copy of
member 0 (tied tensors stay tied when their fused values agree, as in the builder).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from pyfusion.fuse.builder import _assign, fused_tensors
from pyfusion.fuse.config import HFConfig, InterpConfig, KFConfig, KFGradientConfig
from pyfusion.fuse.interp import fitting, grouping
from pyfusion.fuse.interp.levels import Fit, InterpLevels, Step, interp_levels
from pyfusion.fuse.interp.program import Runner, model_state
from pyfusion.fuse.interp.scores import group_scores
from pyfusion.fuse.interp.statistics import LSAccumulator, design, target_rows
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import register_method
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.inputs import normalize_inputs
from pyfusion.match.interp import PairParts, activation_pair_parts, ls_pair_parts, ls_points_gram, pair_cost
from pyfusion.stats.collect import batch_inputs

__all__ = ["fuse_hf", "fuse_interp", "fuse_kf", "fuse_kf_gradient"]

# a fit with fewer design rows than this many times its columns accumulates its statistics in float64 (see
# _fit_statistics)
FLOAT64_BELOW = 8

_METHODS = ((HFConfig, "hf"), (KFConfig, "kf"), (KFGradientConfig, "kf_gradient"))


def _method_of(config: InterpConfig) -> str:
    for cls, name in _METHODS:
        if isinstance(config, cls):
            return name
    raise ValueError(
        f"config must be an HFConfig, KFConfig or KFGradientConfig (it names the method); got {type(config).__name__}"
    )


def _calibration(data: Iterable[Any], max_samples: int | None) -> tuple[list[Any], Any, Tensor | None]:
    """The calibration inputs as flat leaves (N samples each), their tree spec, and labels (None unless every
    batch has them), held in memory."""
    leaves: list[list[Any]] = []
    spec = None
    ys: list[Tensor | None] = []
    for batch in data:
        args, kwargs = normalize_inputs(batch_inputs(batch))
        flat, sp = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec is None:
            spec = sp
            leaves = [[] for _ in flat]
        elif sp != spec:
            raise ValueError("data: every calibration batch must have the same structure of inputs")
        for lst, v in zip(leaves, flat):
            lst.append(v)
        ys.append(batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None)
    if spec is None:
        raise ValueError("data is empty: the calibration data yielded no sample")
    out = [torch.cat(v) if isinstance(v[0], Tensor) else v[0] for v in leaves]
    y = None if any(v is None for v in ys) else torch.cat([torch.as_tensor(v) for v in ys])
    tensors = [v for v in out if isinstance(v, Tensor)]
    if not tensors or tensors[0].shape[0] == 0:
        raise ValueError("data is empty: the calibration data yielded no sample")
    if max_samples is not None:
        out = [v[:max_samples] if isinstance(v, Tensor) else v for v in out]
        y = None if y is None else y[:max_samples]
    return out, spec, y


def _example(leaves: Sequence[Any], spec: Any) -> Callable[[int], tuple[tuple, dict]]:
    n = int(next(v for v in leaves if isinstance(v, Tensor)).shape[0])

    def make(b: int) -> tuple[tuple, dict]:
        idx = torch.arange(b) % n
        flat = [v[idx] if isinstance(v, Tensor) else v for v in leaves]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        return tuple(args), dict(kwargs)

    return make


def _chunk_size(traced: int, n: int) -> int:
    # the program of the traced batch needs no new export; a tiny traced batch (synthesized example inputs) would
    # make a forward per 2 samples, so 64-sample chunks are exported once then
    return traced if traced >= min(16, n) else min(n, 64)


def _importance_weights(
    levels: InterpLevels, scores: list[dict[str, Tensor]] | None, lam: Tensor, method: str
) -> dict[str, list[Tensor]]:
    out = {}
    for name, g in levels.graph.groups.items():
        ws = []
        for k in range(lam.numel()):
            if method == "uniform" or scores is None:
                s = torch.full((g.size,), 1.0 / g.size, dtype=torch.float64) + 1e-8
            else:
                s = scores[k][name]
            ws.append((lam[k] * s).clamp_min(1e-12))  # lambda_k = 0 members keep a tiny positive weight
        out[name] = ws
    return out


def _activation_grams(levels: InterpLevels, runners: list[Runner], groups: set[str]) -> dict[str, Tensor]:
    """Per group, the (K n, K n) Gram of the members' values at all of the group's points (float64)."""
    if not groups:
        return {}
    prog = levels.program
    graph = levels.graph
    pts = sorted({p for g in groups for p in levels.points[g]}, key=prog.pos.get)
    start = max(prog.pos[p.name] for p in prog.placeholders)
    end = max(prog.pos[p] for p in pts)
    cols = {(p, s.group, s.offset): fitting.columns(graph, s) for p in pts for s in levels.fits[p].segments}
    grams: dict[str, Tensor] = {}
    r0 = runners[0]
    n, c = r0.n, r0.chunk
    ph = [p.name for p in prog.placeholders]
    with torch.no_grad():
        for s in range(0, n, c):
            real = min(c, n - s)
            outs = []
            for r in runners:
                out = r.run_chunk(start, end, r.chunk_env(ph, s, real, c), c, pts)
                outs.append({p: r.stored(p, v, real, c) for p, v in out.items()})
            for p in pts:
                f = levels.fits[p]
                rows = [target_rows(o[p], f.dim).double() for o in outs]
                for seg in f.segments:
                    if seg.group not in groups:
                        continue
                    idx = cols[(p, seg.group, seg.offset)]
                    for rep in range(idx.shape[1]):
                        z = torch.cat([rw[:, idx[:, rep]] for rw in rows], 1)
                        gz = z.T @ z
                        grams[seg.group] = gz if seg.group not in grams else grams[seg.group] + gz
    return {g: 0.5 * (m + m.T) for g, m in grams.items()}


class _FitStats:
    """Statistics of one fit: G, C per member, target norms per member, C per passthrough, per-position design
    sums (for the constant offset), and the site column blocks."""

    def __init__(self, g: Tensor, cs: list[Tensor], ns: list[Tensor], cr: list[Tensor], spos: Tensor, blocks: list[int],
                 bias: bool, rows: int = 0):  # fmt: skip
        self.g, self.cs, self.ns, self.cr, self.spos, self.blocks, self.bias = g, cs, ns, cr, spos, blocks, bias
        self.rows = rows  # design rows (samples x positions)


def _fit_statistics(
    fit: Fit,
    fused_vals: dict[str, Tensor],
    member_vals: list[Tensor],
    state: dict[str, Tensor],
    n: int,
    chunk: int,
    dtype: torch.dtype,
) -> _FitStats:
    sites = fit.fitted
    bias = fitting.bias_slot(sites) is not None
    k_members = len(member_vals)
    passes = list(fit.passthrough)
    acc: LSAccumulator | None = None
    spos: Tensor | None = None
    blocks: list[int] = []
    for s in range(0, n, chunk):
        real = min(chunk, n - s)
        xs = []
        for site in sites:
            u = fused_vals[site.input]
            m = u.shape[0] // n
            xs.append(design(site.kind, u[s * m : (s + real) * m], state[site.weight].shape, site.conv))
        x = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
        if not blocks:
            blocks = [int(t.shape[1]) for t in xs]
        ts = []
        for v in member_vals + [fused_vals[p] for p in passes]:
            m = v.shape[0] // n
            ts.append(target_rows(v[s * m : (s + real) * m], fit.dim))
        t = torch.cat(ts, 1)
        if acc is None:
            cols = x.shape[1] + int(bias)
            rows = x.shape[0] * n / real  # design rows of all n samples
            # fewer than FLOAT64_BELOW x columns rows: the data leave (nearly) free directions, where the ridge
            # divides the rounding of C - G W0 by r. Measured (a permuted copy, 16 samples, fresh inputs, default
            # float32 stats): every fit in float32 1e-2 off (ResNet); float64 below 2 x columns 3e-4 .. 1e-3 off
            # (BERT, ViT, GPT-2: ill-conditioned just above 2 x); below 8 x at most 2.5e-7 off on every test
            # family. Such a fit is small: its products cost at most 8 p^3 flops.
            fit_dtype = torch.float64 if rows < FLOAT64_BELOW * cols else dtype
            acc = LSAccumulator(x.shape[1], t.shape[1], bias, fit_dtype)
        acc.update(x, t)
        xd = x.double().reshape(real, -1, x.shape[1]).sum(0)
        if bias:
            xd = torch.cat([xd, torch.full((xd.shape[0], 1), float(real), dtype=torch.float64)], 1)
        spos = xd if spos is None else spos + xd
    assert acc is not None and spos is not None
    g, c, ns = acc.result()
    w = fit.width
    cs = [c[:, k * w : (k + 1) * w] for k in range(k_members)]
    nss = [ns[k * w : (k + 1) * w] for k in range(k_members)]
    cr = [c[:, (k_members + i) * w : (k_members + i + 1) * w] for i in range(len(passes))]
    return _FitStats(g, cs, nss, cr, spos, blocks, bias, acc.count)


class _Interp:
    """State of one neuron-interpolation fusion (one call of :func:`fuse_interp`)."""

    def __init__(self, members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any,
                 config: InterpConfig):  # fmt: skip
        self.method = _method_of(config)
        self.config = config
        self.members = list(members)
        self.k = len(members)
        self.graph = graph
        self.lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
        self.member0 = self.method == "kf_gradient" and config.level_init == "member0"
        self.times = {"importance_s": 0.0, "stats_s": 0.0, "solve_s": 0.0, "group_s": 0.0, "train_s": 0.0}
        t0 = time.perf_counter()
        self.levels = interp_levels(members[0], graph)
        self.prog = self.levels.program
        leaves, spec, self.y = _calibration(data, config.max_samples)
        if len(leaves) != len(self.prog.placeholders):
            raise ValueError(
                f"the calibration batches give {len(leaves)} input tensors; the traced model takes "
                f"{len(self.prog.placeholders)}"
            )
        self.leaves = leaves
        self.n = int(next(v for v in leaves if isinstance(v, Tensor)).shape[0])
        self.example = _example(leaves, spec)
        self.chunk = _chunk_size(self.prog.batch, self.n)
        self.states = [{k: v.detach() for k, v in model_state(m).items()} for m in members]
        self.runners = [Runner(self.prog, st, leaves, self.chunk, self.example) for st in self.states]
        self.state = {k: v.clone() for k, v in self.states[0].items()}
        self.fused = Runner(self.prog, self.state, leaves, self.chunk, self.example)
        self.times["levels_s"] = time.perf_counter() - t0
        self.maps: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        self.written: set[str] = set()
        self.owned: set[str] = set()
        self.info: list[dict[str, Any]] = []
        self.unfitted: list[str] = []
        self.no_prior: list[str] = []  # fits solved with the ridge toward 0 (see fit_prior)
        self.refs = graph.refs_by_key()

    # ---- decisions -------------------------------------------------------------------------------------------
    def _cut_sets(self) -> set[tuple[str, ...]]:
        cut_groups = set()
        for lv in self.levels.levels:
            f = self.levels.fits.get(lv.target)
            if f is not None and not lv.last:
                cut_groups.update(f.groups)
        return {ts for ts in self.levels.tie_sets if any(g in cut_groups for g in ts)}

    def decide(self, ts: tuple[str, ...], parts: dict[str, list[PairParts]] | None, points: dict[str, Tensor] | None,
               source: str) -> dict[str, Any]:  # fmt: skip
        """Group a tie set; ``parts[g][k-1]`` pair parts (member 0 vs k), ``points[g]`` the (Kn, Kn) Gram."""
        cfg = self.config
        groups = [self.graph.groups[g] for g in ts]
        w = {g: self.weights[g] for g in ts}
        unit_rule = len(ts) > 1 or any(gr.unit_size > 1 for gr in groups)
        info: dict[str, Any] = {"groups": list(ts), "by": source}
        if self.method == "hf" or unit_rule:
            assert parts is not None
            costs = [{g: pair_cost(parts[g][k - 1], w[g][0], w[g][k], cfg.cost) for g in ts} for k in range(1, self.k)]
            labels, totals = grouping.align_to_reference(costs, groups)
            info["rule"] = "align to member 0" + (" (units)" if unit_rule else "")
            info["cost"] = totals
            for gr in groups:
                self.maps[gr.name] = grouping.maps_from_labels(torch.cat(labels[gr.name]), w[gr.name], gr.size)
        else:
            assert points is not None
            (g,) = ts
            gr = groups[0]
            seed = cfg.seed + len(self.info)
            labels, inertia = grouping.kmeans_labels(points[g], torch.cat(w[g]), gr.size, n_restarts=cfg.n_restarts,
                                                     init=cfg.init, seed=seed)  # fmt: skip
            info["rule"], info["inertia"] = "k-means", inertia
            maps_a, maps_b = grouping.maps_from_labels(labels, w[g], gr.size)
            if self.member0:
                assert self.grams is not None
                maps_a, maps_b = grouping.align_slots(maps_a, maps_b, self.grams[g])
            self.maps[g] = (maps_a, maps_b)
        return info

    def decide_by_activations(self, ts: tuple[str, ...]) -> dict[str, Any]:
        parts = {}
        for g in ts:
            n = self.graph.groups[g].size
            gm = self.grams[g]
            parts[g] = [activation_pair_parts(gm, slice(0, n), slice(k * n, (k + 1) * n)) for k in range(1, self.k)]
        return self.decide(ts, parts, self.grams, "activations")

    # ---- tensors ---------------------------------------------------------------------------------------------
    def write_mixed(self) -> None:
        """Write every tensor whose groups are all decided and that no fit owns: ``sum_k A_k W_k B_k``."""
        keys = []
        for key, t in self.state.items():
            if key in self.written or key in self.owned or not t.is_floating_point():
                continue
            groups = {gname for gname, _r in self.refs.get(key, [])}
            if groups <= set(self.maps):
                keys.append(key)
        if not keys:
            return
        plan = Plan(tuple(float(v) for v in self.lam), {g: self.group_plan(g) for g in self.maps})
        sub = [{k: st[k] for k in keys} for st in self.states]
        vals = fused_tensors(sub, self.graph, plan)
        for k in keys:
            self.state[k] = vals[k].to(self.state[k].dtype)
            self.written.add(k)

    def group_plan(self, g: str) -> GroupPlan:
        a, b = self.maps[g]
        return GroupPlan(list(a), list(b), (a[0].shape[0],) + (0,) * self.k)

    # ---- closed-form steps -----------------------------------------------------------------------------------
    def fused_values(self, names: Sequence[str]) -> dict[str, Tensor]:
        names = list(dict.fromkeys(names))
        here = [n for n in names if self.prog.pos[n] <= self.fused.position]
        later = [n for n in names if self.prog.pos[n] > self.fused.position]
        out = {n: self.fused.value(n) for n in here}
        if later:
            hi = max(self.prog.pos[n] for n in later)
            out.update(self.fused.compute(self.fused.position, hi, later))
        return out

    def run_step(self, si: int, step: Step, keep: set[str]) -> None:
        cfg = self.config
        tmax = max(self.prog.pos[f.target] for f in step.fits)
        for r in self.runners:
            r.advance(max(r.position, tmax), keep)
        fits = [f for f in step.fits if f.fitted]
        stats: dict[str, _FitStats] = {}
        if fits:
            t0 = time.perf_counter()
            self.fused.advance(max(self.fused.position, step.position - 1))
            vals = self.fused_values([x for f in fits for x in [s.input for s in f.fitted] + f.passthrough])
            for f in fits:
                members = [r.value(f.target) for r in self.runners]
                stats[f.target] = _fit_statistics(f, vals, members, self.state, self.n, self.chunk,
                                                  cfg.stats_torch_dtype)  # fmt: skip
            self.times["stats_s"] += time.perf_counter() - t0
        info: dict[str, Any] = {"step": si, "targets": [f.target for f in step.fits], "decided": []}
        ls_w: dict[str, list[Tensor]] = {}
        for ts in step.decide:
            t0 = time.perf_counter()
            if step.how[ts] == "activations":
                info["decided"].append(self.decide_by_activations(ts))
            else:
                parts, points = self.ls_ingredients(ts, step, stats, ls_w)
                info["decided"].append(self.decide(ts, parts, points, "ls"))
            self.times["group_s"] += time.perf_counter() - t0
        self.write_mixed()
        for f in fits:
            try:
                info.setdefault("ridge", []).append(self.solve_fit(f, stats[f.target]))
                info.setdefault("design", []).append((stats[f.target].rows, int(stats[f.target].g.shape[0])))
            except fitting._NotPerNeuron as exc:  # the path is not per-neuron affine: leave the tensors to the maps
                self.unfitted.append(f"{f.target}: {exc}")
                for s in f.fitted:
                    self.owned.discard(s.weight)
                    self.owned.discard(s.bias)
                    for bn in s.norms:
                        for key in (bn.weight, bn.bias, bn.mean, bn.var):
                            self.owned.discard(key)
                self.write_mixed()
        self.info.append(info)

    def ls_ingredients(
        self, ts: tuple[str, ...], step: Step, stats: dict[str, _FitStats], cache: dict[str, list[Tensor]]
    ) -> tuple[dict[str, list[PairParts]], dict[str, Tensor]]:
        """HF pair parts (member 0 vs k) and KF points Grams of a tie set from the step's LS fits."""
        t0 = time.perf_counter()
        parts: dict[str, list[PairParts]] = {}
        points: dict[str, Tensor] = {}
        groups = [self.graph.groups[g] for g in ts]
        pairwise = self.method == "hf" or len(ts) > 1 or any(g.unit_size > 1 for g in groups)
        for f in step.fits:
            if not any(s.group in ts for s in f.segments):
                continue
            st = stats[f.target]
            if f.target not in cache:
                ws, rel = fitting.solve_ls(st.g, [torch.cat(st.cs, 1)], self.config.ridge)
                cache[f.target] = list(ws[0].split(f.width, 1))
            ws = cache[f.target]
            for seg in f.segments:
                if seg.group not in ts:
                    continue
                idx = fitting.columns(self.graph, seg)
                wv = [w[:, idx] for w in ws]
                cv = [c[:, idx] for c in st.cs]
                nv = [ns[idx] for ns in st.ns]
                g = seg.group
                if pairwise:  # HF pair costs (member 0 vs k)
                    pk = [ls_pair_parts(st.g, wv[0], cv[0], nv[0], wv[k], cv[k], nv[k]) for k in range(1, self.k)]
                    parts[g] = pk if g not in parts else [a + b for a, b in zip(parts[g], pk)]
                else:  # KF points: the Gram of every member's LS predictions
                    pg = ls_points_gram(st.g, torch.cat(wv, 1))
                    points[g] = pg if g not in points else points[g] + pg
        self.times["solve_s"] += time.perf_counter() - t0
        return parts, points

    def fit_prior(self, f: Fit, const: Tensor) -> Tensor | None:
        """The ridge prior ``W0`` of a fit, (design columns [+ 1], width): the weights the fit's sites have when
        every tensor they own (weights, biases, absorbed BatchNorms) is the aligned average of the members'
        ``sum_k A_k W_k B_k`` (the builder's formula with this fusion's maps), written in the fitted
        parameterisation. With the absorbed BatchNorms the identity, the fitted target is ``X v + const + sum_i
        c_i r_i``; with the averaged tensors it is ``sum_p cm_p (X_p W_p + b_p) + const_m + ...`` (``cm``,
        ``const_m`` the chain read with the averaged tensors, :func:`fitting.chain_coefficients`), so ``W0`` holds
        ``W_p cm_p`` per site and the intercept ``sum_p cm_p b_p + const_m - const`` (averaged over positions).

        Why: :meth:`solve_fit` solves ``min ||X v - y||^2 + r ||v - W0||^2``. Where the calibration data do not
        determine the weights (fewer independent rows than design columns), this keeps the aligned average instead
        of pulling the weights to 0, so a member fused with its permuted copy (or one-hot lambdas) gives back the
        member on every input, not only on the calibration set.

        None (the plain ridge toward 0) when a group of one of these tensors is not decided yet.
        """
        sites = f.fitted
        keys = [k for s in sites for k in [s.weight, s.bias] + [x for bn in s.norms for x in (bn.weight, bn.bias,
                bn.mean, bn.var)] if k is not None]  # fmt: skip
        decided = set(self.maps)
        if any(not {g for g, _r in self.refs.get(k, [])} <= decided for k in keys):
            return None
        plan = Plan(tuple(float(v) for v in self.lam), {g: self.group_plan(g) for g in self.maps})
        vals = fused_tensors([{k: st[k] for k in keys} for st in self.states], self.graph, plan)
        mixed = dict(self.state)
        mixed.update({k: vals[k].to(self.state[k].dtype) for k in keys})
        cm, const_m, _ = fitting.chain_coefficients(self.fused, f, mixed)
        blocks = []
        offset = torch.zeros(f.width, dtype=torch.float64)
        for s in sites:
            blocks.append(fitting.design_weight(s, vals[s.weight]) * cm[s.node][None, :])
            if s.bias is not None:
                offset = offset + cm[s.node] * vals[s.bias].double()
        if fitting.bias_slot(sites) is not None:
            blocks.append((offset + (const_m.double() - const.double()).mean(0))[None, :])
        return torch.cat(blocks, 0)

    def solve_fit(self, f: Fit, st: _FitStats) -> float:
        """The fused weights of a fit: LS on the slot targets minus the constant and passthrough terms, with the
        ridge toward the aligned average of the members' weights (:meth:`fit_prior`):
        ``v = W0 + (G + r I)^{-1} (C_y - G W0)``, ``r = ridge * mean(diag G)`` (:func:`fitting.solve_ls`)."""
        t0 = time.perf_counter()
        sites = f.fitted
        fitting.set_identity_norms(self.state, sites)
        coef, const, pcoef = fitting.chain_coefficients(self.fused, f, self.state)
        y = fitting.mix(self.graph, f.segments, st.cs, 1, self.maps, self.lam.tolist())
        m = st.spos.shape[0]
        if const.abs().max() > 0:
            cst = const.expand(m, -1) if const.shape[0] == 1 else const
            y = y - st.spos.T @ cst.double()
        for cr, p in zip(st.cr, f.passthrough):
            y = y - cr * pcoef[p][None, :]
        prior = self.fit_prior(f, const)
        if prior is None:
            self.no_prior.append(f.target)
        (v,), rel = fitting.solve_ls(st.g, [y], self.config.ridge, priors=[prior])
        off = 0
        slot = fitting.bias_slot(sites)
        for s, nb in zip(sites, st.blocks):
            c = coef[s.node]
            inv = torch.where(c != 0, 1.0 / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(c))
            fitting.write_site(self.state, s, v[off : off + nb] * inv[None, :])
            off += nb
            if s.bias is not None:
                self.state[s.bias] = torch.zeros_like(self.state[s.bias])
        if slot is not None:
            s, key = slot
            c = coef[s.node]
            inv = torch.where(c != 0, 1.0 / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(c))
            self.state[key] = (v[off] * inv).to(self.state[key].dtype)
        for s in sites:
            for key in [s.weight, s.bias] + [k for bn in s.norms for k in (bn.weight, bn.bias, bn.mean, bn.var)]:
                if key is not None:
                    self.written.add(key)
        self.times["solve_s"] += time.perf_counter() - t0
        return rel

    # ---- the whole fusion ------------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        cfg = self.config
        t0 = time.perf_counter()
        scores = None
        if cfg.importance != "uniform":
            scores = [group_scores(self.levels, r, self.y, method=cfg.importance, n_steps=cfg.n_steps)
                      for r in self.runners]  # fmt: skip
        self.weights = _importance_weights(self.levels, scores, self.lam, cfg.importance)
        self.times["importance_s"] = time.perf_counter() - t0
        steps = self.levels.steps
        if self.member0:
            decide_sets = self._cut_sets()
        else:
            decide_sets = set(self.levels.tie_sets)
            for s in self.levels.sites.values():
                if s.fitted:
                    self.owned.update(k for k in (s.weight, s.bias) if k is not None)
                    for bn in s.norms:
                        self.owned.update(k for k in (bn.weight, bn.bias, bn.mean, bn.var) if k is not None)
            self.write_mixed()  # tensors with no group: sum_k lambda_k W_k
        act = {g for ts in decide_sets if self.member0 or self.levels.how[ts] == "activations" for g in ts}
        t0 = time.perf_counter()
        self.grams = _activation_grams(self.levels, self.runners, act)
        self.times["group_s"] += time.perf_counter() - t0
        future = [f.target for st in steps for f in st.fits]
        level_targets = [lv.target for lv in self.levels.levels]
        train = self.method == "kf_gradient"
        opts = {
            "epochs": int(cfg.epochs), "last_epochs": int(cfg.last_epochs), "lr": float(cfg.lr),
            "optimizer": cfg.optimizer, "batch_size": int(cfg.batch_size), "patience": int(cfg.patience),
            "val_fraction": float(cfg.val_fraction), "weight_decay": float(cfg.weight_decay),
        }  # fmt: skip
        level_info = []
        done = 0
        for li, lv in enumerate(self.levels.levels):
            snap = self.fused.snapshot() if train else None
            for si in lv.steps:
                step = steps[si]
                keep = set(future[done:]) | set(level_targets[li:] if train else [])
                done += len(step.fits)
                if self.member0:
                    tmax = max(self.prog.pos[f.target] for f in step.fits)
                    for r in self.runners:
                        r.advance(max(r.position, tmax), keep)
                    decided = [self.decide_by_activations(ts) for ts in step.decide if ts in decide_sets]
                    self.info.append({"step": si, "decided": decided})
                    continue
                self.run_step(si, step, keep)
            if train:
                t0 = time.perf_counter()
                keep = set(future[done:]) | set(level_targets[li:])
                for r in self.runners:
                    r.advance(max(r.position, lv.end), keep)
                target = self.level_target(lv)
                assert snap is not None
                if self.fused.position > lv.start:
                    self.fused.restore(snap)
                self.fused.advance(lv.start)
                res = fitting.train_level(self.fused, lv, self.state, self.fused.env, target, opts,
                                          cfg.seed * 1000 + li)  # fmt: skip
                level_info.append({"level": li, "cut": lv.target, **res})
                self.fused.advance(lv.end)
                self.times["train_s"] += time.perf_counter() - t0
        if not self.member0:
            self.write_mixed()
        fused = copy.deepcopy(self.members[0])
        _assign(fused, {k: v.detach() for k, v in self.state.items() if v.is_floating_point()}, self.graph, set())
        plan = Plan(
            tuple(float(v) for v in self.lam),
            {g: self.group_plan(g) for g in self.graph.groups if g in self.maps},
            {
                "interp_steps": self.info,
                "interp_levels": level_info,
                "interp_unfitted": self.unfitted,
                "interp_no_prior": self.no_prior,
                **{f"time_{k}": v for k, v in self.times.items()},
            },
        )
        fused.eval()
        fused.fusion_plan = plan
        fused.fusion_weights_fitted = True
        for p in fused.parameters():
            p.requires_grad_(True)
        return fused

    def level_target(self, lv: Any) -> Tensor:
        """kf_gradient's target at a cut: the slot targets, or at the logits the (class-weighted) lambda mean."""
        vals = [r.value(lv.target) for r in self.runners]
        if not lv.last:
            f = self.levels.fits[lv.target]
            return fitting.mix(self.graph, f.segments, vals, f.dim, self.maps, self.lam.tolist()).to(vals[0].dtype)
        k_members, n = self.k, vals[0].shape[-1]
        q = self.lam[:, None].expand(k_members, n).clone()
        cw = self.config.class_weights
        if cw is not None:
            cw = torch.as_tensor(cw, dtype=torch.float64)
            if tuple(cw.shape) != (k_members, n):
                raise ValueError(f"class_weights must have shape ({k_members}, {n}); got {tuple(cw.shape)}")
            q = self.lam[:, None] * cw
            q = q / q.sum(0, keepdim=True).clamp_min(1e-300)
        return sum(vals[k].double() * q[k] for k in range(k_members)).to(vals[0].dtype)


def fuse_interp(
    members: Sequence[nn.Module],
    graph: FusionGraph,
    lambdas: Sequence[float],
    data: Iterable[Any],
    config: InterpConfig,
) -> nn.Module:
    """Neuron-interpolation fusion (see :mod:`pyfusion.fuse.interp`); returns the fused module with ``fusion_plan``.

    Args:
        members: K members (any K >= 2; "hf" with K > 2 aligns every member to member 0).
        graph: neuron groups of the architecture, traced (:func:`pyfusion.graph.trace_groups`).
        lambdas: member weights (scale the importance scores and average the logits).
        data: calibration batches ``(x, y)``; labels are the importance targets (else the member's prediction).
        config: an :class:`HFConfig`, :class:`KFConfig` or :class:`KFGradientConfig` (its type names the method).

    Raises:
        ValueError: a graph without an exported program, empty data, class weights of the wrong shape, an
            architecture whose groups cannot be observed (named).
    """
    method = _method_of(config)
    if data is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if config.class_weights is not None:
        cw = torch.as_tensor(config.class_weights, dtype=torch.float64)
        if cw.shape[0] != len(members):
            raise ValueError(
                f"class_weights must be a non-negative finite ({len(members)}, C) array; got {tuple(cw.shape)}"
            )
    return _Interp(members, graph, lambdas, data, config).run()


@register_method(
    "hf",
    config=HFConfig,
    needs_data="yes",
    summary="Hungarian neuron-interpolation fusion (least squares on the fused inputs; K > 2: aligned to member 0)",
)
def fuse_hf(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: HFConfig
) -> nn.Module:
    """Hungarian neuron-interpolation fusion (least squares on the fused inputs; K > 2: aligned to member 0)."""
    return fuse_interp(members, graph, lambdas, data, config)


@register_method(
    "kf",
    config=KFConfig,
    needs_data="yes",
    summary="K-means neuron-interpolation fusion of K members (weighted k-means over LS predictions)",
)
def fuse_kf(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: KFConfig
) -> nn.Module:
    """K-means neuron-interpolation fusion of K members (weighted k-means over LS predictions)."""
    return fuse_interp(members, graph, lambdas, data, config)


@register_method(
    "kf_gradient",
    config=KFGradientConfig,
    needs_data="yes",
    summary="KF grouping, then every level trained to its targets (neuron interpolation, gradient)",
)
def fuse_kf_gradient(
    members: Sequence[nn.Module], graph: FusionGraph, lambdas: Sequence[float], data: Any, config: KFGradientConfig
) -> nn.Module:
    """KF grouping, then every level trained to its targets (neuron interpolation, gradient)."""
    return fuse_interp(members, graph, lambdas, data, config)
