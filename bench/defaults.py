"""Defaults chosen by measurement (issue 14 item 5): features, activation point, cost and calibration size.

For a subset of the gauntlet (:mod:`zoo` cases, cached members) and alpha in {0, 0.25, 0.5}, every option of the
methods the budget search builds (``partial``, ``partial_fit``, ``cluster``) is varied one at a time around the
library's defaults, and each fused model is measured on the test set:

* ``acc``: test accuracy;
* ``dist``: mean squared distance of its logits to the logit ensemble ``sum_k lambda_k z_k`` on the test set (the
  budget search's label-free objective).

Axes (everything else at the default):

* partial: ``features`` in {activations, weights} x ``cost`` in {sqdist, correlation} x ``point`` in {post, pre}
  (the point acts on activation features only);
* partial_fit: ``point`` in {post, pre}, ``cost`` in {sqdist, correlation};
* cluster: ``point`` in {post, pre} (width matched to partial fusion's slot count at alpha, ``alpha=``);
* calibration size n in {128, 256, 512, 1024, 2048} (the first n of the zoo's class-balanced calibration slice) for
  partial and partial_fit at the default options.

The summary counts, per axis, in how many (case, alpha) cells each value has the higher test accuracy (and the
lower distance). Run: ``python bench/defaults.py [--quick] [--cases A,B] [--out FILE]`` (1 thread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import zoo  # noqa: E402
from common import Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.train import predict_logits  # noqa: E402

DEFAULT_CASES = [
    "mnist/mlp/iid/K2",
    "mnist/mlp/dirichlet0.5/K4",
    "fmnist/mlp/dirichlet0.5/K2",
    "mnist/vgg_bn/iid/K2",
    "mnist/resnet/iid/K2",
    "mnist/vit/iid/K2",
]
QUICK_CASES = ["digits/mlp/iid/K2"]
ALPHAS = (0.0, 0.25, 0.5)
CALIB_SIZES = (128, 256, 512, 1024, 2048)
CALIB_DEFAULT = 512  # the calibration samples of the option axes (the size axis varies it)

# (method, options varied from the defaults): the option axes
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("partial", {"features": "activations", "cost": "sqdist", "point": "post"}),
    ("partial", {"features": "activations", "cost": "sqdist", "point": "pre"}),
    ("partial", {"features": "activations", "cost": "correlation", "point": "post"}),
    ("partial", {"features": "activations", "cost": "correlation", "point": "pre"}),
    ("partial", {"features": "weights", "cost": "sqdist"}),
    ("partial", {"features": "weights", "cost": "correlation"}),
    ("partial_fit", {"point": "post"}),
    ("partial_fit", {"point": "pre"}),
    ("partial_fit", {"point": "post", "cost": "correlation"}),
    ("cluster", {"point": "post"}),
    ("cluster", {"point": "pre"}),
]


def _calib(case: zoo.Case, n: int, batch: int = 256) -> list[torch.Tensor]:
    x = case.calib[0]
    if n > x.shape[0]:
        raise ValueError(f"{case.name}: {n} calibration samples requested, the case has {x.shape[0]}")
    # the zoo's slice is ordered by class: a seeded permutation keeps every prefix class-balanced in expectation
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return [x[idx[s : s + batch]] for s in range(0, n, batch)]


def _test_subset(case: zoo.Case, n: int | None) -> torch.Tensor:
    """Indices of the test samples evaluated: all, or a seeded random ``n`` of them."""
    total = case.test[1].shape[0]
    if n is None or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(1))[:n]


def _measure(model: torch.nn.Module, case: zoo.Case, ens: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    from pyfusion import data as pdata

    x, y = case.test[0][idx], case.test[1][idx]
    z = predict_logits(model, pdata.make_loader(x, y, 500))[0].double()
    acc = float((z.argmax(-1) == y).double().mean())
    return acc, float(((z - ens) ** 2).mean())


def _label(method: str, opts: dict[str, Any]) -> str:
    return method + " " + " ".join(f"{k}={v}" for k, v in opts.items())


def run_case(
    name: str,
    alphas: tuple[float, ...],
    sizes: tuple[int, ...],
    restarts: int,
    test_samples: int | None = None,
    size_methods: tuple[str, ...] = ("partial", "partial_fit"),
    methods: tuple[str, ...] = ("partial", "partial_fit", "cluster"),
) -> list[dict[str, Any]]:
    case = zoo.get_case(name, train_missing=False)
    idx = _test_subset(case, test_samples)
    y = case.test[1][idx]
    z = case.outputs("test").double()[:, idx]
    ens = z.mean(0)
    rec_base = {"case": name, "ensemble": float((ens.argmax(-1) == y).double().mean()), "test_samples": len(idx),
                "best_member": max(float((zk.argmax(-1) == y).double().mean()) for zk in z)}  # fmt: skip
    n_opt = min(CALIB_DEFAULT, case.calib[0].shape[0])
    jobs: list[tuple[str, dict[str, Any], int, str]] = [(m, o, n_opt, "options") for m, o in VARIANTS if m in methods]
    for n in sizes:
        if n <= case.calib[0].shape[0]:
            jobs += [(m, {}, n, "calibration size") for m in size_methods]
    out = []
    for method, opts, n, axis in jobs:
        data = _calib(case, n)
        for alpha in alphas:
            extra: dict[str, Any] = {"n_restarts": restarts} if method == "cluster" else {}
            rec = {**rec_base, "axis": axis, "method": method, "variant": _label(method, opts), "n_calib": n,
                   "alpha": alpha, **{k: opts.get(k) for k in ("features", "cost", "point")}}  # fmt: skip
            t0 = time.perf_counter()
            try:
                try:
                    fused = pyfusion.fuse(case.members, data, method=method, alpha=alpha, **opts, **extra)
                    z_try = fused(case.test[0][:2])
                    del z_try
                except Exception:  # a model reading a swapped layer's .weight (HF ViT): the dense modules
                    fused = pyfusion.fuse(case.members, data, method=method, alpha=alpha, fast_modules=False, **opts,
                                          **extra)  # fmt: skip
                    rec["note"] = "fast_modules=False"
                rec["fuse_s"] = time.perf_counter() - t0
                rec["acc"], rec["dist"] = _measure(fused, case, ens, idx)
                rec["flops_fraction"] = pyfusion.cost(fused, case.example).flops / (
                    sum(pyfusion.cost(m, case.example).flops for m in case.members)
                )
                rec["error"] = None
            except Exception as exc:  # a variant that cannot run on this family is reported, not fatal
                rec.update(fuse_s=time.perf_counter() - t0, acc=None, dist=None, flops_fraction=None,
                           error=f"{type(exc).__name__}: {str(exc)[:160]}")  # fmt: skip
            print(f"{name} {rec['variant']} n={n} alpha={alpha}: acc={rec['acc']} dist={rec['dist']}", flush=True)
            out.append(rec)
    return out


def _wins(records: list[dict[str, Any]], method: str, key: str, values: tuple[Any, ...], fixed: dict[str, Any],
          axis: str = "options") -> dict[str, Any]:  # fmt: skip
    """Per (case, alpha) cell, which value of ``key`` has the higher accuracy / lower distance (others fixed)."""
    cells: dict[tuple, dict[Any, dict]] = defaultdict(dict)
    for r in records:
        if r["method"] != method or r["axis"] != axis or r["acc"] is None:
            continue
        if any(r.get(k) != v for k, v in fixed.items()):
            continue
        if r.get(key) in values:
            cells[(r["case"], r["alpha"])][r.get(key)] = r
    acc_wins = dict.fromkeys(values, 0)
    dist_wins = dict.fromkeys(values, 0)
    ties = 0
    mean_acc: dict[Any, list[float]] = defaultdict(list)
    n = 0
    for cell in cells.values():
        if len(cell) != len(values):
            continue
        n += 1
        accs = {v: cell[v]["acc"] for v in values}
        top = max(accs.values())
        best = [v for v in values if accs[v] == top]
        if len(best) > 1:
            ties += 1
        else:
            acc_wins[best[0]] += 1
        dist_wins[min(values, key=lambda v: cell[v]["dist"])] += 1
        for v in values:
            mean_acc[v].append(accs[v])
    return {"cells": n, "acc_wins": acc_wins, "ties": ties, "dist_wins": dist_wins,
            "mean_acc": {v: (sum(a) / len(a) if a else None) for v, a in mean_acc.items()}}  # fmt: skip


def _fmt_wins(title: str, w: dict[str, Any]) -> str:
    parts = []
    for v in w["acc_wins"]:
        if w["mean_acc"].get(v) is not None:
            name = "sqdist (default)" if v is None else v
            parts.append(f"{name}: higher test accuracy in {w['acc_wins'][v]}, lower distance in "
                         f"{w['dist_wins'][v]}, mean acc {100 * w['mean_acc'][v]:.2f}%")  # fmt: skip
    return f"- **{title}** ({w['cells']} (case, alpha) cells, {w['ties']} accuracy ties): " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------------------------
# the budget search's selection: objective and calibration size (trivial candidates, from cached member outputs)
# ---------------------------------------------------------------------------------------------------------------

SELECTION_CASES = [
    "digits/mlp/iid/K4",
    "digits/mlp/iid/K8",
    "digits/mlp/dirichlet0.5/K4",
    "digits/mlp/dirichlet0.5/K8",
    "digits/vgg_bn/iid/K8",
    "mnist/mlp/iid/K2",
    "mnist/mlp/iid/K8",
    "mnist/mlp/dirichlet0.5/K4",
    "mnist/vgg_bn/iid/K2",
    "mnist/resnet/iid/K2",
    "fmnist/mlp/dirichlet0.5/K2",
]
SELECTION_SIZES = (100, 300, 600, 1000, 2500, 5000)
SELECTION_BUDGETS = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


def _subset_outputs(z: torch.Tensor) -> list[tuple[tuple[int, ...], str, torch.Tensor]]:
    """Every non-empty member subset's output, as the search combines them: (subset, combine, (N, C) logits or
    log mean probabilities)."""
    import itertools

    k = z.shape[0]
    out = []
    for m in range(1, k + 1):
        for sub in itertools.combinations(range(k), m):
            zs = z[list(sub)]
            out.append((sub, "logits", zs.mean(0)))
            if m > 1:
                out.append((sub, "probs", torch.logsumexp(torch.log_softmax(zs, -1), 0) - math.log(m)))
    return out


def selection_study(cases: list[str], sizes: tuple[int, ...], draws: int) -> list[dict[str, Any]]:
    """For each case, budget b, calibration size n and selection rule, the test accuracy of the trivial candidate
    (member / m-subset with m <= b K, logits or probabilities) the rule picks on n random calibration samples
    (mean over ``draws`` draws), against the oracle (the candidate with the best test accuracy)."""
    out = []
    for name in cases:
        case = zoo.get_case(name, train_missing=False)
        zc, yc = case.outputs("calib").double(), case.calib[1]
        zt, yt = case.outputs("test").double(), case.test[1]
        subs_c, subs_t = _subset_outputs(zc), _subset_outputs(zt)
        test_acc = torch.tensor([float((o.argmax(-1) == yt).double().mean()) for _, _, o in subs_t])
        size = torch.tensor([len(s) for s, _, _ in subs_c])
        # per-sample losses of every candidate on the calibration slice: (candidates, N)
        ce = torch.stack([torch.nn.functional.cross_entropy(o, yc, reduction="none") for _, _, o in subs_c])
        err = torch.stack([(o.argmax(-1) != yc).double() for _, _, o in subs_c])
        n_all = yc.shape[0]
        for n in [s for s in sizes if s <= n_all] + ([n_all] if n_all not in sizes else []):
            picks: dict[tuple[float, str], list[float]] = defaultdict(list)
            for d in range(draws if n < n_all else 1):
                idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(d))[:n]
                c_ce, c_err = ce[:, idx].mean(1), err[:, idx].mean(1)
                for b in SELECTION_BUDGETS:
                    fits = size <= b * case.k + 1e-9
                    if not bool(fits.any()):
                        continue
                    big = torch.tensor(float("inf"), dtype=torch.float64)
                    i_ce = int(torch.where(fits, c_ce, big).argmin())
                    # error, ties broken by cross-entropy (lexicographic through a scaled sum: err is a multiple of 1/n)
                    key = torch.where(fits, c_err + c_ce * (0.5 / n) / (c_ce.max() + 1e-12), big)
                    i_err = int(key.argmin())
                    picks[(b, "cross_entropy")].append(float(test_acc[i_ce]))
                    picks[(b, "error")].append(float(test_acc[i_err]))
            for (b, rule), accs in picks.items():
                fits = size <= b * case.k + 1e-9
                oracle = float(test_acc[fits].max())
                out.append({"case": name, "budget": b, "n_calib": n, "rule": rule, "draws": len(accs),
                            "mean_acc": sum(accs) / len(accs), "oracle_acc": oracle,
                            "at_oracle": sum(a >= oracle for a in accs) / len(accs)})  # fmt: skip
        print(f"selection {name}: done", flush=True)
    return out


def selection_report(records: list[dict[str, Any]], draws: int, quick: bool, out: str | None) -> None:
    report = Report("Budget search selection: objective and calibration size (trivial candidates)", quick=quick)
    report.text(
        "For each case and budget, every trivial candidate of the budget search that fits (each member, every "
        "m-subset with m <= b K, logits or probability average) is scored on n random samples of the zoo's "
        f"calibration slice ({draws} seeded draws; all of it once), and the candidate with the lowest "
        "cross-entropy, or the lowest top-1 error (cross-entropy breaking ties), is taken; `mean acc` is its test "
        "accuracy averaged over the draws, `oracle` the best test accuracy of any fitting candidate, `at oracle` "
        "the fraction of draws that picked a candidate as accurate as the oracle. Fused candidates are not part "
        "of this study (their objective is measured on the held-out half only)."
    )
    sizes = sorted({r["n_calib"] for r in records})
    lines = []
    for dataset in dict.fromkeys(r["case"].split("/")[0] for r in records):
        for rule in ("cross_entropy", "error"):
            parts = []
            for n in sizes:
                rs = [r for r in records if r["rule"] == rule and r["n_calib"] == n and r["case"].startswith(dataset)]
                if rs:
                    gap = sum(r["oracle_acc"] - r["mean_acc"] for r in rs) / len(rs)
                    at = sum(r["at_oracle"] for r in rs) / len(rs)
                    parts.append(f"n={n}: {100 * gap:.3f} points below the oracle, at it in {100 * at:.0f}%")
            n_pts = len({(r["case"], r["budget"]) for r in records if r["case"].startswith(dataset)})
            lines.append(
                f"- **{dataset}, {rule}** (mean over {n_pts} (case, budget) points): " + "; ".join(parts) + "."
            )
    wins = defaultdict(lambda: [0, 0, 0])
    for r in records:
        if r["rule"] != "cross_entropy":
            continue
        o = next(q for q in records if q["rule"] == "error" and q["case"] == r["case"] and q["budget"] == r["budget"]
                 and q["n_calib"] == r["n_calib"])  # fmt: skip
        w = wins[r["n_calib"]]
        w[0 if r["mean_acc"] > o["mean_acc"] + 1e-12 else 1 if o["mean_acc"] > r["mean_acc"] + 1e-12 else 2] += 1
    lines.append("- **cross-entropy vs error, per calibration size** (points where one has the higher mean test "
                 "accuracy / ties): " + "; ".join(f"n={n}: CE {w[0]}, error {w[1]}, ties {w[2]}"
                                                  for n, w in sorted(wins.items())) + ".")  # fmt: skip
    report.text("**Summary.**", "\n".join(lines))
    rows = [[r["case"], r["budget"], r["n_calib"], r["rule"], r["draws"], f"{100 * r['mean_acc']:.2f}",
             f"{100 * r['oracle_acc']:.2f}", f"{100 * r['at_oracle']:.0f}%"] for r in records]  # fmt: skip
    report.table("selection", ["case", "b", "n_calib", "rule", "draws", "mean acc %", "oracle %", "at oracle"], rows)
    report.write(output_path(out, "defaults_selection.md", quick))


MARGIN_CASES = ["fmnist/mlp/dirichlet0.5/K2", "mnist/mlp/iid/K2", "mnist/mlp/dirichlet0.5/K4"]
MARGIN_SIZES = (200, 500, 2000)
MARGIN_THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
MARGIN_BUDGETS = (0.5, 0.625, 0.75, 1.0)
MARGIN_VALIDATION = 2500


def margin_study(cases: list[str], sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The fused margin on validation data (never the test set): for each case and calibration size n, the search
    runs on n samples of the zoo's calibration slice (seeded permutation) with the margin test reporting its z but
    not deciding (``fused_margin=1e-12``); for each budget, the best trivial candidate and the best fused one (the
    one the search would return at margin 0) are evaluated on the calibration samples the search never saw (up to
    ``MARGIN_VALIDATION``). A threshold t keeps the fused candidate iff z > t: the record has both validation
    accuracies and z, so every t is evaluated from one search."""
    out = []
    for name in cases:
        case = zoo.get_case(name, train_missing=False)
        x, y = case.calib
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        for n in sizes:
            if n + 200 > x.shape[0]:
                continue
            idx, val = perm[:n], perm[n : n + MARGIN_VALIDATION]
            data = [(x[idx[s : s + 250]], y[idx[s : s + 250]]) for s in range(0, n, 250)]
            t0 = time.perf_counter()
            search = pyfusion.fuse.budget_search(case.members, data, cluster_restarts=5, fused_margin=1e-12)
            trivial_fams = [f for f in ("members", "subsets", "class_counts") if f in search.families]

            def val_acc(model: torch.nn.Module, xv: torch.Tensor = x[val], yv: torch.Tensor = y[val]) -> float:
                model.eval()
                with torch.no_grad():
                    z = torch.cat([model(xv[s : s + 500]) for s in range(0, xv.shape[0], 500)])
                return float((z.argmax(-1) == yv).double().mean())

            for b in MARGIN_BUDGETS:
                chosen = search.choose(b)
                info = chosen.fusion_info["budget"]
                triv = search.choose(b, families=trivial_fams)
                t_acc = val_acc(triv)
                fused = info["chosen_family"] not in trivial_fams
                m = info["margin_test"]
                out.append({"case": name, "n_calib": n, "budget": b, "trivial": triv.fusion_info["budget"]["chosen"],
                            "trivial_val": t_acc, "fused": info["chosen"] if fused else None,
                            "fused_val": val_acc(chosen) if fused else None,
                            "z": m["z"] if fused and m is not None else None,
                            "samples": None if m is None else m["samples"],
                            "val_samples": int(val.numel())})  # fmt: skip
            print(f"margin {name} n={n}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def margin_report(records: list[dict[str, Any]], quick: bool, out: str | None) -> None:
    report = Report("Budget search: the fused margin against the calibration size (validation data)", quick=quick)
    report.text(
        "For each case, calibration size n and budget b, the search (library defaults, fused candidates "
        "cross-fitted) runs on n samples of the zoo's calibration slice; the best trivial candidate and the best "
        "fused one are evaluated on calibration samples the search never saw (validation, not the test set). A "
        "margin t keeps the fused candidate iff its paired z (on every calibration sample) exceeds t. `gain` is "
        "the validation accuracy of the rule minus that of always keeping the trivial candidate, summed over the "
        "(case, budget) points, in points; `wrong` counts the points where the rule took a fused candidate that "
        "was less accurate on validation than the trivial one."
    )
    sizes = sorted({r["n_calib"] for r in records})
    rows = []
    for n in sizes:
        rs = [r for r in records if r["n_calib"] == n]
        for t in MARGIN_THRESHOLDS:
            take = [r for r in rs if r["z"] is not None and r["z"] > t]
            gain = sum(r["fused_val"] - r["trivial_val"] for r in take)
            wrong = sum(1 for r in take if r["fused_val"] < r["trivial_val"])
            rows.append([n, t, len(rs), len(take), f"{100 * gain:+.2f}", wrong])
    report.table("margin", ["n_calib", "margin t", "points", "fused taken", "gain (points, summed)", "wrong"], rows)
    detail = [[r["case"], r["n_calib"], r["budget"], r["trivial"], f"{100 * r['trivial_val']:.2f}", r["fused"] or "-",
               "-" if r["fused_val"] is None else f"{100 * r['fused_val']:.2f}",
               "-" if r["z"] is None else f"{r['z']:.2f}"] for r in records]  # fmt: skip
    report.table("points", ["case", "n", "b", "best trivial", "val %", "best fused", "val %", "z"], detail)
    report.write(output_path(out, "defaults_margin.md", quick))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one digits case (a smoke run; writes to a temp folder)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: the subset above)")
    ap.add_argument("--cluster-restarts", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--test-samples", type=int, default=None, help="evaluate on a seeded subset of the test set")
    ap.add_argument("--methods", default="partial,partial_fit,cluster", help="methods of the option axes")
    ap.add_argument("--size-methods", default="partial,partial_fit", help="methods of the calibration-size axis")
    ap.add_argument("--json", default=None, help="write the raw records here after every case")
    ap.add_argument("--load", default=None, help="comma-separated --json files to assemble (no runs)")
    ap.add_argument("--selection", action="store_true", help="the search's selection study instead (its own report)")
    ap.add_argument("--draws", type=int, default=20, help="calibration draws of the selection study")
    ap.add_argument("--margin", action="store_true", help="the fused-margin study on validation data (own report)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.margin:
        cases = (
            args.cases.split(",") if args.cases else (["digits/mlp/dirichlet0.5/K4"] if args.quick else MARGIN_CASES)
        )
        recs = margin_study(cases, (100,) if args.quick else MARGIN_SIZES)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(recs, f)
            os.replace(args.json + ".tmp", args.json)
        margin_report(recs, args.quick, args.out)
        return 0
    if args.selection:
        sel_cases = args.cases.split(",") if args.cases else (["digits/mlp/iid/K4"] if args.quick else SELECTION_CASES)
        sel = selection_study(sel_cases, (100, 150) if args.quick else SELECTION_SIZES, 3 if args.quick else args.draws)
        selection_report(sel, args.draws, args.quick, args.out)
        return 0
    cases = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
    sizes = (64, 128) if args.quick else CALIB_SIZES
    t_all = time.perf_counter()
    records: list[dict[str, Any]] = []
    if args.load:
        for path in args.load.split(","):
            with open(path) as f:
                records += json.load(f)
        cases = list(dict.fromkeys(r["case"] for r in records))
    for name in [] if args.load else cases:
        t0 = time.perf_counter()
        records += run_case(name, ALPHAS, sizes, args.cluster_restarts, args.test_samples,
                            tuple(args.size_methods.split(",")), tuple(args.methods.split(",")))  # fmt: skip
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(records, f)
            os.replace(args.json + ".tmp", args.json)
    total = time.perf_counter() - t_all if not args.load else sum(r["fuse_s"] for r in records)
    report = Report("Defaults chosen by measurement: features, point, cost, calibration size", quick=args.quick)
    report.text(
        f"{len(cases)} cases ({', '.join(cases)}), alpha in {list(ALPHAS)}. One option varied at a time around the "
        f"defaults; option axes with {CALIB_DEFAULT} calibration samples (a seeded subset of the zoo's "
        "class-balanced calibration slice; inputs only), test accuracy on the test set, `dist` = mean squared "
        "distance of the logits to the logit ensemble on the test set. Cluster: width matched to partial fusion's "
        f"slot count at alpha, {args.cluster_restarts} k-means restarts. {args.threads} thread(s); total "
        f"{total / 60:.1f} min (times are not the point of this table: the machine was shared).",
    )
    if args.note:
        report.text(args.note)
    summary = [
        ("partial: point (activations, sqdist)", _wins(records, "partial", "point", ("post", "pre"),
                                                        {"features": "activations", "cost": "sqdist"})),
        ("partial: features (sqdist; activations at point=post)", _wins(
            [r for r in records if r.get("point") in (None, "post")], "partial", "features",
            ("activations", "weights"), {"cost": "sqdist"})),
        ("partial: cost (activations, post)", _wins(records, "partial", "cost", ("sqdist", "correlation"),
                                                    {"features": "activations", "point": "post"})),
        ("partial: cost (weights)", _wins(records, "partial", "cost", ("sqdist", "correlation"),
                                          {"features": "weights"})),
        ("partial_fit: point (sqdist)", _wins(records, "partial_fit", "point", ("post", "pre"), {"cost": None})),
        ("partial_fit: cost (post)", _wins([r for r in records if r["method"] == "partial_fit"], "partial_fit",
                                           "cost", (None, "correlation"), {"point": "post"})),
        ("cluster: point", _wins(records, "cluster", "point", ("post", "pre"), {})),
    ]  # fmt: skip
    sizes_run = sorted({r["n_calib"] for r in records if r["axis"] == "calibration size"})
    for method in ("partial", "partial_fit"):
        summary.append((f"{method}: calibration size", _wins(records, method, "n_calib", tuple(sizes_run), {},
                                                             axis="calibration size")))  # fmt: skip
    report.text("**Summary** (per axis: cells where each value wins; accuracy ties are not counted as wins):",
                "\n".join(_fmt_wins(t, w) for t, w in summary))  # fmt: skip
    cols = ["case", "axis", "variant", "n_calib", "alpha", "acc %", "dist", "flops frac", "fuse s", "error"]
    rows = []
    for r in records:
        rows.append([r["case"], r["axis"], r["variant"], r["n_calib"], r["alpha"],
                     "-" if r["acc"] is None else f"{100 * r['acc']:.2f}",
                     "-" if r["dist"] is None else f"{r['dist']:.4g}",
                     "-" if r["flops_fraction"] is None else f"{r['flops_fraction']:.3f}",
                     f"{r['fuse_s']:.1f}", r["error"] or ""])  # fmt: skip
    ref = [[name, f"{100 * r['ensemble']:.2f}", f"{100 * r['best_member']:.2f}"]
           for name, r in {r["case"]: r for r in records}.items()]  # fmt: skip
    report.table("references", ["case", "ensemble acc %", "best member acc %"], ref)
    report.table("defaults", cols, rows)
    report.write(output_path(args.out, "defaults.md", args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
