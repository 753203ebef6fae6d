"""The ``pyfusion`` command line (also ``python -m pyfusion``).

Subcommands:

* ``demo``: train K small members on a built-in data set, fuse them across an alpha grid, print the
  trade-off table and write a report folder (plot, JSON, CSV);
* ``fuse``: fuse members given as files (safetensors / state dicts + a ``module:function`` factory)
  with one method and save the result with :func:`pyfusion.save`;
* ``sweep``: the trade-off curve of one or several methods over an alpha grid, same report as demo;
* ``bench``: run the benchmark scripts (``bench/bench_*.py``) in quick mode and print their tables;
* ``info``: versions and available backends (``python -m pyfusion.info``).

Exit codes are listed in :mod:`pyfusion.cli._console` and in ``pyfusion --help``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from pyfusion.cli._console import (
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    Console,
)

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CLIError", "build_parser", "main"]

_DATA_HELP = "digits, mnist:DIR, fashion-mnist:DIR, or a .pt/.npy/.npz/.safetensors file with inputs (and labels)"
_MODEL_HELP = (
    "model factory module:function, optionally with literal arguments, e.g. 'pyfusion.models:mlp(sizes=[64,64,10])'; "
    "needed for plain state-dict members"
)


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error style: one line ``pyfusion <command>: error: ...`` plus a hint,
    exit 2 (instead of the usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"  hint: see {self.prog} --help", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (else a usage error naming the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text!r}")
    return value


_POSITIVE = _int_at_least(1)


def _common(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("-v", "--verbose", action="store_true", help="print details, and tracebacks on errors")
    p.add_argument("--device", default="cpu", help="torch device for fusion and measurement (default: cpu)")
    p.add_argument(
        "--threads",
        type=_POSITIVE,
        default=threads,
        help=f"torch CPU threads (default: {threads or 'as torch chooses'}; recorded in the report)",
    )


def _members_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("members", nargs="+", help="member files: .safetensors (state dict or pyfusion.save file) or .pt")
    p.add_argument("--model", "-m", help=_MODEL_HELP)
    p.add_argument("--data", "-d", required=True, help=f"calibration data: {_DATA_HELP}")
    p.add_argument("--eval-data", help="labelled evaluation data (default: the test split of a built-in --data)")
    p.add_argument(
        "--normalize",
        metavar="MEAN,STD",
        help="normalize every input (x - MEAN) / STD on axis 1 (channels): one MEAN,STD for all channels, or "
        "M1,...,MC/S1,...,SC per channel, e.g. 0.1307,0.3081 for MNIST (default: the data as read; "
        "mnist:DIR gives pixels in [0, 1]); recorded in the report",
    )
    p.add_argument("--calib-samples", type=_POSITIVE, default=1024, help="calibration samples used (default: 1024)")
    p.add_argument(
        "--calib-sampling",
        choices=("first", "random"),
        default="first",
        help="which calibration samples: the first N (default) or N drawn at random with --seed",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --calib-sampling random (default: 0)")
    p.add_argument("--eval-samples", type=_POSITIVE, default=None, help="evaluation samples used (default: all)")
    p.add_argument("--lambdas", help="member weights, comma-separated, summing to 1 (default: uniform)")
    p.add_argument("--batch-size", type=_POSITIVE, default=256, help="batch size for calibration and evaluation")
    p.add_argument("--latency-batch", type=_POSITIVE, default=256, help="batch size of the latency measurement")
    p.add_argument(
        "--repeats",
        type=_POSITIVE,
        default=10,
        help="timed repetitions per latency (median reported; each alternates with one of the ensemble)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="pyfusion",
        description="Fast neuron-level model fusion: from one fused network to the exact ensemble.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,fuse,sweep,bench,info}")

    p = sub.add_parser(
        "demo",
        help="train small members on built-in data, fuse them across an alpha grid, write a report",
        description="Train K MLP members (different seeds) on a built-in data set, fuse them with the main methods "
        "across an alpha grid, print the table and write a report folder (tradeoff.png, report.json, report.csv, "
        "and the members as .safetensors).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", choices=("digits", "mnist", "fashion-mnist"), default="digits")
    p.add_argument("--data-dir", help="folder of the MNIST / Fashion-MNIST IDX files (pyfusion never downloads)")
    p.add_argument("--members", "-k", type=_int_at_least(2), default=2, help="number of members K (default: 2)")
    p.add_argument("--hidden", help="hidden widths, comma-separated (default: 64,64 on digits, 256,256 on MNIST)")
    p.add_argument("--epochs", type=_POSITIVE, default=None, help="training epochs per member")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--batch-size", type=_POSITIVE, default=64, help="training batch size (default: 64)")
    p.add_argument(
        "--split",
        choices=("iid", "dirichlet", "shard"),
        default="iid",
        help="training data per member: all of it (iid, default), Dirichlet non-IID shares, or disjoint classes",
    )
    p.add_argument("--seed", type=int, default=0, help="member k uses seed + 1000 k")
    p.add_argument(
        "--methods",
        help="comma-separated methods (default: partial, cluster, average, weight_matching, activation_matching, "
        "ot, hf, kf)",
    )
    p.add_argument("--alphas", help="alpha grid, comma-separated (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--latency-batch", type=_POSITIVE, default=256, help="batch size of the latency measurement")
    p.add_argument("--repeats", type=_POSITIVE, default=None, help="timed repetitions per latency (median reported)")
    p.add_argument("--out", "-o", help="report folder (default: reports/demo-<UTC timestamp>)")
    p.add_argument("--fast", action="store_true", help="tiny settings that finish in seconds (for tests)")
    # One thread by default: the demo's MLPs are too small to gain from more, and on a busy 2-core machine two
    # threads made the median latency per batch 50-140 ms instead of 0.04 ms (load 12, 64-32-32-10 MLP).
    _common(p, threads=1)

    p = sub.add_parser(
        "fuse",
        help="fuse member files with one method and save the fused model",
        description="Fuse K members of one architecture and save the result with pyfusion.save (load it with "
        "pyfusion.load). Prints the members, the ensemble and the fused model's accuracy, cost and latency.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _members_args(p)
    p.add_argument(
        "--method",
        help="fusion method, e.g. partial, average, weight_matching, ... (required unless --budget is given; with "
        "--budget it restricts the search to that method)",
    )
    p.add_argument(
        "--budget",
        type=_positive_float,
        help="FLOP budget instead of one method: a fraction in (0, 1] of the ensemble's FLOPs per sample, or a FLOP "
        "count > 1; saves the most accurate candidate that fits (pyfusion.fuse(..., budget=...), chosen on held-out "
        "calibration samples: members, sub-ensembles, partial / fitted partial fusion, clustering, ...)",
    )
    p.add_argument(
        "--alpha",
        help="fraction of neurons kept per member: one value, comma-separated per group, or JSON {group: value}",
    )
    p.add_argument("--features", choices=("weights", "activations", "pcd"), help="what partial fusion matches on")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="further method option (repeatable), value as a Python literal, e.g. --method weight_matching "
        "--option max_iter=50 (an unknown option is a usage error listing the method's options)",
    )
    p.add_argument("--output", "-o", required=True, help="path of the fused model (.safetensors)")
    _common(p)

    p = sub.add_parser(
        "sweep",
        help="trade-off curve of one or several methods over an alpha grid",
        description="Fuse the members with every method at every alpha (full-fusion methods once) and write the "
        "same report as demo.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _members_args(p)
    p.add_argument(
        "--methods",
        default="partial",
        help="comma-separated methods with optional options, e.g. 'partial(features=activations),average'",
    )
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="alpha grid, comma-separated")
    p.add_argument("--out", help="report folder (default: reports/sweep-<UTC timestamp>)")
    _common(p)

    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts (quick mode) and print their tables",
        description="Run bench/bench_*.py from the source checkout (all, or the named parts) with --quick, "
        "or in full with --full, and print their output (the result tables).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("parts", nargs="*", help="benchmark names (bench_<name>.py), default: all")
    p.add_argument("--full", action="store_true", help="full runs instead of --quick")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--bench-dir", help="folder of the bench_*.py scripts (default: the checkout's bench/)")
    p.add_argument("--script-args", default="", help="extra arguments passed to every script (one quoted string)")
    _common(p)

    sub.add_parser("info", help="versions and available backends (python -m pyfusion.info)")
    return parser


def _error(command: str, err: CLIError, verbose: bool) -> int:
    if verbose and err.__cause__ is not None:
        traceback.print_exception(err.__cause__, file=sys.stderr)
    print(f"pyfusion {command}: error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"  hint: {err.hint}", file=sys.stderr)
    return err.code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``pyfusion --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "info":
        from pyfusion.info import main as info_main

        return info_main()
    verbose = bool(getattr(args, "verbose", False))
    saved_env = os.environ.get("TQDM_DISABLE")
    try:
        console = Console(quiet=args.quiet, verbose=verbose)
        if args.quiet or not sys.stderr.isatty():
            # The library's own bars (e.g. activation statistics) follow the CLI's rule too: on a terminal
            # only, never with --quiet. tqdm >= 4.66 reads TQDM_* environment variables as defaults.
            os.environ.setdefault("TQDM_DISABLE", "1")
        if getattr(args, "threads", None) is not None:
            import torch

            torch.set_num_threads(args.threads)
        from pyfusion.cli import commands

        handler = {
            "demo": commands.cmd_demo,
            "fuse": commands.cmd_fuse,
            "sweep": commands.cmd_sweep,
            "bench": commands.cmd_bench,
        }[args.command]
        return handler(args, console)
    except CLIError as err:
        return _error(args.command, err, verbose)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at interpreter exit
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"pyfusion {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line (traceback with --verbose)
        if verbose:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"pyfusion {args.command}: internal error: {type(exc).__name__}: {first}", file=sys.stderr)
        print("  hint: rerun with --verbose for the traceback and report it as a bug", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if saved_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_env


if __name__ == "__main__":
    sys.exit(main())
