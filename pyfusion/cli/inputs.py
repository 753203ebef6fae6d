"""Reading what the user names on the command line: model factories, member files and data sets.

Nothing here unpickles arbitrary objects: state dicts are read with ``torch.load(weights_only=True)``
or safetensors, arrays with ``numpy.load(allow_pickle=False)``, and pyfusion model files with
:func:`pyfusion.load` (which rebuilds modules from an allowlist). The only code that runs is the
factory the user names (``module:function``), exactly as ``python -c "import module"`` would.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pyfusion.cli._console import EXIT_INPUT, EXIT_USAGE, CLIError
from pyfusion.fuse.validate import MemberMismatchError, check_members

__all__ = [
    "Dataset",
    "Factory",
    "check_same_architecture",
    "load_data",
    "load_member",
    "parse_factory",
    "parse_floats",
    "parse_normalize",
    "parse_options",
]

FACTORY_HINT = (
    "give the model factory as module:function, optionally with literal arguments, "
    "e.g. --model 'pyfusion.models:mlp(sizes=[64, 64, 10])' or --model mypkg.nets:build"
)
DATA_HINT = (
    "give a built-in data set (digits, mnist:DIR, fashion-mnist:DIR) or a .pt / .npy / .npz / .safetensors file "
    "holding inputs (N, ...) and optionally labels (N,)"
)


# --------------------------------------------------------------------------------------------- factory
@dataclass(frozen=True)
class Factory:
    """A model factory named on the command line: ``module:function`` plus literal arguments."""

    spec: str
    module: str
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def resolve(self) -> Callable[..., nn.Module]:
        """Import the module and return the function (the working directory is importable, like ``python -m``)."""
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise CLIError(
                f"--model {self.spec!r}: cannot import module {self.module!r} ({exc})",
                EXIT_INPUT,
                "check the module name and that it is importable from the current directory or the environment",
            ) from exc
        fn: Any = mod
        for part in self.function.split("."):
            if not hasattr(fn, part):
                raise CLIError(
                    f"--model {self.spec!r}: module {self.module!r} has no attribute {self.function!r}",
                    EXIT_INPUT,
                    FACTORY_HINT,
                )
            fn = getattr(fn, part)
        if not callable(fn):
            raise CLIError(f"--model {self.spec!r}: {self.function!r} is not callable", EXIT_INPUT, FACTORY_HINT)
        return fn

    def build(self) -> nn.Module:
        """Call the factory and check that it returns a module."""
        fn = self.resolve()
        try:
            model = fn(*self.args, **self.kwargs)
        except Exception as exc:  # the user's factory: any failure is bad input, reported in one line
            raise CLIError(
                f"--model {self.spec!r}: the factory raised {type(exc).__name__}: {exc}", EXIT_INPUT, FACTORY_HINT
            ) from exc
        if not isinstance(model, nn.Module):
            raise CLIError(
                f"--model {self.spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module",
                EXIT_INPUT,
                FACTORY_HINT,
            )
        return model


def parse_factory(spec: str) -> Factory:
    """Parse ``module:function`` or ``module:function(literal args)``.

    Arguments must be Python literals (numbers, strings, lists, dicts, ...), parsed with ``ast.literal_eval``:
    the string is never evaluated as code.

    Raises:
        CLIError (exit 2): the string is not of that form.
    """
    text = spec.strip()
    head, paren, rest = text.partition("(")
    module, colon, function = head.strip().partition(":")
    ident = all(p.isidentifier() for p in module.split(".")) and all(p.isidentifier() for p in function.split("."))
    if not colon or not module or not function or not ident:
        raise CLIError(f"--model {spec!r} is not of the form module:function", EXIT_USAGE, FACTORY_HINT)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if paren:
        if not rest.rstrip().endswith(")"):
            raise CLIError(f"--model {spec!r}: unbalanced parenthesis", EXIT_USAGE, FACTORY_HINT)
        try:
            call = ast.parse(f"f({rest}", mode="eval").body
            assert isinstance(call, ast.Call)
            args = tuple(ast.literal_eval(a) for a in call.args)
            kwargs = {}
            for kw in call.keywords:
                if kw.arg is None:
                    raise ValueError("**kwargs are not allowed")
                kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (SyntaxError, ValueError, AssertionError) as exc:
            raise CLIError(
                f"--model {spec!r}: the arguments must be Python literals ({exc})", EXIT_USAGE, FACTORY_HINT
            ) from exc
    return Factory(spec, module, function, args, kwargs)


# --------------------------------------------------------------------------------------------- members
def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from what torch.load returned: the dict itself, or under 'state_dict' / 'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise CLIError(
        f"{str(path)!r} does not hold a state dict (a dict of tensors, possibly under 'state_dict' or 'model')",
        EXIT_INPUT,
        "save members with torch.save(model.state_dict(), path), safetensors.torch.save_file, or pyfusion.save",
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor] | nn.Module:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from pyfusion.serialization import FORMAT

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise CLIError(
                f"{str(path)!r} is not a readable safetensors file ({exc})",
                EXIT_INPUT,
                "the file may be truncated or corrupted: save the member again",
            ) from exc
        if meta.get("format") == FORMAT:
            import pyfusion

            try:
                return pyfusion.load(path)
            except ValueError as exc:
                raise CLIError(str(exc), EXIT_INPUT, "save the member again with pyfusion.save") from exc
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(
            f"{str(path)!r} cannot be read as a torch state dict ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            EXIT_INPUT,
            "pyfusion reads state dicts only (torch.load(weights_only=True)), never pickled modules: "
            "save members with torch.save(model.state_dict(), path) or as .safetensors",
        ) from exc
    return _unwrap_state_dict(obj, path)


def load_member(path: str | os.PathLike[str], factory: Factory | None) -> nn.Module:
    """One member from a file: a pyfusion model file (``pyfusion.save``), or a state dict loaded into ``factory()``.

    Raises:
        CLIError (exit 3): missing or unreadable file, no factory for a plain state dict, or a state dict that
            does not fit the factory's model (the first mismatch is named).
    """
    p = Path(path)
    if not p.is_file():
        raise CLIError(
            f"member file {str(p)!r} does not exist", EXIT_INPUT, "check the path (members are files, one per model)"
        )
    obj = _read_state_dict(p)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if factory is None:  # the README's table: a member file that cannot be read as a model is bad input
        raise CLIError(
            f"{str(p)!r} holds a plain state dict, which needs the architecture",
            EXIT_INPUT,
            "pass --model module:function (the function that builds the untrained model)",
        )
    model = factory.build()
    expected = model.state_dict()
    missing = [k for k in expected if k not in obj]
    unexpected = [k for k in obj if k not in expected]
    if missing or unexpected:
        detail = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise CLIError(
            f"{str(p)!r} does not fit --model {factory.spec!r}: {detail} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)",
            EXIT_INPUT,
            "the factory must build the same architecture the member was trained with",
        )
    for k, v in expected.items():
        if tuple(obj[k].shape) != tuple(v.shape):
            raise CLIError(
                f"{str(p)!r} does not fit --model {factory.spec!r}: tensor {k!r} has shape {tuple(obj[k].shape)}, "
                f"the model expects {tuple(v.shape)}",
                EXIT_INPUT,
                "the factory must build the same architecture (same widths) the member was trained with",
            )
    model.load_state_dict(obj, strict=True)
    return model.eval()


def check_same_architecture(models: list[nn.Module], names: list[str], min_members: int = 2) -> None:
    """All members must be one architecture with finite weights (:func:`pyfusion.fuse.validate.check_members`).

    Raises:
        CLIError (exit 2 for fewer than ``min_members``, else 3): the first difference, naming both files.
    """
    if len(models) < min_members:
        raise CLIError(
            f"fusion needs at least {min_members} members; got {len(models)}", EXIT_USAGE, "list more member files"
        )
    try:
        check_members(models, min(min_members, len(models)))
    except MemberMismatchError as exc:
        name = names[exc.member]
        what = {
            "modules": f"members {names[0]!r} and {name!r} have different module types at {exc.detail}",
            "shapes": f"members {names[0]!r} and {name!r} have different shapes (tensor, {names[0]}, {name}): "
            f"{exc.detail}",
            "nonfinite": f"member {name!r} has NaN or inf values in tensor {exc.detail!r}",
        }[exc.kind]
        raise CLIError(what, EXIT_INPUT, "fusion needs K trained models of one architecture (same widths)") from exc


# --------------------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Inputs (N, ...) float32 and labels (N,) int64 (or None), with a name for reports."""

    name: str
    x: torch.Tensor
    y: torch.Tensor | None

    def head(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all when ``n`` is None or larger)."""
        if n is None or n >= self.x.shape[0]:
            return self
        return Dataset(self.name, self.x[:n], None if self.y is None else self.y[:n])

    def sample(self, n: int | None, how: str = "first", seed: int = 0) -> Dataset:
        """``n`` samples: the first ones (``how="first"``) or drawn without replacement with ``seed``
        (``"random"``, in the drawn order); all when ``n`` is None or at least N."""
        if how == "first":
            return self.head(n)
        if how != "random":
            raise ValueError(f"how must be 'first' or 'random'; got {how!r}")
        count = self.x.shape[0] if n is None else min(n, self.x.shape[0])
        idx = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
        return Dataset(self.name, self.x[idx], None if self.y is None else self.y[idx])

    def normalized(self, mean: list[float], std: list[float]) -> Dataset:
        """``(x - mean) / std`` per channel (axis 1); one value each applies to every channel.

        Raises:
            CLIError (exit 2): as many values as channels are needed when more than one is given.
        """
        c = self.x.shape[1]
        if len(mean) not in (1, c):
            raise CLIError(
                f"--normalize gives {len(mean)} channels, but the inputs of {self.name!r} have {c} on axis 1 "
                f"(shape {tuple(self.x.shape)})",
                EXIT_USAGE,
                f"give one MEAN,STD for all channels or {c} means and {c} stds: --normalize M1,...,M{c}/S1,...,S{c}",
            )
        shape = (1, len(mean)) + (1,) * (self.x.ndim - 2)
        m = torch.tensor(mean, dtype=self.x.dtype).reshape(shape)
        s = torch.tensor(std, dtype=self.x.dtype).reshape(shape)
        return Dataset(self.name, ((self.x - m) / s).contiguous(), self.y)


BUILTIN = ("digits", "mnist", "fashion-mnist")


def _builtin(spec: str, split: str) -> Dataset | None:
    from pyfusion import data as pfdata

    name, _, directory = spec.partition(":")
    if name not in BUILTIN:
        return None
    if name == "digits":
        if directory:
            raise CLIError(f"data {spec!r}: digits takes no directory", EXIT_USAGE, DATA_HINT)
        x, y = pfdata.load_digits(split)
        return Dataset(f"digits/{split}", x, y)
    if not directory:
        raise CLIError(
            f"data {spec!r}: {name} needs the directory of its IDX files",
            EXIT_USAGE,
            f"write {name}:DIR, e.g. {name}:../shared/data/{name} (pyfusion never downloads data)",
        )
    loader = pfdata.load_mnist if name == "mnist" else pfdata.load_fashion_mnist
    try:
        x, y = loader(directory, split)
    except FileNotFoundError as exc:
        raise CLIError(str(exc), EXIT_INPUT, "put the MNIST-format .gz files there or pass another directory") from exc
    except ValueError as exc:
        raise CLIError(f"data {spec!r}: {exc}", EXIT_INPUT, "the IDX files look damaged: copy them again") from exc
    return Dataset(f"{name}/{split}", x, y)


def _pick(d: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in d:
            return d[n]
    return None


_X_KEYS = ("x", "inputs", "input", "data", "images", "X")
_Y_KEYS = ("y", "labels", "label", "targets", "target", "Y")


def _from_file(path: Path) -> tuple[Any, Any]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        if len(d) == 1:
            return next(iter(d.values())), None
        return _pick(d, _X_KEYS), _pick(d, _Y_KEYS)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        if len(d) == 1:
            return next(iter(d.values())), None
        return _pick(d, _X_KEYS), _pick(d, _Y_KEYS)
    if suffix in (".pt", ".pth"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
            return obj[0], obj[1] if len(obj) == 2 else None
        if isinstance(obj, dict):
            return _pick(obj, _X_KEYS), _pick(obj, _Y_KEYS)
        return obj, None
    raise CLIError(f"data file {str(path)!r} has an unknown extension {suffix!r}", EXIT_INPUT, DATA_HINT)


def load_data(spec: str, split: str = "train") -> Dataset:
    """A data set named on the command line.

    Args:
        spec: ``digits``, ``mnist:DIR``, ``fashion-mnist:DIR`` (``split`` picks train or test), or a file:
            ``.pt`` (tensor, ``(x, y)`` or a dict with ``x``/``inputs`` and ``y``/``labels``, read with
            ``weights_only=True``), ``.npy`` (inputs), ``.npz`` / ``.safetensors`` (one array, or ``x``/``y``).
        split: "train" or "test" for the built-in sets.

    Raises:
        CLIError (exit 3): missing or unreadable file, no inputs in it, empty or non-finite inputs,
            labels that do not match the inputs.
    """
    built = _builtin(spec, split)
    if built is not None:
        return built
    path = Path(spec)
    if not path.is_file():
        raise CLIError(f"data {spec!r} is neither a built-in data set nor an existing file", EXIT_INPUT, DATA_HINT)
    try:
        x, y = _from_file(path)
    except CLIError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(
            f"data file {str(path)!r} cannot be read ({type(exc).__name__}: {first})",
            EXIT_INPUT,
            DATA_HINT + "; files are read without unpickling (weights_only=True, allow_pickle=False)",
        ) from exc
    if x is None:
        raise CLIError(
            f"data file {str(path)!r} has no inputs (expected a key among {', '.join(_X_KEYS)})", EXIT_INPUT, DATA_HINT
        )
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if not xt.is_floating_point():
        xt = xt.float()
    xt = xt.float().contiguous()
    if xt.ndim < 2 or xt.shape[0] == 0:
        raise CLIError(
            f"data file {str(path)!r}: inputs must have shape (N, ...) with N > 0; got {tuple(xt.shape)}",
            EXIT_INPUT,
            DATA_HINT,
        )
    if not bool(torch.isfinite(xt).all()):
        raise CLIError(f"data file {str(path)!r}: inputs contain NaN or inf", EXIT_INPUT, "clean the data first")
    yt = None
    if y is not None:
        yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if yt.ndim != 1 or yt.shape[0] != xt.shape[0] or yt.is_floating_point():
            raise CLIError(
                f"data file {str(path)!r}: labels must be integers of shape ({xt.shape[0]},); "
                f"got {tuple(yt.shape)} {yt.dtype}",
                EXIT_INPUT,
                DATA_HINT,
            )
        yt = yt.long()
    return Dataset(path.name, xt, yt)


# --------------------------------------------------------------------------------------------- small parsers
def parse_floats(text: str, what: str) -> list[float]:
    """``"0,0.25,0.5"`` -> [0.0, 0.25, 0.5] (exit 2 with the offending item otherwise)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            out.append(float(item))
        except ValueError as exc:
            raise CLIError(
                f"{what}: {item!r} is not a number", EXIT_USAGE, f"give {what} as comma-separated numbers"
            ) from exc
    return out


