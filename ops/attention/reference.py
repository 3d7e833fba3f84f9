"""Dense attention: the specification every other implementation is checked against.

Plain ``jnp`` with float32 accumulation; memory is O(B * H * T * S) and gradients come from
autodiff. Shapes and semantics are those of :func:`ops.attention.dot_product_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ops.attention.mask import Mask


def visibility(
  masks: Sequence[Mask],
  num_kv_heads: int,
  segment_ids: tuple[jax.Array, jax.Array] | None,
  q_positions: jax.Array,
  k_positions: jax.Array,
  block_indices: jax.Array | None = None,
  block_size: tuple[int, int] = (128, 128),
) -> jax.Array:
  """Dense boolean visibility ``[B or 1, K, G, T, S]`` (G = H // K query heads per KV head).

  Args:
    masks: one Mask per query head (H of them).
    num_kv_heads: K.
    segment_ids: ``([B, T], [B, S])`` int32 or None.
    q_positions: int ``[T]`` or ``[B, T]`` absolute query positions.
    k_positions: int ``[S]`` or ``[B, S]`` absolute key positions.
    block_indices: int32 ``[B, K, ceil(T / bq), n]`` listed key blocks per query block, -1 empty.
    block_size: ``(bq, bk)`` that ``block_indices`` refers to.
  """
  h = len(masks)
  g = h // num_kv_heads
  qp = jnp.atleast_2d(q_positions)[:, :, None]  # [B|1, T, 1]
  kp = jnp.atleast_2d(k_positions)[:, None, :]  # [B|1, 1, S]
  vis = jnp.stack([m.visible(qp, kp) for m in masks], axis=1)  # [B|1, H, T, S]
  t, s = vis.shape[-2], vis.shape[-1]
  vis = vis.reshape(vis.shape[0], num_kv_heads, g, t, s)
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    same = q_seg[:, :, None] == kv_seg[:, None, :]  # [B, T, S]
    vis = vis & same[:, None, None]
  if block_indices is not None:
    bq, bk = block_size
    nk = -(-s // bk)
    listed = jnp.any(
      block_indices[..., None] == jnp.arange(nk, dtype=block_indices.dtype), axis=-2
    )  # [B, K, nq, nk]
    listed = jnp.repeat(jnp.repeat(listed, bq, axis=2)[:, :, :t], bk, axis=3)[..., :s]
    vis = vis & listed[:, :, None]
  return vis


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  masks: tuple[Mask, ...],
  segment_ids: tuple[jax.Array, jax.Array] | None,
  q_offset: int,
  block_indices: jax.Array | None,
  block_size: tuple[int, int],
  scale: float,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Dense softmax attention.

  Args:
    q: ``[B, T, H, D]``.
    k: ``[B, S, K, D]``.
    v: ``[B, S, K, D]``.
    masks: one Mask per query head.
    segment_ids: ``([B, T], [B, S])`` int32 or None.
    q_offset: key position of query row 0 (int, or an int32 scalar / ``[B]`` array).
    block_indices: ``[B, K, ceil(T / bq), n]`` int32 or None.
    block_size: ``(bq, bk)``.
    scale: multiplies ``q . k``.
    interpret: unused (no kernel).

  Returns:
    ``(o [B, T, H, D] in q.dtype, lse [B, T, H] float32)``; rows with no visible key give
    ``o = 0`` and ``lse = -inf``.
  """
  del interpret
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = h // kh
  q_pos = jnp.asarray(q_offset)[..., None] + jnp.arange(t)
  vis = visibility(masks, kh, segment_ids, q_pos, jnp.arange(s), block_indices, block_size)
  qf = q.astype(jnp.float32).reshape(b, t, kh, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  seen = denom > 0
  safe = jnp.where(seen, denom, 1.0)
  o = jnp.einsum("bkgts,bskd->btkgd", p / safe, v.astype(jnp.float32))
  lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)[..., 0]  # [B, K, G, T]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
  return o.reshape(b, t, h, d).astype(q.dtype), lse
