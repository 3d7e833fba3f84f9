"""Configuration of BASED (Arora et al. 2024, "Simple linear attention language models balance
the recall-throughput tradeoff")."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.layers.hybrid import check_common


@config_dataclass
class BasedConfig:
  """BASED stack: linear-attention layers with the Taylor feature map, plus softmax layers.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: heads H of every mixer.
    feature_dim: per-head query/key width K before the Taylor map (state grows as K^2).
    head_dim: per-head value width V (and attention head width); default ``d_model // n_heads``.
    d_ff: SwiGLU hidden width (0 = no MLP).
    max_len: longest sequence (full-attention decode cache size default).
    conv_width: short convolution on q, k, v of every layer, linear and sliding-window
      attention alike (0 = none); it plays the role of the paper's BaseConv, which precedes
      every sequence mixer in BASED's recall experiments.
    attention_layers: indices of the layers that are softmax attention instead.
    window: sliding window of those attention layers (None = full causal attention).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and memory states stay float32.
    chunk_size: ``gated_delta_rule`` chunk length.
    memory_impl: ``gated_delta_rule`` implementation (None = by backend).
    attention_impl: ``ops.attention`` implementation (None = by backend).
  """

  family: Literal["based"] = "based"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  feature_dim: int = 16
  head_dim: int | None = None
  d_ff: int = 384
  max_len: int = 512
  conv_width: int = 3
  attention_layers: tuple[int, ...] = (1,)
  window: int | None = 16
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  chunk_size: int = 64
  memory_impl: str | None = None
  attention_impl: str | None = None

  def __post_init__(self):
    check_common(self)
    for name in ("n_heads", "feature_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def tiny(**overrides) -> BasedConfig:
  """For tests and MQAR on CPU."""
  return BasedConfig(
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


def small(**overrides) -> BasedConfig:
  """~25M parameters: 8 layers, every fourth one sliding-window attention."""
  return BasedConfig(
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


def base(**overrides) -> BasedConfig:
  """~125M-class layout (GPU/TPU)."""
  return BasedConfig(
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
