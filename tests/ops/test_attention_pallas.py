"""Pallas flash attention (TPU Mosaic and GPU Triton) vs the dense reference.

Kernels run in interpret mode on CPU at small shapes (outputs, lse and gradients of q, k, v,
including an lse cotangent) and are lowered for ``tpu`` and ``cuda`` at realistic shapes
(forward and backward). Block skipping is checked twice: the planned block lists equal the exact
set of visible block pairs, and a kernel run with NaN in every key block nobody may see stays
finite (a computed-and-discarded block would turn the output NaN through ``0 * NaN``).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops.attention import pallas_common, pallas_gpu, pallas_schedule, pallas_tpu, reference
from ops.attention.mask import Mask
from ops.common import NotSupportedError

# (o, lse, grads) absolute/relative tolerance per input dtype. Interpret mode does f32 math
# exactly as the reference up to summation order. bf16 is loose because the kernels, like every
# flash kernel, round p and ds to bf16 before the p @ v and ds @ k matmuls (the reference keeps
# f32 throughout); the errors seen are ~1e-2 of values of size ~1.
TOL = {
  jnp.float32: dict(o=2e-5, lse=2e-5, grad=1e-4),
  jnp.bfloat16: dict(o=3e-2, lse=1e-2, grad=6e-2),
}

IMPLS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


@dataclasses.dataclass(frozen=True)
class Case:
  t: int = 40
  s: int = 40
  h: int = 2
  kv: int = 1
  d: int = 32
  dtype: object = jnp.float32
  masks: tuple = (Mask(),)  # repeated to H heads
  q_offset: int | None = None
  segments: bool = False
  block_indices: bool = False
  blocks: tuple = (16, 16)
  # TPU only: run in the TPU simulator with uninitialised memory NaN (slower than the generic
  # interpreter, which NaN-fills outputs too); unwritten output blocks then fail the comparison.
  tpu_simulator: bool = False


CASES = {
  # T, S not block multiples; GQA 2; query and key blocks of different sizes.
  "causal_gqa2": Case(h=4, kv=2, blocks=(32, 16)),
  # StreamingLLM mask, GQA 4, bf16, D=64.
  "sink_window_gqa4_bf16": Case(
    h=4, kv=1, d=64, masks=(Mask(window=12, sinks=3),), dtype=jnp.bfloat16
  ),
  # Per-head masks (DuoAttention-style: full causal heads and prefix+window heads) and packed
  # segments, no GQA.
  "perhead_prefix_segments": Case(
    h=2, kv=2, masks=(Mask(), Mask(window=9, prefix=10)), segments=True, tpu_simulator=True
  ),
  # Block-sparse retrieval in 32-blocks served by 16 x 32 kernel blocks, under a causal mask.
  "block_indices": Case(t=64, s=64, h=2, kv=1, block_indices=True, blocks=(16, 32)),
  # One decoding query against a cache.
  "decode_t1": Case(t=1, s=40, h=2, kv=1, masks=(Mask(window=16, sinks=2),)),
  # A head dim that is no tile: GPU zero-pads it to 16, TPU takes it as the whole lane dim.
  "odd_head_dim": Case(t=16, s=16, h=2, kv=1, d=12),
}
SLOW_CASES = {
  "full_f32": Case(masks=(Mask(causal=False),), t=24, s=56),
  "window_gqa1_bf16": Case(
    h=2, kv=2, masks=(Mask(window=20),), dtype=jnp.bfloat16, t=96, s=96, blocks=(32, 32)
  ),
  "q_offset_chunk": Case(t=20, s=50, q_offset=17, masks=(Mask(window=24, sinks=4),)),
  "segments_block_indices_gqa2": Case(
    t=64, s=64, h=4, kv=2, segments=True, block_indices=True, masks=(Mask(window=40),)
  ),
}


def _inputs(c: Case, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(keys[0], (1, c.t, c.h, c.d)).astype(c.dtype)
  k = jax.random.normal(keys[1], (1, c.s, c.kv, c.d)).astype(c.dtype)
  v = jax.random.normal(keys[2], (1, c.s, c.kv, c.d)).astype(c.dtype)
  masks = tuple(c.masks[i * len(c.masks) // c.h] for i in range(c.h))
  kw = dict(
    masks=masks,
    segment_ids=None,
    q_offset=c.s - c.t if c.q_offset is None else c.q_offset,
    block_indices=None,
    block_size=(32, 32),
    scale=c.d**-0.5,
  )
  if c.segments:
    # Keys hold documents 0 and 1; the last 8 queries are document 2, which no key holds: the
    # last query block lists no key block at all and must still write zeros and -inf.
    q_seg = (jnp.arange(c.t) >= c.t // 2).astype(jnp.int32) + (jnp.arange(c.t) >= c.t - 8)
    k_seg = (jnp.arange(c.s) >= c.s // 2 - 5).astype(jnp.int32)
    kw["segment_ids"] = (q_seg[None], k_seg[None])
  if c.block_indices:
    nq, nk = -(-c.t // 32), -(-c.s // 32)
    rng = np.random.default_rng(seed)
    bi = rng.integers(-1, nk, size=(1, c.kv, nq, 2))
    bi[..., 0] = np.minimum(np.arange(nq), nk - 1)[None, None]  # the diagonal, plus one random
    kw["block_indices"] = jnp.asarray(bi, jnp.int32)
  return q, k, v, kw


def _loss(attn):
  """Scalar touching o and lse with fixed random weights, so every cotangent is non-trivial."""

  def loss(q, k, v):
    o, lse = attn(q, k, v)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
    lse_part = jnp.where(jnp.isfinite(lse), lse, 0.0).sum() * 0.5
    return (o.astype(jnp.float32) * w).sum() + lse_part, (o, lse)

  return loss


def _run(fn, q, k, v):
  return jax.jit(jax.value_and_grad(_loss(fn), argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _check(c: Case, impl):
  q, k, v, kw = _inputs(c)
  mod = IMPLS[impl]
  interpret = True
  if impl == "tpu" and c.tpu_simulator:
    interpret = pltpu.InterpretParams(uninitialized_memory="nan")
  bs = mod.BlockSizes(*c.blocks)
  (_, (o, lse)), grads = _run(
    lambda q, k, v: mod.attention(q, k, v, interpret=interpret, block_sizes=bs, **kw), q, k, v
  )
  # The reference runs in f32 on the same (possibly bf16-rounded) inputs.
  up = lambda x: x.astype(jnp.float32)
  (_, (ro, rlse)), rgrads = _run(
    lambda q, k, v: reference.attention(q, k, v, interpret=False, **kw), up(q), up(k), up(v)
  )
  tol = TOL[c.dtype]
  assert o.dtype == q.dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(up(o), ro, atol=tol["o"], rtol=tol["o"])
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
  fin = np.isfinite(rlse)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin], atol=tol["lse"])
  for name, g, rg in zip("qkv", grads, rgrads):
    assert g.dtype == q.dtype, name
    np.testing.assert_allclose(up(g), rg, atol=tol["grad"], rtol=tol["grad"], err_msg=f"d{name}")


class _Conformance:
  impl: str

  @pytest.mark.parametrize("name", list(CASES))
  def test_matches_reference(self, name):
    _check(CASES[name], self.impl)

  @pytest.mark.slow
  @pytest.mark.parametrize("name", list(SLOW_CASES))
  def test_matches_reference_slow(self, name):
    _check(SLOW_CASES[name], self.impl)

  def test_skipped_blocks_are_never_read(self):
    # Queries at the end of a long cache with sink+window: key blocks 1..5 are invisible to
    # every query. NaN there would poison any block that is computed and then masked.
    t, s, d = 16, 128, 32
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (1, t, 2, d))
    k = jax.random.normal(keys[1], (1, s, 1, d))
    v = jax.random.normal(keys[2], (1, s, 1, d))
    dead = (jnp.arange(s) >= 16) & (jnp.arange(s) < 96)
    poison = lambda x: jnp.where(dead[None, :, None, None], jnp.nan, x)
    kw = dict(
      masks=(Mask(window=16, sinks=4),) * 2,
      segment_ids=None,
      q_offset=s - t,
      block_indices=None,
      block_size=(128, 128),
      scale=d**-0.5,
    )
    mod = IMPLS[self.impl]
    (_, (o, lse)), (dq, dk, dv) = _run(
      lambda q, k, v: mod.attention(
        q, k, v, interpret=True, block_sizes=mod.BlockSizes(16, 16), **kw
      ),
      q,
      poison(k),
      poison(v),
    )
    ro, rlse = reference.attention(q, k, v, interpret=False, **kw)
    np.testing.assert_allclose(o, ro, atol=2e-5)
    np.testing.assert_allclose(lse, rlse, atol=2e-5)
    assert np.isfinite(dq).all()
    assert np.isfinite(np.asarray(dk)[:, ~np.asarray(dead)]).all()
    np.testing.assert_array_equal(np.asarray(dv)[:, np.asarray(dead)], 0.0)

  def test_traced_q_offset_not_supported(self):
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(NotSupportedError, match="q_offset"):
      IMPLS[self.impl].attention(
        q,
        q,
        q,
        masks=(Mask(),),
        segment_ids=None,
        q_offset=jnp.int32(0),
        block_indices=None,
        block_size=(128, 128),
        scale=1.0,
        interpret=True,
      )

  def test_public_api_dispatches_here(self):
    # dot_product_attention(implementation="pallas_*") reaches this kernel with its defaults.
    from ops.attention import dot_product_attention

    q, k, v, kw = _inputs(Case(t=8, s=8, h=2, kv=1, masks=(Mask(window=4, sinks=1),)))
    o, lse = dot_product_attention(
      q,
      k,
      v,
      mask=Mask(window=4, sinks=1),
      return_lse=True,
      interpret=True,
      implementation=f"pallas_{self.impl}",
    )
    ro, rlse = reference.attention(q, k, v, interpret=False, **kw)
    np.testing.assert_allclose(o, ro, atol=2e-5)
    np.testing.assert_allclose(lse, rlse, atol=2e-5)


class TestPallasTPU(_Conformance):
  impl = "tpu"

  def test_hardware_blocks_must_be_lane_aligned(self):
    q = jnp.zeros((1, 512, 1, 128))
    with pytest.raises(NotSupportedError, match="multiples of 128"):
      pallas_tpu.attention(
        q,
        q,
        q,
        masks=(Mask(),),
        segment_ids=None,
        q_offset=0,
        block_indices=None,
        block_size=(128, 128),
        scale=1.0,
        interpret=False,
        block_sizes=pallas_tpu.BlockSizes(64, 64),
      )


class TestPallasGPU(_Conformance):
  impl = "gpu"


# Block planning (host side, no kernel).

PLAN_MASKS = [
  Mask(),
  Mask(causal=False),
  Mask(window=7),
  Mask(window=7, sinks=3),
  Mask(window=5, sinks=9),
  Mask(prefix=11),
  Mask(window=4, sinks=2, prefix=20),
]


@pytest.mark.parametrize("mask", PLAN_MASKS, ids=str)
def test_block_visibility_is_exact(mask):
  for t, s, q_offset, bq, bk in [(37, 37, 0, 8, 8), (13, 50, 37, 4, 16), (50, 29, 0, 16, 4)]:
    vis = pallas_common.block_visibility(mask, t=t, s=s, q_offset=q_offset, bq=bq, bk=bk)
    dense = np.asarray(mask.visible(q_offset + np.arange(t)[:, None], np.arange(s)[None]))
    nq, nk = vis.shape
    pad = np.zeros((nq * bq, nk * bk), dtype=bool)
    pad[:t, :s] = dense
    want = pad.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    np.testing.assert_array_equal(vis, want)


def _pairs(lists: pallas_common.BlockLists, batch: int, head: int) -> set[tuple[int, int]]:
  ids, counts = np.asarray(lists.ids), np.asarray(lists.counts)
  li, bi = lists.head_map[head], batch if lists.per_batch else 0
  return {
    (r, int(ids[bi, li, r, j])) for r in range(ids.shape[2]) for j in range(int(counts[bi, li, r]))
  }


def test_sink_window_lists_cover_only_the_band():
  # T = S = 4096 in 128-blocks: a dense kernel computes 32 * 32 = 1024 tiles per head (528 with
  # causal skipping). Sink + window visits sink block + band: at most 4 blocks per query block.
  t = 4096
  mask = Mask(window=256, sinks=4)
  kv_lists, q_lists = pallas_common.plan_block_lists(
    (mask,) * 2,
    t=t,
    s=t,
    q_offset=0,
    bq=128,
    bk=128,
    num_kv_heads=1,
    block_indices=None,
    block_size=(128, 128),
    segment_ids=None,
  )
  dense = np.asarray(mask.visible(np.arange(t)[:, None], np.arange(t)[None]))
  want = dense.reshape(32, 128, 32, 128).any(axis=(1, 3))
  # Query blocks list <= 4 key blocks; the sink key block is seen by every query block.
  assert kv_lists.length == 4 and q_lists.length == 32
  assert kv_lists.computed_blocks(batch=3) == 3 * 2 * int(want.sum())
  assert int(want.sum()) < 4 * 32
  assert _pairs(kv_lists, 0, 1) == {tuple(p) for p in np.argwhere(want)}
  assert _pairs(q_lists, 0, 0) == {(j, i) for i, j in np.argwhere(want)}
  # The TPU grids walk flattened schedules: exactly one step per visible tile (forward/dq per
  # query head; dk/dv per kv head, its 2 query heads on an inner grid axis), no padding.
  assert pallas_schedule.flat_schedule(kv_lists, 1, 32).steps == int(want.sum())
  assert pallas_schedule.flat_schedule(q_lists, 2, 32).steps == int(want.sum())
  _check_schedule(kv_lists, 1, 32, batch=1)
  _check_schedule(q_lists, 2, 32, batch=1)


def test_dynamic_lists_match_dense_visibility():
  # block_indices + segment_ids: lists are built on device; compare with the dense reference.
  t, s, bq, bk = 64, 96, 16, 16
  rng = np.random.default_rng(0)
  bi = jnp.asarray(rng.integers(-1, 3, size=(2, 2, 2, 3)), jnp.int32)  # 32-blocks
  q_seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, t)), axis=1), jnp.int32)
  k_seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, s)), axis=1), jnp.int32)
  masks = (Mask(), Mask(window=20), Mask(causal=False), Mask(window=8, sinks=4))
  kv_lists, q_lists = pallas_common.plan_block_lists(
    masks,
    t=t,
    s=s,
    q_offset=32,
    bq=bq,
    bk=bk,
    num_kv_heads=2,
    block_indices=bi,
    block_size=(32, 32),
    segment_ids=(q_seg, k_seg),
  )
  vis = reference.visibility(
    masks, 2, (q_seg, k_seg), 32 + jnp.arange(t), jnp.arange(s), bi, (32, 32)
  )
  vis = np.asarray(vis).reshape(2, 4, t // bq, bq, s // bk, bk).any(axis=(3, 5))
  # Without segments, the block lists can only hold pairs allowed by both mask and indices.
  loose = reference.visibility(masks, 2, None, 32 + jnp.arange(t), jnp.arange(s), bi, (32, 32))
  loose = np.asarray(loose).reshape(2, 4, t // bq, bq, s // bk, bk).any(axis=(3, 5))
  for b, h in itertools.product(range(2), range(4)):
    got = _pairs(kv_lists, b, h)
    assert {tuple(p) for p in np.argwhere(vis[b, h])} <= got, (b, h)
    assert got <= {tuple(p) for p in np.argwhere(loose[b, h])}, (b, h)
    assert {(j, i) for i, j in _pairs(q_lists, b, h)} == got
  for lists, groups, nblocks in ((kv_lists, 1, s // bk), (q_lists, 2, t // bq)):
    _check_schedule(lists, groups, nblocks, batch=2)


def _check_schedule(lists, groups, nblocks, batch):
  """A flat schedule computes the union of its heads' listed tiles once, rows contiguous."""
  sched = pallas_schedule.flat_schedule(lists, groups, nblocks)
  rows, blocks, meta = (np.asarray(x) for x in (sched.rows, sched.blocks, sched.meta))
  nrows = np.asarray(lists.ids).shape[2]
  for b, o in itertools.product(range(batch), range(len(sched.owner_map))):
    bi, oi = (b if sched.per_batch else 0), sched.owner_map[o]
    r, blk, m = rows[bi, oi], blocks[bi, oi], meta[bi, oi]
    compute, first, last = m & 1, (m >> 1) & 1, (m >> 2) & 1
    got = {(int(r[p]), int(blk[p])) for p in np.flatnonzero(compute)}
    assert len(got) == int(compute.sum())
    assert got == set().union(*(_pairs(lists, b, o * groups + g) for g in range(groups)))
    np.testing.assert_array_equal(r[first == 1], np.arange(nrows))
    np.testing.assert_array_equal(r[last == 1], np.arange(nrows))
    live = np.flatnonzero(first | last | compute)
    assert (np.diff(r[live]) >= 0).all()


