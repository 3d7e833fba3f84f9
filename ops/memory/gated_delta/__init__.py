"""Gated delta rule family (linear attention, GLA, RetNet, SSD, DeltaNet, gated DeltaNet)."""

from ops.memory.gated_delta.api import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
