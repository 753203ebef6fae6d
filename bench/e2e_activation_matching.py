"""Activation matching end to end (issue 15 item 1): ``pyfusion.fuse(method="activation_matching")`` against a
competent plain script, on an MLP 784-1024-1024-1024-10 pair with 4096 and 16384 calibration samples.

The plain script (what a user writes with the usual tools): forward hooks store the ReLU outputs of both members,
numpy float64 correlation of the stored activations (standardised columns, one BLAS GEMM X^T Y per layer: only the
cross block the matching needs), one ``scipy.optimize.linear_sum_assignment`` per layer (maximise the correlation),
then the fused weights by permuting member 1 and averaging (numpy). Both sides must find the same permutations
(checked; the fused parameters then agree to float32 rounding). Times are wall clock, end to end (data already in
memory as batches of 512), median of interleaved repeats (pyfusion, script, pyfusion, ...), one thread for torch and
BLAS (``--threads T`` with ``OMP_NUM_THREADS=T`` etc. for both sides). ``pyfusion`` is also split into its stages
(fusion_info: trace, statistics, cost, solve, build; ``rest s``: the end to end time less those, i.e. the argument
checks, the plan, the FLOP cap and the execution-module swap). The FLOP floor is the forward passes of both members
plus one cross-correlation GEMM per hidden layer at the float32 GEMM rate measured in the same run: ``script /
floor`` bounds the speed-up of any implementation with float32 products; ``forwards s`` is both members' plain
forwards measured alone (no hooks), so ``script / forwards`` bounds any implementation even if everything after the
forwards were free.


Usage: PYTHONPATH=. python bench/e2e_activation_matching.py [--quick] [--repeats R] [--threads T] [--out PATH]
       [--profile]  (also print a cProfile of one fusion per size, by CPU time, top functions by own time)
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy / torch load BLAS
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Report, output_path  # noqa: E402

import pyfusion  # noqa: E402
from pyfusion.models import mlp  # noqa: E402

BATCH = 512
SECONDS = ("script s", "pyfusion s", "floor s", "forwards s", "trace s", "stats s", "cost s", "solve s", "build s",
           "rest s")  # fmt: skip


def members(width: int, depth: int = 3, seed: int = 0) -> list[torch.nn.Module]:
    """Member 0 random; member 1 its hidden neurons permuted, weights perturbed by 0.15 of their spread: a well-posed
    matching (two independent random networks have near-tied optima that float32 rounding may flip)."""
    torch.manual_seed(seed)
    a = mlp([784] + [width] * depth + [10]).eval()
    b = mlp([784] + [width] * depth + [10]).eval()
    sd = {k: v.detach().clone() for k, v in a.state_dict().items()}
    linears = [n for n, m in a.named_modules() if isinstance(m, torch.nn.Linear)]
    prev = None
    for j, name in enumerate(linears):
        w, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]
        if prev is not None:
            w = w[:, prev]
        if j < len(linears) - 1:
            p = torch.randperm(width)
            w, bias, prev = w[p], bias[p], p
        sd[f"{name}.weight"] = w + 0.15 * w.std() * torch.randn_like(w)
        sd[f"{name}.bias"] = bias + 0.15 * bias.std() * torch.randn_like(bias)
    b.load_state_dict(sd)
    return [a, b]


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """n MNIST-like inputs (non-negative, sparse-ish: random images through a ReLU), batches of BATCH."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, 784, generator=g))
    return list(x.split(BATCH))


