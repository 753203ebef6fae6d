"""Argument checks shared by ``pyfusion.fuse`` and the methods (bad input raises and changes nothing)."""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pyfusion._finite import all_finite

__all__ = [
    "DataMismatchError",
    "check_data",
    "check_lambdas",
    "check_members",
    "check_options",
    "check_reference",
    "prepare_data",
    "tensor_key",
    "tensor_state",
]


class MemberMismatchError(ValueError):
    """Members that are not one architecture (or hold NaN / inf), with which member and what differs.

    Attributes:
        member: index of the offending member (compared with member 0).
        kind: "modules", "shapes", "attributes" or "nonfinite".
        detail: the first differences, as printed in the message.
    """

    def __init__(self, message: str, member: int, kind: str, detail: Any):
        super().__init__(message)
        self.member, self.kind, self.detail = member, kind, detail


_FUNCTION_FREE_FLAGS = frozenset({"training", "inplace", "gradient_checkpointing"})


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, str))


def _structure_attributes(model: nn.Module) -> dict[str, Any]:
    """``"path.name" -> value`` of every module's integer / boolean / string attributes (and tuples of them):
    the sizes and flags its forward reads. Floats (eps, dropout rates, momentum), private or ``fusion_*`` names and
    the flags that do not change the function (``training``, ``inplace``, ``gradient_checkpointing``) are left
    out."""
    out: dict[str, Any] = {}
    for path, m in model.named_modules():
        for name, v in vars(m).items():
            if name.startswith("_") or name.startswith("fusion_") or name in _FUNCTION_FREE_FLAGS:
                continue
            if _plain(v) or isinstance(v, tuple) and all(_plain(x) for x in v):
                out[f"{path}.{name}" if path else name] = v
    return out


def _module_type(m: nn.Module) -> type:
    """The class a member's module is compared by. ``torch.nn.utils.parametrize`` gives every parametrized module
    a class of its own (``ParametrizedConv1d``, made per instance: wav2vec2's weight-normed positional convolution
    was "a different architecture" in two copies of one model), so such a module is compared by the class it
    parametrizes; its parametrizations are child modules, compared by their own classes."""
    if nn.utils.parametrize.is_parametrized(m):
        return type(m).__bases__[0]
    return type(m)


