"""Safe save / load of fused and partially fused models: one safetensors file, architecture in its header.

File layout: a standard safetensors file. The tensors are the module's ``state_dict()``; the header's
metadata holds ``format`` (``pyfusion.module/1``), ``architecture`` (the module tree as JSON: each node
``{"type": name, "config": {...}, "children": {name: node}}``), ``attributes`` (JSON-serialisable
fusion records such as layouts) and ``checksum`` (``sha256:<hex>`` of the three records and of every
tensor's name, dtype, shape and bytes).

Loading never trusts the file. Every field of the header is checked (types, dtypes, offsets that tile the
data region exactly, architecture depth <= :data:`MAX_DEPTH` and size <= :data:`MAX_NODES`); the module
tree is rebuilt from an allowlist of module types (torch built-ins, pyfusion's own modules and whatever
the user registers with :func:`register_module`) **on the meta device**, so a forged architecture costs
no memory; its tensor names, shapes and dtypes are compared with the file's before anything is
allocated; the checksum is verified; only then are the file's tensors assigned to the module. Any
inconsistency raises :class:`SerializationError` naming the file and the first problem. Nothing named by
the file is imported or executed.

Writes are atomic: temporary file, fsync, reload and compare (or the caller's ``check``), rename. A
failure at any step (an exception, ``KeyboardInterrupt``, or SIGTERM in the main thread) removes the
temporary file and leaves any previous file at the path intact.
"""

from __future__ import annotations

import hashlib
import importlib
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

        def partial_cfg(m: nn.Module) -> dict[str, Any]:
            act = getattr(m, "activation", "none")
            return {
                "in_layout": list(m.in_layout),
                "out_layout": list(m.out_layout),
                "bias": m.bias is not None,
                "activation": None if act == "none" else act,
            }

        specs: list[tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]], tuple[str, ...]]] = [
            (pnn.PartialLinear, partial_cfg, ("in_layout", "out_layout", "bias", "activation")),
            (
                pnn.PartialConv2d,
                lambda m: {
                    "in_layout": list(m.in_layout),
                    "out_layout": list(m.out_layout),
                    "kernel_size": list(m.kernel_size),
                    "stride": list(m.stride),
                    "padding": list(m.padding),
                    "dilation": list(m.dilation),
                    "bias": m.bias is not None,
                },
                ("in_layout", "out_layout", "kernel_size", "stride", "padding", "dilation", "bias"),
            ),
            (
                pnn.EnsembleLinear,
                lambda m: {
                    "num_members": m.num_members,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "shared_input": m.shared_input,
                    "activation": None if m.activation == "none" else m.activation,
                },
                ("num_members", "in_features", "out_features", "bias", "shared_input", "activation"),
            ),
        ]
        for cls, get, fields in specs:
            if _spec_name_of_class(cls) is None:
                _register(cls, get, _build(cls), fields)
        from pyfusion.nn.ensemble import SubEnsemble

        if _spec_name_of_class(SubEnsemble) is None:
            _register(SubEnsemble, SubEnsemble.get_config, SubEnsemble.from_config, ("num_members", "combine"))
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
) -> Path:
    """Save ``module`` (architecture, tensors and fusion records) to one safetensors file, atomically.

    The file is written to a temporary file beside ``path`` and fsynced. With ``verify`` (default) the temporary
    file is loaded back (all of :func:`load`'s checks, the checksum included) and compared with ``module``
    (module types, bit-identical tensors); then ``check(reloaded)`` runs if given (e.g. compare outputs: raise
    to refuse). Only then does the temporary file replace ``path``. Any failure, ``KeyboardInterrupt`` or
    SIGTERM removes the temporary file and leaves a previous file at ``path`` untouched.

    Args:
        module: the module to save (every submodule of an allowed type, see :func:`register_module`).
        path: the target file (its folder must exist).
        verify: reload and compare before replacing (costs about one :func:`load`; ``False`` for speed).
        check: a further test of the reloaded module, run before replacing ``path``.

    Raises:
        SerializationError: a submodule type is not allowed (names its path and type), a config or record is
            not JSON-serialisable, or the written file does not read back the same. Nothing is left behind.
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    from safetensors.torch import save as st_save

    if not isinstance(module, nn.Module):
        raise SerializationError(f"save: module must be a torch.nn.Module; got {type(module).__name__}")
    _load_providers()
    target = Path(path)
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
                reloaded = _load(Path(tmp), "cpu", verify=True, shown=str(target))
                if verify:
                    _same_contents(module, tensors, reloaded)
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


def _check_tree(where: str, arch: Any) -> None:
    """Every node an object ``{type: str, config: object, children: object}``, depth and size within the limits.

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


