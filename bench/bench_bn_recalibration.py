"""BatchNorm recalibration after partial fusion (``pyfusion.fuse.bn.recalibrate_bn``): the one-pass path (all
calibration samples as one batch, each BatchNorm recalibrated by its pre-hook before it runs) against the pass per
BatchNorm it replaced (forced with ``ONE_PASS_BYTES = 0``) and the plain reset of every BatchNorm in one train-mode
pass (``reset_bn_stats``, what a user of ``torch.optim.swa_utils.update_bn`` would write; it also overwrites the
slots fusion did not change, so alpha = 1 would no longer be the ensemble).

Shapes: a ResNet-20 pair (``pyfusion.models.resnet20``, 19 BatchNorms) and a VGG11-BN pair, 512 CIFAR-sized samples
(3 x 32 x 32) in batches of 64, alpha = 0.5, float32, 1 thread. The three ways take turns in every round
(interleaved, so load swings hit them alike); the table reports the median over rounds and the ratio of medians.
The statistics of the two recalibration paths are compared (max relative difference).

Usage: python bench/bench_bn_recalibration.py [--quick] [--rounds 5] [--out bench/results/bn_recalibration_cpu.md]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import Report, calibration_bench_args, calibration_bench_pair, output_path

import pyfusion
from pyfusion.fuse import bn as bn_mod


def main() -> None:
    args, data, rounds = calibration_bench_args(__doc__)
    n = sum(int(x.shape[0]) for x in data)
    rows = []
    for arch in ("resnet20", "vgg11_bn"):
        members = calibration_bench_pair(arch, args.quick)
        built = pyfusion.fuse(members, data, method="partial", alpha=0.5, fast_modules=False, reset_bn=False)
        graph, plan = pyfusion.graph.trace_groups(members[0], data[0]), built.fusion_plan
        times: dict[str, list[float]] = {"one pass": [], "pass per BatchNorm": [], "plain reset": []}
        stats: dict[str, dict[str, torch.Tensor]] = {}
        for _ in range(rounds):
            for way in times:
                fused = copy.deepcopy(built)
                saved = bn_mod.ONE_PASS_BYTES
                t0 = time.perf_counter()
                if way == "plain reset":
                    bn_mod.reset_bn_stats(fused, data)
                else:
                    bn_mod.ONE_PASS_BYTES = saved if way == "one pass" else 0
                    try:
                        bn_mod.recalibrate_bn(fused, members, graph, plan, data)
                    finally:
                        bn_mod.ONE_PASS_BYTES = saved
                times[way].append(time.perf_counter() - t0)
                if way != "plain reset":
                    stats[way] = {k: v for k, v in fused.state_dict().items() if k.endswith("running_var")}
        diff = max(
            float(((stats["one pass"][k] - v).abs() / v.abs().clamp_min(1e-12)).max())
            for k, v in stats["pass per BatchNorm"].items()
        )
        nbn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in members[0].modules())
        med = {w: statistics.median(t) for w, t in times.items()}
        rows.append([arch, nbn, n, med["one pass"] * 1e3, med["pass per BatchNorm"] * 1e3, med["plain reset"] * 1e3,
                     med["pass per BatchNorm"] / med["one pass"], diff])  # fmt: skip
    report = Report("BatchNorm recalibration after partial fusion (CPU)", quick=args.quick)
    report.text(__doc__.split("\n\nUsage")[0])
    cols = ["pair", "BatchNorms", "samples", "one pass ms", "pass per BatchNorm ms", "plain reset ms",
            "speed-up", "max rel. diff of running_var"]  # fmt: skip
    fmts = {"one pass ms": ".0f", "pass per BatchNorm ms": ".0f", "plain reset ms": ".0f", "speed-up": ".2f",
            "max rel. diff of running_var": ".1e"}  # fmt: skip
    report.table("recalibration", cols, rows, formats=fmts)
    report.write(output_path(args.out, "bn_recalibration_cpu.md", args.quick))
    print(report.markdown())


if __name__ == "__main__":
    main()
