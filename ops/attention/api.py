"""Public entry point: :func:`dot_product_attention` validates, normalises and dispatches."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention.mask import Mask, normalize_masks
from ops.common.dispatch import dispatch, implementations

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Each module exposes ``attention(q, k, v, *, masks, segment_ids, q_offset, block_indices,
# block_size, scale, interpret) -> (o, lse)``.
IMPLEMENTATIONS = implementations(
  "ops.attention", "attention", ("reference", "xla", "pallas_tpu", "pallas_gpu")
)
DEFAULTS = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "cpu": ("xla",)}


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: Mask | Sequence[Mask] | None = None,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  q_offset: int | None = None,
  block_indices: jax.Array | None = None,
  block_size: tuple[int, int] = (128, 128),
  scale: float | None = None,
  return_lse: bool = False,
  implementation: str | Sequence[str] | None = None,
  interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Softmax attention with masks, packed segments, block sparsity and grouped KV heads.

  Query row ``i`` sits at key position ``q_offset + i``. Key ``j`` is visible to it when the
  Mask allows it (see :class:`Mask`), its segment equals the query's, and (with
  ``block_indices``) its key block is listed for the query's block.

  Args:
    q: ``[B, T, H, D]`` float32, bfloat16 or float16.
    k: ``[B, S, K, D]``, same dtype, ``H % K == 0`` (grouped-query; K/V are never repeated).
    v: ``[B, S, K, D]``, same dtype.
    mask: None (every key visible), a Mask, or a tuple of Masks, one per query head or one per
      equal group of consecutive heads.
    segment_ids: ``(q_segments [B, T], kv_segments [B, S])`` int32; different ids never attend.
    q_offset: key position of query row 0; default ``S - T`` (queries are the newest tokens).
    block_indices: int32 ``[B, K, ceil(T / bq), n]``: key blocks each query block attends to,
      ``-1`` for an empty slot. Blocks are ``block_size = (bq, bk)``.
    block_size: ``(bq, bk)`` that ``block_indices`` refers to.
    scale: multiplies ``q . k``; default ``D ** -0.5``.
    return_lse: also return the log-sum-exp of the scores.
    implementation: None (by backend, ``DEFAULTS``: tpu -> pallas_tpu then xla, gpu ->
      pallas_gpu then xla, cpu -> xla; each refusal is logged), a name (``reference``,
      ``xla``, ``pallas_tpu``, ``pallas_gpu``: never falls back), or a sequence of names
      tried in order.
    interpret: run Pallas kernels in interpret mode; None -> interpret only when lowering
      for CPU (see :mod:`ops.common.dispatch`).

  Returns:
    ``o [B, T, H, D]`` in q's dtype, and with ``return_lse`` also ``lse [B, T, H]`` float32.
    A query that sees no key gets ``o = 0``, ``lse = -inf``.

  Raises:
    ValueError: bad shapes, dtypes, masks or block indices (before any tracing).
    NotSupportedError: the named implementation cannot serve this call.
  """
  masks, segment_ids, q_offset, block_indices, block_size, scale = validate(
    q, k, v, mask, segment_ids, q_offset, block_indices, block_size, scale
  )
  o, lse = dispatch(
    "dot_product_attention",
    IMPLEMENTATIONS,
    implementation,
    DEFAULTS,
    q,
    k,
    v,
    masks=masks,
    segment_ids=segment_ids,
    q_offset=q_offset,
    block_indices=block_indices,
    block_size=block_size,
    scale=scale,
    interpret=interpret,
    flops=forward_flops,
  )
  return (o, lse) if return_lse else o


def forward_flops(q, k, v, *, masks, q_offset, block_indices, block_size, **_) -> float:
  """Matmul FLOPs of the forward: ``2 (D + Dv)`` per visible (query, key) pair and head.

  Pairs hidden by the masks are not work (the kernels skip those blocks); packed segments
  are not known while tracing and count as visible. With ``block_indices``, at most the listed
  blocks' pairs count.
  """
  b, t, h, d = q.shape
  s, dv = k.shape[1], v.shape[-1]
  offset = int(q_offset) if isinstance(q_offset, (int, np.integer)) else s - t
  pairs = 0
  for mask, heads in collections.Counter(masks).items():
    pairs += heads * _visible_pairs(mask, offset, t, s)
  if block_indices is not None:
    nq, listed = block_indices.shape[2], block_indices.shape[3]
    pairs = min(pairs, h * nq * listed * block_size[0] * block_size[1])
  return 2.0 * b * (d + dv) * pairs


