"""Configuration of the Llama-style baseline."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.layers.rope import RopeScaling


@config_dataclass
class TransformerConfig:
  """Llama-style decoder.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: query heads H.
    n_kv_heads: key/value heads K (GQA); must divide ``n_heads``.
    head_dim: per-head width; default ``d_model // n_heads``.
    d_ff: SwiGLU hidden width.
    max_len: longest sequence the model is built for (decode cache size default).
    rope_base: RoPE base.
    rope_scaling: RoPE scaling for extrapolation (none by default).
    window: sliding-window attention width (None = full causal).
    window_layers: the blocks (0-based) that use ``window``; None = every block (Qwen2's
      ``layer_types`` / ``max_window_layers`` make only some layers sliding).
    sinks: attention-sink keys that stay visible through the window (StreamingLLM).
    conv_width: Primer's multi-dconv-head attention: a causal depthwise convolution of this
      width over time after the q, k and v projections (0 = none, the Llama layout; the
      training-free memories and the HF export need 0).
    qkv_bias: biases on the q, k and v projections (Qwen2).
    out_bias: a bias on the attention output projection (Llama ``attention_bias``).
    qk_norm: RMSNorm over ``head_dim`` of every query and key head before RoPE (Qwen3).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (float32 unless a checkpoint stored in
      bfloat16/float16 is imported as such).
    attention_impl: ``ops.attention`` implementation (None = by backend).
  """

  family: Literal["transformer"] = "transformer"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int | None = None
  d_ff: int = 384
  max_len: int = 512
  rope_base: float = 10000.0
  rope_scaling: RopeScaling | None = None
  window: int | None = None
  window_layers: tuple[int, ...] | None = None
  sinks: int = 0
  conv_width: int = 0
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
        f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
        "change one of them or set head_dim"
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1 or null, got {self.window}")
    if self.window_layers is not None:
      if self.window is None:
        raise ValueError("window_layers needs a window (the width those layers use)")
      bad = [i for i in self.window_layers if not 0 <= i < self.n_layers]
      if bad:
        raise ValueError(f"window_layers {bad} are not blocks of a {self.n_layers}-layer model")
    if self.sinks < 0:
      raise ValueError(f"sinks must be >= 0, got {self.sinks}")
    if self.conv_width < 0:
      raise ValueError(f"conv_width must be >= 0 (0 = no convolution), got {self.conv_width}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  def layer_window(self, layer: int) -> int | None:
    """The sliding-window width of block ``layer`` (None = full causal)."""
    if self.window_layers is not None and layer not in self.window_layers:
      return None
    return self.window


def tiny(**overrides) -> TransformerConfig:
  """For tests and the CPU demo: ~0.4M parameters."""
  return TransformerConfig(
    **{
      "d_model": 128,
      "n_layers": 2,
      "n_heads": 4,
      "n_kv_heads": 2,
      "d_ff": 384,
      "max_len": 512,
      **overrides,
    }
  )


def small(**overrides) -> TransformerConfig:
  """~25M parameters with the byte vocabulary."""
  return TransformerConfig(
    **{
      "d_model": 512,
      "n_layers": 8,
      "n_heads": 8,
      "n_kv_heads": 4,
      "d_ff": 1408,
      "max_len": 2048,
      **overrides,
    }
  )


def base(**overrides) -> TransformerConfig:
  """~125M-class Llama layout (GPU/TPU)."""
  return TransformerConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "n_kv_heads": 4,
      "d_ff": 2048,
      "max_len": 4096,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
