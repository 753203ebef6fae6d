"""The subcommands: demo, fuse, sweep, bench (``info`` is :mod:`pyfusion.info`)."""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyfusion.cli._console import (
    EXIT_BENCH,
    EXIT_FUSION,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    CLIError,
    Console,
    stage,
)
from pyfusion.cli.inputs import (
    Dataset,
    check_same_architecture,
    load_data,
    load_member,
    parse_factory,
    parse_floats,
    parse_normalize,
    parse_options,
)
from pyfusion.cli.measure import ensemble_logits, model_cost
from pyfusion.cli.report import Row, format_table, write_report
from pyfusion.cli.tradeoff import (
    Evaluation,
    MethodSpec,
    _measure,
    available_methods,
    check_alphas,
    check_methods,
    measure_baselines,
    parse_methods,
    raise_for_failures,
    run_point,
    sweep,
)
from pyfusion.fuse.registry import get_method
from pyfusion.fuse.validate import check_lambdas
from pyfusion.serialization import UnverifiedFileWarning

DEMO_METHODS = ("partial", "cluster", "average", "weight_matching", "activation_matching", "ot", "hf", "kf")


# --------------------------------------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is visible to torch", EXIT_USAGE, "use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r} is not a torch device", EXIT_USAGE, "use cpu or cuda") from exc


def _loader(ds: Dataset, batch_size: int) -> torch.utils.data.DataLoader:
    from pyfusion.data import make_loader

    y = ds.y if ds.y is not None else torch.zeros(ds.x.shape[0], dtype=torch.long)
    return make_loader(ds.x, y, batch_size=batch_size, shuffle=False)


def _out_dir(arg: str | None, prefix: str) -> Path:
    if arg:
        return Path(arg)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{prefix}-{stamp}"


def _lambdas(text: str | None, k: int) -> list[float] | None:
    """--lambdas as K weights that :func:`pyfusion.fuse.validate.check_lambdas` accepts (else exit 2)."""
    if text is None:
        return None
    lam = parse_floats(text, "--lambdas")
    if len(lam) != k:
        raise CLIError(f"--lambdas has {len(lam)} values for {k} members", EXIT_USAGE, "give one weight per member")
    try:
        return list(check_lambdas(lam, k))
    except ValueError as exc:
        raise CLIError(
            f"--lambdas {text!r}: {exc}", EXIT_USAGE, "member weights are non-negative and sum to 1"
        ) from exc


