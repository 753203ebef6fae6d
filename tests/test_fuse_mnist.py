"""Full fusion on real data (MNIST): aligning methods must beat vanilla averaging by a wide margin.

Small enough for CI (784-128-128-10, one epoch on 10k images, about 20-40 s on 2 cores); the full-size table is
bench/mnist_full_fusion.py -> bench/results/full_fusion_mnist.md.
"""

from __future__ import annotations

import os

import pytest
import torch

import pyfusion
from pyfusion import data as pdata
from pyfusion import models
from pyfusion.train import ensemble_accuracy, evaluate, train

pytestmark = pytest.mark.data


def test_matching_beats_vanilla_averaging_on_mnist(shared_data_dir):
    root = os.path.join(shared_data_dir, "mnist")
    xtr, ytr = pdata.load_mnist(root, "train")
    xte, yte = pdata.load_mnist(root, "test")
    xtr, ytr = xtr[:10000], ytr[:10000]
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = models.mlp([784, 128, 128, 10])
        train(m, pdata.make_loader(xtr, ytr, 128, shuffle=True, seed=seed), epochs=1, lr=1e-3, seed=seed)
        members.append(m)
    test = pdata.make_loader(xte, yte, 2000)
    calib = pdata.make_loader(xtr[:2000], ytr[:2000], 500)
    acc_members = [evaluate(m, test) for m in members]
    acc_ens = ensemble_accuracy(members, test)
    acc = {
        method: evaluate(pyfusion.fuse(members, calib, method=method), test)
        for method in ("average", "weight_matching", "activation_matching")
    }
    assert min(acc_members) > 0.85 and acc_ens >= min(acc_members) - 0.01
    # measured: average ~0.63, weight matching ~0.87, activation matching ~0.85 (bench/results)
    assert acc["weight_matching"] > acc["average"] + 0.10, acc
    assert acc["activation_matching"] > acc["average"] + 0.10, acc
    assert max(acc["weight_matching"], acc["activation_matching"]) > min(acc_members) - 0.05, (acc, acc_members)
