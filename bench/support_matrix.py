"""The support matrix (model family x method), measured: every method runs on every family's tiny test model.

The families are the IR test models (tests/_ir_models.py): MLP, VGG + BatchNorm, ResNet, a user class with
``torch.cat`` skips and in-place ReLU, a torchvision-style ResNet (in-place ReLU, ``out += identity``), a block on
``nn.MultiheadAttention``, ``nn.TransformerEncoder``, and tiny Hugging Face BERT, ViT, GPT-2 and Llama
(grouped-query attention) models. Each model is float64 with every parameter re-drawn (no symmetric initialisation
hides a wrong map) and is fused with a copy of itself whose neurons,
heads and free within-head dims are randomly permuted (:func:`pyfusion.testing.permuted_copy`). A cell is ✓ when
the fused network gives back the model's outputs on fresh inputs (relative max error below the tolerance; the
calibration data are 16 other samples), else ✗ with the first line of the error (or the measured errors). What
each column checks:

* ``average``: fused with an *unpermuted* copy (vanilla averaging cannot undo a permutation); gives the model.
* ``weight_matching``, ``activation_matching``, ``ot``: the permuted copy comes back.
* ``partial``: the permuted copy comes back at alpha 0, 0.5 and 1 (all three).
* ``cluster``: clustering the two copies' neurons to one member's width (alpha 0) gives the model.
* ``cluster_fit``: the same clustering with every slot refitted by least squares (ridge 1e-2) gives the model
  (interpolation tolerance).
* ``prune``: pruning the ensemble of the two copies at the ensemble's width gives the model (the ensemble).
* ``hf``, ``kf``, ``kf_gradient`` (neuron interpolation; kf_gradient with 1 epoch per level): the model comes back.
* ``repair``: activation matching and partial fusion at alpha 0.5, each with ``repair=True`` (the REPAIR
  statistics of a model and its permuted copy agree, so the rescaling must be the identity).
* ``fast_modules``: partial fusion at alpha 0.5 with ``fast_modules="always"`` (the cost model would keep the tiny
  test layers dense): the model comes back and at least one layer runs block-sparse (``PartialLinear`` /
  ``PartialConv2d`` / ``PartialMultiheadAttention``).
* ``save/load``: that fast partially fused model through ``pyfusion.save`` / ``pyfusion.load`` gives the same
  outputs. A user's class loads only with ``factory=`` (the member constructor: a file never names code to run);
  the cell then says so.

Tolerances (relative to the outputs' max magnitude): 1e-8; Llama 1e-5 where a stream is widened (Hugging Face's
RMSNorm computes in float32); neuron interpolation 1e-5 (least squares with a 1e-6 relative ridge toward the
aligned average of the members' weights; the measured error is in the details table).

Writes bench/results/support_matrix.md (+ CSV); ``--readme`` also pastes the matrix into README.md. ``--quick``:
MLP and GPT-2 only, into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from _ir_families import max_diff, randomize, run  # noqa: E402
from _ir_models import (  # noqa: E402
    CatNet,
    EncoderNet,
    MHANet,
    TorchvisionResNet,
    hf_models,
    register_test_adapters,
)
from common import Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion import models  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.nn import PartialConv2d, PartialLinear, PartialMultiheadAttention  # noqa: E402
from pyfusion.serialization import SerializationError  # noqa: E402
from pyfusion.testing import permuted_copy  # noqa: E402

F64 = torch.float64
# neuron interpolation solves ridge-regularised least squares (1e-6 relative ridge toward the aligned average):
# a model and its permuted copy come back to at most 1.9e-6 relative (Llama: float32 RMSNorm; 1.9e-7 elsewhere;
# measured, 16 calibration samples, fresh inputs); the error is given in the details table
INTERP_TOL = 1e-5


def _x(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(8, *shape, dtype=F64, generator=g)


def _ids(vocab: int, length: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, vocab, (8, length), generator=g)


def families() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.Generator], torch.Tensor]]]:
    """Row label -> (model factory, batch maker)."""
    fam: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
        "MLP": (lambda: models.mlp([6, 10, 8, 3]), _x(6)),
        "VGG + BN": (lambda: models.vgg((4, "M", 6, "M"), in_channels=2, image_size=8, hidden=5), _x(2, 8, 8)),
        "ResNet": (lambda: models.resnet20(1, blocks=1), _x(3, 8, 8)),
        "user class (torch.cat, in-place ReLU)": (CatNet, _x(5, 6)),
        "user class (torchvision-style ResNet)": (TorchvisionResNet, _x(3, 8, 8)),
        "nn.MultiheadAttention": (MHANet, _x(5, 5)),
        "nn.TransformerEncoder": (EncoderNet, _x(5, 5)),
    }
    hf = hf_models()
    labels = {"bert": "HF BERT", "vit": "HF ViT", "gpt2": "HF GPT-2", "llama": "HF Llama (GQA)"}
    for key, label in labels.items():
        if key in hf:
            fam[label] = (hf[key][0], _x(1, 8, 8) if key == "vit" else _ids(100, 6))
    return fam


METHODS = (
    "average",
    "weight_matching",
    "activation_matching",
    "ot",
    "partial",
    "cluster",
    "cluster_fit",
    "prune",
    "hf",
    "kf",
    "kf_gradient",
    "repair",
    "fast_modules",
    "save/load",
)
QUICK_FAMILIES = ("MLP", "HF GPT-2")
README = Path(HERE).parent / "README.md"
BEGIN, END = "<!-- SUPPORT-MATRIX:BEGIN -->", "<!-- SUPPORT-MATRIX:END -->"


class Mismatch(AssertionError):
    """The fused network ran but did not give the model back."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    msg = msg.replace("|", "\\|")
    return msg if len(msg) <= 160 else msg[:157] + "..."


