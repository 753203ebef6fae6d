"""``pyfusion.fuse``: validate, trace, plan, build, recalibrate."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from pyfusion.fuse.bn import has_batchnorm, recalibrate_bn, reset_bn_stats
from pyfusion.fuse.builder import build
from pyfusion.fuse.config import MethodConfig
from pyfusion.fuse.plan import Plan
from pyfusion.fuse.registry import MethodSpec, get_method, method_for_config
from pyfusion.fuse.validate import check_data, check_lambdas, check_members, check_options, prepare_data
from pyfusion.graph import FusionGraph, UnsupportedModuleError, trace_groups
from pyfusion.graph.groups import PINNED_BY_OUTPUT
from pyfusion.stats.collect import batch_inputs
from pyfusion.stats.distributed import agree, broadcast_module, check_same, reducing, world_info

__all__ = ["DISTRIBUTED_METHODS", "fuse"]

# Methods whose every data-dependent step goes through the reduced statistics (pyfusion.stats.distributed): they run
# on several processes. Neuron interpolation ("hf", "kf", "kf_gradient") fits weights on its own Gram statistics and,
# for kf_gradient, by gradient steps: not reduced yet, so it refuses (distributed=False runs it on each rank's shard).
DISTRIBUTED_METHODS = frozenset(
    {"average", "weight_matching", "activation_matching", "ot", "partial", "cluster", "prune"}
)


def fuse(
    models: Sequence[nn.Module],
    data: Any = None,
    *,
    method: str | None = None,
    config: MethodConfig | None = None,
    lambdas: Sequence[float] | None = None,
    graph: FusionGraph | None = None,
    reset_bn: bool | str | None = None,
    repair: bool = False,
    bn_batches: int | None = None,
    fast_modules: bool | str = True,
    distributed: bool = True,
    budget: Any = None,
    **options: Any,
) -> nn.Module:
    """Fuse K >= 2 members of one architecture into one new network (the members are never modified; the
    generalized-pruning methods "cluster" and "prune" also take a single network, ``models=[m]``).

    Args:
        models: the members.
        data: calibration data: a DataLoader or iterable of batches (inputs, or (inputs, labels)). Required by
            activation-based methods; used by every method for the BatchNorm reset.
        method: a registered method ("average", "weight_matching", "activation_matching", "ot", ...; see
            :func:`pyfusion.fuse.available_methods`). May be left out when ``config`` is given.
        config: the method's settings (e.g. :class:`pyfusion.fuse.PartialConfig`; see
            :mod:`pyfusion.fuse.config`); ``**options`` given as well replace its fields.
        lambdas: member weights (default uniform), non-negative, summing to 1.
        graph: neuron groups (default: traced from ``models[0]`` with :func:`pyfusion.graph.trace_groups`, on the
            first samples of ``data``, or on synthesized inputs without data).
        reset_bn: recalibrate BatchNorm running statistics on ``data``: True recalibrates only the slots fusion
            changed, relative to the members (:func:`pyfusion.fuse.bn.recalibrate_bn`: branch slots and every slot
            that is one member's neuron keep its statistics, so alpha = 1 stays exactly the ensemble); "all"
            recomputes every BatchNorm on the data (the plain reset, :func:`~pyfusion.fuse.bn.reset_bn_stats`);
            False leaves the statistics the maps give; None (default): True when data is given and the model has
            BatchNorm.
        repair: REPAIR (Jordan et al. 2023): rescale each fused neuron to the lambda-weighted mean and standard
            deviation of its members' neurons (needs data). Groups it cannot correct (residual streams, a producer
            without bias and no normalisation after it, ...) are listed with their modules and the reason in
            ``fusion_info["repair"]["skipped"]`` and announced by a
            :class:`~pyfusion.fuse.repair.RepairSkippedWarning`. ``fusion_info["repair"]["passes"]``: forward
            passes of the fused network (1 when all calibration samples fit as one batch, else one per corrected
            group; ``"one_pass_refused"`` says why).
        bn_batches: at most this many batches for the BatchNorm reset and REPAIR.
        fast_modules: replace the Linear / Conv2d layers whose groups have branch segments (partial fusion,
            clustering, pruning) by ``pyfusion.nn.PartialLinear`` / ``PartialConv2d``, which skip the zero blocks
            (the dense result is the same function; ``False`` keeps plain dense layers with zero blocks). A layer
            stays dense where a cost model predicts the dense zero-block layer faster (tiny layers); ``"always"``
            swaps every block-sparse layer that can be swapped exactly (``fusion_info["fast_decisions"]`` lists
            the layers kept dense and why).
        distributed: with ``torch.distributed`` initialized (more than one rank: gloo on CPU, NCCL on GPU), every
            rank passes its own calibration shard as ``data``, the statistics (activation statistics, BatchNorm
            recalibration, REPAIR) are all-reduced over the ranks (:mod:`pyfusion.stats.distributed`), and every
            rank returns the same fused network, the one a single process makes from the union of the shards (to
            float64 rounding of the statistics; the parameters are then broadcast from rank 0, so the ranks' results
            are bit-identical). Every rank must call ``fuse`` with the same members and options (checked: a
            :class:`~pyfusion.stats.distributed.DistributedMismatchError` on every rank otherwise); ``max_batches``
            and ``bn_batches`` count each rank's batches. ``False``: each rank fuses on its own data alone.
        budget: instead of one method, the most accurate model whose FLOPs per sample (as :func:`pyfusion.cost`
            reports) fit: a fraction in (0, 1] of the ensemble's FLOPs, a FLOP count > 1, or
            :class:`pyfusion.fuse.Flops` ``(n)``; chosen among the members, sub-ensembles and fused candidates by an
            objective on held-out calibration samples (:mod:`pyfusion.fuse.budget`; ``fusion_info["budget"]`` says
            what was chosen and why). ``method`` then restricts the search to one family; ``**options`` may hold
            the search's options (``objective``, ``holdout``, ``candidates``, ``seed``, ...).
            Not with ``torch.distributed`` ranks (each rank's held-out samples would choose differently): pass
            ``distributed=False`` there.
        **options: the method's options (e.g. ``alpha``, ``seed``, ``cost``, ``point``): the fields of its config
            class, which checks them.

    Returns:
        The fused module, with ``fusion_plan`` (the :class:`Plan`), ``fusion_layouts``, ``fusion_module_layouts``
        and ``fusion_info`` (method diagnostics and per-stage times) attached.

    Raises:
        ValueError: different architectures, mismatched shapes, NaN / inf weights, bad lambdas, empty data, a method
            needing data without data, an unknown method, an unsupported layer (named by path and type), an invalid
            option value (naming the config field).
        UnknownOptionError: (a ValueError) an option the method does not have, listing the ones it has.
        UnsupportedModuleError: (a ValueError) hidden neurons that no group holds
            (:attr:`pyfusion.graph.FusionGraph.pinned`: pinned by a buffer, a table computed from indices such as
            ALiBi's, or a stream the model returns), named with their modules and the op, where the method would
            have to align them (pinned by a buffer: every method but "average") or keep them per member (a plan
            with widened groups: alpha = 1 would not be the ensemble). Full fusion merges the other pinned neurons
            in place and lists them in ``fusion_info["pinned"]``.
        NotImplementedError: a distributed fusion with data by a method outside :data:`DISTRIBUTED_METHODS`.
    """
    if budget is not None:
        from pyfusion.fuse.budget import fuse_within_budget

        if config is not None or graph is not None:
            raise ValueError("fuse(budget=...) chooses the methods itself: it takes no config= or graph=")
        w = world_info() if distributed else None
        if w is not None and w[1] > 1:
            raise NotImplementedError(
                "fuse(budget=...) does not run over torch.distributed ranks (each rank's held-out samples would choose "
                "differently); pass distributed=False, or fuse on one rank and broadcast the result"
            )
        fuse_kwargs = {"reset_bn": reset_bn, "repair": repair, "bn_batches": bn_batches, "fast_modules": fast_modules}
        return fuse_within_budget(models, data, budget, method=method, lambdas=lambdas, fuse_kwargs=fuse_kwargs,
                                  **options)  # fmt: skip
    world = world_info() if distributed else None
    world = world if world is not None and world[1] > 1 else None
    try:  # a rank whose arguments fail tells the others (they would wait for it in the first collective)
        if not (isinstance(fast_modules, bool) or fast_modules == "always"):
            raise ValueError(f"fast_modules must be True, False or 'always'; got {fast_modules!r}")
        if not (reset_bn is None or isinstance(reset_bn, bool) or reset_bn == "all"):
            raise ValueError(f"reset_bn must be None, True, False or 'all'; got {reset_bn!r}")
        spec = _resolve_method(method, config)
        method = spec.name
        cfg = spec.make_config(options, config)
        members = check_members(models, spec.min_members)
        lam = check_lambdas(lambdas, len(members))
        if spec.config is None:  # a method with a config checked its options in make_config
            check_options(spec.fn, options, method)
        data = prepare_data(data)
        check_data(members, data)
        if spec.needs_data == "yes" and data is None:
            raise ValueError(f"method {method!r} needs calibration data: pass data=DataLoader or a list of batches")
        if repair and data is None:
            raise ValueError("repair=True needs calibration data")
        if world is not None and data is not None and method not in DISTRIBUTED_METHODS:
            raise NotImplementedError(
                f"method {method!r} does not reduce its statistics over torch.distributed ranks yet (distributed "
                f"methods: {', '.join(sorted(DISTRIBUTED_METHODS))}); pass distributed=False to fuse each rank's "
                "data alone"
            )
    except Exception:
        if world is not None:
            agree(False, "the argument checks of fuse")
        raise
    ctx: Any = contextlib.nullcontext()
    if world is not None:
        agree(True, "the argument checks of fuse")
        arch = ";".join(f"{n}:{tuple(t.shape)}" for n, t in members[0].state_dict().items())
        check_same(
            repr((method, cfg, options if cfg is None else None, lam, len(members), data is None, graph is None))
            + repr((reset_bn, repair, bn_batches, fast_modules, arch)),
            "the members' architecture, the method and its options",
        )
        ctx = reducing()
    with ctx:
        fused = _fuse(members, data, spec, cfg, lam, graph, reset_bn, repair, bn_batches, fast_modules, world, options)
    return fused


def _fuse(
    members: list[nn.Module],
    data: Any,
    spec: MethodSpec,
    cfg: MethodConfig | None,
    lam: list[float],
    graph: FusionGraph | None,
    reset_bn: bool | str | None,
    repair: bool,
    bn_batches: int | None,
    fast_modules: bool | str,
    world: tuple[int, int] | None,
    options: dict[str, Any],
) -> nn.Module:
    """:func:`fuse` after the argument checks (inside the reducing context when ``world`` is set)."""
    method = spec.name
    t0 = time.perf_counter()
    if graph is None:
        # the first calibration batch to trace with (its shape is the one the statistics capture then runs; the
        # verification uses two of its samples), or synthesized inputs without data
        example = None if data is None else batch_inputs(next(iter(data)))
        graph = trace_groups(members[0], example)
    else:
        graph.validate(members[0])
    t_graph = time.perf_counter() - t0
    pinned = list(getattr(graph, "pinned", None) or [])
    if method != "average":  # a buffer the tracer fixed: a permutation exists, the tracer does not know it
        _refuse_pinned([p for p in pinned if p.buffer is not None], method, "align them or keep them per member")
    if _asks_branches(cfg):
        _refuse_pinned(pinned, method, "keep them per member (alpha > 0: alpha = 1 would not be the ensemble)")
    t0 = time.perf_counter()
    result = spec.call(members, graph, lam, data, cfg, **options)
    t_method = time.perf_counter() - t0
    info: dict[str, Any] = {"method": method, "lambdas": lam, "time_graph_s": t_graph}
    from pyfusion.fuse.fast import finish, order_shared_slots  # (loads the execution modules: not at import)

    if isinstance(result, Plan):
        plan = order_shared_slots(result, graph)  # one segment per member subset (K >= 3): fewer, larger blocks
        t0 = time.perf_counter()
        # without calibration data, repair or ranks nothing reads the weights before finish: it packs the widened
        # layers' weights straight from the members (no dense zero-block tensors)
        defer = bool(fast_modules) and data is None and not reset_bn and not repair and world is None
        fused = build(members, graph, plan, defer=defer)
        info["time_build_s"] = time.perf_counter() - t0
    elif isinstance(result, nn.Module):
        fused = result
        plan = getattr(fused, "fusion_plan", None)
    else:  # pragma: no cover - a method bug
        raise TypeError(f"method {method!r} returned {type(result).__name__}; expected a Plan or an nn.Module")
    if plan is not None:
        info.update(plan.info)
        widened = any(gp.slots > graph.groups[n].size for n, gp in plan.groups.items() if n in graph.groups)
        if widened:
            _refuse_pinned(pinned, method, "keep them per member (a widened plan: alpha = 1 would not be the ensemble)")
    if pinned:
        info["pinned"] = [p.describe() + " (merged in place: member k's neuron i with the others' neuron i)"
                          for p in pinned]  # fmt: skip
    info["time_method_s"] = t_method
    if reset_bn is None:
        # methods that fit weights to targets (neuron interpolation) set BatchNorm themselves
        reset_bn = data is not None and has_batchnorm(fused) and not getattr(fused, "fusion_weights_fitted", False)
    if reset_bn:
        if data is None:
            raise ValueError(f"reset_bn={reset_bn!r} needs calibration data")
        t0 = time.perf_counter()
        if reset_bn == "all" or plan is None:  # without a plan nothing says which slots changed
            info["bn_reset"] = "all" if reset_bn == "all" else "all (the method returned no plan)"
            info["bn_reset_samples"] = reset_bn_stats(fused, data, max_batches=bn_batches)
        else:
            rec = recalibrate_bn(fused, members, graph, plan, data, max_batches=bn_batches)
            info["bn_reset"] = "changed slots"
            info["bn_reset_samples"] = rec["samples"]
            info["bn_recalibrated"] = rec["recalibrated"]
            info["bn_kept"] = rec["kept"]
            info["bn_passes"] = rec.get("passes", 0)  # forward passes of the fused network (1: all samples at once)
        info["time_bn_reset_s"] = time.perf_counter() - t0
    if repair:
        from pyfusion.fuse.repair import repair as _repair

        t0 = time.perf_counter()
        info["repair"] = _repair(fused, members, graph, plan, data, max_batches=bn_batches)
        info["time_repair_s"] = time.perf_counter() - t0
    if world is not None:
        t0 = time.perf_counter()
        broadcast_module(fused)  # bit-identical on every rank, whatever the ranks' float rounding
        info["distributed"] = {"rank": world[0], "world_size": world[1], "time_broadcast_s": time.perf_counter() - t0}
    # never costlier than the ensemble (issue 14: else the exact ensemble, said in info), then execution modules
    # the builder's own weights (no fit to targets, no statistics reset over all channels, no REPAIR): an
    # ensemble-shaped plan then claims to be the ensemble, and finish checks it
    claims = isinstance(result, Plan) and reset_bn != "all" and not repair
    fused, plan = finish(fused, members, graph, plan, lam, info, fast_modules=fast_modules, verify_ensemble=claims)
    fused.fusion_plan = plan
    fused.fusion_info = info
    return fused


def _asks_branches(cfg: MethodConfig | None) -> bool:
    """The config keeps some neurons per member: an ``alpha`` (one value, a list or a dict by group) above 0."""
    alpha = getattr(cfg, "alpha", None)
    values = alpha.values() if isinstance(alpha, dict) else alpha if isinstance(alpha, (list, tuple)) else [alpha]
    return any(isinstance(v, (int, float)) and v > 0 for v in values)


def _refuse_pinned(pinned: list, method: str, what: str) -> None:
    """Raise for hidden neurons no group holds (:class:`pyfusion.graph.groups.PinnedNeurons`) where ``method`` would
    have to ``what``: it would merge every member's neuron i with the others' neuron i instead, silently."""
    if not pinned:
        return
    lines = "; ".join(p.describe() for p in pinned)
    output = any(p.where == PINNED_BY_OUTPUT for p in pinned)
    buffer = any(p.buffer is not None for p in pinned)
    raise UnsupportedModuleError((
        f"method {method!r} cannot {what}: {lines}. No neuron group holds them, so the fused model would merge "
        "every member's neuron i with the others' neuron i. "
        + ("A stream the model returns cannot be widened (at alpha = 1 the output would be the members' streams "
           "side by side, not the model's): fuse the model with the head whose outputs you use, e.g. a wrapper "
           "returning only the logits. " if output else "")
        + ("Make the per-neuron buffer a parameter, or declare the groups with pyfusion.graph.declare_groups; "
           "method='average' merges them in place. " if buffer else
           "Fuse without branch slots (alpha = 0, full fusion merges them in place). ")
    ).rstrip())  # fmt: skip


def _resolve_method(method: str | None, config: MethodConfig | None) -> MethodSpec:
    """The method named by ``method``, or implied by the type of ``config``; the two must agree."""
    if method is None:
        if config is None:
            raise ValueError("fuse needs method= (see pyfusion.fuse.available_methods()) or config=")
        return method_for_config(config)
    spec = get_method(method)
    if config is not None and (spec.config is None or not isinstance(config, spec.config)):
        want = spec.config.__name__ if spec.config is not None else "keyword options (it has no config class)"
        raise ValueError(f"method {method!r} takes {want}; got config={type(config).__name__}")
    return spec
