"""Find the neuron groups of a model automatically (notes/IR.md §2-3).

``torch.export`` (non-strict) captures the model's ATen graph on an example batch; one propagation engine
(:mod:`pyfusion.graph.engine`) reads the neuron groups off it; every group is then verified numerically
(:mod:`pyfusion.graph.verify`). Where no graph capture works (data-dependent control flow), the leaf modules
are walked as a chain (:mod:`pyfusion.graph.walk`), and that reading is used only if it passes the same
verification.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from pyfusion.graph.capture import TracedGraph, input_signature
from pyfusion.graph.engine import Engine, TraceResult, UnsupportedModuleError, finish
from pyfusion.graph.export import export_program
from pyfusion.graph.groups import FusionGraph
from pyfusion.graph.inputs import example_inputs_for
from pyfusion.graph.verify import GroupVerificationError, verify_groups
from pyfusion.graph.walk import walk_groups

__all__ = ["trace_groups", "UnsupportedModuleError"]


def _read_groups(model: nn.Module, program: Any) -> TraceResult:
    cached = getattr(program, "_pyfusion_groups", None)
    if cached is None:
        engine = Engine(model, program)
        engine.run()
        cached = finish(engine)
        program._pyfusion_groups = cached
    return cached


def trace_groups(
    model: nn.Module, example_inputs: Any = None, *, allow_walk: bool = True, verify: bool = True
) -> FusionGraph:
    """Find the neuron groups of ``model``.

    Args:
        model: a member network (not modified).
        example_inputs: a small batch to trace and verify with (a tensor, a tuple of positional arguments or
            ``(args, kwargs)``); synthesized when omitted for Hugging Face models and for models whose first layer
            is a Linear / Embedding / Conv (``pyfusion.fuse`` passes the first samples of the calibration data).
        allow_walk: where ``torch.export`` fails (data-dependent control flow), walk the leaf modules in
            registration order as a chain; the result is used only if it passes the verification (a warning says
            so), else :class:`UnsupportedModuleError` is raised.
        verify: check every group numerically (:func:`pyfusion.graph.verify_groups`); ``False`` for experts.

    Returns:
        A validated :class:`FusionGraph` (``traced`` holds the exported graph when the export worked).

    Raises:
        UnsupportedModuleError: an unsupported module / op (named by node, module path and type), or a walk that
            fails verification.
        GroupVerificationError: a traced group that fails verification (a tracer bug: the error names it).
        ValueError: no example inputs given and none can be synthesized.
    """
    args, kwargs = example_inputs_for(model, example_inputs)
    try:
        program = export_program(model, args, kwargs)
    except UnsupportedModuleError:
        raise
    except Exception as exc:  # torch.export raises many kinds (UserError, guard errors, TypeError, ...)
        if not allow_walk:
            raise
        why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        try:
            walked = walk_groups(model)
        except UnsupportedModuleError as err:  # say why the export failed first: that is the cause to fix
            raise UnsupportedModuleError(
                f"torch.export could not trace {type(model).__name__} ({why}), and the leaf modules cannot be read "
                f"as a chain: {err}"
            ) from exc
        graph = FusionGraph(walked, None, example_inputs=(args, kwargs), source="walk")
        graph.validate(model)
        try:
            verify_groups(model, graph)
        except GroupVerificationError as err:
            raise UnsupportedModuleError(
                f"torch.export could not trace {type(model).__name__} ({why}), and reading its "
                f"leaf modules as a chain gives groups that change its function: {err}"
            ) from exc
        warnings.warn(
            f"torch.export could not trace {type(model).__name__} ({why}); walking "
            "the leaf modules as a chain in registration order instead (the walked groups passed verification)",
            stacklevel=2,
        )
        return graph
    result = _read_groups(model, program)
    graph = FusionGraph(
        copy.deepcopy(result.groups),
        TracedGraph(program, input_signature(args, kwargs)),
        tied_params=list(result.tied_params),
        example_inputs=(args, kwargs),
        source="export",
        pinned=list(result.pinned),
    )
    graph.validate(model)
    if verify and getattr(program, "_pyfusion_verified", False):
        # the groups are read off this exported program, which was verified on a model of the same structure
        # (the export cache key): the permutation symmetry is a property of the program, not of the weights
        graph.verified = True
    elif verify:
        verify_groups(model, graph)
        program._pyfusion_verified = True
    return graph
