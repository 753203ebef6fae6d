"""Safe save / load of fused and partially fused models: one safetensors file, architecture in its header.

Two formats, both standard safetensors files whose tensors are the module's ``state_dict()`` and whose header
metadata holds JSON records and ``checksum`` (``sha256:<hex>`` of the records and of every tensor's name, dtype,
shape and bytes). Nothing is pickled.

* ``pyfusion.module/1``, a module made only of allowlisted types (torch built-ins, pyfusion's own modules and
  whatever the user registers with :func:`register_module`): ``architecture`` (the module tree as JSON: each node
  ``{"type": name, "config": {...}, "children": {name: node}}``) and ``attributes`` (JSON-serialisable fusion
  records such as layouts).
* ``pyfusion.module/2``, any other model (a user's class, a Hugging Face ``PreTrainedModel``), fused or not:
  ``base`` (how to rebuild one member: the caller's ``factory`` or the Hugging Face class name and config, with a
  module-by-module description of that member architecture), ``changes`` (what fusion changed: re-created or
  replaced modules as allowlisted trees, resized tensors, updated plain attributes), ``ties`` and ``attributes``;
  see :mod:`pyfusion._member_files`.

Loading never trusts the file. Every field of the header is checked (types, dtypes, offsets that tile the
data region exactly, architecture depth <= :data:`MAX_DEPTH` and size <= :data:`MAX_NODES`); the module
tree is rebuilt from the allowlist (or from the factory / config, checked against the file's description of the
member) **on the meta device**, so a forged architecture costs no memory; its tensor names, shapes and dtypes are
compared with the file's before anything is allocated; the checksum is verified; only then are the file's tensors
assigned to the module. Any inconsistency raises :class:`SerializationError` naming the file and the first
problem. Nothing named by the file is imported or executed (a Hugging Face class is looked up only among the
``PreTrainedModel`` subclasses that ``transformers`` exports).

Writes are atomic: temporary file, fsync, reload and compare (or the caller's ``check``), rename. A
failure at any step (an exception, ``KeyboardInterrupt``, or SIGTERM in the main thread) removes the
temporary file and leaves any previous file at the path intact.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "FORMAT_MEMBER",
    "MAX_DEPTH",
    "MAX_HEADER_BYTES",
    "MAX_NODES",
    "SerializationError",
    "UnverifiedFileWarning",
    "load",
    "register_module",
    "save",
]

FORMAT = "pyfusion.module/1"
# files of a user's class or a Hugging Face model: member architecture + changes (pyfusion._member_files)
FORMAT_MEMBER = "pyfusion.module/2"
SAVED_ATTRIBUTES = ("fusion_layouts", "fusion_info")
# Modules that register their classes when imported (pyfusion's own layers and reference models).
_PYFUSION_PROVIDERS = ("pyfusion.nn", "pyfusion.models")

# Limits on what a file may declare (checked before anything is built). safetensors itself refuses headers over
# 100 MB; real architectures are far inside the others (ResNet-50: depth 5, 180 nodes; a 32-layer Hugging Face
# decoder: depth 6, about 600 nodes).
MAX_HEADER_BYTES = 100_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_NDIM = 64  # torch's own limit on tensor dimensions

_CHECKSUM_PREFIX = "sha256:"
_CHECKSUM_DOMAIN = b"pyfusion.checksum/1\0"

# safetensors dtype names -> torch dtypes (the ones torch can hold).
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class SerializationError(ValueError):
    """A module that cannot be saved, or a file that cannot be loaded (says which and why)."""


class UnverifiedFileWarning(UserWarning):
    """A file loaded without an integrity check (it has no checksum: written by pyfusion before checksums)."""


@dataclass(frozen=True)
class _Spec:
    cls: type[nn.Module]
    get_config: Callable[[nn.Module], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], nn.Module]
    # pyfusion's own registrations: the config keys a saved file may hold, and the rebuilt module must give back
    # exactly its config (``get_config(from_config(c)) == c``), so a forged value cannot load as something else.
    fields: frozenset[str] | None = None


_REGISTRY: dict[str, _Spec] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module(
    cls: type[nn.Module],
    get_config: Callable[[nn.Module], dict[str, Any]] | None = None,
    from_config: Callable[[dict[str, Any]], nn.Module] | None = None,
    *,
    name: str | None = None,
) -> type[nn.Module]:
    """Allow ``cls`` in saved files.

    ``get_config(module)`` returns JSON-serialisable constructor arguments and ``from_config(config)``
    builds a module from them (its children are then replaced by the saved children, so a container
    whose layers were swapped or resized by fusion is rebuilt faithfully). Classes that define a
    ``get_config`` method and a ``from_config`` classmethod need no functions here. Usable as a decorator.

    ``from_config`` runs under ``torch.device("meta")`` (the shapes are checked against the file before any
    memory is used); a class whose construction needs real tensors is rebuilt on the CPU after that check.
    It receives the config as read from the file: refuse keys and values it does not expect.
    """
    get = get_config or getattr(cls, "get_config", None)
    build = from_config or getattr(cls, "from_config", None)
    if get is None or build is None:
        raise TypeError(
            f"register_module({cls.__name__}): give get_config/from_config functions or define "
            "get_config() and the classmethod from_config() on the class"
        )
    _REGISTRY[name or _type_name(cls)] = _Spec(cls, get, build)
    return cls


def _register(
    cls: type[nn.Module],
    get: Callable[[nn.Module], dict[str, Any]],
    build: Callable[[dict[str, Any]], nn.Module],
    fields: Iterable[str],
    name: str | None = None,
) -> None:
    _REGISTRY[name or _type_name(cls)] = _Spec(cls, get, build, frozenset(fields))


def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    def get(m: nn.Module) -> dict[str, Any]:
        out = {}
        for n in names:
            v = getattr(m, n)
            out[n] = list(v) if isinstance(v, tuple) else v
        return out

    return get


def _build(cls: type[nn.Module], **fixed: Any) -> Callable[[dict[str, Any]], nn.Module]:
    def build(cfg: dict[str, Any]) -> nn.Module:
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
        return cls(**kwargs, **fixed)

    return build


def _register_builtins() -> None:
    def with_bias(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
        base = _attrs(*names)
        return lambda m: {**base(m), "bias": m.bias is not None}

    lin = ("in_features", "out_features")
    _register(nn.Linear, with_bias(*lin), _build(nn.Linear), (*lin, "bias"), name="torch.nn.Linear")
    conv_fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    for cls in (nn.Conv1d, nn.Conv2d):
        fields = (*conv_fields, "padding_mode")
        _register(cls, with_bias(*fields), _build(cls), (*fields, "bias"), name=f"torch.nn.{cls.__name__}")
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        fields = ("num_features", "eps", "momentum", "affine", "track_running_stats")
        _register(cls, _attrs(*fields), _build(cls), fields, name=f"torch.nn.{cls.__name__}")
    _register(
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
        _build(nn.LayerNorm),
        ("normalized_shape", "eps", "elementwise_affine", "bias"),
        name="torch.nn.LayerNorm",
    )
    gn = ("num_groups", "num_channels", "eps", "affine")
    _register(nn.GroupNorm, _attrs(*gn), _build(nn.GroupNorm), gn, name="torch.nn.GroupNorm")
    emb = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    _register(nn.Embedding, _attrs(*emb), _build(nn.Embedding), emb, name="torch.nn.Embedding")
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        rms = ("normalized_shape", "eps", "elementwise_affine")
        _register(nn.RMSNorm, _attrs(*rms), _build(nn.RMSNorm), rms, name="torch.nn.RMSNorm")
    simple: list[tuple[type[nn.Module], tuple[str, ...]]] = [
        (nn.ReLU, ("inplace",)),
        (nn.GELU, ("approximate",)),
        (nn.SiLU, ("inplace",)),
        (nn.Tanh, ()),
        (nn.Sigmoid, ()),
        (nn.LeakyReLU, ("negative_slope", "inplace")),
        (nn.ELU, ("alpha", "inplace")),
        (nn.Identity, ()),
        (nn.Dropout, ("p", "inplace")),
        (nn.Flatten, ("start_dim", "end_dim")),
        (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
        (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
        (nn.AdaptiveAvgPool2d, ("output_size",)),
        (nn.Softmax, ("dim",)),
    ]
    for cls, fields in simple:
        _register(cls, _attrs(*fields), _build(cls), fields, name=f"torch.nn.{cls.__name__}")
    # Containers: children are built from their own nodes and attached in order.
    for cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        _register(cls, lambda m: {}, lambda cfg, _c=cls: _c(), (), name=f"torch.nn.{cls.__name__}")


_register_builtins()


def _register_pyfusion_types() -> None:
    """Allow pyfusion's execution layers and reference models (those not already registered by their module).

    Containers from :mod:`pyfusion.models` are rebuilt small from their config and then receive the saved
    children (fusion may change their widths or swap their layers), so the config only has to build *a*
    valid instance; the layers' own configs fix the shapes.
    """
    try:
        from pyfusion.nn import partial as pnn
    except ImportError:  # pragma: no cover - a build without pyfusion.nn
        pnn = None
    if pnn is not None:
        for cls in (pnn.PartialLinear, pnn.PartialConv1d, pnn.PartialConv2d):
            if _spec_name_of_class(cls) is None:
                get, fields = _partial_spec(cls)
                _register(cls, get, _build(cls), fields)
        ensemble = ("num_members", "in_features", "out_features", "bias", "shared_input", "activation")
        if _spec_name_of_class(pnn.EnsembleLinear) is None:
            _register(
                pnn.EnsembleLinear,
                lambda m: {
                    "num_members": m.num_members,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "shared_input": m.shared_input,
                    "activation": None if m.activation == "none" else m.activation,
                },
                _build(pnn.EnsembleLinear),
                ensemble,
            )
        from pyfusion.nn.ensemble import SubEnsemble

        if _spec_name_of_class(SubEnsemble) is None:
            _register(
                SubEnsemble, SubEnsemble.get_config, SubEnsemble.from_config, ("num_members", "combine", "num_classes")
            )
    try:
        from pyfusion.nn.norm import MemberViewNorm
    except ImportError:  # pragma: no cover - a build without pyfusion.nn
        MemberViewNorm = None
    if MemberViewNorm is not None and _spec_name_of_class(MemberViewNorm) is None:
        _register(MemberViewNorm, _member_view_config, _member_view_from_config, ("slots", "members", "dim"))
        _VALIDATORS[MemberViewNorm] = _validate_member_view
    try:
        from pyfusion import models as pm
    except ImportError:  # pragma: no cover - a build without pyfusion.models
        return

    def block_cfg(m: nn.Module) -> dict[str, Any]:
        conv = m.conv1
        return {"stride": int(getattr(conv, "stride", (1,))[0])}

    for cls in (pm.BasicBlock, pm.Bottleneck):
        if _spec_name_of_class(cls) is None:
            # children (convs, BNs, shortcut) are replaced by the saved ones; 1 -> 1 channel is enough
            _register(cls, block_cfg, lambda cfg, _c=cls: _c(1, 1, cfg["stride"]), ("stride",))
    if _spec_name_of_class(pm.ResNet) is None:
        # forward does not depend on the block type; every layer comes from the saved children
        _register(pm.ResNet, lambda m: {}, lambda cfg: pm.ResNet(pm.BasicBlock, [0, 0, 0], 1), ())


def _partial_spec(cls: type[nn.Module]) -> tuple[Callable[[nn.Module], dict[str, Any]], tuple[str, ...]]:
    """Config of ``PartialLinear`` / ``PartialConv2d`` from the arguments their constructor takes: the layouts
    (``in_layout``, ``out_layout``: ``[shared, branch_1, ..., branch_K]``) or member-mask segments (``in_segments``,
    ``out_segments``: ``[[size, member_mask], ...]``), the convolution geometry, ``bias`` and ``activation``. Read
    from the signature so that a file stores exactly what rebuilds the module (``get_config(from_config(c)) == c``
    is checked on load)."""
    params = inspect.signature(cls.__init__).parameters
    segmented = "in_segments" in params
    io = ("in_segments", "out_segments") if segmented else ("in_layout", "out_layout")
    geometry = tuple(k for k in ("kernel_size", "stride", "padding", "dilation") if k in params)
    fields = (*io, *geometry, "bias", *(("activation",) if "activation" in params else ()))

    def get(m: nn.Module) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        for k in io:
            v = getattr(m, k)
            cfg[k] = [[int(size), int(mask)] for size, mask in v] if segmented else [int(n) for n in v]
        for k in geometry:
            cfg[k] = [int(n) for n in getattr(m, k)]
        cfg["bias"] = m.bias is not None
        if "activation" in fields:
            act = getattr(m, "activation", "none")
            cfg["activation"] = None if act == "none" else act
        return cfg

    return get, fields


# class -> check of a loaded module's tensor values (index ranges...), run after its tensors are assigned
_VALIDATORS: dict[type, Callable[[nn.Module, str], None]] = {}


def _member_view_config(m: nn.Module) -> dict[str, Any]:
    """``MemberViewNorm``: the slots and, per member, its width and which map forms its buffers hold (a gather
    index or a dense B; a scatter of ``nnz`` entries or a dense A)."""
    members = []
    for k in range(m.num_members):
        width = getattr(m, f"b_index_{k}").shape[0] if m._gather[k] else getattr(m, f"b_map_{k}").shape[0]
        nnz = int(getattr(m, f"a_rows_{k}").shape[0]) if m._scatter[k] else None
        members.append({"width": int(width), "gather": bool(m._gather[k]), "scatter": nnz})
    cfg: dict[str, Any] = {"slots": int(m.slots), "members": members}
    if getattr(m, "dim", -1) != -1:  # channels-first; files of last-dim normalizers keep their old config
        cfg["dim"] = int(m.dim)
    return cfg


def _member_view_from_config(cfg: dict[str, Any]) -> nn.Module:
    """A ``MemberViewNorm`` with the config's buffer shapes and no memory: built from 2-slot stand-in maps of the
    same forms (on the CPU: a few bytes), then its buffers replaced by empty ones (on the caller's device, meta when
    loading) of the declared shapes; the file's children then replace the identity norms."""
    from pyfusion.nn.norm import MemberViewNorm

    slots, members, dim = cfg["slots"], cfg["members"], cfg.get("dim", -1)
    if not (_is_int(slots) and slots >= 0 and isinstance(members, list) and members):
        raise ValueError(f"slots must be an integer >= 0 and members a non-empty list; got {slots!r}, {members!r}")
    if not (_is_int(dim) and dim < 0):
        raise ValueError(f"dim must be a negative integer; got {dim!r}")
    for mem in members:
        if not (
            isinstance(mem, dict)
            and set(mem) == {"width", "gather", "scatter"}
            and _is_int(mem["width"])
            and mem["width"] >= 0
            and isinstance(mem["gather"], bool)
            and (mem["scatter"] is None or (_is_int(mem["scatter"]) and 0 <= mem["scatter"] <= mem["width"]))
        ):
            raise ValueError(f"a member entry must be {{width, gather, scatter}} with integers >= 0; got {mem!r}")
    with torch.device("cpu"):
        a_maps, b_maps = [], []
        for mem in members:
            b_maps.append(torch.tensor([[1.0, 0.0]]) if mem["gather"] else torch.zeros(1, 2))
            a_maps.append(torch.tensor([[1.0], [0.0]]) if mem["scatter"] is not None else torch.ones(2, 1))
        module = MemberViewNorm([nn.Identity() for _ in members], a_maps, b_maps, dim=dim)
    module.slots = slots
    real = torch.get_default_dtype()
    for k, mem in enumerate(members):
        n = mem["width"]
        if mem["gather"]:
            module._buffers[f"b_index_{k}"] = torch.empty(n, dtype=torch.long)
        else:
            module._buffers[f"b_map_{k}"] = torch.empty(n, slots, dtype=real)
        if mem["scatter"] is not None:
            for name, dtype in (("a_rows", torch.long), ("a_cols", torch.long), ("a_vals", real)):
                module._buffers[f"{name}_{k}"] = torch.empty(mem["scatter"], dtype=dtype)
        else:
            module._buffers[f"a_map_{k}"] = torch.empty(slots, n, dtype=real)
    return module


