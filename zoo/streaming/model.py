"""StreamingLLM: a transformer whose attention keeps ``sinks`` initial + ``window`` recent keys.

The backbone is an ordinary :class:`zoo.transformer.Transformer` (load any transformer's
parameters into ``.backbone``); only the attention policy changes (:class:`SinkCache`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.interface import ZooModel
from zoo.layers.cache import SinkCache, forward_blocks, step_blocks
from zoo.layers.params import normal, param
from zoo.streaming.config import StreamingConfig
from zoo.transformer.model import Transformer


class StreamingLLM(ZooModel):
  """``logits, aux = model(tokens [B,T])``; ``init_state`` / ``step`` use constant memory.

  One stream per row: the sinks are the stream's first tokens, so a packed row's later
  documents would have none. Packed ``segment_ids`` are refused (ValueError) when the model
  has sinks, and the training loader feeds one document per row; window-only models
  (``sinks=0``, no learnable sink) accept them.
  """

  accepts_segment_ids = False

  @property
  def max_len(self) -> int:
    return self.backbone.config.max_len

  def state_size(self) -> int:
    """Floats of the constant decode cache: sinks + window keys and values in every layer."""
    b = self.config.backbone
    per_layer = 2 * (self.config.sinks + self.config.window) * b.n_kv_heads * b.resolved_head_dim
    return per_layer * b.n_layers

  def __init__(self, config: StreamingConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Transformer(config.backbone, rngs=rngs)
    self.policy = SinkCache(
      config.sinks, config.window, config.shift, config.backbone.attention_impl
    )
    if config.learnable_sink:
      d = config.backbone.d_model
      self.sink_embed = param(rngs, normal(0.02), (1, d), (None, "embed"))

  @property
  def num_sink_tokens(self) -> int:
    return 1 if self.config.learnable_sink else 0

  def _embed(self, tokens: jax.Array) -> jax.Array:
    return self.backbone.embed_tokens(tokens)

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` int32 -> ``(logits [B,T,vocab] f32, {})``.

    ``segment_ids [B,T]``: packed documents, only without sinks (see the class docstring).
    """
    if segment_ids is not None and (self.config.sinks or self.num_sink_tokens):
      raise ValueError(
        "StreamingLLM with sinks takes one stream per row, not packed segment_ids (a later "
        "document would have no sinks); feed one document per row"
      )
    x = self._embed(tokens)
    n = self.num_sink_tokens
    if n:
      sink = jnp.broadcast_to(self.sink_embed[...].astype(x.dtype), (x.shape[0], n, x.shape[2]))
      x = jnp.concatenate([sink, x], axis=1)
      if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
    h = forward_blocks(
      self.backbone, x, lambda i, attn, h: self.policy.forward(attn, h, segment_ids)
    )
    return self.backbone.logits(h[:, n:]), {}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Constant-size state (``max_len`` is accepted and ignored); the learnable sink token,
    if any, is already fed."""
    dt = self.backbone.dtype
    state = {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "caches": [self.policy.init(b.attn, batch, max_len, dt) for b in self.backbone.blocks],
    }
    if self.num_sink_tokens:
      sink = jnp.broadcast_to(self.sink_embed[...].astype(dt), (batch, 1, self.sink_embed.shape[1]))
      _, state = self._step_embedded(sink, state)
    return state

  def _step_embedded(self, x, state):
    lengths = state["lengths"]
    h, caches = step_blocks(
      self.backbone, x, state["caches"],
      lambda i, attn, h, cache: self.policy.step(attn, h, cache, lengths),
    )  # fmt: skip
    return self.backbone.logits(h), {"lengths": lengths + x.shape[1], "caches": caches}

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]``; returns ``(logits [B,t,vocab], state)`` of the same sizes."""
    return self._step_embedded(self._embed(tokens), state)


def from_transformer(model: Transformer, **options: Any) -> StreamingLLM:
  """StreamingLLM around ``model``'s parameters (copied), e.g. ``sinks=4, window=252``."""
  config = StreamingConfig(vocab_size=model.config.vocab_size, backbone=model.config, **options)
  wrapped = StreamingLLM(config, rngs=nnx.Rngs(0))
  nnx.update(wrapped.backbone, nnx.state(model))
  return wrapped
