"""Neuron groups of a model (DESIGN §2, notes/IR.md): traced from the exported ATen graph, or declared by hand,
and verified numerically before use."""

from pyfusion.graph.engine import UnsupportedModuleError
from pyfusion.graph.groups import (
    AxisRef,
    CapturePoint,
    FusionGraph,
    NeuronGroup,
    Normalizer,
    PinnedNeurons,
    SharedParameter,
    declare_groups,
)
from pyfusion.graph.trace import trace_groups
from pyfusion.graph.transform import neuron_view, permuted_state
from pyfusion.graph.verify import GroupVerificationError, random_group_permutations, verify_groups

__all__ = [
    "AxisRef",
    "CapturePoint",
    "FusionGraph",
    "GroupVerificationError",
    "NeuronGroup",
    "Normalizer",
    "PinnedNeurons",
    "SharedParameter",
    "UnsupportedModuleError",
    "declare_groups",
    "neuron_view",
    "permuted_state",
    "random_group_permutations",
    "trace_groups",
    "verify_groups",
]
