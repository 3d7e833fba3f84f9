"""Titans' neural memory (with ATLAS's Omega window, feature maps and Muon update).

``neural_memory`` (a sequence; ``IMPLEMENTATIONS``/``DEFAULTS`` its dispatch tables),
``neural_memory_step`` (decode), ``init_memory``, and the pieces a layer needs to read the
memory itself: ``feature_dim``, ``apply_feature_map`` and ``mlp_apply``.
"""

from ops.memory.neural.api import (
  DEFAULTS,
  IMPLEMENTATIONS,
  feature_dim,
  init_memory,
  neural_memory,
  neural_memory_step,
)
from ops.memory.neural.common import apply_feature_map, mlp_apply

__all__ = [
  "DEFAULTS",
  "IMPLEMENTATIONS",
  "apply_feature_map",
  "feature_dim",
  "init_memory",
  "mlp_apply",
  "neural_memory",
  "neural_memory_step",
]