def _validate_member_view(m: nn.Module, where: str) -> None:
    """The index buffers of a loaded MemberViewNorm stay inside its slots and member widths (a forged index would
    fail, or read out of bounds on a GPU, at the first forward)."""
    if len(m.norms) != m.num_members:
        raise ValueError(f"{len(m.norms)} member norms for {m.num_members} members")
    for k in range(m.num_members):
        width = getattr(m, f"b_index_{k}").shape[0] if m._gather[k] else getattr(m, f"b_map_{k}").shape[0]
        checks = []
        if m._gather[k]:
            checks.append((f"b_index_{k}", m.slots))
        if m._scatter[k]:
            checks += [(f"a_rows_{k}", m.slots), (f"a_cols_{k}", width)]
        for name, bound in checks:
            t = getattr(m, name)
            if t.dtype != torch.long:
                raise ValueError(f"{name} is {t.dtype}, expected torch.int64")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
                raise ValueError(f"{name} holds indices outside [0, {bound})")


def _spec_name_of_class(cls: type) -> str | None:
    for name, spec in _REGISTRY.items():
        if spec.cls is cls:
            return name
    return None


def _load_providers() -> None:
    for mod in _PYFUSION_PROVIDERS:
        try:
            importlib.import_module(mod)
        except ImportError:  # a provider that is not part of this build
            pass
    _register_pyfusion_types()


