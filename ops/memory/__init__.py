"""Recurrent memory updates: the gated delta rule family and Titans' neural memory."""

from ops.memory.gated_delta.api import gated_delta_rule, gated_delta_rule_step
from ops.memory.neural.api import feature_dim, init_memory, neural_memory, neural_memory_step

__all__ = [
  "feature_dim",
  "gated_delta_rule",
  "gated_delta_rule_step",
  "init_memory",
  "neural_memory",
  "neural_memory_step",
]
