"""Configuration of Hope (Nested Learning): self-modifying Titans + continuum memory system."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass


@config_dataclass
class HopeConfig:
  """Hope: each block is a self-modifying Titans memory followed by a CMS chain of MLP levels.

  Attributes:
    vocab_size: number of token ids (the byte tokenizer has 260).
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: memory heads H.
    head_dim: per-head width; default ``d_model // n_heads``.
    max_len: longest sequence the model is built for.
    memory_depth: 1 or 2 (the Titans memory MLP).
    memory_expansion: hidden width of a depth-2 memory in units of head_dim.
    chunk_size: tokens per chunk of the Titans memory update (power of two).
    conv_size: short causal convolution width on memory q/k/v (0 = none).
    memory_lr_max: cap of the Titans memory's summed inner step per chunk
      (``zoo.layers.neural_memory``).
    self_modifying: keys and values come from a memory trained in context (Hope); False
      gives plain Titans projections.
    self_targets: the self-modifying key/value memory generates its own targets
      (``v_hat_t = M_{t-1}(v_t)``, Nested Learning) instead of regressing onto the static
      key/value projections (False, the earlier behaviour). Ignored without self_modifying.
    cms_chunk_sizes: update period of each CMS level, fastest first (Nested Learning's
      frequencies); one MLP level per entry.
    cms_hidden: hidden width of each CMS MLP.
    cms_lr_max: cap of a CMS level's summed inner step per chunk (``zoo.hope.cms``).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: output projection = transposed input embedding.
    dtype: compute dtype; parameters and fast weights stay float32.
    memory_impl: ``ops.memory.neural_memory`` implementation (None = by backend).
  """

  family: Literal["hope"] = "hope"
  vocab_size: int = 260
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int | None = None
  max_len: int = 512
  memory_depth: int = 2
  memory_expansion: int = 2
  chunk_size: int = 16
  conv_size: int = 4
  memory_lr_max: float = 0.5
  self_modifying: bool = True
  self_targets: bool = True
  cms_chunk_sizes: tuple[int, ...] = (1, 16, 64)
  cms_hidden: int = 256
  cms_lr_max: float = 0.2
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  memory_impl: str | None = None

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "max_len",
      "memory_expansion",
      "chunk_size",
      "cms_hidden",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.conv_size < 0:
      raise ValueError(f"conv_size must be >= 0, got {self.conv_size}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
        f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
        "change one of them or set head_dim"
      )
    if self.chunk_size & (self.chunk_size - 1):
      raise ValueError(f"chunk_size must be a power of two, got {self.chunk_size}")
    if self.memory_depth not in (1, 2):
      raise ValueError(f"memory_depth must be 1 or 2, got {self.memory_depth}")
    if any(c < 1 for c in self.cms_chunk_sizes):
      raise ValueError(f"cms_chunk_sizes must all be >= 1, got {self.cms_chunk_sizes}")
    for name in ("memory_lr_max", "cms_lr_max"):
      if not 0.0 < getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


def tiny(**overrides) -> HopeConfig:
  """For tests and the CPU demo: d_model 64, 2 layers, CMS levels every 1, 4 and 16 tokens."""
  return HopeConfig(
    **{
      "d_model": 64,
      "n_layers": 2,
      "n_heads": 4,
      "max_len": 512,
      "chunk_size": 8,
      "cms_chunk_sizes": (1, 4, 16),
      "cms_hidden": 128,
      **overrides,
    }
  )


def small(**overrides) -> HopeConfig:
  """~25M-class layout with the byte vocabulary."""
  return HopeConfig(
    **{
      "d_model": 512,
      "n_layers": 8,
      "n_heads": 8,
      "max_len": 2048,
      "chunk_size": 16,
      "cms_chunk_sizes": (16, 128, 1024),
      "cms_hidden": 1024,
      **overrides,
    }
  )


def base(**overrides) -> HopeConfig:
  """The paper's smallest-run class (GPU/TPU)."""
  return HopeConfig(
    **{
      "d_model": 768,
      "n_layers": 12,
      "n_heads": 12,
      "max_len": 4096,
      "chunk_size": 64,
      "cms_chunk_sizes": (64, 512, 4096),
      "cms_hidden": 2048,
      "dtype": "bfloat16",
      **overrides,
    }
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}
