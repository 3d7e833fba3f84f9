"""Titans' memory-as-context (MAC) block (Titans Sec. 4.1).

The sequence is cut into segments of ``segment_size`` tokens. For segment ``s``:

1. retrieve ``r = M*_{s-1}(x)``: read the memory as it was at the segment start (no update);
2. attend: every token attends over ``[persistent, r, segment]`` (causally: token ``i`` sees
   all persistent tokens, ``r_j`` and ``x_j`` for ``j <= i``), giving ``y``;
3. train the memory on ``y`` (the op's per-token reads ``M_i(y_i)`` keep it causal) and gate:
   ``o = y * sigmoid(M(y))``.

The retrieved tokens sit at the positions of the tokens they were read for, so the causal
attention over ``[persistent, r, segment]`` is two attentions merged by their log-sum-exp.
Decoding follows the same segment grid: the state keeps the weights of the segment start and
the segment's keys and values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from ops.attention import merge_pair
from zoo.layers.attention import Attention
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm
from zoo.layers.params import param
from zoo.layers.remat import RematBlock, checkpointed
from zoo.titans.blocks import build_memory, persistent_init
from zoo.titans.config import TitansConfig

_CAUSAL = attn_ops.Mask(causal=True)


class MACBlock(RematBlock, nnx.Module):
  """``x [B,T,D] -> [B,T,D]``: segment attention over memory context, then SwiGLU."""

  def __init__(self, config: TitansConfig, *, rngs: nnx.Rngs):
    c = config
    self.segment_size, self.n_persistent = c.segment_size, c.n_persistent
    self.attention_impl = c.attention_impl
    self.norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.memory = build_memory(c, rngs=rngs)
    self.attn = Attention(
      c.d_model, c.n_heads, c.n_heads, c.resolved_head_dim, rope_base=c.rope_base, rngs=rngs
    )
    if c.n_persistent:
      self.persistent = param(rngs, persistent_init, (c.n_persistent, c.d_model), (None, "embed"))
    self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(c.d_model, c.d_ff, rngs=rngs)

  def _persistent_kv(self, batch: int, dtype):
    """Keys/values of the persistent tokens ``[B,Np,H,Dh]`` at positions 0..Np-1."""
    p = jnp.broadcast_to(self.persistent[...].astype(dtype), (batch, *self.persistent.shape))
    pos = jnp.broadcast_to(jnp.arange(self.n_persistent, dtype=jnp.int32), p.shape[:2])
    _, k, v = self.attn.project_qkv(p, pos, self.n_persistent + self.segment_size)
    return k, v

  def _qkv(self, h, r, index):
    """Rotated q, k, v of the segment tokens and k, v of their retrieved memories."""
    positions = jnp.broadcast_to(self.n_persistent + index, h.shape[:2]).astype(jnp.int32)
    seq_len = self.n_persistent + self.segment_size
    q, kx, vx = self.attn.project_qkv(h, positions, seq_len)
    _, kr, vr = self.attn.project_qkv(r, positions, seq_len)
    return q, kx, vx, kr, vr

  def _segment(self, h: jax.Array, mem_state: dict[str, Any]):
    """One segment ``h [B,S,D]`` (normalised input) -> ``(o [B,S,D], new memory state)``."""
    batch, length, _ = h.shape
    r = self.memory.retrieve(h, mem_state["memory"]["weights"])
    q, kx, vx, kr, vr = self._qkv(h, r, jnp.arange(length, dtype=jnp.int32)[None])
    if self.n_persistent:
      kp, vp = self._persistent_kv(batch, h.dtype)
      kx, vx = jnp.concatenate([kp, kx], axis=1), jnp.concatenate([vp, vx], axis=1)
    kw = dict(mask=_CAUSAL, return_lse=True, implementation=self.attention_impl)
    o_x, lse_x = attn_ops.dot_product_attention(q, kx, vx, q_offset=self.n_persistent, **kw)
    o_r, lse_r = attn_ops.dot_product_attention(q, kr, vr, q_offset=0, **kw)
    o, _ = merge_pair(o_x, lse_x, o_r, lse_r)
    y = self.attn.out(o.astype(h.dtype))
    m, mem_state = self.memory(y, mem_state)
    return y * jax.nn.sigmoid(m), mem_state

  @checkpointed
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """``x [B,T,D]`` -> ``(x [B,T,D], final memory state)``."""
    batch, length, dim = x.shape
    size = self.segment_size
    h = self.norm(x)
    state = self.memory.init_state(batch)
    n_full = length // size
    outs = []
    if n_full:
      segs = jnp.moveaxis(h[:, : n_full * size].reshape(batch, n_full, size, dim), 1, 0)
      state, o = jax.lax.scan(lambda s, seg: self._segment(seg, s)[::-1], state, segs)
      outs.append(jnp.moveaxis(o, 0, 1).reshape(batch, n_full * size, dim))
    if length > n_full * size:
      o, state = self._segment(h[:, n_full * size :], state)
      outs.append(o)
    x = x + jnp.concatenate(outs, axis=1)
    return x + self.mlp(self.mlp_norm(x)), state

  def init_state(self, batch: int, dtype) -> dict[str, Any]:
    """Decode state: memory, its weights at the segment start, the segment's k/v cache."""
    memory = self.memory.init_state(batch)
    shape = (batch, self.segment_size, self.attn.n_heads, self.attn.head_dim)
    cache = {name: jnp.zeros(shape, dtype) for name in ("kx", "vx", "kr", "vr")}
    return {"memory": memory, "segment_weights": memory["memory"]["weights"], **cache}

  def step(self, x: jax.Array, state: dict[str, Any], index: jax.Array):
    """One token ``x [B,1,D]`` at index ``index`` (int32 scalar) of its segment."""
    batch = x.shape[0]
    h = self.norm(x)
    r = self.memory.retrieve(h, state["segment_weights"])
    q, kx, vx, kr, vr = self._qkv(h, r, index)
    write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
      cache, new.astype(cache.dtype), index, axis=1
    )
    cache = {
      name: write(state[name], new)
      for name, new in (("kx", kx), ("vx", vx), ("kr", kr), ("vr", vr))
    }
    keys, values = cache["kx"], cache["vx"]
    if self.n_persistent:
      kp, vp = self._persistent_kv(batch, x.dtype)
      keys = jnp.concatenate([kp, keys.astype(kp.dtype)], axis=1)
      values = jnp.concatenate([vp, values.astype(vp.dtype)], axis=1)
    seen = jnp.full((batch,), index + 1, jnp.int32)
    kw = dict(mask=_CAUSAL, return_lse=True, num_splits=1)
    o_x, lse_x = attn_ops.decode_attention(q, keys, values, lengths=seen + self.n_persistent, **kw)
    o_r, lse_r = attn_ops.decode_attention(q, cache["kr"], cache["vr"], lengths=seen, **kw)
    o, _ = merge_pair(o_x, lse_x, o_r, lse_r)
    y = self.attn.out(o.astype(x.dtype))
    m, memory = self.memory(y, state["memory"])
    x = x + y * jax.nn.sigmoid(m)
    # The segment ends with this token: the next segment retrieves from the weights as now.
    ends = index + 1 == self.segment_size
    segment_weights = jax.tree.map(
      lambda new, old: jnp.where(ends, new, old),
      memory["memory"]["weights"],
      state["segment_weights"],
    )
    new_state = {"memory": memory, "segment_weights": segment_weights, **cache}
    return x + self.mlp(self.mlp_norm(x)), new_state
