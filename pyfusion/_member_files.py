"""Files of models the allowlist cannot rebuild alone (format ``pyfusion.module/2``): a user's class or a Hugging Face
model, fused or not. Used by :mod:`pyfusion.serialization`, which owns the file layout, checksum and atomic writes.

A fused model is a deep copy of member 0 in which the builder re-created or resized modules, replaced some by
pyfusion modules and untied parameters (:mod:`pyfusion.fuse.builder`). Such a file holds, besides the tensors:

``base``
    how to rebuild one member: ``{"kind": "huggingface", "class": <name in transformers' namespace>, "config":
    config.to_dict(), "attn_implementation": ...}`` (rebuilt from the config) or ``{"kind": "user", "class":
    <qualified name>}`` (rebuilt by the caller's ``factory``; the name is only compared and shown, never imported).
    ``modules`` describes that member architecture module by module (path -> class, tensor shapes of its
    parameters / buffers / non-persistent buffers, plain attributes) and ``ties`` its tied tensors: the rebuilt
    member is checked against it before anything else, so a factory of another architecture (or a config that
    disagrees with the file) is a precise error instead of a silently different model.
``changes``
    what turns the member into the saved model, in pre-order of module paths: ``replace`` (a module re-created with
    other sizes or replaced by a pyfusion module: an allowlisted module tree as in ``pyfusion.module/1``, whose
    ``{"type": "@member", "source": path}`` leaves are copies of the member's module at ``path``, e.g. the member
    norms of a :class:`~pyfusion.nn.norm.MemberViewNorm`), ``resize`` (new shapes of a member module's own tensors)
    ``set`` (plain attributes an adapter updated, e.g. a head count) and ``config`` (the integer sizes a module reads
    from its own view of the shared Hugging Face config, :class:`pyfusion._module_config.ModuleConfig`: Phi-3's
    attention reads its head counts there).
``ties``
    groups of tensor names that are one tensor in the saved model (stored once, under the first name); tied
    parameters of the member that are not tied here were untied by fusion.

The loader builds the member on the meta device, checks it against ``base.modules``, applies the changes (still on
the meta device), compares every tensor name, shape and dtype kind with the file, verifies the checksum and only
then assigns the file's tensors (non-persistent buffers included, so the model is restored bit for bit).
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from pyfusion import serialization as _s
from pyfusion._module_config import ModuleConfig
from pyfusion.serialization import MAX_DEPTH, MAX_NDIM, MAX_NODES, SerializationError

FORMAT = _s.FORMAT_MEMBER
# the metadata records of a file, in the order the checksum reads them
RECORDS = ("format", "base", "changes", "ties", "attributes")
# attention implementations a file may ask transformers for (never a hub kernel, which would download code)
ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})
# nn.Module's own bookkeeping (hooks, training flag...) and transformers' initialisation marker are not architecture
_INTERNAL = frozenset(vars(nn.Module())) | {"_is_hf_initialized"}
_MEMBER = "@member"
_HF_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_SKIP = object()
_ENTRY_FIELDS = {"class", "parameters", "buffers", "transient", "attributes"}


# --------------------------------------------------------------------------------------------- member replica
class MemberArchitecture:
    """A meta-device copy of one member (no tensor memory), kept on a fused model as ``fusion_member_architecture``
    so that :func:`pyfusion.save` knows the member architecture of a user class without a factory."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> MemberArchitecture:
        return self  # read-only: copies of the fused model share it

    def __repr__(self) -> str:
        return f"MemberArchitecture({type(self.module).__qualname__}, meta)"


