"""The shared core of ``demo``, ``sweep`` and ``fuse``: call the library's fusion and measure each point."""

from __future__ import annotations

import ast
import inspect
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pyfusion.cli._console import EXIT_FUSION, EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE, CLIError, Console
from pyfusion.cli.measure import accuracy, ensemble_logits, model_cost, time_forward, time_interleaved
from pyfusion.cli.report import Row
from pyfusion.fuse.api import fuse
from pyfusion.fuse.registry import available_methods, get_method
from pyfusion.fuse.validate import DataMismatchError, MemberMismatchError
from pyfusion.graph import UnsupportedModuleError

__all__ = [
    "Evaluation",
    "MethodSpec",
    "check_alphas",
    "check_methods",
    "measure_baselines",
    "method_options",
    "parse_methods",
    "raise_for_failures",
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


# fuse()'s own keywords that a command line can set with --option (lambdas has --lambdas; graph and config are
# Python objects; method is --method)
_NOT_OPTIONS = ("method", "graph", "config", "lambdas")


def method_options(name: str) -> list[str] | None:
    """The options of a registered method, read from the method, then the ``pyfusion.fuse`` keywords every method
    takes (``repair``, ``reset_bn``, ...). None when the method takes ``**options`` without saying which.

    The method's own options are the fields of its config class when it has one, else the keyword-only
    parameters of its function's signature.
    """
    try:
        spec = get_method(name)
    except ValueError:  # not a registered method: check_methods reports it
        return None
    config = getattr(spec, "config", None)
    if config is not None and hasattr(config, "field_names"):
        own = list(config.field_names())
    else:
        params = inspect.signature(spec.fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        own = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_OPTIONS]
    common = inspect.signature(fuse).parameters.values()
    return own + [
        p.name
        for p in common
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_OPTIONS and p.name not in own
    ]


def check_methods(methods: Sequence[MethodSpec], members: int | None = None) -> None:
    """Fail early (exit 2) on a method the library does not register (listing the ones it does), an option the
    method does not have (listing its options), or fewer members than the method takes."""
    registered = available_methods()
    for m in methods:
        if m.name not in registered:
            raise CLIError(
                f"unknown fusion method {m.name!r}",
                EXIT_USAGE,
                f"available methods: {', '.join(registered)}",
            )
        known = method_options(m.name)
        unknown = [k for k in m.options if known is not None and k not in known]
        if unknown:
            raise CLIError(
                f"method {m.name} has no option {', '.join(map(repr, unknown))}",
                EXIT_USAGE,
                f"{m.name} takes the options: {', '.join(known)}" if known else f"{m.name} takes no options",
            )
        least = get_method(m.name).min_members
        if members is not None and members < least:
            single = [n for n in registered if get_method(n).min_members <= members]
            raise CLIError(
                f"method {m.name} needs at least {least} members; got {members}",
                EXIT_USAGE,
                "list more member files"
                + (f" (the methods that take {members}: {', '.join(single)})" if single else ""),
            )


def check_alphas(alphas: Sequence[float], what: str = "--alphas") -> None:
    """Every alpha in [0, 1] (exit 2)."""
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise CLIError(f"{what}: {a:g} is outside [0, 1]", EXIT_USAGE, "alpha is a fraction of neurons")


@dataclass
class Evaluation:
    """What every point is measured on: labelled evaluation data, one timing batch and one cost example."""

    x: torch.Tensor
    y: torch.Tensor | None  # None: accuracy is not measured (NaN)
    batch_size: int
    timing_batch: torch.Tensor
    repeats: int
    # the ensemble: every model's timed passes alternate with its passes (time_interleaved), so that each row's
    # latency and its ratio to the ensemble's see the same machine load
    reference: Callable | None = None

    @property
    def example(self) -> torch.Tensor:
        return self.timing_batch[:1]


def _measure(fn: Callable, ev: Evaluation) -> tuple[float, float, float | None]:
    """(accuracy, latency ms, the ensemble's latency ms in the same loop or None)."""
    acc = accuracy(fn, ev.x, ev.y, ev.batch_size) if ev.y is not None else float("nan")
    if ev.reference is None or ev.reference is fn:
        return acc, time_forward(fn, ev.timing_batch, ev.repeats), None
    lat, ref = time_interleaved([fn, ev.reference], ev.timing_batch, ev.repeats)
    return acc, lat, ref


def measure_baselines(members: Sequence[nn.Module], ev: Evaluation, lambdas: Sequence[float] | None) -> list[Row]:
    """Rows for every member and (K >= 2) for the ensemble ``sum_k lambda_k f_k`` (``ev.reference``).

    Each member is timed alternating with the ensemble; the ensemble's row gets the median of all those
    ensemble timings' medians (one per member loop).
    """
    rows = []
    member_costs = []
    ens_times = []
    for k, m in enumerate(members):
        c = model_cost(m, ev.example)
        member_costs.append(c)
        acc, lat, ref = _measure(m, ev)
        if ref is not None:
            ens_times.append(ref)
        rows.append(Row("member", f"member {k}", None, acc, c.flops, c.params, lat, None, c.dense_flops, ref))
    if len(members) < 2:
        return rows
    ens = ev.reference if ev.reference is not None else ensemble_logits(members, lambdas)
    acc = accuracy(ens, ev.x, ev.y, ev.batch_size) if ev.y is not None else float("nan")
    lat = statistics.median(ens_times) if ens_times else time_forward(ens, ev.timing_batch, ev.repeats)
    flops = sum(c.flops for c in member_costs)
    params = sum(c.params for c in member_costs)
    rows.append(Row("ensemble", "ensemble", 1.0, acc, flops, params, lat, None, flops, lat))
    return rows


def _failure_hint(exc: BaseException, spec: MethodSpec) -> tuple[int, str]:
    """Exit code and hint for an error the library raised while fusing (what the user can change)."""
    if isinstance(exc, UnsupportedModuleError):
        return EXIT_FUSION, (
            "pyfusion cannot assign this operation to neuron groups: declare the groups by hand with "
            "pyfusion.graph.declare_groups (Python API), or fuse an architecture made of supported layers"
        )
    if isinstance(exc, DataMismatchError):
        return EXIT_INPUT, "give calibration data whose samples have the shape and dtype the models expect"
    if isinstance(exc, MemberMismatchError):
        return EXIT_INPUT, "fusion needs K trained models of one architecture (same widths)"
    return EXIT_FUSION, f"the method {spec.name} refused these members, data or option values: see the message"


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
        code, hint = _failure_hint(exc, spec)
        raise CLIError(f"fusion with {where} failed: {msg}", code, hint) from exc
    elapsed = time.perf_counter() - t0
    fused.eval()
    c = model_cost(fused, ev.example)
    acc, lat, ref = _measure(fused, ev)
    if isinstance(alpha, (list, dict)):
        values = list(alpha.values()) if isinstance(alpha, dict) else alpha
        shown_alpha = sum(values) / max(len(values), 1)
    else:
        shown_alpha = float(alpha) if alpha is not None else 0.0
    row = Row("fused", spec.label, shown_alpha, acc, c.flops, c.params, lat, elapsed, c.dense_flops, ref)
    return fused, row


def sweep(
    members: Sequence[nn.Module],
    data: Any,
    methods: Sequence[MethodSpec],
    alphas: Sequence[float],
    lambdas: Sequence[float] | None,
    ev: Evaluation,
    console: Console,
) -> list[Row]:
    """Every method at every alpha (full-fusion methods once), with a progress bar over the points.

    A point that fails does not stop the sweep: its row has ``error`` set (the library's message, or "internal
    error: ..." for an unexpected exception, a bug) and NaN numbers; the caller reports the failures and exits
    non-zero after writing the report.
    """
    check_alphas(alphas)
    points = [(m, a) for m in methods for a in (alphas if m.takes_alpha else [None])]
    rows = []
    for spec, alpha in console.progress(points, desc="fusing", unit="point"):
        try:
            _, row = run_point(members, data, spec, alpha, lambdas, ev, console)
        except CLIError as err:
            row = _failed(spec, alpha, err.message)
            console.note(f"note: {err.message}; the sweep goes on")
        except Exception as exc:  # a bug in a method: recorded, the other points still run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row = _failed(spec, alpha, f"internal error: {type(exc).__name__}: {first}")
            console.note(f"note: {spec.label} at alpha={alpha}: {row.error}; the sweep goes on")
            if console.verbose:
                traceback.print_exception(exc, file=sys.stderr)
        else:
            console.debug(
                f"{row.method} alpha={row.alpha}: accuracy {row.accuracy:.4f}, {row.flops:.0f} FLOPs, "
                f"{row.fusion_s:.3f} s"
            )
        rows.append(row)
    return rows


def _failed(spec: MethodSpec, alpha: float | None, error: str) -> Row:
    nan = float("nan")
    return Row("fused", spec.label, alpha if alpha is not None else 0.0, nan, nan, nan, nan, error=error)


def raise_for_failures(rows: Sequence[Row]) -> None:
    """After the report is written: exit 4 if points failed (1 if any failure was an internal error)."""
    failed = [r for r in rows if r.error is not None]
    if not failed:
        return
    internal = [r for r in failed if r.error.startswith("internal error")]
    first = internal[0] if internal else failed[0]
    alpha = "" if first.alpha is None else f" at alpha={first.alpha:g}"
    raise CLIError(
        f"{len(failed)} of {sum(r.kind == 'fused' for r in rows)} fusion points failed "
        f"(first: {first.method}{alpha}: {first.error})",
        EXIT_INTERNAL if internal else EXIT_FUSION,
        "the table and report.json list every failure (rows with an 'error'); the other points were measured"
        + ("; rerun with --verbose for the traceback and report the internal error as a bug" if internal else ""),
    )
