"""Decode-cache policies of the attention layer, and the loops that run a backbone with them.

A policy says which keys each query sees and at which RoPE positions, for the full-sequence
forward and for the cached decode ``step``, so that both compute the same thing:

- :class:`FullCache`: every past key (the transformer's own cache).
- :class:`SinkCache`: the first ``sinks`` keys plus a rolling window of ``window`` keys
  (StreamingLLM). With ``shift=True`` positions are re-assigned inside the cache, so a query
  sees the sinks from in-cache position ``min(p, sinks + window - 1)`` (StreamingLLM Sec. 3.2)
  while window keys keep their true distance; ``shift=False`` keeps original positions (the
  plain sink+window mask, DuoAttention's streaming heads). Memory is constant in stream length.

Keys are cached un-rotated; RoPE is applied when attending, at the positions the policy picks.
The InfLLM block memory (a family-specific policy) lives in :mod:`zoo.infllm.memory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from ops.attention import merge_pair
from zoo.layers import remat

Rotate = Callable[[jax.Array, jax.Array], jax.Array]


def attend_dense(q, k, v, visible, scale):
  """Small dense attention with a per-sequence visibility table (a few sink or block keys).

  Args:
    q: ``[B,T,H,Dh]``; k, v: ``[B,S,K,Dh]`` with ``H % K == 0``.
    visible: bool ``[B,T,S]`` or ``[B,T,K,S]``.
    scale: logit scale.

  Returns:
    ``(o [B,T,H,Dh] float32, lse [B,T,H] float32)``; a row with no visible key gives 0, -inf.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
  s = jnp.einsum("btkgd,bskd->btkgs", qg, k.astype(jnp.float32)) * scale
  vis = visible[:, :, None, None, :] if visible.ndim == 3 else visible[:, :, :, None, :]
  s = jnp.where(vis, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  o = jnp.einsum("btkgs,bskd->btkgd", p, v.astype(jnp.float32))
  return o.reshape(b, t, h, d), lse.reshape(b, t, h)


def write_prefix(buf, new, lengths):
  """Writes ``new [B,t,...]`` (absolute positions ``lengths + r``) into the slots of
  ``buf [B,n,...]`` whose index is such a position; other slots keep their value."""
  n, t = buf.shape[1], new.shape[1]
  idx = jnp.arange(n)[None, :] - lengths[:, None]  # [B, n]: which new token lands in slot j
  hit = (idx >= 0) & (idx < t)
  gathered = jnp.take_along_axis(
    new, jnp.clip(idx, 0, t - 1).reshape(idx.shape + (1,) * (new.ndim - 2)), axis=1
  )
  return jnp.where(hit.reshape(hit.shape + (1,) * (new.ndim - 2)), gathered, buf)


@dataclasses.dataclass(frozen=True)
class FullCache:
  """Every past key stays visible: the transformer's own causal attention and KV cache."""

  def forward(self, attn, x, segment_ids=None):
    b, t, _ = x.shape
    return attn(x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), segment_ids)

  def init(self, attn, batch: int, max_len: int, dtype) -> dict[str, jax.Array]:
    return attn.init_cache(batch, max_len, dtype)

  def step(self, attn, x, cache, lengths):
    return attn.step(x, cache, lengths)