def check_family(factory: Callable[[], torch.nn.Module], batch: Callable[[torch.Generator], torch.Tensor],
                 methods: tuple[str, ...], wide_tol: float) -> dict[str, tuple[bool, str, float]]:  # fmt: skip
    """method -> (passed, message, seconds) for one family."""
    gen = torch.Generator().manual_seed(11)
    model = randomize(factory(), 1)
    data = [batch(gen) for _ in range(2)]
    test = [batch(torch.Generator().manual_seed(23))]
    graph = trace_groups(model, data[0])
    twin = permuted_copy(model, torch.Generator().manual_seed(5), graph=graph)
    same = copy.deepcopy(model)
    want = run(model, test[0])
    scale = max(1.0, max(float(t.abs().max()) for t in want))

    def fuse(members: list[torch.nn.Module], method: str, **kw: Any) -> torch.nn.Module:
        kw.setdefault("fast_modules", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pyfusion.fuse(members, data, method=method, graph=graph, reset_bn=False, **kw).eval()

    def widened(fused: torch.nn.Module) -> bool:
        return any(sum(lay[1:]) > 0 for lay in getattr(fused, "fusion_layouts", {}).values())

    def expect(fused: torch.nn.Module, tol: float = 1e-8) -> float:
        tol = max(tol, wide_tol) if widened(fused) else tol
        err = max_diff(run(fused, test[0]), want) / scale
        if not err <= tol:
            y = run(model, data[0])
            on_calib = max_diff(run(fused, data[0]), y) / max(1.0, max(float(t.abs().max()) for t in y))
            raise Mismatch(
                f"the model does not come back: relative error {err:.2e} > {tol:g} on fresh inputs "
                f"({on_calib:.1e} on the calibration inputs)"
            )
        return err

    def check(method: str) -> str:
        if method == "average":
            expect(fuse([model, same], "average"))
        elif method in ("weight_matching", "activation_matching", "ot"):
            expect(fuse([model, twin], method))
        elif method == "partial":
            for alpha in (0.0, 0.5, 1.0):
                try:
                    expect(fuse([model, twin], "partial", alpha=alpha))
                except Mismatch as exc:
                    raise Mismatch(f"alpha {alpha:g}: {exc}") from None
        elif method == "cluster":
            expect(fuse([model, twin], "cluster", alpha=0.0))  # default n_restarts (200)
        elif method == "cluster_fit":  # the clustered slots refitted by least squares (ridge): interp tolerance
            return f"relative error {expect(fuse([model, twin], 'cluster_fit', alpha=0.0), tol=INTERP_TOL):.1e}"
        elif method == "prune":
            expect(fuse([model, twin], "prune", width=2.0))
        elif method in ("hf", "kf"):
            return f"relative error {expect(fuse([model, twin], method), tol=INTERP_TOL):.1e}"
        elif method == "kf_gradient":
            err = expect(fuse([model, twin], method, epochs=1, last_epochs=1), tol=INTERP_TOL)
            return f"relative error {err:.1e}"
        elif method == "repair":
            expect(fuse([model, twin], "activation_matching", repair=True))
            try:
                expect(fuse([model, twin], "partial", alpha=0.5, repair=True))
            except Exception as exc:
                raise type(exc)(f"partial alpha 0.5 + REPAIR: {exc}") from None
        elif method in ("fast_modules", "save/load"):
            # the tiny test layers would stay dense by the cost model: swap every block-sparse layer
            fused = fuse([model, twin], "partial", alpha=0.5, fast_modules="always")
            fast = (PartialLinear, PartialConv2d, PartialMultiheadAttention)
            swapped = [p for p, m in fused.named_modules() if isinstance(m, fast)]
            expect(fused)
            if method == "fast_modules":
                if not swapped:
                    raise Mismatch("no layer was made block-sparse (PartialLinear / PartialConv2d)")
                return f"{len(swapped)} block-sparse layers"
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "fused.safetensors")
                pyfusion.save(fused, path)
                try:
                    expect(pyfusion.load(path))
                    return ""
                except SerializationError as exc:
                    if "factory" not in str(exc):
                        raise
                # a user's class: the file never names code to run, so the user passes the member constructor
                expect(pyfusion.load(path, factory=factory))
                return f"load(path, factory={factory.__name__})"
        else:  # pragma: no cover - METHODS and this function are edited together
            raise ValueError(f"unknown column {method!r}")
        return ""

    results: dict[str, tuple[bool, str, float]] = {}
    for method in methods:
        t0 = time.perf_counter()
        try:
            note = check(method)
            results[method] = (True, note, time.perf_counter() - t0)
        except Exception as exc:  # a failure is a cell of the matrix (its traceback goes to stderr)
            if not isinstance(exc, Mismatch):
                traceback.print_exc()
            results[method] = (False, _first_line(exc), time.perf_counter() - t0)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MLP and GPT-2 only, temporary output")
    ap.add_argument("--families", default=None, help="comma-separated row labels (default: all)")
    ap.add_argument("--methods", default=None, help=f"comma-separated columns (default: {','.join(METHODS)})")
    ap.add_argument("--out", default=None, help="Markdown output (default bench/results/support_matrix.md)")
    ap.add_argument("--readme", action="store_true", help=f"also paste the matrix into README.md between {BEGIN}, END")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    register_test_adapters()
    fams = families()
    names = args.families.split(",") if args.families else list(QUICK_FAMILIES if args.quick else fams)
    unknown = [n for n in names if n not in fams]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {list(fams)}")
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; known: {list(METHODS)}")
    matrix: dict[str, dict[str, tuple[bool, str, float]]] = {}
    for name in names:
        print(f"[support matrix] {name}", flush=True)
        matrix[name] = check_family(*fams[name], methods, 1e-5 if "Llama" in name else 0.0)
    report = Report("Support matrix: model family x method (measured)", quick=args.quick)
    report.text(__doc__.split("\n\n", 1)[1].rsplit("\n\nWrites", 1)[0])
    cells = [[name] + ["✓" if matrix[name][m][0] else "✗" for m in methods] for name in names]
    report.table("matrix", ["family", *methods], cells, align={m: "left" for m in methods})
    notes = [
        (name, m, "✓" if ok else "✗", msg, secs)
        for name in names
        for m in methods
        for ok, msg, secs in [matrix[name][m]]
        if msg or not ok
    ]
    report.table("details", ["family", "method", "result", "message", "seconds"], notes, formats={"seconds": ".1f"})
    n_fail = sum(not matrix[n][m][0] for n in names for m in methods)
    report.text(f"{len(names) * len(methods) - n_fail} of {len(names) * len(methods)} cells pass.")
    written = report.write(output_path(args.out, "support_matrix.md", args.quick))
    if args.readme:
        paste_into_readme(report.tables()[0].markdown(), written[0], names, methods)
    return 0


def paste_into_readme(table: list[str], source: Path, names: list[str], methods: tuple[str, ...]) -> None:
    """Replace the README's matrix (between the BEGIN / END markers) by ``table`` (the full matrix only)."""
    if set(names) != set(families()) or set(methods) != set(METHODS):
        raise SystemExit("--readme needs the full matrix (every family and method)")
    text = README.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"README.md must contain {BEGIN} and {END} once each")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    try:
        where = source.resolve().relative_to(README.parent).as_posix()
    except ValueError:
        where = source.name
    block = [BEGIN, f"<!-- generated by `python bench/support_matrix.py --readme` from {where}; do not edit -->", ""]
    tmp = README.with_name(f".{README.name}.{os.getpid()}.tmp")
    tmp.write_text(head + "\n".join([*block, *table, ""]) + END + tail)
    os.replace(tmp, README)
    print(f"wrote {README}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
