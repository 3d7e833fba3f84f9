"""Flash attention for TPU (Pallas Mosaic), forward and backward, with block skipping.

Layout inside the kernels is ``[B, H, T, D]`` (heads before time, so a block's last two dims are
``(rows, D)`` as Mosaic tiles want). Softmax statistics are float32. Per-row statistics (lse,
delta) live in HBM as rows ``[B, H, 1, T]`` rather than lane-replicated columns: the dk/dv
kernel works in the transposed orientation (``s^T = k q^T``, keys on sublanes) where a row is
what it needs; the forward and dq kernels transpose once per query block.

Only tiles that can hold a visible (query, key) pair are visited. The planned block lists
(``pallas_common.plan_block_lists``) are flattened into one schedule per head
(``pallas_common.flat_schedule``): the grid is ``(B, heads, P)`` and step ``p`` reads its output
row, input block and flags (compute / first / last of row) from scalar prefetch, so a sink+window
mask costs O(T x window) grid steps, with no padding steps for ragged rows (causal, sinks).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.attention import pallas_common as pc
from ops.attention import pallas_schedule as ps
from ops.attention.mask import Mask
from ops.common.dispatch import NotSupportedError

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block sizes (forward and backward use the same tiling).

  On hardware both must be multiples of 128 (lane width; the MXU is 128 or 256 wide) unless a
  block covers the whole padded length. 256 x 256 halves the grid steps of 128 x 128 on
  v5e/v6e while keeping s/p tiles (256 x 256 f32 = 256 KiB) well inside VMEM.
  """

  block_q: int = 256
  block_k: int = 256


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""

  mask: tuple | None  # mask_params when all heads share one Mask, else None (table lookup)
  q_offset: int
  num_keys: int  # real S; keys beyond are padding
  bq: int
  bk: int
  kv_steps: int  # grid steps per query head (forward, dq)
  q_steps: int  # grid steps per kv head (dk/dv)
  kv_per_batch: bool
  q_per_batch: bool
  kv_owners: int
  q_owners: int
  groups: int  # H // K
  scale: float
  has_segments: bool
  interpret: object


def _mask_params(st: _Static, mtbl_ref, h):
  if st.mask is not None:
    return st.mask
  return tuple(mtbl_ref[h * 4 + c] for c in range(4))


def _step(per_batch: bool, owners: int, steps: int, omap_ref, b, x, p):
  """Offset of step ``p`` of head ``x`` in the packed ``[Lb, O, P, (row, block, meta)]``."""
  bb = b if per_batch else 0
  return ((bb * owners + omap_ref[x]) * steps + p) * 3


def _row_to_col(x):
  """(1, n) -> (n, LANES) lane-replicated; a plain 2D transpose Mosaic supports."""
  return jnp.broadcast_to(x, (LANES, x.shape[1])).T


def _flags(meta):
  return (meta & 1) == 1, ((meta >> 1) & 1) == 1, ((meta >> 2) & 1) == 1


def _tile_visible(st: _Static, mtbl_ref, h, qi, kb, segs, *, keys_major: bool):
  """bool ``[bq, bk]`` (``[bk, bq]`` if keys_major) visibility inside tile (qi, kb).

  ``segs``: None or (segment ids of the tile's sublane side as a lane-replicated column
  ``[n, LANES]`` ref, ids of its lane side as a ``[1, m]`` row ref).
  """
  shape, qa = ((st.bk, st.bq), 1) if keys_major else ((st.bq, st.bk), 0)
  q_pos = st.q_offset + qi * st.bq + lax.broadcasted_iota(jnp.int32, shape, qa)
  k_pos = kb * st.bk + lax.broadcasted_iota(jnp.int32, shape, 1 - qa)
  vis = pc.visible(q_pos, k_pos, _mask_params(st, mtbl_ref, h), st.num_keys)
  if segs is not None:
    vis = vis & (segs[0][...][:, :1] == segs[1][...])
  return vis


