"""Safe save / load of fused and partially fused models: one safetensors file, architecture in its header.

File layout: a standard safetensors file. The tensors are the module's ``state_dict()``; the header's
metadata holds ``format`` (``pyfusion.module/1``), ``architecture`` (the module tree as JSON: each node
``{"type": name, "config": {...}, "children": {name: node}}``) and ``attributes`` (JSON-serialisable
fusion records such as layouts). Loading rebuilds the tree from an allowlist of module types (torch
built-ins, pyfusion's own modules and whatever the user registers with :func:`register_module`): it never
imports or executes code named by the file. Writes are atomic (temporary file, fsync, rename), so a
failed save leaves any previous file intact.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "SerializationError", "load", "register_module", "save"]

FORMAT = "pyfusion.module/1"
SAVED_ATTRIBUTES = ("fusion_layouts", "fusion_info")
# Modules that register their classes when imported (pyfusion's own layers and reference models).
_PYFUSION_PROVIDERS = ("pyfusion.nn", "pyfusion.models")


class SerializationError(ValueError):
    """A module that cannot be saved, or a file that cannot be loaded (says which and why)."""


@dataclass(frozen=True)
class _Spec:
    cls: type[nn.Module]
    get_config: Callable[[nn.Module], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], nn.Module]


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

    reg = register_module
    reg(nn.Linear, with_bias("in_features", "out_features"), _build(nn.Linear), name="torch.nn.Linear")
    conv_fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    for cls in (nn.Conv1d, nn.Conv2d):
        g = with_bias(*conv_fields, "padding_mode")
        reg(cls, g, _build(cls), name=f"torch.nn.{cls.__name__}")
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        g = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
        reg(cls, g, _build(cls), name=f"torch.nn.{cls.__name__}")
    reg(
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
        _build(nn.LayerNorm),
        name="torch.nn.LayerNorm",
    )
    reg(
        nn.GroupNorm,
        _attrs("num_groups", "num_channels", "eps", "affine"),
        _build(nn.GroupNorm),
        name="torch.nn.GroupNorm",
    )
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
        reg(cls, _attrs(*fields), _build(cls), name=f"torch.nn.{cls.__name__}")
    # Containers: children are built from their own nodes and attached in order.
    for cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        reg(cls, lambda m: {}, lambda cfg, _c=cls: _c(), name=f"torch.nn.{cls.__name__}")


_register_builtins()


def _load_providers() -> None:
    for mod in _PYFUSION_PROVIDERS:
        try:
            importlib.import_module(mod)
        except ImportError:  # a provider that is not part of this build
            pass


def _spec_name(module: nn.Module) -> str | None:
    cls = type(module)
    for name, spec in _REGISTRY.items():
        if spec.cls is cls:
            return name
    return None


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
        json.dumps(config)
    except TypeError as exc:
        raise SerializationError(f"config of module {path or '<root>'!r} is not JSON-serialisable: {exc}") from exc
    children = {n: _describe(c, f"{path}.{n}" if path else n) for n, c in module.named_children()}
    return {"type": name, "config": config, "children": children}


def _rebuild(node: Any, path: str) -> nn.Module:
    where = path or "<root>"
    if not isinstance(node, dict) or "type" not in node:
        raise SerializationError(f"architecture node {where!r} is malformed (expected an object with a 'type')")
    spec = _REGISTRY.get(node["type"])
    if spec is None:
        raise SerializationError(
            f"architecture node {where!r} has type {node['type']!r}, which is not an allowed module type "
            "(register it with pyfusion.serialization.register_module before loading)"
        )
    try:
        module = spec.from_config(dict(node.get("config", {})))
    except Exception as exc:
        raise SerializationError(f"cannot rebuild module {where!r} of type {node['type']}: {exc}") from exc
    for name, child in node.get("children", {}).items():
        built = _rebuild(child, f"{path}.{name}" if path else name)
        if isinstance(module, nn.ModuleList) and name.isdigit():
            module.append(built)
        else:
            module.add_module(name, built)
    return module


def _saved_attributes(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, m in module.named_modules():
        for attr in SAVED_ATTRIBUTES:
            if hasattr(m, attr):
                value = getattr(m, attr)
                try:
                    json.dumps(value)
                except TypeError as exc:
                    raise SerializationError(f"attribute {attr!r} of {path or '<root>'!r} is not JSON: {exc}") from exc
                out.setdefault(path, {})[attr] = value
    return out


def save(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save ``module`` (architecture, tensors and fusion records) to one safetensors file, atomically.

    Raises:
        SerializationError: a submodule type is not allowed (names its path and type), or a config or
            record is not JSON-serialisable. Nothing is written in that case.
    """
    from safetensors.torch import save as st_save

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
        tensors[key] = t
    metadata = {
        "format": FORMAT,
        "architecture": json.dumps(arch),
        "attributes": json.dumps(attributes),
    }
    payload = st_save(tensors, metadata=metadata)
    if not target.parent.exists():
        raise FileNotFoundError(f"cannot save to {str(target)!r}: directory {str(target.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors.torch import load as st_load

    data = path.read_bytes()
    if len(data) < 8:
        raise SerializationError(f"{str(path)!r} is not a pyfusion model file: it is only {len(data)} bytes long")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise SerializationError(
            f"{str(path)!r} is truncated: its header claims {header_len} bytes but the file has {len(data) - 8}"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise SerializationError(f"{str(path)!r} is corrupted: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SerializationError(f"{str(path)!r} is corrupted: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if len(data) < expected:
        raise SerializationError(
            f"{str(path)!r} is truncated: the tensors need {expected} bytes but the file has {len(data)}"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise SerializationError(f"{str(path)!r} is corrupted: safetensors could not read it ({exc})") from exc
    return metadata, tensors


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a module saved by :func:`save`, rebuilt from allowed types only, in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SerializationError: the file is truncated or corrupted, is not a pyfusion file, names a module
            type that is not allowed, or its tensors do not match the architecture (missing tensor,
            unexpected tensor, wrong shape: each named).
    """
    _load_providers()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no pyfusion model file at {str(p)!r}")
    metadata, tensors = _read(p)
    if metadata.get("format") != FORMAT:
        raise SerializationError(
            f"{str(p)!r} is not a pyfusion model file (format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "a plain state dict loads with safetensors.torch.load_file"
        )
    try:
        arch = json.loads(metadata["architecture"])
        attributes = json.loads(metadata.get("attributes", "{}"))
    except (KeyError, ValueError) as exc:
        raise SerializationError(f"{str(p)!r} is corrupted: architecture record unreadable ({exc})") from exc
    module = _rebuild(arch, "")
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise SerializationError(
            f"{str(p)!r} is missing tensor {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise SerializationError(f"{str(p)!r} has tensor {unexpected[0]!r}, which the architecture does not use")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise SerializationError(
                f"{str(p)!r}: tensor {k!r} has shape {tuple(tensors[k].shape)} in the file, "
                f"but the architecture expects {tuple(v.shape)}"
            )
    module.load_state_dict(tensors, strict=True)
    mods = dict(module.named_modules())
    for mpath, attrs in attributes.items():
        if mpath in mods:
            for attr, value in attrs.items():
                if attr in SAVED_ATTRIBUTES:
                    setattr(mods[mpath], attr, value)
    return module.to(map_location).eval()
