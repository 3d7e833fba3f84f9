"""Configuration of JRT-RNN (Arora et al. 2024, "Just read twice: closing the recall gap for
recurrent language models"): the BASED fields, read with a non-causal prefix."""

from __future__ import annotations

from typing import Literal

from zoo.based.config import BasedConfig
from zoo.configbase import config_dataclass
from zoo.layers.recurrent_config import presets


@config_dataclass
class JRTConfig(BasedConfig):
  """BASED's fields and presets (see :class:`zoo.based.config.BasedConfig`); the
  linear-attention layers get separate encoder key/value projections for the prefix."""

  family: Literal["jrt"] = "jrt"


PRESETS = presets(JRTConfig)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