def record_member_architecture(fused: nn.Module, member: nn.Module) -> None:
    """Remember the member architecture of a fused model of a user's class (a meta-device copy of ``member``, no
    tensor memory, as ``fused.fusion_member_architecture``), so that :func:`save` can describe what fusion changed
    without a factory. A no-op for allowlisted trees and Hugging Face models. Called by the fusion builder."""
    from pyfusion import _member_files as mf

    mf.record_member_architecture(fused, member)


def _spec_name(module: nn.Module) -> str | None:
    return _spec_name_of_class(type(module))


# --------------------------------------------------------------------------------------------- checksum
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes safetensors writes for ``t`` (contiguous, CPU, native = little-endian order)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _digest(records: Iterable[str], tensors: Iterable[tuple[str, str, tuple[int, ...], Any]]) -> str:
    """``sha256:<hex>`` over the metadata records and every (name, dtype, shape, bytes), tensors sorted by name.

    Each field is length-prefixed, so no two different files hash the same input.
    """
    h = hashlib.sha256(_CHECKSUM_DOMAIN)

    def field(b: bytes | memoryview) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for r in records:
        field(r.encode())
    for name, dtype, shape, data in sorted(tensors, key=lambda item: item[0]):
        field(name.encode())
        field(dtype.encode())
        field(json.dumps(list(shape)).encode())
        field(data)
    return _CHECKSUM_PREFIX + h.hexdigest()


