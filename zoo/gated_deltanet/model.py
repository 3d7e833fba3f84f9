"""Gated DeltaNet: the DeltaNet stack with the gated (decaying) delta rule."""

from __future__ import annotations

from flax import nnx

from zoo.deltanet.model import build_mixers
from zoo.gated_deltanet.config import GatedDeltaNetConfig
from zoo.layers.recurrent_lm import RecurrentLM


class GatedDeltaNet(RecurrentLM):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  def __init__(self, config: GatedDeltaNetConfig, *, rngs: nnx.Rngs):
    super().__init__(config, build_mixers(config, gated=True, rngs=rngs), rngs=rngs)
