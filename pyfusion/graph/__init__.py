"""Neuron groups of a model (DESIGN §2): traced automatically with torch.fx, or declared by hand."""

from pyfusion.graph.groups import AxisRef, FusionGraph, NeuronGroup, declare_groups
from pyfusion.graph.trace import UnsupportedModuleError, trace_groups

__all__ = ["AxisRef", "FusionGraph", "NeuronGroup", "UnsupportedModuleError", "declare_groups", "trace_groups"]