def meta_replica(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors (same shapes, dtypes, ties)."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                )
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(module, memo)


def all_allowed(module: nn.Module) -> bool:
    """Whether every submodule is an allowlisted type (a ``pyfusion.module/1`` file describes it alone)."""
    return all(_s._spec_name(m) is not None for m in module.modules())


def record_member_architecture(fused: nn.Module, member: nn.Module) -> None:
    """Keep a meta replica of ``member`` on ``fused`` when saving it will need one (a user class; the builder's hook).

    Allowlisted trees and Hugging Face models (rebuilt from their config) need none.
    """
    _s._load_providers()
    if all_allowed(member) or _hf_class_name(member) is not None:
        return
    fused.fusion_member_architecture = MemberArchitecture(meta_replica(member))


# --------------------------------------------------------------------------------------------- plain values
def _class_name(m: nn.Module) -> str:
    return _s._type_name(type(m))


def _short(name: str) -> str:
    """A class's own name from its qualified name (``pkg.mod.Outer.Net`` -> ``Net``)."""
    return name.rsplit(".", 1)[-1]


def _same_class_name(a: str, b: str) -> bool:
    # the class's own name decides (a file may be loaded where the class lives in another module, e.g. a script's
    # __main__); shapes and attributes are compared besides
    return a == b or _short(a) == _short(b)


def _same_class(m: nn.Module, name: str) -> bool:
    return _same_class_name(_class_name(m), name)


def _encode(v: Any, nested: bool = False) -> Any:
    """JSON form of a plain attribute value (None, bool, int, float, str, or a flat tuple / list of them); ``_SKIP``
    for anything else. Tuples are ``{"tuple": [...]}``, non-finite floats ``{"float": "nan"}``."""
    if v is None or isinstance(v, (bool, str)):
        return v if not isinstance(v, str) else str(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else {"float": repr(float(v))}
    if not nested and isinstance(v, (tuple, list)):
        items = [_encode(x, True) for x in v]
        if any(x is _SKIP for x in items):
            return _SKIP
        return {"tuple": items} if isinstance(v, tuple) else items
    return _SKIP


def _decode(where: str, v: Any, nested: bool = False) -> Any:
    if v is None or isinstance(v, (bool, str)) or _s._is_int(v) or isinstance(v, float):
        return v
    if isinstance(v, dict) and set(v) == {"float"} and v["float"] in ("nan", "inf", "-inf"):
        return float(v["float"])
    if not nested and isinstance(v, dict) and set(v) == {"tuple"} and isinstance(v["tuple"], list):
        return tuple(_decode(where, x, True) for x in v["tuple"])
    if not nested and isinstance(v, list):
        return [_decode(where, x, True) for x in v]
    raise SerializationError(f"{where} is corrupted: attribute value {str(v)[:80]!r} is not a plain value")


def _same_value(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # True != 1, nan == nan


def scalar_attributes(m: nn.Module) -> dict[str, Any]:
    """The plain attributes of a module (its own ``__dict__``: sizes, flags, names), encoded; nn.Module's bookkeeping,
    ``fusion_*`` records and private dunder names are left out."""
    out = {}
    for k, v in vars(m).items():
        if k in _INTERNAL or k.startswith("__") or k.startswith("fusion_"):
            continue
        e = _encode(v)
        if e is not _SKIP:
            out[k] = e
    return out


# --------------------------------------------------------------------------------------------- module trees
def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) in pre-order over ``_modules`` (a module under two names is listed under both)."""
    stack: list[tuple[str, nn.Module, int]] = [("", model, 0)]
    while stack:
        path, m, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SerializationError(f"cannot save: module {path!r} is nested deeper than {MAX_DEPTH} levels (limit)")
        yield path, m
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        for n, c in reversed(children):
            stack.append((f"{path}.{n}" if path else n, c, depth + 1))


def _tensor_specs(m: nn.Module) -> dict[str, dict[str, list[int]]]:
    """``{"parameters" | "buffers" | "transient": {name: shape}}`` of a module's own tensors (empty kinds left out);
    transient = non-persistent buffers (not in the state dict, stored in the file all the same)."""
    params = {n: list(p.shape) for n, p in m._parameters.items() if p is not None}
    bufs = {n: list(b.shape) for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set}
    trans = {n: list(b.shape) for n, b in m._buffers.items() if b is not None and n in m._non_persistent_buffers_set}
    return {k: v for k, v in (("parameters", params), ("buffers", bufs), ("transient", trans)) if v}


def describe_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """path -> ``{"class", "parameters", "buffers", "transient", "attributes"}`` for every module (a member record)."""
    out: dict[str, dict[str, Any]] = {}
    for path, m in walk(model):
        entry: dict[str, Any] = {"class": _class_name(m), **_tensor_specs(m)}
        attrs = scalar_attributes(m)
        if attrs:
            entry["attributes"] = attrs
        out[path] = entry
        if len(out) > MAX_NODES:
            raise SerializationError(f"cannot save: the model has more than {MAX_NODES} modules (limit)")
    return out


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a file stores under its name: the state dict (parameters, persistent buffers) and the
    non-persistent buffers."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if not isinstance(v, torch.Tensor):
            raise SerializationError(
                f"cannot save: state {k!r} is a {type(v).__name__}, not a tensor (get_extra_state is not supported)"
            )
        out[k] = v
    for path, m in walk(model):
        for n, b in m._buffers.items():
            if b is not None and n in m._non_persistent_buffers_set:
                out.setdefault(f"{path}.{n}" if path else n, b)
    return out


def tie_groups(named: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of one tensor object, in order of first appearance (groups of one name included)."""
    groups: dict[int, list[str]] = {}
    for k, v in named.items():
        groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def _ties(model: nn.Module) -> list[list[str]]:
    return [g for g in tie_groups(named_tensors(model)) if len(g) > 1]


# --------------------------------------------------------------------------------------------- bases
def _hf_class_name(model: nn.Module) -> str | None:
    """The class name of a Hugging Face model that transformers' namespace exports (the loader's allowlist)."""
    tf = sys.modules.get("transformers")
    if tf is None:
        return None
    base = getattr(tf, "PreTrainedModel", None)
    name = type(model).__name__
    if base is None or not isinstance(model, base) or not hasattr(model, "config"):
        return None
    try:
        exported = getattr(tf, name, None)
    except Exception:  # noqa: BLE001 - a lazy import that fails: not exported
        return None
    return name if exported is type(model) else None


def _hf_config_record(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    try:
        config = json.loads(cfg.to_json_string(use_diff=False))
    except Exception as exc:  # noqa: BLE001 - transformers' own serialisation
        raise SerializationError(f"cannot save: the config of {type(model).__name__} is not JSON ({exc})") from exc
    impl = getattr(cfg, "_attn_implementation", None)
    if impl is not None and impl not in ATTN_IMPLEMENTATIONS:
        raise SerializationError(
            f"cannot save {type(model).__name__}: attention implementation {impl!r} is not one a file may request "
            f"({sorted(ATTN_IMPLEMENTATIONS)})"
        )
    return {"kind": "huggingface", "class": type(model).__name__, "config": config, "attn_implementation": impl}


# private config keys that describe the architecture only (a flag the model's __init__ reads), allowed as booleans
_BENIGN_PRIVATE_KEYS = frozenset({"_remove_final_layer_norm"})  # OPTConfig: no final LayerNorm (OPT-350m)


def _benign_private(key: str, value: Any) -> bool:
    return key in _BENIGN_PRIVATE_KEYS and isinstance(value, bool)


def _check_hf_config(where: str, config: Any) -> None:
    """A config object of bounded size whose keys do not ask transformers to run or fetch code."""
    stack: list[tuple[Any, int]] = [(config, 0)]
    count = 0
    while stack:
        v, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH or count > MAX_NODES:
            raise SerializationError(f"{where}: the Hugging Face config is nested too deeply or too large (limit)")
        if isinstance(v, dict):
            for k, x in v.items():
                if (
                    k in ("auto_map", "trust_remote_code")
                    or "attn_implementation" in k
                    or (k.startswith("_") and k != "_name_or_path" and not _benign_private(k, x))
                ):
                    raise SerializationError(
                        f"{where}: the Hugging Face config has key {k!r}, which a file may not set"
                    )
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _hf_model(where: str, base: dict[str, Any]) -> nn.Module:
    """The member rebuilt from the config, on the meta device; the class must be a PreTrainedModel subclass that
    transformers exports under that name (an allowlist: nothing else is looked up or imported)."""
    name = base["class"]
    if not _HF_NAME.fullmatch(name):
        raise SerializationError(f"{where}: Hugging Face class name {name!r} is not a plain class name")
    try:
        import transformers as tf
    except ImportError as exc:
        raise SerializationError(
            f"{where} holds a Hugging Face {name}; loading it needs transformers (pip install 'pyfusion[hf]')"
        ) from exc
    try:
        cls = getattr(tf, name, None)
    except Exception:  # noqa: BLE001 - transformers' lazy import of that name failed
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel) and cls is not tf.PreTrainedModel):
        raise SerializationError(
            f"{where}: {name!r} is not a Hugging Face model class of transformers {tf.__version__} (a PreTrainedModel "
            "subclass in the transformers namespace)"
        )
    config = base["config"]
    _check_hf_config(where, config)
    impl = base.get("attn_implementation")
    if impl is not None and impl not in ATTN_IMPLEMENTATIONS:
        raise SerializationError(
            f"{where}: attention implementation {impl!r} is not one of {sorted(ATTN_IMPLEMENTATIONS)}"
        )
    config_class = getattr(cls, "config_class", None)
    model_type = getattr(config_class, "model_type", "")
    if model_type and config.get("model_type") != model_type:
        raise SerializationError(
            f"{where}: the config is for model type {config.get('model_type')!r}, but {name} takes {model_type!r}"
        )
    # a forged config (num_hidden_layers = 10**6) would take hours to build even on the meta device: stop as soon as
    # it builds more modules than the file describes (a hook of this thread only; 2000 BERT layers take 14 s)
    # (when saving, the record has no member description yet: the model itself was built from that config)
    limit = 2 * len(base["modules"]) + 64 if "modules" in base else MAX_NODES
    count = [0]
    me = threading.get_ident()

    def bound(module: nn.Module, name: str, sub: nn.Module | None) -> None:
        if threading.get_ident() == me:
            count[0] += 1
            if count[0] > limit:
                raise _Oversized(limit)

    handle = register_module_module_registration_hook(bound)
    try:
        cfg = config_class.from_dict(copy.deepcopy(config), **({"attn_implementation": impl} if impl else {}))
        with torch.device("meta"):
            model = cls(cfg)
    except _Oversized:
        raise SerializationError(
            f"{where}: the config builds more than {limit} modules, the file describes {len(base['modules'])}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure of transformers on the file's config
        raise SerializationError(
            f"{where}: cannot build {name} from the file's config ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    finally:
        handle.remove()
    impl_now = getattr(model.config, "_attn_implementation", None)
    if impl_now is not None and impl_now not in ATTN_IMPLEMENTATIONS:
        raise SerializationError(f"{where}: the config selects attention implementation {impl_now!r}")
    return model


class _Oversized(Exception):
    """Raised inside a module registration hook: the build is larger than the file says."""


def _call_factory(where: str, factory: Callable[[], nn.Module], device: str) -> nn.Module:
    """One member from the caller's factory: built on ``device`` (meta: no memory; a constructor that cannot run on
    the meta device is run on the CPU), then copied, so that a factory returning an existing model never sees it
    modified."""
    try:
        with torch.device(device):
            model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        if device != "meta":
            raise SerializationError(f"{where}: the factory raised {type(exc).__name__}: {exc}") from exc
        try:
            with torch.device("cpu"):
                model = factory()
        except Exception as exc2:  # noqa: BLE001
            raise SerializationError(f"{where}: the factory raised {type(exc2).__name__}: {exc2}") from exc2
    if not isinstance(model, nn.Module):
        raise SerializationError(f"{where}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return meta_replica(model) if device == "meta" else copy.deepcopy(model)


def _factory_needed(where: str, base: dict[str, Any]) -> SerializationError:
    name = base["class"]
    short = _short(name)
    return SerializationError(
        f"{where} holds a model of class {name!r}, which pyfusion does not import (a file never names code to run) "
        f"and cannot rebuild alone: pass the function that builds one member, pyfusion.load(path, factory=...), e.g. "
        f"factory={short} or factory=lambda: {short}(<the members' constructor arguments>)"
    )


def build_base(where: str, base: dict[str, Any], factory: Callable[[], nn.Module] | None, device: str) -> nn.Module:
    """The member architecture of a checked ``base`` record, built on ``device`` (meta, or cpu for the fallback)."""
    if base["kind"] == "huggingface":
        if device != "meta":
            raise SerializationError(f"{where}: the {base['class']} keeps tensors outside its parameters and buffers")
        return _hf_model(where, base)
    if factory is None:
        raise _factory_needed(where, base)
    return _call_factory(where, factory, device)


def check_member(where: str, model: nn.Module, base: dict[str, Any], what: str) -> None:
    """The rebuilt member is the architecture the file was saved with: same modules, classes, tensor shapes, plain
    attributes and ties (the first difference is named)."""
    want: dict[str, Any] = base["modules"]
    got = describe_modules(model)
    intro = f"{where}: {what} does not build the member architecture this file was saved with"
    for path, w in want.items():  # pre-order: the root's class first
        at = path or "<root>"
        if path not in got:
            raise SerializationError(f"{intro}: it has no module {at!r} ({w['class']})")
        if not _same_class_name(got[path]["class"], w["class"]):
            raise SerializationError(f"{intro}: module {at!r} is a {got[path]['class']}, the file's is a {w['class']}")
    for path, g in got.items():
        at = path or "<root>"
        w = want.get(path)
        if w is None:
            raise SerializationError(f"{intro}: it has a module {at!r} ({g['class']}) the file does not know")
        for kind in ("parameters", "buffers", "transient"):
            a, b = g.get(kind, {}), w.get(kind, {})
            for n in sorted(set(a) | set(b)):
                if a.get(n) != b.get(n):
                    mine = tuple(a[n]) if n in a else "none"
                    theirs = tuple(b[n]) if n in b else "none"
                    raise SerializationError(
                        f"{intro}: {kind[:-1] if kind != 'transient' else 'non-persistent buffer'} {at}.{n} has "
                        f"shape {mine}, the file's member has {theirs}"
                    )
    for path, g in got.items():  # sizes first (the telling difference), then the plain attributes
        a, b = g.get("attributes", {}), want[path].get("attributes", {})
        for n in sorted(set(a) | set(b)):
            if not _same_value(a.get(n, _MISSING), b.get(n, _MISSING)):
                raise SerializationError(
                    f"{intro}: attribute {path or '<root>'}.{n} is {_show(a.get(n, _MISSING))}, the file's member "
                    f"has {_show(b.get(n, _MISSING))}"
                )
    ties = _ties(model)
    if sorted(map(sorted, ties)) != sorted(map(sorted, base["ties"])):
        raise SerializationError(f"{intro}: its tied tensors are {ties}, the file's member has {base['ties']}")


_MISSING = "<absent>"


def _show(v: Any) -> str:
    return "absent" if v == _MISSING else json.dumps(v)[:80]


# --------------------------------------------------------------------------------------------- save: changes
def _config(m: nn.Module, path: str) -> dict[str, Any]:
    config = _s._REGISTRY[_s._spec_name(m)].get_config(m)
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"config of module {path or '<root>'!r} is not JSON-serialisable: {exc}") from exc


def _tensor_changes(f: nn.Module, b: nn.Module, path: str) -> dict[str, list[int]]:
    sf, sb = _tensor_specs(f), _tensor_specs(b)
    out: dict[str, list[int]] = {}
    for kind in ("parameters", "buffers", "transient"):
        a, c = sf.get(kind, {}), sb.get(kind, {})
        if set(a) != set(c):
            raise SerializationError(
                f"cannot save module {path or '<root>'!r} ({_class_name(f)}): its {kind} {sorted(a)} differ from the "
                f"member architecture's {sorted(c)} (a file can resize a module's tensors, not add or remove them)"
            )
        out.update({n: s for n, s in a.items() if s != c[n]})
    return out


def _attribute_changes(f: nn.Module, b: nn.Module, path: str) -> dict[str, Any]:
    af, ab = scalar_attributes(f), scalar_attributes(b)
    at = path or "<root>"
    out = {}
    for n, v in af.items():
        if n not in ab:
            if n in vars(b) or hasattr(type(b), n):
                raise SerializationError(
                    f"cannot save module {at!r}: attribute {n!r} is not a plain value in the member"
                )
            out[n] = v
        elif not _same_value(v, ab[n]):
            out[n] = v
    for n in ab:
        if n not in af:
            raise SerializationError(
                f"cannot save module {at!r}: attribute {n!r} of the member architecture is no longer a plain value "
                "(None, bool, int, float, str or a flat tuple / list of them)"
            )
    return out


def _config_overrides(f: nn.Module, b: nn.Module, path: str) -> dict[str, int]:
    """The sizes ``f`` reads from its own view of the config (:class:`ModuleConfig`), when ``b`` reads the shared
    config there; every override an integer replacing an integer (head counts)."""
    view = vars(f).get("config")
    if not isinstance(view, ModuleConfig):
        return {}
    at = path or "<root>"
    if isinstance(vars(b).get("config"), ModuleConfig) or "config" not in vars(b):
        raise SerializationError(f"cannot save module {at!r}: its member reads no shared config to override")
    out = view.overrides
    for k, v in out.items():
        if not _config_size(k, v, getattr(view.shared, k, None)):
            raise SerializationError(
                f"cannot save module {at!r}: its config override {k}={v!r} is not an integer size replacing one "
                "(only those are stored)"
            )
    return out


def _config_size(key: str, value: Any, shared: Any) -> bool:
    """A config override a file may hold: a public key whose shared value is an integer, replaced by an integer, or
    a list of integers (per-stage sizes: Segformer's ``hidden_sizes``), replaced by as many integers (never a
    private key such as ``_attn_implementation_internal``, which could ask for downloaded kernels)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(key, str) or key.startswith("_"):
        return False
    if isinstance(value, list) and isinstance(shared, (list, tuple)):
        return len(value) == len(shared) and all(is_int(v) and v >= 0 for v in value) and all(map(is_int, shared))
    return is_int(value) and value >= 0 and is_int(shared)


class _Differ:
    """The changes from a member (``base``) to the model being saved, by module path (pre-order)."""

    def __init__(self, base: nn.Module) -> None:
        self.base_modules = dict(walk(base))
        self.ops: list[dict[str, Any]] = []

    def module(self, f: nn.Module, path: str, b: nn.Module) -> None:
        """``f`` (saved model, at ``path``) against ``b`` (the member's module it comes from: same class)."""
        if _s._spec_name(f) is not None and _config(f, path) != _config(b, path):
            if not path:
                raise SerializationError("cannot save: the root module's config differs from the member's")
            self.replace(f, path)
            return
        tensors = _tensor_changes(f, b, path)
        if tensors:
            self.ops.append({"op": "resize", "path": path, "tensors": tensors})
        attrs = _attribute_changes(f, b, path)
        if attrs:
            self.ops.append({"op": "set", "path": path, "attributes": attrs})
        overrides = _config_overrides(f, b, path)
        if overrides:
            self.ops.append({"op": "config", "path": path, "overrides": overrides})
        for name, fc in f._modules.items():
            cpath = f"{path}.{name}" if path else name
            bc = b._modules.get(name)
            if fc is None:
                if bc is not None:
                    raise SerializationError(f"cannot save: module {cpath!r} of the member architecture was removed")
                continue
            if bc is not None and type(fc) is type(bc):
                self.module(fc, cpath, bc)
            elif _s._spec_name(fc) is not None:
                self.replace(fc, cpath)
            else:
                raise SerializationError(
                    f"cannot save module {cpath!r} of type {_class_name(fc)}: it is not in the member architecture "
                    f"at that path (there: {_class_name(bc) if bc is not None else 'nothing'}) and it is not an "
                    "allowed type (register it with pyfusion.serialization.register_module)"
                )
        for name, bc in b._modules.items():
            if bc is not None and f._modules.get(name) is None:
                cpath = f"{path}.{name}" if path else name
                raise SerializationError(f"cannot save: module {cpath!r} of the member architecture was removed")

    def replace(self, f: nn.Module, path: str) -> None:
        later: list[tuple[nn.Module, str, nn.Module]] = []
        node = self.tree(f, path, path, later)
        self.ops.append({"op": "replace", "path": path, "module": node})
        for leaf, lpath, source in later:
            self.module(leaf, lpath, source)

    def tree(self, m: nn.Module, path: str, source: str, later: list) -> dict[str, Any]:
        """An allowlisted module tree; a module of the member architecture in it is a ``@member`` leaf naming the
        member's module it copies (``source``: the same path, or a MemberViewNorm's own path for its norms)."""
        if _s._spec_name(m) is None:
            b = self.base_modules.get(source)
            if b is None or type(b) is not type(m):
                raise SerializationError(
                    f"cannot save module {path!r} of type {_class_name(m)}: it is not an allowed type and the member "
                    f"architecture has no module of that type at {source!r}"
                )
            later.append((m, path, b))
            return {"type": _MEMBER, "class": _class_name(m), "source": source}
        from pyfusion.nn.norm import MemberViewNorm

        children = {}
        for name, c in m._modules.items():
            if c is None:
                continue
            cpath = f"{path}.{name}" if path else name
            if isinstance(m, MemberViewNorm) and name == "norms":
                # the member norms are copies of the normalizer this module replaced (at its own path)
                grand = {}
                for gname, g in c._modules.items():
                    if g is not None:
                        grand[gname] = self.tree(g, f"{cpath}.{gname}", source, later)
                children[name] = {"type": _s._spec_name(c), "config": _config(c, cpath), "children": grand}
            else:
                children[name] = self.tree(c, cpath, f"{source}.{name}" if source else name, later)
        return {"type": _s._spec_name(m), "config": _config(m, path), "children": children}


def _base_for_save(
    module: nn.Module, factory: Callable[[], nn.Module] | None
) -> tuple[dict[str, Any], nn.Module, Callable[[], nn.Module] | None]:
    """(base record, the member on the meta device, the factory to reload the file with)."""
    if _hf_class_name(module) is not None:
        record = _hf_config_record(module)
        return record, _hf_model("the model", record), None
    name = _class_name(module)
    replica = getattr(module, "fusion_member_architecture", None)
    if factory is not None:
        if not callable(factory):
            raise ValueError(f"save: factory must be a callable returning one member; got {type(factory).__name__}")
        base = _call_factory("save", factory, "meta")
        if isinstance(replica, MemberArchitecture):
            check_member("save", base, {"modules": describe_modules(replica.module), "ties": _ties(replica.module)},
                         "the factory")  # fmt: skip
        return {"kind": "user", "class": name}, base, factory
    if isinstance(replica, MemberArchitecture):
        member = replica.module
        return {"kind": "user", "class": name}, meta_replica(member), lambda: member
    # no fusion record and no factory: the model is its own member architecture (an unfused user model)
    member = meta_replica(module)
    return {"kind": "user", "class": name}, meta_replica(member), lambda: member


def encode(
    module: nn.Module, factory: Callable[[], nn.Module] | None
) -> tuple[dict[str, str], dict[str, torch.Tensor], Callable[[], nn.Module] | None]:
    """The records and tensors of a ``pyfusion.module/2`` file, and the factory that reloads it (for verification)."""
    base, member, reload_factory = _base_for_save(module, factory)
    if type(member) is not type(module):
        raise SerializationError(
            f"cannot save a {_class_name(module)}: its member architecture is a {_class_name(member)} (the factory "
            "must build the members' class)"
        )
    base["modules"] = describe_modules(member)
    base["ties"] = _ties(member)
    differ = _Differ(member)
    differ.module(module, "", member)
    named = named_tensors(module)
    groups = tie_groups(named)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for g in groups:
        t = named[g[0]].detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        if t.dtype not in _s._DTYPE_NAMES:
            raise SerializationError(f"tensor {g[0]!r} has dtype {t.dtype}, which pyfusion files cannot store")
        tensors[g[0]] = t
    try:
        records = {
            "format": FORMAT,
            "base": json.dumps(base, allow_nan=False),
            "changes": json.dumps(differ.ops, allow_nan=False),
            "ties": json.dumps([g for g in groups if len(g) > 1]),
            "attributes": json.dumps(_s._saved_attributes(module)),
        }
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot save: a record is not JSON ({exc})") from exc
    return records, tensors, reload_factory


def same_contents(module: nn.Module, reloaded: nn.Module) -> None:
    """The reloaded module is the saved one: module paths and types, every tensor (non-persistent buffers included)
    bit for bit, ties, plain attributes."""
    a, b = list(walk(module)), list(walk(reloaded))
    if [(p, type(m)) for p, m in a] != [(p, type(m)) for p, m in b]:
        raise SerializationError("the written file rebuilds a different module tree (verification failed)")
    ta, tb = named_tensors(module), named_tensors(reloaded)
    if list(ta) != list(tb):
        raise SerializationError("the written file holds different tensors (verification failed)")
    for k, t in ta.items():
        r = tb[k]
        t = t.detach().cpu().contiguous()
        if r.dtype != t.dtype or r.shape != t.shape or _s._tensor_bytes(r.contiguous()) != _s._tensor_bytes(t):
            raise SerializationError(f"tensor {k!r} reads back different from the model (verification failed)")
    if tie_groups(ta) != tie_groups(tb):
        raise SerializationError("the written file ties other tensors than the model (verification failed)")
    for (path, m), (_, r) in zip(a, b):
        cm, cr = vars(m).get("config"), vars(r).get("config")
        om = cm.overrides if isinstance(cm, ModuleConfig) else None
        if om != (cr.overrides if isinstance(cr, ModuleConfig) else None):
            raise SerializationError(
                f"the config overrides of module {path or '<root>'!r} read back different (verification failed)"
            )
        am, ar = scalar_attributes(m), scalar_attributes(r)
        for n in sorted(set(am) | set(ar)):
            if not _same_value(am.get(n, _MISSING), ar.get(n, _MISSING)):
                raise SerializationError(
                    f"attribute {(path + '.' if path else '') + n!r} is {_show(am.get(n, _MISSING))} in the model but "
                    f"{_show(ar.get(n, _MISSING))} after reloading: pyfusion files restore the attributes of the "
                    "member architecture and the changes fusion makes, not attributes set on allowlisted modules "
                    "later (verification failed)"
                )


# --------------------------------------------------------------------------------------------- load: records
def _bad(where: str, what: str) -> SerializationError:
    return SerializationError(f"{where} is corrupted: {what}")


def _check_path(where: str, p: Any, what: str) -> str:
    if not isinstance(p, str) or len(p) > 100_000:
        raise _bad(where, f"{what} {str(p)[:80]!r} is not a module path")
    if p and (any(not s for s in p.split(".")) or p.count(".") >= MAX_DEPTH):
        raise _bad(where, f"{what} {p[:80]!r} is not a module path of at most {MAX_DEPTH} levels")
    return p


def _check_name(where: str, n: Any, what: str) -> str:
    if not isinstance(n, str) or not n.isidentifier() or n.startswith("__") or len(n) > 200:
        raise _bad(where, f"{what} {str(n)[:80]!r} is not an identifier")
    return n


def _check_shape(where: str, s: Any, what: str) -> list[int]:
    if not isinstance(s, list) or len(s) > MAX_NDIM or not all(_s._is_int(d) and 0 <= d < 2**62 for d in s):
        raise _bad(where, f"{what} has shape {str(s)[:80]!r}; expected a list of at most {MAX_NDIM} integers >= 0")
    return s


def _check_tensor_dict(where: str, d: Any, what: str) -> None:
    if not isinstance(d, dict):
        raise _bad(where, f"the tensors of {what} are not an object")
    for n, s in d.items():
        if not isinstance(n, str) or not n or "." in n:
            raise _bad(where, f"{what} has a tensor named {str(n)[:80]!r}")
        _check_shape(where, s, f"tensor {what}.{n}")


def _check_attributes(where: str, d: Any, what: str) -> None:
    if not isinstance(d, dict):
        raise _bad(where, f"the attributes of {what} are not an object")
    for n, v in d.items():
        _check_name(where, n, f"attribute of {what}")
        _decode(where, v)


def _object(where: str, v: Any, what: str, fields: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(where, f"{what} is not an object")
    extra = sorted(set(v) - fields)
    if extra:
        raise _bad(where, f"{what} has unknown fields {extra}")
    missing = sorted(required - set(v))
    if missing:
        raise _bad(where, f"{what} has no {missing}")
    return v


def _check_ties(where: str, ties: Any, what: str) -> list[list[str]]:
    if not isinstance(ties, list) or len(ties) > MAX_NODES:
        raise _bad(where, f"{what} is not a list")
    seen: set[str] = set()
    for g in ties:
        if not (isinstance(g, list) and len(g) >= 2 and all(isinstance(k, str) and k for k in g)):
            raise _bad(where, f"{what} has an entry {str(g)[:80]!r} that is not a list of two or more tensor names")
        if seen & set(g) or len(set(g)) != len(g):
            raise _bad(where, f"{what} names a tensor twice ({str(g)[:80]})")
        seen |= set(g)
    return ties


def parse_records(where: str, metadata: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]], list, dict]:
    """The base, changes, ties and attributes records of a ``pyfusion.module/2`` file, every field checked."""
    unknown = sorted(set(metadata) - {*RECORDS, "checksum"})
    if unknown:
        raise _bad(where, f"unknown metadata records {unknown}")
    for r in (*RECORDS, "checksum"):
        if r not in metadata:
            raise _bad(where, f"it has no {r} record")
    parsed = {}
    for r in RECORDS[1:]:
        try:
            parsed[r] = json.loads(metadata[r])
        except (ValueError, RecursionError) as exc:
            raise _bad(where, f"{r} record unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    fields = {"kind", "class", "config", "attn_implementation", "modules", "ties"}
    base = _object(where, parsed["base"], "the base record", fields, {"kind", "class", "modules", "ties"})
    if base["kind"] not in ("user", "huggingface"):
        raise _bad(where, f"the base kind {str(base['kind'])[:40]!r} is neither 'user' nor 'huggingface'")
    if not isinstance(base["class"], str) or not base["class"] or len(base["class"]) > 1000:
        raise _bad(where, "the base class is not a name")
    if base["kind"] == "huggingface":
        if not isinstance(base.get("config"), dict):
            raise _bad(where, "the Hugging Face base has no config object")
        if not (base.get("attn_implementation") is None or isinstance(base["attn_implementation"], str)):
            raise _bad(where, "the attention implementation is not a string")
    elif "config" in base or "attn_implementation" in base:
        raise _bad(where, "a user-class base has a config")
    modules = base["modules"]
    if not isinstance(modules, dict) or not modules or len(modules) > MAX_NODES:
        raise _bad(where, f"the member modules are not an object of 1 to {MAX_NODES} entries")
    for path, entry in modules.items():
        _check_path(where, path, "member module")
        e = _object(where, entry, f"member module {path!r}", _ENTRY_FIELDS, {"class"})
        if not isinstance(e["class"], str):
            raise _bad(where, f"the class of member module {path!r} is not a name")
        for kind in ("parameters", "buffers", "transient"):
            if kind in e:
                _check_tensor_dict(where, e[kind], f"member module {path!r}")
        if "attributes" in e:
            _check_attributes(where, e["attributes"], f"member module {path!r}")
    _check_ties(where, base["ties"], "the member's ties")
    changes = parsed["changes"]
    if not isinstance(changes, list) or len(changes) > MAX_NODES:
        raise _bad(where, f"the changes record is not a list of at most {MAX_NODES} changes")
    nodes = 0
    for i, op in enumerate(changes):
        if not isinstance(op, dict) or op.get("op") not in ("replace", "resize", "set", "config"):
            raise _bad(where, f"change {i} is not an object with op 'replace', 'resize', 'set' or 'config'")
        field = {"replace": "module", "resize": "tensors", "set": "attributes", "config": "overrides"}[op["op"]]
        _object(where, op, f"change {i}", {"op", "path", field}, {"op", "path", field})
        path = _check_path(where, op["path"], f"the path of change {i}")
        if op["op"] == "replace":
            if not path:
                raise _bad(where, "a change replaces the root module")
            nodes += _s._check_tree(where, op["module"], allow_member=True)
            if nodes > MAX_NODES:
                raise SerializationError(f"{where}: the changes hold more than {MAX_NODES} modules (limit)")
        elif op["op"] == "resize":
            _check_tensor_dict(where, op["tensors"], f"change {i}")
        elif op["op"] == "config":
            _check_attributes(where, op["overrides"], f"change {i}")
        else:
            _check_attributes(where, op["attributes"], f"change {i}")
    ties = _check_ties(where, parsed["ties"], "the ties record")
    attributes = parsed["attributes"]
    if not isinstance(attributes, dict) or not all(isinstance(v, dict) for v in attributes.values()):
        raise _bad(where, "the attributes record is not an object of objects")
    return base, changes, ties, attributes


# --------------------------------------------------------------------------------------------- load: rebuild
def _module_at(where: str, model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` through ``_modules`` only (no attribute lookups of user classes)."""
    m = model
    for part in path.split(".") if path else []:
        nxt = m._modules.get(part)
        if nxt is None:
            raise SerializationError(f"{where}: the model has no module {path!r} (no {part!r} in {type(m).__name__})")
        m = nxt
    return m


def apply_changes(where: str, model: nn.Module, changes: list[dict[str, Any]], device: str) -> None:
    """Apply checked changes to the rebuilt member in place (new tensors on ``device``, uninitialised)."""
    pristine: dict[str, nn.Module] = {}
    members = dict(walk(model))
    for op in changes:  # the member modules that @member leaves copy, before any change touches them
        if op["op"] == "replace":
            stack = [op["module"]]
            while stack:
                node = stack.pop()
                if node["type"] == _MEMBER:
                    src = node["source"]
                    if src not in members:
                        raise SerializationError(
                            f"{where}: a change copies member module {src!r}, which does not exist"
                        )
                    if not _same_class(members[src], node["class"]):
                        raise SerializationError(
                            f"{where}: a change copies member module {src!r} as a {node['class']}, but it is a "
                            f"{_class_name(members[src])}"
                        )
                    pristine.setdefault(src, copy.deepcopy(members[src]))
                stack.extend(node.get("children", {}).values())

    def member(node: dict[str, Any], path: str) -> nn.Module:
        return copy.deepcopy(pristine[node["source"]])

    for op in changes:
        path = op["path"]
        if op["op"] == "replace":
            parent_path, _, name = path.rpartition(".")
            parent = _module_at(where, model, parent_path)
            with torch.device(device):
                new = _s._rebuild(where, op["module"], path, member=member)
            try:
                parent.add_module(name, new)
            except (KeyError, TypeError, ValueError) as exc:
                raise SerializationError(f"{where}: cannot put a module at {path!r}: {exc}") from exc
            continue
        mod = _module_at(where, model, path)
        if op["op"] == "resize":
            for name, shape in op["tensors"].items():
                p, b = mod._parameters.get(name), mod._buffers.get(name)
                try:
                    if p is not None:
                        mod._parameters[name] = nn.Parameter(
                            torch.empty(shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                        )
                    elif b is not None:
                        mod._buffers[name] = torch.empty(shape, dtype=b.dtype, device=device)
                    else:
                        raise SerializationError(f"{where}: module {path!r} has no tensor {name!r} to resize")
                except (RuntimeError, ValueError, OverflowError) as exc:
                    raise SerializationError(f"{where}: cannot resize {path}.{name} to {shape}: {exc}") from exc
        elif op["op"] == "config":
            shared = vars(mod).get("config")
            if shared is None or isinstance(shared, ModuleConfig) or _encode(shared) is not _SKIP:
                raise SerializationError(f"{where}: a change overrides the config of {path!r}, which reads none")
            for name, value in op["overrides"].items():
                if not _config_size(name, value, getattr(shared, name, None)):
                    raise SerializationError(
                        f"{where}: a change overrides config key {name!r} of {path!r} with {str(value)[:40]!r}; only "
                        "integer sizes that the config has may be overridden"
                    )
            vars(mod)["config"] = ModuleConfig(shared, dict(op["overrides"]))
        else:
            own = vars(mod)
            for name, enc in op["attributes"].items():
                if name in _INTERNAL or name.startswith("fusion_"):
                    raise SerializationError(f"{where}: a change sets attribute {name!r}, which a file may not set")
                if name in own:
                    if _encode(own[name]) is _SKIP:
                        raise SerializationError(
                            f"{where}: a change sets attribute {path}.{name}, which is not a plain value in the model"
                        )
                elif (
                    hasattr(type(mod), name) or name in mod._parameters or name in mod._buffers or name in mod._modules
                ):
                    raise SerializationError(
                        f"{where}: a change sets {path}.{name}, which {type(mod).__name__} defines"
                    )
                own[name] = _decode(where, enc)


def expected_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[nn.Module, str]]]:
    """(every name -> the model's (meta) tensor, the non-persistent buffers by name -> (module, buffer name))."""
    state = dict(model.state_dict(keep_vars=True))
    transient: dict[str, tuple[nn.Module, str]] = {}
    for path, m in walk(model):
        for n, b in m._buffers.items():
            if b is not None and n in m._non_persistent_buffers_set:
                key = f"{path}.{n}" if path else n
                if key not in transient:
                    transient[key] = (m, n)
                    state.setdefault(key, b)
    return state, transient


def check_ties(where: str, ties: list[list[str]], expected: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> stored name; every name exists, tied tensors have one shape and kind."""
    aliases = {}
    for g in ties:
        for k in g:
            if k not in expected:
                raise SerializationError(f"{where}: the ties record names tensor {k!r}, which the model does not have")
        first = expected[g[0]]
        for k in g[1:]:
            t = expected[k]
            if tuple(t.shape) != tuple(first.shape) or isinstance(t, nn.Parameter) != isinstance(first, nn.Parameter):
                raise SerializationError(
                    f"{where}: tied tensors {g[0]!r} {tuple(first.shape)} and {k!r} {tuple(t.shape)} differ in shape "
                    "or kind"
                )
            aliases[k] = g[0]
    return aliases


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    mod = _module_at("", model, path)
    if name in mod._parameters:
        mod._parameters[name] = value
    else:
        mod._buffers[name] = value


def assign(
    where: str,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    transient: dict[str, tuple[nn.Module, str]],
    ties: list[list[str]],
) -> None:
    """The file's tensors into the model (state dict, non-persistent buffers), then the ties restored."""
    state_keys = list(model.state_dict(keep_vars=True))
    try:
        model.load_state_dict({k: tensors[aliases.get(k, k)] for k in state_keys}, strict=True, assign=True)
    except Exception as exc:  # noqa: BLE001 - a module's own loading checks (e.g. PartialLinear's layout)
        raise SerializationError(f"{where}: the tensors do not load into the architecture: {exc}") from exc
    for key, (m, n) in transient.items():
        m._buffers[n] = tensors[aliases.get(key, key)]
    named = expected_tensors(model)[0]
    for g in ties:
        obj = named[g[0]]
        for k in g[1:]:
            _set_tensor(model, k, obj)
