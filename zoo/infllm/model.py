"""InfLLM: a transformer whose attention reads a block memory.

Training-free: ``.backbone`` is an ordinary :class:`zoo.transformer.Transformer` (load any
transformer's parameters into it, or use :func:`from_transformer`). Fixed blocks on device use
:class:`BlockMemoryCache` (block-sparse ``ops.attention``); host offload and EM-LLM's surprise
segmentation use :class:`EventMemoryCache`, which commits whole blocks at eviction time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.infllm import store as host_store
from zoo.infllm.config import InfLLMConfig
from zoo.infllm.eventcache import EventMemoryCache, host_shapes
from zoo.infllm.memory import BlockMemoryCache
from zoo.interface import ZooModel
from zoo.layers.cache import step_blocks
from zoo.transformer.model import Transformer


class InfLLM(ZooModel):
  """``logits, aux = model(tokens [B,T])`` (a chunked decode); ``init_state`` / ``step``."""

  # One stream per row: the training loop does not pass packed segment ids.
  accepts_segment_ids = False

  @property
  def max_len(self) -> int:
    return self.backbone.config.max_len

  def __init__(self, config: InfLLMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Transformer(config.backbone, rngs=rngs)
    c = config
    impl = c.backbone.attention_impl
    if c.segmentation == "fixed" and not c.offload and not c.neighbours:
      self.policy = BlockMemoryCache(
        c.sinks, c.window, c.block_size, c.top_k, c.n_repr, impl, query_tile=c.query_tile
      )
    else:
      self.policy = EventMemoryCache(
        sinks=c.sinks, window=c.window, block_size=c.block_size, top_k=c.top_k,
        n_repr=c.n_repr, segmentation=c.segmentation, surprise_gamma=c.surprise_gamma,
        surprise_window=c.surprise_window, min_event=c.min_event, refine=c.refine,
        neighbours=c.neighbours, offload=c.offload, implementation=impl,
      )  # fmt: skip

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
    """Per layer: sinks, local window, and the block store for ``max_len`` tokens with its
    representative keys (see :meth:`BlockMemoryCache.init`, :meth:`EventMemoryCache.init`).

    With ``offload`` the device part has a fixed size (``max_len`` is ignored) and
    ``"store"`` is the handle of a new host store (:mod:`zoo.infllm.store`; free it with
    :meth:`release_state`). With surprise segmentation, ``"surprise" [B,history]`` holds the
    surprises of the last tokens and ``"last_logp" [B,vocab]`` the newest log-probabilities.
    """
    c = self.config
    max_len = max_len or c.backbone.max_len
    dt = self.backbone.dtype
    state = {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "caches": [self.policy.init(b.attn, batch, max_len, dt) for b in self.backbone.blocks],
    }
    if c.offload:
      handle = host_store.open_store(**host_shapes(self.policy, self.backbone, batch))
      state["store"] = jnp.asarray(handle, jnp.int32)
    if c.segmentation == "surprise":
      state["surprise"] = jnp.zeros((batch, self.policy.history), jnp.float32)
      state["last_logp"] = jnp.zeros((batch, c.vocab_size), jnp.float32)
    return state

  def release_state(self, state: dict[str, Any]) -> None:
    """Frees the host store of an offloaded decode state (no-op otherwise)."""
    if "store" in state:
      host_store.release_store(state["store"])

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]``; returns their logits and the new state."""
    lengths = state["lengths"]
    if isinstance(self.policy, BlockMemoryCache):
      step = lambda i, attn, h, cache: self.policy.step(attn, h, cache, lengths)  # noqa: E731
    else:
      extra = {"surprise": state.get("surprise"), "store": state.get("store")}

      def step(i, attn, h, cache):
        return self.policy.step(attn, h, cache, lengths, layer=i, **extra)

    x, caches = step_blocks(
      self.backbone, self.backbone.embed_tokens(tokens), state["caches"], step
    )
    logits = self.backbone.logits(x)
    new = {**state, "lengths": lengths + tokens.shape[1], "caches": caches}
    if "surprise" in state:
      # surprise of x_t = -log p(x_t | x_<t), from the logits one position earlier
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      prev = jnp.concatenate([state["last_logp"][:, None], logp[:, :-1]], axis=1)
      s = -jnp.take_along_axis(prev, tokens[..., None], axis=-1)[..., 0]
      new["surprise"] = jnp.concatenate([state["surprise"], s], axis=1)[:, tokens.shape[1] :]
      new["last_logp"] = logp[:, -1]
    return logits, new


def from_transformer(model: Transformer, **options: Any) -> InfLLM:
  """InfLLM around ``model``'s parameters (copied); options are InfLLMConfig fields."""
  config = InfLLMConfig(vocab_size=model.config.vocab_size, backbone=model.config, **options)
  wrapped = InfLLM(config, rngs=nnx.Rngs(0))
  nnx.update(wrapped.backbone, nnx.state(model))
  return wrapped
