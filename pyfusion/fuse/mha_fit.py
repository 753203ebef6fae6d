"""What the least-squares fit (:mod:`pyfusion.fuse.partial_fit`) needs of an ``nn.MultiheadAttention``.

The module computes its q / k / v projections from its packed ``in_proj_weight`` and its output projection from
``out_proj.weight`` inside its forward (no hook sees either layer's inputs or outputs). The fit reads them here:

* :func:`capture_calls`: the module's inputs of every call (a forward pre-hook with kwargs, the arguments bound to
  ``nn.MultiheadAttention.forward``'s signature, tensors cloned with their aliasing kept: self-attention passes one
  tensor as query, key and value) and its attention output, over calibration samples;
* :func:`in_proj_outputs`: the q, k and v of one call, each the linear map of its own input by its rows of
  ``in_proj_weight`` (cut at E and 2E) and ``in_proj_bias``;
* :func:`attention_context`: the input of ``out_proj`` (the per-head ``softmax(q k^T / sqrt(d) + mask) v``, heads
  concatenated), in the layout of the module's output. It runs the module's own slow path
  (``F.multi_head_attention_forward`` with the masks canonicalised and the batch-first transposes exactly as
  ``nn.MultiheadAttention.forward`` makes them, dropout off) with an identity output projection and no bias, so
  every mask form (boolean / float ``attn_mask``, ``key_padding_mask``, ``is_causal``), ``need_weights`` (the
  explicit softmax path or scaled_dot_product_attention) and unbatched inputs are computed as the module computes
  them; the product with the identity is exact (``c_i * 1`` plus zeros). Then ``out_proj(context)`` is the module's
  output (tests/test_fit_attention.py checks it to 1e-10 in float64 against the module and a hand-written
  softmax).

The torch MHA fast paths (``torch._native_multi_head_attention`` and ``nn.TransformerEncoderLayer``'s fused C++
layer, which call no submodule and no hook) are switched off while the fit runs the models (:func:`no_fastpath`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MHACall",
    "attention_context",
    "capture_calls",
    "in_proj_outputs",
    "mha_unfit_reason",
    "no_fastpath",
    "run_hooked",
    "sources",
]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@contextlib.contextmanager
def no_fastpath() -> Iterator[None]:
    """Switch off torch's MHA / encoder-layer inference fast paths (they call no submodule, so no hook fires)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:  # pragma: no cover - torch < 2.1
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def mha_unfit_reason(mod: nn.Module) -> str | None:
    """Why the fit cannot read this ``nn.MultiheadAttention`` (None: it can)."""
    if type(mod) is not nn.MultiheadAttention:
        return f"a {type(mod).__name__} (a subclass of nn.MultiheadAttention: its forward may differ from torch's)"
    if not mod._qkv_same_embed_dim:
        return (
            f"an nn.MultiheadAttention with kdim / vdim ({mod.kdim} / {mod.vdim}) != embed_dim ({mod.embed_dim}): "
            "separate q / k / v projection weights, not the packed in_proj_weight the fit reads"
        )
    if mod.bias_k is not None or mod.bias_v is not None:
        return "an nn.MultiheadAttention with bias_k / bias_v (extra key / value tokens the fit does not model)"
    if mod.add_zero_attn:
        return "an nn.MultiheadAttention with add_zero_attn (a zero key / value token the fit does not model)"
    return None


@dataclass
class MHACall:
    """One call of an ``nn.MultiheadAttention``: its bound arguments (``query``, ``key``, ``value``, masks, flags;
    tensors cloned, ``key is query`` / ``value is key`` kept) and its attention output (``out``, cloned)."""

    args: dict[str, Any]
    out: Tensor | None = None


