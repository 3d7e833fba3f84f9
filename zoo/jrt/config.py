"""Configuration of JRT-RNN (Arora et al. 2024, "Just read twice: closing the recall gap for
recurrent language models"): the BASED fields, read with a non-causal prefix."""

from __future__ import annotations

from typing import Literal

from zoo.based.config import BasedConfig
from zoo.configbase import config_dataclass


@config_dataclass
class JRTConfig(BasedConfig):
  """BASED's fields (see :class:`zoo.based.config.BasedConfig`); the linear-attention layers get
  separate encoder key/value projections for the prefix."""

  family: Literal["jrt"] = "jrt"


def tiny(**overrides) -> JRTConfig:
  """For tests and MQAR on CPU."""
  return JRTConfig(
    **{
      "d_model": 64,
      "n_layers": 2,
      "n_heads": 4,
      "feature_dim": 8,
      "d_ff": 128,
      "window": 16,
      **overrides,
    }
  )


def small(**overrides) -> JRTConfig:
  """~25M parameters: 8 layers, every fourth one sliding-window attention."""
  return JRTConfig(
    **{
      "d_model": 512,
      "n_layers": 8,
      "n_heads": 8,
      "feature_dim": 16,
      "d_ff": 1408,
      "max_len": 2048,
      "attention_layers": (3, 7),
      "window": 64,
      **overrides,
    }
  )


def base(**overrides) -> JRTConfig:
  """~125M-class layout (GPU/TPU)."""
  return JRTConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "feature_dim": 16,
      "d_ff": 2048,
      "max_len": 4096,
      "attention_layers": (2, 5, 8, 11),
      "window": 128,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
