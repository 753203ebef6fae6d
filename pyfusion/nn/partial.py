"""Drop-in modules for partially fused layers (DESIGN §7): only the blocks whose member masks intersect are stored.

Segments (:mod:`pyfusion.ops.layout`): the input and output features (channels) are cut into ``[(size,
member_mask), ...]``; block (output segment o, input segment i) is a parameter iff ``mask_o & mask_i != 0``. A
standard layout ``[shared, branch_1, ..., branch_K]`` (plain ints) means masks ``[all, 1 << 0, ..., 1 << (K-1)]``.
The one parameter ``weight`` is the packed flat weight: ``W_o`` (O_o, K_o) per output segment, concatenated
(:meth:`PartialLinear.block` views one).

BatchNorm on slots: a fused network's BatchNorm layers need no special module. ``nn.BatchNorm1d/2d`` over
``O_total`` channels normalises every channel (slot) with its own statistics and affine parameters, which is
exactly "per slot"; so ``nn.Sequential(PartialConv2d(...), nn.BatchNorm2d(O_total), nn.ReLU())`` equals the dense
``Conv2d -> BatchNorm2d -> ReLU`` with the zero-block weight (tests check it in train and eval mode).

Serialization: the segments (and the activation) are int64 buffers (``layout_in``, ``layout_out``: (S, 2) rows
``[size, mask]``; ``activation_id``), so a ``state_dict`` (also through safetensors) carries them;
``Module.from_state_dict(sd)`` rebuilds the same module, and ``load_state_dict`` into a module of other segments
raises a ValueError naming both. State dicts of the earlier 3-buffer format (``weight_shared``, ``weight_cross``,
``weight_diag`` and a ``layout`` buffer) load into the module of the same standard layout (converted on loading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyfusion.ops._weight_cache import track
from pyfusion.ops.layout import (
    ACTIVATIONS,
    Segments,
    as_segments,
    layout_of_segments,
    pack_segment_weight,
    segment_plan,
    segments_from_layout,
    unpack_segment_weight,
)
from pyfusion.ops.partial_conv2d import conv_geom, partial_conv2d_module_forward
from pyfusion.ops.partial_conv2d.backends import conv_out_hw
from pyfusion.ops.partial_linear import partial_linear_module_forward

__all__ = ["PartialLinear", "PartialConv1d", "PartialConv2d", "EnsembleLinear", "TorchScriptUnsupportedError"]

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _adopt(param: nn.Parameter, packed: Tensor) -> None:
    """Give ``param`` the values of ``packed``, a tensor :func:`pack_segment_weight` just allocated: its storage is
    taken over when shape, dtype and device agree (a copy of every packed weight was ~10% of a VGG11 pair's partial
    fusion), else copied."""
    if packed.shape == param.shape and packed.dtype == param.dtype and packed.device == param.device:
        param.data = packed
    else:
        param.copy_(packed)


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


def _segments_tensor(segs: Segments) -> Tensor:
    return torch.tensor([list(s) for s in segs], dtype=torch.int64).reshape(len(segs), 2)


def _activation_name(activation: str | None) -> str:
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None; got {activation!r}")
    return act


class _TrackedParameters:
    """The ``weight`` registered on these modules (built, or assigned later) is made a
    :class:`~pyfusion.ops._weight_cache.TrackedParameter` at once, so that even a ``.data`` alias taken before the
    first forward shares its version counter: the ops' cached derived weights then see every write. The bias stays
    a plain nn.Parameter until an op derives a copy of it (the convolution's ``members`` strategy: the op tracks
    it then): each op or attribute read on a Parameter subclass costs more (F.linear with a subclass bias
    +0.44 us, ``.data_ptr()`` +0.08 us: 1 thread, Xeon VM), and the batch-1 strategies read the bias as it is
    (tracking it too made a 100-wide batch-1 call 5.7 -> 6.8 us, the weight alone 5.7-5.9 -> 5.8-6.1 us)."""

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if name == "weight":
            track(param)
        super().register_parameter(name, param)  # type: ignore[misc]


class _SegmentedMixin(_TrackedParameters):
    """Segment buffers in the state_dict, the checks on loading, the conversion of 3-buffer state dicts."""

    in_segments: Segments
    out_segments: Segments
    activation: str
    _taps_shape: tuple[int, ...] = ()

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` on every submodule first: refuse with a clear error (see
        :class:`TorchScriptUnsupportedError`) instead of TorchScript's "Unknown type annotation"."""
        _refuse_scripting(self)  # type: ignore[arg-type]
        return self  # type: ignore[return-value]  # pragma: no cover

    def _init_segments(self, in_segments: Any, out_segments: Any, activation: str | None) -> None:
        ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
        self.in_segments, self.out_segments = ins, outs
        self.activation = _activation_name(activation)
        self._plan = segment_plan(ins, outs)

    def _register_segments(self) -> None:
        self.register_buffer("layout_in", _segments_tensor(self.in_segments))  # type: ignore[attr-defined]
        self.register_buffer("layout_out", _segments_tensor(self.out_segments))  # type: ignore[attr-defined]
        self.register_buffer(  # type: ignore[attr-defined]
            "activation_id", torch.tensor(ACTIVATIONS.index(self.activation), dtype=torch.int64)
        )

    @property
    def in_layout(self) -> tuple[int, ...] | None:
        """The standard layout ``(shared, branch_1, ..., branch_K)`` of the input segments, or None."""
        return layout_of_segments(self.in_segments)

    @property
    def out_layout(self) -> tuple[int, ...] | None:
        """The standard layout of the output segments, or None."""
        return layout_of_segments(self.out_segments)

    def block(self, o: int) -> Tensor:
        """View of ``W_o``, output segment o's rows on its allowed input columns: (O_o, K_o, *kernel)."""
        plan = self._plan
        taps = math.prod(self._taps_shape)
        off = plan.offsets[o] * taps
        n = plan.out_segments[o][0] * plan.k_of_out[o] * taps
        return self.weight[off : off + n].view(plan.out_segments[o][0], plan.k_of_out[o], *self._taps_shape)  # type: ignore[attr-defined]

    # ---- saving (pyfusion.save / load: the constructor arguments as JSON) ----
    _CONFIG_EXTRA: tuple[str, ...] = ()

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable (:func:`pyfusion.serialization.register_module`): segments
        as ``[[size, member_mask], ...]`` (every layout, member subsets of K >= 3 included), bias, activation, and
        a convolution's kernel / stride / padding / dilation."""
        cfg: dict[str, Any] = {
            "in_segments": [list(s) for s in self.in_segments],
            "out_segments": [list(s) for s in self.out_segments],
            "bias": self.bias is not None,  # type: ignore[attr-defined]
            "activation": None if self.activation == "none" else self.activation,
        }
        for name in self._CONFIG_EXTRA:
            cfg[name] = list(getattr(self, name))
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> nn.Module:
        """Build from :meth:`get_config`'s dict (files of the earlier format, with standard ``in_layout`` /
        ``out_layout`` lists, too).

        Raises:
            ValueError: a key the config does not have, a missing key, or a value of the wrong type.
        """
        cfg = dict(config)
        for new, old in (("in_segments", "in_layout"), ("out_segments", "out_layout")):
            if old in cfg and new not in cfg:
                cfg[new] = cfg.pop(old)
        want = {"in_segments", "out_segments", "bias", "activation", *cls._CONFIG_EXTRA}
        if set(cfg) != want:
            raise ValueError(
                f"{cls.__name__} config must have the keys {sorted(want)}; got {sorted(config)} "
                f"(unexpected {sorted(set(cfg) - want)}, missing {sorted(want - set(cfg))})"
            )
        if not isinstance(cfg["bias"], bool):
            raise ValueError(f"{cls.__name__} config 'bias' must be a bool; got {cfg['bias']!r}")
        if cfg["activation"] is not None and not isinstance(cfg["activation"], str):
            raise ValueError(f"{cls.__name__} config 'activation' must be a string or None; got {cfg['activation']!r}")
        for name in ("in_segments", "out_segments", *cls._CONFIG_EXTRA):
            v = cfg[name]
            items = v if isinstance(v, list) else [v]
            flat = [u for item in items for u in (item if isinstance(item, list) else [item])]
            if not isinstance(v, list) or not all(type(u) is int for u in flat):
                raise ValueError(f"{cls.__name__} config {name!r} must be a list of ints / int pairs; got {v!r}")
        extra = {name: tuple(cfg[name]) for name in cls._CONFIG_EXTRA}
        return cls(cfg["in_segments"], cfg["out_segments"], bias=cfg["bias"], activation=cfg["activation"], **extra)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        legacy = prefix + "weight_shared" in state_dict and prefix + "weight" not in state_dict
        if legacy:
            _convert_legacy(self, state_dict, prefix)
        mine = [list(self.in_segments), list(self.out_segments)]
        for side, key in enumerate((prefix + "layout_in", prefix + "layout_out")):
            if key in state_dict:
                stored = [tuple(int(v) for v in row) for row in state_dict[key].reshape(-1, 2).tolist()]
                if stored != [tuple(s) for s in mine[side]]:
                    raise ValueError(
                        f"state_dict[{key!r}] holds segments {stored}, but this {type(self).__name__} has "
                        f"{mine[side]}; build it with {type(self).__name__}.from_state_dict(state_dict)"
                    )
        act_key = prefix + "activation_id"
        if act_key in state_dict:
            stored_act = ACTIVATIONS[int(state_dict[act_key])]
            if stored_act != self.activation:
                raise ValueError(
                    f"state_dict[{act_key!r}] is activation {stored_act!r}, this module has {self.activation!r}"
                )
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs
        )

    @staticmethod
    def _segments_from_state_dict(state_dict: dict[str, Tensor], prefix: str) -> tuple[Segments, Segments, str]:
        act = ACTIVATIONS[int(state_dict.get(prefix + "activation_id", torch.tensor(0)))]
        if prefix + "layout_in" in state_dict and prefix + "layout_out" in state_dict:
            ins = tuple(tuple(int(v) for v in r) for r in state_dict[prefix + "layout_in"].reshape(-1, 2).tolist())
            outs = tuple(tuple(int(v) for v in r) for r in state_dict[prefix + "layout_out"].reshape(-1, 2).tolist())
            return ins, outs, act  # type: ignore[return-value]
        if prefix + "layout" in state_dict:  # the earlier 3-buffer format
            lay = state_dict[prefix + "layout"].tolist()
            return segments_from_layout(lay[0]), segments_from_layout(lay[1]), act
        raise ValueError(
            f"state_dict has no {prefix + 'layout_in'!r} / {prefix + 'layout_out'!r} entries (not saved from a "
            "pyfusion.nn module?)"
        )


