"""Shared helpers of the IR tests: model families, float64 permuted copies, the ensemble / permutation checks."""

from __future__ import annotations

import math

import torch
from torch import nn

from pyfusion import models
from pyfusion.fuse.builder import build
from pyfusion.fuse.plan import Plan
from pyfusion.graph import trace_groups
from pyfusion.testing import permuted_copy


def outputs(y):
    """The tensors of a model output (tensor, tuple, Hugging Face ModelOutput)."""
    if isinstance(y, torch.Tensor):
        return [y]
    if hasattr(y, "to_tuple"):
        y = y.to_tuple()
    if isinstance(y, dict):
        y = list(y.values())
    return [t for v in y for t in outputs(v)] if isinstance(y, (tuple, list)) else []


def run(model, x):
    with torch.no_grad():
        return outputs(model(*x) if isinstance(x, tuple) else model(x))


def max_diff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """float64, eval, every parameter re-drawn (no symmetric initialisation hides a wrong map), BN statistics set."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    seen = set()
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            std = 1.0 / math.sqrt(max(1, p[0].numel())) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
            if isinstance(m, (nn.LayerNorm,)) and m.weight is not None:
                m.weight.add_(1.0)
    return model


def permuted_twin(model: nn.Module, graph, seed: int = 1):
    """A copy of ``model`` with every group permuted (units and inner dims too), and the permutations used."""
    return permuted_copy(model, torch.Generator().manual_seed(seed), graph=graph, return_permutations=True)


def check_permuted_copy(model: nn.Module, x, graph=None, tol: float = 1e-10, twin_tol: float = 1e-10):
    """Fusing a model with its permuted copy through the true inverse permutations gives the model back.

    ``twin_tol`` bounds the copy's own difference (1e-5 for models that compute in float32 inside, such as
    Llama's RMSNorm: a permutation changes the order of that float32 sum); the fused model must match to ``tol``.
    """
    graph = graph or trace_groups(model, x)
    twin, perms = permuted_twin(model, graph)
    y = run(model, x)
    assert max_diff(run(twin, x), y) < twin_tol * max(1.0, max(float(t.abs().max()) for t in y))
    moved = [
        k for k, v in twin.state_dict().items() if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])
    ]
    assert moved, "the permuted copy must differ from the model"
    plan = Plan.from_permutations(
        graph, {g: [torch.arange(len(p)), torch.argsort(p)] for g, p in perms.items()}, (0.5, 0.5)
    )
    fused = build([model, twin], graph, plan)
    assert max_diff(run(fused, x), y) < tol * max(1.0, max(float(t.abs().max()) for t in y))
    ref = dict(model.named_parameters())
    for k, v in fused.named_parameters():
        if k in ref:
            torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12)
    return graph, fused


def check_ensemble(members, x, graph=None, lambdas=(0.3, 0.7), tol: float = 1e-10):
    """The ensemble plan builds a network equal to ``sum_k lambda_k f_k(x)``; one-hot lambdas give a member."""
    graph = graph or trace_groups(members[0], x)
    outs = [run(m, x) for m in members]
    fused = build(members, graph, Plan.ensemble(graph, lambdas))
    want = [sum(lam * o[i] for lam, o in zip(lambdas, outs)) for i in range(len(outs[0]))]
    got = run(fused, x)
    scale = max(1.0, max(float(t.abs().max()) for t in want))
    assert max_diff(got, want) < tol * scale, max_diff(got, want)
    for k in range(len(members)):
        hot = tuple(1.0 if j == k else 0.0 for j in range(len(members)))
        f = build(members, graph, Plan.ensemble(graph, hot))
        assert max_diff(run(f, x), outs[k]) < tol * scale
    return graph, fused


def partial_plan(graph, perms, lambdas=(0.4, 0.6), frac=0.5, seed=3):
    """A two-member partial-fusion plan of a model (member 0) and its permuted copy (member 1, ``perms``) from the
    true correspondences: in every tie set ``frac`` of the units are isolated (one branch slot per member), the
    rest shared; units stay whole and member 1's inner dims follow its permutation."""
    from pyfusion.fuse.plan import GroupPlan

    gen = torch.Generator().manual_seed(seed)
    groups = {}
    for names in graph.tie_sets():
        units = graph.groups[names[0]].units
        r = int(round(frac * units))
        order = torch.randperm(units, generator=gen)
        shared_u, iso_u = order[: units - r].sort().values, order[units - r :].sort().values
        for name in names:
            g = graph.groups[name]
            d = g.unit_size
            inv = torch.argsort(perms[name])  # original neuron i sits at position inv[i] of the copy

            sh, iso = ((us[:, None] * d + torch.arange(d)).reshape(-1) for us in (shared_u, iso_u))
            layout = (len(sh), len(iso), len(iso))
            slots = sum(layout)
            maps_a, maps_b = [], []
            for k, lam in enumerate(lambdas):
                src_sh = sh if k == 0 else inv[sh]
                src_iso = iso if k == 0 else inv[iso]
                ak = torch.zeros(slots, g.size, dtype=torch.float64)
                ak[torch.arange(len(sh)), src_sh] = lam
                off = len(sh) + k * len(iso)
                ak[off + torch.arange(len(iso)), src_iso] = 1.0
                bk = (ak != 0).to(torch.float64).T.contiguous()
                maps_a.append(ak)
                maps_b.append(bk)
            groups[name] = GroupPlan(maps_a, maps_b, layout)
    return Plan(tuple(lambdas), groups)


