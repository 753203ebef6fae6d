"""The measured choice among equivalent CPU execution strategies of a partially fused layer.

A partially fused layer can be run several ways that give the same result (to float rounding): the panel engine,
torch's BLAS over the allowed blocks, one GEMM per run of output segments over its gathered inputs, or the dense
matrix with zero blocks. Which is fastest depends on the layer's shape, the batch, the dtype, the thread count and
the machine: measured on the 2-core VM (bench/results/partial_linear_cpu.md, partial_linear_batch1.md), a fixed
rule lost to the members run one after another in 27/60 batch-1 cases (up to 1.78x) and to the dense zero-block
layer on tiny layers (512 -> 10: 0.37x at batch 1024), while each loser had a strategy that won. So the first
call of a layer of a new (shape, dtype, activation, row bucket, threads) runs every candidate a few times,
interleaved, and keeps the fastest (the minimum over rounds: interference only adds time; the best two are measured
a second time and the sum of their two minima decides), runs it, and measures all candidates once more at the key's
32nd call (the minimum over both measurements decides: one machine-wide stall cannot cover both); later calls run
the kept strategy directly (one dict lookup).

``PYFUSION_PARTIAL_TUNING=0`` turns the measurement off (the static default strategy of each op, deterministic
across runs); :func:`choices` lists what was chosen (benchmarks report it), :func:`clear` forgets it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable

from torch import Tensor

__all__ = ["StrategyTuner", "choices", "clear", "row_bucket", "tuning_enabled"]

_ENV = "PYFUSION_PARTIAL_TUNING"

# Timed rounds per candidate after one warm-up call (which also builds the candidate's derived weights): as many
# as fit in _ROUND_BUDGET_S (all candidates together), at least _MIN_ROUNDS, at most _MAX_ROUNDS; the round count is
# sized from one timed call of each candidate after the warm-ups (the layer's very first call also packs weights
# and wakes the thread pool: sized from it, a 50 us layer got 3 rounds). On the 2-core VM loaded by 3 other jobs
# (load 4-7), a fixed 5 rounds of a 10-20 us call still returned a stalled minimum in one of 40 layers measured
# (7.5 ms for an 11 us strategy), and 3 rounds at 2 threads measured 48-68 ms for 60-90 us strategies (a stalled
# OpenMP thread in every round), which kept a strategy 1.7x slower than the best; 50 ms of rounds is 60+ rounds of
# a 50 us call of each of 4 candidates (a layer's first call then costs ~0.05 s once per key), 6 rounds of a 2 ms
# one.
_MIN_ROUNDS, _MAX_ROUNDS, _ROUND_BUDGET_S = 6, 100, 0.05
# A key's choice is measured once more at its _RECHECK_CALLS-th call (the kept strategy runs in between), and the
# minimum per candidate over both measurements decides: a stall of the whole machine lasting longer than one
# measurement (another job taking both cores for 0.1-0.3 s) made every candidate of a 30-140 us layer measure
# 7.4-8.0 ms in the first, which then picked at random; the two measurements are far enough apart not to both fall
# in one such stall. The ops install their one-lookup fast path only once a choice is final (:meth:`final`).
_RECHECK_CALLS = 32
# After the rounds, the best two candidates are measured again (as many rounds, interleaved): the kept strategy
# must be the faster in both measurements (else the default, or the faster of the two in the second one when the
# default is not among them), so that one lucky minimum cannot decide.
# A layer whose default strategy takes longer than this per call is not measured (its first call would cost
# several such calls): the default is kept. 0.25 s covers a 256-channel 3x3 convolution at batch 256 on 2 cores.
_MAX_TUNED_CALL_S = 0.25
# Another strategy replaces the default only when it is this much faster: smaller differences are within the
# run-to-run noise of the loaded VM (2-3% between two identical runs of the same strategy).
_MARGIN = 0.97

_REGISTRY: list[StrategyTuner] = []


def tuning_enabled() -> bool:
    """False when ``PYFUSION_PARTIAL_TUNING`` is ``0`` / ``false`` / ``off``."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def row_bucket(rows: int) -> int:
    """Rows as a tuning key: exact up to 4, then the next power of two (the best strategy changes slowly with the
    batch; one measurement per octave)."""
    return rows if rows <= 4 else 1 << (rows - 1).bit_length()


