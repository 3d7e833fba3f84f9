"""Gated delta rule family (linear attention, GLA, RetNet, SSD, DeltaNet, gated DeltaNet).

``gated_delta_rule`` (a sequence; ``IMPLEMENTATIONS``/``DEFAULTS`` its dispatch tables),
``gated_delta_rule_step`` (decode) and ``gated_delta_rule_context_parallel`` (time sharded over
a ``context`` mesh axis).
"""

from ops.memory.gated_delta.api import (
  DEFAULTS,
  IMPLEMENTATIONS,
  gated_delta_rule,
  gated_delta_rule_step,
)
from ops.memory.gated_delta.context_parallel import gated_delta_rule_context_parallel

__all__ = [
  "DEFAULTS",
  "IMPLEMENTATIONS",
  "gated_delta_rule",
  "gated_delta_rule_context_parallel",
  "gated_delta_rule_step",
]