@functools.cache
def _visible_pairs(mask: Mask, offset: int, t: int, s: int) -> int:
  total = 0
  for p in range(offset, offset + t):
    head, lo, hi = mask.key_ranges(p, p + 1, s)
    total += head + max(hi - lo, 0)
  return total


def validate(q, k, v, mask, segment_ids, q_offset, block_indices, block_size, scale):
  """Checks the public arguments and returns them normalised.

  Returns:
    ``(masks, segment_ids, q_offset, block_indices, block_size, scale)``: one Mask per head,
    int32 segment ids, an int offset, int32 block indices, an int pair and a float.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 ([B, T|S, heads, D]), got shape {x.shape}")
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  b, t, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: k {k.shape}, v {v.shape}")
  s, kh = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(
      f"q [B, T, H, D] = {q.shape} and k [B, S, K, D] = {k.shape} disagree on B or D"
    )
  if t < 1 or s < 1 or h < 1 or kh < 1 or d < 1:
    raise ValueError(f"empty dimension: q {q.shape}, k {k.shape}")
  if h % kh:
    raise ValueError(
      f"H={h} query heads (q {q.shape}) not divisible by K={kh} kv heads ({k.shape})"
    )
  masks = normalize_masks(mask, h)
  if segment_ids is not None:
    if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
      raise ValueError("segment_ids must be a pair (q_segments [B, T], kv_segments [B, S])")
    q_seg, kv_seg = segment_ids
    if getattr(q_seg, "shape", None) != (b, t) or getattr(kv_seg, "shape", None) != (b, s):
      raise ValueError(
        f"segment_ids shapes {getattr(q_seg, 'shape', None)}, {getattr(kv_seg, 'shape', None)}"
        f" must be ([B, T], [B, S]) = ({(b, t)}, {(b, s)})"
      )
    if not (jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
      raise ValueError(f"segment_ids must be integer, got {q_seg.dtype}, {kv_seg.dtype}")
    segment_ids = (jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32))
  if q_offset is None:
    q_offset = s - t
  if isinstance(q_offset, (bool, np.bool_)) or not isinstance(q_offset, (int, np.integer)):
    raise ValueError(f"q_offset must be a Python int, got {q_offset!r}")
  q_offset = int(q_offset)
  if (
    not isinstance(block_size, (tuple, list))
    or len(block_size) != 2
    or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in block_size)
  ):
    raise ValueError(f"block_size must be a pair of positive ints (bq, bk), got {block_size!r}")
  block_size = (int(block_size[0]), int(block_size[1]))
  if block_indices is not None:
    _check_block_indices(block_indices, b, kh, t, s, block_size)
    block_indices = jnp.asarray(block_indices, jnp.int32)
  if scale is None:
    scale = d**-0.5
  if not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale):
    raise ValueError(f"scale must be a finite Python float, got {scale!r}")
  return masks, segment_ids, q_offset, block_indices, block_size, float(scale)


def _check_block_indices(block_indices, b, kh, t, s, block_size):
  bq, bk = block_size
  nq, nk = -(-t // bq), -(-s // bk)
  shape = getattr(block_indices, "shape", None)
  if shape is None or len(shape) != 4 or tuple(shape[:3]) != (b, kh, nq):
    raise ValueError(
      f"block_indices shape {shape} must be [B, K, ceil(T/bq), n] = [{b}, {kh}, {nq}, n] "
      f"for T={t}, bq={bq}"
    )
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"block_indices must be int32, got {block_indices.dtype}")
  if isinstance(block_indices, jax.core.Tracer):
    return  # values are only known at run time
  values = np.asarray(block_indices)
  if values.size and (values.min() < -1 or values.max() >= nk):
    raise ValueError(
      f"block_indices values must lie in [-1, {nk}) (S={s}, bk={bk} gives {nk} key blocks); "
      f"got min {values.min()}, max {values.max()}"
    )
