"""Decode attention: a few new queries against a long KV cache with per-sequence lengths.

The cache is split into ``num_splits`` chunks along the key axis; each chunk yields a partial
``(o, lse)`` (computed in parallel, so a single query still spreads over the whole machine) and
the partials are merged by their log-sum-exp (:mod:`ops.attention.merge`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention import reference
from ops.attention.api import validate
from ops.attention.mask import Mask
from ops.attention.merge import merge
from ops.common.dispatch import Implementation, dispatch

DEFAULT_NUM_SPLITS = 16

# No Pallas decode kernel: both implementations are plain JAX, ``xla`` on every backend.
IMPLEMENTATIONS = {
  "xla": Implementation("ops.attention.decode", "split_k"),
  "reference": Implementation("ops.attention.decode", "dense"),
}
DEFAULTS = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def decode_attention(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  *,
  lengths: jax.Array,
  mask: Mask | Sequence[Mask] | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  num_splits: int = DEFAULT_NUM_SPLITS,
  implementation: str | Sequence[str] | None = None,
  interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention of the newest ``T`` tokens against a cache holding ``lengths[b]`` valid keys.

  Query row ``i`` of sequence ``b`` sits at position ``lengths[b] - T + i`` (the queries are the
  last ``T`` tokens written into the cache); cache slots ``>= lengths[b]`` are never visible.

  Args:
    q: ``[B, T, H, D]`` with small T.
    k_cache: ``[B, S, K, D]``, ``H % K == 0``.
    v_cache: ``[B, S, K, D]``.
    lengths: int32 ``[B]`` valid cache entries per sequence, ``0 <= lengths <= S``.
    mask: Mask or per-head tuple; None means no mask (every valid cache entry visible, as in
      :func:`dot_product_attention`); pass ``Mask()`` for causal queries.
    scale: default ``D ** -0.5``.
    return_lse: also return ``lse [B, T, H]`` float32.
    num_splits: chunks of the key axis computed in parallel and merged by lse.
    implementation: ``"xla"`` (split-K, the default) or ``"reference"`` (dense).
    interpret: accepted for symmetry with :func:`dot_product_attention`; unused (no kernel).

  Returns:
    ``o [B, T, H, D]`` (q dtype), and ``lse`` with ``return_lse``.
  """
  masks, _, _, _, _, scale = validate(q, k_cache, v_cache, mask, None, 0, None, (128, 128), scale)
  b, s = q.shape[0], k_cache.shape[1]
  if getattr(lengths, "shape", None) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f"lengths must be an int array of shape [B] = [{b}], got "
      f"{getattr(lengths, 'shape', None)} {getattr(lengths, 'dtype', type(lengths).__name__)}"
    )
  if not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(lengths)
    if values.min() < 0 or values.max() > s:
      raise ValueError(
        f"lengths must lie in [0, S={s}], got min {values.min()}, max {values.max()}"
      )
  if not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
  o, lse = dispatch(
    "decode_attention",
    IMPLEMENTATIONS,
    implementation,
    DEFAULTS,
    q,
    k_cache,
    v_cache,
    jnp.asarray(lengths, jnp.int32),
    masks=masks,
    scale=scale,
    num_splits=num_splits,
    interpret=interpret,
  )
  return (o, lse) if return_lse else o


def _valid_keys(lengths, s):
  """Segment ids that hide cache slots ``>= lengths``: ``([B, T] zeros, [B, S] 0 or -1)``."""
  return jnp.where(jnp.arange(s)[None, :] < lengths[:, None], 0, -1).astype(jnp.int32)


def dense(q, k, v, lengths, *, masks, scale, num_splits, interpret=False):
  """The reference: dense attention with per-sequence offsets and a validity segment."""
  del num_splits, interpret
  t, s = q.shape[1], k.shape[1]
  seg_kv = _valid_keys(lengths, s)
  seg_q = jnp.zeros((q.shape[0], t), jnp.int32)
  return reference.attention(
    q,
    k,
    v,
    masks=masks,
    segment_ids=(seg_q, seg_kv),
    q_offset=lengths - t,
    block_indices=None,
    block_size=(128, 128),
    scale=scale,
  )


def split_k(q, k, v, lengths, *, masks, scale, num_splits, interpret=False):
  """Split-K decode: ``num_splits`` key chunks attended in parallel, merged by lse.

  ``interpret`` is unused (no kernel).

  Returns:
    ``(o [B, T, H, D], lse [B, T, H])``.
  """
  del interpret
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = h // kh
  n = min(num_splits, s)
  c = -(-s // n)
  pad = n * c - s
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_kv = _valid_keys(lengths, n * c)
  q_pos = lengths[:, None] - t + jnp.arange(t)
  seg_q = jnp.zeros((b, t), jnp.int32)
  vis = reference.visibility(masks, kh, (seg_q, seg_kv), q_pos, jnp.arange(n * c))
  vis = vis.reshape(b, kh, g, t, n, c)  # [B, K, G, T, n, C]
  kc = k.reshape(b, n, c, kh, d)
  vc = v.reshape(b, n, c, kh, d)
  q5 = q.reshape(b, t, kh, g, d)
  up = jax.default_backend() == "cpu" and q.dtype != jnp.float32  # no bf16 dot on CPU
  if up:
    q5, kc, vc = (x.astype(jnp.float32) for x in (q5, kc, vc))
  scores = jnp.einsum("btkgd,bnckd->bkgtnc", q5, kc, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m_safe[..., None])
  l = jnp.sum(p, axis=-1)  # [B, K, G, T, n]
  seen = l > 0
  pv = jnp.einsum(
    "bkgtnc,bnckd->bkgtnd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32
  )
  o_parts = pv / jnp.where(seen, l, 1.0)[..., None]
  lse_parts = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  o, lse = merge(o_parts, lse_parts, axis=4)  # [B, K, G, T, D], [B, K, G, T]
  o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, h)
  return o, lse
