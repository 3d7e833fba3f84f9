"""Blockwise attention in pure JAX: online softmax over key blocks, linear memory.

Queries are processed one block at a time (``lax.scan``); for each query block a
``lax.fori_loop`` with *dynamic* bounds visits only the key blocks that can hold a visible key
(the head range of sinks/prefix and the causal/window band, from :meth:`Mask.key_block_ranges`),
so a sink+window mask costs O(T * window). With ``block_indices`` the loop visits the listed
key blocks instead, gathered per (batch, kv head). The backward (a ``custom_vjp``) recomputes
scores block by block and accumulates dK/dV into full-size float32 buffers.

The core :func:`flash` also takes traced query/key offsets, which ring attention uses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ops.attention.mask import Mask

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


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
  block_q: int | None = None,
  block_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Blockwise attention; the internal kernel signature plus optional tile sizes.

  Args:
    q: ``[B, T, H, D]``.
    k: ``[B, S, K, D]``.
    v: ``[B, S, K, D]``.
    masks: one Mask per query head.
    segment_ids: ``([B, T], [B, S])`` int32 or None.
    q_offset: key position of query row 0.
    block_indices: ``[B, K, ceil(T / bq), n]`` int32 or None (then tiles are ``block_size``).
    block_size: ``(bq, bk)`` of ``block_indices``.
    scale: multiplies ``q . k``.
    interpret: unused (no Pallas here).
    block_q: query tile; default ``min(T, 256)``.
    block_k: key tile; default ``min(S, 512)``.

  Returns:
    ``(o [B, T, H, D], lse [B, T, H] float32)``.
  """
  del interpret
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if block_indices is not None:
    bq, bk = block_size
    block_indices = _drop_duplicates(block_indices)
  else:
    bq = block_q or min(t, DEFAULT_BLOCK_Q)
    bk = block_k or min(s, DEFAULT_BLOCK_K)
  q_off = jnp.int32(q_offset)
  k_off = jnp.int32(0)
  seg_q, seg_kv = segment_ids if segment_ids is not None else (None, None)

  def run(mask, q_heads, kv_heads):
    g = len(q_heads) // len(kv_heads)
    qs = q if len(q_heads) == h else q[:, :, list(q_heads)]
    ks, vs = (k, v) if len(kv_heads) == kh else (k[:, :, list(kv_heads)], v[:, :, list(kv_heads)])
    bi = None
    if block_indices is not None:
      bi = block_indices if len(kv_heads) == kh else block_indices[:, list(kv_heads)]
    q5 = qs.reshape(b, t, len(kv_heads), g, d)
    o5, lse4 = flash(
      q5, ks, vs, seg_q, seg_kv, bi, q_off, k_off, mask=mask, scale=scale, bq=bq, bk=bk
    )
    o = o5.reshape(b, t, len(q_heads), d)
    lse = jnp.transpose(lse4, (0, 3, 1, 2)).reshape(b, t, len(q_heads))
    return o, lse

  parts = _regular_groups(masks, kh)
  if len(parts) == 1:
    return run(*parts[0])
  outs = [run(*p) for p in parts]
  order = [hh for _, q_heads, _ in parts for hh in q_heads]
  inverse = [order.index(hh) for hh in range(h)]
  o = jnp.concatenate([x[0] for x in outs], axis=2)[:, :, inverse]
  lse = jnp.concatenate([x[1] for x in outs], axis=2)[:, :, inverse]
  return o, lse


