"""Fusion methods and the public entry point ``pyfusion.fuse`` (DESIGN §3, §5).

``fuse(models, data=None, *, method, lambdas=None, **options)`` traces the neuron groups, asks the method for a
plan (maps A_k, B_k per group), builds the fused network with the one builder, then recalibrates BatchNorm
statistics on the calibration data (``reset_bn``) and optionally applies REPAIR (``repair=True``).
"""

from pyfusion.fuse.api import fuse
from pyfusion.fuse.builder import build
from pyfusion.fuse.plan import GroupPlan, Plan
from pyfusion.fuse.registry import available_methods, get_method, register_method

__all__ = ["GroupPlan", "Plan", "available_methods", "build", "fuse", "get_method", "register_method"]


def _make_module_callable() -> None:
    """``pyfusion.fuse`` is both this subpackage and the function: importing any ``pyfusion.fuse.*`` submodule
    binds the package attribute ``pyfusion.fuse`` to this module, so the module itself forwards calls to
    :func:`fuse` (``pyfusion.fuse(models, method=...)`` then works whichever was bound)."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):  # noqa: D102
            return fuse(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_module_callable()
