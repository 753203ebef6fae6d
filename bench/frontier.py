"""The accuracy / compute frontier: ``pyfusion.fuse(members, data, budget=b)`` against the trivial baselines.

For every case of the gauntlet (ensembles of the zoo, :mod:`zoo`) and every budget b in {0.25, 0.375, 0.5, 0.625,
0.75, 1} x the ensemble's FLOPs per sample (as ``pyfusion.cost`` counts them):

* **budgeted**: what ``pyfusion.fuse(members, calib, budget=b)`` returns (one search per case shared by the budgets,
  :func:`pyfusion.fuse.budget_search`; it may itself be a trivial baseline when nothing fused beats it);
* **best fused**: the same search restricted to fused candidates (partial / partial_fit / cluster / cluster_fit /
  prune / full fusion / groups of fused members);
* **class-weighted**: the same search restricted to the class-weighted sub-ensembles
  (:class:`pyfusion.nn.SubEnsemble` with per-class member weights fitted on the calibration data,
  ``candidates=["class_subsets"]``; the library builds them, so they are pyfusion candidates, not baselines);
* **best baseline**: the best trivial baseline with FLOPs <= b x the ensemble's (:func:`zoo.best_within` over
  :func:`zoo.baselines`: best member, best m-of-K sub-ensembles of logits or probabilities and means over
  subsets, the ensembles, vanilla averaging; selections on the calibration set);
* **gain kept**: (acc - best member's acc) / (ensemble's acc - best member's acc), with the oracle best member
  on the test set and the logit ensemble (meaningless when the ensemble gains less than ~0.2 points).

The search sees ``--calib`` calibration samples (default 2000, a measured choice: see ``main``), a seeded random
subset of the zoo's class-balanced calibration slice, with labels (the objective is the library default, the
top-1 error with cross-entropy breaking ties), never the test set. Accuracies are on the test
set. Run: ``python bench/frontier.py [--quick] [--cases PATTERN] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import zoo  # noqa: E402
from common import Machine, Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.train import predict_logits  # noqa: E402

BUDGETS = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
FUSED = ("activation_matching", "ot", "weight_matching", "average", "partial", "partial_fit", "cluster", "cluster_fit",
         "prune", "groups")  # fmt: skip
# < 25 min on one thread of the shared 2-core VM: digits and MNIST MLPs at K = 2, 4, 8 (IID and Dirichlet 0.5),
# VGG+BN at K = 2 / 8 on digits and K = 2 on MNIST, a ResNet-8 and a small ViT pair on MNIST, Fashion-MNIST MLP and
# VGG, and one shared-initialization pair
DEFAULT_CASES = [
    "digits/mlp/iid/K2",
    "digits/mlp/iid/K4",
    "digits/mlp/iid/K8",
    "digits/mlp/dirichlet0.5/K4",
    "digits/mlp/dirichlet0.5/K8",
    "digits/mlp/iid/K2/shared_init",
    "digits/vgg_bn/iid/K8",
    "mnist/mlp/iid/K2",
    "mnist/mlp/iid/K8",
    "mnist/mlp/dirichlet0.5/K4",
    "mnist/vgg_bn/iid/K2",
    "mnist/resnet/iid/K2",
    "mnist/vit/iid/K2",
    "fmnist/mlp/dirichlet0.5/K2",
]
QUICK_CASES = ["digits/mlp/iid/K2", "digits/mlp/iid/K4"]


def _accuracy(model: torch.nn.Module, case: zoo.Case) -> float:
    z = predict_logits(model, case.loader("test"))[0]
    return float((z.argmax(-1) == case.test[1]).double().mean())


def _calibration(case: zoo.Case, n: int, batch: int = 250, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = case.calib
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return [(x[idx[s : s + batch]], y[idx[s : s + batch]]) for s in range(0, idx.numel(), batch)]


def _selectable(rows: list[zoo.BaselineRow]) -> list[zoo.BaselineRow]:
    """The baselines that are one model a user selects: without the means over random members / subsets
    (expectations) and the class-share-weighted ensemble (it needs each member's training class counts)."""
    return [r for r in rows if " mean" not in r.method and not r.method.startswith("mean") and "class" not in r.method]


def _add_selectable(records: list[dict[str, Any]]) -> None:
    """Fill ``sel_*`` (the best selectable baseline within each budget) where missing (records of older runs)."""
    flop = lambda m, x: pyfusion.cost(m, x).flops  # noqa: E731
    for name in dict.fromkeys(r["case"] for r in records if "sel_acc" not in r):
        rows = zoo.baselines(zoo.get_case(name), flop_counter=flop)
        ens_flops = next(r.flops for r in rows if r.method == "ensemble (logits)")
        for rec in (r for r in records if r["case"] == name):
            sel = zoo.best_within(_selectable(rows), rec["budget"] * ens_flops)
            rec.update(sel=None if sel is None else sel.method, sel_acc=None if sel is None else sel.value)


def _calib_selected(rows: list[zoo.BaselineRow], max_flops: float) -> zoo.BaselineRow | None:
    """The selectable baseline within ``max_flops`` that a user would pick without the test set: the best on the
    calibration data (ties: the cheaper, then the first)."""
    fits = [r for r in _selectable(rows) if r.flops <= max_flops and zoo.is_realizable(r) and r.calib_value is not None]
    return max(fits, key=lambda r: (r.calib_value, -r.flops)) if fits else None


def run_case(
    name: str,
    n_calib: int,
    budgets: tuple[float, ...],
    cluster_restarts: int,
    search_options: dict[str, Any] | None = None,
    class_counts: bool = False,
) -> list[dict[str, Any]]:
    case = zoo.get_case(name)
    search_options = dict(search_options or {})
    if class_counts and case.spec.split != "iid":  # the members' training class counts, as the user may supply
        search_options["class_counts"] = torch.as_tensor(case.class_shares())
    flop = lambda m, x: pyfusion.cost(m, x).flops  # noqa: E731
    rows = zoo.baselines(case, flop_counter=flop)
    by = {r.method: r for r in rows}
    ens = by["ensemble (logits)"].value
    best_member = max(r.value for r in rows if r.method.startswith("member "))
    t0 = time.perf_counter()
    search = pyfusion.fuse.budget_search(case.members, _calibration(case, n_calib), cluster_restarts=cluster_restarts,
                                         **search_options)  # fmt: skip
    out = []
    for b in budgets:
        base = zoo.best_within(rows, b * by["ensemble (logits)"].flops)
        csel = _calib_selected(rows, b * by["ensemble (logits)"].flops)
        rec: dict[str, Any] = {"case": name, "budget": b, "ensemble": ens, "best_member": best_member}
        try:
            chosen = search.choose(b)
            info = chosen.fusion_info["budget"]
            rec.update(chosen=info["chosen"], chosen_fraction=info["chosen_fraction"], acc=_accuracy(chosen, case))
            rec["compared_on"] = info.get("compared_on")
            tc = info.get("trivial_choice") or {}
            rec.update(trivial_argmin=tc.get("argmin"), trivial_prior=tc.get("chosen"))
        except pyfusion.fuse.BudgetError as exc:
            rec.update(chosen=f"none ({exc})", chosen_fraction=None, acc=None)
        try:
            fused = search.choose(b, families=[f for f in FUSED if f in search.families])
            finfo = fused.fusion_info["budget"]
            rec.update(fused=finfo["chosen"], fused_fraction=finfo["chosen_fraction"], fused_acc=_accuracy(fused, case))
        except pyfusion.fuse.BudgetError:
            rec.update(fused="none fits", fused_fraction=None, fused_acc=None)
        rec.update(cw=None, cw_acc=None)
        if "class_subsets" in search.families:
            try:
                cw = search.choose(b, families=["class_subsets"])
                rec.update(cw=cw.fusion_info["budget"]["chosen"], cw_acc=_accuracy(cw, case))
            except pyfusion.fuse.BudgetError:
                pass
        rec.update(
            baseline=None if base is None else base.method,
            baseline_fraction=None if base is None else base.flops_ratio,
            baseline_acc=None if base is None else base.value,
            csel=None if csel is None else csel.method,
            csel_acc=None if csel is None else csel.value,
        )
        gain = ens - best_member
        rec["gain_kept"] = None if rec["acc"] is None or gain <= 0 else (rec["acc"] - best_member) / gain
        out.append(rec)
    for rec in out:
        rec["search_fusions"] = search.fusions
        rec["search_time_s"] = time.perf_counter() - t0
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _frac(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two digits cases (a smoke run; writes to a temp folder)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: the gauntlet)")
    # 2000: choosing among the trivial candidates by the top-1 error on n MNIST calibration samples, the pick was
    # 0.096 / 0.081 / 0.060 / 0.050 / 0.058 points below the best candidate's test accuracy at n = 300 / 600 /
    # 1000 / 2500 / 5000 (bench/results/defaults_selection.md): 2000 samples give the trivial candidates (scored on
    # all) ~2000 and the fused ones (held-out half) 1000; beyond, fusions cost more for no measured gain
    ap.add_argument(
        "--calib", type=int, default=2000, help="calibration samples given to the search (default 2000; digits has 200)"
    )
    ap.add_argument("--cluster-restarts", type=int, default=5, help="k-means restarts of the cluster candidates")
    ap.add_argument("--objective", default="auto", help="the search's objective (auto: the library default)")
    ap.add_argument(
        "--trivial-samples",
        default="all",
        choices=("all", "holdout"),
        help="samples the trivial candidates are scored on (the library default: all)",
    )
    ap.add_argument(
        "--class-counts",
        action="store_true",
        help="give the search the members' training class shares (class_counts=; non-IID cases): the class-share "
        "sub-ensembles become library candidates (off by default: the class-share baseline uses data the search "
        "is not given)",
    )
    ap.add_argument("--resume", action="store_true", help="keep the cases already in --json")
    ap.add_argument("--note", default=None, help="a sentence added to the report (e.g. the load of a resumed run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="also dump the raw records to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    done: set[str] = set()
    if args.json and args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
        records = [r for r in saved["records"] if r["case"] in cases]
        done = {r["case"] for r in records}
    for name in cases:
        if name in done:
            continue
        t0 = time.perf_counter()
        try:
            opts = {"objective": args.objective, "trivial_samples": args.trivial_samples}
            records += run_case(name, args.calib, BUDGETS, args.cluster_restarts, opts, args.class_counts)
        except Exception as exc:  # one broken case must not lose the others; it is reported in the table
            errors[name] = f"{type(exc).__name__}: {exc}"
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.json:  # after every case, so that an interrupted run can --resume
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"records": records, "errors": errors}, f, indent=1)
            os.replace(tmp, args.json)
    _add_selectable(records)
    total = time.perf_counter() - t_all
    if done:
        total += sum({r["case"]: r["search_time_s"] for r in records if r["case"] in done}.values())
    report = Report("Accuracy / compute frontier: fuse(budget=b) vs the trivial baselines", quick=args.quick)
    report.text(
        f"{len(cases)} cases, budgets {list(BUDGETS)} x the ensemble's FLOPs per sample (pyfusion.cost). "
        f"The search sees {args.calib} labelled calibration samples (half held out for its fused candidates' "
        f"objective, objective={args.objective!r}, trivial candidates scored on {args.trivial_samples!r} of them); "
        "accuracies are on the test sets. `budgeted` is what `pyfusion.fuse(members, data, "
        "budget=b)` returns, `best fused` the same search over fused candidates only, `best baseline` the best "
        "trivial baseline within the budget (zoo.best_within: selections on the calibration set). `gain kept`: "
        "(budgeted - best member) / (ensemble - best member), oracle best member on the test set. "
        + (
            "The search was given the members' training class shares (`--class-counts`: class-share sub-ensembles "
            "are library candidates)."
            if args.class_counts
            else "The search was not given the members' class "
            "counts (the class-share ensemble is a baseline it cannot build; its class-weighted sub-ensembles are "
            "fitted on the calibration data)."
        ),
        f"Measured with {args.threads} thread(s), {args.cluster_restarts} k-means restarts per cluster candidate, "
        f"on {os.cpu_count()} logical cores "
        f"(load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end); total {total / 60:.1f} min "
        "including the searches (times in the last column are per case, all budgets).",
    )
    if args.note:
        report.text(args.note)
    fits = [r for r in records if r["baseline_acc"] is not None]
    beat = sum(1 for r in fits if r["acc"] is not None and r["acc"] >= r["baseline_acc"])
    fused_beat = sum(1 for r in fits if r["fused_acc"] is not None and r["fused_acc"] >= r["baseline_acc"])
    sel_fits = [r for r in records if r["sel_acc"] is not None]
    sel_beat = sum(1 for r in sel_fits if r["acc"] is not None and r["acc"] >= r["sel_acc"])
    below = [r for r in records if r["baseline_acc"] is None]
    below_ok = sum(1 for r in below if r["acc"] is not None)
    at_half = [r for r in records if r["budget"] == 0.5 and r["gain_kept"] is not None]
    kept90 = sum(1 for r in at_half if r["gain_kept"] >= 0.9)
    csel_fits = [r for r in records if r.get("csel_acc") is not None]
    csel_beat = sum(1 for r in csel_fits if r["acc"] is not None and r["acc"] >= r["csel_acc"])
    cw_rows = [r for r in records if r.get("cw_acc") is not None]
    share_rows = [r for r in cw_rows if r["baseline"] and "class shares" in r["baseline"]]
    cw_share = sum(1 for r in share_rows if r["cw_acc"] >= r["baseline_acc"])
    ruled = [r for r in records if r.get("trivial_argmin")]
    moved = sum(1 for r in ruled if r["trivial_prior"] != r["trivial_argmin"])
    report.text(
        f"**Summary.** Where a trivial baseline fits the budget, the budgeted model is at least as accurate as the "
        f"best one in {beat} of {len(fits)} (case, budget) points, and as the best *selectable* one (without the "
        f"means over random members / subsets and the class-share ensemble) in {sel_beat} of {len(sel_fits)} (both "
        "picked by their test accuracy among the zoo's rows: an oracle over m and the combine rule), and as the "
        f"selectable baseline picked on the calibration set in {csel_beat} of {len(csel_fits)}; the "
        f"best fused point alone in {fused_beat} of {len(fits)}. Below one member's cost ({len(below)} points, no "
        f"trivial baseline fits) it returns a clustered / pruned model in {below_ok}. At b = 0.5 it keeps >= 90% "
        f"of the (logit) ensemble's gain over the best member in {kept90} of the {len(at_half)} cases where that "
        "gain is positive. "
        f"The class-weighted sub-ensemble alone (fitted on the calibration data) is at least as accurate as the "
        f"class-share ensemble (which needs the members' training class counts) in {cw_share} of the "
        f"{len(share_rows)} points where that ensemble is the best baseline."
        + (
            f" The trivial candidate was chosen by the prior rule (more members averaged unless a candidate is "
            f"better by more than trivial_margin paired standard errors on the calibration data): it differs from "
            f"the calibration argmin in {moved} of {len(ruled)} points."
            if ruled
            else ""
        )
    )
    table = []
    for r in records:
        d = None if r["acc"] is None or r["baseline_acc"] is None else 100 * (r["acc"] - r["baseline_acc"])
        table.append({
            "case": r["case"], "b": r["budget"], "budgeted": r["chosen"], "frac": _frac(r["chosen_fraction"]),
            "acc %": _pct(r["acc"]), "best fused": r["fused"], "fused frac": _frac(r["fused_fraction"]),
            "fused acc %": _pct(r["fused_acc"]), "class-weighted": r.get("cw") or "-",
            "cw acc %": _pct(r.get("cw_acc")), "best baseline": r["baseline"] or "none fits",
            "base frac": _frac(r["baseline_fraction"]), "base acc %": _pct(r["baseline_acc"]),
            "budgeted - base": "-" if d is None else f"{d:+.2f}",
            "best selectable": r["sel"] or "none fits", "sel acc %": _pct(r["sel_acc"]),
            "calib-picked baseline": r.get("csel") or "none fits", "calib-picked acc %": _pct(r.get("csel_acc")),
            "gain kept": "-" if r["gain_kept"] is None else f"{100 * r['gain_kept']:.0f}%",
            "ens %": _pct(r["ensemble"]), "best member %": _pct(r["best_member"]),
            "fusions": r["search_fusions"], "search s": f"{r['search_time_s']:.0f}",
        })  # fmt: skip
    cols = list(table[0]) if table else ["case"]
    report.table("frontier", cols, [list(r.values()) for r in table])
    if errors:
        report.text("**Cases that failed:** " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    path = output_path(args.out, "frontier.md", args.quick)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(dict.fromkeys(r["case"] for r in records))
        cols_n = 4
        rows_n = max(1, (len(names) + cols_n - 1) // cols_n)
        fig, axes = plt.subplots(rows_n, cols_n, figsize=(4 * cols_n, 3 * rows_n), squeeze=False)
        for ax, name in zip(axes.flat, names):
            rs = [r for r in records if r["case"] == name]
            for key, label, style in (("acc", "budgeted", "o-"), ("fused_acc", "best fused", "s--"),
                                      ("baseline_acc", "best baseline", "^:")):  # fmt: skip
                pts = [(r["budget"], 100 * r[key]) for r in rs if r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=label, ms=4)
            ax.axhline(100 * rs[0]["ensemble"], color="grey", lw=0.8, label="ensemble")
            ax.axhline(100 * rs[0]["best_member"], color="grey", lw=0.8, ls="--", label="best member")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("budget (x ensemble FLOPs)", fontsize=8)
            ax.set_ylabel("test acc. %", fontsize=8)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        png = path.with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=90)
        report.text(f"Plot: `{png.name}` (test accuracy against the budget per case).")
        print(f"wrote {png}")
    except ImportError:
        report.text("matplotlib is not installed: no plot.")
    report.write(path)
    print(f"total {total:.0f} s; machine: {Machine.detect().summary()}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
