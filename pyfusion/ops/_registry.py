"""The shape every pyfusion op has: validated public function -> ``torch.library`` op -> one dispatcher.

An op module defines its backends and their :class:`~pyfusion.dispatch.Dispatcher`, a ``register()``
function that creates the ``torch.library`` op (``custom_op`` or ``triton_op``, with a fake kernel, and
``register_autograd`` where the op is differentiable) whose body calls that dispatcher, and a
:class:`LazyOp` tying the two together. The public function validates its arguments (numpy inputs are
converted to tensors at this boundary) and calls the :class:`LazyOp`.

Registration is deferred to the first call that needs the registered op, and eager calls that need neither
autograd nor tracing call the dispatcher directly (the same function the op's body calls, so the results
are the same). Both because of what the torch.library machinery costs, measured here (torch 2.13, 2-core VM):

* creating a ``triton_op`` imports ``torch._inductor``, and with it triton (about 1.6 s);
* the first call of any ``custom_op`` imports ``torch._dynamo`` (about 1.7 s, triton included), through the
  ``torch._disable_dynamo`` wrapper around its kernels;
* every call then costs 14-19 us of Python dispatch, as much as a batch-1 ``PartialLinear`` layer.

So loading a saved model and running it imports neither (tests/test_imports.py), while ``torch.compile``
(``torch.compiler.is_compiling()``), ``torch.library.opcheck`` and autograd through a differentiable op use
the registered op. :func:`register_all` registers every op (to see them under ``torch.ops.pyfusion``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from pyfusion.dispatch import Dispatcher

__all__ = ["LAZY_OPS", "LazyOp", "is_jit_tracing", "records_grad", "register_all"]

LAZY_OPS: dict[str, LazyOp] = {}


def records_grad(*tensors: Any) -> bool:
    """Whether autograd records an op on these inputs (grad mode on and a tensor that requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.requires_grad:
                return True
        elif isinstance(t, (list, tuple)) and records_grad(*t):
            return True
    return False


_C_IS_TRACING = getattr(torch._C, "_is_tracing", None)


def is_jit_tracing() -> bool:
    """Whether ``torch.jit.trace`` is recording (0.2 us; ``torch.jit.is_tracing()`` costs 0.3 us). The eager paths of
    the ops depend on the batch size (data pointers, strided views), so under ``torch.jit.trace`` the ops run as the
    registered op, which the trace records. torch.compile treats this function's result as a constant (False)."""
    return bool(_C_IS_TRACING()) if _C_IS_TRACING is not None else torch.jit.is_tracing()


# torch.compile (dynamo) cannot trace torch._C._is_tracing (a builtin returning a bool); this flag makes it call the
# function once and use the result, as torch.compiler.assume_constant_result would (see _ensure_registered below).
is_jit_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _ensure_registered(name: str) -> bool:
    LAZY_OPS[name].op()
    return True


# Under torch.compile the first call may come while dynamo traces the caller: dynamo must then run the
# registration rather than trace into torch.library's internals (which it cannot). This flag is what
# torch.compiler.assume_constant_result sets; calling that function would import torch._dynamo (1.7 s) here.
_ensure_registered._dynamo_marked_constant = True  # type: ignore[attr-defined]


class LazyOp:
    """One op: its dispatcher, and its ``torch.library`` registration made on first need.

    Args:
        name: the op's name; the registered op is ``torch.ops.pyfusion.<name>``.
        dispatcher: the op's dispatcher (the registered op's body calls it with the same arguments).
        register: creates the ``torch.library`` op (called once).
        differentiable: the op has registered autograd; calls that autograd records go through the op.
    """

    def __init__(
        self, name: str, dispatcher: Dispatcher, register: Callable[[], None], *, differentiable: bool = False
    ) -> None:
        self.name = name
        self.dispatcher = dispatcher
        self.differentiable = differentiable
        self._register = register
        self._packet: Any = None
        LAZY_OPS[name] = self

    def op(self) -> Any:
        """``torch.ops.pyfusion.<name>`` (an ``OpOverloadPacket``), registered on the first call."""
        if self._packet is None:
            if not hasattr(torch.ops.pyfusion, self.name):
                self._register()
            self._packet = getattr(torch.ops.pyfusion, self.name)
        return self._packet

    @property
    def registered(self) -> bool:
        return self._packet is not None

    def __call__(self, *args: Any) -> Any:
        """Run validated arguments: through the registered op when tracing or when autograd records the call,
        else straight through the dispatcher."""
        if torch.compiler.is_compiling():
            _ensure_registered(self.name)
            return getattr(torch.ops.pyfusion, self.name)(*args)
        if self.differentiable and records_grad(*args):
            return self.op()(*args)
        return self.dispatcher(*args)

    def call_with_backend(self, *args: Any) -> tuple[Any, str]:
        """:meth:`__call__`, and the name of the backend that ran (``"op"`` when the registered op ran: its body
        chose)."""
        if torch.compiler.is_compiling() or (self.differentiable and records_grad(*args)):
            return self(*args), "op"
        backend = self.dispatcher.select(*args)
        return backend.fn(*args), backend.name


def register_all() -> list[str]:
    """Import every op module and register its ``torch.library`` op; returns the op names."""
    from pyfusion.ops import OP_MODULES

    for module in OP_MODULES.values():
        importlib.import_module(module)
    for lazy in LAZY_OPS.values():
        lazy.op()
    return sorted(LAZY_OPS)