def check_members(models: Any, min_members: int = 2) -> list[nn.Module]:
    """K >= ``min_members`` modules of one architecture (same module types per path, same tensor names and
    shapes, same integer / boolean / string attributes per module: head counts, groups, strides, flags, activation
    names; tensors of equal shapes do not make one architecture, e.g. GPT-2 with 4 or 2 heads), finite.

    Raises:
        MemberMismatchError: (a ValueError) naming the member and the first difference.
        ValueError: fewer than ``min_members`` modules, or not modules.
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ValueError(f"models must be a list of K >= {min_members} nn.Module members; got {type(models).__name__}")
    models = list(models)
    if len(models) < min_members:
        raise ValueError(f"models must hold K >= {min_members} members; got {len(models)}")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ValueError(f"models[{k}] must be an nn.Module; got {type(m).__name__}")
    for path, mod in models[0].named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.max_norm is not None:
            raise ValueError(
                f"module {path!r} ({type(mod).__name__}, max_norm={mod.max_norm}) renormalizes its weight in place on "
                "every forward: running the members for fusion would change them. Renormalize the weights once "
                "and set max_norm=None"
            )
    ref_types = {p: _module_type(m) for p, m in models[0].named_modules()}
    ref_shapes = {n: tuple(t.shape) for n, t in list(models[0].named_parameters()) + list(models[0].named_buffers())}
    ref_attrs = _structure_attributes(models[0])
    for k, m in enumerate(models[1:], start=1):
        types = {p: _module_type(x) for p, x in m.named_modules()}
        if types != ref_types:
            diff = sorted(set(types.items()) ^ set(ref_types.items()), key=str)[:3]
            raise MemberMismatchError(
                f"models[{k}] has a different architecture from models[0]: modules differ at {diff}", k, "modules", diff
            )
        shapes = {n: tuple(t.shape) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        if shapes != ref_shapes:
            bad = [
                (n, ref_shapes.get(n), shapes.get(n))
                for n in sorted(set(shapes) | set(ref_shapes))
                if shapes.get(n) != ref_shapes.get(n)
            ][:3]
            raise MemberMismatchError(
                f"models[{k}] has mismatched tensor shapes (name, expected, actual): {bad}", k, "shapes", bad
            )
        attrs = _structure_attributes(m)
        if attrs != ref_attrs:
            bad = [
                (n, ref_attrs.get(n), attrs.get(n)) for n in sorted(set(attrs) | set(ref_attrs))
                if attrs.get(n) != ref_attrs.get(n)
            ][:3]  # fmt: skip
            raise MemberMismatchError(
                f"models[{k}] has a different architecture from models[0]: module attributes differ (name, expected, "
                f"actual): {bad}",
                k,
                "attributes",
                bad,
            )
    for k, m in enumerate(models):
        state = tensor_state(m)
        hit = _FINITE.get(m)
        if hit is not None and hit == state:
            continue
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            if torch.is_floating_point(t) and not all_finite(t):
                raise MemberMismatchError(f"models[{k}] tensor {n!r} contains NaN or inf values", k, "nonfinite", n)
        if state is not None:
            _FINITE[m] = state
    return models


class TensorState:
    """The state of a model's parameters and buffers as far as torch tracks it without reading them: per tensor
    (in ``named_parameters`` then ``named_buffers`` order, duplicates kept) its name, identity, in-place version
    counter (``t._version``: every in-place op, ``t[i] = x`` under ``no_grad`` included, bumps it), storage,
    data pointer, shape and strides (``p.data = other`` keeps the identity and the version but changes the
    storage).

    Two states compare equal when no tensor was replaced, re-pointed or changed in place between them. The state
    holds the tensors and their storages (``pins``), so no id / address in the key can be reused by another
    object while it is kept: a stale key can never match a new tensor that happens to reuse a freed address.

    Not seen: writes that bypass the version counter - through ``t.data[...] = x`` (``.data`` is a new tensor with
    its own counter), a numpy view (``t.numpy()``) or another non-autograd alias of the storage.
    """

    __slots__ = ("key", "pins")

    def __init__(self, key: tuple, pins: tuple):
        self.key, self.pins = key, pins

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorState) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def tensor_key(t: torch.Tensor) -> tuple[tuple, tuple]:
    """(key, pin) of one tensor for :class:`TensorState`-style caches: its identity, in-place version, storage, data
    pointer, shape, strides and dtype, and the (tensor, storage) pair the caller must hold so that no id in the key
    is reused while the key is kept. Raises where the tensor has no storage to name (sparse, some subclasses)."""
    storage = t.untyped_storage()
    return (id(t), t._version, storage._cdata, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype), (t, storage)


def tensor_state(model: nn.Module) -> TensorState | None:
    """:class:`TensorState` of ``model``'s parameters and buffers, or None when a tensor has no storage to name
    (a tensor subclass, a sparse tensor...): such a model is not cached."""
    key, pins = [], []
    try:
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            k, pin = tensor_key(t)
            key.append((n, *k))
            pins.append(pin)
    except Exception:  # no storage (sparse, some subclasses): not cacheable
        return None
    return TensorState(tuple(key), tuple(pins))


# member -> the TensorState in which :func:`check_members` found all its floating-point tensors finite (a tensor
# whose identity, storage and version are unchanged is still finite: ~30 ms of a VGG11 pair's 74 MB per call, the
# float64 sum reading at ~5 GB/s on 1 thread). Weak keys: a dropped member takes its entry with it.
_FINITE: weakref.WeakKeyDictionary[nn.Module, TensorState] = weakref.WeakKeyDictionary()


def check_lambdas(lambdas: Any, k: int) -> tuple[float, ...]:
    """Member weights: default uniform; K non-negative finite values summing to 1 (tolerance 1e-6).

    Raises:
        ValueError: naming ``lambdas``, the expected shape (K,) and what was given.
    """
    if lambdas is None:
        return tuple([1.0 / k] * k)
    expected = f"a sequence of {k} non-negative floats summing to 1 (shape ({k},))"
    if isinstance(lambdas, (str, bytes, Mapping)) or not isinstance(lambdas, (Iterable, torch.Tensor)):
        raise ValueError(f"lambdas must be {expected}; got {type(lambdas).__name__} {lambdas!r}")
    if isinstance(lambdas, torch.Tensor):
        if lambdas.ndim != 1:
            raise ValueError(f"lambdas must be {expected}; got a tensor of shape {tuple(lambdas.shape)}")
        lambdas = lambdas.tolist()
    items = list(lambdas)
    bad = [x for x in items if isinstance(x, (str, bytes)) or not _is_number(x)]
    if bad:
        raise ValueError(
            f"lambdas must be {expected}; got {items!r} ({type(bad[0]).__name__} {bad[0]!r} is not a number)"
        )
    lam = tuple(float(x) for x in items)
    if len(lam) != k:
        raise ValueError(f"lambdas must have one weight per member ({k}); got {len(lam)}")
    if any(not math.isfinite(x) or x < 0 for x in lam):
        raise ValueError(f"lambdas must be finite and non-negative; got {lam}")
    if abs(sum(lam) - 1.0) > 1e-6:
        raise ValueError(f"lambdas must sum to 1; got sum {sum(lam)!r} for {lam}")
    return lam


def _is_number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.ndim == 0 and not x.dtype.is_complex
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, complex)


def check_options(fn: Callable[..., Any], options: Mapping[str, Any], method: str) -> None:
    """Options that ``fn`` (a registered method) does not take are a ValueError listing the ones it does.

    The options are the keyword-only parameters of ``fn``'s signature; a method that takes ``**options`` checks
    its options itself (nothing is checked here).

    Raises:
        ValueError: an unknown option, naming it and the method's options.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the method checks
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown and not known:
        raise ValueError(f"method {method!r} takes no options; got {unknown}")
    if unknown:
        raise ValueError(
            f"method {method!r} has no option {', '.join(map(repr, unknown))}; its options are: {', '.join(known)}"
        )