# --------------------------------------------------------------------------------------------- save
def _describe(module: nn.Module, path: str) -> dict[str, Any]:
    name = _spec_name(module)
    if name is None:
        where = path or "<root>"
        raise SerializationError(
            f"cannot save module {where!r} of type {_type_name(type(module))}: it is not an allowed type. "
            "Register it with pyfusion.serialization.register_module(cls, get_config, from_config)."
        )
    config = _REGISTRY[name].get_config(module)
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"config of module {path or '<root>'!r} is not JSON-serialisable: {exc}") from exc
    children = {n: _describe(c, f"{path}.{n}" if path else n) for n, c in module.named_children()}
    return {"type": name, "config": config, "children": children}


def _saved_attributes(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, m in module.named_modules():
        for attr in SAVED_ATTRIBUTES:
            if hasattr(m, attr):
                value = getattr(m, attr)
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as exc:
                    raise SerializationError(f"attribute {attr!r} of {path or '<root>'!r} is not JSON: {exc}") from exc
                out.setdefault(path, {})[attr] = value
    return out


class _TerminationCleanup:
    """While saving, SIGTERM removes the temporary file before the process goes the way the signal says.

    The handler (main thread only; elsewhere signals cannot be handled by Python) unlinks the temporary file, puts
    the previous handler back and hands the signal on: the default action terminates the process as SIGTERM
    always does (now without a stray ``.<name>.*.tmp``); a Python handler is called, and if it returns the save
    stops with a :class:`SerializationError`. An ignored SIGTERM stays ignored.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _TerminationCleanup:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        previous = self._previous if self._previous is not None else signal.SIG_DFL
        signal.signal(signum, previous)
        self._installed = False
        if callable(previous):
            previous(signum, frame)
            raise SerializationError(f"save interrupted by signal {signum}; the previous file is unchanged")
        os.kill(os.getpid(), signum)  # default action: terminate, now that the temporary file is gone

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _same_contents(module: nn.Module, saved: dict[str, torch.Tensor], reloaded: nn.Module) -> None:
    """The reloaded module is the saved one: same module types in order, bit-identical tensors."""
    types_a = [type(m) for m in module.modules()]
    types_b = [type(m) for m in reloaded.modules()]
    if types_a != types_b:
        raise SerializationError("the written file rebuilds a different module tree (verification failed)")
    state = reloaded.state_dict()
    if set(state) != set(saved):
        raise SerializationError("the written file holds different tensors (verification failed)")
    for k, t in saved.items():
        r = state[k]
        if r.dtype != t.dtype or r.shape != t.shape or _tensor_bytes(r.contiguous()) != _tensor_bytes(t):
            raise SerializationError(f"tensor {k!r} reads back different from the file (verification failed)")


def save(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    check: Callable[[nn.Module], None] | None = None,
    factory: Callable[[], nn.Module] | None = None,
) -> Path:
    """Save ``module`` (architecture, tensors and fusion records) to one safetensors file, atomically.

    A module made only of allowlisted types (torch's layers, pyfusion's, registered ones) is saved with its module
    tree (``pyfusion.module/1``). Any other model, a user's class or a Hugging Face model, fused or not, is saved as
    its member architecture plus the changes fusion made (``pyfusion.module/2``; see :mod:`pyfusion._member_files`):
    a Hugging Face model by its class name and config; a user's class by its name, for messages only, so that
    :func:`load` needs the same ``factory``. The member architecture of a user's class is, in this order: the one
    ``factory()`` builds; the one :func:`pyfusion.fuse` recorded on the fused model (``fusion_member_architecture``);
    the module itself (an unfused model).

    The file is written to a temporary file beside ``path`` and fsynced. With ``verify`` (default) the temporary
    file is loaded back (all of :func:`load`'s checks, the checksum included; a user's class is rebuilt from its
    member architecture as above) and compared with ``module`` (module types, bit-identical tensors, ties and plain
    attributes); then ``check(reloaded)`` runs if given (e.g. compare outputs: raise to refuse). Only then does the
    temporary file replace ``path``. Any failure, ``KeyboardInterrupt`` or SIGTERM removes the temporary file and
    leaves a previous file at ``path`` untouched.

    Args:
        module: the module to save.
        path: the target file (its folder must exist).
        verify: reload and compare before replacing (costs about one :func:`load`; ``False`` for speed).
        check: a further test of the reloaded module, run before replacing ``path``.
        factory: a callable returning one member-architecture model of a user's class (checked against the member
            architecture the fusion recorded, when there is one); ignored for the other models.

    Raises:
        SerializationError: a module that cannot be described (a submodule that is neither allowlisted nor part of
            the member architecture at its path, a member module whose tensors fusion added or removed, an attribute
            that is not a plain value), a config or record that is not JSON-serialisable, a factory of another
            architecture, or a written file that does not read back the same. Nothing is left behind.
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    from safetensors.torch import save as st_save

    from pyfusion import _member_files as mf

    if not isinstance(module, nn.Module):
        raise SerializationError(f"save: module must be a torch.nn.Module; got {type(module).__name__}")
    if factory is not None and not callable(factory):
        raise ValueError(f"save: factory must be a callable returning one member model; got {type(factory).__name__}")
    _load_providers()
    target = Path(path)
    reload_factory: Callable[[], nn.Module] | None = None
    if mf.all_allowed(module):
        arch = _describe(module, "")
        attributes = _saved_attributes(module)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, value in module.state_dict().items():
            t = value.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            if t.dtype not in _DTYPE_NAMES:
                raise SerializationError(f"tensor {key!r} has dtype {t.dtype}, which pyfusion files cannot store")
            tensors[key] = t
        records = {"format": FORMAT, "architecture": json.dumps(arch), "attributes": json.dumps(attributes)}

        def same(reloaded: nn.Module) -> None:
            _same_contents(module, tensors, reloaded)

    else:
        records, tensors, reload_factory = mf.encode(module, factory)

        def same(reloaded: nn.Module) -> None:
            mf.same_contents(module, reloaded)

    checksum = _digest(
        records.values(), ((k, _DTYPE_NAMES[t.dtype], tuple(t.shape), _tensor_bytes(t)) for k, t in tensors.items())
    )
    payload = st_save(tensors, metadata={**records, "checksum": checksum})
    if not target.parent.exists():
        raise FileNotFoundError(f"cannot save to {str(target)!r}: directory {str(target.parent)!r} does not exist")
    with _TerminationCleanup() as cleanup:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        cleanup.path = tmp
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if verify or check is not None:
                reloaded = _load(Path(tmp), "cpu", verify=True, shown=str(target), factory=reload_factory)
                if verify:
                    same(reloaded)
                if check is not None:
                    check(reloaded)
            os.replace(tmp, target)
            cleanup.path = None
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); file systems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class _Entry:
    """One tensor of the file's header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_header(where: str, raw: bytes, data_len: int) -> tuple[dict[str, str], dict[str, _Entry]]:
    """The header's metadata and tensor entries, every field checked (types, dtypes, sizes, offsets)."""

    def bad(what: str) -> SerializationError:
        return SerializationError(f"{where} is corrupted: {what}")

    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad(f"its header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not an object of strings")
    entries: dict[str, _Entry] = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"the entry of tensor {name!r} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}; expected a list of at most {MAX_NDIM} integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected [start, end] with integers >= 0")
        start, end = offsets
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - start != nbytes:
            raise bad(
                f"tensor {name!r} of shape {tuple(shape)} {dtype} needs {nbytes} bytes; its offsets give {end - start}"
            )
        entries[name] = _Entry(dtype, tuple(shape), start, end)
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end))
    pos = 0
    for name, e in ordered:
        if e.start != pos:
            what = "overlaps the previous tensor" if e.start < pos else f"leaves a gap of {e.start - pos} bytes"
            raise bad(f"tensor {name!r} (bytes {e.start}-{e.end} of the data) {what}")
        pos = e.end
    if pos > data_len:
        raise SerializationError(
            f"{where} is truncated: the tensors need {pos} bytes of data but the file has {data_len}"
        )
    if pos < data_len:
        raise bad(f"{data_len - pos} bytes follow the last tensor")
    return metadata, entries


