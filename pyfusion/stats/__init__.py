"""Streaming neuron statistics of K members (DESIGN §5: pyfusion.stats)."""

from pyfusion.stats.activation_stats import ActivationStats
from pyfusion.stats.collect import as_samples, batch_inputs, collect_stats

__all__ = ["ActivationStats", "as_samples", "batch_inputs", "collect_stats"]
