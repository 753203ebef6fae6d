"""Example inputs for tracing and verification (notes/IR.md §2): given, or synthesized for Hugging Face models
(from their config) and for models whose first layer is a Linear / Embedding / Conv."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["example_inputs_for", "normalize_inputs", "first_samples"]

# spatial sizes tried for a convolutional first layer, most common first (CIFAR, MNIST, small test images)
_SIDES = (32, 28, 16, 8, 64, 224, 12, 4)


def normalize_inputs(example: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple / list of positional arguments, a dict of keyword arguments, or
    an ``(args, kwargs)`` pair."""
    if isinstance(example, Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if (
        isinstance(example, tuple)
        and len(example) == 2
        and isinstance(example[0], (tuple, list))
        and isinstance(example[1], dict)
    ):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise ValueError(
        "example_inputs must be a tensor, a tuple of positional arguments, a dict of keyword arguments or an "
        f"(args, kwargs) pair; got {type(example).__name__}"
    )


def first_samples(batch_input: Any, n: int = 4) -> Any:
    """The first ``n`` samples (dim 0) of a batch's input (tensors, or tuples / dicts of tensors)."""
    if isinstance(batch_input, Tensor):
        return batch_input[:n] if batch_input.dim() > 0 else batch_input
    if isinstance(batch_input, dict):
        return {k: first_samples(v, n) for k, v in batch_input.items()}
    if isinstance(batch_input, (tuple, list)):
        return type(batch_input)(first_samples(v, n) for v in batch_input)
    return batch_input


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _runs(model: nn.Module, args: tuple) -> bool:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
        return True
    except Exception:  # any failure means: not this input shape
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode


def _hf_inputs(model: nn.Module, gen: torch.Generator) -> tuple | None:
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if cfg is None or main is None:
        return None
    dev = _device(model)
    if main == "input_ids" and getattr(cfg, "vocab_size", None):
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 8
        t = max(2, min(8, int(limit)))
        return (torch.randint(0, int(cfg.vocab_size), (2, t), generator=gen).to(dev),)
    if main == "pixel_values" and getattr(cfg, "image_size", None):
        side = cfg.image_size
        side = tuple(side) if isinstance(side, (tuple, list)) else (int(side), int(side))
        c = int(getattr(cfg, "num_channels", 3))
        return (torch.randn(2, c, *side, generator=gen, dtype=_dtype(model)).to(dev),)
    return None


def _first_layer_inputs(model: nn.Module, gen: torch.Generator) -> tuple | None:
    first = next((m for m in model.modules() if not any(True for _ in m.children()) and any(
        True for _ in m.parameters(recurse=False))), None)  # fmt: skip
    if first is None:
        return None
    dt, dev = _dtype(model), _device(model)
    candidates: list[tuple] = []
    if isinstance(first, nn.Linear):
        candidates = [(torch.randn(2, first.in_features, generator=gen, dtype=dt),)]
    elif isinstance(first, nn.Embedding):
        candidates = [(torch.randint(0, first.num_embeddings, (2, 8), generator=gen),)]
    elif isinstance(first, nn.Conv2d):
        candidates = [(torch.randn(2, first.in_channels, s, s, generator=gen, dtype=dt),) for s in _SIDES]
    elif isinstance(first, nn.Conv1d):
        candidates = [(torch.randn(2, first.in_channels, s, generator=gen, dtype=dt),) for s in _SIDES]
    for args in candidates:
        args = tuple(a.to(dev) for a in args)
        if _runs(model, args):
            return args
    return None


_SYNTH: dict[tuple, list[tuple[tuple[int, ...], torch.dtype]]] = {}


def _vocab(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    return int(first.num_embeddings)


def example_inputs_for(model: nn.Module, example_inputs: Any = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to trace / verify ``model`` with.

    Args:
        model: the network.
        example_inputs: given inputs (see :func:`normalize_inputs`), or None to synthesize: token ids / pixel
            values for Hugging Face models (from ``model.config``), random inputs for a first Linear / Embedding /
            Conv1d / Conv2d layer (common image sides are tried until the forward runs). Synthesized inputs come
            from a fixed private generator: the global random state is not touched.

    Raises:
        ValueError: when nothing can be synthesized (pass ``example_inputs``).
    """
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    gen = torch.Generator().manual_seed(0)
    args = _hf_inputs(model, gen)
    if args is None:
        # which spatial size runs is a property of the architecture: probe once per structure (forward passes)
        from pyfusion.graph.export import fingerprint

        key = fingerprint(model, (), {})
        spec = _SYNTH.get(key)
        if spec is None:
            args = _first_layer_inputs(model, gen)
            if args is not None:
                _SYNTH[key] = [(tuple(a.shape), a.dtype) for a in args]
        else:
            args = tuple(
                torch.randint(0, _vocab(model), shape, generator=gen) if not dt.is_floating_point
                else torch.randn(shape, generator=gen, dtype=dt) for shape, dt in spec
            )  # fmt: skip
            args = tuple(a.to(_device(model)) for a in args)
    if args is None:
        raise ValueError(
            f"cannot synthesize an input for {type(model).__name__}: pass example_inputs=<a small batch> (a tensor, "
            "a tuple of positional arguments or (args, kwargs)) to trace_groups / declare_groups, or data= to fuse"
        )
    return args, {}
