"""``pyfusion.cost``: effective parameters and FLOPs of a (partially fused) network, the dense counts, and the
ensemble's FLOPs for comparison.

One forward pass on one example (hooks on every weight layer, and a dispatch mode for the matrix products that
no weight layer owns) records what each call costs:

* ``PartialLinear`` / ``PartialConv1d`` / ``PartialConv2d`` / ``EnsembleLinear``: only their stored blocks (member
  masks intersecting);
* ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` of a fused network whose segments the
  builder recorded (``fusion_module_layouts``): the blocks the segments allow (the zero blocks of the dense
  zero-block layer are not effective work); any other such layer: its full size;
* ``nn.MultiheadAttention``: its in / out projections (effective, by their recorded segments: q and out on the T
  query tokens, k and v on the S key tokens) and the attention products, ``2 * 2 * heads * T * S * head_dim``
  FLOPs per example (QK^T and AV);
* attention written with ``matmul`` / ``bmm`` / ``F.scaled_dot_product_attention`` (Hugging Face, user classes):
  the products as they run, so a fused model's QK^T and AV scale with the number of heads in every segment (shared
  and branch heads), ``T^2 x head_dim`` each;
* :class:`pyfusion.nn.MemberViewNorm`: its dense map products (selection maps run as gathers: no FLOPs);
* convolutions multiply by their output positions H' * W';

FLOPs = 2 * multiply-accumulates (biases, normalisation, activations, softmax and pooling are not counted);
parameters count every parameter once (weights, biases, normalisation parameters). A module called several times
is counted at every call (FLOPs) but its parameters once. FLOPs are per example (the batch dimension of the first
tensor input is divided out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Cost", "cost", "run_example"]


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass per example.

    Attributes:
        params: effective parameters (stored non-zero blocks, biases, normalisation parameters).
        flops: effective FLOPs = 2 * MACs of the weight layers' stored blocks + attention products + dense map
            products of member-view norms.
        dense_params: parameters of the equivalent dense network (zero blocks included).
        dense_flops: FLOPs of the equivalent dense network.
        attention_flops: the part of ``flops`` in the attention products QK^T and AV (``nn.MultiheadAttention``'s,
            and every matrix product no weight layer owns).
        ensemble_flops: FLOPs of the ensemble of ``members`` (each member on the same example, summed), when
            members were given.
        layers: module path -> (effective params, effective FLOPs, dense params, dense FLOPs) of each weight layer.
    """

    params: int
    flops: int
    dense_params: int
    dense_flops: int
    attention_flops: int = 0
    ensemble_flops: int | None = None
    layers: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        ens = "" if self.ensemble_flops is None else f", ensemble {self.ensemble_flops:,}"
        return (
            f"Cost(params={self.params:,} (dense {self.dense_params:,}), "
            f"FLOPs={self.flops:,} (dense {self.dense_flops:,}{ens}))"
        )


def _recorded_stored(root: nn.Module, path: str, mod: nn.Module) -> int | None:
    """Stored weights of a dense layer by the segments the builder recorded (kernel taps included), or None."""
    layouts = getattr(root, "fusion_module_layouts", None)
    if not layouts or path not in layouts:
        return None
    from pyfusion.fuse.fast import _axes_of, module_segments
    from pyfusion.ops.layout import segment_plan

    if _axes_of(mod) is None:
        return None
    k = _num_members(root)
    if k is None:
        return None
    segs = module_segments(root, layouts, path, k)
    if segs is None:
        return None
    w = mod.weight
    taps = int(w[0, 0].numel()) if w.dim() > 2 else 1
    return segment_plan(*segs).stored * taps


def _num_members(root: nn.Module) -> int | None:
    plan = getattr(root, "fusion_plan", None)
    if plan is not None:
        return plan.num_members
    lays = getattr(root, "fusion_layouts", None)
    if lays:
        return len(next(iter(lays.values()))) - 1
    return None


