"""Output, progress bars and errors of the command line.

Standard output carries results only (tables, the paths of written files), so that scripts can parse
it; progress bars, notes and errors go to standard error. ``--quiet`` silences everything but errors,
``--verbose`` adds details and the traceback of every error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# Exit codes scripts can rely on (documented in ``pyfusion --help`` and the README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in pyfusion: rerun with --verbose and report the traceback
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)
EXIT_INPUT = 3  # a member file, model factory or data set cannot be read or does not fit
EXIT_FUSION = 4  # the fusion method rejected the members / options or failed
EXIT_OUTPUT = 5  # the report or the fused model cannot be written
EXIT_BENCH = 6  # a benchmark script failed
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = """exit codes:
  0    success
  1    internal error (a bug: rerun with --verbose and report the traceback)
  2    usage error (bad arguments)
  3    bad input: a member file, model factory or data set cannot be read or does not fit
  4    fusion failed (the method rejected the members or options)
  5    cannot write the output (report folder or fused model file)
  6    a benchmark script failed
  130  interrupted"""


class CLIError(Exception):
    """A user-facing failure: one line of message, an optional hint saying what to do, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


class Console:
    """Where the command line writes: results to stdout, notes and progress to stderr."""

    def __init__(self, quiet: bool = False, verbose: bool = False) -> None:
        if quiet and verbose:
            raise CLIError("--quiet and --verbose exclude each other", EXIT_USAGE, "give at most one of them")
        self.quiet = quiet
        self.verbose = verbose

    def result(self, text: str) -> None:
        """A result line (table, written path): stdout, suppressed by --quiet."""
        if not self.quiet:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A progress note: stderr, suppressed by --quiet."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def debug(self, text: str) -> None:
        """A detail shown with --verbose only (stderr)."""
        if self.verbose:
            print(f"[verbose] {text}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, **kwargs: Any) -> Any:
        """A manual tqdm bar (``.update(n)``, ``.close()``) with the same on/off rules as :meth:`progress`."""
        from tqdm.auto import tqdm

        disable: bool | None = True if self.quiet else None
        return tqdm(total=total, desc=desc, disable=disable, leave=False, file=sys.stderr, **kwargs)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
        """A tqdm bar on stderr; off with --quiet, and off automatically when stderr is not a terminal."""
        from tqdm.auto import tqdm

        disable: bool | None = True if self.quiet else None  # None: tqdm disables itself on non-TTY
        yield from tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, file=sys.stderr, **kwargs)


@contextmanager
def stage(what: str, code: int, hint: str | None = None) -> Iterator[None]:
    """Turn the library's validation errors raised inside the block into a :class:`CLIError`.

    ``ValueError`` (which includes :class:`pyfusion.serialization.SerializationError`), ``TypeError``
    from a wrong call, ``FileNotFoundError`` and ``RuntimeError`` (e.g. a shape mismatch inside torch)
    become one line ``<what>: <message>`` with ``code``; anything else propagates as an internal error.
    """
    try:
        yield
    except CLIError:
        raise
    except FileNotFoundError as exc:
        raise CLIError(f"{what}: {exc}", EXIT_INPUT if code != EXIT_OUTPUT else code, hint) from exc
    except (ValueError, TypeError, RuntimeError, KeyError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"{what}: {msg}", code, hint) from exc