@dataclasses.dataclass(frozen=True)
class SinkCache:
  """``sinks`` initial keys + a rolling window of ``window`` keys (see module docstring)."""

  sinks: int
  window: int
  shift: bool = True
  implementation: str | None = None

  def __post_init__(self):
    if self.window < 1 or self.sinks < 0:
      raise ValueError(f"SinkCache needs window >= 1 and sinks >= 0, got {self}")

  @property
  def size(self) -> int:
    """Keys a query sees at most (the paper's cache size)."""
    return self.sinks + self.window

  def rotator(self, attn) -> Rotate:
    # dynamic NTK would otherwise see a different "length" in forward and decode
    return lambda x, pos: attn.rotate(x, pos, self.size)

  def forward(self, attn, x, segment_ids=None):
    """``x [B,T,D] -> [B,T,D]`` with positions ``0..T-1``.

    With packed ``segment_ids [B,T]`` documents never see each other; RoPE is relative, so row
    positions serve every document, but only the row's first document has sinks.
    """
    q, k, v = attn.project(x)
    o = self.attend_forward(self.rotator(attn), q, k, v, segment_ids)
    return attn.out(o.astype(x.dtype))

  def attend_forward(self, rotate: Rotate, q, k, v, segment_ids=None):
    """Full-sequence sink+window attention of un-rotated ``q [B,T,H,Dh]``, ``k, v [B,T,K,Dh]``."""
    b, t = q.shape[:2]
    s, w = self.sinks, self.window
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rq, rk = rotate(q, pos), rotate(k, pos)
    seg = None if segment_ids is None else (segment_ids, segment_ids)
    impl = self.implementation
    if not self.shift:
      mask = attn_ops.Mask(causal=True, window=w, sinks=s)
      return attn_ops.dot_product_attention(
        rq, rk, v, mask=mask, segment_ids=seg, implementation=impl
      )
    o, lse = attn_ops.dot_product_attention(
      rq, rk, v, mask=attn_ops.Mask(window=w), segment_ids=seg, return_lse=True, implementation=impl
    )
    if s == 0 or t <= w:
      return o
    # Sink j has left the window of query p once j <= p - w: causal with q_offset = -w.
    qs = rotate(q, jnp.minimum(pos, s + w - 1))
    n = min(s, t)
    seg = None if segment_ids is None else (segment_ids, segment_ids[:, :n])
    o_s, lse_s = attn_ops.dot_product_attention(
      qs, rk[:, :n], v[:, :n], mask=attn_ops.Mask(), segment_ids=seg, q_offset=-w,
      return_lse=True, implementation=impl,
    )  # fmt: skip
    return merge_pair(o, lse, o_s, lse_s)[0].astype(q.dtype)

  def init(self, attn, batch: int, max_len: int | None, dtype) -> dict[str, jax.Array]:
    """Constant-size cache (``max_len`` is ignored): ``sink_k/v [B,sinks,K,Dh]``,
    ``win_k/v [B,window-1,K,Dh]`` (the previous tokens of the newest query's window)."""
    del max_len
    return self.init_heads(batch, attn.n_kv_heads, attn.head_dim, dtype)

  def init_heads(self, batch: int, kv_heads: int, head_dim: int, dtype) -> dict[str, jax.Array]:
    z = lambda n: jnp.zeros((batch, n, kv_heads, head_dim), dtype)  # noqa: E731
    return {
      "sink_k": z(self.sinks), "sink_v": z(self.sinks),
      "win_k": z(self.window - 1), "win_v": z(self.window - 1),
    }  # fmt: skip

  def window_part(self, rotate: Rotate, q, k, v, cache, lengths):
    """The rolling-window attention of a step: ``(o, lse, kw, vw)`` where ``kw, vw [B,w-1+t,K,Dh]``
    are the previous window followed by the new keys (slot i at position lengths-(w-1)+i)."""
    b, t = q.shape[:2]
    w = self.window
    kw = jnp.concatenate([cache["win_k"], k.astype(cache["win_k"].dtype)], axis=1)
    vw = jnp.concatenate([cache["win_v"], v.astype(cache["win_v"].dtype)], axis=1)
    # Slots before position 0 are empty. Only distances matter inside the window, so rotate at
    # slot indices (bounded positions however long the stream).
    slots = jnp.broadcast_to(jnp.arange(w - 1 + t, dtype=jnp.int32), (b, w - 1 + t))
    kv_seg = jnp.where(lengths[:, None] - (w - 1) + slots >= 0, 0, -1)
    o, lse = attn_ops.dot_product_attention(
      rotate(q, slots[:, w - 1 :]), rotate(kw, slots).astype(q.dtype), vw.astype(q.dtype),
      mask=attn_ops.Mask(window=w), segment_ids=(jnp.zeros((b, t), jnp.int32), kv_seg),
      q_offset=w - 1, return_lse=True, implementation=self.implementation,
    )  # fmt: skip
    return o, lse, kw, vw

  def step(self, attn, x, cache, lengths):
    q, k, v = attn.project(x)
    o, cache = self.attend_step(self.rotator(attn), q, k, v, cache, lengths)
    return attn.out(o.astype(x.dtype)), cache

  def attend_step(self, rotate: Rotate, q, k, v, cache, lengths):
    """Attends the next ``t`` tokens (un-rotated ``q [B,t,H,Dh]``, ``k, v [B,t,K,Dh]``) over the
    cache and rolls it. ``lengths [B]``: tokens seen before. Returns ``(o [B,t,H,Dh], cache)``."""
    b, t = q.shape[:2]
    s, w = self.sinks, self.window
    o, lse, kw, vw = self.window_part(rotate, q, k, v, cache, lengths)
    new = {"win_k": kw[:, t:], "win_v": vw[:, t:]}
    if s:
      sink_k = write_prefix(cache["sink_k"], k.astype(cache["sink_k"].dtype), lengths)
      sink_v = write_prefix(cache["sink_v"], v.astype(cache["sink_v"].dtype), lengths)
      p = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, t] absolute positions
      j = jnp.arange(s, dtype=jnp.int32)
      sink_pos = jnp.broadcast_to(j, (b, s))
      # Shifted: the query sits at its in-cache slot; else at its true position.
      qs = rotate(q, jnp.minimum(p, s + w - 1) if self.shift else p)
      rks = rotate(sink_k, sink_pos)
      visible = j[None, None, :] <= p[..., None] - w
      o_s, lse_s = attend_dense(qs, rks, sink_v, visible, q.shape[-1] ** -0.5)
      o = merge_pair(o, lse, o_s, lse_s)[0]
      new |= {"sink_k": sink_k, "sink_v": sink_v}
    return o.astype(q.dtype), new


