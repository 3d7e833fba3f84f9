"""Configuration of Mamba-2 (Dao and Gu 2024, "Transformers are SSMs")."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from zoo.configbase import config_dataclass
from zoo.layers.recurrent_config import DecayInit, RecurrentLMConfig, presets


@config_dataclass
class Mamba2Config(RecurrentLMConfig, DecayInit):
  """Mamba-2 stack (one group of B/C shared by all heads), optionally hybrid with attention.

  Shared fields: :class:`zoo.layers.recurrent_config.RecurrentLMConfig` (``d_ff`` defaults to 0:
  no MLP, as in Mamba-2; ``conv_width`` convolves x, B, C) and the decay's initialisation
  :class:`zoo.layers.recurrent_config.DecayInit`.

  Attributes:
    d_state: SSM state width N per head (the key dim of the memory).
    expand: inner width ``d_inner = expand * d_model``.
    head_dim: SSM head width P (the value dim); ``d_inner`` must be a multiple of it.
    attention_heads: heads of the attention layers.
  """

  family: Literal["mamba2"] = "mamba2"
  d_state: int = 16
  expand: int = 2
  head_dim: int = 32
  d_ff: int = 0
  attention_heads: int = 4

  # Mamba-2 has no MLP, so twice the mixers of the other families at each size.
  PRESET_FIELDS: ClassVar[dict[str, dict[str, Any]]] = {
    "tiny": {"n_layers": 4, "d_ff": 0, "d_state": 16, "head_dim": 16},
    "small": {"n_layers": 16, "d_ff": 0, "d_state": 64, "head_dim": 64},
    "base": {"n_layers": 24, "d_ff": 0, "d_state": 128, "head_dim": 64},
  }

  def __post_init__(self):
    super().__post_init__()
    self.check_decay_init()
    self.check_positive("d_state", "expand", "head_dim", "attention_heads")
    if self.d_inner % self.head_dim:
      raise ValueError(f"head_dim={self.head_dim} must divide d_inner={self.d_inner}")
    if self.attention_layers and (
      self.d_model % self.attention_heads or (self.d_model // self.attention_heads) % 2
    ):
      raise ValueError(
        f"attention_heads={self.attention_heads} must divide d_model={self.d_model} "
        "into even head widths (RoPE)"
      )

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def n_heads(self) -> int:
    return self.d_inner // self.head_dim


PRESETS = presets(Mamba2Config)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
