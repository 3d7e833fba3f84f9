"""DuoAttention: full attention on retrieval heads, constant-size sinks+window on the others."""

from zoo.duo.config import PRESETS, DuoConfig
from zoo.duo.gates import optimize_gates, retrieval_heads_from_gates
from zoo.duo.model import DuoAttention, from_transformer

__all__ = [
  "PRESETS",
  "DuoAttention",
  "DuoConfig",
  "from_transformer",
  "optimize_gates",
  "retrieval_heads_from_gates",
]