# Lowering for the real platforms (no hardware needed), forward and backward, at realistic size.

LOWER_CASES = {
  "sink_window_gqa2": dict(masks=(Mask(window=256, sinks=4),) * 4, segments=False, bi=False),
  "perhead_segments_block_indices": dict(
    masks=(Mask(), Mask(window=128, sinks=4)) * 2, segments=True, bi=True
  ),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", list(LOWER_CASES))
def test_lowers(platform, name):
  b, t, h, kv, d = 1, 1024, 4, 2, 128
  case = LOWER_CASES[name]
  mod = pallas_tpu if platform == "tpu" else pallas_gpu
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  bi = jax.ShapeDtypeStruct((b, kv, t // 128, 4), jnp.int32)

  def fwd(q, k, v, q_seg, k_seg, block_indices):
    return mod.attention(
      q,
      k,
      v,
      masks=case["masks"],
      q_offset=0,
      block_size=(128, 128),
      scale=d**-0.5,
      segment_ids=(q_seg, k_seg) if case["segments"] else None,
      block_indices=block_indices if case["bi"] else None,
      interpret=False,
    )

  def bwd(q, k, v, *rest):
    f = lambda q, k, v: _loss(lambda q, k, v: fwd(q, k, v, *rest))(q, k, v)[0]
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  for fn, kernels in ((fwd, 1), (bwd, 3)):
    text = jax.jit(fn).trace(q, k, k, seg, seg, bi).lower(lowering_platforms=(platform,))
    text = text.as_text()
    assert text.count(marker) >= kernels, fn.__name__


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_odd_head_dim(platform):
  # D = 65 (e.g. a head dim plus one normaliser column): GPU pads it to 128, TPU takes the whole
  # dim as the block's lane dim.
  mod = pallas_tpu if platform == "tpu" else pallas_gpu
  q = jax.ShapeDtypeStruct((1, 512, 2, 65), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 512, 1, 65), jnp.bfloat16)
  kw = dict(masks=(Mask(),) * 2, segment_ids=None, q_offset=0, block_indices=None, scale=0.125)
  fwd = lambda q, k, v: mod.attention(q, k, v, block_size=(128, 128), interpret=False, **kw)
  loss = lambda q, k, v: _loss(fwd)(q, k, v)[0]
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  for fn, kernels in ((fwd, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= kernels
