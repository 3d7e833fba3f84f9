"""Configuration of landmark attention: a landmark token closes every block of tokens."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.transformer import config as tcfg
from zoo.transformer.config import TransformerConfig


@config_dataclass
class LandmarkConfig:
  """Landmark attention (Mohtashami & Jaggi 2023) on a Llama-style layer stack.

  Attributes:
    vocab_size: must equal ``backbone.vocab_size``.
    backbone: the layer stack (its ``window``/``sinks`` are ignored).
    block_size: tokens per block *including* its landmark (``block_size - 1`` real tokens).
    top_k: previous blocks each query retrieves by landmark score; None = all of them
      (the dense grouped softmax of training).
    query_tile: with ``top_k``, queries of the forward that share their retrieved blocks
      (InfLLM-style chunked retrieval); must divide ``block_size``; None = ``block_size``
      (a block's queries share them), 1 = per token (dense). Tiles and blocks that are powers
      of two >= 16 reach the GPU kernel (TPU: multiples of 128); others run XLA. Decode always
      retrieves per token.
  """

  family: Literal["landmark"] = "landmark"
  vocab_size: int = 260
  backbone: TransformerConfig = tcfg.tiny()
  block_size: int = 16
  top_k: int | None = None
  query_tile: int | None = None

  def __post_init__(self):
    if self.vocab_size != self.backbone.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={self.backbone.vocab_size}"
      )
    if self.block_size < 2:
      raise ValueError(f"block_size must be >= 2 (tokens + landmark), got {self.block_size}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")
    tile = self.query_tile
    if tile is not None and (tile < 1 or self.block_size % tile):
      raise ValueError(
        f"query_tile must be a divisor of block_size={self.block_size} or null, got {tile}"
      )


def tiny(**overrides) -> LandmarkConfig:
  return LandmarkConfig(**{"backbone": tcfg.tiny(), "block_size": 16, **overrides})


def small(**overrides) -> LandmarkConfig:
  return LandmarkConfig(**{"backbone": tcfg.small(), "block_size": 50, **overrides})


def base(**overrides) -> LandmarkConfig:
  return LandmarkConfig(**{"backbone": tcfg.base(), "block_size": 50, **overrides})


PRESETS = {"tiny": tiny, "small": small, "base": base}