def _convert_legacy(mod: _SegmentedMixin, state_dict: dict[str, Tensor], prefix: str) -> None:
    """Rewrite a 3-buffer state dict (``weight_shared`` (O_s, I_total, *k), ``weight_cross`` (O_B, I_s, *k),
    ``weight_diag`` flat, ``layout`` (2, K+1)) into this module's packed ``weight`` (in place in ``state_dict``)."""
    lay = state_dict.pop(prefix + "layout").tolist() if prefix + "layout" in state_dict else None
    if lay is None or mod.in_layout is None or [list(mod.in_layout), list(mod.out_layout)] != lay:
        raise ValueError(
            f"state_dict[{prefix!r}...] is in the 3-buffer format with layouts {lay}; this {type(mod).__name__} has "
            f"segments in={list(mod.in_segments)}, out={list(mod.out_segments)}"
        )
    il, ol = lay
    ws, wc, wd = (state_dict.pop(prefix + n) for n in ("weight_shared", "weight_cross", "weight_diag"))
    taps = tuple(ws.shape[2:])
    t = math.prod(taps)
    rows = [ws.reshape(ol[0], -1)]
    c, d = 0, 0
    for o_k, i_k in zip(ol[1:], il[1:]):
        cross = wc[c : c + o_k].reshape(o_k, il[0], t)
        diag = wd[d : d + o_k * i_k * t].reshape(o_k, i_k, t)
        rows.append(torch.cat([cross, diag], dim=1).reshape(o_k, -1))
        c, d = c + o_k, d + o_k * i_k * t
    state_dict[prefix + "weight"] = torch.cat([r.reshape(-1) for r in rows])
    state_dict.setdefault(prefix + "layout_in", _segments_tensor(mod.in_segments))
    state_dict.setdefault(prefix + "layout_out", _segments_tensor(mod.out_segments))


