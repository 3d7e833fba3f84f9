"""ATLAS: the Titans model run with the Omega rule, polynomial features and the Muon update.

The math that differs from Titans lives in ``ops.memory.neural_memory`` (``omega_window``,
``feature_map``, ``optimizer="muon"``); the model is the Titans stack built from an
``AtlasConfig``.
"""

from __future__ import annotations

from flax import nnx

from zoo.atlas.config import AtlasConfig
from zoo.titans.model import Titans


class Atlas(Titans):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: AtlasConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