def plain_script(models: list[torch.nn.Module], data: list[torch.Tensor]) -> tuple[dict, list[np.ndarray], list]:
    """Hooks + numpy float64 correlation + scipy LSA + numpy weight averaging. Returns (fused state, perms, the
    float64 correlation matrices)."""
    relus = [[m for m in model if isinstance(m, torch.nn.ReLU)] for model in models]
    store: list[list[list[np.ndarray]]] = [[[] for _ in r] for r in relus]
    hooks = []
    for k, rs in enumerate(relus):
        for i, mod in enumerate(rs):
            hooks.append(mod.register_forward_hook(lambda _m, _a, o, _s=store[k][i]: _s.append(o.numpy())))
    with torch.no_grad():
        for x in data:
            for model in models:
                model(x)
    for h in hooks:
        h.remove()
    perms, corrs = [], []
    for i in range(len(relus[0])):
        a = np.concatenate(store[0][i]).astype(np.float64)
        b = np.concatenate(store[1][i]).astype(np.float64)
        a -= a.mean(0)
        b -= b.mean(0)
        sa, sb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
        corr = (a.T @ b) / np.outer(np.where(sa > 0, sa, 1.0), np.where(sb > 0, sb, 1.0))
        perms.append(linear_sum_assignment(corr, maximize=True)[1])
        corrs.append(corr)
    sa = {k: v.detach().numpy() for k, v in models[0].state_dict().items()}
    sb = {k: v.detach().numpy() for k, v in models[1].state_dict().items()}
    linears = [n for n, m in models[0].named_modules() if isinstance(m, torch.nn.Linear)]
    fused = {}
    for j, name in enumerate(linears):
        w, bias = sb[f"{name}.weight"], sb[f"{name}.bias"]
        if j < len(perms):
            w, bias = w[perms[j]], bias[perms[j]]
        if j > 0:
            w = w[:, perms[j - 1]]
        fused[f"{name}.weight"] = (sa[f"{name}.weight"] + w) / 2
        fused[f"{name}.bias"] = (sa[f"{name}.bias"] + bias) / 2
    return fused, perms, corrs


def run_pyfusion(models: list[torch.nn.Module], data: list[torch.Tensor]) -> torch.nn.Module:
    return pyfusion.fuse(models, data, method="activation_matching")


def flop_floor(width: int, n: int, depth: int = 3, inputs: int = 784, classes: int = 10) -> tuple[float, float]:
    """(FLOPs, seconds) of the work no implementation can skip: both members' forward passes (2 N sum of the layers'
    in x out) plus one cross-correlation GEMM per hidden layer (2 N width^2), timed at the float32 GEMM rate
    measured here (the fastest of 20 products of a 512-sample batch by a width x width matrix, this process's
    threads: the best rate, since a floor must not rise when another job takes the core for one product; with the
    median of 5 a 16384-sample floor once came out above pyfusion's measured time)."""
    dims = [inputs] + [width] * depth + [classes]
    forward = sum(2 * n * a * b for a, b in zip(dims[:-1], dims[1:])) * 2
    cross = depth * 2 * n * width * width
    a, w = torch.randn(BATCH, width), torch.randn(width, width)
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        torch.mm(a, w)
        times.append(time.perf_counter() - t0)
    rate = 2 * BATCH * width * width / min(times[1:])
    return float(forward + cross), (forward + cross) / rate


