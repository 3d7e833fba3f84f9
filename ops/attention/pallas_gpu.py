"""Flash attention for GPU (Pallas Triton lowering), forward and backward, with block skipping.

Layout stays ``[B, T, H, D]``; D is zero-padded to a power of two (Triton tiles are powers of
two; zero columns change neither scores nor the kept part of the output). One program owns a
query block (forward, dq) or a key block (dk/dv) and loops with ``lax.fori_loop`` over its list
of possibly visible blocks (``pallas_common.plan_block_lists``); K/V (or Q/dO) of the whole
sequence are addressable from the program and only listed blocks are loaded.

The dk/dv program of kv head ``kh`` also loops over the ``G = H // K`` query heads sharing it, so
GQA gradients are summed in registers and K/V are never repeated.
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
from jax.experimental.pallas import triton as plgpu

from ops.attention import pallas_common as pc
from ops.attention.mask import Mask
from ops.common.dispatch import NotSupportedError

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query/key block sizes (powers of two >= 16) and Triton launch parameters.

  Given explicitly, one setting serves the forward and both backward kernels. By default
  (``attention(block_sizes=None)``) the blocks come from :data:`BLOCKS_BY_HEAD_DIM` and the
  warps and stages of each kernel from :data:`LAUNCH_BY_HEAD_DIM`.
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


# Padded head dim -> (block_q, block_k), shared by the three kernels (their block lists are
# planned once). Small heads take 128 query rows per program (more work per K/V load); at
# D = 128 a 64 x 64 tile keeps the f32 scores and the accumulators of a program in registers
# with 4-8 warps; at D = 256 the key block halves, since the dk/dv program holds two [bk, D]
# f32 accumulators and the q/do tiles at once. tests/ops/test_kernel_footprint.py checks each
# against the 227 KiB of shared memory per block of H100/H200.
BLOCKS_BY_HEAD_DIM = {16: (128, 64), 32: (128, 64), 64: (128, 64), 128: (64, 64), 256: (64, 32)}
# Padded head dim -> ((warps, stages) of forward, dq, dkv). The forward streams K/V through
# the loop (3 stages where the tiles are small); the backward kernels hold more live tiles per
# iteration, so 2 stages, and 8 warps from D = 128 on to spread their accumulators.
LAUNCH_BY_HEAD_DIM = {
  16: ((4, 3), (4, 2), (4, 2)),
  32: ((4, 3), (4, 2), (4, 2)),
  64: ((4, 3), (4, 2), (4, 2)),
  128: ((4, 2), (8, 2), (8, 2)),
  256: ((8, 1), (8, 1), (8, 1)),
}


def default_block_sizes(
  dp: int, itemsize: int = 2
) -> tuple[BlockSizes, tuple[tuple[int, int], ...]]:
  """``(blocks, ((warps, stages) of fwd, dq, dkv))`` for padded head dim ``dp`` (a power of
  two >= 16; wider heads use the D = 256 row). The table is for 2-byte inputs; a float32 head
  of D takes the row of 2D, whose tiles have the same bytes."""
  key = min(max(dp * max(1, itemsize // 2), 16), 256)
  bq, bk = BLOCKS_BY_HEAD_DIM[key]
  launch = LAUNCH_BY_HEAD_DIM[key]
  return BlockSizes(bq, bk, *launch[0]), launch


@dataclasses.dataclass(frozen=True)
class _Static:
  mask: tuple | None  # mask_params when all heads share a Mask, else None (table lookup)
  q_offset: int
  num_keys: int
  bq: int
  bk: int
  groups: int
  scale: float
  has_segments: bool
  kv_per_batch: bool
  q_per_batch: bool
  launch: tuple  # (warps, stages) of the forward, dq and dkv kernels
  interpret: bool


def _params(st: _Static, mtbl_ref, g=None):
  if st.mask is not None:
    return st.mask
  if g is None:
    return tuple(mtbl_ref[c] for c in range(4))
  return tuple(mtbl_ref[g, c] for c in range(4))


# Forward. Grid (nq, B, H); one program = one query block of one head.
def _fwd_kernel(ids_ref, cnt_ref, mtbl_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
  if st.has_segments:
    qseg_ref, kseg_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  qi = pl.program_id(0)
  bq, bk = st.bq, st.bk
  q = q_ref[...]  # [bq, Dp]
  q_pos = st.q_offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  params = _params(st, mtbl_ref)
  q_seg = qseg_ref[...] if st.has_segments else None  # [bq]

  def body(j, carry):
    acc, m_prev, l_prev = carry
    kb = ids_ref[j]
    keys = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[keys, :]  # [bk, Dp]
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
    k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    vis = pc.visible(q_pos, k_pos, params, st.num_keys)
    if st.has_segments:
      vis = vis & (q_seg[:, None] == kseg_ref[keys][None, :])
    s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # Rows with nothing visible yet keep m = -inf; shift by 0 so exp() gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, None])  # [bq, bk]
    v = v_ref[keys, :]
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, alpha * l_prev + jnp.sum(p, axis=1)

  init = (
    jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(0, cnt_ref[0], body, init)
  empty = l == 0.0  # no visible key: output 0, lse -inf
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


# dq. Grid (nq, B, H), same lists as the forward.
def _dq_kernel(
  ids_ref, cnt_ref, mtbl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, st: _Static
):
  if st.has_segments:
    qseg_ref, kseg_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  qi = pl.program_id(0)
  bq, bk = st.bq, st.bk
  q, do = q_ref[...], do_ref[...]  # [bq, Dp]
  lse, dl = lse_ref[...], dl_ref[...]  # [bq]
  q_pos = st.q_offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  params = _params(st, mtbl_ref)
  q_seg = qseg_ref[...] if st.has_segments else None

  def body(j, acc):
    kb = ids_ref[j]
    keys = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[keys, :]
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
    k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    vis = pc.visible(q_pos, k_pos, params, st.num_keys)
    if st.has_segments:
      vis = vis & (q_seg[:, None] == kseg_ref[keys][None, :])
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    dp = lax.dot_general(do, v_ref[keys, :], NT_DIMS, preferred_element_type=jnp.float32)
    ds = p * (dp - dl[:, None])
    return acc + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc * st.scale).astype(dq_ref.dtype)


# dk/dv. Grid (nk, B, K); loops over the G query heads of kv head kh, then their query blocks.
def _dkv_kernel(
  ids_ref, cnt_ref, mtbl_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, st: _Static
):
  if st.has_segments:
    qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  ki = pl.program_id(0)
  bq, bk = st.bq, st.bk
  k, v = k_ref[...], v_ref[...]  # [bk, Dp]
  k_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
  k_seg = kseg_ref[...] if st.has_segments else None  # [bk]

  def head(g, carry):
    params = _params(st, mtbl_ref, g)

    def body(j, carry):
      dk, dv = carry
      qb = ids_ref[g, j]
      rows = pl.ds(pl.multiple_of(qb * bq, bq), bq)
      q = q_ref[rows, g, :]  # [bq, Dp]
      do = do_ref[rows, g, :]
      s_t = lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32) * st.scale
      q_pos = st.q_offset + qb * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
      vis = pc.visible(q_pos, k_pos, params, st.num_keys)
      if st.has_segments:
        vis = vis & (k_seg[:, None] == qseg_ref[rows][None, :])
      p_t = jnp.where(vis, jnp.exp(s_t - lse_ref[g, rows][None, :]), 0.0)  # [bk, bq]
      dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dp_t = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
      ds_t = p_t * (dp_t - dl_ref[g, rows][None, :])
      dk = dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
      return dk, dv

    return lax.fori_loop(0, cnt_ref[g, 0], body, carry)

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, st.groups, head, zeros)
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


_KERNELS = ("fwd", "dq", "dkv")


def _compiler_params(st: _Static, kernel: str):
  warps, stages = st.launch[_KERNELS.index(kernel)]
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _q_rows(i, b_, h_):  # the [bq, Dp] tile of query block i, head h_
  return b_, i, h_, 0


def _q_stats(i, b_, h_):  # the [bq] softmax statistics of query block i, head h_
  return b_, h_, i


def _q_block_specs(st: _Static, sp: int, dp: int, n2: int, *, backward: bool):
  """Input specs of the (nq, B, H) programs: lists, mask table, q, k, v, then (backward) do,
  lse, delta, then the segment ids if any."""
  g, lb = st.groups, st.kv_per_batch
  kv_map = lambda i, b_, h_: (b_, 0, lax.div(h_, g), 0)
  specs = [
    pl.BlockSpec((None, None, None, n2), lambda i, b_, h_: (b_ if lb else 0, h_, i, 0)),
    pl.BlockSpec((None, None, 1), lambda i, b_, h_: (b_ if lb else 0, h_, i)),
    pl.BlockSpec((None, 4), lambda i, b_, h_: (h_, 0)),
    pl.BlockSpec((None, st.bq, None, dp), _q_rows),
    pl.BlockSpec((None, sp, None, dp), kv_map),
    pl.BlockSpec((None, sp, None, dp), kv_map),
  ]
  if backward:
    specs += [
      pl.BlockSpec((None, st.bq, None, dp), _q_rows),
      pl.BlockSpec((None, None, st.bq), _q_stats),
      pl.BlockSpec((None, None, st.bq), _q_stats),
    ]
  if st.has_segments:
    specs += [
      pl.BlockSpec((None, st.bq), lambda i, b_, h_: (b_, i)),
      pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0)),
    ]
  return specs


def _operands(st: _Static, qseg, kseg, *xs):
  return [*xs, qseg, kseg] if st.has_segments else list(xs)


def _fwd_call(st: _Static, q, k, v, qseg, kseg, kv_lists):
  """q ``[B, Tp, H, Dp]``, k/v ``[B, Sp, K, Dp]`` -> o like q, lse ``[B, H, Tp]`` float32."""
  b, tp, h, dp = q.shape
  ids, cnt, mtbl = kv_lists
  return pl.pallas_call(
    functools.partial(_fwd_kernel, st=st),
    grid=(tp // st.bq, b, h),
    in_specs=_q_block_specs(st, k.shape[1], dp, ids.shape[-1], backward=False),
    out_specs=[
      pl.BlockSpec((None, st.bq, None, dp), _q_rows),
      pl.BlockSpec((None, None, st.bq), _q_stats),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
    ],
    compiler_params=_compiler_params(st, "fwd"),
    interpret=st.interpret,
    name="flash_attention_fwd",
  )(*_operands(st, qseg, kseg, ids, cnt, mtbl, q, k, v))


def _dq_call(st: _Static, q, k, v, do, lse, dl, qseg, kseg, kv_lists):
  b, tp, h, dp = q.shape
  ids, cnt, mtbl = kv_lists
  return pl.pallas_call(
    functools.partial(_dq_kernel, st=st),
    grid=(tp // st.bq, b, h),
    in_specs=_q_block_specs(st, k.shape[1], dp, ids.shape[-1], backward=True),
    out_specs=pl.BlockSpec((None, st.bq, None, dp), _q_rows),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_compiler_params(st, "dq"),
    interpret=st.interpret,
    name="flash_attention_dq",
  )(*_operands(st, qseg, kseg, ids, cnt, mtbl, q, k, v, do, lse, dl))


def _dkv_call(st: _Static, q, k, v, do, lse, dl, qseg, kseg, q_lists):
  b, tp, h, dp = q.shape
  _, sp, kh, _ = k.shape
  ids, cnt, mtbl = q_lists
  m2 = ids.shape[-1]
  g, lb = st.groups, st.q_per_batch
  kv_map = lambda i, b_, kh_: (b_, i, kh_, 0)
  q_map = lambda i, b_, kh_: (b_, 0, kh_, 0)
  row_map = lambda i, b_, kh_: (b_, kh_, 0)
  in_specs = [
    pl.BlockSpec((None, g, None, m2), lambda i, b_, kh_: (b_ if lb else 0, kh_, i, 0)),
    pl.BlockSpec((None, g, 1), lambda i, b_, kh_: (b_ if lb else 0, kh_, i)),
    pl.BlockSpec((g, 4), lambda i, b_, kh_: (kh_, 0)),
    pl.BlockSpec((None, tp, g, dp), q_map),
    pl.BlockSpec((None, st.bk, None, dp), kv_map),
    pl.BlockSpec((None, st.bk, None, dp), kv_map),
    pl.BlockSpec((None, tp, g, dp), q_map),
    pl.BlockSpec((None, g, tp), row_map),
    pl.BlockSpec((None, g, tp), row_map),
  ]
  if st.has_segments:
    in_specs += [
      pl.BlockSpec((None, tp), lambda i, b_, kh_: (b_, 0)),
      pl.BlockSpec((None, st.bk), lambda i, b_, kh_: (b_, i)),
    ]
  return pl.pallas_call(
    functools.partial(_dkv_kernel, st=st),
    grid=(sp // st.bk, b, kh),
    in_specs=in_specs,
    out_specs=[pl.BlockSpec((None, st.bk, None, dp), kv_map)] * 2,
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_compiler_params(st, "dkv"),
    interpret=st.interpret,
    name="flash_attention_dkv",
  )(*_operands(st, qseg, kseg, ids, cnt, mtbl, q, k, v, do, lse, dl))


# o, do are [B, Tp, H, Dp]; lse rows are [B, H, Tp].
_flash = pc.flash_vjp(
  _fwd_call, _dq_call, _dkv_call, lambda o, do: jnp.einsum("bthd,bthd->bht", o, do)
)


def _gpu_lists(lists: pc.BlockLists, mtbl: np.ndarray):
  """Expands lists to one per head and pads their length to a power of two (Triton tiles)."""
  ids, cnt = lists.ids, lists.counts
  xp = np if isinstance(ids, np.ndarray) else jnp
  ids, cnt = ids[:, lists.head_map], cnt[:, lists.head_map]
  n = ids.shape[-1]
  n2 = pl.next_power_of_2(n)
  if n2 != n:
    ids = xp.concatenate([ids, xp.repeat(ids[..., -1:], n2 - n, axis=-1)], axis=-1)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(cnt, jnp.int32), jnp.asarray(mtbl)


def _choose_blocks(bs: BlockSizes, t, s, block_indices, block_size):
  bq, bk = bs.block_q, bs.block_k
  if block_indices is not None:
    bq, bk = int(np.gcd(bq, block_size[0])), int(np.gcd(bk, block_size[1]))
  # Short inputs: one (power-of-two, >= 16 for tensor-core dots) block covering them.
  bq = min(bq, max(16, pl.next_power_of_2(t)))
  bk = min(bk, max(16, pl.next_power_of_2(s)))
  for x in (bq, bk):
    if x < 16 or x & (x - 1):
      raise NotSupportedError(f"GPU blocks must be powers of two >= 16, got ({bq}, {bk})")
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
  """Flash attention on GPU (Triton) with a Pallas backward (see module docstring).

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
    interpret: run the kernels in Pallas interpret mode (CPU).
    block_sizes: kernel tiling for all three kernels; ``None``: by head dim and kernel
      (:func:`default_block_sizes`).

  Returns:
    ``(o [B, T, H, V], lse [B, T, H] float32)``; a query with no visible key gets 0 and -inf.
  """
  masks = tuple(masks)
  pc.check_inputs(q, k, v, masks, segment_ids, block_indices, q_offset)
  b, t, h, d = q.shape
  s, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
  dp = max(16, pl.next_power_of_2(max(d, dv)))
  if block_sizes is None:
    bs, launch = default_block_sizes(dp, max(jnp.dtype(x.dtype).itemsize for x in (q, k, v)))
  else:
    bs = block_sizes
    launch = ((bs.num_warps, bs.num_stages),) * 3
  bq, bk = _choose_blocks(bs, t, s, block_indices, tuple(block_size))
  plan = pc.plan_call(q, k, masks, segment_ids, q_offset, block_indices, block_size, bq, bk)
  st = _Static(
    mask=plan.mask,
    q_offset=int(q_offset),
    num_keys=s,
    bq=bq,
    bk=bk,
    groups=h // kh,
    scale=float(scale),
    has_segments=segment_ids is not None,
    kv_per_batch=plan.kv_lists.per_batch,
    q_per_batch=plan.q_lists.per_batch,
    launch=launch,
    interpret=bool(interpret),
  )

  def pad(x, n):  # [B, L, heads, D] -> [B, n, heads, Dp]
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - x.shape[-1])))

  o, lse = _flash(
    st,
    pad(q, plan.tp),
    pad(k, plan.sp),
    pad(v, plan.sp),
    plan.q_segments,
    plan.kv_segments,
    _gpu_lists(plan.kv_lists, plan.mask_table),
    _gpu_lists(plan.q_lists, plan.mask_table),
  )
  return o[:, :t, :, :dv], lse[:, :, :t].transpose(0, 2, 1)
