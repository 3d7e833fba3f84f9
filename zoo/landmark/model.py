"""Landmark attention: every ``block_size - 1`` tokens are followed by a learned landmark token.

Grouped softmax (Mohtashami & Jaggi 2023, Sec. 3): a query softmaxes over the keys of its own
block and the landmark keys of previous blocks; a landmark's probability is then shared among
its block's tokens by a softmax inside that block. So a previous block ``b`` contributes its
within-block attention output ``o_b`` with log-weight ``q . landmark_b`` and the parts merge by
log-sum-exp. At inference a query keeps only its ``top_k`` previous blocks by landmark score
and attends to them through ``block_indices`` of ``ops.attention``: in the forward per query
tile (``query_tile`` queries inside a block share their blocks, chosen by their summed landmark
scores; :func:`tiled_grouped_attention`, which the block-sparse Pallas kernels serve), in
decode per token, as the paper defines it (``query_tile=1`` retrieves per token in the forward
too, through the dense :func:`grouped_attention`).

The model runs on an internal stream with the landmarks inserted; logits are returned for the
real tokens only. Decode feeds each token with a landmark behind it; the landmark only counts
(its keys stay in the cache) when it closes a block, otherwise the next token overwrites it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention as attn_ops
from ops.attention import merge
from zoo.interface import ZooModel
from zoo.landmark.config import LandmarkConfig
from zoo.layers.cache import attend_dense, forward_blocks, step_blocks
from zoo.layers.params import normal, param
from zoo.transformer.model import Transformer


def grouped_attention(q, k, v, block_size: int, top_k: int | None = None, segment_ids=None):
  """Dense grouped-softmax attention over an internal stream (landmark at every block end).

  Args:
    q: ``[B,N,H,Dh]`` rotated queries, ``N`` a multiple of ``block_size``.
    k, v: ``[B,N,K,Dh]``.
    block_size: block length including the landmark.
    top_k: keep only the ``top_k`` previous blocks with the highest landmark scores per query
      and KV head (scores summed over the head's query group by log-sum-exp).
    segment_ids: optional ``[B,N]`` int32; keys of another segment are never seen.

  Returns:
    ``o [B,N,H,Dh]`` float32.
  """
  b, n, h, d = q.shape
  kh, bs = k.shape[2], block_size
  nb = n // bs
  qg = q.reshape(b, n, kh, h // kh, d).astype(jnp.float32)
  s = jnp.einsum("bnkgd,bmkd->bkgnm", qg, k.astype(jnp.float32)) * d**-0.5
  i = jnp.arange(n)
  own = (i[None, :] // bs == i[:, None] // bs) & (i[None, :] <= i[:, None])
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B,N,N]
    s = jnp.where(same[:, None, None], s, -jnp.inf)
  s_own = jnp.where(own, s, -jnp.inf)
  lse_own = jax.nn.logsumexp(s_own, -1)
  o_own = jnp.einsum("bkgnm,bmkd->bkgnd", _safe_softmax(s_own), v.astype(jnp.float32))
  sb = s.reshape(b, kh, h // kh, n, nb, bs)
  vb = v.reshape(b, nb, bs, kh, d).astype(jnp.float32)
  o_blk = jnp.einsum("bkgnmc,bmckd->bkgnmd", _safe_softmax(sb[..., : bs - 1]), vb[:, :, : bs - 1])
  lm = jnp.where(jnp.arange(nb)[None, :] < (i // bs)[:, None], sb[..., bs - 1], -jnp.inf)
  if top_k is not None and top_k < nb:
    # blocks are chosen per KV head (summed over its query heads), as decode lists them
    sel = jax.nn.logsumexp(lm, axis=2, keepdims=True)
    kth = jax.lax.top_k(sel, top_k)[0][..., -1:]
    lm = jnp.where(sel >= kth, lm, -jnp.inf)
  o, _ = merge(
    jnp.concatenate([o_own[..., None, :], o_blk], axis=-2),
    jnp.concatenate([lse_own[..., None], lm], axis=-1),
    axis=4,  # the parts axis (merge sums o over the same axis, so not -1)
  )  # [B,K,G,N,Dh]
  return jnp.moveaxis(o, 3, 1).reshape(b, n, h, d)


def tiled_grouped_attention(q, k, v, block_size: int, top_k: int, query_tile: int, impl=None):
  """:func:`grouped_attention` with ``top_k`` retrieval per query tile, through ``ops.attention``.

  The queries of a tile (``query_tile`` rows, inside one block) share their previous blocks:
  the ``top_k`` with the highest landmark score summed (by log-sum-exp) over the tile's queries
  and the KV head's query group. Each query still weights a retrieved block by its own
  landmark score. The own block is causal attention with the block index as segment id; each
  retrieval slot is one block-sparse call listing one key block per query tile (landmark keys
  hidden by segment id ``-1``), so ``(query_tile, block_size)`` blocks reach the Pallas
  kernels where their tiles allow. With ``top_k`` covering every previous block this equals
  :func:`grouped_attention`.

  Args:
    q: ``[B,N,H,Dh]`` rotated queries, ``N`` a multiple of ``block_size``.
    k, v: ``[B,N,K,Dh]``.
    block_size: block length including the landmark.
    top_k: previous blocks retrieved per query tile and KV head.
    query_tile: queries sharing a retrieval; divides ``block_size``.
    impl: the attention implementation (None: by backend).

  Returns:
    ``o [B,N,H,Dh]`` float32.
  """
  b, n, h, d = q.shape
  kh, bs = k.shape[2], block_size
  nb, g, nt = n // bs, h // kh, n // query_tile
  scale = d**-0.5
  block = jnp.arange(n, dtype=jnp.int32) // bs
  seg = jnp.broadcast_to(block, (b, n))
  o_own, lse_own = attn_ops.dot_product_attention(
    q, k, v, mask=attn_ops.Mask(causal=True), segment_ids=(seg, seg), scale=scale,
    return_lse=True, implementation=impl,
  )  # fmt: skip
  qg = q.reshape(b, n, kh, g, d).astype(jnp.float32)
  lm = jnp.einsum("bnkgd,bmkd->bnkgm", qg, k[:, bs - 1 :: bs].astype(jnp.float32)) * scale
  lm = jnp.where(jnp.arange(nb) < block[None, :, None, None, None], lm, -jnp.inf)
  # [B, nt, K, nb]: the tile's score of each block (every query of a tile has the same
  # previous blocks, as the tile lies inside one block)
  sel = jax.nn.logsumexp(lm.reshape(b, nt, query_tile, kh, g, nb), axis=(2, 4))
  top, ids = jax.lax.top_k(sel, min(top_k, nb))  # [B, nt, K, n]
  ids = jnp.where(jnp.isfinite(top), ids, -1).astype(jnp.int32)
  per_query = jnp.repeat(ids, query_tile, axis=1)  # [B, N, K, n]
  picked = jnp.take_along_axis(lm, jnp.maximum(per_query, 0)[:, :, :, None, :], axis=-1)
  picked = jnp.where(per_query[:, :, :, None, :] >= 0, picked, -jnp.inf)  # [B, N, K, G, n]
  kv_seg = jnp.broadcast_to(jnp.where(jnp.arange(n) % bs == bs - 1, -1, 0), (b, n))
  q_seg = jnp.zeros((b, n), jnp.int32)
  parts_o, parts_lse = [o_own.astype(jnp.float32)], [lse_own]
  for slot in range(ids.shape[-1]):
    o_b = attn_ops.dot_product_attention(
      q, k, v, mask=None, segment_ids=(q_seg, kv_seg.astype(jnp.int32)),
      block_indices=jnp.moveaxis(ids[..., slot : slot + 1], 2, 1), block_size=(query_tile, bs),
      scale=scale, implementation=impl,
    )  # fmt: skip
    parts_o.append(o_b.astype(jnp.float32))
    parts_lse.append(picked[..., slot].reshape(b, n, h))
  o, _ = merge(jnp.stack(parts_o, 0), jnp.stack(parts_lse, 0), axis=0)
  return o


def _safe_softmax(s):
  """Softmax over the last axis; an all -inf row gives zeros (not NaN)."""
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  return p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-30)


class Landmark(ZooModel):
  """``logits, aux = model(tokens [B,T])``; decode with ``init_state`` / ``step``.

  One stream per row: the landmark blocks lie on the stream's grid, so a document packed
  after another would be cut into blocks at other offsets than alone. Packed ``segment_ids``
  are refused (ValueError) and the training loader feeds one document per row.
  """

  accepts_segment_ids = False

  @property
  def max_len(self) -> int:
    return self.backbone.config.max_len

  def __init__(self, config: LandmarkConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Transformer(config.backbone, rngs=rngs)
    d = config.backbone.d_model
    self.landmark = param(rngs, normal(0.02), (d,), ("embed",))

  def _rotate(self, attn, x, pos):
    return attn.rotate(x, pos, self.config.backbone.max_len)

  def __call__(
    self, tokens: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, Any]]:
    """``tokens [B,T]`` -> ``(logits [B,T,vocab] f32, {})`` (one stream per row)."""
    if segment_ids is not None:
      raise ValueError(
        "Landmark takes one stream per row, not packed segment_ids (its blocks lie on the "
        "stream's grid); feed one document per row"
      )
    b, t = tokens.shape
    per, bs = self.config.block_size - 1, self.config.block_size
    nb = -(-t // per)
    padded = jnp.pad(tokens, ((0, 0), (0, nb * per - t))).reshape(b, nb, per)
    x = self.backbone.embed_tokens(padded)
    lm = jnp.broadcast_to(self.landmark[...].astype(x.dtype), (b, nb, 1, x.shape[-1]))
    x = jnp.concatenate([x, lm], axis=2).reshape(b, nb * bs, -1)
    pos = jnp.broadcast_to(jnp.arange(nb * bs, dtype=jnp.int32), (b, nb * bs))

    top_k, tile = self.config.top_k, self.config.query_tile or bs

    def attend(i, attn, h):
      q, k, v = attn.project(h)
      q, k = self._rotate(attn, q, pos), self._rotate(attn, k, pos)
      if top_k is None or tile == 1:
        o = grouped_attention(q, k, v, bs, top_k)
      else:
        o = tiled_grouped_attention(q, k, v, bs, top_k, tile, attn.implementation)
      return attn.out(o.astype(h.dtype))

    h = forward_blocks(self.backbone, x, attend)
    h = h.reshape(b, nb, bs, -1)[:, :, :per].reshape(b, nb * per, -1)[:, :t]
    return self.backbone.logits(h), {}

  def init_state(self, batch: int, max_len: int | None = None) -> dict[str, Any]:
    """``lengths`` (real tokens), ``internal`` (stream positions incl. landmarks) and one
    ``k, v [B, cap, K, Dh]`` cache per layer, ``cap`` covering ``max_len`` real tokens."""
    c = self.config
    max_len = max_len or c.backbone.max_len
    cap = (-(-max_len // (c.block_size - 1)) + 1) * c.block_size
    dt = self.backbone.dtype
    return {
      "lengths": jnp.zeros((batch,), jnp.int32),
      "internal": jnp.zeros((batch,), jnp.int32),
      "caches": [b.attn.init_cache(batch, cap, dt) for b in self.backbone.blocks],
    }

  def step(self, tokens: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``tokens [B,t]`` one at a time (a scan); returns ``(logits [B,t,vocab], state)``."""

    def one(st, tok):
      logits, st = self._step_one(tok, st)
      return st, logits

    state, logits = jax.lax.scan(one, state, jnp.moveaxis(tokens, 1, 0))
    return jnp.moveaxis(logits, 0, 1), state

  def _step_one(self, tok, state):
    per = self.config.block_size - 1
    p = state["internal"]
    x = self.backbone.embed_tokens(tok[:, None])
    lm = jnp.broadcast_to(self.landmark[...].astype(x.dtype), x.shape)
    x, caches = step_blocks(
      self.backbone, jnp.concatenate([x, lm], axis=1), state["caches"],
      lambda i, attn, h, cache: self._attend(attn, h, cache, p),
    )  # fmt: skip
    logits = self.backbone.logits(x[:, :1])[:, 0]
    lengths = state["lengths"] + 1
    closes = lengths % per == 0  # the landmark behind this token ends its block
    new = {"lengths": lengths, "internal": p + 1 + closes.astype(jnp.int32), "caches": caches}
    return logits, new

  def _attend(self, attn, h, cache, p):
    """Token at stream position ``p [B]`` and its landmark at ``p + 1``."""
    b = h.shape[0]
    bs = self.config.block_size
    pos = p[:, None] + jnp.arange(2)
    q, k, v = attn.project(h)
    q, k = self._rotate(attn, q, pos), self._rotate(attn, k, pos)
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))
    kc = write(cache["k"], k.astype(cache["k"].dtype), p)
    vc = write(cache["v"], v.astype(cache["v"].dtype), p)
    cap, scale = kc.shape[1], q.shape[-1] ** -0.5
    # Own block: both queries use the token's block (a landmark that does not close it is
    # discarded anyway).
    start = (p // bs) * bs
    take = jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(c, s, bs, axis=0))
    own_vis = (start[:, None, None] + jnp.arange(bs)) <= pos[..., None]  # [B, 2, bs]
    o_own, lse_own = attend_dense(q, take(kc, start), take(vc, start), own_vis, scale)
    # Previous blocks: landmark scores, then the top_k blocks' within-block attention.
    nb = cap // bs
    lm_k = kc[:, bs - 1 :: bs]  # [B, nb, K, Dh]
    kh = lm_k.shape[2]
    qg = q.reshape(b, 2, kh, -1, q.shape[-1]).astype(jnp.float32)
    lm = jnp.einsum("btkgd,bmkd->btkgm", qg, lm_k.astype(jnp.float32)) * scale
    lm = jnp.where(jnp.arange(nb) < (p // bs)[:, None, None, None, None], lm, -jnp.inf)
    n = nb if self.config.top_k is None else min(self.config.top_k, nb)
    # Blocks are chosen per KV head (summed over its query heads) so block_indices can list
    # them; each query head still weights a block by its own landmark score.
    _, ids = jax.lax.top_k(jax.nn.logsumexp(lm, axis=3), n)  # [B, 2, K, n]
    picked = jnp.take_along_axis(lm, ids[:, :, :, None, :], axis=-1)  # [B, 2, K, G, n]
    valid = jnp.isfinite(picked)
    ids = jnp.where(valid.any(3), ids, -1).transpose(0, 2, 1, 3).astype(jnp.int32)  # [B,K,2,n]
    regular = jnp.where(jnp.arange(cap) % bs == bs - 1, -1, 0)
    seg = (jnp.zeros((b, 2), jnp.int32), jnp.broadcast_to(regular, (b, cap)).astype(jnp.int32))
    parts_o, parts_lse = [o_own.reshape(b, 2, kh, -1, q.shape[-1])], [lse_own.reshape(b, 2, kh, -1)]
    for slot in range(n):
      o_b = attn_ops.dot_product_attention(
        q, kc.astype(q.dtype), vc.astype(q.dtype), mask=None, segment_ids=seg,
        block_indices=ids[..., slot : slot + 1], block_size=(1, bs), scale=scale,
        implementation=attn.implementation,
      )  # fmt: skip
      parts_o.append(o_b.reshape(b, 2, kh, -1, q.shape[-1]))
      parts_lse.append(picked[..., slot])
    o, _ = merge(jnp.stack(parts_o, 0), jnp.stack(parts_lse, 0), axis=0)
    return attn.out(o.reshape(q.shape).astype(h.dtype)), {"k": kc, "v": vc}
