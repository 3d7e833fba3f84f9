"""Configuration of HMT: segment recurrence with memory embeddings around a backbone."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.transformer import config as tcfg
from zoo.transformer.config import TransformerConfig


@config_dataclass
class HMTConfig:
  """Hierarchical Memory Transformer (He et al. 2024) around a Llama-style backbone.

  Attributes:
    vocab_size: must equal ``backbone.vocab_size``.
    backbone: the segment-level model.
    segment_len: tokens per segment L.
    sensory: tokens of the previous segment's tail prepended to each segment (k).
    memories: memory embeddings kept for recall (N).
    bptt_segments: gradients flow through at most this many segments (truncated BPTT).
  """

  family: Literal["hmt"] = "hmt"
  vocab_size: int = 260
  backbone: TransformerConfig = tcfg.tiny()
  segment_len: int = 32
  sensory: int = 8
  memories: int = 16
  bptt_segments: int = 2

  def __post_init__(self):
    if self.vocab_size != self.backbone.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={self.backbone.vocab_size}"
      )
    for name in ("segment_len", "memories", "bptt_segments"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.sensory <= self.segment_len:
      raise ValueError(f"sensory must be in [0, segment_len], got {self.sensory}")


def tiny(**overrides) -> HMTConfig:
  return HMTConfig(**{"backbone": tcfg.tiny(), **overrides})


def small(**overrides) -> HMTConfig:
  kw = {"backbone": tcfg.small(), "segment_len": 256, "sensory": 32, "memories": 64}
  return HMTConfig(**{**kw, **overrides})


def base(**overrides) -> HMTConfig:
  kw = {"backbone": tcfg.base(), "segment_len": 512, "sensory": 32, "memories": 300}
  return HMTConfig(**{**kw, **overrides})


PRESETS = {"tiny": tiny, "small": small, "base": base}
