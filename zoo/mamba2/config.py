"""Configuration of Mamba-2 (Dao and Gu 2024, "Transformers are SSMs")."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.layers.hybrid import check_common


@config_dataclass
class Mamba2Config:
  """Mamba-2 stack (one group of B/C shared by all heads), optionally hybrid with attention.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    d_state: SSM state width N per head (the key dim of the memory).
    expand: inner width ``d_inner = expand * d_model``.
    head_dim: SSM head width P (the value dim); ``d_inner`` must be a multiple of it.
    d_ff: SwiGLU hidden width (0 = no MLP, as in Mamba-2).
    max_len: longest sequence (full-attention decode cache size default).
    conv_width: short convolution on x, B, C (0 = none).
    attention_layers: indices of the layers that are softmax attention instead.
    attention_heads: heads of those attention layers.
    window: sliding window of those attention layers (None = full causal attention).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and memory states stay float32.
    chunk_size: ``gated_delta_rule`` chunk length.
    memory_impl: ``gated_delta_rule`` implementation (None = by backend).
    attention_impl: ``ops.attention`` implementation (None = by backend).
  """

  family: Literal["mamba2"] = "mamba2"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  d_state: int = 16
  expand: int = 2
  head_dim: int = 32
  d_ff: int = 0
  max_len: int = 512
  conv_width: int = 4
  attention_layers: tuple[int, ...] = ()
  attention_heads: int = 4
  window: int | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  chunk_size: int = 64
  memory_impl: str | None = None
  attention_impl: str | None = None

  def __post_init__(self):
    check_common(self)
    for name in ("d_state", "expand", "head_dim", "attention_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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


def tiny(**overrides) -> Mamba2Config:
  """For tests and MQAR on CPU: 4 layers (Mamba-2 has no MLP, so twice the mixers)."""
  return Mamba2Config(**{"d_model": 64, "n_layers": 4, "d_state": 16, "head_dim": 16, **overrides})


def small(**overrides) -> Mamba2Config:
  """~25M parameters."""
  return Mamba2Config(
    **{"d_model": 512, "n_layers": 16, "d_state": 64, "head_dim": 64, "max_len": 2048, **overrides}
  )


def base(**overrides) -> Mamba2Config:
  """~125M-class layout (GPU/TPU)."""
  return Mamba2Config(
    **{
      "d_model": 768,
      "n_layers": 24,
      "d_state": 128,
      "head_dim": 64,
      "max_len": 4096,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