class PartialLinear(_SegmentedMixin, nn.Module):
    """Partially fused ``nn.Linear``: ``y = act(x W^T + b)`` with ``W`` zero outside the blocks whose member masks
    intersect.

    Args:
        in_segments: ``[(size, member_mask), ...]`` of the input features, or a standard layout
            ``[I_s, I_1, ..., I_K]``.
        out_segments: the same for the outputs.
        bias: learn a bias.
        activation: None, "relu", "gelu" (exact erf) or "silu", fused into the op's epilogue.

    Parameters:
        weight: (stored,) the packed blocks (:mod:`pyfusion.ops.layout`); bias: (O_total,) or None.

    Shapes: x (..., I_total) -> (..., O_total). Fine-tuning never fills the zero blocks: they are not parameters,
    and the backward computes gradients of the stored blocks only.
    """

    def __init__(
        self,
        in_segments: Any,
        out_segments: Any,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_segments(in_segments, out_segments, activation)
        self.in_features, self.out_features = self._plan.i_total, self._plan.o_total
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self._plan.stored, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self._register_segments()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation with each row's effective fan-in K_o."""
        plan = self._plan
        for o, (n_o, _m) in enumerate(self.out_segments):
            lo, hi = plan.out_starts[o], plan.out_starts[o] + n_o
            _uniform_init_(self.weight[plan.offsets[o] : plan.offsets[o + 1]], plan.k_of_out[o])
            if self.bias is not None:
                _uniform_init_(self.bias[lo:hi], plan.k_of_out[o])

    def forward(self, x: Tensor) -> Tensor:
        # The parameters straight from _parameters: nn.Module.__getattr__ costs ~0.3-0.7 us per name, a sixth of
        # a batch-1 call of a 100-wide layer. Assigning or loading parameters (also torch.func.functional_call)
        # updates _parameters; anything that moves them elsewhere (torch.nn.utils.parametrize) takes getattr.
        p = self._parameters
        w = p.get("weight")
        if w is None:
            w = self.weight
        bias = p["bias"] if "bias" in p else self.bias
        return partial_linear_module_forward(x, w, bias, self._plan, self.activation)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        in_segments: Any,
        out_segments: Any,
        activation: str | None = None,
    ) -> PartialLinear:
        """Pack a dense (O_total, I_total) weight whose skipped blocks (masks not intersecting) are exactly zero.

        Raises:
            ValueError: a skipped block holds a non-zero entry (named by segment), or the shapes do not match.
        """
        ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
        if weight.dim() != 2:
            raise ValueError(f"weight must be a (O_total, I_total) matrix; got shape {tuple(weight.shape)}")
        packed = pack_segment_weight(weight.detach(), ins, outs, check_zero=True)
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
        mod = torch.nn.utils.skip_init(
            cls, ins, outs, bias=bias is not None, activation=activation, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            _adopt(mod.weight, packed)
            if bias is not None:
                mod.bias.copy_(bias.detach())
            mod._reset_buffers()
        return mod

    @classmethod
    def from_segments(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        in_segments: Any,
        out_segments: Any,
        activation: str | None = None,
    ) -> PartialLinear:
        """:meth:`from_dense` with member-mask segments ``[(size, member_mask), ...]`` on both sides."""
        return cls.from_dense(weight, bias, in_segments, out_segments, activation)

    def _reset_buffers(self) -> None:
        # skip_init leaves buffers uninitialised
        self.layout_in.copy_(_segments_tensor(self.in_segments))
        self.layout_out.copy_(_segments_tensor(self.out_segments))
        self.activation_id.fill_(ACTIVATIONS.index(self.activation))

    def dense_weight(self) -> Tensor:
        """The (O_total, I_total) dense weight with zero blocks (differentiable)."""
        return unpack_segment_weight(self.weight, self.in_segments, self.out_segments)

    def to_dense(self) -> nn.Module:
        """An equivalent plain ``nn.Linear`` (followed by the activation module when there is one)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin if self.activation == "none" else nn.Sequential(lin, _ACT_MODULES[self.activation]())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "") -> PartialLinear:
        """Rebuild the module (segments, activation, bias or not) from its state_dict."""
        ins, outs, act = cls._segments_from_state_dict(state_dict, prefix)
        w = state_dict.get(prefix + "weight", state_dict.get(prefix + "weight_shared"))
        mod = cls(ins, outs, bias=prefix + "bias" in state_dict, activation=act, device=w.device, dtype=w.dtype)
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
        return 2 * int(batch) * self.weight.numel()

    def extra_repr(self) -> str:
        lay_in, lay_out = self.in_layout, self.out_layout
        if lay_in is not None and lay_out is not None:
            what = f"in_layout={list(lay_in)}, out_layout={list(lay_out)}"
        else:
            what = f"in_segments={list(self.in_segments)}, out_segments={list(self.out_segments)}"
        return f"{what}, bias={self.bias is not None}, activation={self.activation}"


class EnsembleLinear(_TrackedParameters, nn.Module):
    """K stacked ``nn.Linear`` members run as one op: the alpha = 1 (nothing shared) partial layer.

    ``weight`` (K, O, I) and ``bias`` (K, O). With ``shared_input=False`` the input holds the members'
    inputs side by side, x (..., K*I) -> (..., K*O) (segments ``[(I, 1 << k)] -> [(O, 1 << k)]``). With
    ``shared_input=True`` every member reads the same x (..., I) (a first layer), segments ``[(I, all)] ->
    [(O, 1 << k)]``. Both call :func:`pyfusion.ops.partial_linear` on ``weight.reshape(-1)``, which is exactly the
    packed weight of these segments (no copies).
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
        self.activation = _activation_name(activation)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(k, out_features, **kw)) if bias else None
        if shared_input:
            self.in_segments: Segments = ((int(in_features), (1 << k) - 1),)
        else:
            self.in_segments = tuple((int(in_features), 1 << j) for j in range(k))
        self.out_segments: Segments = tuple((int(out_features), 1 << j) for j in range(k))
        self._plan = segment_plan(self.in_segments, self.out_segments)
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
        mod = cls(len(linears), i, o, bias=has_bias.pop(), shared_input=shared_input, activation=activation,
                  device=w0.device, dtype=w0.dtype)  # fmt: skip
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
        b = None if self.bias is None else self.bias.reshape(-1)
        return partial_linear_module_forward(x, self.weight.reshape(-1), b, self._plan, self.activation, hot=False)

    def effective_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        """Parameters of the equivalent dense nn.Linear over the concatenated features."""
        i_tot, o_tot = self._plan.i_total, self._plan.o_total
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


