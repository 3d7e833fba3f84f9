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
    offload: keep committed blocks (keys, values, representative keys) in host memory; the
      device state is then fixed-size whatever the stream length (inference only).
    segmentation: ``"fixed"`` blocks (InfLLM) or ``"surprise"`` events (EM-LLM): each block
      of ``block_size`` tokens is cut where the token surprise exceeds ``mean + gamma * std``.
    surprise_gamma: EM-LLM's threshold, in standard deviations.
    surprise_window: previous tokens whose surprises set a token's threshold.
    min_event: shortest EM-LLM event (a block holds at most ``block_size // min_event``).
    refine: EM-LLM boundary refinement radius (tokens; 0 = none), by modularity of the key
      similarity graph.
    neighbours: temporally contiguous events retrieved on each side of every top-k event.
    query_tile: queries of a step that share their retrieved blocks (InfLLM's chunked prefill;
      fixed blocks on device). A one-token step (decode) retrieves per token; 1 retrieves per
      token everywhere. The block-sparse Pallas kernels need query tiles of at least 16
      (GPU: powers of two >= 16, TPU: multiples of 128 or the whole step), so smaller tiles
      run the XLA attention; the default, the default ``chunk_size``, serves both.
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
  offload: bool = False
  segmentation: Literal["fixed", "surprise"] = "fixed"
  surprise_gamma: float = 1.0
  surprise_window: int = 32
  min_event: int = 4
  refine: int = 0
  neighbours: int = 0
  query_tile: int = 64

  def __post_init__(self):
    b = self.backbone
    if self.vocab_size != b.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={b.vocab_size}"
      )
    for name in ("window", "block_size", "top_k", "n_repr", "chunk_size", "query_tile"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("sinks", "refine", "neighbours"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.surprise_window < 1:
      raise ValueError(f"surprise_window must be >= 1, got {self.surprise_window}")
    if self.segmentation == "surprise":
      if not self.n_repr <= self.min_event <= self.block_size:
        raise ValueError(
          f"min_event={self.min_event} must lie in [n_repr={self.n_repr}, "
          f"block_size={self.block_size}] (an event needs n_repr keys and fits a block)"
        )
      if self.chunk_size > self.window:
        raise ValueError(
          f"chunk_size={self.chunk_size} must be <= window={self.window} with surprise "
          "segmentation (a block is segmented when it leaves the window, which must come "
          "after the surprise of its tokens is known)"
        )
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


def emllm_tiny(**overrides) -> InfLLMConfig:
  """EM-LLM on the tiny backbone: surprise events, refinement, contiguity buffer."""
  kw = {"segmentation": "surprise", "block_size": 32, "min_event": 4, "refine": 2}
  return tiny(**{**kw, "neighbours": 1, "top_k": 2, "chunk_size": 32, **overrides})


def emllm_small(**overrides) -> InfLLMConfig:
  kw = {"segmentation": "surprise", "block_size": 128, "min_event": 8, "refine": 4}
  return small(**{**kw, "neighbours": 1, "top_k": 4, **overrides})


PRESETS = {
  "tiny": tiny, "small": small, "base": base, "emllm_tiny": emllm_tiny, "emllm_small": emllm_small
}  # fmt: skip
