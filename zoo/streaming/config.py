"""Configuration of StreamingLLM: a transformer decoding with sinks + a rolling window."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.transformer import config as tcfg
from zoo.transformer.config import TransformerConfig


@config_dataclass
class StreamingConfig:
  """StreamingLLM (Xiao et al. 2023) around a Llama-style backbone.

  Attributes:
    vocab_size: must equal ``backbone.vocab_size``.
    backbone: the wrapped transformer (its own ``window``/``sinks`` are ignored).
    sinks: initial tokens kept forever (0 = window-only attention).
    window: most recent tokens kept (including the current one).
    shift: re-assign positions inside the cache (the paper's choice); False keeps the original
      positions (the plain sink+window mask).
    learnable_sink: prepend one learned sink embedding to every stream (Sec. 3.3, for models
      trained from scratch).
  """

  family: Literal["streaming"] = "streaming"
  vocab_size: int = 260
  backbone: TransformerConfig = tcfg.tiny()
  sinks: int = 4
  window: int = 60
  shift: bool = True
  learnable_sink: bool = False

  def __post_init__(self):
    if self.vocab_size != self.backbone.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={self.backbone.vocab_size}"
      )
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.sinks < 0:
      raise ValueError(f"sinks must be >= 0, got {self.sinks}")


def tiny(**overrides) -> StreamingConfig:
  return StreamingConfig(**{"backbone": tcfg.tiny(), "sinks": 4, "window": 60, **overrides})


def small(**overrides) -> StreamingConfig:
  return StreamingConfig(**{"backbone": tcfg.small(), "sinks": 4, "window": 508, **overrides})


def base(**overrides) -> StreamingConfig:
  return StreamingConfig(**{"backbone": tcfg.base(), "sinks": 4, "window": 1020, **overrides})


PRESETS = {"tiny": tiny, "small": small, "base": base}
