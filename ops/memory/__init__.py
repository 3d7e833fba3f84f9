"""Recurrent memory updates: the gated delta rule family and Titans' neural memory."""

from ops.memory.gated_delta.api import gated_delta_rule, gated_delta_rule_step
from ops.memory.neural.api import neural_memory

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "neural_memory"]
