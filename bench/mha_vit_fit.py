"""partial_fit / cluster_fit with and without the ``nn.MultiheadAttention`` fit, on two MNIST ViTs built on
``nn.TransformerEncoder`` (the zoo's ViT is Hugging Face's, whose q / k / v are ``nn.Linear`` layers the fit always
read; this model's attention is ``nn.MultiheadAttention``).

Members: :class:`MHAViT` (7x7 patches + CLS token, width 32, 4 heads, 2 pre-LN layers, GELU MLPs of 64), seeds 0 and
1, 12 epochs of AdamW (one-cycle lr 2e-3, batch 128, one thread; about 2 minutes each on the shared 2-core VM) on
59000 MNIST training images; the other 1000 (a seeded random slice) are the calibration data. Cached in ``--cache``.
Rows: plain partial / cluster, the fit with every MHA left averaged (``--skip-mha`` path: exactly the fit before the
MHA was fitted, checked against that commit's code), the fit. Cells: test accuracy (10000 images), mean squared
distance of the logits to the ensemble's, agreement with the ensemble's predictions.

Usage: ``python bench/mha_vit_fit.py [--cache /tmp/mha_vit] [--cal-seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyfusion  # noqa: E402
import pyfusion.fuse.partial_fit as partial_fit  # noqa: E402
from pyfusion.data import load_mnist  # noqa: E402


class MHAViT(nn.Module):
    """A pre-LN ViT on nn.TransformerEncoderLayer (nn.MultiheadAttention): 7x7 patches (16) + CLS, d 32, 4 heads."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, ff: int = 64):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 7, stride=7)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.enc(h))[:, 0])


def _data(root: str, cal_seed: int):
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    xtr, xte = xtr.float().reshape(-1, 1, 28, 28), xte.float().reshape(-1, 1, 28, 28)
    if xtr.max() > 2:
        xtr, xte = xtr / 255.0, xte / 255.0
    xtr, xte = (xtr - 0.1307) / 0.3081, (xte - 0.1307) / 0.3081
    perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(0))
    cal, pool = perm[:1000], perm[1000:]
    xc = xtr[cal]
    if cal_seed:  # another slice, of the training pool (the members trained on it)
        xc = xtr[pool][torch.randperm(len(pool), generator=torch.Generator().manual_seed(cal_seed))[:1000]]
    return (xtr[pool], ytr[pool]), xc, (xte, yte)


def _member(seed: int, train, test, cache: str) -> nn.Module:
    path = os.path.join(cache, f"member{seed}.pt")
    m = MHAViT()
    if os.path.exists(path):
        m.load_state_dict(torch.load(path))
        return m.eval()
    x, y = train
    torch.manual_seed(seed)
    m = MHAViT()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=1e-4)
    epochs, bs = 12, 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (x.shape[0] // bs))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        m.train()
        for i in range(x.shape[0] // bs):
            idx = perm[i * bs : (i + 1) * bs]
            loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        m.eval()
        with torch.no_grad():
            print(f"member {seed} epoch {ep}: test {float((m(test[0]).argmax(1) == test[1]).float().mean()):.4f}")
    os.makedirs(cache, exist_ok=True)
    torch.save(m.state_dict(), path)
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/mha_vit")
    ap.add_argument("--data", default=os.path.join(os.environ.get("PYFUSION_DATA", "/work/shared/data"), "mnist"))
    ap.add_argument("--cal-seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, xc, (xt, yt) = _data(args.data, args.cal_seed)
    members = [_member(s, train, (xt, yt), args.cache) for s in (0, 1)]
    cal = [xc[i : i + 250] for i in range(0, 1000, 250)]
    with torch.no_grad():
        logits = [m(xt) for m in members]
    ens = sum(logits) / 2
    print(json.dumps({"members": [float((z.argmax(1) == yt).float().mean()) for z in logits],
                      "ensemble": float((ens.argmax(1) == yt).float().mean())}))  # fmt: skip
    keep = partial_fit.mha_unfit_reason
    for base, key, values in (("partial", "alpha", (0.0, 0.25, 0.5)), ("cluster", "width", (0.5, 0.75, 1.0))):
        for val in values:
            for row in (base, f"{base}_fit/skip-mha", f"{base}_fit"):
                method = row.split("/")[0]
                if row.endswith("skip-mha"):
                    partial_fit.mha_unfit_reason = lambda mod: "left averaged (--skip-mha)"
                try:
                    t0 = time.perf_counter()
                    fused = pyfusion.fuse(members, cal, method=method, **{key: val}).eval()
                    dt = time.perf_counter() - t0
                finally:
                    partial_fit.mha_unfit_reason = keep
                with torch.no_grad():
                    z = fused(xt)
                fit = fused.fusion_info.get("fit", {})
                print(json.dumps({
                    "row": row, key: val, "acc": round(100 * float((z.argmax(1) == yt).float().mean()), 2),
                    "mse_to_ensemble": round(float(((z - ens) ** 2).mean()), 4),
                    "agree_ensemble": round(100 * float((z.argmax(1) == ens.argmax(1)).float().mean()), 2),
                    "skipped": len(fit.get("skipped", {})), "fuse_s": round(dt, 1),
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