def _mha_counts(root: nn.Module, path: str, mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple:
    """(effective weight params, effective projection MACs, dense params, dense projection MACs, attention MACs)
    of one nn.MultiheadAttention call, for the whole batch."""
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    if mod.batch_first:
        t, s = q.shape[-2], k.shape[-2]
        nb = q.numel() // (t * q.shape[-1])
    else:
        t, s = q.shape[0], k.shape[0]
        nb = q.numel() // (t * q.shape[-1])
    e, h = mod.embed_dim, mod.num_heads
    dense_in = mod.in_proj_weight.numel() if mod.in_proj_weight is not None else 3 * e * e
    dense_out = mod.out_proj.weight.numel()
    eff_qkv = [dense_in // 3] * 3  # the q, k and v rows of in_proj_weight
    layouts = getattr(root, "fusion_module_layouts", None) or {}
    kk = _num_members(root)
    if kk is not None and path in layouts and "segments" in layouts[path] and mod.in_proj_weight is not None:
        from pyfusion.ops.layout import as_segments, segment_plan, slice_segments

        rec = layouts[path]["segments"].get("in_proj_weight")
        if rec is not None:
            every = (1 << kk) - 1
            w = mod.in_proj_weight
            ins, rows = (as_segments(rec["axes"].get(str(a), [[int(w.shape[a]), every]]), "in_proj") for a in (1, 0))
            n = int(w.shape[0]) // 3
            eff_qkv = [segment_plan(ins, slice_segments(rows, j * n, (j + 1) * n)).stored for j in range(3)]
    out_path = f"{path}.out_proj" if path else "out_proj"
    stored = _recorded_stored(root, out_path, mod.out_proj)
    eff_out = dense_out if stored is None else stored
    # q and the output projection on the query tokens, k and v on the key / value tokens
    proj_eff = eff_qkv[0] * t + (eff_qkv[1] + eff_qkv[2]) * s + eff_out * t
    proj_dense = (dense_in // 3) * (t + 2 * s) + dense_out * t
    attn = 2 * h * t * s * (e // h)  # QK^T and AV: h * t * s * head_dim multiply-accumulates each
    return sum(eff_qkv) + eff_out, proj_eff * nb, dense_in + dense_out, proj_dense * nb, attn * nb


def _weight_layer_counts(root: nn.Module, path: str, mod: nn.Module, out: Tensor) -> tuple[int, int, int, int] | None:
    """(effective weight params, effective MACs, dense weight params, dense MACs) of one call (whole batch)."""
    from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear

    rows = out.numel() // out.shape[-1] if out.dim() > 0 and out.shape[-1] else 0
    if isinstance(mod, PartialLinear):
        eff = mod.weight.numel()
        dense = mod.in_features * mod.out_features
        return eff, eff * rows, dense, dense * rows
    if isinstance(mod, EnsembleLinear):
        eff = mod.weight.numel()
        dense = mod._plan.i_total * mod._plan.o_total
        return eff, eff * rows, dense, dense * rows
    if isinstance(mod, PartialConv2d):
        eff = mod.weight.numel()
        dense = mod.out_channels * mod.in_channels * math.prod(mod.kernel_size)  # PartialConv1d: (k,)
        pos = out.numel() // out.shape[1] if out.shape[1] else 0
        return eff, eff * pos, dense, dense * pos
    if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
        n = mod.weight.numel()
        eff = _recorded_stored(root, path, mod)
        eff = n if eff is None else eff
        return eff, eff * rows, n, n * rows
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        n = mod.weight.numel()
        eff = _recorded_stored(root, path, mod) if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else None
        eff = n if eff is None else eff
        pos = out.numel() // out.shape[1] if out.shape[1] else 0
        return eff, eff * pos, n, n * pos
    return None


def _norm_counts(mod: nn.Module, out: Tensor) -> tuple[int, int]:
    """(effective MACs, dense MACs) of a MemberViewNorm call: its dense (non-selection) map products."""
    d = mod.dim  # the features' axis: every other one is a row of the map products
    rows = out.numel() // out.shape[d] if out.dim() >= -d and out.shape[d] else 0
    macs = 0
    for k in range(mod.num_members):
        if not mod._gather[k]:
            macs += getattr(mod, f"b_map_{k}").numel() * rows
        if not mod._scatter[k]:
            macs += getattr(mod, f"a_map_{k}").numel() * rows
    return macs, macs


def _batch_of(example: Any) -> int:
    def first(v: Any) -> Tensor | None:
        if isinstance(v, Tensor):
            return v
        if isinstance(v, (list, tuple)):
            for item in v:
                t = first(item)
                if t is not None:
                    return t
        if isinstance(v, Mapping):
            for item in v.values():
                t = first(item)
                if t is not None:
                    return t
        return None

    t = first(example)
    if t is None or t.dim() < 1 or t.shape[0] == 0:
        raise ValueError("example must hold a tensor input with a non-empty batch dimension")
    return int(t.shape[0])


def _as_call(model: nn.Module, example: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of a forward on ``example``: a tensor, an input shape without the batch dimension (a float
    zero tensor on the model's device is used), or ``(args, kwargs)`` as the graph layer records example inputs."""
    if isinstance(example, Tensor):
        return (example,), {}
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], Mapping):
        args = example[0] if isinstance(example[0], (tuple, list)) else (example[0],)
        return tuple(args), dict(example[1])
    if isinstance(example, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in example):
        shape = tuple(int(s) for s in example)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"example must be an input tensor or a positive input shape; got {example!r}")
        p0 = next(iter(model.parameters()), None)
        dev = p0.device if p0 is not None else None
        dt = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
        return (torch.zeros((1, *shape), device=dev, dtype=dt),), {}
    raise ValueError(
        "example must be an input tensor, an input shape without the batch dimension, or (args, kwargs); got "
        f"{type(example).__name__}"
    )


def run_example(model: nn.Module, example: Any) -> Any:
    """One forward of ``model`` on ``example`` in eval mode without autograd (training modes restored)."""
    args, kwargs = _as_call(model, example)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _product_macs(func: Any, args: tuple, out: Any) -> int:
    """Multiply-accumulates of a matrix product / attention op seen by the dispatch mode (0 for other ops)."""
    name = getattr(func, "__name__", str(func))
    base = name.split(".")[0]
    if base in ("mm", "addmm", "bmm", "baddbmm"):
        # (m, k) @ (k, n) or (B, m, k) @ (B, k, n): a.numel() * n multiply-accumulates
        a, b = (args[0], args[1]) if base in ("mm", "bmm") else (args[1], args[2])
        return int(a.numel()) * int(b.shape[-1])
    if "scaled_dot_product" in base and "backward" not in base:
        q, k, v = args[0], args[1], args[2]
        t, s = int(q.shape[-2]), int(k.shape[-2])
        lead = int(q.numel() // (t * q.shape[-1]))
        return lead * t * s * (int(q.shape[-1]) + int(v.shape[-1]))
    if base in ("convolution", "_convolution") and isinstance(out, Tensor):
        w = args[1]
        return int(out.numel()) * int(w[0].numel())
    return 0


def cost(model: nn.Module, example: Any, *, members: Sequence[nn.Module] | None = None) -> Cost:
    """Effective and dense parameters / FLOPs of ``model`` for one example (see the module docstring).

    Args:
        model: any network (fused or not); not modified (its training mode is restored).
        example: an input tensor (its first dimension is the batch), an input shape without the batch dimension,
            e.g. ``(3, 32, 32)`` (a float32 zero tensor on the model's device is used), or ``(args, kwargs)`` of a
            forward call (token ids for a language model, as ``FusionGraph.example_inputs`` holds them).
        members: the members of a fused model: ``ensemble_flops`` is then their FLOPs on the same example, summed
            (the ensemble run member by member).

    Returns:
        :class:`Cost`.

    Raises:
        ValueError: an input shape with non-positive entries, or an input without a batch dimension.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyfusion.nn import EnsembleLinear, PartialConv2d, PartialLinear
    from pyfusion.nn.norm import MemberViewNorm

    args, kwargs = _as_call(model, example)
    batch = _batch_of((args, kwargs))
    layers: dict[str, list[int]] = {}
    owners: dict[nn.Module, str] = {}
    for path, mod in model.named_modules():
        owners.setdefault(mod, path)
    depth = [0]
    free = [0]  # MACs of products outside weight layers (attention)
    norm_macs = [0, 0]

    def pre(mod: nn.Module, a: Any, kw: Any = None) -> None:
        depth[0] += 1

    def post(mod: nn.Module, a: Any, kw: Any, out: Any = None) -> None:
        depth[0] -= 1
        if out is None:  # hooks registered without kwargs
            out = kw
            kw = {}
        path = owners[mod]
        if isinstance(mod, nn.MultiheadAttention):
            *counts, attn = _mha_counts(model, path, mod, a, kw or {})
            free[0] += attn  # the attention products: counted with those of the other attention modules
        elif isinstance(mod, MemberViewNorm):
            if isinstance(out, Tensor):
                e, d = _norm_counts(mod, out)
                norm_macs[0] += e
                norm_macs[1] += d
            return
        else:
            if not isinstance(out, Tensor):
                return
            counts = _weight_layer_counts(model, path, mod, out)
        if counts is None:
            return
        e_p, e_m, d_p, d_m = counts
        entry = layers.setdefault(path, [e_p, 0, d_p, 0])
        entry[1] += e_m // batch
        entry[3] += d_m // batch

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, fargs=(), fkwargs=None):
            out = func(*fargs, **(fkwargs or {}))
            if depth[0] == 0:
                try:
                    free[0] += _product_macs(func.overloadpacket, fargs, out) if hasattr(func, "overloadpacket") else 0
                except Exception:  # an op with unexpected arguments: not a product we count
                    pass
            return out

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, PartialLinear, PartialConv2d, EnsembleLinear,
             nn.MultiheadAttention, MemberViewNorm)  # fmt: skip
    handles = []
    for mod in owners:
        if isinstance(mod, kinds) or type(mod).__name__ == "Conv1D":
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    # nn.TransformerEncoderLayer / nn.MultiheadAttention have an inference fast path that runs the whole layer as
    # one op (no submodule is called): switched off while counting, so every layer is seen.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), Products():
            model(*args, **kwargs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    # Parameters: every parameter once; weight layers contribute effective vs dense weights, the rest in full.
    weight_params_eff = sum(v[0] for v in layers.values())
    weight_params_dense = sum(v[2] for v in layers.values())
    weight_tensors = 0
    for path in layers:
        mod = model.get_submodule(path)
        if isinstance(mod, nn.MultiheadAttention):
            weight_tensors += mod.in_proj_weight.numel() if mod.in_proj_weight is not None else 0
            weight_tensors += mod.out_proj.weight.numel()
        else:
            weight_tensors += mod.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    other = total - weight_tensors  # biases, normalisation parameters, layers never called
    out = {k: (v[0], 2 * v[1], v[2], 2 * v[3]) for k, v in layers.items()}
    attention = 2 * free[0] // batch
    norms = 2 * norm_macs[0] // batch
    ens = None
    if members is not None:
        ens = sum(cost(m, example).flops for m in members)
    return Cost(
        params=weight_params_eff + other,
        flops=sum(v[1] for v in out.values()) + attention + norms,
        dense_params=weight_params_dense + other,
        dense_flops=sum(v[3] for v in out.values()) + attention + 2 * norm_macs[1] // batch,
        attention_flops=attention,
        ensemble_flops=ens,
        layers=out,
    )
