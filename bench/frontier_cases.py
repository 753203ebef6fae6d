"""A few frontier cases at a few budgets: what ``pyfusion.fuse.budget_search`` chooses and its test accuracy, with
every feasible fused candidate's held-out objective (the quick check of one change to the search, without the
34-minute gauntlet of ``bench/frontier.py``; same case builders, calibration subset and seed).

Run: ``python bench/frontier_cases.py mnist/resnet/iid/K2,mnist/vit/iid/K2 --budgets 0.25,0.375
[--candidates members,subsets,cluster,cluster_fit] [--class-counts]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import frontier  # noqa: E402
import zoo  # noqa: E402

import pyfusion  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", help="comma-separated case names")
    ap.add_argument("--budgets", default="0.25,0.375")
    ap.add_argument("--candidates", default=None, help="comma-separated candidate families (default: all)")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--cluster-restarts", type=int, default=5)
    ap.add_argument("--class-counts", action="store_true", help="give the search the members' class shares")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.cases.split(","):
        case = zoo.get_case(name)
        opts: dict = {"cluster_restarts": args.cluster_restarts}
        if args.candidates:
            opts["candidates"] = args.candidates.split(",")
        if args.class_counts and case.spec.split != "iid":
            opts["class_counts"] = torch.as_tensor(case.class_shares())
        t0 = time.perf_counter()
        search = pyfusion.fuse.budget_search(case.members, frontier._calibration(case, args.calib), **opts)
        for b in (float(v) for v in args.budgets.split(",")):
            model = search.choose(b)
            info = model.fusion_info["budget"]
            margin = info["margin_test"]
            print(f"{name} b={b:g}: {info['chosen']} ({info['chosen_fraction']:.3f} of the ensemble), test "
                  f"{100 * frontier._accuracy(model, case):.2f}%, objective {info['chosen_objective']:.4g}"
                  + ("" if margin is None else f", margin z {margin['z']:.3g} (passed: {margin['passed']})"),
                  flush=True)  # fmt: skip
            tc = info.get("trivial_choice")
            if tc is not None and tc.get("argmin") != tc.get("chosen", tc.get("argmin")):
                t = tc["chosen_vs_argmin"]
                print(f"    trivial: {tc['chosen']} by the prior rule over the argmin {tc['argmin']} (excess loss "
                      f"{t['mean_excess_loss']:.4g}, z {t['z']:.3g} <= {tc['margin']:g})")  # fmt: skip
            for r in info["candidates"]:
                if r["feasible"] and r["family"] not in ("members", "subsets"):
                    print(f"    {r['name']}: {r['fraction']:.3f}, held-out objective {r['holdout_objective']:.4g}")
        print(f"{name}: {search.fusions} fusions, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