def _bind(mod: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _SIGNATURE.bind(mod, *args, **kwargs)
    bound.apply_defaults()
    got = dict(bound.arguments)
    del got["self"]
    clones: dict[int, Tensor] = {}  # one clone per tensor: self-attention's query is key is value stays so

    def clone(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return v
        if id(v) not in clones:
            clones[id(v)] = v.detach().clone()
        return clones[id(v)]

    return {k: clone(v) for k, v in got.items()}


def capture_calls(model: nn.Module, x: Tensor, path: str, outputs: bool = True, chunk: int = 256) -> list[MHACall]:
    """The calls of the ``nn.MultiheadAttention`` at ``path`` over the samples ``x`` (eval mode, no grad, fast
    paths off), in order; ``outputs``: also keep each call's attention output."""
    mod = model.get_submodule(path)
    calls: list[MHACall] = []

    def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(MHACall(_bind(m, args, kwargs)))

    def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        calls[-1].out = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handles = [mod.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    run_hooked(model, x, handles, chunk)
    return calls


def run_hooked(model: nn.Module, x: Tensor, handles: list[Any], chunk: int = 256) -> None:
    """Run ``model`` over the samples ``x`` in chunks (eval mode, no grad, fast paths off) for the hooks of
    ``handles``, then remove them and restore every module's training mode, whatever happens."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), no_fastpath():
            for s in range(0, x.shape[0], chunk):
                model(x[s : s + chunk])
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)


def sources(call: MHACall) -> list[tuple[str, tuple[int, ...]]]:
    """The distinct inputs of a call and the in_proj blocks (0 q, 1 k, 2 v) each feeds: ``[("query", (0, 1, 2))]``
    for self-attention, ``[("query", (0,)), ("key", (1, 2))]`` when key is value, else one per block."""
    a = call.args
    if a["key"] is a["query"] and a["value"] is a["query"]:
        return [("query", (0, 1, 2))]
    if a["value"] is a["key"]:
        return [("query", (0,)), ("key", (1, 2))]
    return [("query", (0,)), ("key", (1,)), ("value", (2,))]


def in_proj_outputs(mod: nn.Module, call: MHACall, block: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Block ``block`` (0 q, 1 k, 2 v) of the in_proj output of one call: ``x W_j^T + b_j`` with ``x`` the call's
    query / key / value, as (positions, E) rows."""
    e = int(mod.in_proj_weight.shape[0]) // 3
    x = call.args[("query", "key", "value")[block]].to(dtype)
    w = mod.in_proj_weight.detach()[block * e : (block + 1) * e].to(dtype)
    b = None if mod.in_proj_bias is None else mod.in_proj_bias.detach()[block * e : (block + 1) * e].to(dtype)
    return F.linear(x.reshape(-1, x.shape[-1]), w, b)


def attention_context(mod: nn.MultiheadAttention, **args: Any) -> Tensor:
    """The input of ``mod.out_proj`` in a call with ``args`` (``nn.MultiheadAttention.forward``'s arguments by
    name; ``attn_mask`` etc. optional): the per-head attention context, heads concatenated, in the layout of the
    module's output (module docstring). ``mod.out_proj(attention_context(mod, **args))`` is ``mod(**args)[0]``
    (eval mode)."""
    bound = _SIGNATURE.bind(mod, **args)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    attn_mask, key_padding_mask = a["attn_mask"], a["key_padding_mask"]
    # as nn.MultiheadAttention.forward (its slow path) prepares them
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )  # fmt: skip
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
        check_other=False,
    )  # fmt: skip
    transpose = mod.batch_first and is_batched
    if transpose:  # the aliasing decides the in-projection's packed path, as in the module
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (t.transpose(1, 0) for t in (query, key))
                value = key
        else:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    e = int(mod.out_proj.weight.shape[1])
    eye = torch.eye(e, dtype=mod.out_proj.weight.dtype, device=mod.out_proj.weight.device)
    extra = {}
    if not mod._qkv_same_embed_dim:
        extra = dict(use_separate_proj_weight=True, q_proj_weight=mod.q_proj_weight, k_proj_weight=mod.k_proj_weight,
                     v_proj_weight=mod.v_proj_weight)  # fmt: skip
    ctx, _ = F.multi_head_attention_forward(
        query, key, value, mod.embed_dim, mod.num_heads, mod.in_proj_weight, mod.in_proj_bias, mod.bias_k,
        mod.bias_v, mod.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=key_padding_mask,
        need_weights=a["need_weights"], attn_mask=attn_mask, average_attn_weights=a["average_attn_weights"],
        is_causal=a["is_causal"], **extra,
    )  # fmt: skip
    return ctx.transpose(1, 0) if transpose else ctx