def check_partial_permuted(model, x, graph=None, twin_tol: float = 1e-10, tol: float = 1e-10):
    """Partial fusion (:func:`partial_plan`) of a model with its permuted copy gives back the model."""
    graph = graph or trace_groups(model, x)
    twin, perms = permuted_twin(model, graph)
    y = run(model, x)
    scale = max(1.0, max(float(t.abs().max()) for t in y))
    assert max_diff(run(twin, x), y) < twin_tol * scale
    plan = partial_plan(graph, perms)
    fused = build([model, twin], graph, plan)
    assert any(gp.slots > graph.groups[n].size for n, gp in plan.groups.items())  # really widened
    assert max_diff(run(fused, x), y) < tol * scale, max_diff(run(fused, x), y)
    fused.fusion_graph = graph
    return fused


def families(samples: int = 8) -> dict:
    """name -> (factory, inputs(generator), kind) for every family the IR tests cover: pyfusion's models, the user
    classes of ``_ir_models`` and the tiny Hugging Face models (float64 inputs / token ids, ``samples`` each)."""
    from _ir_models import CatNet, ConvLast, EncoderNet, GatedRMSNet, HandViT, MHANet, hf_models

    def x(*shape):
        return lambda g: torch.randn(samples, *shape, dtype=torch.float64, generator=g)

    def ids(vocab):
        return lambda g: torch.randint(0, vocab, (samples, 6 if vocab == 100 else 4), generator=g)

    out = {
        "mlp": (lambda: models.mlp([6, 10, 8, 3]), x(6), "pyfusion"),
        "vgg_bn": (
            lambda: models.vgg((4, "M", 6, "M"), in_channels=2, image_size=8, hidden=5),
            x(2, 8, 8),
            "pyfusion",
        ),  # fmt: skip
        "resnet": (lambda: models.resnet20(1, blocks=1), x(3, 8, 8), "pyfusion"),
        "catnet": (CatNet, x(5, 6), "user"),
        "convlast": (ConvLast, x(2, 4, 4), "user"),
        "mha": (MHANet, x(5, 5), "user"),
        "encoder": (EncoderNet, x(5, 5), "user"),
        "hand_vit": (HandViT, x(1, 8, 8), "user"),
        "gated_rms": (GatedRMSNet, ids(20), "user"),
    }
    for name, (factory, _) in hf_models().items():
        out[name] = (factory, ids(100) if name != "vit" else x(1, 8, 8), "huggingface")
    return out
