"""Grouped-query self-attention with RoPE, through ``ops.attention``, and its KV cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from zoo.layers import parallel
from zoo.layers.params import fan_in, param
from zoo.layers.rope import RopeScaling, apply_rope, inv_frequencies

CAUSAL = attn_ops.Mask(causal=True)


class Attention(nnx.Module):
  """Multi-head attention with ``n_kv_heads`` shared key/value heads (GQA) and RoPE.

  ``x [B,T,D] -> [B,T,D]``. Projections are einsums over ``[D, H, Dh]`` parameters so heads
  shard over the ``heads``/``kv_heads`` logical axes.
  """

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    rope_base: float = 10000.0,
    rope_scaling: RopeScaling | None = None,
    mask: attn_ops.Mask | tuple[attn_ops.Mask, ...] = CAUSAL,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_base = rope_base
    self.rope_scaling = rope_scaling
    self.mask = mask
    self.implementation = implementation
    init = fan_in([d_model])
    self.wq = param(rngs, init, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, init, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, init, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.wo = param(
      rngs,
      fan_in([n_heads, head_dim]),
      (n_heads, head_dim, d_model),
      ("heads", "head_dim", "embed"),
    )

  def rope(self, seq_len: int):
    """(inv_freq, mscale) for a sequence whose longest position is ``seq_len``."""
    return inv_frequencies(self.head_dim, self.rope_base, self.rope_scaling, seq_len)

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Un-rotated ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]`` (cache policies place RoPE themselves)."""
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
    return q, k, v

  def rotate(self, x: jax.Array, positions: jax.Array, seq_len: int) -> jax.Array:
    """RoPE of ``x [B,T,heads,Dh]`` at ``positions [B,T]`` (``seq_len``: longest position)."""
    inv_freq, mscale = self.rope(seq_len)
    return apply_rope(x, positions, inv_freq, mscale)

  def project_qkv(self, x: jax.Array, positions: jax.Array, seq_len: int):
    """Returns rotated ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]``."""
    q, k, v = self.project(x)
    return self.rotate(q, positions, seq_len), self.rotate(k, positions, seq_len), v

  def out(self, o: jax.Array) -> jax.Array:
    return jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))

  def __call__(
    self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Full-sequence attention. ``positions [B,T]`` int32, ``segment_ids [B,T]`` or None."""
    q, k, v = self.project_qkv(x, positions, x.shape[1])
    seg = None if segment_ids is None else (segment_ids, segment_ids)
    # Under a context mesh this is ring attention (zoo.layers.parallel); else the plain kernel.
    o = parallel.attention(
      q, k, v, mask=self.mask, segment_ids=seg, implementation=self.implementation
    )
    return parallel.constrain(self.out(o))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
    """An empty cache: ``k, v [B, max_len, K, Dh]``."""
    shape = (batch, max_len, self.n_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def step(
    self, x: jax.Array, cache: dict[str, Any], lengths: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Attends ``x [B,t,D]`` (the next ``t`` tokens) over the cache and writes them into it.

    ``lengths [B]`` int32 counts the tokens already cached per sequence; the new tokens sit at
    positions ``lengths .. lengths + t - 1``.
    """
    t = x.shape[1]
    max_len = cache["k"].shape[1]
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k, v = self.project_qkv(x, positions, max_len)
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    cache = {
      "k": write(cache["k"], k.astype(cache["k"].dtype), lengths),
      "v": write(cache["v"], v.astype(cache["v"].dtype), lengths),
    }
    o = attn_ops.decode_attention(q, cache["k"], cache["v"], lengths=lengths + t, mask=self.mask)
    return self.out(o.astype(x.dtype)), cache
