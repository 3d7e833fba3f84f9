"""Configuration of Titans (and, with other defaults, of ATLAS: ``zoo.atlas.config``)."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass


@config_dataclass
class TitansConfig:
  """Titans: neural long-term memory with attention as short-term memory.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    variant: "mac" (memory as context: each segment attends over [persistent, retrieved
      memory, segment]), "mag" (memory as gate: sliding-window attention gated by the memory),
      "mal" (memory as layer: memory then sliding-window attention), "lmm" (memory only).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: heads H of attention and memory.
    head_dim: per-head width; default ``d_model // n_heads``.
    d_ff: SwiGLU hidden width.
    max_len: longest sequence the model is built for (decode cache size default).
    n_persistent: learned persistent-memory tokens (prefix for mag/mal/lmm, per-segment
      context for mac).
    window: sliding-window width of mag/mal attention.
    segment_size: mac's segment length.
    memory_depth: 1 (matrix memory) or 2 (``W2 act(W1 x)``).
    memory_expansion: hidden width of a depth-2 memory in units of head_dim.
    chunk_size: tokens per chunk of the memory update (power of two; 1 = fully sequential).
    conv_size: short causal convolution width on memory q/k/v (0 = none).
    memory_lr_max: cap of the memory's summed inner step per chunk (theta =
      ``lr_max sigmoid(.) / (chunk_size omega_window)``, see ``zoo.layers.neural_memory``).
    omega_window: tokens in the inner loss (ATLAS's Omega rule; 1 = Titans).
    feature_map: key/query feature map of the memory ("identity", "poly2", "poly3", "poly4":
      degree-P Taylor features of the exponential kernel, "elu1").
    objective: the memory's inner loss, "l2" (``||M(k) - v||^2``, Titans) or "dot"
      (``-<M(k), v>``, the Hebbian rule of ATLAS's DeepTransformers).
    learn_omega_weights: learn ATLAS's input-dependent Omega weights gamma_t in [0, 1] (a
      per-head projection + sigmoid); False keeps gamma = 1.
    optimizer: inner optimiser, "momentum" (Titans) or "muon" (ATLAS).
    ns_steps: Newton-Schulz iterations of "muon".
    activation: the depth-2 memory's nonlinearity.
    rope_base: RoPE base of the attention.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters, memory states and gates stay float32.
    attention_impl: ``ops.attention`` implementation (None = by backend).
    memory_impl: ``ops.memory.neural_memory`` implementation (None = by backend).
  """

  family: Literal["titans"] = "titans"
  vocab_size: int = 260
  variant: Literal["mac", "mag", "mal", "lmm"] = "mag"
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int | None = None
  d_ff: int = 384
  max_len: int = 512
  n_persistent: int = 4
  window: int = 32
  segment_size: int = 32
  memory_depth: int = 2
  memory_expansion: int = 2
  chunk_size: int = 16
  conv_size: int = 4
  memory_lr_max: float = 0.5
  omega_window: int = 1
  feature_map: Literal["identity", "poly2", "poly3", "poly4", "elu1"] = "identity"
  objective: Literal["l2", "dot"] = "l2"
  learn_omega_weights: bool = False
  optimizer: Literal["momentum", "muon"] = "momentum"
  ns_steps: int = 5
  activation: Literal["silu", "gelu", "relu", "tanh"] = "silu"
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  attention_impl: str | None = None
  memory_impl: str | None = None

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "d_ff",
      "max_len",
      "window",
      "segment_size",
      "memory_expansion",
      "chunk_size",
      "omega_window",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("n_persistent", "conv_size", "ns_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
        f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
        "change one of them or set head_dim"
      )
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
    if self.chunk_size & (self.chunk_size - 1):
      raise ValueError(f"chunk_size must be a power of two, got {self.chunk_size}")
    if self.memory_depth not in (1, 2):
      raise ValueError(f"memory_depth must be 1 or 2, got {self.memory_depth}")
    if not 0.0 < self.memory_lr_max <= 1.0:
      raise ValueError(f"memory_lr_max must lie in (0, 1], got {self.memory_lr_max}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def tiny(**overrides) -> TitansConfig:
  """For tests and the CPU demo: d_model 64, 2 layers, MAG."""
  return TitansConfig(
    **{
      "d_model": 64,
      "n_layers": 2,
      "n_heads": 4,
      "d_ff": 192,
      "max_len": 512,
      "n_persistent": 4,
      "window": 16,
      "segment_size": 16,
      "chunk_size": 8,
      **overrides,
    }
  )


def small(**overrides) -> TitansConfig:
  """~25M parameters with the byte vocabulary."""
  return TitansConfig(
    **{
      "d_model": 512,
      "n_layers": 8,
      "n_heads": 8,
      "d_ff": 1408,
      "max_len": 2048,
      "n_persistent": 16,
      "window": 256,
      "segment_size": 256,
      "chunk_size": 16,
      **overrides,
    }
  )


def base(**overrides) -> TitansConfig:
  """~170M-class layout of the paper's smallest runs (GPU/TPU)."""
  return TitansConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "d_ff": 2048,
      "max_len": 4096,
      "n_persistent": 16,
      "window": 512,
      "segment_size": 512,
      "chunk_size": 64,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
