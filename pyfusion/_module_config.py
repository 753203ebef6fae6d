"""A module's own view of a shared model config (:class:`ModuleConfig`), for adapters of modules whose forward reads
sizes from the config (Phi-3's attention reads ``self.config.num_attention_heads``).

Partial fusion may give each layer its own head count, so such a module cannot keep reading the shared config, and
the shared config must not change either: the rotary embedding derives its head dim from
``config.num_attention_heads`` and ``set_attn_implementation`` finds the configs to update by identity. A
``ModuleConfig`` answers the keys it overrides itself and reads every other attribute from the shared config at
the time of the read (so a later ``model.set_attn_implementation("eager")`` still reaches the module); setting an
overridden attribute on it changes the override, any other attribute is set on the shared config. Imports nothing
(no transformers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModuleConfig"]


class ModuleConfig:
    """``shared`` with the attributes in ``overrides`` replaced (for this module only).

    Args:
        shared: the config object the module read before (a Hugging Face ``PretrainedConfig``); a ``ModuleConfig``
            is unwrapped, so views never nest.
        overrides: attribute name -> value (plain values: the sizes an adapter updates).
    """

    def __init__(self, shared: Any, overrides: dict[str, Any]) -> None:
        if isinstance(shared, ModuleConfig):
            overrides = {**shared.overrides, **overrides}
            shared = shared.shared
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_overrides", dict(overrides))

    @property
    def shared(self) -> Any:
        """The shared config this view reads through to."""
        return self.__dict__["_shared"]

    @property
    def overrides(self) -> dict[str, Any]:
        """A copy of the overridden attributes."""
        return dict(self.__dict__["_overrides"])

    def __getattr__(self, name: str) -> Any:
        # only called for names not found normally; the two slots may be missing while copy / pickle rebuild the
        # object (``__setstate__`` lookups before ``__dict__`` is filled), which must not recurse
        d = self.__dict__
        if name in ("_shared", "_overrides") or "_overrides" not in d:
            raise AttributeError(name)
        if name in d["_overrides"]:
            return d["_overrides"][name]
        return getattr(d["_shared"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        own = self.__dict__["_overrides"]
        if name in own:
            own[name] = value
        else:
            setattr(self.__dict__["_shared"], name, value)

    def __repr__(self) -> str:
        return f"ModuleConfig({type(self.shared).__name__}, overrides={self.__dict__['_overrides']!r})"
