"""Configuration of MoM (Du et al. 2025, "MoM: linear sequence modeling with mixture-of-
memories")."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.layers.hybrid import check_common


@config_dataclass
class MoMConfig:
  """MoM stack: each layer holds ``n_memories`` routed memories (+ one shared memory).

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: heads H per memory.
    head_dim: per-head key and value width; default ``d_model // n_heads``.
    n_memories: routed memories per layer.
    top_k: memories each token writes to and reads from.
    shared_memory: add a memory every token uses (weight 1).
    rule: memory update, ``"delta"`` (gated DeltaNet memories, the paper's best) or ``"additive"``.
    gated: data-dependent decay per memory and head.
    d_ff: SwiGLU hidden width (0 = no MLP).
    max_len: longest sequence (full-attention decode cache size default).
    conv_width: short convolution on q, k, v (0 = none).
    attention_layers: indices of the layers that are softmax attention instead.
    window: sliding window of those attention layers (None = full causal attention).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and memory states stay float32.
    chunk_size: ``gated_delta_rule`` chunk length.
    memory_impl: ``gated_delta_rule`` implementation (None = by backend).
    attention_impl: ``ops.attention`` implementation (None = by backend).
  """

  family: Literal["mom"] = "mom"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int | None = None
  n_memories: int = 4
  top_k: int = 2
  shared_memory: bool = True
  rule: Literal["delta", "additive"] = "delta"
  gated: bool = True
  d_ff: int = 384
  max_len: int = 512
  conv_width: int = 4
  attention_layers: tuple[int, ...] = ()
  window: int | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  chunk_size: int = 64
  memory_impl: str | None = None
  attention_impl: str | None = None

  def __post_init__(self):
    check_common(self)
    for name in ("n_heads", "n_memories", "top_k"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.top_k > self.n_memories:
      raise ValueError(f"top_k={self.top_k} must be <= n_memories={self.n_memories}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def tiny(**overrides) -> MoMConfig:
  """For tests and MQAR on CPU."""
  return MoMConfig(**{"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, **overrides})


def small(**overrides) -> MoMConfig:
  """~25M parameters."""
  return MoMConfig(
    **{"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 1408, "max_len": 2048, **overrides}
  )


def base(**overrides) -> MoMConfig:
  """~125M-class layout (GPU/TPU)."""
  return MoMConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "d_ff": 2048,
      "max_len": 4096,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
