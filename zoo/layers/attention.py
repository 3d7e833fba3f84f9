"""Grouped-query self-attention with RoPE, through ``ops.attention``, and its KV cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from zoo.layers import parallel
from zoo.layers.conv import ShortConv
from zoo.layers.norms import RMSNorm
from zoo.layers.params import fan_in, param
from zoo.layers.rope import (
  LENGTH_DEPENDENT,
  RopeScaling,
  apply_rope,
  inv_frequencies,
  length_frequencies,
)

CAUSAL = attn_ops.Mask(causal=True)


class Attention(nnx.Module):
  """Multi-head attention with ``n_kv_heads`` shared key/value heads (GQA) and RoPE.

  ``x [B,T,D] -> [B,T,D]``. Projections are einsums over ``[D, H, Dh]`` parameters so heads
  shard over the ``heads``/``kv_heads`` logical axes.

  ``conv_width > 0`` adds Primer's multi-dconv-head attention (So et al. 2021): a causal
  depthwise convolution over time after each of the q, k, v projections, before RoPE. The
  decode cache then also holds each convolution's last ``conv_width - 1`` inputs. Only this
  layer's own paths (``__call__``, ``step``) apply it; ``project`` refuses, so the cache
  policies built on raw projections (StreamingLLM, Duo, InfLLM, landmark) cannot silently skip
  it.

  ``qkv_bias`` adds biases to the q, k, v projections and ``out_bias`` to the output one (Qwen2
  has the first, Llama's ``attention_bias`` both). ``qk_norm`` applies an RMSNorm over
  ``head_dim`` to each query and key head before RoPE (Qwen3), with ``norm_eps``. Both sit in
  the raw projection (``project``), so the cache policies built on it see them too.
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
    conv_width: int = 0,
    qkv_bias: bool = False,
    out_bias: bool = False,
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
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
    zeros = jax.nn.initializers.zeros
    self.bias = (
      nnx.Dict(
        {
          "q": param(rngs, zeros, (n_heads, head_dim), ("heads", "head_dim")),
          "k": param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "head_dim")),
          "v": param(rngs, zeros, (n_kv_heads, head_dim), ("kv_heads", "head_dim")),
        }
      )
      if qkv_bias
      else None
    )
    self.out_bias = param(rngs, zeros, (d_model,), ("embed",)) if out_bias else None
    self.q_norm = (
      RMSNorm(head_dim, eps=norm_eps, axis_name="head_dim", rngs=rngs) if qk_norm else None
    )
    self.k_norm = (
      RMSNorm(head_dim, eps=norm_eps, axis_name="head_dim", rngs=rngs) if qk_norm else None
    )
    heads = {"q": (n_heads, "heads"), "k": (n_kv_heads, "kv_heads"), "v": (n_kv_heads, "kv_heads")}
    self.conv = (
      nnx.Dict(
        {
          n: ShortConv((h, head_dim), (axis, "head_dim"), conv_width, activation=False, rngs=rngs)
          for n, (h, axis) in heads.items()
        }
      )
      if conv_width
      else None
    )

  def rope(self, seq_len):
    """(inv_freq, mscale) for a sequence whose longest position is ``seq_len`` (an int, or a
    traced ``[B]`` array for the length-dependent variants: then ``inv_freq [B, Dh/2]``)."""
    if isinstance(seq_len, int):
      return inv_frequencies(self.head_dim, self.rope_base, self.rope_scaling, seq_len)
    return length_frequencies(self.head_dim, self.rope_base, self.rope_scaling, seq_len)

  @property
  def length_dependent_rope(self) -> bool:
    return self.rope_scaling is not None and self.rope_scaling.kind in LENGTH_DEPENDENT

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Un-rotated ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]`` (cache policies place RoPE themselves)."""
    if self.conv is not None:
      raise ValueError(
        "this attention layer has short convolutions (conv_width > 0), which only its own "
        "forward and KV-cache paths apply; build the backbone with conv_width=0 for "
        "StreamingLLM, DuoAttention, InfLLM, landmark or HMT"
      )
    return self._linear(x)

  def _linear(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
    if self.bias is not None:
      q, k, v = (y + self.bias[n][...].astype(dt) for y, n in ((q, "q"), (k, "k"), (v, "v")))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def rotate(self, x: jax.Array, positions: jax.Array, seq_len: int) -> jax.Array:
    """RoPE of ``x [B,T,heads,Dh]`` at ``positions [B,T]`` (``seq_len``: longest position)."""
    inv_freq, mscale = self.rope(seq_len)
    return apply_rope(x, positions, inv_freq, mscale)

  def project_qkv(self, x: jax.Array, positions: jax.Array, seq_len: int):
    """Returns rotated ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]``."""
    q, k, v = self.project(x)
    return self.rotate(q, positions, seq_len), self.rotate(k, positions, seq_len), v

  def convolved_qkv(self, x, positions, seq_len, *, segment_ids=None, conv_state=None):
    """``project_qkv`` with the Primer convolutions (if any) applied before RoPE.

    ``conv_state`` (decode) is ``{"q", "k", "v": [B, conv_width-1, heads, Dh]}``; returns
    ``(q, k, v, new conv_state)`` (``None`` without convolutions or in the forward).
    """
    q, k, v = self._linear(x)
    new_state = None
    if self.conv is not None:
      qkv = {"q": q, "k": k, "v": v}
      if conv_state is None:  # full sequence: taps never cross a document start
        qkv = {n: self.conv[n](a, segment_ids) for n, a in qkv.items()}
      else:
        stepped = {n: self.conv[n].step(a, conv_state[n]) for n, a in qkv.items()}
        qkv = {n: y for n, (y, _) in stepped.items()}
        new_state = {n: s for n, (_, s) in stepped.items()}
      q, k, v = qkv["q"], qkv["k"], qkv["v"]
    q, k = self.rotate(q, positions, seq_len), self.rotate(k, positions, seq_len)
    return q, k, v, new_state

  def out(self, o: jax.Array) -> jax.Array:
    y = jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))
    if self.out_bias is not None:
      y = y + self.out_bias[...].astype(y.dtype)
    return y

  def __call__(
    self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Full-sequence attention. ``positions [B,T]`` int32, ``segment_ids [B,T]`` or None."""
    q, k, v, _ = self.convolved_qkv(x, positions, x.shape[1], segment_ids=segment_ids)
    seg = None if segment_ids is None else (segment_ids, segment_ids)
    # Under a context mesh this is ring attention (zoo.layers.parallel); else the plain kernel.
    o = parallel.attention(
      q, k, v, mask=self.mask, segment_ids=seg, implementation=self.implementation
    )
    return parallel.constrain(self.out(o))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
    """An empty cache: ``k, v [B, max_len, K, Dh]`` (and ``conv``, the convolution buffers)."""
    shape = (batch, max_len, self.n_kv_heads, self.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if self.conv is not None:
      cache["conv"] = {n: c.init_state(batch, dtype) for n, c in self.conv.items()}
    return cache

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
    # Length-dependent RoPE (dynamic NTK, LongRoPE) rotates the new tokens with the frequencies
    # of the length reached so far, as transformers' generation does; the others use any length.
    seq_len = lengths + t if self.length_dependent_rope else max_len
    q, k, v, conv = self.convolved_qkv(x, positions, seq_len, conv_state=cache.get("conv"))
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    new = {
      "k": write(cache["k"], k.astype(cache["k"].dtype), lengths),
      "v": write(cache["v"], v.astype(cache["v"].dtype), lengths),
    }
    if conv is not None:
      new["conv"] = conv
    o = attn_ops.decode_attention(q, new["k"], new["v"], lengths=lengths + t, mask=self.mask)
    return self.out(o.astype(x.dtype)), new