def check_plain_backbone(backbone) -> None:
  """The cache policies here re-implement attention on raw projections; refuse a backbone whose
  attention has Primer convolutions (``conv_width > 0``) instead of silently dropping them."""
  width = getattr(backbone.config, "conv_width", 0)
  if width:
    raise ValueError(
      f"this memory needs a Llama-layout backbone, but its transformer has conv_width={width} "
      "(Primer convolutions); use a backbone trained with conv_width=0"
    )


def forward_blocks(backbone, x, attend: Callable[[int, Any, jax.Array], jax.Array]):
  """Runs ``backbone``'s blocks on embeddings ``x [B,T,D]`` with ``attend(layer, attn, h)`` in
  place of each block's attention; returns the final hidden states ``[B,T,D]`` (pre-norm)."""
  check_plain_backbone(backbone)
  for i, block in enumerate(backbone.blocks):

    def layer(block, x, i=i):
      x = x + attend(i, block.attn, block.attn_norm(x))
      return x + block.mlp(block.mlp_norm(x))

    if block.remat_policy is not None:  # the backbone's remat setting covers the whole layer
      layer = nnx.remat(layer, policy=remat.POLICIES[block.remat_policy]())
    x = layer(block, x)
  return x


def step_blocks(backbone, x, caches, step: Callable[..., tuple[jax.Array, Any]]):
  """Decode counterpart of :func:`forward_blocks`: ``step(layer, attn, h, cache) -> (out,
  cache)``. Returns ``(hidden [B,t,D], new caches)``."""
  check_plain_backbone(backbone)
  new = []
  for i, (block, cache) in enumerate(zip(backbone.blocks, caches)):
    h, cache = step(i, block.attn, block.attn_norm(x), cache)
    x = x + h
    x = x + block.mlp(block.mlp_norm(x))
    new.append(cache)
  return x, new
