"""Configuration of MoM (Du et al. 2025, "MoM: linear sequence modeling with mixture-of-
memories")."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from zoo.configbase import config_dataclass
from zoo.layers.recurrent_config import DecayInit, RecurrentLMConfig, presets


@config_dataclass
class MoMConfig(RecurrentLMConfig, DecayInit):
  """MoM stack: each layer holds ``n_memories`` routed memories (+ one shared memory).

  Shared fields: :class:`zoo.layers.recurrent_config.RecurrentLMConfig`, and the decay's
  initialisation :class:`zoo.layers.recurrent_config.DecayInit` (with ``gated``).

  Attributes:
    n_heads: heads H per memory.
    head_dim: per-head key and value width; default ``d_model // n_heads``.
    n_memories: routed memories per layer.
    top_k: memories each token writes to and reads from.
    shared_memory: add a memory every token uses (weight 1).
    rule: memory update, ``"delta"`` (gated DeltaNet memories, the paper's best) or ``"additive"``.
    gated: data-dependent decay per memory and head.
  """

  family: Literal["mom"] = "mom"
  n_heads: int = 4
  head_dim: int | None = None
  n_memories: int = 4
  top_k: int = 2
  shared_memory: bool = True
  rule: Literal["delta", "additive"] = "delta"
  gated: bool = True

  PRESET_FIELDS: ClassVar[dict[str, dict[str, Any]]] = {
    "tiny": {"n_heads": 4},
    "small": {"n_heads": 8},
    "base": {"n_heads": 12},
  }

  def __post_init__(self):
    super().__post_init__()
    self.check_decay_init()
    self.check_positive("n_heads", "n_memories", "top_k")
    if self.top_k > self.n_memories:
      raise ValueError(f"top_k={self.top_k} must be <= n_memories={self.n_memories}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


PRESETS = presets(MoMConfig)
tiny, small, base = PRESETS["tiny"], PRESETS["small"], PRESETS["base"]
