"""Drop-in modules for partially fused layers (DESIGN §7): only the allowed blocks are Parameters.

Layouts are ``[shared, branch_1, ..., branch_K]`` segment sizes on the features (linear) or channels
(conv). Shared outputs read every input segment; branch k outputs read the shared input and branch k's.

BatchNorm on slots: a fused network's BatchNorm layers need no special module. ``nn.BatchNorm1d/2d``
over ``O_total`` channels normalises every channel (slot) with its own statistics and affine parameters,
which is exactly "per slot"; shared slots and each branch's slots keep separate running statistics. So
``nn.Sequential(PartialConv2d(...), nn.BatchNorm2d(O_total), nn.ReLU())`` equals the dense
``Conv2d -> BatchNorm2d -> ReLU`` with the zero-block weight (tests check it in train and eval mode).

Serialization: the layouts (and the activation) are int64 buffers (``layout``, ``activation_id``), so a
``state_dict`` (also through safetensors) carries them; ``Module.from_state_dict(sd)`` rebuilds the same
module, and ``load_state_dict`` into a module of another layout raises a ValueError naming both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.ops.layout import ACTIVATIONS, block_shapes, pack_partial_weight, unpack_partial_weight, validate_layouts
from pyfusion.ops.partial_conv2d import partial_conv2d_module_forward
from pyfusion.ops.partial_conv2d.backends import conv_out_hw
from pyfusion.ops.partial_linear import partial_linear_module_forward

__all__ = ["PartialLinear", "PartialConv2d", "EnsembleLinear", "TorchScriptUnsupportedError"]

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _uniform_init_(t: Tensor, fan_in: int) -> None:
    # nn.Linear / nn.Conv2d default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        t.uniform_(-bound, bound)


class TorchScriptUnsupportedError(RuntimeError):
    """``torch.jit.script`` of a pyfusion.nn module: TorchScript cannot compile these modules (their forward calls
    the registered ``torch.ops.pyfusion`` ops through Python dispatch); export with ``torch.export.export`` (dynamic
    batch: ``dynamic_shapes``) or trace with ``torch.jit.trace``, both of which record the ops."""


def _refuse_scripting(module: nn.Module) -> None:
    raise TorchScriptUnsupportedError(
        f"torch.jit.script does not support {type(module).__name__} ({module.extra_repr()}). Export the model with "
        "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)) (the supported path: "
        "the ops are recorded as torch.ops.pyfusion.*, correct at every batch size), or torch.jit.trace(model, x); "
        "or script a copy whose pyfusion.nn modules are replaced by their .to_dense() equivalents (dense speed)."
    )


class _LayoutMixin:
    """Layout buffers in the state_dict and the checks on loading."""

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` on every submodule first: refuse with a clear error (see
        :class:`TorchScriptUnsupportedError`) instead of TorchScript's "Unknown type annotation"."""
        _refuse_scripting(self)  # type: ignore[arg-type]
        return self  # type: ignore[return-value]  # pragma: no cover

    in_layout: tuple[int, ...]
    out_layout: tuple[int, ...]

    def _register_layout(self, activation: str) -> None:
        self.register_buffer("layout", torch.tensor([self.in_layout, self.out_layout], dtype=torch.int64))
        self.register_buffer("activation_id", torch.tensor(ACTIVATIONS.index(activation), dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        key = prefix + "layout"
        if key in state_dict:
            stored = [list(map(int, row)) for row in state_dict[key].tolist()]
            mine = [list(self.in_layout), list(self.out_layout)]
            if stored != mine:
                raise ValueError(
                    f"state_dict[{key!r}] holds layouts in={stored[0]}, out={stored[1]}, but this "
                    f"{type(self).__name__} has in={mine[0]}, out={mine[1]}; build it with "
                    f"{type(self).__name__}.from_state_dict(state_dict)"
                )
        act_key = prefix + "activation_id"
        if act_key in state_dict and hasattr(self, "activation"):
            stored_act = ACTIVATIONS[int(state_dict[act_key])]
            if stored_act != self.activation:
                raise ValueError(
                    f"state_dict[{act_key!r}] is activation {stored_act!r}, this module has {self.activation!r}"
                )
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
        )

    @staticmethod
    def _layout_from_state_dict(state_dict: dict[str, Tensor], prefix: str) -> tuple[list[int], list[int], str]:
        if prefix + "layout" not in state_dict:
            raise ValueError(f"state_dict has no {prefix + 'layout'!r} entry (not saved from a pyfusion.nn module?)")
        lay = state_dict[prefix + "layout"].tolist()
        act = ACTIVATIONS[int(state_dict.get(prefix + "activation_id", torch.tensor(0)))]
        return [int(v) for v in lay[0]], [int(v) for v in lay[1]], act


class PartialLinear(_LayoutMixin, nn.Module):
    """Partially fused ``nn.Linear``: ``y = act(x W^T + b)`` with ``W`` zero outside the allowed blocks.

    Parameters (only the stored blocks, see :mod:`pyfusion.ops.layout`):
        weight_shared: (O_s, I_total) shared output rows; weight_cross: (O_B, I_s) branch rows on the
        shared input; weight_diag: (sum_k O_k I_k,) the K diagonal blocks (O_k, I_k) flattened and
        concatenated; bias: (O_total,) or None.

    Args:
        in_layout: ``[I_s, I_1, ..., I_K]``; out_layout: ``[O_s, O_1, ..., O_K]`` (K >= 1, sizes >= 0).
        bias: learn a bias.
        activation: None, "relu", "gelu" (exact erf) or "silu", fused into the op's epilogue.

    Shapes: x (..., I_total) -> (..., O_total). Fine-tuning never fills the zero blocks: they are not
    parameters, and the backward computes gradients of the stored blocks only.
    """

    def __init__(
        self,
        in_layout: Sequence[int],
        out_layout: Sequence[int],
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        il, ol = validate_layouts(in_layout, out_layout)
        act = "none" if activation is None else activation
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or None; got {activation!r}")
        self.in_layout, self.out_layout, self.activation = tuple(il), tuple(ol), act
        self._il, self._ol = il, ol  # lists, as the op's schema takes them
        self.in_features, self.out_features = sum(il), sum(ol)
        kw = {"device": device, "dtype": dtype}
        s_shape, c_shape, d_shape = block_shapes(il, ol)
        self.weight_shared = nn.Parameter(torch.empty(s_shape, **kw))
        self.weight_cross = nn.Parameter(torch.empty(c_shape, **kw))
        self.weight_diag = nn.Parameter(torch.empty(d_shape, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self._register_layout(act)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation with each row's effective fan-in (I_total or I_s + I_k)."""
        il, ol = self.in_layout, self.out_layout
        _uniform_init_(self.weight_shared, sum(il))
        d, c = 0, 0
        for o_k, i_k in zip(ol[1:], il[1:]):
            fan = il[0] + i_k
            _uniform_init_(self.weight_cross[c : c + o_k], fan)
            _uniform_init_(self.weight_diag[d : d + o_k * i_k], fan)
            c, d = c + o_k, d + o_k * i_k
        if self.bias is not None:
            _uniform_init_(self.bias[: ol[0]], sum(il))
            c = ol[0]
            for o_k, i_k in zip(ol[1:], il[1:]):
                _uniform_init_(self.bias[c : c + o_k], il[0] + i_k)
                c += o_k

    @property
    def weight_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.weight_shared, self.weight_cross, self.weight_diag

    def forward(self, x: Tensor) -> Tensor:
        # The parameters straight from _parameters: nn.Module.__getattr__ costs ~0.3-0.7 us per name, a sixth of
        # a batch-1 call of a 100-wide layer. Assigning or loading parameters (also torch.func.functional_call)
        # updates _parameters; anything that moves them elsewhere (torch.nn.utils.parametrize) takes getattr.
        p = self._parameters
        ws, wc, wd = p.get("weight_shared"), p.get("weight_cross"), p.get("weight_diag")
        if ws is None or wc is None or wd is None:
            ws, wc, wd = self.weight_shared, self.weight_cross, self.weight_diag
        bias = p["bias"] if "bias" in p else self.bias
        return partial_linear_module_forward(x, (ws, wc, wd), bias, self._il, self._ol, self.activation)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        in_layout: Sequence[int],
        out_layout: Sequence[int],
        activation: str | None = None,
    ) -> PartialLinear:
        """Pack a dense (O_total, I_total) weight whose skipped blocks are exactly zero.

        Raises:
            ValueError: if a skipped block (branch k output, branch j != k input) has a non-zero entry,
                or the shapes do not match the layouts.
        """
        blocks = pack_partial_weight(weight.detach(), in_layout, out_layout, check_zero=True)
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
        mod = cls(
            in_layout,
            out_layout,
            bias=bias is not None,
            activation=activation,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for p, b in zip(mod.weight_blocks, blocks):
                p.copy_(b)
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod

    def dense_weight(self) -> Tensor:
        """The (O_total, I_total) dense weight with zero blocks (differentiable)."""
        return unpack_partial_weight(*self.weight_blocks, self.in_layout, self.out_layout)

    def to_dense(self) -> nn.Module:
        """An equivalent plain ``nn.Linear`` (followed by the activation module when there is one)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight_shared.device,
            dtype=self.weight_shared.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin if self.activation == "none" else nn.Sequential(lin, _ACT_MODULES[self.activation]())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "") -> PartialLinear:
        """Rebuild the module (layouts, activation, bias or not) from its state_dict."""
        il, ol, act = cls._layout_from_state_dict(state_dict, prefix)
        w = state_dict[prefix + "weight_shared"]
        mod = cls(il, ol, bias=prefix + "bias" in state_dict, activation=act, device=w.device, dtype=w.dtype)
        mod.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return mod

    def effective_params(self) -> int:
        """Stored weights + biases."""
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        """Parameters of the equivalent dense nn.Linear (zero blocks included)."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    def effective_flops(self, batch: int) -> int:
        """Multiply-add FLOPs ``2 * batch * stored weights`` for ``batch`` input rows (all leading dims)."""
        return 2 * int(batch) * sum(w.numel() for w in self.weight_blocks)

    def extra_repr(self) -> str:
        return (
            f"in_layout={list(self.in_layout)}, out_layout={list(self.out_layout)}, bias={self.bias is not None}, "
            f"activation={self.activation}"
        )


class EnsembleLinear(nn.Module):
    """K stacked ``nn.Linear`` members run as one op: the alpha = 1 (nothing shared) partial layer.

    ``weight`` (K, O, I) and ``bias`` (K, O). With ``shared_input=False`` the input holds the members'
    inputs side by side, x (..., K*I) -> (..., K*O) (layouts ``[0, I, ..., I] -> [0, O, ..., O]``). With
    ``shared_input=True`` every member reads the same x (..., I) (a first layer), layouts
    ``[I, 0, ..., 0] -> [0, O, ..., O]``. Both call :func:`pyfusion.ops.partial_linear` on views of
    ``weight`` (no copies).
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        shared_input: bool = False,
        activation: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1; got {num_members}")
        k = int(num_members)
        self.num_members, self.in_features, self.out_features = k, int(in_features), int(out_features)
        self.shared_input = bool(shared_input)
        self.activation = "none" if activation is None else activation
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or None; got {activation!r}")
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(k, out_features, **kw)) if bias else None
        if shared_input:
            self.in_layout, self.out_layout = (in_features,) + (0,) * k, (0,) + (out_features,) * k
        else:
            self.in_layout, self.out_layout = (0,) + (in_features,) * k, (0,) + (out_features,) * k
        self._il, self._ol = list(self.in_layout), list(self.out_layout)
        _uniform_init_(self.weight, in_features)
        if self.bias is not None:
            _uniform_init_(self.bias, in_features)

    @classmethod
    def from_linears(
        cls, linears: Sequence[nn.Linear], shared_input: bool = False, activation: str | None = None
    ) -> EnsembleLinear:
        """Stack K ``nn.Linear`` of equal shapes (copies their weights)."""
        if len(linears) < 1:
            raise ValueError("linears must hold at least one nn.Linear")
        shapes = {tuple(lin.weight.shape) for lin in linears}
        if len(shapes) != 1:
            raise ValueError(f"linears must all have the same weight shape; got {sorted(shapes)}")
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) != 1:
            raise ValueError("linears must all have a bias or all have none")
        o, i = shapes.pop()
        w0 = linears[0].weight
        mod = cls(
            len(linears),
            i,
            o,
            bias=has_bias.pop(),
            shared_input=shared_input,
            activation=activation,
            device=w0.device,
            dtype=w0.dtype,
        )
        with torch.no_grad():
            mod.weight.copy_(torch.stack([lin.weight for lin in linears]))
            if mod.bias is not None:
                mod.bias.copy_(torch.stack([lin.bias for lin in linears]))
        return mod

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` is refused with a clear error (:class:`TorchScriptUnsupportedError`)."""
        _refuse_scripting(self)
        return self  # pragma: no cover

    def forward(self, x: Tensor) -> Tensor:
        k, o, i = self.weight.shape
        flat = self.weight.reshape(k * o * i)
        if self.shared_input:
            blocks = (self.weight.new_empty((0, i)), self.weight.reshape(k * o, i), flat[:0])
        else:
            blocks = (self.weight.new_empty((0, k * i)), self.weight.new_empty((k * o, 0)), flat)
        b = None if self.bias is None else self.bias.reshape(k * o)
        return partial_linear_module_forward(x, blocks, b, self._il, self._ol, self.activation)

    def effective_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        """Parameters of the equivalent dense nn.Linear over the concatenated features."""
        i_tot, o_tot = sum(self.in_layout), sum(self.out_layout)
        return o_tot * i_tot + (o_tot if self.bias is not None else 0)

    def effective_flops(self, batch: int) -> int:
        return 2 * int(batch) * self.weight.numel()

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, shared_input={self.shared_input}, activation={self.activation}"
        )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PartialConv2d(_LayoutMixin, nn.Module):
    """Partially fused ``nn.Conv2d``: the same layout semantics on channels.

    ``y[:, shared] = conv(x, weight_shared)`` (all input channels), and
    ``y[:, branches] = conv(x[:, shared], weight_cross) + grouped_conv(x[:, branches], weight_diag, groups=K)``
    (one grouped convolution when the branches have equal sizes, one per branch otherwise): the op
    :func:`pyfusion.ops.partial_conv2d`.

    Parameters: weight_shared (O_s, I_total, kh, kw); weight_cross (O_B, I_s, kh, kw); weight_diag
    (sum_k O_k I_k kh kw,) the K blocks (O_k, I_k, kh, kw) flattened and concatenated; bias (O_total,).
    Shapes: x (N, I_total, H, W) -> (N, O_total, H', W') as nn.Conv2d with the same stride/padding/dilation.
    """

    def __init__(
        self,
        in_layout: Sequence[int],
        out_layout: Sequence[int],
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        il, ol = validate_layouts(in_layout, out_layout)
        self.in_layout, self.out_layout, self.activation = tuple(il), tuple(ol), "none"
        self.in_channels, self.out_channels = sum(il), sum(ol)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self._il, self._ol = il, ol  # lists, as the op's schema takes them
        self._conv_args = (list(self.stride), list(self.padding), list(self.dilation))
        kh, kw = self.kernel_size
        kwargs = {"device": device, "dtype": dtype}
        (o_s, i_tot), (o_b, i_s), (n_diag,) = block_shapes(il, ol)
        self.weight_shared = nn.Parameter(torch.empty(o_s, i_tot, kh, kw, **kwargs))
        self.weight_cross = nn.Parameter(torch.empty(o_b, i_s, kh, kw, **kwargs))
        self.weight_diag = nn.Parameter(torch.empty(n_diag * kh * kw, **kwargs))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kwargs)) if bias else None
        self._register_layout("none")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        il, ol = self.in_layout, self.out_layout
        area = self.kernel_size[0] * self.kernel_size[1]
        _uniform_init_(self.weight_shared, sum(il) * area)
        c, d = 0, 0
        for o_k, i_k in zip(ol[1:], il[1:]):
            fan = (il[0] + i_k) * area
            _uniform_init_(self.weight_cross[c : c + o_k], fan)
            _uniform_init_(self.weight_diag[d : d + o_k * i_k * area], fan)
            c, d = c + o_k, d + o_k * i_k * area
        if self.bias is not None:
            _uniform_init_(self.bias[: ol[0]], sum(il) * area)
            c = ol[0]
            for o_k, i_k in zip(ol[1:], il[1:]):
                _uniform_init_(self.bias[c : c + o_k], (il[0] + i_k) * area)
                c += o_k

    def forward(self, x: Tensor) -> Tensor:
        p = self._parameters  # as PartialLinear.forward: _parameters first, getattr for parametrized modules
        ws, wc, wd = p.get("weight_shared"), p.get("weight_cross"), p.get("weight_diag")
        if ws is None or wc is None or wd is None:
            ws, wc, wd = self.weight_shared, self.weight_cross, self.weight_diag
        bias = p["bias"] if "bias" in p else self.bias
        return partial_conv2d_module_forward(x, (ws, wc, wd), bias, self._il, self._ol, *self._conv_args)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        in_layout: Sequence[int],
        out_layout: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
    ) -> PartialConv2d:
        """Pack a dense (O_total, I_total, kh, kw) conv weight whose skipped blocks are exactly zero.

        Raises:
            ValueError: if a skipped (branch k output, branch j != k input) block is non-zero or shapes differ.
        """
        if weight.dim() != 4:
            raise ValueError(f"weight must have shape (O, I, kh, kw); got {tuple(weight.shape)}")
        o, i, kh, kw = weight.shape
        # Pack per kernel tap as a linear weight (O, I * kh * kw would mix taps with channels): move taps last.
        w2 = weight.detach().permute(2, 3, 0, 1).reshape(kh * kw, o, i)
        packed = [pack_partial_weight(w2[t], in_layout, out_layout, check_zero=True) for t in range(kh * kw)]
        mod = cls(
            in_layout,
            out_layout,
            (kh, kw),
            stride,
            padding,
            dilation,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        il, ol = mod.in_layout, mod.out_layout
        with torch.no_grad():
            mod.weight_shared.copy_(torch.stack([p[0] for p in packed], -1).view_as(mod.weight_shared))
            mod.weight_cross.copy_(torch.stack([p[1] for p in packed], -1).view_as(mod.weight_cross))
            # Diagonal blocks: (O_k, I_k) per tap -> (O_k, I_k, kh, kw) per branch, concatenated.
            d, parts = 0, []
            for o_k, i_k in zip(ol[1:], il[1:]):
                parts.append(torch.stack([p[2][d : d + o_k * i_k] for p in packed], -1).reshape(-1))
                d += o_k * i_k
            if parts:
                mod.weight_diag.copy_(torch.cat(parts))
            if bias is not None:
                if tuple(bias.shape) != (o,):
                    raise ValueError(f"bias must have shape ({o},); got {tuple(bias.shape)}")
                mod.bias.copy_(bias.detach())
        return mod

    def dense_weight(self) -> Tensor:
        """The (O_total, I_total, kh, kw) dense weight with zero blocks."""
        kh, kw = self.kernel_size
        area = kh * kw
        il, ol = self.in_layout, self.out_layout
        w = self.weight_shared.new_zeros(self.out_channels, self.in_channels, kh, kw)
        w[: ol[0]] = self.weight_shared
        w[ol[0] :, : il[0]] = self.weight_cross
        r, c, d = ol[0], il[0], 0
        for o_k, i_k in zip(ol[1:], il[1:]):
            w[r : r + o_k, c : c + i_k] = self.weight_diag[d : d + o_k * i_k * area].view(o_k, i_k, kh, kw)
            r, c, d = r + o_k, c + i_k, d + o_k * i_k * area
        return w

    def to_dense(self) -> nn.Conv2d:
        """An equivalent plain ``nn.Conv2d`` with zero blocks."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.weight_shared.device,
            dtype=self.weight_shared.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        prefix: str = "",
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
    ) -> PartialConv2d:
        """Rebuild from a state_dict (layouts and kernel size come from it; stride/padding/dilation are
        hyper-parameters of the forward, not stored, as for nn.Conv2d)."""
        il, ol, _ = cls._layout_from_state_dict(state_dict, prefix)
        w = state_dict[prefix + "weight_shared"]
        kh, kw = int(w.shape[2]), int(w.shape[3])
        mod = cls(
            il,
            ol,
            (kh, kw),
            stride,
            padding,
            dilation,
            bias=prefix + "bias" in state_dict,
            device=w.device,
            dtype=w.dtype,
        )
        mod.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return mod

    def effective_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        kh, kw = self.kernel_size
        n = self.out_channels * self.in_channels * kh * kw
        return n + (self.out_channels if self.bias is not None else 0)

    def effective_flops(self, batch: int, input_size: Sequence[int] | None = None) -> int:
        """Multiply-add FLOPs ``2 * batch * H' * W' * stored weights`` for inputs of spatial size
        ``input_size`` = (H, W) (required: a convolution's cost depends on it)."""
        if input_size is None:
            raise ValueError("input_size=(H, W) is required for a convolution's FLOPs")
        ho, wo = self._out_hw(int(input_size[0]), int(input_size[1]))
        stored = self.weight_shared.numel() + self.weight_cross.numel() + self.weight_diag.numel()
        return 2 * int(batch) * ho * wo * stored

    def extra_repr(self) -> str:
        return (
            f"in_layout={list(self.in_layout)}, out_layout={list(self.out_layout)}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
