"""Weight matching's starts: the Git Re-Basin descent from the identity alone (``starts=("identity",)``, the rule
before the starts existed) against the default, a descent from the identity and one from the sorted-rows start
(:func:`pyfusion.match.solvers.sorted_rows_start`), keeping the higher objective.

Cases: pairs and a K = 4 ensemble of MLPs 784-256-256-10 trained here on MNIST and Fashion-MNIST (Adam lr 1e-3,
batch 128, one epoch on 20,000 training images, seeds 0-3), a VGG-style CNN with BatchNorm (conv 16-M-32-M, hidden
64) pair on MNIST, and HF MobileNetV2 (random weights, depth multiplier 0.25) fused with its own permuted copy. For
each: the total objective ``sum_{j < k} sum_t <pi_j(W_j)_t, pi_k(W_k)_t>`` of the whole K-member rule from each
start, which start was kept,
the test accuracy (10,000 test images) of the weight-matched average (BatchNorm statistics reset on 5,000
training images for the CNN), and the fusion time. The permuted copy reports the relative output error against
the model instead (0 is exact). Float32, 1 thread.

Usage: python bench/weight_matching_starts.py [--quick] [--out bench/results/weight_matching_starts.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import Report, output_path

import pyfusion
from pyfusion.data import load_fashion_mnist, load_mnist, make_loader
from pyfusion.models import mlp, vgg
from pyfusion.testing import permuted_copy
from pyfusion.train import evaluate, train

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
STARTS = {"identity only": ("identity",), "identity + sorted rows": ("identity", "sorted_rows")}


def _trained(arch: str, x: torch.Tensor, y: torch.Tensor, seed: int, n: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp([784, 256, 256, 10]) if arch == "mlp" else vgg((16, "M", 32, "M"), in_channels=1, image_size=28)
    xs = x.flatten(1) if arch == "mlp" else x
    gen = torch.Generator().manual_seed(100 + seed)
    idx = torch.randperm(x.shape[0], generator=gen)[:n]
    train(model, make_loader(xs[idx], y[idx], 128, shuffle=True, seed=seed), epochs=1, lr=1e-3, seed=seed)
    return model.eval()


def _fuse_rows(case: str, members: list, calib: list, test, reset_bn: bool) -> list[list]:
    rows = []
    for label, starts in STARTS.items():
        t0 = time.perf_counter()
        opts = {"reset_bn": True} if reset_bn else {}
        fused = pyfusion.fuse(members, calib if reset_bn else None, method="weight_matching", starts=starts, **opts)
        seconds = time.perf_counter() - t0
        info = {s["start"]: s for s in fused.fusion_info["starts"]}
        kept = next(s["start"] for s in info.values() if s["kept"])
        quality = test(fused)
        rows.append([case, len(members), label, info["identity"]["objective"],
                     info["sorted_rows"]["objective"] if "sorted_rows" in info else float("nan"), kept, quality,
                     seconds])  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_train = 2000 if args.quick else 20000
    rows: list[list] = []
    extras: list[list] = []
    datasets = {"MNIST": load_mnist, "Fashion-MNIST": load_fashion_mnist}
    for dname, load in list(datasets.items())[: 1 if args.quick else 2]:
        sub = "mnist" if dname == "MNIST" else "fashion-mnist"
        x, y = load(str(DATA / sub), "train")
        xt, yt = load(str(DATA / sub), "test")
        archs = ["mlp"] if dname != "MNIST" or args.quick else ["mlp", "vgg_bn"]
        for arch in archs:
            ks = (2,) if arch == "vgg_bn" or args.quick else (2, 4)
            members = [_trained(arch, x, y, s, n_train) for s in range(max(ks))]
            xt_in = xt.flatten(1) if arch == "mlp" else xt
            test_loader = make_loader(xt_in, yt, 1000)
            calib = [b for b, _ in make_loader((x.flatten(1) if arch == "mlp" else x)[:5000], y[:5000], 500)]
            for i, m in enumerate(members):
                extras.append([f"{dname} {arch}", f"member {i}", evaluate(m, test_loader)])
            for k in ks:
                rows += _fuse_rows(f"{dname} {arch}", members[:k], calib, lambda f, t=test_loader: evaluate(f, t),
                                   arch == "vgg_bn")  # fmt: skip
    if not args.quick:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.25, num_labels=3)
        model = tf.MobileNetV2ForImageClassification(cfg).eval()
        for p in model.parameters():  # random weights of unit scale (a fresh init has near-constant BN params)
            torch.nn.init.normal_(p, 0.0, 0.5)
        xm = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        graph = pyfusion.graph.trace_groups(model, xm)
        twin = permuted_copy(model, torch.Generator().manual_seed(0), graph=graph)
        with torch.no_grad():
            ref = model(xm).logits

        def err(f: torch.nn.Module) -> float:
            with torch.no_grad():
                return float((f(xm).logits - ref).abs().max() / ref.abs().max())

        rows += _fuse_rows("HF MobileNetV2 + its permuted copy (rel. error)", [model, twin], None, err, False)
    report = Report("Weight matching: the identity start alone vs identity + sorted rows (CPU)", quick=args.quick)
    report.text(__doc__.split("\n\nUsage")[0])
    cols = ["case", "K", "starts", "objective from identity", "objective from sorted rows", "kept",
            "test accuracy / error", "fusion s"]  # fmt: skip
    fmts = {"objective from identity": ".2f", "objective from sorted rows": ".2f", "test accuracy / error": ".4g",
            "fusion s": ".2f"}  # fmt: skip
    report.table("starts", cols, rows, formats=fmts)
    report.table("members", ["case", "member", "test accuracy"], extras, formats={"test accuracy": ".4f"})
    report.write(output_path(args.out, "weight_matching_starts.md", args.quick))
    print(report.markdown())


if __name__ == "__main__":
    main()
