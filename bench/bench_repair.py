"""REPAIR after partial fusion (``pyfusion.fuse.repair.repair``): the one-pass path (all calibration samples as one
batch, each group corrected by a forward hook on its module) against the pass per group it replaced (forced with
``ONE_PASS_BYTES = 0``). Both times include the members' passes for the targets (K = 2 passes, the same work).

Shapes: a ResNet-20 pair (``pyfusion.models.resnet20``; the residual streams are skipped, the block-internal groups
corrected), a VGG11-BN pair and an MLP pair (3072-512-512-512-10, biased Linears, no normalisation: each correction
recomputes its Linear once more in the one pass), 512 CIFAR-sized samples (3 x 32 x 32) in batches of 64,
alpha = 0.5, float32, 1 thread. The two ways take turns in every round (interleaved, so load swings hit them
alike), after an untimed warm-up round; the table reports the median over rounds and the ratio of medians. The
corrected weights of the two paths are compared (max relative difference over all floating-point entries).

Usage: python bench/bench_repair.py [--quick] [--rounds 5] [--out bench/results/repair_cpu.md]
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from common import Report, calibration_bench_args, calibration_bench_pair, output_path

import pyfusion
from pyfusion.fuse import repair as repair_mod

ARCHS = ("resnet20", "vgg11_bn", "mlp")


def _shape(arch: str, quick: bool) -> str:
    if arch == "resnet20":
        return "width 4, 1 block / stage" if quick else "width 1 (16-32-64), 3 blocks / stage"
    if arch == "mlp":
        return "3072-32-32-32-10" if quick else "3072-512-512-512-10"
    return "8-M-16-M" if quick else "VGG11 (64 ... 512)"


def main() -> None:
    args, data, rounds = calibration_bench_args(__doc__)
    n = sum(int(x.shape[0]) for x in data)
    rows = []
    for arch in ARCHS:
        members = calibration_bench_pair(arch, args.quick)
        built = pyfusion.fuse(members, data, method="partial", alpha=0.5, fast_modules=False)  # BatchNorm recalibrated
        graph, plan = pyfusion.graph.trace_groups(members[0], data[0]), built.fusion_plan
        times: dict[str, list[float]] = {"one pass": [], "pass per group": []}
        weights: dict[str, dict[str, torch.Tensor]] = {}
        info: dict[str, dict] = {}
        for r in range(rounds + 1):  # round 0: warm-up (engine loading, traced programs), not timed
            for way in times:
                fused = copy.deepcopy(built)
                saved = repair_mod.ONE_PASS_BYTES
                repair_mod.ONE_PASS_BYTES = saved if way == "one pass" else 0
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", repair_mod.RepairSkippedWarning)  # residual streams
                        info[way] = repair_mod.repair(fused, members, graph, plan, data)
                finally:
                    repair_mod.ONE_PASS_BYTES = saved
                if r:
                    times[way].append(time.perf_counter() - t0)
                weights[way] = {k: v for k, v in fused.state_dict().items() if v.is_floating_point()}
        diff = max(
            float(((weights["one pass"][k] - v).abs() / v.abs().clamp_min(1e-12)).max())
            for k, v in weights["pass per group"].items()
        )
        med = {w: statistics.median(t) for w, t in times.items()}
        rows.append([arch, _shape(arch, args.quick), len(info["one pass"]["repaired"]), n,
                     info["one pass"]["passes"], info["pass per group"]["passes"], med["one pass"] * 1e3,
                     med["pass per group"] * 1e3, med["pass per group"] / med["one pass"], diff])  # fmt: skip
    report = Report("REPAIR after partial fusion: one pass vs a pass per group (CPU)", quick=args.quick)
    report.text(__doc__.split("\n\nUsage")[0])
    cols = ["pair", "shape", "corrected groups", "samples", "fused passes (one pass)", "fused passes (per group)",
            "one pass ms", "pass per group ms", "speed-up", "max rel. diff of weights"]  # fmt: skip
    fmts = {"one pass ms": ".0f", "pass per group ms": ".0f", "speed-up": ".2f", "max rel. diff of weights": ".1e"}
    report.table("repair", cols, rows, formats=fmts)
    report.write(output_path(args.out, "repair_cpu.md", args.quick))
    print(report.markdown())


if __name__ == "__main__":
    main()
