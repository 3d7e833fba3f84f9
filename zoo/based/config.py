"""Configuration of BASED (Arora et al. 2024, "Simple linear attention language models balance
the recall-throughput tradeoff")."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from zoo.configbase import config_dataclass
from zoo.layers.recurrent_config import RecurrentLMConfig, presets


@config_dataclass
class BasedConfig(RecurrentLMConfig):
  """BASED stack: linear-attention layers with the Taylor feature map, plus softmax layers.

  Shared fields: :class:`zoo.layers.recurrent_config.RecurrentLMConfig`; here ``conv_width``
  is the short convolution on q, k, v of every layer, linear and sliding-window attention alike:
  it plays the role of the paper's BaseConv, which precedes every sequence mixer in BASED's
  recall experiments.

  Attributes:
    n_heads: heads H of every mixer.
    feature_dim: per-head query/key width K before the Taylor map (state grows as K^2).
    head_dim: per-head value width V (and attention head width); default ``d_model // n_heads``.
  """

  family: Literal["based"] = "based"
  n_heads: int = 4
  feature_dim: int = 16
  head_dim: int | None = None
  conv_width: int = 3
  attention_layers: tuple[int, ...] = (1,)
  window: int | None = 16

  PRESET_FIELDS: ClassVar[dict[str, dict[str, Any]]] = {
    "tiny": {"n_heads": 4, "feature_dim": 8, "window": 16},
    # ~25M parameters: 8 layers, every fourth one sliding-window attention.
    "small": {"n_heads": 8, "feature_dim": 16, "attention_layers": (3, 7), "window": 64},
    "base": {"n_heads": 12, "feature_dim": 16, "attention_layers": (2, 5, 8, 11), "window": 128},
  }

  def __post_init__(self):
    super().__post_init__()
    self.check_positive("n_heads", "feature_dim")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


PRESETS = presets(BasedConfig)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
