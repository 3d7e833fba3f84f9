"""Context-parallel attention (ring attention): the sequence sharded over a ``context`` mesh
axis, K/V passed around the ring.

Each of the N devices holds a slice of the queries and of the keys/values. In N steps every
device attends its queries to the K/V slice it currently holds (blockwise, skipping masked
blocks), merges the partial result into its running ``(o, lse)``, and passes the K/V slice to
the next device with ``ppermute``. The backward (a ``custom_vjp``) runs the ring again with the
final ``o``/``lse``: dQ stays home, dK/dV travel with their K/V slice and arrive back at their
owner after N hops.

Load balance: with a causal mask, device i holding the i-th contiguous slice would do i+1 slices
of work. With ``load_balance=True`` the sequence is cut into 2N chunks and device i holds chunks
``i`` and ``2N - 1 - i``, so every device has the same number of visible (query, key) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ops.attention import xla
from ops.attention.api import validate
from ops.attention.mask import Mask
from ops.attention.merge import merge_pair
from ops.common.dispatch import NotSupportedError, note_served


def ring_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mesh: Mesh,
  axis_name: str = "context",
  mask: Mask | Sequence[Mask] | None = None,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  load_balance: bool = True,
  block_q: int | None = None,
  block_k: int | None = None,
  implementation: str | Sequence[str] | None = None,
  interpret: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Self-attention with the sequence axis sharded over ``mesh.shape[axis_name]`` devices.

  Args:
    q: ``[B, T, H, D]`` global array (self-attention: ``T == S``, query i at position i).
    k: ``[B, T, K, D]``.
    v: ``[B, T, K, D]``.
    mesh: the device mesh; only ``axis_name`` shards the sequence, other axes replicate.
    axis_name: the mesh axis to shard the sequence over.
    mask: as in :func:`ops.attention.dot_product_attention`.
    segment_ids: ``([B, T], [B, T])`` int32 or None.
    scale: default ``D ** -0.5``.
    return_lse: also return ``lse [B, T, H]``.
    load_balance: zig-zag layout (chunks i and 2N-1-i on device i) so causal work is even.
    block_q: query tile inside each device (default ``min(local T, 256)``).
    block_k: key tile (default ``min(local T, 512)``).
    implementation: the per-step kernel. Each ring step runs the blockwise ``"xla"`` kernel, so
      None or a choice that includes ``"xla"`` is served; any other choice raises
      :class:`NotSupportedError` (never silently replaced).
    interpret: accepted for the shared signature; unused (no Pallas kernel per step).

  Returns:
    ``o [B, T, H, D]`` (q dtype) and, with ``return_lse``, ``lse [B, T, H]`` float32; equal to
    unsharded attention.

  Raises:
    NotSupportedError: an ``implementation`` without ``"xla"``.
  """
  del interpret
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation or ())
  if names and "xla" not in names:
    raise NotSupportedError(
      f"ring_attention: implementation={implementation!r} cannot serve a context mesh: each "
      "ring step runs the blockwise 'xla' kernel (choose None or include 'xla')"
    )
  masks, segment_ids, _, _, _, scale = validate(
    q, k, v, mask, segment_ids, 0, None, (128, 128), scale
  )
  t, s = q.shape[1], k.shape[1]
  if t != s:
    raise ValueError(f"ring_attention is self-attention: q {q.shape} and k {k.shape} need T == S")
  if axis_name not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no {axis_name!r} axis")
  n = mesh.shape[axis_name]
  chunks = 2 * n if load_balance else n
  if t % chunks:
    raise ValueError(
      f"T={t} must be a multiple of {chunks} ({'2 x ' if load_balance else ''}{n} devices "
      f"on axis {axis_name!r})"
    )
  c = t // chunks
  local_t = t // n
  bq = block_q or min(local_t, xla.DEFAULT_BLOCK_Q)
  bk = block_k or min(local_t, xla.DEFAULT_BLOCK_K)
  bq, bk = min(bq, c), min(bk, c)
  # Chunk order along the sharded axis: device i holds chunks order[2i], order[2i + 1].
  order = [j for i in range(n) for j in (i, chunks - 1 - i)] if load_balance else list(range(n))
  per = len(order) // n
  starts = tuple(tuple(order[i * per + j] * c for j in range(per)) for i in range(n))

  explicit = jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)

  def unsharded(x):
    # Explicit meshes need a stated sharding for the chunk permutation; gather to replicated.
    return jax.reshard(x, jax.sharding.NamedSharding(mesh, P())) if explicit else x

  def to_ring(x):
    if not load_balance or x is None:
      return x
    x = unsharded(x)
    return x.reshape(x.shape[0], chunks, c, *x.shape[2:])[:, order].reshape(x.shape)

  def from_ring(x):
    if not load_balance:
      return x
    inverse = [order.index(j) for j in range(chunks)]
    x = unsharded(x)
    return x.reshape(x.shape[0], chunks, c, *x.shape[2:])[:, inverse].reshape(x.shape)

  seg_q, seg_kv = segment_ids if segment_ids is not None else (None, None)
  cfg = _Config(masks, scale, bq, bk, n, axis_name, c, starts)
  local = functools.partial(_ring_local, cfg)
  seq4, seq2 = P(None, axis_name, None, None), P(None, axis_name)
  seg_spec = None if seg_q is None else seq2
  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(seq4, seq4, seq4, seg_spec, seg_spec),
    out_specs=(seq4, P(None, axis_name, None)),
    check_vma=False,
  )
  args = [to_ring(q), to_ring(k), to_ring(v), to_ring(seg_q), to_ring(seg_kv)]
  if explicit:  # no implicit resharding at the shard_map boundary
    specs = (seq4, seq4, seq4, seg_spec, seg_spec)
    args = [
      x if x is None else jax.reshard(x, jax.sharding.NamedSharding(mesh, spec))
      for x, spec in zip(args, specs)
    ]
  o, lse = sharded(*args)
  note_served("ring_attention", "xla")
  o, lse = from_ring(o), from_ring(lse)
  return (o, lse) if return_lse else o


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of the ring (``custom_vjp``'s non-differentiable argument).

  Attributes:
    masks: one Mask per query head.
    scale: multiplies ``q . k``.
    bq: query tile.
    bk: key tile.
    n: devices on the ring.
    axis_name: the mesh axis.
    c: tokens per chunk.
    starts: ``starts[i]`` are the absolute start positions of device i's chunks.
  """

  masks: tuple[Mask, ...]
  scale: float
  bq: int
  bk: int
  n: int
  axis_name: str
  c: int
  starts: tuple[tuple[int, ...], ...]

  def kernel_kw(self):
    return {"masks": self.masks, "scale": self.scale, "bq": self.bq, "bk": self.bk}

  def rotate(self, xs):
    perm = [(i, (i + 1) % self.n) for i in range(self.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, self.axis_name, perm), xs)

  def chunk_starts(self, device):
    """int32 ``[chunks per device]`` absolute start positions of ``device``'s chunks."""
    table = jnp.array(self.starts, jnp.int32)  # [N, chunks per device]
    return lax.dynamic_index_in_dim(table, device, keepdims=False)

  def split(self, x):
    return [] if x is None else [lax.slice_in_dim(x, i, i + self.c, axis=1)
                                 for i in range(0, x.shape[1], self.c)]  # fmt: skip


def _pieces(cfg, x):
  return cfg.split(x) if x is not None else [None] * len(cfg.starts[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_local(cfg, q, k, v, seg_q, seg_kv):
  return _ring_fwd(cfg, q, k, v, seg_q, seg_kv)[0]


def _ring_fwd(cfg, q, k, v, seg_q, seg_kv):
  me = lax.axis_index(cfg.axis_name)
  q_starts = cfg.chunk_starts(me)
  qs, sqs = cfg.split(q), _pieces(cfg, seg_q)
  b, _, h, d = q.shape
  acc = [(jnp.zeros((b, cfg.c, h, d), jnp.float32), jnp.full((b, cfg.c, h), -jnp.inf)) for _ in qs]

  def step(i, carry):
    acc, kv = carry
    k_cur, v_cur, skv_cur = kv
    k_starts = cfg.chunk_starts((me - i) % cfg.n)
    new = []
    for a, (q_a, sq_a) in enumerate(zip(qs, sqs)):
      o_a, lse_a = acc[a]
      for j, (k_j, v_j, skv_j) in enumerate(
        zip(cfg.split(k_cur), cfg.split(v_cur), _pieces(cfg, skv_cur))
      ):
        o_p, lse_p = xla.grouped_forward(
          q_a, k_j, v_j, sq_a, skv_j, q_starts[a], k_starts[j], **cfg.kernel_kw()
        )
        o_a, lse_a = merge_pair(o_a, lse_a, o_p, lse_p)
      new.append((o_a, lse_a))
    return new, cfg.rotate(kv)

  acc, _ = lax.fori_loop(0, cfg.n, step, (acc, (k, v, seg_kv)))
  o = jnp.concatenate([a[0] for a in acc], axis=1).astype(q.dtype)
  lse = jnp.concatenate([a[1] for a in acc], axis=1)
  return (o, lse), (q, k, v, seg_q, seg_kv, o, lse)


def _ring_bwd(cfg, res, cts):
  q, k, v, seg_q, seg_kv, o, lse = res
  do, dlse = cts
  me = lax.axis_index(cfg.axis_name)
  q_starts = cfg.chunk_starts(me)
  qs, sqs, os_, lses = cfg.split(q), _pieces(cfg, seg_q), cfg.split(o), cfg.split(lse)
  dos, dlses = cfg.split(do), cfg.split(dlse)

  def step(i, carry):
    dqs, kv, dkv = carry
    k_cur, v_cur, skv_cur = kv
    k_starts = cfg.chunk_starts((me - i) % cfg.n)
    ks, vs, skvs = cfg.split(k_cur), cfg.split(v_cur), _pieces(cfg, skv_cur)
    dks, dvs = cfg.split(dkv[0]), cfg.split(dkv[1])
    new_dq = []
    for a in range(len(qs)):
      dq_a = dqs[a]
      for j in range(len(ks)):
        dq_p, dk_p, dv_p = xla.grouped_backward(
            qs[a], ks[j], vs[j], sqs[a], skvs[j], q_starts[a], k_starts[j], os_[a], lses[a],
            dos[a], dlses[a], **cfg.kernel_kw(),
        )  # fmt: skip
        dq_a = dq_a + dq_p
        dks[j] = dks[j] + dk_p
        dvs[j] = dvs[j] + dv_p
      new_dq.append(dq_a)
    dkv = (jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1))
    # dK/dV travel with their K/V slice; after N hops they are back at the slice's owner.
    return new_dq, cfg.rotate(kv), cfg.rotate(dkv)

  dq0 = [jnp.zeros(x.shape, jnp.float32) for x in qs]
  dkv0 = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dqs, _, (dk, dv) = lax.fori_loop(0, cfg.n, step, (dq0, (k, v, seg_kv), dkv0))
  dq = jnp.concatenate(dqs, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_local.defvjp(_ring_fwd, _ring_bwd)
