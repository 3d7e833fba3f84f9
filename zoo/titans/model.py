"""Titans language models: MAC, MAG, MAL and the memory-only LMM, built from one config."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.interface import ZooModel
from zoo.layers.embedding import TokenEmbedding
from zoo.layers.params import param
from zoo.titans.blocks import SequenceBlock, persistent_init
from zoo.titans.config import TitansConfig
from zoo.titans.mac import MACBlock


def _memory_norms(states: list[dict[str, Any]]) -> jax.Array:
  """[L] mean Frobenius norm of each layer's final memory weights (a cheap memory statistic)."""
  norms = []
  for s in states:
    leaves = jax.tree.leaves(s["memory"]["weights"])
    norms.append(sum(jnp.sqrt(jnp.sum(w * w, axis=(-2, -1))).mean() for w in leaves))
  return jnp.stack(norms)


class Titans(TokenEmbedding, ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  For mag/mal/lmm the ``n_persistent`` learned tokens are a prefix of every sequence (the
  decode state starts after them); for mac they sit in every segment's attention context.
  ``aux["memory_norm"]`` is ``[L]``, the mean norm of each layer's final memory weights.
  One stream per row: the neural memory's chunked update has no reset at a document start,
  so packed ``segment_ids`` are refused (ValueError) and the training loader feeds these
  models one document per row (``accepts_segment_ids = False``).
  """

  accepts_segment_ids = False

  def __init__(self, config: TitansConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.init_embedding(c, rngs=rngs)
    if c.variant == "mac":
      self.blocks = nnx.List([MACBlock(c, rngs=rngs) for _ in range(c.n_layers)])
    else:
      self.blocks = nnx.List([SequenceBlock(c, rngs=rngs) for _ in range(c.n_layers)])
      if c.n_persistent:
        self.persistent = param(rngs, persistent_init, (c.n_persistent, c.d_model), (None, "embed"))
    self.init_output(c, rngs=rngs)

  @property
  def n_prefix(self) -> int:
    """Persistent tokens in front of the sequence (0 for mac)."""
    return 0 if self.config.variant == "mac" else self.config.n_persistent

  def _prefix(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(
      self.persistent[...].astype(self.dtype), (batch, *self.persistent.shape)
    )

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` int32 -> ``(logits [B,T,vocab] float32, aux)``."""
    if segment_ids is not None:
      raise ValueError(
        f"{type(self).__name__} takes one stream per row, not packed segment_ids (its memory "
        "has no reset at document starts); feed one document per row"
      )
    x = self.embed_tokens(tokens)
    batch = x.shape[0]
    states = []
    if self.config.variant == "mac":
      for block in self.blocks:
        x, state = block(x)
        states.append({"memory": state})
    else:
      if self.n_prefix:
        x = jnp.concatenate([self._prefix(batch), x], axis=1)
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
      for block in self.blocks:
        x, state = block(x, positions)
        states.append({"memory": state})
      x = x[:, self.n_prefix :]
    return self.logits(x), {"memory_norm": _memory_norms([s["memory"] for s in states])}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Decode state at the sequence start (persistent prefix already fed for mag/mal/lmm)."""
    max_len = max_len or self.config.max_len
    if self.config.variant == "mac":
      return {
        "position": jnp.zeros((), jnp.int32),
        "blocks": [b.init_state(batch, self.dtype) for b in self.blocks],
      }
    state = {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "blocks": [b.init_state(batch, max_len + self.n_prefix, self.dtype) for b in self.blocks],
    }
    if self.n_prefix:
      _, state = self._step_embedded(self._prefix(batch), state)
    return state

  def _step_embedded(self, x: jax.Array, state: dict[str, Any]):
    lengths = state["lengths"]
    blocks = []
    for block, bstate in zip(self.blocks, state["blocks"]):
      x, bstate = block.step(x, bstate, lengths)
      blocks.append(bstate)
    return x, {"lengths": lengths + x.shape[1], "blocks": blocks}

  def _step_mac(self, x: jax.Array, state: dict[str, Any]):
    """One token ``x [B,1,D]`` through every MAC block."""
    index = state["position"] % self.config.segment_size
    blocks = []
    for block, bstate in zip(self.blocks, state["blocks"]):
      x, bstate = block.step(x, bstate, index)
      blocks.append(bstate)
    return x, {"position": state["position"] + 1, "blocks": blocks}

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` (one token or a chunk); returns their logits and the new state."""
    x = self.embed_tokens(tokens)
    if self.config.variant != "mac":
      x, state = self._step_embedded(x, state)
      return self.logits(x), state

    # MAC follows the segment grid token by token (a chunk may straddle segments).
    def body(s, xt):
      y, s = self._step_mac(xt[:, None], s)
      return s, y[:, 0]

    state, ys = jax.lax.scan(body, state, jnp.moveaxis(x, 1, 0))
    return self.logits(jnp.moveaxis(ys, 0, 1)), state