class PartialConv2d(_SegmentedMixin, nn.Module):
    """Partially fused ``nn.Conv2d``: the same segment semantics on channels.

    ``y[:, o] = act(b_o + sum_{i: mask_o & mask_i != 0} W_oi * x[:, i])``: the op :func:`pyfusion.ops.partial_conv2d`
    (on CPU the fastest, measured on the layer's first call, of one convolution per run of output segments that
    read the same input channels, shared + grouped convolution, K member-shaped convolutions, the unfolded input +
    GEMMs (small batches) and the dense zero-block weight, run from one lookup on repeat calls; one implicit-GEMM
    Triton launch on CUDA).

    Parameters: weight (stored * kh * kw,): per output segment ``W_o`` (O_o, K_o, kh, kw), concatenated; bias
    (O_total,). Shapes: x (N, I_total, H, W) -> (N, O_total, H', W') as nn.Conv2d with the same
    stride / padding / dilation (zero padding, groups = 1).
    """

    _CONFIG_EXTRA = ("kernel_size", "stride", "padding", "dilation")
    _DENSE: type[nn.Module] = nn.Conv2d  # the plain layer of to_dense
    _WEIGHT_DIMS, _WEIGHT_SHAPE = 4, "(O, I, kh, kw)"

    def __init__(
        self,
        in_segments: Any,
        out_segments: Any,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_segments(in_segments, out_segments, activation)
        self._geom = conv_geom(kernel_size, stride, padding, dilation)
        self.kernel_size, self.stride = self._geom.kernel, self._geom.stride
        self.padding, self.dilation = self._geom.padding, self._geom.dilation
        self._taps_shape = self.kernel_size
        self.in_channels, self.out_channels = self._plan.i_total, self._plan.o_total
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self._plan.stored * self._geom.taps, **kwargs))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kwargs)) if bias else None
        self._register_segments()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        plan, taps = self._plan, self._geom.taps
        for o, (n_o, _m) in enumerate(self.out_segments):
            fan = plan.k_of_out[o] * taps
            _uniform_init_(self.weight[plan.offsets[o] * taps : plan.offsets[o + 1] * taps], fan)
            if self.bias is not None:
                _uniform_init_(self.bias[plan.out_starts[o] : plan.out_starts[o] + n_o], fan)

    def forward(self, x: Tensor) -> Tensor:
        p = self._parameters  # as PartialLinear.forward: _parameters first, getattr for parametrized modules
        w = p.get("weight")
        if w is None:
            w = self.weight
        bias = p["bias"] if "bias" in p else self.bias
        return partial_conv2d_module_forward(x, w, bias, self._plan, self._geom, self.activation)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        in_segments: Any,
        out_segments: Any,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        activation: str | None = None,
    ) -> PartialConv2d:
        """Pack a dense (O_total, I_total, kh, kw) conv weight (PartialConv1d: (O_total, I_total, k)) whose skipped
        blocks are exactly zero.

        Raises:
            ValueError: a skipped block (masks not intersecting) is non-zero (named by segment), or shapes differ.
        """
        if weight.dim() != cls._WEIGHT_DIMS:
            raise ValueError(f"weight must have shape {cls._WEIGHT_SHAPE}; got {tuple(weight.shape)}")
        ins, outs = as_segments(in_segments, "in_segments"), as_segments(out_segments, "out_segments")
        packed = pack_segment_weight(weight.detach(), ins, outs, check_zero=True)
        o = weight.shape[0]
        if bias is not None and tuple(bias.shape) != (o,):
            raise ValueError(f"bias must have shape ({o},); got {tuple(bias.shape)}")
        kernel = tuple(int(v) for v in weight.shape[2:])
        mod = torch.nn.utils.skip_init(cls, ins, outs, kernel, stride, padding, dilation, bias=bias is not None,
                                       activation=activation, device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            _adopt(mod.weight, packed)
            if bias is not None:
                mod.bias.copy_(bias.detach())
            mod._reset_buffers()
        return mod

    @classmethod
    def from_segments(cls, weight: Tensor, bias: Tensor | None, in_segments: Any, out_segments: Any,
                      **conv: Any) -> PartialConv2d:  # fmt: skip
        """:meth:`from_dense` with member-mask segments on both sides (``conv``: stride, padding, dilation,
        activation)."""
        return cls.from_dense(weight, bias, in_segments, out_segments, **conv)

    _reset_buffers = PartialLinear._reset_buffers

    def dense_weight(self) -> Tensor:
        """The (O_total, I_total, kh, kw) dense weight with zero blocks (PartialConv1d: (O_total, I_total, k))."""
        return unpack_segment_weight(self.weight, self.in_segments, self.out_segments, self.kernel_size)

    def to_dense(self) -> nn.Module:
        """An equivalent plain ``nn.Conv2d`` (``nn.Conv1d``) with zero blocks (followed by the activation module when
        there is one)."""
        conv = self._DENSE(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv if self.activation == "none" else nn.Sequential(conv, _ACT_MODULES[self.activation]())

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        prefix: str = "",
        kernel_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
    ) -> PartialConv2d:
        """Rebuild from a state_dict (segments and activation come from it; the kernel size too when the state dict
        is in the earlier 3-buffer format, else pass ``kernel_size``; stride/padding/dilation are hyper-parameters
        of the forward, not stored, as for nn.Conv2d).

        Raises:
            ValueError: ``kernel_size`` missing and not in the state dict, or it does not match the weight size.
        """
        ins, outs, act = cls._segments_from_state_dict(state_dict, prefix)
        if prefix + "weight_shared" in state_dict:
            ks = tuple(int(v) for v in state_dict[prefix + "weight_shared"].shape[2:])
            w = state_dict[prefix + "weight_shared"]
        else:
            if kernel_size is None:
                raise ValueError("kernel_size is required: the packed weight does not record it")
            ks = _pair(kernel_size)
            w = state_dict[prefix + "weight"]
            stored = segment_plan(ins, outs).stored
            if w.numel() != stored * ks[0] * ks[1]:
                raise ValueError(
                    f"state_dict[{prefix + 'weight'!r}] has {w.numel()} entries; kernel {ks} with these segments "
                    f"needs {stored * ks[0] * ks[1]}"
                )
        mod = cls(ins, outs, ks, stride, padding, dilation, bias=prefix + "bias" in state_dict, activation=act,
                  device=w.device, dtype=w.dtype)  # fmt: skip
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
        return 2 * int(batch) * ho * wo * self.weight.numel()

    def extra_repr(self) -> str:
        lay_in, lay_out = self.in_layout, self.out_layout
        if lay_in is not None and lay_out is not None:
            what = f"in_layout={list(lay_in)}, out_layout={list(lay_out)}"
        else:
            what = f"in_segments={list(self.in_segments)}, out_segments={list(self.out_segments)}"
        return (
            f"{what}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, bias={self.bias is not None}, activation={self.activation}"
        )


def _single(v: int | Sequence[int], name: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, Sequence) and len(v) == 1 and isinstance(v[0], int) and not isinstance(v[0], bool):
        return int(v[0])
    raise ValueError(f"{name} must be an int or a 1-tuple for a 1-D convolution; got {v!r}")


class PartialConv1d(PartialConv2d):
    """Partially fused ``nn.Conv1d`` (Whisper's and wav2vec2's input convolutions, 1-D CNNs on sequences): the same
    segment semantics on channels, ``y[:, o] = act(b_o + sum_{i: mask_o & mask_i != 0} W_oi * x[:, i])``.

    A 1-D convolution is the 2-D one over a height-1 map with a ``(1, k)`` kernel, so this runs
    :func:`pyfusion.ops.partial_conv2d` on ``x.unsqueeze(-2)`` (its strategies, measured on the first call, and its
    backends), with no op of its own: the packed weight has the same layout, ``k`` taps per block entry.

    Parameters: weight (stored * k,): per output segment ``W_o`` (O_o, K_o, k), concatenated; bias (O_total,).
    Shapes: x (N, I_total, L) or (I_total, L) -> (N, O_total, L') / (O_total, L') as nn.Conv1d with the same
    stride / padding / dilation (zero padding, groups = 1).
    """

    _DENSE = nn.Conv1d
    _WEIGHT_DIMS, _WEIGHT_SHAPE = 3, "(O, I, k)"

    def __init__(
        self,
        in_segments: Any,
        out_segments: Any,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        activation: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        k, st = _single(kernel_size, "kernel_size"), _single(stride, "stride")
        pad, dil = _single(padding, "padding"), _single(dilation, "dilation")
        super().__init__(in_segments, out_segments, (1, k), (1, st), (0, pad), (1, dil), bias, activation,
                         device, dtype)  # fmt: skip
        # nn.Conv1d's attributes (1-tuples); the op runs on the 2-D geometry
        self.kernel_size, self.stride, self.padding, self.dilation = (k,), (st,), (pad,), (dil,)
        self._taps_shape = (k,)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"PartialConv1d expects (N, C, L) or (C, L) input; got {tuple(x.shape)}")
        unbatched = x.dim() == 2
        x4 = (x.unsqueeze(0) if unbatched else x).unsqueeze(-2)  # (N, C, 1, L)
        p = self._parameters
        w = p.get("weight")
        if w is None:
            w = self.weight
        bias = p["bias"] if "bias" in p else self.bias
        y = partial_conv2d_module_forward(x4, w, bias, self._plan, self._geom, self.activation).squeeze(-2)
        return y.squeeze(0) if unbatched else y

    def _out_len(self, length: int) -> int:
        return conv_out_hw(1, length, self._geom.kernel, self._geom.stride, self._geom.padding, self._geom.dilation)[1]

    @classmethod
    def from_state_dict(  # type: ignore[override]
        cls,
        state_dict: dict[str, Tensor],
        prefix: str = "",
        kernel_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
    ) -> PartialConv1d:
        """Rebuild from a state_dict (segments and activation come from it; pass ``kernel_size``: the packed
        weight does not record it; stride / padding / dilation are hyper-parameters of the forward, as for
        nn.Conv1d).

        Raises:
            ValueError: ``kernel_size`` missing, or it does not match the weight size.
        """
        ins, outs, act = cls._segments_from_state_dict(state_dict, prefix)
        if kernel_size is None:
            raise ValueError("kernel_size is required: the packed weight does not record it")
        k = _single(kernel_size, "kernel_size")
        w = state_dict[prefix + "weight"]
        stored = segment_plan(ins, outs).stored
        if w.numel() != stored * k:
            raise ValueError(
                f"state_dict[{prefix + 'weight'!r}] has {w.numel()} entries; kernel {k} with these segments "
                f"needs {stored * k}"
            )
        mod = cls(ins, outs, k, stride, padding, dilation, bias=prefix + "bias" in state_dict, activation=act,
                  device=w.device, dtype=w.dtype)  # fmt: skip
        mod.load_state_dict({key[len(prefix) :]: v for key, v in state_dict.items() if key.startswith(prefix)})
        return mod

    def dense_params(self) -> int:
        n = self.out_channels * self.in_channels * self.kernel_size[0]
        return n + (self.out_channels if self.bias is not None else 0)

    def effective_flops(self, batch: int, input_size: Sequence[int] | None = None) -> int:
        """Multiply-add FLOPs ``2 * batch * L' * stored weights`` for inputs of length ``input_size`` = (L,)
        (required: a convolution's cost depends on it)."""
        if input_size is None:
            raise ValueError("input_size=(L,) is required for a convolution's FLOPs")
        return 2 * int(batch) * self._out_len(int(input_size[-1])) * self.weight.numel()


def _register_for_saving() -> None:
    """Let :func:`pyfusion.save` / :func:`pyfusion.load` rebuild these modules from :meth:`get_config` (segments of
    every layout, which a standard ``in_layout`` list cannot describe for K >= 3)."""
    import sys

    from pyfusion.serialization import register_module

    for cls in (PartialLinear, PartialConv1d, PartialConv2d):
        register_module(cls)
    # pyfusion.load imports this module (not the lazy package's others): PartialMultiheadAttention registers itself
    # when its module is imported, done here unless that module is the one importing this one right now
    if "pyfusion.nn.attention" not in sys.modules:
        import pyfusion.nn.attention  # noqa: F401


_register_for_saving()
