"""The shared core of ``demo``, ``sweep`` and ``fuse``: call the library's fusion and measure each point."""

from __future__ import annotations

import ast
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pyfusion.cli._console import EXIT_FUSION, EXIT_USAGE, CLIError, Console
from pyfusion.cli.measure import accuracy, ensemble_logits, model_cost, time_forward
from pyfusion.cli.report import Row
from pyfusion.fuse.api import fuse
from pyfusion.fuse.registry import available_methods, get_method

__all__ = [
    "Evaluation",
    "MethodSpec",
    "check_methods",
    "measure_baselines",
    "parse_methods",
    "run_point",
    "sweep",
]


@dataclass(frozen=True)
class MethodSpec:
    """A method named on the command line, e.g. ``partial`` or ``partial(features=activations)``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.options.items()) + ")"

    @property
    def takes_alpha(self) -> bool:
        """Whether the registered method has an ``alpha`` option (then a sweep visits every alpha)."""
        try:
            return "alpha" in inspect.signature(get_method(self.name).fn).parameters
        except ValueError:  # not registered: check_methods reports it
            return False


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses and brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_methods(text: str) -> list[MethodSpec]:
    """``"partial(features=activations),average"`` -> two MethodSpecs (option values are literals or strings)."""
    out = []
    for item in _split_top(text):
        name, paren, rest = item.partition("(")
        name = name.strip()
        if not name.isidentifier():
            raise CLIError(f"--methods: {item!r} is not a method name", EXIT_USAGE, "e.g. --methods partial,average")
        options: dict[str, Any] = {}
        if paren:
            if not rest.endswith(")"):
                raise CLIError(f"--methods: unbalanced parenthesis in {item!r}", EXIT_USAGE)
            for kv in _split_top(rest[:-1]):
                k, eq, v = kv.partition("=")
                if not eq or not k.strip().isidentifier():
                    raise CLIError(
                        f"--methods: option {kv!r} of {name} is not key=value",
                        EXIT_USAGE,
                        "e.g. partial(features=activations)",
                    )
                try:
                    options[k.strip()] = ast.literal_eval(v.strip())
                except (ValueError, SyntaxError):
                    options[k.strip()] = v.strip()
        out.append(MethodSpec(name, options))
    if not out:
        raise CLIError("--methods is empty", EXIT_USAGE, "name at least one method")
    return out


def method_options(name: str) -> list[str]:
    """The keyword options of a registered method (from its signature), or [] when unknown."""
    try:
        method = inspect.signature(get_method(name).fn).parameters.values()
    except ValueError:  # not a registered method
        return []
    common = inspect.signature(fuse).parameters.values()
    # graph and config (a config object) are not expressible on a command line
    opts = [p.name for p in method if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "config"]
    # the options every method gets from pyfusion.fuse itself
    skip = ("method", "graph", "config")
    opts += [p.name for p in common if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip]
    return opts


def check_methods(methods: Sequence[MethodSpec]) -> None:
    """Fail early (exit 2) on a method the library does not register, listing the ones it does."""
    registered = available_methods()
    for m in methods:
        if m.name not in registered:
            raise CLIError(
                f"unknown fusion method {m.name!r}",
                EXIT_USAGE,
                f"available methods: {', '.join(registered)}",
            )


@dataclass
class Evaluation:
    """What every point is measured on: labelled evaluation data, one timing batch and one cost example."""

    x: torch.Tensor
    y: torch.Tensor | None  # None: accuracy is not measured (NaN)
    batch_size: int
    timing_batch: torch.Tensor
    repeats: int

    @property
    def example(self) -> torch.Tensor:
        return self.timing_batch[:1]


def _measure(fn: Callable, ev: Evaluation) -> tuple[float, float]:
    acc = accuracy(fn, ev.x, ev.y, ev.batch_size) if ev.y is not None else float("nan")
    lat = time_forward(fn, ev.timing_batch, ev.repeats)
    return acc, lat


def measure_baselines(members: Sequence[nn.Module], ev: Evaluation, lambdas: Sequence[float] | None) -> list[Row]:
    """Rows for every member and for the ensemble ``sum_k lambda_k f_k``."""
    rows = []
    member_costs = []
    for k, m in enumerate(members):
        c = model_cost(m, ev.example)
        member_costs.append(c)
        acc, lat = _measure(m, ev)
        rows.append(Row("member", f"member {k}", None, acc, c.flops, c.params, lat, None, c.dense_flops))
    ens = ensemble_logits(members, lambdas)
    acc, lat = _measure(ens, ev)
    flops = sum(c.flops for c in member_costs)
    params = sum(c.params for c in member_costs)
    rows.append(Row("ensemble", "ensemble", 1.0, acc, flops, params, lat, None, flops))
    return rows


def run_point(
    members: Sequence[nn.Module],
    data: Any,
    spec: MethodSpec,
    alpha: float | list[float] | dict[str, float] | None,
    lambdas: Sequence[float] | None,
    ev: Evaluation,
    console: Console,
) -> tuple[nn.Module, Row]:
    """Fuse once with ``spec`` at ``alpha`` (None: not passed; list or dict: one value per neuron group), then measure.

    The row's alpha is ``alpha``, the mean of a list / dict, or 0 for full fusion (alpha not passed).

    Raises:
        CLIError (exit 4): the library rejected the inputs or the fusion failed; the message names the
            method and alpha.
    """
    kwargs: dict[str, Any] = dict(spec.options)
    if alpha is not None:
        kwargs["alpha"] = alpha
    if lambdas is not None:
        kwargs["lambdas"] = list(lambdas)
    where = f"{spec.label}" + (f" at alpha={alpha}" if alpha is not None else "")
    console.debug(f"fusing with {where}: pyfusion.fuse(members, data, method={spec.name!r}, **{kwargs})")
    t0 = time.perf_counter()
    try:
        fused = fuse(list(members), data, method=spec.name, **kwargs)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        opts = method_options(spec.name)
        hint = (
            f"{spec.name} takes the options: {', '.join(opts)}"
            if opts
            else "check the method's options and that the members share one architecture"
        )
        raise CLIError(f"fusion with {where} failed: {msg}", EXIT_FUSION, hint) from exc
    elapsed = time.perf_counter() - t0
    fused.eval()
    c = model_cost(fused, ev.example)
    acc, lat = _measure(fused, ev)
    if isinstance(alpha, (list, dict)):
        values = list(alpha.values()) if isinstance(alpha, dict) else alpha
        shown_alpha = sum(values) / max(len(values), 1)
    else:
        shown_alpha = float(alpha) if alpha is not None else 0.0
    return fused, Row("fused", spec.label, shown_alpha, acc, c.flops, c.params, lat, elapsed, c.dense_flops)


def sweep(
    members: Sequence[nn.Module],
    data: Any,
    methods: Sequence[MethodSpec],
    alphas: Sequence[float],
    lambdas: Sequence[float] | None,
    ev: Evaluation,
    console: Console,
) -> list[Row]:
    """Every method at every alpha (full-fusion methods once), with a progress bar over the points."""
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise CLIError(f"--alphas: {a:g} is outside [0, 1]", EXIT_USAGE, "alpha is a fraction of neurons")
    points = [(m, a) for m in methods for a in (alphas if m.takes_alpha else [None])]
    rows = []
    for spec, alpha in console.progress(points, desc="fusing", unit="point"):
        _, row = run_point(members, data, spec, alpha, lambdas, ev, console)
        console.debug(
            f"{row.method} alpha={row.alpha}: accuracy {row.accuracy:.4f}, {row.flops:.0f} FLOPs, {row.fusion_s:.3f} s"
        )
        rows.append(row)
    return rows
