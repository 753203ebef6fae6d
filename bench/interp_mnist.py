"""Neuron interpolation (hf, kf, kf_gradient) against the other fusion methods and the trivial baselines, on the zoo.

Members come from the model zoo (``bench/zoo.py``: trained by us, cached, deterministic): an MLP user class
(``MLPNet``), a VGG with BatchNorm, a ResNet-8 (``pyfusion.models.ResNet``) and a Hugging Face ViT, on MNIST /
Fashion-MNIST, IID (every member on the whole pool, different seeds) and non-IID (Dirichlet(0.5) class shares)
splits, K = 2 and 4. Rows: hf / kf / kf_gradient, vanilla average (``method="average"``), weight matching,
activation matching, OT, each member, the best member (chosen on calibration data), the ensemble (logits; on
non-IID splits also the class-share weighted probability ensemble of the paper). Cells: test accuracy (%) and the
fusion time (seconds, one thread, the whole ``pyfusion.fuse`` call: statistics, solves, BatchNorm reset; the graph
is traced once per case beforehand and passed to every method).

Calibration: the first ``--calib`` samples of the zoo's class-balanced calibration slice (held out of training).
kf_gradient: ``--epochs`` per level and ``--last-epochs`` for the head (the authors use 30 / 50; scaled down for
a shared 2-core CPU). Results are cached per (case, method, settings) in ``$PYFUSION_ZOO/bench/interp_mnist.json``
so that an interrupted run resumes.

Usage: ``python bench/interp_mnist.py [--quick] [--cases mnist/mlp/iid/K2,...] [--out bench/results/interp_mnist.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, output_path  # noqa: E402
from zoo import baselines, cache_dir, get_case  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.data import make_loader  # noqa: E402
from pyfusion.graph import trace_groups  # noqa: E402
from pyfusion.train import predict_logits  # noqa: E402

ARCHS = ("mlp", "vgg_bn", "resnet", "vit")
SPLITS = ("iid/K2", "dirichlet0.5/K2", "iid/K4", "dirichlet0.5/K4")
# non-IID K = 4 on the MLP only, ViT at K = 2 only: what fits a shared 2-core CPU (every member here is cached by
# `python bench/zoo.py build --cases ...` in 2-12 minutes per member)
DEFAULT_CASES = [f"mnist/{a}/{s}" for a in ARCHS for s in SPLITS if a == "mlp" or s != "dirichlet0.5/K4"]
DEFAULT_CASES = [c for c in DEFAULT_CASES if not c.startswith("mnist/vit/") or c.endswith("K2")]
FUSIONS = ("hf", "kf", "kf_gradient", "average", "weight_matching", "activation_matching", "ot")
DATASET_NAMES = {"mnist": "MNIST", "fmnist": "Fashion-MNIST", "digits": "digits (8x8)"}
ARCH_NAMES = {
    "mlp": "MLP user class (MLPNet 784-256-256-10, ReLU)",
    "vgg_bn": "VGG + BatchNorm",
    "resnet": "ResNet-8 (pyfusion.models.ResNet)",
    "vit": "ViT (Hugging Face, 3 layers, 4 heads)",
}


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = predict_logits(model, make_loader(x, y, 500))[0]
    return float((logits.argmax(-1) == y).double().mean())


def _options(method: str, args: argparse.Namespace) -> dict:
    if method == "kf_gradient":
        return {"epochs": args.epochs, "last_epochs": args.last_epochs}
    return {}


def run_case(name: str, args: argparse.Namespace, cache: dict, save) -> dict:
    """Baselines and fusions of one case (fusion rows from the cache where present)."""
    case = get_case(name, verbose=True)
    rows = {r.method: r for r in baselines(case, vanilla=False)}
    out: dict[str, tuple[float, float | None]] = {}
    for k in range(case.k):
        out[f"member {k}"] = (rows[f"member {k}"].value, None)
    out["best member (calibration)"] = (rows["best member (calibration)"].value, None)
    out["ensemble (logits)"] = (rows["ensemble (logits)"].value, None)
    if "ensemble (probs x class shares)" in rows:
        out["ensemble (probs x class shares)"] = (rows["ensemble (probs x class shares)"].value, None)
    calib = case.calib_inputs(args.calib, batch_size=250)
    calib_y = case.calib[1][: args.calib]
    data = [(x, calib_y[i * 250 : i * 250 + x.shape[0]]) for i, x in enumerate(calib)]
    xt, yt = case.test
    graph = None
    for method in FUSIONS:
        opts = _options(method, args)
        key = json.dumps([name, method, args.calib, opts, "graph traced once"], sort_keys=True)
        if key not in cache:
            if graph is None:  # traced once per case, outside the timed calls (the first torch.export of a process
                # took 7.5 s on the loaded machine, a later one 0.5-2 s): every method gets the same graph
                t0 = time.perf_counter()
                graph = trace_groups(case.members[0], data[0][0])
                cache[f"trace {name}"] = {"time_s": time.perf_counter() - t0}
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                try:
                    fused = pyfusion.fuse(case.members, data, method=method, graph=graph, **opts)
                    dt = time.perf_counter() - t0
                    cache[key] = {"acc": _accuracy(fused.eval(), xt, yt), "time_s": dt}
                except (ValueError, NotImplementedError) as exc:  # a method that refuses this model: say so
                    cache[key] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            save()
            print(name, method, cache[key], flush=True)
        r = cache[key]
        out[method] = (r["acc"], r["time_s"]) if "acc" in r else (float("nan"), None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny case (a smoke test)")
    ap.add_argument("--cases", default=None, help="comma-separated zoo case names (default: DEFAULT_CASES)")
    ap.add_argument("--calib", type=int, default=1000, help="calibration samples")
    ap.add_argument("--epochs", type=int, default=5, help="kf_gradient epochs per level")
    ap.add_argument("--last-epochs", type=int, default=10, help="kf_gradient epochs of the last level")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="Markdown file (default bench/results/interp_mnist.md; quick: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        cases = ["digits/mlp/iid/K2/tiny"]
        args.calib, args.epochs, args.last_epochs = 100, 1, 1
    else:
        cases = args.cases.split(",") if args.cases else DEFAULT_CASES
    cache_path = os.path.join(cache_dir(), "bench", "interp_mnist.json" if not args.quick else "interp_quick.json")
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}

    def save() -> None:
        tmp = cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_path)

    results = {c: run_case(c, args, cache, save) for c in cases}
    report = Report("Neuron interpolation on the zoo: accuracy and fusion time", quick=args.quick)
    report.text(
        f"torch threads {args.threads}; the machine was shared with other jobs (the load average above is taken when "
        "the table was written, from cached rows): fusion times are upper bounds and vary several-fold with the load.",
        f"Calibration: {args.calib} held-out training images; kf_gradient: {args.epochs} epochs per level, "
        f"{args.last_epochs} for the last (Adam 1e-3, batch 32, patience 5); hf / kf: uniform importance, "
        "ridge 1e-6; every other method with its defaults, BatchNorm recalibrated on the calibration data. "
        "Members: `bench/zoo.py` (see bench/results/zoo.md for their training). Cells: test accuracy in % "
        "(fusion time in s).",
    )
    by_arch: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        ds, arch = c.split("/")[:2]
        by_arch.setdefault((ds, arch), []).append(c)
    for (ds, arch), cs in by_arch.items():
        labels = ["/".join(c.split("/")[2:]) for c in cs]
        methods = list(dict.fromkeys(m for c in cs for m in results[c]))
        body = []
        for m in methods:
            cells = []
            for c in cs:
                v = results[c].get(m)
                if v is None:
                    cells.append("-")
                elif v[0] != v[0]:
                    cells.append("refused")
                else:
                    cells.append(f"{100 * v[0]:.2f}" + (f" ({v[1]:.1f} s)" if v[1] is not None else ""))
            body.append([m, *cells])
        report.text(f"## {DATASET_NAMES.get(ds, ds)}, {ARCH_NAMES.get(arch, arch)}")
        report.table(f"{ds}_{arch}", ["method", *labels], body)
    errors = [(k, v["error"]) for k, v in cache.items() if "error" in v and k[0] == "[" and json.loads(k)[0] in cases]
    if errors:
        report.text("Refusals: " + "; ".join(f"{json.loads(k)[0]} {json.loads(k)[1]}: {e}" for k, e in errors))
    path = output_path(args.out, "interp_mnist.md", args.quick)
    report.text(_plot(by_arch, results, path))
    report.write(path)


# the methods the plot shows (every method is in the tables): the trivial baselines, the classic fusions and
# neuron interpolation
PLOTTED = (("best member (calibration)", "k_", "best member"), ("ensemble (logits)", "k^", "ensemble"),
           ("average", "x", "average"), ("weight_matching", "+", "weight matching"),
           ("activation_matching", "1", "activation matching"), ("ot", "2", "OT"), ("hf", "o", "hf"),
           ("kf", "s", "kf"), ("kf_gradient", "D", "kf_gradient"))  # fmt: skip


def _plot(by_arch: dict[tuple[str, str], list[str]], results: dict[str, dict], path: Any) -> str:
    """One panel per (dataset, architecture): test accuracy of each plotted method per split; written next to the
    Markdown file (same name, .png). Returns the sentence the report gets."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot."
    keys = list(by_arch)
    cols_n = min(4, len(keys))
    rows_n = (len(keys) + cols_n - 1) // cols_n
    fig, axes = plt.subplots(rows_n, cols_n, figsize=(4.2 * cols_n, 3.2 * rows_n), squeeze=False)
    for ax, (ds, arch) in zip(axes.flat, keys):
        cs = by_arch[(ds, arch)]
        labels = ["/".join(c.split("/")[2:]) for c in cs]
        for j, (method, style, name) in enumerate(PLOTTED):
            pts = [(i + 0.06 * (j - len(PLOTTED) / 2), 100 * results[c][method][0]) for i, c in enumerate(cs)
                   if method in results[c] and results[c][method][0] == results[c][method][0]]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), style, ls="none", ms=5, label=name)
        ax.set_xticks(range(len(cs)), labels, fontsize=7)
        ax.set_title(f"{DATASET_NAMES.get(ds, ds)}, {ARCH_NAMES.get(arch, arch)}", fontsize=9)
        ax.set_ylabel("test acc. %", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    png = path.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, png)  # atomic: a reader never sees a half-written plot
    plt.close(fig)
    print(f"wrote {png}")
    return f"Plot: `{png.name}` (test accuracy per split of the plotted methods; every method is in the tables)."


if __name__ == "__main__":
    main()
