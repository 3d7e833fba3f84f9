"""Configuration of DeltaNet (Yang et al. 2024, "Parallelizing linear transformers with the
delta rule over sequence length"); gated DeltaNet subclasses it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from zoo.configbase import config_dataclass
from zoo.layers.recurrent_config import RecurrentLMConfig, presets


@config_dataclass
class DeltaNetConfig(RecurrentLMConfig):
  """DeltaNet stack, optionally hybrid with softmax-attention layers.

  Shared fields: :class:`zoo.layers.recurrent_config.RecurrentLMConfig`.

  Attributes:
    n_heads: heads H.
    head_dim: per-head key and value width (K = V); default ``d_model // n_heads``.
    output_gate: multiply the normed output by ``silu(x W_gate)``.
  """

  family: Literal["deltanet"] = "deltanet"
  n_heads: int = 4
  head_dim: int | None = None
  output_gate: bool = False

  PRESET_FIELDS: ClassVar[dict[str, dict[str, Any]]] = {
    "tiny": {"n_heads": 4},
    "small": {"n_heads": 8},
    "base": {"n_heads": 12},
  }

  def __post_init__(self):
    super().__post_init__()
    self.check_positive("n_heads")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


PRESETS = presets(DeltaNetConfig)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
