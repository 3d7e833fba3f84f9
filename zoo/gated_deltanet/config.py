"""Configuration of gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: improving Mamba2
with delta rule"): the DeltaNet fields, with the output gate on by default."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.deltanet.config import DeltaNetConfig


@config_dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
  """DeltaNet's fields (see :class:`zoo.deltanet.config.DeltaNetConfig`); the decay
  ``alpha_t = exp(-exp(A_log) softplus(x W_a + dt_bias))`` is always on."""

  family: Literal["gated_deltanet"] = "gated_deltanet"
  output_gate: bool = True


def tiny(**overrides) -> GatedDeltaNetConfig:
  """For tests and MQAR on CPU."""
  return GatedDeltaNetConfig(
    **{"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, **overrides}
  )


def small(**overrides) -> GatedDeltaNetConfig:
  """~25M parameters."""
  return GatedDeltaNetConfig(
    **{"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 1408, "max_len": 2048, **overrides}
  )


def base(**overrides) -> GatedDeltaNetConfig:
  """~125M-class layout (GPU/TPU), hybrid like the paper's H1: every fourth layer is
  sliding-window attention."""
  return GatedDeltaNetConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "d_ff": 2048,
      "max_len": 4096,
      "attention_layers": (3, 7, 11),
      "window": 512,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