def check_reference(reference: int, k: int) -> int:
    """The reference member's index (a method config checked it is an int >= 0), checked against K members.

    Raises:
        ValueError: ``reference`` not in [0, K).
    """
    if not 0 <= reference < k:
        raise ValueError(f"reference must be a member index in [0, {k}); got {reference!r}")
    return int(reference)


def prepare_data(data: Any) -> Any:
    """Calibration data as a re-iterable: a DataLoader / list stays, a one-shot iterator is materialised.

    Raises:
        ValueError: when the data yields no batch.
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        raise ValueError(
            f"data must be a DataLoader or an iterable of batches; got one tensor of shape {tuple(data.shape)} "
            "(iterating it would make every sample a batch): pass [x] for one batch, or [(x, y)]"
        )
    if isinstance(data, (str, bytes, Mapping)):
        raise ValueError(f"data must be a DataLoader or an iterable of batches; got {type(data).__name__}")
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be a DataLoader or an iterable of batches; got {type(data).__name__}")
    if iter(data) is data:  # generator / iterator: can be traversed once only
        data = list(data)
    it = iter(data)
    try:
        next(it)
    except StopIteration:
        raise ValueError("data is empty: the calibration data yielded no batch") from None
    return data


class DataMismatchError(ValueError, RuntimeError):
    """Calibration data the members cannot run: wrong batch type, shape or dtype.

    A ValueError (bad input); also a RuntimeError, which is what torch raised from inside the members' forward
    pass before this check existed, so ``except RuntimeError`` keeps working.

    Attributes:
        batch_shape: shape of the first batch's inputs (None when they are not a tensor).
        module: path of the module that failed on them ("" for the model itself; None if not known).
        expected: what that module (or the model's first layer) expects, e.g. "(..., 64)", or None.
    """

    def __init__(self, message: str, batch_shape: tuple[int, ...] | None, module: str | None, expected: str | None):
        super().__init__(message)
        self.batch_shape, self.module, self.expected = batch_shape, module, expected


def _expects(m: nn.Module) -> str | None:
    """The input shape a layer reads, as far as its attributes tell."""
    if isinstance(m, nn.Embedding):
        return f"integer indices in [0, {m.num_embeddings})"
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return "(..., " + ", ".join(str(d) for d in m.normalized_shape) + ")"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f"(N, {m.num_features}, ...)"
    if isinstance(m, nn.modules.conv._ConvNd):
        spatial = ", ".join("HWD"[i] if len(m.kernel_size) > 1 else "L" for i in range(len(m.kernel_size)))
        return f"(N, {m.in_channels}, {spatial})"
    n_in = getattr(m, "in_features", None)
    if isinstance(n_in, int):
        return f"(..., {n_in})"
    return None


def _describe_layer(path: str, m: nn.Module) -> str:
    return f"module {path or '<root>'!r} ({type(m).__name__})"


def check_data(models: Sequence[nn.Module], data: Any) -> None:
    """The first calibration batch must be something the members run on: a tensor (N, ...) with N >= 1, or an
    (inputs, labels) pair of them, that ``models[0]`` accepts.

    The check runs ``models[0]`` once on two samples of the first batch (eval mode, no gradients; the training
    flags are restored, so the members are unchanged). When that forward fails, the error names ``data``, the
    batch's shape and dtype, the module that failed, what it expects and the original message.
    Batches that are mappings (keyword inputs) are left to the method.

    Raises:
        DataMismatchError: (a ValueError) the first batch is not a tensor / pair, is empty, or does not fit.
    """
    if data is None:
        return
    expected = "a tensor (N, ...) of inputs, or an (inputs, labels) pair"
    batch = next(iter(data))
    if isinstance(batch, Mapping):
        return
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise DataMismatchError(
                f"data: the first batch is an empty {type(batch).__name__}; expected {expected}", None, None, None
            )
        x = batch[0]
    else:
        x = batch
    if not isinstance(x, torch.Tensor):
        raise DataMismatchError(
            f"data: the first batch holds inputs of type {type(x).__name__} ({x!r:.60}); expected {expected}",
            None,
            None,
            None,
        )
    shape = tuple(x.shape)
    if x.ndim == 0 or shape[0] == 0:
        raise DataMismatchError(
            f"data: the first batch has inputs of shape {shape}; expected {expected} with N >= 1", shape, None, None
        )
    model = models[0]
    modules = list(model.named_modules())
    first = next(((p, m, e) for p, m in modules if (e := _expects(m)) is not None), None)
    stack: list[tuple[str, nn.Module]] = []  # the modules entered and not yet left: the last one failed

    def enter(mod: nn.Module, args: Any, _path: str) -> None:
        stack.append((_path, mod))

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # returns None: the output is left as it is
        stack.pop()

    handles = []
    for path, m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, args, _p=path: enter(mod, args, _p)))
        handles.append(m.register_forward_hook(leave))
    flags = [(m, m.training) for _, m in modules]
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    versions = [t._version for _, t in tensors]
    try:
        model.eval()
        with torch.no_grad():
            model(x[:2])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where, failing = stack[-1] if stack else ("", model)
        want = _expects(failing)
        if want is not None:
            what = f"{_describe_layer(where, failing)}, which expects inputs {want}"
        elif first is not None:
            want = first[2]
            what = f"{_describe_layer(where, failing)} (the first layer, {first[0]!r}, expects inputs {want})"
        else:
            what = _describe_layer(where, failing)
        raise DataMismatchError(
            f"data does not fit the members: the first batch has inputs of shape {shape} ({x.dtype}); running "
            f"models[0] on them failed in {what}: {type(exc).__name__}: {msg}",
            shape,
            where,
            want,
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    changed = [n for (n, t), v in zip(tensors, versions) if t._version != v]
    if changed:  # every later forward (statistics, BatchNorm reset) would change the members again
        raise ValueError(
            f"models[0] changed its own tensors in place when it ran (eval mode, no gradients): {changed[:3]}; "
            "fusing it would change the members (e.g. nn.Embedding(max_norm=...) renormalizes its weight on every "
            "forward). Make the forward leave its tensors as they are"
        )