def _check_tree(where: str, arch: Any, *, allow_member: bool = False) -> int:
    """Every node an object ``{type: str, config: object, children: object}``, depth and size within the limits;
    returns the number of nodes. With ``allow_member`` (``pyfusion.module/2`` changes) a node may also be a leaf
    ``{"type": "@member", "class": str, "source": str}``: a copy of the member architecture's module at ``source``.

    Iterative, so a forged 10 000-deep tree is refused here instead of overflowing the stack later.
    """
    stack: list[tuple[Any, str, int]] = [(arch, "", 0)]
    count = 0
    while stack:
        node, path, depth = stack.pop()
        at = path or "<root>"
        count += 1
        if count > MAX_NODES:
            raise SerializationError(f"{where}: the architecture has more than {MAX_NODES} modules (limit)")
        if depth > MAX_DEPTH:
            raise SerializationError(f"{where}: the architecture is nested deeper than {MAX_DEPTH} levels (limit)")
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise SerializationError(
                f"{where}: architecture node {at!r} is malformed (expected an object with a string 'type')"
            )
        if node["type"] == "@member":
            if not allow_member:
                raise SerializationError(f"{where}: architecture node {at!r} refers to a member module")
            if set(node) != {"type", "class", "source"} or not all(
                isinstance(node[k], str) and len(node[k]) <= 100_000 for k in ("class", "source")
            ):
                raise SerializationError(
                    f"{where}: member node {at!r} is malformed (expected exactly type, class and source strings)"
                )
            continue
        extra = sorted(set(node) - {"type", "config", "children"})
        if extra:
            raise SerializationError(f"{where}: architecture node {at!r} has unknown fields {extra}")
        if not isinstance(node.get("config", {}), dict):
            raise SerializationError(f"{where}: the config of architecture node {at!r} is not an object")
        children = node.get("children", {})
        if not isinstance(children, dict):
            raise SerializationError(f"{where}: the children of architecture node {at!r} are not an object")
        for name, child in children.items():
            if not name or "." in name:
                raise SerializationError(
                    f"{where}: architecture node {at!r} has a child named {name!r} (module "
                    "names are non-empty and contain no '.')"
                )
            stack.append((child, f"{path}.{name}" if path else name, depth + 1))
    return count


