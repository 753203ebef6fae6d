"""Neuron-interpolation fusion (WIP docstring)."""

from pyfusion.fuse.interp.driver import fuse_hf, fuse_interp, fuse_kf, fuse_kf_gradient
from pyfusion.fuse.interp.fitting import solve_ls
from pyfusion.fuse.interp.levels import InterpLevels, Level, interp_levels
from pyfusion.fuse.interp.statistics import ls_statistics

__all__ = [
    "InterpLevels",
    "Level",
    "fuse_hf",
    "fuse_interp",
    "fuse_kf",
    "fuse_kf_gradient",
    "interp_levels",
    "ls_statistics",
    "solve_ls",
]
