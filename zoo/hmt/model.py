"""HMT: a backbone run segment by segment with a hierarchical memory (He et al. 2024).

For segment ``n`` (tokens ``x_n``, ``L`` of them):

1. sensory memory ``E_n``: embeddings of the last ``k`` tokens of segment ``n - 1``;
2. summary ``S_n``: the backbone's last hidden state over ``[E_n, T]`` (``T`` a learned prompt);
3. recall ``P_n``: cross-attention of ``S_n`` over the cached memory embeddings;
4. the backbone reads ``[P_n, E_n, x_n, P_n]``; logits come from the ``x_n`` positions and the
   hidden state at the trailing ``P_n`` becomes the memory embedding ``M_n``, cached (last N).

Gradients flow through at most ``bptt_segments`` segments (truncated BPTT). Decode keeps the
current segment's tokens in a fixed buffer and recomputes the segment each step (the state is
constant-size: buffer, sensory embeddings, memory cache).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.hmt.config import HMTConfig
from zoo.interface import ZooModel
from zoo.layers.cache import FullCache, forward_blocks
from zoo.layers.params import fan_in, normal, param
from zoo.transformer.model import Transformer


class HMT(ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``."""

  # One stream per row: the training loop does not pass packed segment ids.
  accepts_segment_ids = False

  @property
  def max_len(self) -> int:
    return self.backbone.config.max_len

  def __init__(self, config: HMTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.backbone.d_model
    self.backbone = Transformer(config.backbone, rngs=rngs)
    self.prompt = param(rngs, normal(0.02), (d,), ("embed",))
    self.recall_q = param(rngs, fan_in([d]), (d, d), ("embed", None))
    self.recall_k = param(rngs, fan_in([d]), (d, d), ("embed", None))

  def _hidden(self, x):
    """Backbone over embeddings ``x [B,N,D]`` -> final hidden states ``[B,N,D]``."""
    return forward_blocks(self.backbone, x, lambda i, attn, h: FullCache().forward(attn, h))

  def _recall(self, sensory, mems, count):
    """``P [B,D]``: the summary of ``[sensory, prompt]`` attending over the valid memories."""
    b, _, d = sensory.shape
    prompt = jnp.broadcast_to(self.prompt[...].astype(sensory.dtype), (b, 1, d))
    summary = self._hidden(jnp.concatenate([sensory, prompt], axis=1))[:, -1]
    q = summary @ self.recall_q[...].astype(summary.dtype)
    k = jnp.einsum("bnd,de->bne", mems, self.recall_k[...].astype(mems.dtype))
    n = mems.shape[1]
    valid = jnp.arange(n)[None, :] >= n - count[:, None]
    s = jnp.where(valid, jnp.einsum("bd,bnd->bn", q, k) * d**-0.5, -jnp.inf)
    w = jnp.where(valid, jax.nn.softmax(jnp.where(valid, s, -1e30), axis=-1), 0.0)
    return jnp.einsum("bn,bnd->bd", w, mems)

  def _segment(self, tokens, sensory, mems, count):
    """One segment ``tokens [B,l]`` -> (logits [B,l,vocab], memory embedding [B,D])."""
    p = self._recall(sensory, mems, count)[:, None].astype(sensory.dtype)
    x = jnp.concatenate([p, sensory, self.backbone.embed_tokens(tokens), p], axis=1)
    h = self._hidden(x)
    k = sensory.shape[1]
    return self.backbone.logits(h[:, 1 + k : -1]), h[:, -1]

  def _push(self, mems, count, m):
    mems = jnp.concatenate([mems[:, 1:], m[:, None].astype(mems.dtype)], axis=1)
    return mems, jnp.minimum(count + 1, mems.shape[1])

  def _sensory(self, tokens):
    k = self.config.sensory
    return self.backbone.embed_tokens(tokens[:, tokens.shape[1] - k :])

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """Constant-size state (``max_len`` ignored): segment buffer, sensory, memories."""
    del max_len
    c = self.config
    d, dt = c.backbone.d_model, self.backbone.dtype
    return {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "buffer": jnp.zeros((batch, c.segment_len), jnp.int32),
      "sensory": jnp.zeros((batch, c.sensory, d), dt),
      "mems": jnp.zeros((batch, c.memories, d), dt),
      "count": jnp.zeros((batch,), jnp.int32),
    }

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` -> ``(logits [B,T,vocab] f32, {"memories": count})``; one stream per
    row (segments are the recurrence, so packed documents are not supported)."""
    if segment_ids is not None:
      raise ValueError("HMT takes one stream per row, not packed segment_ids")
    c = self.config
    state = self.init_state(tokens.shape[0])
    sensory, mems, count = state["sensory"], state["mems"], state["count"]
    outs = []
    for n, start in enumerate(range(0, tokens.shape[1], c.segment_len)):
      if n and n % c.bptt_segments == 0:
        sensory, mems = jax.lax.stop_gradient(sensory), jax.lax.stop_gradient(mems)
      seg = tokens[:, start : start + c.segment_len]
      logits, m = self._segment(seg, sensory, mems, count)
      outs.append(logits)
      if seg.shape[1] == c.segment_len:
        mems, count = self._push(mems, count, m)
        sensory = self._sensory(seg)
    return jnp.concatenate(outs, axis=1), {"memories": count}

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` one at a time (a scan); returns ``(logits [B,t,vocab], state)``."""

    def one(st, tok):
      logits, st = self._step_one(tok, st)
      return st, logits

    state, logits = jax.lax.scan(one, state, jnp.moveaxis(tokens, 1, 0))
    return jnp.moveaxis(logits, 0, 1), state

  def _step_one(self, tok, st):
    c = self.config
    pos = st["lengths"] % c.segment_len
    buf = jnp.where(jnp.arange(c.segment_len)[None] == pos[:, None], tok[:, None], st["buffer"])
    # Recompute the segment so far; later buffer slots are hidden by causality.
    logits, m = self._segment(buf, st["sensory"], st["mems"], st["count"])
    out = jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]
    done = pos == c.segment_len - 1
    mems, count = self._push(st["mems"], st["count"], m)
    sel = lambda a, b: jnp.where(done.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
    new = {
      "lengths": st["lengths"] + 1,
      "buffer": buf,
      "sensory": sel(self._sensory(buf), st["sensory"]),
      "mems": sel(mems, st["mems"]),
      "count": sel(count, st["count"]),
    }
    return out, new
