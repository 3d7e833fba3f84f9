"""Host side shared by the Pallas attention kernels (TPU and GPU): input checks, block planning
and the ``custom_vjp`` that ties each platform's three kernels together.

The kernels never look at a key block that cannot hold a visible key. Before a kernel runs we
build, per query block, the list of key blocks that may be visible ("kv lists", used by the
forward and dq kernels) and, per key block, the list of query blocks that may see it ("q lists",
used by the dk/dv kernel). Lists are sorted, padded to a static length with their last valid
entry and come with a count of valid entries: the GPU kernels loop over the first ``count``
entries, the TPU kernels walk them flattened into grid steps (``pallas_schedule``).

A list set is indexed ``[Lb, Lh, rows, n]``: ``Lb`` is 1 (same for every batch row) or B, ``Lh``
is the number of distinct lists over heads and ``head_map[h]`` picks the list of query head
``h``. With masks only (the common case) the lists are numpy constants, one per distinct Mask;
``block_indices`` or ``segment_ids`` make them data-dependent (built with jnp on device).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention.mask import NO_WINDOW, Mask, head_groups
from ops.common.dispatch import NotSupportedError


@dataclasses.dataclass(frozen=True)
class BlockLists:
  """Visible-block lists for one orientation (see module docstring).

  Attributes:
    ids: int32 ``[Lb, Lh, rows, n]`` block ids, valid entries first, padded with the last one.
    counts: int32 ``[Lb, Lh, rows]`` number of valid entries.
    head_map: int32 numpy ``[H]``: list index of each query head.
    count_bound: int numpy ``[H, rows]``: static upper bound of each head's counts (equal to
      the counts when the lists are static); sizes the flattened TPU grid.
    mask_group: int numpy ``[H]``: index of each head's Mask among the distinct Masks (heads of
      one group and one kv head have the same lists).
  """

  ids: jax.Array | np.ndarray
  counts: jax.Array | np.ndarray
  head_map: np.ndarray
  count_bound: np.ndarray
  mask_group: np.ndarray

  @property
  def length(self) -> int:
    return int(self.ids.shape[-1])

  @property
  def per_batch(self) -> bool:
    return int(self.ids.shape[0]) > 1

  @property
  def num_lists(self) -> int:
    return int(self.ids.shape[1])

  def computed_blocks(self, batch: int) -> int:
    """Number of (query block, key block) tiles a kernel computes over all B and H."""
    counts = np.asarray(self.counts)
    per_head = counts.sum(axis=-1)  # [Lb, Lh]
    total = per_head[:, self.head_map].sum()
    return int(total if self.per_batch else total * batch)


def mask_params(mask: Mask) -> tuple[bool, int | None, int, int]:
  """A Mask as the static tuple the in-kernel visibility test takes."""
  return (mask.causal, mask.window, mask.sinks, mask.prefix)


def visible(q_pos, k_pos, params, num_keys: int):
  """In-kernel visibility of keys ``k_pos`` to query positions ``q_pos`` (broadcasting).

  Same rule as :meth:`Mask.visible`, plus padded keys (``>= num_keys``) hidden. ``params`` is
  either a static ``mask_params`` tuple (dead terms are dropped at trace time) or four int32
  scalars ``(causal 0/1, window or NO_WINDOW, sinks, prefix)`` read from a per-head table.
  """
  causal, window, sinks, prefix = params
  ok = k_pos < num_keys
  if causal is True:
    ok = ok & (k_pos <= q_pos)
  elif causal is not False:
    ok = ok & ((k_pos <= q_pos) | (causal == 0))
  if window is not None:
    ok = ok & ((q_pos - k_pos < window) | (k_pos < sinks))
  if not (isinstance(prefix, int) and prefix == 0):
    ok = ok | ((q_pos < prefix) & (k_pos < prefix) & (k_pos < num_keys))
  return ok


def mask_table(masks: Sequence[Mask]) -> np.ndarray:
  """int32 ``[H, 4]`` (causal, window or NO_WINDOW, sinks, prefix) per head."""
  rows = [
    (int(m.causal), NO_WINDOW if m.window is None else m.window, m.sinks, m.prefix) for m in masks
  ]
  return np.asarray(rows, dtype=np.int32).reshape(len(masks), 4)


def block_visibility(mask: Mask, *, t: int, s: int, q_offset: int, bq: int, bk: int) -> np.ndarray:
  """Exact "some key of this block is visible to some query of that block", bool ``[nq, nk]``.

  Uses the closed form per block pair: with query positions ``[p0, p1]`` and keys ``[j0, j1]``
  (clipped to the real lengths), the band (causal/window) is hit iff the difference range
  ``[p0 - j1, p1 - j0]`` meets ``[0 if causal, window - 1]``; sinks iff ``j0 < sinks`` (and
  ``j0 <= p1`` when causal); the prefix iff ``p0 < prefix`` and ``j0 < prefix``.
  """
  nq, nk = -(-t // bq), -(-s // bk)
  p0 = (q_offset + np.arange(nq) * bq)[:, None]
  p1 = (q_offset + np.minimum(np.arange(nq) * bq + bq, t) - 1)[:, None]
  j0 = (np.arange(nk) * bk)[None, :]
  j1 = (np.minimum(np.arange(nk) * bk + bk, s) - 1)[None, :]
  lo_d, hi_d = p0 - j1, p1 - j0
  band = np.ones((nq, nk), dtype=bool)
  if mask.causal:
    band &= hi_d >= 0
  if mask.window is not None:
    band &= lo_d <= mask.window - 1
    sink = j0 < mask.sinks
    if mask.causal:
      sink = sink & (j0 <= p1)
    band |= sink
  if mask.prefix:
    band |= (p0 < mask.prefix) & (j0 < mask.prefix)
  return band


def _compact_np(vis: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """bool ``[..., N]`` -> (ids ``[..., length]`` padded with the last valid id, counts)."""
  counts = vis.sum(axis=-1).astype(np.int32)
  order = np.argsort(~vis, axis=-1, kind="stable")[..., :length].astype(np.int32)
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
  pos = np.arange(length)
  ids = np.where(pos < counts[..., None], order, last)
  return ids.astype(np.int32), counts


def _compact_jnp(vis: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  counts = vis.sum(axis=-1).astype(jnp.int32)
  order = jnp.argsort(~vis, axis=-1, stable=True)[..., :length].astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  ids = jnp.where(jnp.arange(length) < counts[..., None], order, last)
  return ids, counts


def _block_indices_dense(
  block_indices: jax.Array, *, nq: int, nk: int, bq: int, bk: int, block_size: tuple[int, int]
) -> jax.Array:
  """``[B, K, ceil(T/bq_bi), n]`` listed blocks -> bool ``[B, K, nq, nk]`` in kernel blocks."""
  bq_bi, bk_bi = block_size
  if bq_bi % bq or bk_bi % bk:
    raise NotSupportedError(
      f"kernel blocks ({bq}, {bk}) must divide block_indices' block_size {block_size}"
    )
  nk_bi = -(-nk * bk // bk_bi)
  listed = jax.nn.one_hot(block_indices, nk_bi, dtype=jnp.bool_).any(axis=-2)
  listed = jnp.repeat(listed, bq_bi // bq, axis=2)[:, :, :nq]
  return jnp.repeat(listed, bk_bi // bk, axis=3)[:, :, :, :nk]


def _segment_dense(segment_ids, *, bq: int, bk: int, nq: int, nk: int) -> jax.Array:
  """bool ``[B, nq, nk]``: segment-id ranges of the two blocks overlap (conservative)."""
  q_seg, kv_seg = segment_ids

  def ranges(seg, block, nblocks):
    pad = nblocks * block - seg.shape[1]
    lo = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
    hi = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    lo = lo.reshape(seg.shape[0], nblocks, block).min(-1)
    hi = hi.reshape(seg.shape[0], nblocks, block).max(-1)
    return lo, hi

  q_lo, q_hi = ranges(q_seg, bq, nq)
  k_lo, k_hi = ranges(kv_seg, bk, nk)
  return (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])


def plan_block_lists(
  masks: Sequence[Mask],
  *,
  t: int,
  s: int,
  q_offset: int,
  bq: int,
  bk: int,
  num_kv_heads: int,
  block_indices: jax.Array | None,
  block_size: tuple[int, int],
  segment_ids: tuple[jax.Array, jax.Array] | None,
) -> tuple[BlockLists, BlockLists]:
  """Builds the kv lists (per query block) and q lists (per key block).

  Args:
    masks: one Mask per query head (H).
    t, s: real (unpadded) T and S.
    q_offset: key position of query row 0.
    bq, bk: kernel block sizes.
    num_kv_heads: K.
    block_indices: optional int32 ``[B, K, ceil(T / block_size[0]), n]``, -1 = empty.
    block_size: the blocks ``block_indices`` refers to.
    segment_ids: optional ``([B, T], [B, S])`` int32.

  Returns:
    ``(kv_lists, q_lists)``: kv lists have rows = query blocks and ids = key blocks; q lists the
    other way round.
  """
  num_heads = len(masks)
  groups = head_groups(masks)
  group_of = np.zeros(num_heads, dtype=np.int32)
  for g, (_, heads) in enumerate(groups):
    group_of[heads] = g
  vis = np.stack(
    [block_visibility(m, t=t, s=s, q_offset=q_offset, bq=bq, bk=bk) for m, _ in groups]
  )  # [Hm, nq, nk]
  nq, nk = vis.shape[1:]
  # List lengths are static: the worst row under the masks (>= 1 so grids are never empty).
  n_kv = max(int(vis.sum(-1).max()), 1)
  n_q = max(int(vis.sum(-2).max()), 1)
  if block_indices is None and segment_ids is None:
    kv_ids, kv_cnt = _compact_np(vis, n_kv)
    q_ids, q_cnt = _compact_np(vis.swapaxes(-1, -2), n_q)
    return (
      BlockLists(kv_ids[None], kv_cnt[None], group_of, kv_cnt[group_of], group_of),
      BlockLists(q_ids[None], q_cnt[None], group_of, q_cnt[group_of], group_of),
    )
  dense = jnp.asarray(vis)[None]  # [1, Hm, nq, nk]
  head_map = group_of
  kv_bound = vis.sum(-1)[group_of]  # [H, nq]
  q_bound = vis.sum(-2)[group_of]  # [H, nk]
  if block_indices is not None:
    listed = _block_indices_dense(
      block_indices, nq=nq, nk=nk, bq=bq, bk=bk, block_size=block_size
    )  # [B, K, nq, nk]
    per_head = num_heads // num_kv_heads
    kv_groups = group_of.reshape(num_kv_heads, per_head)
    if (kv_groups == kv_groups[:, :1]).all():  # one Mask per kv head: one list per kv head
      dense = dense[:, kv_groups[:, 0]] & listed  # [B, K, nq, nk]
      head_map = np.repeat(np.arange(num_kv_heads, dtype=np.int32), per_head)
    else:
      dense = dense[:, group_of] & jnp.repeat(listed, per_head, axis=1)  # [B, H, nq, nk]
      head_map = np.arange(num_heads, dtype=np.int32)
    listed_cols = block_indices.shape[-1] * (block_size[1] // bk)
    n_kv = max(min(n_kv, listed_cols), 1)
    kv_bound = np.minimum(kv_bound, listed_cols)
  if segment_ids is not None:
    dense = dense & _segment_dense(segment_ids, bq=bq, bk=bk, nq=nq, nk=nk)[:, None]
  kv_ids, kv_cnt = _compact_jnp(dense, n_kv)
  q_ids, q_cnt = _compact_jnp(dense.swapaxes(-1, -2), n_q)
  return (
    BlockLists(kv_ids, kv_cnt, head_map, kv_bound, group_of),
    BlockLists(q_ids, q_cnt, head_map, q_bound, group_of),
  )


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def check_inputs(q, k, v, masks, segment_ids, block_indices, q_offset) -> None:
  """Shape/dtype checks every kernel needs; raises NotSupportedError/ValueError."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T|S, H|K, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, _, h, d = q.shape
  if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[-1] != d:
    raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"H={h} is not a multiple of K={k.shape[2]}")
  if len(masks) != h:
    raise ValueError(f"need one Mask per query head: {len(masks)} masks for H={h}")
  for x in (q, k, v):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise NotSupportedError(f"dtype {x.dtype} (kernels take float32, bfloat16, float16)")
  if not q.dtype == k.dtype == v.dtype:
    raise NotSupportedError(f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}")
  if segment_ids is not None and (
    segment_ids[0].shape != q.shape[:2] or segment_ids[1].shape != k.shape[:2]
  ):
    raise ValueError("segment_ids must be ([B, T], [B, S])")
  if block_indices is not None and block_indices.ndim != 4:
    raise ValueError(f"block_indices must be [B, K, nq, n], got {block_indices.shape}")
  if not isinstance(q_offset, (int, np.integer)):
    raise NotSupportedError("q_offset must be a static int for the Pallas kernels")