def forwards_time(models: list[torch.nn.Module], data: list[torch.Tensor], repeats: int = 3) -> float:
    """Seconds (best of ``repeats``) of both members' plain forward passes over the data, no hooks: work every
    implementation repeats in float32 (the activations must be the members' own), so ``script / forwards`` bounds
    any implementation's speed-up even if statistics, solve and build cost nothing."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in data:
                for model in models:
                    model(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def profile(models: list[torch.nn.Module], data: list[torch.Tensor], top: int = 30) -> str:
    """cProfile of one ``run_pyfusion`` by process CPU time (steadier than wall clock on a shared machine): the
    functions with the largest own time, then the cumulative times of pyfusion's stages."""
    pr = cProfile.Profile(timer=time.process_time)
    pr.enable()
    run_pyfusion(models, data)
    pr.disable()
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats("pyfusion", top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (checks that the script works)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (numpy's BLAS follows OMP_NUM_THREADS etc., 1 unless set: set them too)",
    )
    ap.add_argument("--profile", action="store_true", help="print a cProfile (CPU time) of one fusion per size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [(256, 1024), (256, 2048)] if args.quick else [(1024, 4096), (1024, 16384)]
    repeats = args.repeats or (1 if args.quick else 5)
    rows, profiles = [], []
    for width, n in sizes:
        models, data = members(width), batches(n)
        run_pyfusion(models, data[:1])  # warm-up: op registration, extension load, torch.export caches
        plain_script(models, data[:1])
        t_py, t_plain, stages = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fused = run_pyfusion(models, data)
            t_py.append(time.perf_counter() - t0)
            info = fused.fusion_info
            keys = ("time_graph_s", "time_stats_s", "time_cost_s", "time_solve_s", "time_build_s")
            st_ = [info.get(k, 0.0) for k in keys]
            stages.append(st_ + [t_py[-1] - sum(st_)])
            t0 = time.perf_counter()
            ref, perms, corrs = plain_script(models, data)
            t_plain.append(time.perf_counter() - t0)
        # same matching: pyfusion's permutations reach the script's float64 objective (near-ties may pick another
        # optimum within float32 rounding of the correlations)
        gap = 0.0
        for gp, p, c in zip(fused.fusion_plan.groups.values(), perms, corrs):
            q = gp.A[1].argmax(1).numpy()
            rows_ = np.arange(len(p))
            gap = max(gap, float(c[rows_, p].sum() - c[rows_, q].sum()))
        if gap > 1e-4:
            raise SystemExit(f"pyfusion's matching is worse than the script's by {gap:.2e} in summed correlation")
        got = {k: v.detach().numpy() for k, v in fused.state_dict().items()}
        err = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
        med = statistics.median
        st = [med(s[i] for s in stages) for i in range(6)]
        _flops, floor_s = flop_floor(width, n)
        fwd_s = forwards_time(models, data)
        if args.profile:
            head = f"== cProfile of one fusion, MLP 784-{width}x3-10, {n} samples =="
            profiles.append(head + "\n" + profile(models, data))
        rows.append(
            [f"784-{width}x3-10", n, med(t_plain), med(t_py), med(t_plain) / med(t_py), floor_s,
             med(t_plain) / floor_s, fwd_s, med(t_plain) / fwd_s, *st, f"{gap:.1e}", f"{err:.1e}"]
        )  # fmt: skip
    report = Report("Activation matching end to end: pyfusion vs hooks + numpy float64 + scipy", quick=args.quick)
    report.text(__doc__.split("\n\n")[1].replace("\n", " "))
    report.table(
        "activation matching",
        [
            "MLP",
            "samples",
            "script s",
            "pyfusion s",
            "speed-up",
            "floor s",
            "script / floor",
            "forwards s",
            "script / forwards",
            "trace s",
            "stats s",
            "cost s",
            "solve s",
            "build s",
            "rest s",
            "objective gap",
            "max diff",
        ],
        rows,
        formats={c: ".3f" for c in SECONDS} | {"speed-up": ".2f", "script / floor": ".2f", "script / forwards": ".2f"},
    )
    report.write(output_path(args.out, "e2e_activation_matching.md", args.quick))
    for r in rows:
        print(
            f"{r[0]} N={r[1]}: script {r[2]:.3f} s, pyfusion {r[3]:.3f} s ({r[4]:.2f}x); FLOP floor {r[5]:.3f} s "
            f"(the most any float32 implementation can beat the script by: {r[6]:.2f}x); "
            f"members' forwards alone {r[7]:.3f} s "
            f"(script / forwards {r[8]:.2f}x); stages (trace, stats, cost, solve, build, rest) "
            f"{[round(v, 4) for v in r[9:15]]}"
        )
    for text in profiles:
        print(text)


if __name__ == "__main__":
    main()
