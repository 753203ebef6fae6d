"""bench/frontier.py's baseline columns: the selectable baseline a user picks on the calibration set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zoo = _import("zoo")
frontier = _import("frontier")


def _row(method: str, m: int, value: float, calib: float | None) -> zoo.BaselineRow:
    return zoo.BaselineRow(method, tuple(range(m)), m, "accuracy", value, calib, 100 * m, 10 * m, m / 4)


ROWS = [
    _row("member 0", 1, 0.99, 0.99),  # an individual member: the oracle's choice, not realizable
    _row("best member (calibration)", 1, 0.90, 0.91),
    _row("best member (test, oracle)", 1, 0.99, 0.99),
    _row("mean member", 1, 0.95, 0.97),  # an expectation over members, not one model
    _row("sub-ensemble best 2/4 (calibration, logits)", 2, 0.93, 0.95),
    _row("sub-ensemble mean 2/4 (logits)", 2, 0.96, 0.99),
    _row("ensemble (logits)", 4, 0.94, 0.95),  # ties the 2-subset on calibration: the cheaper wins
    _row("ensemble (probs x class shares)", 4, 0.98, 0.999),  # needs the training class counts
]


def test_calib_selected_picks_the_best_selectable_row_on_calibration():
    assert frontier._calib_selected(ROWS, 400).method == "sub-ensemble best 2/4 (calibration, logits)"
    assert frontier._calib_selected(ROWS, 399).method == "sub-ensemble best 2/4 (calibration, logits)"
    assert frontier._calib_selected(ROWS, 199).method == "best member (calibration)"
    assert frontier._calib_selected(ROWS, 99) is None
    # best_within, by contrast, takes the row with the best *test* value (here the class-share ensemble)
    assert zoo.best_within(ROWS, 400).method == "ensemble (probs x class shares)"


def test_selectable_drops_means_and_class_shares():
    names = [r.method for r in frontier._selectable(ROWS)]
    assert "mean member" not in names and "sub-ensemble mean 2/4 (logits)" not in names
    assert "ensemble (probs x class shares)" not in names
    assert "ensemble (logits)" in names and "best member (calibration)" in names
