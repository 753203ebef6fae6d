"""``replace_``: swap submodules in place, torchao ``quantize_`` style (no global patching)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["replace_"]


def replace_(
    model: nn.Module,
    make_module: Callable[[nn.Module, str], nn.Module | None],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace every submodule selected by ``filter_fn(module, fqn)`` with ``make_module(module, fqn)``.

    Modules are visited in ``named_modules()`` order (pre-order) and selected before any swap, so a new
    module is never visited again and the children of a replaced module are not visited. ``make_module``
    returning None (or the module itself) keeps the original. The swap is ``setattr`` on the parent (by the
    module's path), so nothing global is patched and other models are untouched.

    Args:
        model: the model, modified in place (the root itself is never replaced).
        make_module: builds the replacement from the old module and its fully qualified name.
        filter_fn: selects modules; default: every ``nn.Linear``.

    Returns:
        ``model`` (for chaining).
    """
    if filter_fn is None:

        def filter_fn(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear)

    chosen: list[str] = []
    for fqn, module in model.named_modules():
        if fqn == "" or any(fqn.startswith(c + ".") for c in chosen):
            continue
        if filter_fn(module, fqn):
            chosen.append(fqn)
    for fqn in chosen:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = make_module(old, fqn)
        if new is not None and new is not old:
            if not isinstance(new, nn.Module):
                raise ValueError(f"make_module must return an nn.Module or None for {fqn!r}; got {type(new).__name__}")
            setattr(parent, child, new)
    return model