def _alpha(text: str | None) -> float | list[float] | dict[str, float] | None:
    """--alpha: one value, comma-separated values (one per group) or a JSON object {group: value}, all in [0, 1]."""
    if text is None:
        return None
    if text.strip().startswith("{"):
        try:  # one alpha per neuron group, by group name (checked against the traced groups later)
            raw = json.loads(text)
            alpha = {str(k): float(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise CLIError(
                f"--alpha {text!r} is not a JSON object of numbers", EXIT_USAGE, "e.g. --alpha '{\"0\": 0.5}'"
            ) from exc
        check_alphas(list(alpha.values()), "--alpha")
        return alpha
    vals = parse_floats(text, "--alpha")
    check_alphas(vals, "--alpha")
    return vals[0] if len(vals) == 1 else vals


def _check_alpha_groups(alpha: Any, member: nn.Module) -> None:
    """A list or JSON --alpha must name the model's neuron groups (exit 2 with the group names otherwise).

    Architectures the tracer refuses are left to the fusion, which reports them (exit 4)."""
    if not isinstance(alpha, (list, dict)):
        return
    from pyfusion.graph import UnsupportedModuleError, trace_groups

    try:
        names = list(trace_groups(member).groups)
    except (UnsupportedModuleError, ValueError, RuntimeError, TypeError):
        return
    shown = ", ".join(names)
    if isinstance(alpha, dict):
        unknown = [k for k in alpha if k != "*" and k not in names]
        if unknown:
            raise CLIError(
                f"--alpha names unknown neuron groups {unknown}",
                EXIT_USAGE,
                f"the groups of this model are: {shown} ('*' sets the default)",
            )
    elif len(alpha) != len(names):
        raise CLIError(
            f"--alpha has {len(alpha)} values for {len(names)} neuron groups",
            EXIT_USAGE,
            f"give one value, one per group ({shown}), or a JSON object by group name",
        )


def _evaluation(
    ds: Dataset,
    device: torch.device,
    batch_size: int,
    latency_batch: int,
    repeats: int,
    reference: Any = None,
    need_labels: bool = True,
) -> Evaluation:
    if ds.y is None and need_labels:
        raise CLIError(
            f"evaluation data {ds.name!r} has no labels",
            EXIT_INPUT,
            "pass --eval-data with labels (a built-in set, or a file holding x and y)",
        )
    x, y = ds.x.to(device), (ds.y.to(device) if ds.y is not None else None)
    reps = (latency_batch + x.shape[0] - 1) // x.shape[0]
    timing = x.repeat(reps, *([1] * (x.ndim - 1)))[:latency_batch] if reps > 1 else x[:latency_batch]
    return Evaluation(x, y, batch_size, timing.contiguous(), repeats, reference)


def _latency_note(latency_batch: int, repeats: int) -> str:
    return (
        f"latency_ms: median of {repeats} timed forward passes over a batch of {latency_batch} samples (after 2 "
        "warm-up passes); every model's passes alternate with the ensemble's in the same loop, and "
        "ensemble_latency_ms is the ensemble's median from that loop, so latency_ms / ensemble_latency_ms is "
        "measured under the same machine load"
    )


def _print_table(console: Console, rows: list[Row], title: str) -> None:
    console.result(title)
    console.result(format_table(rows))


def _write(console: Console, out: Path, rows: list[Row], meta: dict[str, Any], title: str) -> dict[str, Path]:
    with stage(f"cannot write the report to {str(out)!r}", EXIT_OUTPUT, "pass a writable folder with --out"):
        paths = write_report(out, rows, meta, title)
    console.result(f"report: {out} (report.json, report.csv, tradeoff.png)")
    return paths


def _load_members(
    args: argparse.Namespace, console: Console, device: torch.device, min_members: int = 2
) -> list[nn.Module]:
    factory = parse_factory(args.model) if args.model else None
    members = []
    for path in console.progress(args.members, desc="loading members", unit="file"):
        with (
            stage(f"member {path!r}", EXIT_INPUT, "check that the file is a state dict of --model's architecture"),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always", UnverifiedFileWarning)
            members.append(load_member(path, factory).to(device))
        for w in caught:  # e.g. a pyfusion file without a checksum: one note line, not a Python warning
            if issubclass(w.category, UnverifiedFileWarning):
                console.note(f"note: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_same_architecture(members, list(args.members), min_members)
    console.debug(f"loaded {len(members)} members: {type(members[0]).__name__}")
    return members


def _calibration(args: argparse.Namespace, console: Console) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(calibration data, labelled evaluation data, their record for the report) from --data / --eval-data,
    --calib-samples / --calib-sampling / --seed, --eval-samples and --normalize."""
    norm = parse_normalize(args.normalize)
    full = load_data(args.data, "train")
    calib = full.sample(args.calib_samples, args.calib_sampling, args.seed)
    if args.eval_data:
        ev = load_data(args.eval_data, "test")
    elif args.data.split(":")[0] in ("digits", "mnist", "fashion-mnist"):
        ev = load_data(args.data, "test")
    else:
        ev = calib
        console.note("note: no --eval-data; accuracy is measured on the calibration data")
    ev = ev.head(args.eval_samples)
    if norm is not None:
        calib, ev = calib.normalized(*norm), ev.normalized(*norm)
    record = {
        "data": args.data,
        "samples": int(calib.x.shape[0]),
        "available": int(full.x.shape[0]),
        "selection": args.calib_sampling,
        "seed": args.seed if args.calib_sampling == "random" else None,
        "eval_data": args.eval_data or (args.data if ev is not calib else None),
        "eval_samples": int(ev.x.shape[0]),
        "normalize": None if norm is None else {"mean": norm[0], "std": norm[1]},
    }
    how = "first" if args.calib_sampling == "first" else f"random (seed {args.seed})"
    console.note(
        f"calibration: {how} {record['samples']} of {record['available']} samples of {calib.name}"
        + ("" if norm is None else f", normalized with mean {norm[0]}, std {norm[1]}")
    )
    console.debug(f"calibration {calib.name}: {tuple(calib.x.shape)}; evaluation {ev.name}: {tuple(ev.x.shape)}")
    return calib, ev, record


def _check_input_fits(members: list[nn.Module], ds: Dataset, device: torch.device) -> None:
    with stage(
        f"the members cannot run on data {ds.name!r} (inputs {tuple(ds.x.shape[1:])})",
        EXIT_INPUT,
        "give data whose samples have the shape the models expect",
    ):
        with torch.inference_mode():
            members[0](ds.x[:2].to(device))


# --------------------------------------------------------------------------------------------- demo
def _train_members(args: argparse.Namespace, console: Console, train: Dataset, sizes: list[int]) -> list[nn.Module]:
    from pyfusion.data import dirichlet_split, make_loader, shard_split, subset
    from pyfusion.models import mlp
    from pyfusion.train import train as train_model

    k = args.members
    if args.split == "iid":
        parts = [None] * k
    elif args.split == "dirichlet":
        parts = dirichlet_split(train.y, k, seed=args.seed)
    else:
        parts = shard_split(train.y, k, seed=args.seed)
    members = []
    for i in console.progress(range(k), desc="training members", unit="member"):
        seed = args.seed + 1000 * i
        x, y = (train.x, train.y) if parts[i] is None else subset(train.x, train.y, parts[i])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = mlp(sizes)
        loader = make_loader(x, y, batch_size=args.batch_size, shuffle=True, seed=seed)
        bar = console.bar(args.epochs * len(loader), desc=f"member {i}", unit="batch")
        try:
            losses = train_model(model, _Counted(loader, bar), epochs=args.epochs, lr=args.lr, seed=seed)
        finally:
            bar.close()
        console.debug(f"member {i}: seed {seed}, {x.shape[0]} samples, final loss {losses[-1] if losses else 0:.4f}")
        members.append(model.eval())
    return members


class _Counted:
    """A re-iterable view of a loader that advances a progress bar by one per batch."""

    def __init__(self, loader: Any, bar: Any) -> None:
        self.loader, self.bar = loader, bar

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield batch
            self.bar.update(1)


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """Train K members on a built-in data set, fuse them across an alpha grid, print and write the report."""
    from safetensors.torch import save_file

    t_start = time.perf_counter()
    if args.fast:
        defaults: dict[str, Any] = {"hidden": "32,32", "epochs": 4, "alphas": "0,0.5,1", "repeats": 3, "calib": 256}
    elif args.dataset == "digits":
        defaults = {"hidden": "64,64", "epochs": 20, "alphas": "0,0.25,0.5,0.75,1", "repeats": 20, "calib": 512}
    else:
        defaults = {"hidden": "256,256", "epochs": 2, "alphas": "0,0.25,0.5,0.75,1", "repeats": 20, "calib": 1024}
    hidden = [int(h) for h in parse_floats(args.hidden or defaults["hidden"], "--hidden")]
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    alphas = parse_floats(args.alphas or defaults["alphas"], "--alphas")
    check_alphas(alphas)
    repeats = args.repeats or defaults["repeats"]
    if args.members < 2:
        raise CLIError(f"--members must be >= 2; got {args.members}", EXIT_USAGE, "fusion needs two or more members")
    if any(h < 1 for h in hidden):
        raise CLIError(f"--hidden widths must be >= 1; got {hidden}", EXIT_USAGE)
    device = _device(args.device)

    spec = args.dataset if args.dataset == "digits" else f"{args.dataset}:{args.data_dir or ''}"
    if args.dataset != "digits" and not args.data_dir:
        raise CLIError(
            f"--dataset {args.dataset} needs --data-dir",
            EXIT_USAGE,
            f"pass the folder of the IDX files, e.g. --data-dir ../shared/data/{args.dataset}",
        )
    train, test = load_data(spec, "train"), load_data(spec, "test")
    if args.fast and args.dataset != "digits":
        train, test = train.head(2000), test.head(1000)
    assert train.y is not None and test.y is not None
    n_in = int(torch.tensor(train.x.shape[1:]).prod())
    n_classes = int(train.y.max()) + 1
    sizes = [n_in, *hidden, n_classes]
    console.note(
        f"demo: {args.members} MLPs {sizes} on {train.name} ({train.x.shape[0]} samples), {args.epochs} epochs, "
        f"{args.split} split"
    )
    members = [m.to(device) for m in _train_members(args, console, train, sizes)]

    registered = available_methods()
    wanted = parse_methods(args.methods) if args.methods else [MethodSpec(m) for m in DEMO_METHODS]
    methods = []
    for m in wanted:
        if m.name not in registered:
            console.note(f"note: method {m.name!r} is not available in this build; skipped")
        else:
            methods.append(m)
    if not methods:
        raise CLIError(
            "none of the demo's fusion methods is available in this build",
            EXIT_INPUT,
            f"registered methods: {', '.join(registered)}",
        )

    calib = _loader(train.head(defaults["calib"]), 128)
    ev = _evaluation(test, device, 512, args.latency_batch, repeats, ensemble_logits(members))
    rows = measure_baselines(members, ev, None)
    rows += sweep(members, calib, methods, alphas, None, ev, console)

    out = _out_dir(args.out, "demo")
    factory = f"pyfusion.models:mlp(sizes={sizes})"
    title = f"pyfusion demo: {args.members} x MLP {sizes} on {train.name.split('/')[0]}"
    _print_table(console, rows, title)
    meta = {
        "command": "demo",
        "settings": {
            "dataset": args.dataset,
            "members": args.members,
            "model": factory,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "split": args.split,
            "seed": args.seed,
            "alphas": alphas,
            "methods": [m.label for m in methods],
            "latency_batch": args.latency_batch,
            "repeats": repeats,
            "device": str(device),
            "fast": bool(args.fast),
            "eval_samples": int(test.x.shape[0]),
            "calibration": {
                "data": train.name,
                "samples": min(defaults["calib"], int(train.x.shape[0])),
                "available": int(train.x.shape[0]),
                "selection": "first",
                "seed": None,
                "normalize": None,
            },
        },
        "latency": _latency_note(args.latency_batch, repeats),
    }
    _write(console, out, rows, meta, title)
    with stage("cannot write the members", EXIT_OUTPUT, "pass a writable folder with --out"):
        (out / "members").mkdir(exist_ok=True)
        for i, m in enumerate(members):
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                out / "members" / f"member_{i}.safetensors",
            )
    files = " ".join(str(out / "members" / f"member_{i}.safetensors") for i in range(len(members)))
    alpha_arg = " --alpha 0.5" if methods[0].takes_alpha else ""
    console.note(
        f"members saved; fuse them yourself with:\n  pyfusion fuse {files} --model '{factory}' --data {spec} "
        f"--method {methods[0].name}{alpha_arg} --output fused.safetensors"
    )
    console.debug(f"demo took {time.perf_counter() - t_start:.1f} s")
    raise_for_failures(rows)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """The trade-off curve of one or several methods over an alpha grid, for members given as files.

    A failing point does not stop the sweep: it is a "failed" row of the table and report.json (with its error),
    and the command exits 4 (1 for an internal error) after writing the report.
    """
    device = _device(args.device)
    methods = parse_methods(args.methods)
    check_methods(methods, len(args.members))
    alphas = parse_floats(args.alphas, "--alphas")
    check_alphas(alphas)
    lambdas = _lambdas(args.lambdas, len(args.members))
    parse_normalize(args.normalize)  # usage errors before anything is loaded
    members = _load_members(args, console, device, min(get_method(m.name).min_members for m in methods))
    calib, evd, calibration = _calibration(args, console)
    _check_input_fits(members, calib, device)
    ev = _evaluation(evd, device, args.batch_size, args.latency_batch, args.repeats, ensemble_logits(members, lambdas))
    rows = measure_baselines(members, ev, lambdas)
    rows += sweep(members, _loader(calib, args.batch_size), methods, alphas, lambdas, ev, console)
    title = f"pyfusion sweep: {len(members)} members, {', '.join(m.label for m in methods)}"
    _print_table(console, rows, title)
    meta = {
        "command": "sweep",
        "settings": {
            "members": list(args.members),
            "model": args.model,
            "data": args.data,
            "eval_data": args.eval_data,
            "methods": [m.label for m in methods],
            "alphas": alphas,
            "lambdas": lambdas,
            "batch_size": args.batch_size,
            "latency_batch": args.latency_batch,
            "repeats": args.repeats,
            "device": str(device),
            "normalize": calibration["normalize"],
            "calibration": calibration,
        },
        "latency": _latency_note(args.latency_batch, args.repeats),
        "failures": [{"method": r.method, "alpha": r.alpha, "error": r.error} for r in rows if r.error is not None],
    }
    _write(console, _out_dir(args.out, "sweep"), rows, meta, title)
    raise_for_failures(rows)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- fuse
def _save_fused(fused: nn.Module, output: Path, example: torch.Tensor) -> None:
    """pyfusion.save with a reload check: the file replaces ``output`` only if the reloaded model gives the fused
    model's outputs (else the previous file stays). Exit 5 with a hint that says what went wrong."""
    import pyfusion
    from pyfusion.serialization import SerializationError

    x = example.cpu()
    with torch.inference_mode():
        want = fused(x)

    def same_outputs(reloaded: nn.Module) -> None:
        with torch.inference_mode():
            got = reloaded(x)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
            raise _ReloadMismatch(
                f"the reloaded model differs from the fused one (max |diff| {float((want - got).abs().max()):.3g})"
            )

    where = f"cannot save the fused model to {str(output)!r}"
    try:
        pyfusion.save(fused, output, check=same_outputs)
    except _ReloadMismatch as exc:
        raise CLIError(
            f"{where}: {exc}",
            EXIT_OUTPUT,
            "nothing was replaced (a previous file there is unchanged); rerun with --verbose and report it as a bug",
        ) from exc
    except SerializationError as exc:
        raise CLIError(
            f"{where}: {exc}",
            EXIT_OUTPUT,
            "pyfusion.save stores torch / pyfusion layers and, for a class of your own, its member architecture and "
            "the changes fusion made; register a class it cannot describe (named above) with "
            "pyfusion.serialization.register_module(cls, get_config, from_config) in the module --model imports",
        ) from exc
    except OSError as exc:
        raise CLIError(f"{where}: {exc}", EXIT_OUTPUT, "check the path and free disk space") from exc


class _ReloadMismatch(Exception):
    """The file written by save does not reproduce the fused model's outputs."""


def cmd_fuse(args: argparse.Namespace, console: Console) -> int:
    """Fuse members given as files with one method (or within a FLOP budget) and save the result."""
    if args.budget is not None:
        return _fuse_budget(args, console)
    if args.method is None:
        raise CLIError("pyfusion fuse needs --method or --budget", EXIT_USAGE, "e.g. --method partial --alpha 0.5")
    device = _device(args.device)
    options = parse_options(args.option)
    if args.features:
        options["features"] = args.features
    alpha = _alpha(args.alpha)
    if alpha is not None:
        options["alpha"] = alpha
    check_methods([MethodSpec(args.method, options)], len(args.members))
    options.pop("alpha", None)
    lambdas = _lambdas(args.lambdas, len(args.members))
    parse_normalize(args.normalize)  # usage errors before anything is loaded
    output = Path(args.output)
    if not output.parent.exists():
        raise CLIError(
            f"--output {str(output)!r}: folder {str(output.parent)!r} does not exist",
            EXIT_OUTPUT,
            "create the folder first or choose another path",
        )
    members = _load_members(args, console, device, get_method(args.method).min_members)
    _check_alpha_groups(alpha, members[0])
    calib, evd, _ = _calibration(args, console)
    _check_input_fits(members, calib, device)
    spec = MethodSpec(args.method, options)
    ev = _evaluation(
        evd,
        device,
        args.batch_size,
        args.latency_batch,
        args.repeats,
        ensemble_logits(members, lambdas),
        need_labels=False,
    )
    fused, row = run_point(members, _loader(calib, args.batch_size), spec, alpha, lambdas, ev, console)
    rows = [*measure_baselines(members, ev, lambdas), row]
    _print_table(console, rows, f"pyfusion fuse: {spec.label}")
    _save_fused(fused.cpu(), output, ev.example)
    console.result(f"fused model: {output}")
    return EXIT_OK


def _fuse_budget(args: argparse.Namespace, console: Console) -> int:
    """``pyfusion fuse --budget B``: pyfusion.fuse(members, calibration, budget=B) (restricted to --method when given),
    the chosen model measured next to the baselines, saved like any fused model."""
    import pyfusion
    from pyfusion.fuse.budget import CANDIDATE_FAMILIES

    device = _device(args.device)
    options = parse_options(args.option)
    if args.features:
        options["features"] = args.features
    alpha = _alpha(args.alpha)
    if alpha is not None:
        raise CLIError("--alpha and --budget exclude each other", EXIT_USAGE, "the budget search chooses alpha itself")
    if args.method is not None and args.method not in CANDIDATE_FAMILIES:
        raise CLIError(
            f"--budget with --method {args.method}: the budget search does not use that method",
            EXIT_USAGE,
            f"the methods it searches: {', '.join(CANDIDATE_FAMILIES)} (or leave --method out)",
        )
    lambdas = _lambdas(args.lambdas, len(args.members))
    parse_normalize(args.normalize)
    output = Path(args.output)
    if not output.parent.exists():
        raise CLIError(
            f"--output {str(output)!r}: folder {str(output.parent)!r} does not exist",
            EXIT_OUTPUT,
            "create the folder first or choose another path",
        )
    members = _load_members(args, console, device, 1)
    calib, evd, _ = _calibration(args, console)
    _check_input_fits(members, calib, device)
    ev = _evaluation(
        evd,
        device,
        args.batch_size,
        args.latency_batch,
        args.repeats,
        ensemble_logits(members, lambdas),
        need_labels=False,
    )
    t0 = time.perf_counter()
    try:
        fused = pyfusion.fuse(
            members, _loader(calib, args.batch_size), budget=args.budget, method=args.method, lambdas=lambdas, **options
        )
    except ValueError as exc:
        raise CLIError(f"fusion within --budget {args.budget:g} failed: {exc}", EXIT_FUSION, "see the message") from exc
    elapsed = time.perf_counter() - t0
    info = fused.fusion_info["budget"]
    console.note(f"budget: {info['read_as']}; chose {info['chosen']} ({info['chosen_fraction']:.3f} of the ensemble)")
    console.note(f"search: {info['fusions']} fusions, {info['time_s']:.1f} s; {info['reason']}")
    fused.eval()
    c = model_cost(fused, ev.example)
    acc, lat, ref = _measure(fused, ev)
    row = Row("fused", f"budget {args.budget:g}: {info['chosen']}", 0.0, acc, c.flops, c.params, lat, elapsed,
              c.dense_flops, ref)  # fmt: skip
    rows = [*measure_baselines(members, ev, lambdas), row]
    _print_table(console, rows, f"pyfusion fuse --budget {args.budget:g}")
    _save_fused(fused.cpu(), output, ev.example)
    console.result(f"fused model: {output}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- bench
def _bench_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    here = Path(__file__).resolve().parents[2] / "bench"
    if here.is_dir():
        return here
    return Path.cwd() / "bench"


def _written(stdout: str) -> list[Path]:
    """The files a script reports as ``wrote <path>`` (bench/common.py's Report.write prints them; a relative
    path is relative to the checkout, the script's working directory)."""
    return [Path(line[6:].strip()) for line in stdout.splitlines() if line.startswith("wrote ")]


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Run bench/bench_*.py (all, or the named parts) in quick mode (or full with --full) and print their tables.

    Quick runs write into a temporary folder (``$PYFUSION_BENCH_OUT``, bench/common.py), whose tables are printed and
    then removed: quick numbers never touch the committed ``bench/results/``. Full runs write ``bench/results/``;
    the tables they report (``wrote <path>``) are printed.
    """
    bdir = _bench_dir(args.bench_dir)
    scripts = sorted(glob.glob(str(bdir / "bench_*.py")))
    if not scripts:
        raise CLIError(
            f"no benchmark scripts (bench_*.py) in {str(bdir)!r}",
            EXIT_INPUT,
            "the benchmarks live in the source checkout: run from the repository or pass --bench-dir",
        )
    names = {Path(s).stem.removeprefix("bench_"): s for s in scripts}
    if args.list:
        for n in names:
            console.result(n)
        return EXIT_OK
    chosen = args.parts or list(names)
    unknown = [p for p in chosen if p.removeprefix("bench_").removesuffix(".py") not in names]
    if unknown:
        raise CLIError(
            f"unknown benchmark {unknown[0]!r}", EXIT_USAGE, f"available: {', '.join(names)} (pyfusion bench --list)"
        )
    failed = []
    env = dict(os.environ)
    root = str(bdir.resolve().parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for part in chosen:
        script = names[part.removeprefix("bench_").removesuffix(".py")]
        cmd = [sys.executable, script, *([] if args.full else ["--quick"]), *shlex.split(args.script_args)]
        console.note(f"== {Path(script).name} {'(full)' if args.full else '(quick)'}: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pyfusion-bench-") as tmp:
            run_env = env if args.full else {**env, "PYFUSION_BENCH_OUT": tmp}
            proc = subprocess.run(cmd, cwd=root, env=run_env, capture_output=True, text=True)
            written = [Path(root) / p for p in _written(proc.stdout)] if args.full else sorted(Path(tmp).rglob("*"))
            tables = [p.read_text().rstrip() for p in written if p.suffix == ".md" and p.is_file()]
        for table in tables:
            console.result(table)
        if proc.stdout.strip() and (console.verbose or not written):
            console.result(proc.stdout.rstrip())
        if proc.returncode != 0:
            failed.append(Path(script).name)
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
            print(f"pyfusion bench: {Path(script).name} failed: {tail}", file=sys.stderr)
            if console.verbose:
                print(proc.stderr, file=sys.stderr)
        else:
            console.debug(proc.stderr)
        kept = f"; wrote {', '.join(str(p) for p in written)}" if args.full and written else ""
        console.note(f"   {time.perf_counter() - t0:.1f} s{kept}")
    if failed:
        raise CLIError(
            f"{len(failed)} of {len(chosen)} benchmarks failed: {', '.join(failed)}",
            EXIT_BENCH,
            "rerun the failing script directly (python bench/<name>.py --quick) or with --verbose to see its errors",
        )
    return EXIT_OK