def _regular_groups(masks: Sequence[Mask], num_kv_heads: int):
  """Splits heads into ``(mask, q_heads, kv_heads)`` with an equal count of q heads per kv head.

  Each part can then be laid out as ``[B, T, K', G', D]`` without repeating K/V.
  """
  g = len(masks) // num_kv_heads
  by_mask: dict[Mask, dict[int, list[int]]] = {}
  for hh, m in enumerate(masks):
    by_mask.setdefault(m, {}).setdefault(hh // g, []).append(hh)
  parts = []
  for m, per_kv in by_mask.items():
    by_count: dict[int, list[int]] = {}
    for kv, heads in per_kv.items():
      by_count.setdefault(len(heads), []).append(kv)
    for kvs in by_count.values():
      parts.append((m, tuple(hh for kv in kvs for hh in per_kv[kv]), tuple(kvs)))
  return parts


def _drop_duplicates(block_indices: jax.Array) -> jax.Array:
  """Replaces repeated entries of a block list by -1 so no key block is counted twice."""
  eq = block_indices[..., :, None] == block_indices[..., None, :]
  n = block_indices.shape[-1]
  earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
  dup = jnp.any(eq & earlier, axis=-1)
  return jnp.where(dup, -1, block_indices)


def _dot(spec, a, b):
  """einsum with float32 accumulation; the CPU runtime has no bf16 x bf16 -> f32 dot, so upcast."""
  if jax.default_backend() == "cpu" and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _cdiv(a, b):
  return (a + b - 1) // b


def _pad_axis(x, axis, size, value=0):
  if x is None or x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def local_block_ranges(mask: Mask, p_lo, p_hi, k_offset, num_keys: int, bk: int):
  """Local key-block ranges ``(head_b, lo_b, hi_b)`` for keys at ``k_offset + [0, S)``.

  ``mask`` speaks in absolute positions; the ranges are shifted into the local key array.
  """
  head, lo, hi = mask.key_ranges(p_lo, p_hi, k_offset + num_keys)
  h_hi = jnp.clip(head - k_offset, 0, num_keys)
  b_lo = jnp.clip(lo - k_offset, 0, num_keys)
  b_hi = jnp.clip(hi - k_offset, 0, num_keys)
  head_b = _cdiv(h_hi, bk)
  lo_b = jnp.maximum(b_lo // bk, head_b)
  hi_b = jnp.maximum(_cdiv(b_hi, bk), lo_b)
  return head_b, lo_b, hi_b


class _Ctx:
  """Padded, blocked views of the inputs shared by forward and backward."""

  def __init__(self, q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, bq, bk):
    b, t, kh, g, d = q.shape
    s = k.shape[1]
    self.b, self.t, self.kh, self.g, self.d, self.s = b, t, kh, g, d, s
    self.nq, self.nk = _cdiv(t, bq), _cdiv(s, bk)
    self.bq, self.bk, self.mask = bq, bk, mask
    self.q_off, self.k_off = q_off, k_off
    self.k = _pad_axis(k, 1, self.nk * bk)
    self.v = _pad_axis(v, 1, self.nk * bk)
    self.seg_kv = _pad_axis(seg_kv, 1, self.nk * bk, -1)
    self.seg_q = seg_q
    self.bidx = bidx
    self.sparse = bidx is not None

  def q_blocks(self, x, fill=0):
    """``[B, T, ...]`` -> ``[nq, B, bq, ...]``."""
    x = _pad_axis(x, 1, self.nq * self.bq, fill)
    x = x.reshape(self.b, self.nq, self.bq, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def q_unblock(self, x):
    """``[nq, B, bq, ...]`` -> ``[B, T, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(self.b, self.nq * self.bq, *x.shape[3:])[:, : self.t]

  def key_steps(self, qi):
    """Loop ranges over key blocks (or list slots) for query block ``qi``."""
    if self.sparse:
      n = self.bidx.shape[-1]
      return ((0, n),)
    p_lo = self.q_off + qi * self.bq
    p_hi = self.q_off + jnp.minimum((qi + 1) * self.bq, self.t)
    head_b, lo_b, hi_b = local_block_ranges(self.mask, p_lo, p_hi, self.k_off, self.s, self.bk)
    return ((0, head_b), (lo_b, hi_b))

  def key_block(self, step, qi, bidx_blk, seg_q_blk):
    """Keys, values, local key positions and visibility ``[B|1, K|1, 1, bq, bk]`` of a step."""
    bk = self.bk
    q_row = qi * self.bq + jnp.arange(self.bq)
    q_pos = self.q_off + q_row
    # Padded query rows see nothing: their zero cotangents must not meet exp overflow in bwd.
    q_ok = (q_row < self.t)[:, None]
    if self.sparse:
      idx = bidx_blk[:, :, step]  # [B, K]
      blk = jnp.maximum(idx, 0)
      kb = self.k.reshape(self.b, self.nk, bk, self.kh, self.d)
      vb = self.v.reshape(self.b, self.nk, bk, self.kh, self.d)
      bi, ki = jnp.arange(self.b)[:, None], jnp.arange(self.kh)[None, :]
      k_blk = kb[bi, blk, :, ki]  # [B, K, bk, D]
      v_blk = vb[bi, blk, :, ki]
      local = blk[:, :, None] * bk + jnp.arange(bk)  # [B, K, bk]
      vis = (idx >= 0)[:, :, None, None] & (local < self.s)[:, :, None, :] & q_ok
      vis = vis & self.mask.visible(q_pos[:, None], self.k_off + local[:, :, None, :])
      if self.seg_q is not None:
        seg_k = self.seg_kv.reshape(self.b, self.nk, bk)[jnp.arange(self.b)[:, None], blk]
        vis = vis & (seg_q_blk[:, None, :, None] == seg_k[:, :, None, :])
      return k_blk, v_blk, local, vis[:, :, None]
    start = step * bk
    k_blk = lax.dynamic_slice_in_dim(self.k, start, bk, axis=1)  # [B, bk, K, D]
    v_blk = lax.dynamic_slice_in_dim(self.v, start, bk, axis=1)
    local = start + jnp.arange(bk)
    vis = self.mask.visible(q_pos[:, None], self.k_off + local[None, :])
    vis = vis & (local < self.s) & q_ok
    vis = vis[None, None, None]
    if self.seg_q is not None:
      seg_k = lax.dynamic_slice_in_dim(self.seg_kv, start, bk, axis=1)
      vis = vis & (seg_q_blk[:, :, None] == seg_k[:, None, :])[:, None, None]
    return k_blk, v_blk, local, vis

  def scores(self, q_blk, k_blk, scale):
    spec = "bqkgd,bksd->bkgqs" if self.sparse else "bqkgd,bskd->bkgqs"
    return _dot(spec, q_blk, k_blk) * scale

  def pv(self, p, v_blk):
    spec = "bkgqs,bksd->bqkgd" if self.sparse else "bkgqs,bskd->bqkgd"
    return _dot(spec, p.astype(v_blk.dtype), v_blk)


def _fwd_impl(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, scale, bq, bk, out_dtype=None):
  c = _Ctx(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, bq, bk)
  b, kh, g, d = c.b, c.kh, c.g, c.d
  xs = (
    jnp.arange(c.nq),
    c.q_blocks(q),
    c.q_blocks(seg_q) if seg_q is not None else jnp.zeros((c.nq,)),
    jnp.moveaxis(bidx, 2, 0) if bidx is not None else jnp.zeros((c.nq,)),
  )

  def q_step(_, x):
    qi, q_blk, seg_q_blk, bidx_blk = x

    def body(step, state):
      m, l, acc = state
      k_blk, v_blk, _, vis = c.key_block(step, qi, bidx_blk, seg_q_blk)
      s = jnp.where(vis, c.scores(q_blk, k_blk, scale), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + jnp.sum(p, axis=-1)
      acc = acc * jnp.moveaxis(alpha, 3, 1)[..., None] + c.pv(p, v_blk)
      return m_new, l, acc

    state = (
      jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
      jnp.zeros((b, kh, g, bq), jnp.float32),
      jnp.zeros((b, bq, kh, g, d), jnp.float32),
    )
    for lo, hi in c.key_steps(qi):
      state = lax.fori_loop(lo, hi, body, state)
    m, l, acc = state
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o = acc / jnp.moveaxis(safe, 3, 1)[..., None]
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    return None, (o.astype(out_dtype or q.dtype), lse)

  _, (o, lse) = lax.scan(q_step, None, xs)
  o = c.q_unblock(o)  # [B, T, K, G, D]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, c.nq * bq)[..., : c.t]  # [B, K, G, T]
  return o, lse


def _bwd_impl(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, o, lse, do, dlse, mask, scale, bq, bk):
  """dq, dk, dv given the final ``o``/``lse`` (global ones when called per ring step)."""
  c = _Ctx(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, bq, bk)
  b, kh, g, d = c.b, c.kh, c.g, c.d
  # d lse / d s = softmax, so an lse cotangent folds into the row term of d s.
  delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), o.astype(jnp.float32))
  seen = jnp.isfinite(lse)
  delta = delta - jnp.where(seen, dlse, 0.0)  # lse = -inf rows are constant
  lse_safe = jnp.where(seen, lse, 0.0)

  def blocks_t(x):  # [B, K, G, T] -> [nq, B, K, G, bq]
    x = _pad_axis(x, 3, c.nq * bq)
    return jnp.moveaxis(x.reshape(b, kh, g, c.nq, bq), 3, 0)

  xs = (
    jnp.arange(c.nq),
    c.q_blocks(q),
    c.q_blocks(do),
    blocks_t(lse_safe),
    blocks_t(delta),
    c.q_blocks(seg_q) if seg_q is not None else jnp.zeros((c.nq,)),
    jnp.moveaxis(bidx, 2, 0) if bidx is not None else jnp.zeros((c.nq,)),
  )
  dk0 = jnp.zeros(c.k.shape, jnp.float32)
  dv0 = jnp.zeros(c.v.shape, jnp.float32)

  def q_step(carry, x):
    qi, q_blk, do_blk, lse_blk, delta_blk, seg_q_blk, bidx_blk = x

    def body(step, state):
      dq, dk, dv = state
      k_blk, v_blk, _, vis = c.key_block(step, qi, bidx_blk, seg_q_blk)
      s = c.scores(q_blk, k_blk, scale)
      p = jnp.where(vis, jnp.exp(s - lse_blk[..., None]), 0.0)  # [B, K, G, bq, bk]
      if c.sparse:
        dv_blk = _dot("bkgqs,bqkgd->bksd", p.astype(do_blk.dtype), do_blk)
        dp = _dot("bqkgd,bksd->bkgqs", do_blk, v_blk)
      else:
        dv_blk = _dot("bkgqs,bqkgd->bskd", p.astype(do_blk.dtype), do_blk)
        dp = _dot("bqkgd,bskd->bkgqs", do_blk, v_blk)
      ds = p * (dp - delta_blk[..., None]) * scale
      dq = dq + c.pv(ds.astype(k_blk.dtype), k_blk)
      if c.sparse:
        dk_blk = _dot("bkgqs,bqkgd->bksd", ds.astype(q_blk.dtype), q_blk)
        idx = bidx_blk[:, :, step]
        keep = (idx >= 0)[:, :, None, None]
        blk = jnp.maximum(idx, 0)
        bi, ki = jnp.arange(b)[:, None], jnp.arange(kh)[None, :]
        dk = dk.reshape(b, c.nk, bk, kh, d).at[bi, blk, :, ki].add(jnp.where(keep, dk_blk, 0.0))
        dv = dv.reshape(b, c.nk, bk, kh, d).at[bi, blk, :, ki].add(jnp.where(keep, dv_blk, 0.0))
        return dq, dk.reshape(c.k.shape), dv.reshape(c.v.shape)
      dk_blk = _dot("bkgqs,bqkgd->bskd", ds.astype(q_blk.dtype), q_blk)
      start = step * bk
      dk = lax.dynamic_update_slice_in_dim(
        dk, lax.dynamic_slice_in_dim(dk, start, bk, axis=1) + dk_blk, start, axis=1
      )
      dv = lax.dynamic_update_slice_in_dim(
        dv, lax.dynamic_slice_in_dim(dv, start, bk, axis=1) + dv_blk, start, axis=1
      )
      return dq, dk, dv

    dk, dv = carry
    state = (jnp.zeros((b, bq, kh, g, d), jnp.float32), dk, dv)
    for lo, hi in c.key_steps(qi):
      state = lax.fori_loop(lo, hi, body, state)
    dq, dk, dv = state
    return (dk, dv), dq

  (dk, dv), dq = lax.scan(q_step, (dk0, dv0), xs)
  dq = c.q_unblock(dq)
  return dq, dk[:, : c.s], dv[:, : c.s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def flash(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, scale, bq, bk):
  """Blockwise attention on grouped layout.

  Args:
    q: ``[B, T, K, G, D]``.
    k: ``[B, S, K, D]``.
    v: ``[B, S, K, D]``.
    seg_q: ``[B, T]`` int32 or None.
    seg_kv: ``[B, S]`` int32 or None.
    bidx: ``[B, K, ceil(T / bq), n]`` int32 or None (no duplicate entries).
    q_off: int32 scalar, absolute position of query row 0.
    k_off: int32 scalar, absolute position of key 0.
    mask: Mask shared by all these heads.
    scale: multiplies ``q . k``.
    bq: query tile.
    bk: key tile.

  Returns:
    ``(o [B, T, K, G, D] q.dtype, lse [B, K, G, T] float32)``.
  """
  return _fwd_impl(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, scale, bq, bk)


def _flash_fwd(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, scale, bq, bk):
  o, lse = _fwd_impl(q, k, v, seg_q, seg_kv, bidx, q_off, k_off, mask, scale, bq, bk)
  return (o, lse), (q, k, v, seg_q, seg_kv, bidx, q_off, k_off, o, lse)


def _flash_bwd(mask, scale, bq, bk, res, cts):
  q, k, v, seg_q, seg_kv, bidx, q_off, k_off, o, lse = res
  do, dlse = cts
  dq, dk, dv = _bwd_impl(
    q, k, v, seg_q, seg_kv, bidx, q_off, k_off, o, lse, do, dlse, mask, scale, bq, bk
  )
  return (
    dq.astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    None,
    None,
    None,
    None,
    None,
  )


flash.defvjp(_flash_fwd, _flash_bwd)


def grouped_forward(q, k, v, seg_q, seg_kv, q_off, k_off, *, masks, scale, bq, bk):
  """Forward without custom_vjp for callers that own the backward (ring attention).

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, S, K, D]``; seg_q ``[B, T]`` / seg_kv ``[B, S]`` or None.
    q_off: int32 scalar position of query row 0; k_off: of key 0 (both may be traced).
    masks: one Mask per query head.
    scale, bq, bk: as in :func:`flash`.

  Returns:
    ``(o [B, T, H, D] float32, lse [B, T, H] float32)``.
  """
  b, t, h, d = q.shape
  os_, lses, order = [], [], []
  for mask, q_heads, kv_heads in _regular_groups(masks, k.shape[2]):
    g = len(q_heads) // len(kv_heads)
    q5 = q[:, :, list(q_heads)].reshape(b, t, len(kv_heads), g, d)
    o5, lse4 = _fwd_impl(
        q5, k[:, :, list(kv_heads)], v[:, :, list(kv_heads)], seg_q, seg_kv, None, q_off, k_off,
        mask, scale, bq, bk, out_dtype=jnp.float32,
    )  # fmt: skip
    os_.append(o5.reshape(b, t, len(q_heads), d))
    lses.append(jnp.transpose(lse4, (0, 3, 1, 2)).reshape(b, t, len(q_heads)))
    order += list(q_heads)
  inverse = [order.index(hh) for hh in range(h)]
  o = jnp.concatenate(os_, axis=2)[:, :, inverse]
  return o, jnp.concatenate(lses, axis=2)[:, :, inverse]


def grouped_backward(
  q, k, v, seg_q, seg_kv, q_off, k_off, o, lse, do, dlse, *, masks, scale, bq, bk
):
  """Gradients given the final ``o``/``lse`` of these queries (over all keys, not only ``k``).

  Args:
    q, k, v, seg_q, seg_kv, q_off, k_off, masks, scale, bq, bk: as in :func:`grouped_forward`.
    o: ``[B, T, H, D]`` final output; lse: ``[B, T, H]`` final log-sum-exp.
    do: ``[B, T, H, D]`` output cotangent; dlse: ``[B, T, H]`` lse cotangent.

  Returns:
    ``(dq [B, T, H, D], dk [B, S, K, D], dv [B, S, K, D])`` float32, the contributions of keys
    ``k`` only.
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for mask, q_heads, kv_heads in _regular_groups(masks, kh):
    qh, kvh = list(q_heads), list(kv_heads)
    g = len(q_heads) // len(kv_heads)

    def grouped(x, qh=qh, g=g, kvh=kvh):
      return x[:, :, qh].reshape(b, t, len(kvh), g, *x.shape[3:])

    def heads_last(x, qh=qh, g=g, kvh=kvh):  # [B, T, H'] -> [B, K', G', T]
      return jnp.transpose(x[:, :, qh].reshape(b, t, len(kvh), g), (0, 2, 3, 1))

    dq_g, dk_g, dv_g = _bwd_impl(
        grouped(q), k[:, :, kvh], v[:, :, kvh], seg_q, seg_kv, None, q_off, k_off, grouped(o),
        heads_last(lse), grouped(do), heads_last(dlse), mask, scale, bq, bk,
    )  # fmt: skip
    dq = dq.at[:, :, qh].set(dq_g.reshape(b, t, len(qh), d))
    dk = dk.at[:, :, kvh].add(dk_g)
    dv = dv.at[:, :, kvh].add(dv_g)
  return dq, dk, dv
