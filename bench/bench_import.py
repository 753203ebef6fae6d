"""Import cost of inference: ``import pyfusion.nn`` + ``pyfusion.load`` of a partially fused model + one forward.

Each sample is a fresh interpreter (``import torch`` first, not counted): the time from there to the end of one
batch-1 forward under ``torch.no_grad()``, and which heavy modules that imported. The model is a partially fused
MNIST MLP 784-100-100-10 (K = 2, alpha = 0.5: three ``PartialLinear`` layers). ``--compare DIR`` adds another
checkout (e.g. an older commit from ``git archive``, with the extension copied in); the trees take turns in every
round so that load swings hit them alike, and the table reports the min (and median) over the rounds.

Usage: python bench/bench_import.py [--quick] [--rounds 15] [--compare DIR ...] [--out bench/results/import_time.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Report, output_path

PROBE = r"""
import json, sys, time
import torch
t0 = time.perf_counter()
import pyfusion
import pyfusion.nn  # noqa: F401
m = pyfusion.load(sys.argv[1])
with torch.no_grad():
    m(torch.randn(1, 784))
t = time.perf_counter() - t0
heavy = [n for n in ("triton", "torch._dynamo", "torch._inductor", "scipy", "pyfusion.fuse", "pyfusion.stats")
         if n in sys.modules]
print(json.dumps({"s": t, "heavy": heavy}))
"""

MODEL = r"""
import sys, torch, pyfusion
from torch import nn
from pyfusion.nn import PartialLinear
torch.manual_seed(0)
m = nn.Sequential(
    PartialLinear([784, 0, 0], [50, 50, 50], activation="relu"),
    PartialLinear([50, 50, 50], [50, 50, 50], activation="relu"),
    PartialLinear([50, 50, 50], [10, 0, 0]),
)
pyfusion.save(m.eval(), sys.argv[1])
"""


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def sample(tree: Path, model: Path) -> dict:
    # cwd: the model's folder, so that "" on sys.path (python -c) is no checkout
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(model)],
        env=_env(tree),
        cwd=model.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--compare", nargs="*", default=[], help="other checkouts to time against this one")
    ap.add_argument("--out", help="Markdown file (default: bench/results/import_time.md; quick: a temporary folder)")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    trees = [ROOT, *(Path(p).resolve() for p in args.compare)]
    report = Report("Import cost of inference: pyfusion.nn + load + one forward", quick=args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "mlp_partial.safetensors"
        subprocess.run([sys.executable, "-c", MODEL, str(model)], env=_env(ROOT), cwd=tmp, check=True)
        times: dict[Path, list[float]] = {t: [] for t in trees}
        heavy: dict[Path, list[str]] = {}
        for r in range(rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                s = sample(tree, model)
                times[tree].append(s["s"])
                heavy[tree] = s["heavy"]
                print(f"round {r}: {tree}: {s['s']:.3f} s", flush=True)
    report.text(
        f"{rounds} rounds, one fresh interpreter per tree per round (trees interleaved); OMP_NUM_THREADS="
        f"{_env(ROOT)['OMP_NUM_THREADS']}; TRITON_INTERPRET unset. Time after `import torch` (not counted) to the "
        "end of one batch-1 forward of a partially fused MLP 784-100-100-10 (K = 2, alpha = 0.5)."
    )
    report.table(
        "import",
        ["tree", "min s", "median s", "rounds", "heavy modules imported"],
        [[str(t), min(v), statistics.median(v), len(v), ", ".join(heavy[t]) or "none"] for t, v in times.items()],
        formats={"min s": ".3f", "median s": ".3f"},
    )
    report.write(output_path(args.out, "import_time.md", args.quick))


if __name__ == "__main__":
    main()