def _rebuild(where: str, node: dict[str, Any], path: str) -> nn.Module:
    """Build the module tree of a checked architecture (:func:`_check_tree`), under the caller's device."""
    at = path or "<root>"
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
        built = _rebuild(where, child, f"{path}.{name}" if path else name)
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


def _load(p: Path, map_location: str | torch.device, *, verify: bool, shown: str | None = None) -> nn.Module:
    from safetensors.torch import load as st_load

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
    if metadata.get("format") != FORMAT:
        raise SerializationError(
            f"{where} is not a pyfusion model file (format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "a plain state dict loads with safetensors.torch.load_file"
        )
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
    expected = module.state_dict()
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
    # 3. integrity of the records and the tensor bytes
    stored = metadata.get("checksum")
    status = "absent"
    if stored is not None and verify:
        records = [metadata["format"], metadata["architecture"], metadata.get("attributes", "{}")]
        base = 8 + header_len
        view = memoryview(data)
        actual = _digest(
            records, ((k, e.dtype, e.shape, view[base + e.start : base + e.end]) for k, e in entries.items())
        )
        if actual != stored:
            raise SerializationError(
                f"{where} is corrupted: its checksum does not match its contents (stored {stored[:23]}..., "
                f"computed {actual[:23]}...); the file was damaged or edited after it was saved"
            )
        status = "verified"
    elif stored is not None:
        status = "skipped"
    else:
        warnings.warn(
            f"{where} has no checksum (written before pyfusion checksummed its files): its integrity is not "
            "verified; save it again to add one",
            UnverifiedFileWarning,
            stacklevel=3,
        )
    # 4. the tensors, assigned to the module (dtypes as saved)
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise SerializationError(f"{where} is corrupted: safetensors could not read it ({exc})") from exc
    del data
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
        if _has_meta_tensors(module):  # state outside the state dict (non-persistent buffers): build for real
            module = _rebuild(where, arch, "")
            module.load_state_dict(tensors, strict=True, assign=True)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"{where}: the tensors do not load into the architecture: {exc}") from exc
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


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Load a module saved by :func:`save`, rebuilt from allowed types only, in eval mode.

    Every field of the file is checked before it is used; the architecture is built on the meta device and its
    tensor names, shapes and dtype kinds are compared with the file's before any tensor memory is allocated
    (so a forged header cannot make this allocate more than the file holds); then the checksum is verified.

    Args:
        path: a file written by :func:`save`.
        map_location: device of the returned module.
        verify: check the checksum (sha256 over the records and the tensor bytes; about 1 s per GB). ``False``
            skips it for speed. Files written before checksums load with a :class:`UnverifiedFileWarning`.

    Returns:
        The module, with ``fusion_checksum`` set to "verified", "skipped" (``verify=False``) or "absent" (an
        older file), and its saved fusion records (``fusion_layouts``, ``fusion_info``). Tensors keep the dtypes
        they were saved with.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SerializationError: the file is truncated or corrupted (malformed header, offsets, checksum mismatch), is
            not a pyfusion file, exceeds a limit (:data:`MAX_HEADER_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_NODES`),
            names a module type that is not allowed or a config it does not take, or its tensors do not match
            the architecture (missing tensor, unexpected tensor, wrong shape or dtype: each named).
    """
    _load_providers()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no pyfusion model file at {str(p)!r}")
    return _load(p, map_location, verify=verify)
