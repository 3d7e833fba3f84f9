"""Configuration of InfLLM: training-free block memory on a transformer."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.transformer import config as tcfg
from zoo.transformer.config import TransformerConfig


@config_dataclass
class InfLLMConfig:
  """InfLLM (Xiao et al. 2024) around a Llama-style backbone.

  Attributes:
    vocab_size: must equal ``backbone.vocab_size``.
    backbone: the wrapped transformer (its own ``window``/``sinks`` are ignored).
    sinks: initial tokens always attended.
    window: local window (most recent tokens, including the current one).
    block_size: tokens per memory block.
    top_k: memory blocks each query retrieves.
    n_repr: representative keys per block (retrieval scores a block by them).
    chunk_size: tokens per step when the forward encodes a long input (InfLLM's chunked
      prefill); the forward is exactly a chunked decode.
  """

  family: Literal["infllm"] = "infllm"
  vocab_size: int = 260
  backbone: TransformerConfig = tcfg.tiny()
  sinks: int = 4
  window: int = 64
  block_size: int = 16
  top_k: int = 4
  n_repr: int = 4
  chunk_size: int = 64

  def __post_init__(self):
    b = self.backbone
    if self.vocab_size != b.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={b.vocab_size}"
      )
    for name in ("window", "block_size", "top_k", "n_repr", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.sinks < 0:
      raise ValueError(f"sinks must be >= 0, got {self.sinks}")
    if self.n_repr > self.block_size:
      raise ValueError(f"n_repr={self.n_repr} must be <= block_size={self.block_size}")


def tiny(**overrides) -> InfLLMConfig:
  return InfLLMConfig(**{"backbone": tcfg.tiny(), **overrides})


def small(**overrides) -> InfLLMConfig:
  kw = {"backbone": tcfg.small(), "sinks": 64, "window": 512, "block_size": 128, "top_k": 4}
  return InfLLMConfig(**{**kw, "n_repr": 4, "chunk_size": 512, **overrides})


def base(**overrides) -> InfLLMConfig:
  kw = {"backbone": tcfg.base(), "sinks": 128, "window": 1024, "block_size": 128, "top_k": 16}
  return InfLLMConfig(**{**kw, "n_repr": 4, "chunk_size": 512, **overrides})


PRESETS = {"tiny": tiny, "small": small, "base": base}
