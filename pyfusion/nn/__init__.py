"""Drop-in modules for fused networks: partially fused layers at a cost proportional to their effective
FLOPs, stacked ensembles, and an in-place module swap (DESIGN §7)."""

from pyfusion.nn.partial import EnsembleLinear, PartialConv2d, PartialLinear
from pyfusion.nn.swap import replace_

__all__ = ["EnsembleLinear", "PartialConv2d", "PartialLinear", "replace_"]