@dataclasses.dataclass(frozen=True)
class CallPlan:
  """What both platforms derive from one call before building their kernels' operands.

  Attributes:
    kv_lists: per query block, the key blocks to visit (``plan_block_lists``).
    q_lists: per key block, the query blocks to visit.
    mask: ``mask_params`` of the Mask every head shares, or None (kernels read ``mask_table``).
    mask_table: int32 numpy ``[H, 4]``.
    q_segments: None or int32 ``[B, Tp]`` segment ids, zero-padded (padded rows are dropped).
    kv_segments: None or int32 ``[B, Sp]`` (padded keys are hidden by ``visible``).
    tp: T padded to a multiple of ``bq``.
    sp: S padded to a multiple of ``bk``.
  """

  kv_lists: BlockLists
  q_lists: BlockLists
  mask: tuple | None
  mask_table: np.ndarray
  q_segments: jax.Array | None
  kv_segments: jax.Array | None
  tp: int
  sp: int


def plan_call(q, k, masks, segment_ids, q_offset, block_indices, block_size, bq, bk) -> CallPlan:
  """Block lists, static mask and padded segment ids for a checked call (``check_inputs``).

  Args:
    q: ``[B, T, H, D]``.
    k: ``[B, S, K, D]``.
    masks: one Mask per query head.
    segment_ids: None or ``([B, T], [B, S])`` int.
    q_offset: static key position of query row 0.
    block_indices: None or int32 ``[B, K, ceil(T / block_size[0]), n]``.
    block_size: the blocks ``block_indices`` refers to.
    bq: kernel query block.
    bk: kernel key block.
  """
  t, s, kh = q.shape[1], k.shape[1], k.shape[2]
  tp, sp = round_up(t, bq), round_up(s, bk)
  kv_lists, q_lists = plan_block_lists(
    masks,
    t=t,
    s=s,
    q_offset=int(q_offset),
    bq=bq,
    bk=bk,
    num_kv_heads=kh,
    block_indices=block_indices,
    block_size=tuple(block_size),
    segment_ids=segment_ids,
  )
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg = jnp.pad(segment_ids[0].astype(jnp.int32), ((0, 0), (0, tp - t)))
    kv_seg = jnp.pad(segment_ids[1].astype(jnp.int32), ((0, 0), (0, sp - s)))
  same = all(m == masks[0] for m in masks)
  mask = mask_params(masks[0]) if same else None
  return CallPlan(kv_lists, q_lists, mask, mask_table(masks), q_seg, kv_seg, tp, sp)