# Forward kernel. Grid (B, H, P): the flattened schedule of (query block, key block) steps.
# Scalar prefetch: rows, blocks, meta, owner map, mask table.
def _fwd_kernel(sched_ref, omap_ref, mtbl_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
  seg_refs, refs = (refs[:2], refs[2:]) if st.has_segments else (None, refs)
  o_ref, lse_ref, m_scr, l_scr, acc_scr, *seg_scr = refs
  segs = (seg_scr[0], seg_refs[1]) if st.has_segments else None
  b, h, p = (pl.program_id(i) for i in range(3))
  idx = _step(st.kv_per_batch, st.kv_owners, st.kv_steps, omap_ref, b, h, p)
  compute, first, last = _flags(sched_ref[idx + 2])

  @pl.when(first)
  def _init():
    if st.has_segments:  # query ids as a column, transposed once per query block
      seg_scr[0][...] = _row_to_col(seg_refs[0][...])
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(compute)
  def _compute():
    q = q_ref[...]  # [bq, D]
    k = k_ref[...]  # [bk, D]
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
    vis = _tile_visible(st, mtbl_ref, h, sched_ref[idx], sched_ref[idx + 1], segs, keys_major=False)
    s = jnp.where(vis, s, -jnp.inf)
    m_prev = m_scr[...]  # [bq, LANES], lanes replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing visible yet keeps m = -inf; shift by 0 so exp() gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, :1])  # [bq, bk]
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv
    m_scr[...] = m_new

  @pl.when(last)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0  # no visible key: output 0, lse -inf
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / l_safe[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(l_safe))  # [bq, LANES]
    lse_ref[...] = lse.T[:1, :]  # [1, bq]


# dq kernel. Same grid and schedule as the forward.
def _dq_kernel(sched_ref, omap_ref, mtbl_ref, q_ref, k_ref, v_ref, do_ref, *refs, st: _Static):
  lse_ref, dl_ref, refs = refs[0], refs[1], refs[2:]  # [1, bq] rows
  seg_refs, refs = (refs[:2], refs[2:]) if st.has_segments else (None, refs)
  dq_ref, lse_scr, dl_scr, acc_scr, *seg_scr = refs
  segs = (seg_scr[0], seg_refs[1]) if st.has_segments else None
  b, h, p = (pl.program_id(i) for i in range(3))
  idx = _step(st.kv_per_batch, st.kv_owners, st.kv_steps, omap_ref, b, h, p)
  compute, first, last = _flags(sched_ref[idx + 2])

  @pl.when(first)
  def _init():
    if st.has_segments:
      seg_scr[0][...] = _row_to_col(seg_refs[0][...])
    lse_scr[...] = _row_to_col(lse_ref[...])
    dl_scr[...] = _row_to_col(dl_ref[...])
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(compute)
  def _compute():
    k = k_ref[...]  # [bk, D]
    s = lax.dot_general(q_ref[...], k, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
    vis = _tile_visible(st, mtbl_ref, h, sched_ref[idx], sched_ref[idx + 1], segs, keys_major=False)
    p = jnp.where(vis, jnp.exp(s - lse_scr[...][:, :1]), 0.0)  # [bq, bk]
    dp = lax.dot_general(do_ref[...], v_ref[...], NT_DIMS, preferred_element_type=jnp.float32)
    ds = p * (dp - dl_scr[...][:, :1])
    acc_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(last)
  def _finish():
    dq_ref[...] = (acc_scr[...] * st.scale).astype(dq_ref.dtype)


# dk/dv kernel. Grid (B, K, P, G): per kv head, a schedule of (key block, query block) steps,
# key-block major, and at each step the G query heads sharing the kv head. Transposed
# orientation (s^T = k q^T, keys on sublanes) so the lse/delta rows broadcast as they are.
def _dkv_kernel(sched_ref, omap_ref, mtbl_ref, q_ref, k_ref, v_ref, do_ref, *refs, st: _Static):
  lse_ref, dl_ref, refs = refs[0], refs[1], refs[2:]  # [1, bq] rows
  seg_refs, refs = (refs[:2], refs[2:]) if st.has_segments else (None, refs)
  dk_ref, dv_ref, dk_scr, dv_scr, *seg_scr = refs
  # Keys on sublanes: key ids as a column (once per key block), query ids as rows.
  segs = (seg_scr[0], seg_refs[0]) if st.has_segments else None
  b, kh, p, g = (pl.program_id(i) for i in range(4))
  idx = _step(st.q_per_batch, st.q_owners, st.q_steps, omap_ref, b, kh, p)
  compute, first, last = _flags(sched_ref[idx + 2])

  @pl.when(first & (g == 0))
  def _init():
    if st.has_segments:
      seg_scr[0][...] = _row_to_col(seg_refs[1][...])
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(compute)
  def _compute():
    q = q_ref[...]  # [bq, D]
    do = do_ref[...]  # [bq, D]
    s_t = lax.dot_general(k_ref[...], q, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
    h = kh * st.groups + g
    qb, kb = sched_ref[idx + 1], sched_ref[idx]
    vis = _tile_visible(st, mtbl_ref, h, qb, kb, segs, keys_major=True)
    p_t = jnp.where(vis, jnp.exp(s_t - lse_ref[...]), 0.0)  # [bk, bq]
    dv_scr[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v_ref[...], do, NT_DIMS, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - dl_ref[...])
    dk_scr[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(last & (g == st.groups - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _prefetch(sched: ps.FlatSchedule, mtbl):
  """Scalar prefetch: packed schedule ``[Lb * O * P * 3]``, owner map, mask table."""
  packed = jnp.stack([jnp.asarray(x, jnp.int32) for x in (sched.rows, sched.blocks, sched.meta)])
  return jnp.moveaxis(packed, 0, -1).reshape(-1), jnp.asarray(sched.owner_map, jnp.int32), mtbl


def _seg_scratch(st: _Static, rows: int):
  """int32 ``[rows, LANES]`` for the segment ids of a kernel's output block, as a column."""
  return [pltpu.VMEM((rows, LANES), jnp.int32)] if st.has_segments else []


def _query_scratch(st: _Static, width: int):
  """Forward/dq scratch: two f32 ``[bq, LANES]`` row statistics (lane-replicated), the f32
  ``[bq, width]`` accumulator, and the query segment ids if any."""
  f32 = jnp.float32
  stats = [pltpu.VMEM((st.bq, LANES), f32), pltpu.VMEM((st.bq, LANES), f32)]
  return [*stats, pltpu.VMEM((st.bq, width), f32), *_seg_scratch(st, st.bq)]


# Forward and dq grids (B, H, P): a query head's steps run in order (they share accumulators).
_QUERY_GRID = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _fwd_maps(st: _Static):
  """Index maps of the (B, H, P) grids (forward, dq); scalar prefetch refs come last."""

  def at(b_, h_, p, sched, omap, mtbl):  # (query block, key block) of a step
    i = _step(st.kv_per_batch, st.kv_owners, st.kv_steps, omap, b_, h_, p)
    return sched[i], sched[i + 1]

  return dict(
    q=lambda b_, h_, p, *pf: (b_, h_, at(b_, h_, p, *pf)[0], 0),
    kv=lambda b_, h_, p, *pf: (b_, lax.div(h_, st.groups), at(b_, h_, p, *pf)[1], 0),
    row=lambda b_, h_, p, *pf: (b_, h_, 0, at(b_, h_, p, *pf)[0]),
    qseg=lambda b_, h_, p, *pf: (b_, 0, at(b_, h_, p, *pf)[0]),
    kseg=lambda b_, h_, p, *pf: (b_, 0, at(b_, h_, p, *pf)[1]),
  )


def _in_specs(st: _Static, d: int, dv: int, maps, *, backward: bool):
  """Input specs: q, k, v, then (backward) do, lse, delta, then the segment ids if any."""
  bq, bk = st.bq, st.bk
  specs = [
    pl.BlockSpec((None, None, bq, d), maps["q"]),
    pl.BlockSpec((None, None, bk, d), maps["kv"]),
    pl.BlockSpec((None, None, bk, dv), maps["kv"]),
  ]
  if backward:
    specs += [
      pl.BlockSpec((None, None, bq, dv), maps["q"]),
      pl.BlockSpec((None, None, 1, bq), maps["row"]),
      pl.BlockSpec((None, None, 1, bq), maps["row"]),
    ]
  if st.has_segments:
    specs += [pl.BlockSpec((None, 1, bq), maps["qseg"]), pl.BlockSpec((None, 1, bk), maps["kseg"])]
  return specs


def _operands(st: _Static, qseg, kseg, *xs):
  return [*xs, qseg, kseg] if st.has_segments else list(xs)


def _fwd_call(st: _Static, q, k, v, qseg, kseg, kv_pf):
  """q ``[B, H, Tp, D]``, k/v ``[B, K, Sp, D]`` -> o ``[B, H, Tp, D]``, lse ``[B, H, 1, Tp]``."""
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  bq = st.bq
  maps = _fwd_maps(st)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=3,
    grid=(b, h, st.kv_steps),
    in_specs=_in_specs(st, d, dv, maps, backward=False),
    out_specs=[
      pl.BlockSpec((None, None, bq, dv), maps["q"]),
      pl.BlockSpec((None, None, 1, bq), maps["row"]),
    ],
    scratch_shapes=_query_scratch(st, dv),
  )
  return pl.pallas_call(
    functools.partial(_fwd_kernel, st=st),
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype),
      jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32),
    ],
    compiler_params=_QUERY_GRID,
    interpret=st.interpret,
    name="flash_attention_fwd",
  )(*kv_pf, *_operands(st, qseg, kseg, q, k, v))


def _dq_call(st: _Static, q, k, v, do, lse, dl, qseg, kseg, kv_pf):
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  bq = st.bq
  maps = _fwd_maps(st)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=3,
    grid=(b, h, st.kv_steps),
    in_specs=_in_specs(st, d, dv, maps, backward=True),
    out_specs=pl.BlockSpec((None, None, bq, d), maps["q"]),
    scratch_shapes=_query_scratch(st, d),
  )
  return pl.pallas_call(
    functools.partial(_dq_kernel, st=st),
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_QUERY_GRID,
    interpret=st.interpret,
    name="flash_attention_dq",
  )(*kv_pf, *_operands(st, qseg, kseg, q, k, v, do, lse, dl))


def _dkv_maps(st: _Static):
  """Index maps of the (B, K, P, G) grid (dk/dv), where a step is (key block, query block)."""
  g = st.groups

  def at(b_, kh_, p, sched, omap, mtbl):
    i = _step(st.q_per_batch, st.q_owners, st.q_steps, omap, b_, kh_, p)
    return sched[i], sched[i + 1]

  return dict(
    q=lambda b_, kh_, p, g_, *pf: (b_, kh_ * g + g_, at(b_, kh_, p, *pf)[1], 0),
    kv=lambda b_, kh_, p, g_, *pf: (b_, kh_, at(b_, kh_, p, *pf)[0], 0),
    row=lambda b_, kh_, p, g_, *pf: (b_, kh_ * g + g_, 0, at(b_, kh_, p, *pf)[1]),
    qseg=lambda b_, kh_, p, g_, *pf: (b_, 0, at(b_, kh_, p, *pf)[1]),
    kseg=lambda b_, kh_, p, g_, *pf: (b_, 0, at(b_, kh_, p, *pf)[0]),
  )


def _dkv_call(st: _Static, q, k, v, do, lse, dl, qseg, kseg, q_pf):
  d = q.shape[-1]
  b, kh, _, dv = v.shape
  bk, g = st.bk, st.groups
  maps = _dkv_maps(st)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=3,
    grid=(b, kh, st.q_steps, g),
    in_specs=_in_specs(st, d, dv, maps, backward=True),
    out_specs=[
      pl.BlockSpec((None, None, bk, d), maps["kv"]),
      pl.BlockSpec((None, None, bk, dv), maps["kv"]),
    ],
    scratch_shapes=[
      pltpu.VMEM((bk, d), jnp.float32),
      pltpu.VMEM((bk, dv), jnp.float32),
      *_seg_scratch(st, bk),
    ],
  )
  return pl.pallas_call(
    functools.partial(_dkv_kernel, st=st),
    grid_spec=grid_spec,
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
    ),
    interpret=st.interpret,
    name="flash_attention_dkv",
  )(*q_pf, *_operands(st, qseg, kseg, q, k, v, do, lse, dl))


