"""Configuration of DuoAttention: retrieval heads attend fully, streaming heads to sinks+window."""

from __future__ import annotations

from typing import Literal

from zoo.configbase import config_dataclass
from zoo.transformer import config as tcfg
from zoo.transformer.config import TransformerConfig


@config_dataclass
class DuoConfig:
  """DuoAttention (Xiao et al. 2024) around a Llama-style backbone.

  Heads are chosen per key/value head (with GQA, a KV head and its query heads go together).

  Attributes:
    vocab_size: must equal ``backbone.vocab_size``.
    backbone: the wrapped transformer (its own ``window``/``sinks`` are ignored).
    sinks: initial tokens the streaming heads keep.
    window: recent tokens the streaming heads keep (including the current one).
    retrieval_heads: per layer, the KV heads that keep full attention; None = every head
      (plain full attention, the state before gate optimisation).
  """

  family: Literal["duo"] = "duo"
  vocab_size: int = 260
  backbone: TransformerConfig = tcfg.tiny()
  sinks: int = 4
  window: int = 60
  retrieval_heads: tuple[tuple[int, ...], ...] | None = None

  def __post_init__(self):
    b = self.backbone
    if self.vocab_size != b.vocab_size:
      raise ValueError(
        f"vocab_size={self.vocab_size} differs from backbone.vocab_size={b.vocab_size}"
      )
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.sinks < 0:
      raise ValueError(f"sinks must be >= 0, got {self.sinks}")
    if self.retrieval_heads is not None:
      if len(self.retrieval_heads) != b.n_layers:
        raise ValueError(
          f"retrieval_heads needs one tuple per layer ({b.n_layers}), "
          f"got {len(self.retrieval_heads)}"
        )
      for layer in self.retrieval_heads:
        if any(h < 0 or h >= b.n_kv_heads for h in layer) or len(set(layer)) != len(layer):
          raise ValueError(
            f"retrieval_heads entries must be distinct KV heads in [0, {b.n_kv_heads}), got {layer}"
          )

  def retrieval(self, layer: int) -> tuple[int, ...]:
    """Sorted retrieval KV heads of ``layer``."""
    if self.retrieval_heads is None:
      return tuple(range(self.backbone.n_kv_heads))
    return tuple(sorted(self.retrieval_heads[layer]))


def tiny(**overrides) -> DuoConfig:
  return DuoConfig(**{"backbone": tcfg.tiny(), "sinks": 4, "window": 60, **overrides})


def small(**overrides) -> DuoConfig:
  return DuoConfig(**{"backbone": tcfg.small(), "sinks": 16, "window": 240, **overrides})


def base(**overrides) -> DuoConfig:
  return DuoConfig(**{"backbone": tcfg.base(), "sinks": 64, "window": 256, **overrides})


PRESETS = {"tiny": tiny, "small": small, "base": base}
