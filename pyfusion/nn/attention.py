"""``PartialMultiheadAttention``: ``nn.MultiheadAttention`` whose projections skip the zero blocks of a fused layout.

A partially fused ``nn.MultiheadAttention`` (DESIGN §7) holds its q / k / v projections packed in one
``in_proj_weight`` (3E', E') and reads ``out_proj.weight`` directly, so its layers cannot be swapped one by one. This
module computes the same function (``torch.nn.functional.multi_head_attention_forward`` for the configurations
``nn.MultiheadAttention`` builds with ``kdim = vdim = embed_dim``, no ``bias_k`` / ``bias_v``, no ``add_zero_attn``)
with the projections as :class:`~pyfusion.nn.PartialLinear` layers, so shared and branch heads run at their
effective FLOPs:

    q = x_q W_q^T + b_q, k = x_k W_k^T + b_k, v = x_v W_v^T + b_v   (PartialLinear each, member-mask segments)
    head h: o_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h             (d = E' / H' per head)
    y = concat_h(o_h) W_o^T + b_o                                     (PartialLinear)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyfusion.nn.partial import PartialLinear, _refuse_scripting
from pyfusion.ops.layout import Segments, slice_segments

__all__ = ["PartialMultiheadAttention"]


class PartialMultiheadAttention(nn.Module):
    """Multi-head attention with :class:`~pyfusion.nn.PartialLinear` projections (see the module docstring).

    Args:
        q_proj, k_proj, v_proj: (E', E') projections (PartialLinear or nn.Linear, with biases or not alike).
        out_proj: (E', E') output projection.
        num_heads: H' (E' divisible by it).
        batch_first: inputs (B, T, E') instead of (T, B, E').
        dropout: dropout on the attention weights (training only), as ``nn.MultiheadAttention``.

    Attributes ``embed_dim``, ``num_heads``, ``head_dim``, ``batch_first``, ``dropout`` and ``_qkv_same_embed_dim``
    are those of ``nn.MultiheadAttention`` (``nn.TransformerEncoderLayer`` reads them); ``in_proj_weight`` is None
    (the packed weight does not exist: the encoder layers' fused C++ fast path must be off, see
    :func:`pyfusion.fuse.fast.swap_partial_modules`).
    """

    in_proj_weight = None
    in_proj_bias = None
    bias_k = None
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = True

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        num_heads: int,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        e = int(out_proj.out_features)
        for name, p in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj), ("out_proj", out_proj)):
            if (int(p.in_features), int(p.out_features)) != (e, e):
                raise ValueError(
                    f"{name} must map {e} -> {e} features (embed_dim = out_proj.out_features); got "
                    f"{int(p.in_features)} -> {int(p.out_features)}"
                )
        if num_heads < 1 or e % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide embed_dim {e}; got {num_heads}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim = self.kdim = self.vdim = e
        self.num_heads = int(num_heads)
        self.head_dim = e // self.num_heads
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` is refused with a clear error (:class:`~pyfusion.nn.TorchScriptUnsupportedError`)."""
        _refuse_scripting(self)
        return self  # pragma: no cover

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, in_segments: Segments, in_proj_out_segments: Segments,
        out_in_segments: Segments, out_out_segments: Segments,
    ) -> PartialMultiheadAttention:  # fmt: skip
        """Pack an ``nn.MultiheadAttention`` whose skipped blocks are exactly zero.

        Args:
            mha: the dense module (``kdim = vdim = embed_dim``, no bias_k / bias_v / add_zero_attn).
            in_segments: segments of ``in_proj_weight``'s input axis (the stream, E').
            in_proj_out_segments: segments of its 3E' rows (q | k | v, cut at E' and 2E').
            out_in_segments, out_out_segments: segments of ``out_proj.weight``'s input and output axes.

        Raises:
            ValueError: an unsupported configuration (named), a non-zero skipped block, or sizes that do not match.
        """
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "PartialMultiheadAttention supports nn.MultiheadAttention with kdim = vdim = embed_dim, no bias_k / "
                f"bias_v and add_zero_attn=False; got _qkv_same_embed_dim={mha._qkv_same_embed_dim}, "
                f"bias_k={'set' if mha.bias_k is not None else None}, add_zero_attn={mha.add_zero_attn}"
            )
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        e = int(w.shape[1])
        if int(w.shape[0]) != 3 * e or sum(s for s, _ in in_proj_out_segments) != 3 * e:
            raise ValueError(f"in_proj_weight must be (3 * {e}, {e}) and its row segments cover {3 * e} rows")
        projs = []
        for j in range(3):
            rows = slice_segments(in_proj_out_segments, j * e, (j + 1) * e)
            bj = None if b is None else b.detach()[j * e : (j + 1) * e]
            projs.append(PartialLinear.from_dense(w[j * e : (j + 1) * e], bj, in_segments, rows))
        ob = mha.out_proj.bias
        out = PartialLinear.from_dense(
            mha.out_proj.weight.detach(), None if ob is None else ob.detach(), out_in_segments, out_out_segments
        )
        new = cls(*projs, out, mha.num_heads, batch_first=mha.batch_first, dropout=mha.dropout)
        new.train(mha.training)
        return new

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments for :func:`pyfusion.save` (the projections are saved as children)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PartialMultiheadAttention:
        """A module of :meth:`get_config`'s sizes with placeholder ``nn.Linear`` projections (:func:`pyfusion.load`
        then attaches the saved ones).

        Raises:
            ValueError: keys other than get_config's, or values of the wrong type.
        """
        want = {"embed_dim", "num_heads", "batch_first", "dropout"}
        if set(config) != want:
            raise ValueError(
                f"PartialMultiheadAttention config must have the keys {sorted(want)}; got {sorted(config)}"
            )
        e, h = config["embed_dim"], config["num_heads"]
        if type(e) is not int or type(h) is not int or e < 1 or not isinstance(config["batch_first"], bool):
            raise ValueError(f"PartialMultiheadAttention config has invalid values: {config}")
        p = config["dropout"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"PartialMultiheadAttention config 'dropout' must be in [0, 1]; got {p!r}")
        lin = [nn.Linear(e, e) for _ in range(4)]
        return cls(*lin, num_heads=h, batch_first=config["batch_first"], dropout=float(p))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: (attention output, attention weights or None)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:  # (T, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (T, B, E) from here, as F.multi_head_attention_forward
        t, bsz, e = query.shape
        s = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(t, bsz, h, d).permute(1, 2, 0, 3)  # (B, H, T, d)
        k = self.k_proj(key).reshape(s, bsz, h, d).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(s, bsz, h, d).permute(1, 2, 0, 3)
        mask = _merged_mask(attn_mask, key_padding_mask, bsz, h, t, s, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            o = torch.matmul(weights, v)
        else:
            weights = None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = self.out_proj(o.permute(2, 0, 1, 3).reshape(t, bsz, e))
        if weights is not None:
            # nn.MultiheadAttention returns the weights before dropout's rescaling only when p = 0; with dropout it
            # returns the dropped weights, as here
            weights = weights.mean(1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            return y.squeeze(1), weights
        return (y.transpose(0, 1) if self.batch_first else y), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not allowed) as an additive float mask; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _merged_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, bsz: int, h: int, t: int, s: int, dtype: torch.dtype
) -> Tensor | None:
    """attn_mask ((T, S) or (B * H, T, S)) and key_padding_mask ((B, S)) as one additive mask broadcastable to
    (B, H, T, S), as F.multi_head_attention_forward merges them."""
    out: Any = None
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        if m.dim() == 2:
            if tuple(m.shape) != (t, s):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(m.shape)}, but should be {(t, s)}.")
            out = m.reshape(1, 1, t, s)
        elif m.dim() == 3:
            if tuple(m.shape) != (bsz * h, t, s):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {tuple(m.shape)}, but should be {(bsz * h, t, s)}."
                )
            out = m.reshape(bsz, h, t, s)
        else:
            raise RuntimeError(f"attn_mask's dimension {m.dim()} is not supported")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, s):
            raise RuntimeError(
                f"expecting key_padding_mask shape of {(bsz, s)}, but got {tuple(key_padding_mask.shape)}"
            )
        kp = _additive(key_padding_mask, dtype).reshape(bsz, 1, 1, s)
        out = kp if out is None else out + kp
    return out


def _register_for_saving() -> None:
    from pyfusion.serialization import register_module

    register_module(PartialMultiheadAttention)


_register_for_saving()
