"""Hope (Nested Learning): self-modifying Titans memory + continuum memory system per block."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.hope.cms import CMSLevel
from zoo.hope.config import HopeConfig
from zoo.interface import ZooModel
from zoo.layers.embedding import TokenEmbedding
from zoo.layers.neural_memory import NeuralMemory, memory_hidden
from zoo.layers.norms import RMSNorm
from zoo.layers.remat import RematBlock, checkpointed


class HopeBlock(RematBlock, nnx.Module):
  """``x += Titans(x)``, then ``x += CMS_l(x)`` for every level, fastest first (pre-norm)."""

  def __init__(self, config: HopeConfig, *, rngs: nnx.Rngs):
    c = config
    hd = c.resolved_head_dim
    self.mem_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.memory = NeuralMemory(
      c.d_model,
      c.n_heads,
      hd,
      hidden=memory_hidden(hd, c.memory_depth, c.memory_expansion),
      chunk_size=c.chunk_size,
      conv_size=c.conv_size,
      lr_max=c.memory_lr_max,
      implementation=c.memory_impl,
      adaptive_kv=c.self_modifying,
      kv_self_targets=c.self_modifying and c.self_targets,
      rngs=rngs,
    )
    self.cms_norms = nnx.List(
      [RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs) for _ in c.cms_chunk_sizes]
    )
    self.cms = nnx.List(
      [
        CMSLevel(c.d_model, c.cms_hidden, size, c.cms_lr_max, rngs=rngs)
        for size in c.cms_chunk_sizes
      ]
    )

  @checkpointed
  def __call__(self, x: jax.Array, state: dict[str, Any] | None = None):
    """``x [B,T,D]``; ``state`` None (sequence start, full forward) or a decode state."""
    m, mem_state = self.memory(self.mem_norm(x), None if state is None else state["memory"])
    x = x + m
    cms_states = []
    for i, (norm, level) in enumerate(zip(self.cms_norms, self.cms)):
      if state is None:
        y, s = level(norm(x))
      else:
        y, s = level.step(norm(x), state["cms"][i])
      x = x + y
      cms_states.append(s)
    return x, {"memory": mem_state, "cms": cms_states}

  def init_state(self, batch: int) -> dict[str, Any]:
    return {
      "memory": self.memory.init_state(batch),
      "cms": [level.init_state(batch) for level in self.cms],
    }


class Hope(TokenEmbedding, ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  ``aux["cms_drift"]`` is ``[L, levels]``: how far each CMS level's weights moved in context
  (mean Frobenius norm of final minus initial ``W1``). One stream per row: the in-context
  memories have no reset at a document start, so packed ``segment_ids`` are refused
  (ValueError) and the training loader feeds one document per row.
  """

  accepts_segment_ids = False

  def __init__(self, config: HopeConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.init_embedding(c, rngs=rngs)
    self.blocks = nnx.List([HopeBlock(c, rngs=rngs) for _ in range(c.n_layers)])
    self.init_output(c, rngs=rngs)

  def _run(self, tokens, states):
    x = self.embed_tokens(tokens)
    new = []
    for i, block in enumerate(self.blocks):
      x, s = block(x, None if states is None else states[i])
      new.append(s)
    return self.logits(x), new

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` int32 -> ``(logits [B,T,vocab] float32, aux)``."""
    if segment_ids is not None:
      raise ValueError(
        "Hope takes one stream per row, not packed segment_ids (its memories have no reset "
        "at document starts); feed one document per row"
      )
    logits, states = self._run(tokens, None)
    drift = [
      jnp.stack(
        [
          jnp.sqrt(jnp.sum((s["weights"]["w1"] - level.w1[...]) ** 2, axis=(-2, -1))).mean()
          for s, level in zip(state["cms"], block.cms)
        ]
      )
      for state, block in zip(states, self.blocks)
    ]
    return logits, {"cms_drift": jnp.stack(drift)}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Decode state at the sequence start (its size does not depend on ``max_len``)."""
    del max_len
    return {"blocks": [b.init_state(batch) for b in self.blocks]}

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` (one token or a chunk); returns their logits and the new state."""
    logits, blocks = self._run(tokens, state["blocks"])
    return logits, {"blocks": blocks}