def _rebuild(
    where: str,
    node: dict[str, Any],
    path: str,
    member: Callable[[dict[str, Any], str], nn.Module] | None = None,
) -> nn.Module:
    """Build the module tree of a checked architecture (:func:`_check_tree`), under the caller's device;
    ``member(node, path)`` gives the module of a ``@member`` leaf (``pyfusion.module/2`` files)."""
    at = path or "<root>"
    if node["type"] == "@member" and member is not None:
        return member(node, path)
    spec = _REGISTRY.get(node["type"])
    if spec is None:
        raise SerializationError(
            f"{where}: architecture node {at!r} has type {node['type']!r}, which is not an allowed module type "
            "(register it with pyfusion.serialization.register_module before loading)"
        )
    config = dict(node.get("config", {}))
    if spec.fields is not None and set(config) - spec.fields:
        raise SerializationError(
            f"{where}: module {at!r} of type {node['type']} has unexpected config keys "
            f"{sorted(set(config) - spec.fields)}; it takes {sorted(spec.fields)}"
        )
    try:
        try:
            module = spec.from_config(config)
        except Exception:
            if spec.fields is not None or torch.empty(0).device.type != "meta":
                raise
            # a user's class that needs real tensors to construct (e.g. reads a value): build it on the CPU; its
            # tensors are still checked against the file before they are loaded
            with torch.device("cpu"):
                module = spec.from_config(config)
    except Exception as exc:
        raise SerializationError(
            f"{where}: cannot rebuild module {at!r} of type {node['type']}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(module, spec.cls):
        raise SerializationError(f"{where}: from_config of {node['type']} returned {type(module).__name__}")
    if spec.fields is not None:
        try:
            canon = json.loads(json.dumps(spec.get_config(module)))
        except Exception as exc:  # pragma: no cover - a registration bug
            raise SerializationError(f"{where}: module {at!r}: its config cannot be read back ({exc})") from exc
        if canon != config:
            diff = sorted(k for k in set(canon) | set(config) if canon.get(k, ...) != config.get(k, ...))
            said = {k: config.get(k) for k in diff}
            gives = {k: canon.get(k) for k in diff}
            raise SerializationError(
                f"{where}: module {at!r} of type {node['type']} has invalid config values for {diff} "
                f"(the file says {said}, they build {gives})"
            )
    for name, child in node.get("children", {}).items():
        built = _rebuild(where, child, f"{path}.{name}" if path else name, member)
        try:
            if isinstance(module, nn.ModuleList):
                if name != str(len(module)):
                    raise KeyError(f"ModuleList children must be named 0, 1, ... in order; got {name!r}")
                module.append(built)
            else:
                module.add_module(name, built)
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"{where}: cannot attach child {name!r} to module {at!r}: {exc}") from exc
    return module


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "integer"


def _has_meta_tensors(module: nn.Module) -> bool:
    for m in module.modules():
        for v in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()):
            if isinstance(v, torch.Tensor) and v.is_meta:
                return True
    return False


