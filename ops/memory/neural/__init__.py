"""Titans' neural memory (with ATLAS's Omega window, feature maps and Muon update)."""

from ops.memory.neural.api import feature_dim, init_memory, neural_memory, neural_memory_step

__all__ = ["feature_dim", "init_memory", "neural_memory", "neural_memory_step"]