class StrategyTuner:
    """Per key, the fastest of a few equivalent strategies, measured on the key's first call.

    Args:
        name: the op's name (for :func:`choices`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._chosen: dict[Hashable, str] = {}
        self._recheck: dict[Hashable, int] = {}  # key -> calls left before its second measurement
        self._times: dict[Hashable, dict[str, float]] = {}
        # the op's own hot-path table (its key -> what it needs to run the kept strategy), emptied with the choices
        self.fast: dict[Hashable, object] = {}
        self._lock = threading.Lock()
        _REGISTRY.append(self)

    def chosen(self, key: Hashable) -> str | None:
        return self._chosen.get(key)

    def final(self, key: Hashable) -> str | None:
        """The kept strategy of ``key`` once it will not be measured again (else None)."""
        return None if key in self._recheck else self._chosen.get(key)

    def run(
        self,
        key: Hashable,
        fns: dict[str, Callable[..., Tensor]],
        args: tuple,
        default: str,
        dropped: Callable[[str, tuple, str], None] | None = None,
    ) -> Tensor:
        """``fns[kept](*args)`` with the strategy kept for ``key``; on the key's first call measure every function
        of ``fns`` (name -> a function of ``args`` computing the result) and keep the fastest. ``default`` (a key of
        ``fns``) is kept when tuning is off, when it is too slow to measure, or when nothing beats it by the
        noise margin. ``dropped(name, args, kept)`` is called for each measured strategy not kept (to free what it
        derived from the weights and ``kept`` does not share)."""
        name = self._chosen.get(key)
        if name is not None:
            left = self._recheck.get(key)
            if left is None:
                return fns[name](*args)
            if left > 1:
                self._recheck[key] = left - 1
                return fns[name](*args)
            del self._recheck[key]
            return self._measure(key, fns, args, default, dropped)
        if len(fns) == 1 or not tuning_enabled():
            return fns[default](*args)
        return self._measure(key, fns, args, default, dropped)

    def _measure(
        self,
        key: Hashable,
        fns: dict[str, Callable[..., Tensor]],
        args: tuple,
        default: str,
        dropped: Callable[[str, tuple, str], None] | None,
    ) -> Tensor:
        t0 = time.perf_counter()
        out = fns[default](*args)
        first = time.perf_counter() - t0
        previous = self._times.get(key)
        if first > _MAX_TUNED_CALL_S:
            with self._lock:  # too slow to measure (the first time), or stalled now: keep what was kept
                self._chosen[key] = self._chosen.get(key, default) if previous is not None else default
                self._recheck.pop(key, None)
            kept = self._chosen[key]
            return out if kept == default else fns[kept](*args)
        names = list(fns)
        for n in names:  # warm-up (derived weights, allocator, thread pool) outside the timed rounds
            if n != default:
                fns[n](*args)
        warm = 0.0
        for n in names:
            t0 = time.perf_counter()
            fns[n](*args)
            warm += time.perf_counter() - t0
        # layers whose calls are long (a wide convolution at batch 32) keep 3 rounds: their timings vary less
        # (a stall is a smaller part of a call) and more rounds would cost seconds
        low = _MIN_ROUNDS if warm * _MIN_ROUNDS <= 4 * _ROUND_BUDGET_S else 3
        rounds = int(min(_MAX_ROUNDS, max(low, _ROUND_BUDGET_S / max(warm, 1e-9))))
        best = _rounds(fns, names, args, rounds)
        if previous is not None:  # the second measurement of the key: the minimum over both decides
            for n in names:
                best[n] = min(best[n], previous.get(n, float("inf")))
        ranked = sorted(names, key=lambda n: best[n])
        pick = ranked[0]
        score = dict(best)  # what the pick is compared on
        if len(ranked) > 1:
            # the best two again; the sum of each one's two minima decides (a lucky minimum in one measurement is
            # diluted by the other)
            pair = ranked[:2]
            again = _rounds(fns, pair, args, rounds)
            if default in pair:
                score = {n: best[n] + again[n] for n in pair}
            pick = min(pair, key=lambda n: best[n] + again[n])
            for n in pair:
                best[n] = min(best[n], again[n])
            if default not in pair:
                score = dict(best)
        if score[pick] > _MARGIN * score[default]:
            pick = default
        with self._lock:
            self._chosen[key] = pick
            self._times[key] = best
            if previous is None:
                self._recheck[key] = _RECHECK_CALLS
        if dropped is not None:
            for n in names:
                if n != pick:
                    dropped(n, args, pick)
        # the kept strategy's result, so that every call of a key rounds the same way (its first call included)
        return out if pick == default else fns[pick](*args)

    def settled(self, key: Hashable, fns: dict[str, Callable[..., Tensor]], default: str) -> str | None:
        """The strategy ``key`` will always run from now on (its final choice, or ``default`` when ``fns`` offers
        nothing to choose: :meth:`run` then runs it without recording a choice), or None while still undecided.
        The ops install a call-time shortcut once this is not None."""
        name = self.final(key)
        return default if name is None and len(fns) == 1 else name

    def clear(self) -> None:
        with self._lock:
            self._chosen.clear()
            self._recheck.clear()
            self._times.clear()
            self.fast.clear()


def _rounds(fns: dict[str, Callable[..., Tensor]], names: list[str], args: tuple, rounds: int) -> dict[str, float]:
    """Per name, the minimum seconds of one call of ``fns[name](*args)`` over ``rounds`` interleaved rounds (the
    order rotated each round: no candidate always runs first, after the same other one)."""
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n](*args)
            best[n] = min(best[n], time.perf_counter() - t0)
    return best


def choices() -> dict[str, dict[Hashable, tuple[str, dict[str, float]]]]:
    """Per op, per key, the kept strategy and the measured best seconds per candidate."""
    return {t.name: {k: (v, dict(t._times.get(k, {}))) for k, v in t._chosen.items()} for t in _REGISTRY}


def clear() -> None:
    """Forget every choice (the next call of each key measures again)."""
    for t in _REGISTRY:
        t.clear()
