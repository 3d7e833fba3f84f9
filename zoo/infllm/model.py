"""InfLLM: a transformer whose attention reads a block memory (:class:`BlockMemoryCache`).

Training-free: ``.backbone`` is an ordinary :class:`zoo.transformer.Transformer` (load any
transformer's parameters into it, or use :func:`from_transformer`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.infllm.config import InfLLMConfig
from zoo.infllm.memory import BlockMemoryCache
from zoo.layers.cache import step_blocks
from zoo.transformer.model import Transformer


class InfLLM(nnx.Module):
  """``logits, aux = model(tokens [B,T])`` (a chunked decode); ``init_state`` / ``step``."""

  # One stream per row: the training loop does not pass packed segment ids.
  accepts_segment_ids = False

  def __init__(self, config: InfLLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Transformer(config.backbone, rngs=rngs)
    c = config
    self.policy = BlockMemoryCache(
      c.sinks, c.window, c.block_size, c.top_k, c.n_repr, c.backbone.attention_impl
    )

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` -> ``(logits [B,T,vocab] f32, aux)``, encoding ``chunk_size`` tokens at
    a time (one stream per row). ``aux["memory_blocks"]``: committed blocks at the end."""
    if segment_ids is not None:
      raise ValueError("InfLLM takes one stream per row, not packed segment_ids")
    b, t = tokens.shape
    c = self.config.chunk_size
    state = self.init_state(b, t)
    n = t // c
    outs = []
    if n:
      # one compiled chunk step, scanned over the whole chunks
      chunks = jnp.moveaxis(tokens[:, : n * c].reshape(b, n, c), 1, 0)
      state, logits = jax.lax.scan(lambda st, x: self.step(x, st)[::-1], state, chunks)
      outs.append(jnp.moveaxis(logits, 0, 1).reshape(b, n * c, -1))
    if t % c:
      logits, state = self.step(tokens[:, n * c :], state)
      outs.append(logits)
    c = self.config
    blocks = jnp.maximum(state["lengths"] - c.window - c.sinks, 0) // c.block_size
    return jnp.concatenate(outs, axis=1), {"memory_blocks": blocks}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Per layer: sinks, local window, the block store for ``max_len`` tokens and its
    representative keys (see :meth:`BlockMemoryCache.init`)."""
    max_len = max_len or self.config.backbone.max_len
    dt = self.backbone.dtype
    return {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "caches": [self.policy.init(b.attn, batch, max_len, dt) for b in self.backbone.blocks],
    }

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]``; returns their logits and the new state."""
    lengths = state["lengths"]
    x, caches = step_blocks(
      self.backbone, self.backbone.embed_tokens(tokens), state["caches"],
      lambda i, attn, h, cache: self.policy.step(attn, h, cache, lengths),
    )  # fmt: skip
    return self.backbone.logits(x), {"lengths": lengths + tokens.shape[1], "caches": caches}


def from_transformer(model: Transformer, **options: Any) -> InfLLM:
  """InfLLM around ``model``'s parameters (copied); options are InfLLMConfig fields."""
  config = InfLLMConfig(vocab_size=model.config.vocab_size, backbone=model.config, **options)
  wrapped = InfLLM(config, rngs=nnx.Rngs(0))
  nnx.update(wrapped.backbone, nnx.state(model))
  return wrapped