def parse_normalize(text: str | None) -> tuple[list[float], list[float]] | None:
    """``"MEAN,STD"`` (every channel) or ``"M1,...,MC/S1,...,SC"`` (per channel) -> (means, stds).

    Raises:
        CLIError (exit 2): not numbers, different counts, a std that is not > 0, or a value that is not finite.
    """
    if text is None:
        return None
    hint = "--normalize MEAN,STD (every channel), e.g. 0.1307,0.3081, or per channel M1,M2,M3/S1,S2,S3"
    if "/" in text:
        head, _, tail = text.partition("/")
        mean, std = parse_floats(head, "--normalize"), parse_floats(tail, "--normalize")
    else:
        values = parse_floats(text, "--normalize")
        if len(values) != 2:
            raise CLIError(f"--normalize {text!r}: expected MEAN,STD; got {len(values)} values", EXIT_USAGE, hint)
        mean, std = values[:1], values[1:]
    if len(mean) != len(std):
        raise CLIError(f"--normalize {text!r}: {len(mean)} means but {len(std)} stds", EXIT_USAGE, hint)
    if not all(math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
        raise CLIError(f"--normalize {text!r}: means must be finite and stds finite and > 0", EXIT_USAGE, hint)
    return mean, std


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are Python/JSON literals when they parse, strings otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise CLIError(f"--option {item!r} is not key=value", EXIT_USAGE, "e.g. --option max_iter=50")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
    return out
