"""InfLLM's block memory as an attention cache policy (Xiao et al. 2024, "InfLLM").

A query at position ``p`` sees four disjoint key sets, merged by their log-sum-exp:

- local: the last ``window`` tokens, at their true distances (:meth:`SinkCache.window_part`);
- initial tokens ``j < sinks`` that have left the window;
- memory blocks: tokens ``>= sinks`` that left the window are grouped, in order, into blocks
  of ``block_size``. A block is *committed* once all its tokens left the window; each query
  picks the ``top_k`` committed blocks whose representative keys score highest against it,
  per KV head, and attends them through ``block_indices`` of ``ops.attention``. A step of
  several tokens retrieves per *query tile* of ``query_tile`` tokens, as InfLLM's chunked
  prefill does: the tile's queries share the blocks chosen by the sum of their scores (the
  score of the tile's mean query, up to a factor) among the blocks committed for the tile's
  first query, so the attention call has query blocks of ``query_tile`` rows, which the
  block-sparse Pallas kernels take (per-token lists, ``(1, block_size)`` blocks, are below
  every kernel's query tile). A one-token step (decode) retrieves per token, as the paper
  does, and ``query_tile=1`` keeps per-token retrieval everywhere. Within a tile the choice
  of blocks depends on all its queries (never on their keys or values), as in InfLLM;
- pending tokens: those that left the window but whose block is not yet committed.

Everything outside the local window sits at one distance, ``window`` (InfLLM assigns memory
tokens a single position): keys are rotated at 0 and the query at ``window``. Representative
keys of a block are its ``n_repr`` keys most aligned with the block's mean key (InfLLM scores
tokens by the attention they receive from their local window; the key centroid is a
training-free proxy that needs no stored queries).

Because a token is equally visible whether pending or committed, decoding token by token and
in chunks (any ``query_tile``) agree exactly whenever ``top_k`` covers every block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ops.attention as attn_ops
from ops.attention import merge_pair
from zoo.layers.cache import SinkCache, attend_dense, write_prefix


@dataclasses.dataclass(frozen=True)
class BlockMemoryCache:
  """InfLLM: ``sinks`` initial tokens + local ``window`` + ``top_k`` retrieved blocks."""

  sinks: int
  window: int
  block_size: int
  top_k: int
  n_repr: int
  implementation: str | None = None
  query_tile: int = 1

  @property
  def local(self) -> SinkCache:
    return SinkCache(0, self.window, implementation=self.implementation)

  def capacity(self, max_len: int) -> tuple[int, int]:
    """(memory blocks, memory slots) for a stream of ``max_len`` tokens."""
    m = max(1, -(-max(max_len - self.sinks, 1) // self.block_size))
    return m, m * self.block_size

  def init(self, attn, batch: int, max_len: int, dtype) -> dict[str, jax.Array]:
    """``sink_k/v [B,s,K,Dh]``, ``win_k/v [B,w-1,K,Dh]``, ``mem_k/v [B,M*bs,K,Dh]`` (token at
    position ``a >= sinks`` in slot ``a - sinks``), ``rep [B,M,n_repr,K,Dh]``; all un-rotated."""
    kh, dh = attn.n_kv_heads, attn.head_dim
    m, cap = self.capacity(max_len)
    z = lambda *shape: jnp.zeros((batch, *shape), dtype)  # noqa: E731
    return {
      **self.local.init_heads(batch, kh, dh, dtype),
      "sink_k": z(self.sinks, kh, dh), "sink_v": z(self.sinks, kh, dh),
      "mem_k": z(cap, kh, dh), "mem_v": z(cap, kh, dh),
      "rep": z(m, self.n_repr, kh, dh),
    }  # fmt: skip

  def step(self, attn, x, cache, lengths):
    """``x [B,t,D]`` -> ``([B,t,D], cache)``; ``lengths [B]`` tokens seen before."""
    q, k, v = attn.project(x)
    rotate = lambda y, pos: attn.rotate(y, pos, self.sinks + self.window)  # noqa: E731
    o, cache = self.attend_step(rotate, q, k, v, cache, lengths)
    return attn.out(o.astype(x.dtype)), cache

  def attend_step(self, rotate, q, k, v, cache, lengths):
    b, t, h, d = q.shape
    s, w, bs = self.sinks, self.window, self.block_size
    scale = d**-0.5
    o, lse, kw, vw = self.local.window_part(rotate, q, k, v, cache, lengths)
    new = {"win_k": kw[:, t:], "win_v": vw[:, t:]}
    dt = cache["mem_k"].dtype
    m, cap = cache["rep"].shape[1], cache["mem_k"].shape[1]
    # Write the new tokens into the sinks and the memory store (absolute slots).
    sink_k = write_prefix(cache["sink_k"], k.astype(dt), lengths)
    sink_v = write_prefix(cache["sink_v"], v.astype(dt), lengths)
    slot = lengths[:, None] + jnp.arange(t) - s  # [B, t]
    slot = jnp.where(slot < 0, cap, slot)  # before the memory: dropped
    rows = jnp.arange(b)[:, None]
    mem_k = cache["mem_k"].at[rows, slot].set(k.astype(dt), mode="drop")
    mem_v = cache["mem_v"].at[rows, slot].set(v.astype(dt), mode="drop")
    rep = self._update_reps(cache["rep"], mem_k, lengths, t)
    new |= {"sink_k": sink_k, "sink_v": sink_v, "mem_k": mem_k, "mem_v": mem_v, "rep": rep}

    p = lengths[:, None] + jnp.arange(t)  # [B, t] absolute query positions
    far = jnp.full((b, t), w, jnp.int32)
    q_far = rotate(q, far)  # memory keys are rotated at 0: every one sits at distance w

    def at0(y):
      return rotate(y, jnp.zeros(y.shape[:2], jnp.int32))

    # Query tiles share their retrieval (a one-token step retrieves per token).
    tile = 1 if t == 1 else self.query_tile
    nt = -(-t // tile)
    # Committed blocks of query p: those whose last token is <= p - w; a tile retrieves among
    # those of its first query, and the rest of its queries see the newer ones as pending.
    committed_tile = (jnp.maximum(p - w + 1 - s, 0) // bs)[:, ::tile]  # [B, nt]
    committed = jnp.repeat(committed_tile, tile, axis=1)[:, :t]  # [B, t]
    # Initial tokens out of the window, plus pending memory tokens (slots in the last
    # bs + t - 1 positions before the window that are not in a committed block).
    n_pend = bs + t - 1
    start = lengths - w - bs + 2 - s  # memory slot of the oldest candidate
    pslot = start[:, None] + jnp.arange(n_pend)  # [B, P]
    ok = (pslot >= 0) & (pslot < cap)
    idx = jnp.clip(pslot, 0, cap - 1)[..., None, None]
    pk = jnp.take_along_axis(mem_k, idx, axis=1)
    pv = jnp.take_along_axis(mem_v, idx, axis=1)
    pend_vis = (
      ok[:, None, :]
      & (pslot[:, None, :] + s <= p[..., None] - w)
      & (pslot[:, None, :] >= committed[..., None] * bs)
    )  # [B, t, P]
    j = jnp.arange(s)
    sink_vis = jnp.broadcast_to(j <= p[..., None] - w, (b, t, s))
    gk = jnp.concatenate([at0(sink_k), at0(pk)], axis=1)
    gv = jnp.concatenate([sink_v, pv], axis=1)
    o_g, lse_g = attend_dense(q_far, gk, gv, jnp.concatenate([sink_vis, pend_vis], -1), scale)
    o, lse = merge_pair(o, lse, o_g, lse_g)

    # Retrieval: per query tile and KV head, the top_k committed blocks by representative
    # score summed over the tile's queries and the head's query group.
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).sum(3).astype(jnp.float32)
    qg = jnp.pad(qg, ((0, 0), (0, nt * tile - t), (0, 0), (0, 0)))
    qg = qg.reshape(b, nt, tile, kh, d).sum(2)
    score = jnp.einsum("btkd,bmrkd->btkm", qg, rep.astype(jnp.float32))
    score = jnp.where(
      jnp.arange(m)[None, None, None, :] < committed_tile[..., None, None], score, -jnp.inf
    )
    n = min(self.top_k, m)
    top, ids = jax.lax.top_k(score, n)  # [B, nt, K, n]
    ids = jnp.where(jnp.isfinite(top), ids, -1).transpose(0, 2, 1, 3).astype(jnp.int32)
    o_r, lse_r = attn_ops.dot_product_attention(
      q_far, at0(mem_k).astype(q.dtype), mem_v.astype(q.dtype), mask=None, block_indices=ids,
      block_size=(tile, bs), scale=scale, return_lse=True, implementation=self.implementation,
    )  # fmt: skip
    o, _ = merge_pair(o, lse, o_r, lse_r)
    return o.astype(q.dtype), new

  def _update_reps(self, rep, mem_k, lengths, t):
    """Recomputes the representative keys of the blocks this step wrote into."""
    m, bs, r = rep.shape[1], self.block_size, self.n_repr
    nb = min(m, t // bs + 2)
    first = jnp.clip((lengths - self.sinks) // bs, 0, m - nb)  # [B]

    def one(mem, rep, f):
      blocks = jax.lax.dynamic_slice_in_dim(mem, f * bs, nb * bs, axis=0)
      blocks = blocks.reshape(nb, bs, *mem.shape[1:]).astype(jnp.float32)  # [nb, bs, K, Dh]
      centroid = blocks.mean(1, keepdims=True)
      fit = jnp.sum(blocks * centroid, -1)  # [nb, bs, K]
      _, pick = jax.lax.top_k(jnp.moveaxis(fit, 1, -1), r)  # [nb, K, r]
      picked = jnp.take_along_axis(blocks, jnp.moveaxis(pick, -1, 1)[..., None], axis=1)
      return jax.lax.dynamic_update_slice_in_dim(rep, picked.astype(rep.dtype), f, axis=0)

    return jax.vmap(one)(mem_k, rep, first)