def _check_entries(where: str, expected: dict[str, torch.Tensor], entries: dict[str, _Entry]) -> None:
    """The file holds exactly the tensors ``expected`` names, with their shapes and dtype kinds (nothing is read)."""
    missing = [k for k in expected if k not in entries]
    if missing:
        raise SerializationError(
            f"{where} is missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    unexpected = [k for k in entries if k not in expected]
    if unexpected:
        raise SerializationError(f"{where} has tensor {unexpected[0]!r}, which the architecture does not use")
    for k, v in expected.items():
        e = entries[k]
        if e.shape != tuple(v.shape):
            raise SerializationError(
                f"{where}: tensor {k!r} has shape {e.shape} in the file, but the architecture expects {tuple(v.shape)}"
            )
        if _kind(_DTYPES[e.dtype]) != _kind(v.dtype):
            raise SerializationError(
                f"{where}: tensor {k!r} is {e.dtype} in the file, but the architecture expects "
                f"a {_kind(v.dtype)} tensor"
            )


def _checksum_status(
    where: str,
    records: list[str],
    stored: str | None,
    entries: dict[str, _Entry],
    data: bytes,
    base: int,
    verify: bool,
) -> str:
    """Verify the checksum of the records and tensor bytes: "verified", "skipped" (``verify=False``) or "absent"."""
    if stored is not None and verify:
        view = memoryview(data)
        actual = _digest(
            records, ((k, e.dtype, e.shape, view[base + e.start : base + e.end]) for k, e in entries.items())
        )
        if actual != stored:
            raise SerializationError(
                f"{where} is corrupted: its checksum does not match its contents (stored {stored[:23]}..., "
                f"computed {actual[:23]}...); the file was damaged or edited after it was saved"
            )
        return "verified"
    if stored is not None:
        return "skipped"
    warnings.warn(
        f"{where} has no checksum (written before pyfusion checksummed its files): its integrity is not "
        "verified; save it again to add one",
        UnverifiedFileWarning,
        stacklevel=5,  # the caller of pyfusion.load
    )
    return "absent"


def _read_tensors(where: str, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as exc:
        raise SerializationError(f"{where} is corrupted: safetensors could not read it ({exc})") from exc


def _load_tree(
    where: str, metadata: dict[str, str], entries: dict[str, _Entry], data: bytes, base: int, verify: bool
) -> tuple[nn.Module, Any, str]:
    """A ``pyfusion.module/1`` file: the allowlisted module tree of its architecture record."""
    # save writes exactly these records (files from before checksums: the first three), so a damaged key cannot
    # turn a checksummed file into an unchecked one
    unknown = sorted(set(metadata) - {"format", "architecture", "attributes", "checksum"})
    if unknown:
        raise SerializationError(f"{where} is corrupted: unknown metadata records {unknown}")
    for record in ("architecture", "attributes") if "checksum" in metadata else ("architecture",):
        if record not in metadata:
            raise SerializationError(f"{where} is corrupted: it has no {record} record")
    try:
        arch = json.loads(metadata["architecture"])
        attributes = json.loads(metadata.get("attributes", "{}"))
    except (ValueError, RecursionError) as exc:
        raise SerializationError(
            f"{where} is corrupted: architecture record unreadable ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    _check_tree(where, arch)
    if not isinstance(attributes, dict) or not all(isinstance(v, dict) for v in attributes.values()):
        raise SerializationError(f"{where} is corrupted: the attributes record is not an object of objects")
    # 1. the architecture on the meta device: no memory, whatever the file declares
    try:
        with torch.device("meta"):
            module = _rebuild(where, arch, "")
    except RecursionError:  # pragma: no cover - depth is limited by _check_tree
        raise SerializationError(f"{where}: the architecture is nested too deeply") from None
    # 2. names, shapes and dtypes against the file's header, before a byte of tensor data is read
    _check_entries(where, module.state_dict(), entries)
    # 3. integrity of the records and the tensor bytes
    records = [metadata["format"], metadata["architecture"], metadata.get("attributes", "{}")]
    status = _checksum_status(where, records, metadata.get("checksum"), entries, data, base, verify)
    # 4. the tensors, assigned to the module (dtypes as saved)
    tensors = _read_tensors(where, data)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
        if _has_meta_tensors(module):  # state outside the state dict (non-persistent buffers): build for real
            module = _rebuild(where, arch, "")
            module.load_state_dict(tensors, strict=True, assign=True)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"{where}: the tensors do not load into the architecture: {exc}") from exc
    return module, attributes, status


def _load_member(
    where: str,
    metadata: dict[str, str],
    entries: dict[str, _Entry],
    data: bytes,
    base_offset: int,
    verify: bool,
    factory: Callable[[], nn.Module] | None,
) -> tuple[nn.Module, Any, str]:
    """A ``pyfusion.module/2`` file: the member architecture (the caller's factory or a Hugging Face config), checked
    against the file's description of it, then the recorded changes, then the tensors (see
    :mod:`pyfusion._member_files`)."""
    from pyfusion import _member_files as mf

    base, changes, ties, attributes = mf.parse_records(where, metadata)
    what = "the factory" if base["kind"] == "user" else f"{base['class']} built from the file's config"
    tensors: dict[str, torch.Tensor] | None = None
    status = "absent"
    # meta first; a user class holding tensors outside its parameters and buffers (a plain tensor attribute) is then
    # built for real on the CPU, its shapes already checked against the file
    for device in ("meta", "cpu"):
        model = mf.build_base(where, base, factory, device)
        mf.check_member(where, model, base, what)
        member = mf.meta_replica(model) if base["kind"] == "user" else None
        mf.apply_changes(where, model, changes, device)
        expected, transient = mf.expected_tensors(model)
        aliases = mf.check_ties(where, ties, expected)
        _check_entries(where, {k: v for k, v in expected.items() if k not in aliases}, entries)
        if tensors is None:
            records = [metadata[r] for r in mf.RECORDS]
            status = _checksum_status(where, records, metadata["checksum"], entries, data, base_offset, verify)
            tensors = _read_tensors(where, data)
        mf.assign(where, model, tensors, aliases, transient, ties)
        if not _has_meta_tensors(model):
            break
        if base["kind"] != "user":
            raise SerializationError(
                f"{where}: the {base['class']} built from the config keeps tensors outside its parameters and "
                "buffers, which a file cannot restore"
            )
    else:
        raise SerializationError(f"{where}: the factory builds meta tensors outside the model's parameters and buffers")
    if member is not None:  # a reloaded model saves again with the same member architecture
        model.fusion_member_architecture = mf.MemberArchitecture(member)
    return model, attributes, status


def _load(
    p: Path,
    map_location: str | torch.device,
    *,
    verify: bool,
    shown: str | None = None,
    factory: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    where = repr(shown if shown is not None else str(p))
    size = p.stat().st_size
    with p.open("rb") as f:
        data = f.read()
    if len(data) != size or len(data) < 8:
        if len(data) < 8:
            raise SerializationError(f"{where} is not a pyfusion model file: it is only {len(data)} bytes long")
        raise SerializationError(f"{where} changed while it was read")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise SerializationError(
            f"{where} is truncated: its header claims {header_len} bytes but the file has {len(data) - 8}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise SerializationError(f"{where} has a header of {header_len} bytes (limit {MAX_HEADER_BYTES})")
    metadata, entries = _parse_header(where, data[8 : 8 + header_len], len(data) - 8 - header_len)
    fmt = metadata.get("format")
    if fmt == FORMAT:
        module, attributes, status = _load_tree(where, metadata, entries, data, 8 + header_len, verify)
    elif fmt == FORMAT_MEMBER:
        module, attributes, status = _load_member(where, metadata, entries, data, 8 + header_len, verify, factory)
    else:
        raise SerializationError(
            f"{where} is not a pyfusion model file (format {fmt!r}, expected {FORMAT!r} or {FORMAT_MEMBER!r}); "
            "a plain state dict loads with safetensors.torch.load_file"
        )
    del data
    for mpath, m in module.named_modules():
        check = _VALIDATORS.get(type(m))
        if check is not None:
            try:
                check(m, where)
            except ValueError as exc:
                raise SerializationError(f"{where}: module {mpath or '<root>'!r} ({type(m).__name__}): {exc}") from None
    mods = dict(module.named_modules())
    for mpath, attrs in attributes.items():
        if mpath in mods:
            for attr, value in attrs.items():
                if attr in SAVED_ATTRIBUTES:
                    setattr(mods[mpath], attr, value)
    try:
        module = module.to(map_location)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"map_location {map_location!r} is not a usable torch device: {exc}") from exc
    module.fusion_checksum = status
    return module.eval()


def load(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    factory: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load a module saved by :func:`save`, in eval mode, never running code the file names.

    Every field of the file is checked before it is used; the architecture is built on the meta device and its
    tensor names, shapes and dtype kinds are compared with the file's before any tensor memory is allocated
    (so a forged header cannot make this allocate more than the file holds); then the checksum is verified.

    * Files of allowlisted modules (``pyfusion.module/1``): the module tree is rebuilt from the allowlist.
    * Files of a user's class (``pyfusion.module/2``, user base): ``factory()`` builds one member (the class the
      members were made of, with their constructor arguments; called under ``torch.device("meta")``); it is checked
      against the member architecture the file describes (modules, classes, tensor shapes, plain attributes, ties),
      then the changes fusion made are applied (re-created / resized / replaced modules, updated size attributes,
      untied parameters) and the tensors loaded.
    * Files of a Hugging Face model (``pyfusion.module/2``, Hugging Face base): rebuilt from the saved config; the
      class must be a ``transformers`` ``PreTrainedModel`` subclass that transformers exports under that name.

    Args:
        path: a file written by :func:`save`.
        map_location: device of the returned module.
        verify: check the checksum (sha256 over the records and the tensor bytes; about 1 s per GB). ``False``
            skips it for speed. Files written before checksums load with a :class:`UnverifiedFileWarning`.
        factory: a callable returning one member-architecture model, for files of a user's class (e.g. ``Net`` or
            ``lambda: Net(hidden=64)``); ignored by the other files.

    Returns:
        The module, with ``fusion_checksum`` set to "verified", "skipped" (``verify=False``) or "absent" (an
        older file), and its saved fusion records (``fusion_layouts``, ``fusion_info``). Tensors keep the dtypes
        they were saved with.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``factory`` is not callable.
        SerializationError: the file is truncated or corrupted (malformed header, offsets, records, checksum
            mismatch), is not a pyfusion file, exceeds a limit (:data:`MAX_HEADER_BYTES`, :data:`MAX_DEPTH`,
            :data:`MAX_NODES`), names a module type that is not allowed or a config it does not take, its tensors do
            not match the architecture (missing tensor, unexpected tensor, wrong shape or dtype: each named), it
            needs a factory and none was given (the message names the class), or the factory / the config builds
            another member architecture than the file describes (the first difference is named).
    """
    if factory is not None and not callable(factory):
        raise ValueError(f"load: factory must be a callable returning one member model; got {type(factory).__name__}")
    _load_providers()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no pyfusion model file at {str(p)!r}")
    return _load(p, map_location, verify=verify, factory=factory)
