"""Recurrent memory updates: the gated delta rule family and Titans' neural memory."""

from ops.memory.gated_delta import (
  gated_delta_rule,
  gated_delta_rule_context_parallel,
  gated_delta_rule_step,
)
from ops.memory.neural import (
  apply_feature_map,
  feature_dim,
  init_memory,
  mlp_apply,
  neural_memory,
  neural_memory_step,
)

__all__ = [
  "apply_feature_map",
  "feature_dim",
  "gated_delta_rule",
  "gated_delta_rule_context_parallel",
  "gated_delta_rule_step",
  "init_memory",
  "mlp_apply",
  "neural_memory",
  "neural_memory_step",
]
