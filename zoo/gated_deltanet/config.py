"""Configuration of gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: improving Mamba2
with delta rule"): the DeltaNet fields, with the output gate on by default."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from zoo.configbase import config_dataclass
from zoo.deltanet.config import DeltaNetConfig
from zoo.layers.recurrent_config import DecayInit, presets


@config_dataclass
class GatedDeltaNetConfig(DeltaNetConfig, DecayInit):
  """DeltaNet's fields (see :class:`zoo.deltanet.config.DeltaNetConfig`); the decay
  ``alpha_t = exp(-exp(A_log) softplus(x W_a + dt_bias))`` is always on, initialised as
  :class:`zoo.layers.recurrent_config.DecayInit` says."""

  family: Literal["gated_deltanet"] = "gated_deltanet"
  output_gate: bool = True

  # base: hybrid like the paper's H1, every fourth layer sliding-window attention.
  PRESET_FIELDS: ClassVar[dict[str, dict[str, Any]]] = {
    **DeltaNetConfig.PRESET_FIELDS,
    "base": {"n_heads": 12, "attention_layers": (3, 7, 11), "window": 512},
  }

  def __post_init__(self):
    super().__post_init__()
    self.check_decay_init()


PRESETS = presets(GatedDeltaNetConfig)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