# o, do are [B, H, Tp, D]; lse rows are [B, H, 1, Tp].
_flash = pc.flash_vjp(
  _fwd_call, _dq_call, _dkv_call, lambda o, do: jnp.sum(o * do, axis=-1)[:, :, None, :]
)


def _choose_blocks(bs: BlockSizes, t, s, block_indices, block_size, interpret):
  bq, bk = bs.block_q, bs.block_k
  if block_indices is not None:
    # Kernel blocks must tile the blocks block_indices refers to.
    bq, bk = np.gcd(bq, block_size[0]), np.gcd(bk, block_size[1])
  # Small inputs: one block covering the whole (8-row aligned) length.
  bq, bk = int(min(bq, pc.round_up(t, 8))), int(min(bk, pc.round_up(s, 8)))
  if not interpret:
    tp, sp = pc.round_up(t, bq), pc.round_up(s, bk)
    if (bq % LANES and bq != tp) or (bk % LANES and bk != sp) or bq % 8 or bk % 8:
      raise NotSupportedError(
        f"TPU blocks ({bq}, {bk}) must be multiples of 128 (or cover the padded length)"
      )
  return bq, bk


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  masks: Sequence[Mask],
  segment_ids: tuple[jax.Array, jax.Array] | None,
  q_offset: int,
  block_indices: jax.Array | None,
  block_size: tuple[int, int],
  scale: float,
  interpret: bool,
  block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Flash attention on TPU with a Pallas backward (see module docstring).

  Args:
    q: ``[B, T, H, D]``.
    k: ``[B, S, K, D]``, ``H % K == 0`` (query head ``h`` reads kv head ``h // (H // K)``).
    v: ``[B, S, K, V]``.
    masks: one Mask per query head.
    segment_ids: optional ``([B, T], [B, S])`` int32; different ids never see each other.
    q_offset: key position of query row 0.
    block_indices: optional int32 ``[B, K, ceil(T / block_size[0]), n]`` key blocks per query
      block (-1 = empty), in blocks of ``block_size``.
    block_size: ``(bq, bk)`` of ``block_indices``.
    scale: logit scale.
    interpret: run in Pallas interpret mode on CPU. ``True`` is the generic interpreter (it
      NaN-fills outputs, scratch and padding); a ``pltpu.InterpretParams`` selects the slower
      TPU simulator (uninitialised memory, out-of-bounds reads, races).
    block_sizes: kernel tiling; defaults to :class:`BlockSizes`.

  Returns:
    ``(o [B, T, H, V], lse [B, T, H] float32)``; a query with no visible key gets 0 and -inf.
  """
  masks = tuple(masks)
  pc.check_inputs(q, k, v, masks, segment_ids, block_indices, q_offset)
  b, t, h, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  bq, bk = _choose_blocks(
    block_sizes or BlockSizes(), t, s, block_indices, block_size, bool(interpret)
  )
  plan = pc.plan_call(q, k, masks, segment_ids, q_offset, block_indices, block_size, bq, bk)
  kv_sched = ps.flat_schedule(plan.kv_lists, 1, plan.sp // bk)
  q_sched = ps.flat_schedule(plan.q_lists, h // kh, plan.tp // bq)
  st = _Static(
    mask=plan.mask,
    q_offset=int(q_offset),
    num_keys=s,
    bq=bq,
    bk=bk,
    kv_steps=kv_sched.steps,
    q_steps=q_sched.steps,
    kv_per_batch=kv_sched.per_batch,
    q_per_batch=q_sched.per_batch,
    kv_owners=kv_sched.num_owners,
    q_owners=q_sched.num_owners,
    groups=h // kh,
    scale=float(scale),
    has_segments=segment_ids is not None,
    interpret=interpret,
  )
  mtbl = jnp.asarray(plan.mask_table.reshape(-1))

  def to_kernel(x, n):  # [B, T, H, D] -> [B, H, Tp, D]
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  # Segment ids as [B, 1, L] rows: a block's last two dims are then (1, rows).
  row = lambda x: None if x is None else x[:, None]
  o, lse = _flash(
    st,
    to_kernel(q, plan.tp),
    to_kernel(k, plan.sp),
    to_kernel(v, plan.sp),
    row(plan.q_segments),
    row(plan.kv_segments),
    _prefetch(kv_sched, mtbl),
    _prefetch(q_sched, mtbl),
  )
  return o.transpose(0, 2, 1, 3)[:, :t], lse[:, :, 0, :t].transpose(0, 2, 1)
