"""Fusion of independently trained transformers (issue 12, "Tests and evidence"): ViTs on MNIST, GPT-2 / Llama
(grouped-query attention) language models on a local text, all members from the zoo (bench/zoo.py).

For each case: every member, the best member, the ensembles, vanilla weight averaging (the zoo's trivial baselines),
then pyfusion's methods on the same members: ``average``, ``weight_matching``, ``activation_matching`` and ``ot``
(with and without REPAIR), ``partial`` at alpha 0, 0.25, 0.5, 0.75 and 1 (with and without REPAIR) and ``cluster``
at two widths. Metric: test accuracy (ViT) or test perplexity per character (LMs). Cost per sample (an image, or a
window of 128 characters), relative to the ensemble, two ways:

* ``FLOPs/ens (all)``: every matmul, linear and convolution of the forward pass (``zoo.count_flops``, torch's
  ``FlopCounterMode``: attention's QK^T / AV and GPT-2's ``Conv1D`` included) of the fused network built with dense
  layers, minus the zero blocks that ``fast_modules`` skips (``pyfusion.cost``'s dense minus effective FLOPs);
* ``FLOPs/ens (pyfusion.cost)``: ``pyfusion.cost(fused, x).flops``, which counts ``nn.Linear`` / ``nn.Conv*`` and the
  partial layers only (no attention matmuls, no GPT-2 ``Conv1D``: see the notes in the report).

Fusion time: the method, the build and REPAIR (``fuse`` with a graph traced once per case; the trace time is given
separately) plus the swap to the block-sparse modules, on ``--threads`` threads.

Writes bench/results/transformers.md (+ CSV). ``--quick``: the zoo's tiny variants, a few methods, into a temporary
folder (a smoke run, the numbers are not results).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, output_path  # noqa: E402
from zoo import baselines, count_flops, get_case, metric_value  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion import data as pdata  # noqa: E402
from pyfusion.fuse.fast import swap_partial_modules  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.train import predict_logits  # noqa: E402

CASES = ("mnist/vit/iid/K2", "text/gpt2/K2", "text/llama_gqa/K2")
QUICK_CASES = ("digits/vit/iid/K2/tiny", "text/gpt2/K2/tiny")  # digits: no data files needed
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CLUSTER_WIDTHS = (1.0, 1.5)  # slots per group, as a fraction of one member's width
# 20 restarts: within 0.07% of the best inertia of 5000 on synthetic ReLU neurons (ClusterConfig's measurement)
CLUSTER_RESTARTS = 20


@dataclass
class Point:
    """One fusion to run: method, its options, REPAIR on / off, and the label of its table row."""

    method: str
    options: dict[str, Any]
    repair: bool = False

    @property
    def label(self) -> str:
        return self.method + (" + REPAIR" if self.repair else "")

    @property
    def setting(self) -> str:
        if "alpha" in self.options:
            return f"alpha {self.options['alpha']:g}"
        if "width" in self.options:
            return f"width {self.options['width']:g} n"
        return "-"


def points(quick: bool) -> list[Point]:
    """The fusions of one case, in table order."""
    if quick:
        return [
            Point("average", {}),
            Point("activation_matching", {}),
            Point("activation_matching", {}, repair=True),
            Point("partial", {"alpha": 0.0}),
            Point("partial", {"alpha": 1.0}),
            Point("cluster", {"width": 1.0, "n_restarts": 2}),
        ]
    out = [Point("average", {}), Point("weight_matching", {})]
    for method in ("activation_matching", "ot"):
        out += [Point(method, {}), Point(method, {}, repair=True)]
    for repair in (False, True):
        out += [Point("partial", {"alpha": a}, repair=repair) for a in ALPHAS]
    out += [Point("cluster", {"width": w, "n_restarts": CLUSTER_RESTARTS}) for w in CLUSTER_WIDTHS]
    return out


def evaluate(model: torch.nn.Module, case: Any) -> float:
    """Test accuracy (classification) or perplexity (language model) of ``model``."""
    z, _ = predict_logits(model, pdata.make_loader(*case.test, batch_size=250))
    return metric_value(z.double(), case.test[1], case.task)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_case(name: str, args: argparse.Namespace, report: Report) -> dict[str, Any]:
    t0 = time.perf_counter()
    case = get_case(name, threads=1, verbose=True)
    load_s = time.perf_counter() - t0
    notes = []
    for m in case.members:
        # the zoo's GPT-2 config leaves use_cache on: its DynamicCache output cannot be exported (see the notes)
        if getattr(getattr(m, "config", None), "use_cache", False):
            m.config.use_cache = False
            notes.append("use_cache set to False on the members (a DynamicCache output cannot be exported)")
        m.eval()
    calib = case.calib_inputs(args.calib, batch_size=args.batch)
    n_calib = sum(int(b.shape[0]) for b in calib)
    x1 = case.example
    k = case.k

    base = baselines(case, combines=("logits",))
    ens_all = sum(count_flops(m, x1) for m in case.members)
    ens_cost = sum(pyfusion.cost(m, x1).flops for m in case.members)
    member_cost = pyfusion.cost(case.members[0], x1)
    rows: list[list[Any]] = []
    for b in base:
        if b.method.startswith("mean member"):
            continue
        rows.append([b.method, "-", b.value, b.flops / ens_all, b.m * member_cost.flops / ens_cost,
                     b.params, None, ""])  # fmt: skip

    t0 = time.perf_counter()
    graph = trace_groups(case.members[0], calib[0])
    trace_s = time.perf_counter() - t0
    failures = []
    for p in points(args.quick):
        print(f"[{name}] {p.label} {p.setting}", flush=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                fused = pyfusion.fuse(
                    case.members, calib, method=p.method, graph=graph, repair=p.repair, fast_modules=False,
                    **p.options,
                )  # fmt: skip
                t_fuse = time.perf_counter() - t0
            fused.eval()
            flops_dense = count_flops(fused, x1)  # every matmul of the network with its zero blocks
            t0 = time.perf_counter()
            swapped = swap_partial_modules(fused, k)
            t_fuse += time.perf_counter() - t0
            c = pyfusion.cost(fused, x1)
            flops_all = flops_dense - (c.dense_flops - c.flops)
            value = evaluate(fused, case)
            note = f"{len(swapped)} layers block-sparse" if swapped else ""
            rep = fused.fusion_info.get("repair")
            if rep is not None:
                note += (
                    ("; " if note else "")
                    + f"REPAIR: {len(rep.get('repaired', []))} groups rescaled, "
                    + (f"{len(rep.get('skipped', {}))} skipped")
                )
            rows.append([p.label, p.setting, value, flops_all / ens_all, c.flops / ens_cost, c.params, t_fuse, note])
        except Exception as exc:  # a failure is a result: it is listed, with its traceback on stderr
            traceback.print_exc()
            failures.append((p.label, p.setting, first_line(exc)))
            rows.append([p.label, p.setting, None, None, None, None, None, "FAILED: " + first_line(exc)])
    return {
        "case": case,
        "rows": rows,
        "failures": failures,
        "notes": sorted(set(notes)),
        "n_calib": n_calib,
        "trace_s": trace_s,
        "load_s": load_s,
    }


def fmt_metric(metric: str):
    if metric == "accuracy":
        return lambda v: f"{100 * v:.2f}"
    return lambda v: f"{v:.3f}" if math.isfinite(v) else str(v)


def describe(case: Any, res: dict[str, Any]) -> list[str]:
    rec = case.records[0]
    d = rec["definition"]
    lines = [f"## {case.name}", ""]
    cfg = d["arch_config"]
    arch = {k: v for k, v in cfg.items() if k not in ("attn_implementation", "bos_token_id", "eos_token_id",
                                                      "pad_token_id")}  # fmt: skip
    lines.append(f"- members: {d['arch']} {arch}; training {d['train']} on {d['threads']} thread(s), "
                 f"{', '.join(str(round(r['train_time_s'])) + ' s' for r in case.records)} (zoo cache)")  # fmt: skip
    info = case.data_info
    if case.task == "lm":
        lines.append(
            f"- text: {info['source']} ({len(info['files'])} files: {', '.join(info['files'])}), "
            f"{info['n_chars']:,} characters, character-level vocabulary of {info['vocab_size']}; windows of "
            f"{info['context']} characters; train / calibration / test: {info['chars']['train']:,} / "
            f"{info['chars']['calib']:,} / {info['chars']['test']:,} characters "
            f"({info['windows']['train']} / {info['windows']['calib']} / {info['windows']['test']} windows)"
        )
        lines.append("- metric: test perplexity per character (exp of the mean cross-entropy; lower is better)")
    else:
        lines.append(
            f"- data: {info['source']}, {info['n_pool']:,} training images per member (IID, different seeds), "
            f"test {info['n_test']:,}; metric: test accuracy %"
        )
    lines.append(
        f"- calibration: {res['n_calib']} held-out {'windows' if case.task == 'lm' else 'images'} (never the test "
        f"set); graph traced once in {res['trace_s']:.1f} s"
    )
    for n in res["notes"]:
        lines.append(f"- note: {n}")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated zoo cases (default {','.join(CASES)})")
    ap.add_argument("--quick", action="store_true", help="tiny zoo variants, few methods, temporary output")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: images 2000, LMs all)")
    ap.add_argument("--batch", type=int, default=None, help="calibration batch size (default: images 250, LMs 23)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="Markdown output (default bench/results/transformers.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else CASES)
    report = Report("Fusing independently trained transformers (ViT, GPT-2, Llama-GQA)", quick=args.quick)
    report.text(
        f"{args.threads} torch thread(s); the machine is shared (the load average below is the other jobs): fusion "
        "times are indicative, accuracies / perplexities and FLOPs are not affected. Members: bench/zoo.py, "
        "trained independently (IID, different seeds, different initializations). Methods run through "
        "`pyfusion.fuse(members, calib, method=..., graph=graph, repair=..., fast_modules=False)`, then "
        "`swap_partial_modules` (as `fast_modules=True` does), so that the dense network's FLOPs can be counted "
        "too. `FLOPs/ens (all)`: every matmul (attention included) minus the skipped zero blocks, relative to the "
        "ensemble; `FLOPs/ens (pyfusion.cost)`: what `pyfusion.cost` reports (Linear / Conv / Conv1D / partial "
        "layers and attention's QK^T / AV products; the two columns agree since the execution merge, and no fused "
        "point exceeds the ensemble: `fuse` caps it). `notes` counts the layers `swap_partial_modules` made "
        "block-sparse (the others run dense, zero blocks included) and the groups REPAIR rescaled / skipped."
    )
    all_failures = []
    for name in names:
        cal = args.calib if args.calib is not None else (None if name.startswith("text/") else 2000)
        bs = args.batch if args.batch is not None else (23 if name.startswith("text/") else 250)
        res = run_case(name, argparse.Namespace(**{**vars(args), "calib": cal, "batch": bs}), report)
        case = res["case"]
        metric = "accuracy %" if case.metric == "accuracy" else "perplexity"
        report.text(*describe(case, res))
        report.table(
            case.name.replace("/", "_"),
            [
                "method",
                "setting",
                metric,
                "FLOPs/ens (all)",
                "FLOPs/ens (pyfusion.cost)",
                "eff. params",
                "fusion s",
                "notes",
            ],  # fmt: skip
            res["rows"],
            formats={
                metric: fmt_metric(case.metric),
                "FLOPs/ens (all)": ".3f",
                "FLOPs/ens (pyfusion.cost)": ".3f",
                "eff. params": ",d",
                "fusion s": ".1f",
            },  # fmt: skip
        )
        all_failures += [(case.name, *f) for f in res["failures"]]
    if all_failures:
        report.table("failures", ["case", "method", "setting", "error"], all_failures)
    else:
        report.text("Every method ran on every case.")
    report.write(output_path(args.out, "transformers.md", args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
