"""Configuration of DeltaNet (Yang et al. 2024, "Parallelizing linear transformers with the
delta rule over sequence length"); gated DeltaNet subclasses it."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.layers.hybrid import check_common


@config_dataclass
class DeltaNetConfig:
  """DeltaNet stack, optionally hybrid with softmax-attention layers.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: heads H.
    head_dim: per-head key and value width (K = V); default ``d_model // n_heads``.
    d_ff: SwiGLU hidden width (0 = no MLP).
    max_len: longest sequence (full-attention decode cache size default).
    conv_width: short convolution on q, k, v (0 = none).
    output_gate: multiply the normed output by ``silu(x W_gate)``.
    attention_layers: indices of the layers that are softmax attention instead.
    window: sliding window of those attention layers (None = full causal attention).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and memory states stay float32.
    chunk_size: ``gated_delta_rule`` chunk length.
    memory_impl: ``gated_delta_rule`` implementation (None = by backend).
    attention_impl: ``ops.attention`` implementation (None = by backend).
  """

  family: Literal["deltanet"] = "deltanet"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int | None = None
  d_ff: int = 384
  max_len: int = 512
  conv_width: int = 4
  output_gate: bool = False
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
    if self.n_heads < 1:
      raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
    if self.attention_layers and self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def tiny(**overrides) -> DeltaNetConfig:
  """For tests and MQAR on CPU."""
  return DeltaNetConfig(**{"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, **overrides})


def small(**overrides) -> DeltaNetConfig:
  """~25M parameters."""
  return DeltaNetConfig(
    **{"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 1408, "max_len": 2048, **overrides}
  )


def base(**overrides) -> DeltaNetConfig:
  """~125M-class layout (GPU/TPU)."""
  return DeltaNetConfig(
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