def flash_vjp(fwd_call: Callable, dq_call: Callable, dkv_call: Callable, delta: Callable):
  """The ``custom_vjp`` around a platform's forward, dq and dk/dv kernels.

  The residuals are the inputs, ``o`` and ``lse``; the backward folds the ``lse`` cotangent into
  the softmax's row term (``d lse / d s = p``, so ``ds = p * (dp - (delta - dlse))``).

  Args:
    fwd_call: ``(st, q, k, v, qseg, kseg, kv_plan) -> (o, lse)``.
    dq_call: ``(st, q, k, v, do, lse, dl, qseg, kseg, kv_plan) -> dq``.
    dkv_call: ``(st, q, k, v, do, lse, dl, qseg, kseg, q_plan) -> (dk, dv)``.
    delta: ``(o, do)`` float32 -> the row sums of ``o * do`` in the layout of ``lse``.

  Returns:
    ``flash(st, q, k, v, qseg, kseg, kv_plan, q_plan) -> (o, lse)``, differentiable in
    ``q, k, v``; ``st`` is static (hashable), the rest are arrays or tuples of int arrays.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(st, q, k, v, qseg, kseg, kv_plan, q_plan):
    return fwd_call(st, q, k, v, qseg, kseg, kv_plan)

  def flash_fwd(st, q, k, v, qseg, kseg, kv_plan, q_plan):
    o, lse = fwd_call(st, q, k, v, qseg, kseg, kv_plan)
    return (o, lse), (q, k, v, qseg, kseg, kv_plan, q_plan, o, lse)

  def flash_bwd(st, res, cts):
    q, k, v, qseg, kseg, kv_plan, q_plan, o, lse = res
    do, dlse = cts
    dl = delta(o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    do = do.astype(q.dtype)
    dq = dq_call(st, q, k, v, do, lse, dl, qseg, kseg, kv_plan)
    dk, dv = dkv_call(st, q, k, v, do, lse, dl, qseg, kseg, q_plan)
    nones = lambda xs: tuple(None for _ in xs)
    return dq, dk, dv, None, None, nones(kv_plan), nones(q_plan)

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
