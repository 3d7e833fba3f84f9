"""Host side of the Pallas gated delta rule, shared by ``pallas_tpu`` and ``pallas_gpu``.

Inputs are zero-padded to tile-legal head widths (``padded_width``; exact, see
``chunk_gated_delta_rule``) and moved to head-major ``[B,H,T,*]`` so a chunk is a ``[C,K]``
tile, the within-chunk cumulative log decay ``G`` is computed here (its transpose, the reverse
cumulative sum, is then autodiff's job), and a ``custom_vjp`` ties the kernels
(``pallas_calls``) together:

forward:  wy (parallel) -> state passing (sequential) -> output (parallel)
backward: recompute W, U and the per-chunk states (one more sequential pass instead of keeping
          [B,H,N,K,V] states alive between forward and backward) -> state-gradient passing
          (sequential, reversed) -> per-chunk gradients (parallel) -> WY backward in XLA.

The WY backward runs in XLA (``jax.vjp`` of ``_wy_xla``): it is parallel over chunks, made of
``[C,C]`` matmuls and one batched triangular solve that XLA already runs well, while a Pallas
version would need the transposed forward substitution in-kernel for no change in the
asymptotic cost. Everything sequential over time is a kernel.

Per-channel decay (``g [B,T,H,K]``, GLA-style) changes only the within-chunk part: ``P`` and the
WY matrices need ``exp(G_i - G_j)`` per key channel, which does not factor into a matmul without
risking overflow, so ``_intra_xla`` builds them in XLA from the exact pairwise decays (and
differentiates them with ``jax.vjp``); the state passing, outputs and state gradients stay
kernels.

Packed segments (``segment_ids [B,T]``) become ``r [B,H,T]``, the number of segment starts in
each chunk up to each token (the varlen semantics of flash-linear-attention's ``cu_seqlens``,
without realigning segments to chunk starts): every kernel and XLA part masks with it (see
``pallas_kernels``). Segment boundaries may fall anywhere in a chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.common.dispatch import NotSupportedError
from ops.memory.gated_delta import pallas_calls as calls
from ops.memory.gated_delta.pallas_calls import Config
from ops.memory.gated_delta.reference import segment_resets

f32 = jnp.float32


def _segment_masks(r, chunk):
  """``(same [B,H,N,C,C] bool, cont [B,H,N,C,1] f32)`` from reset counts ``r [B,H,T]``, or
  ``(True, 1.0)`` without segments: pairs in one segment, rows in the entering state's."""
  if r is None:
    return True, 1.0
  B, H, T = r.shape
  rc = r.reshape(B, H, T // chunk, chunk, 1)
  return rc == jnp.swapaxes(rc, -1, -2), (rc == 0).astype(f32)


def _wy_xla(k, v, beta, g_cum, chunk, r=None):
  """Scalar decay, the WY transform in plain jnp (for its vjp): ``(W, U)`` float32."""
  B, H, T, K = k.shape
  V, C = v.shape[-1], chunk
  chunks = lambda x: x.astype(f32).reshape(B, H, T // C, C, x.shape[-1])
  k, v, b, G = chunks(k), chunks(v), chunks(beta[..., None]), chunks(g_cum[..., None])
  same, cont = _segment_masks(r, C)
  strict = jnp.tril(jnp.ones((C, C), bool), -1) & same
  diff = jnp.where(strict, G - jnp.swapaxes(G, -1, -2), 0.0)
  a = jnp.where(strict, b * (k @ jnp.swapaxes(k, -1, -2)) * jnp.exp(diff), 0.0)
  eye = jnp.broadcast_to(jnp.eye(C, dtype=f32), a.shape)
  t = jax.scipy.linalg.solve_triangular(eye + a, eye, lower=True, unit_diagonal=True)
  w = t @ (b * jnp.exp(G) * cont * k)
  u = t @ (b * v)
  return w.reshape(B, H, T, K), u.reshape(B, H, T, V)


def _intra_xla(q, k, v, beta, g_cum, *, chunk, delta, r=None):
  """Per-channel decay, in plain jnp for its vjp: the within-chunk matrices.

  Args:
    q, k: ``[B,H,T,K]``.
    v: ``[B,H,T,V]``.
    beta: ``[B,H,T]``.
    g_cum: ``G [B,H,T,K]``, the within-chunk cumulative log decay.
    chunk: ``C``.
    delta: also build the WY matrices.
    r: ``None`` or the segment reset counts ``[B,H,T]`` (pairs across segments are 0).

  Returns:
    ``(P [B,H,N,C,C],)`` or ``(P, W [B,H,T,K], U [B,H,T,V])`` float32, with
    ``P[i,j] = sum_c q_ic k_jc exp(G_ic - G_jc)`` for ``j <= i``.
  """
  B, H, T, K = q.shape
  C = chunk
  N = T // C
  # Chunks lead so lax.map bounds the [B,H,C,C,K] pairwise decays to a few chunks at a time.
  chunks = lambda x: jnp.moveaxis(x.astype(f32).reshape(B, H, N, C, x.shape[-1]), 2, 0)
  causal = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)

  def one_chunk(xs):
    q, k, v, G, b, rc = xs
    same = True if rc is None else rc == jnp.swapaxes(rc, -1, -2)  # [B,H,C,C]
    keep = (causal & same)[..., None]
    diff = G[..., :, None, :] - G[..., None, :, :]
    pair = jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)  # [B,H,C,C,K]
    p = jnp.einsum("...ik,...jk,...ijk->...ij", q, k, pair)
    if not delta:
      return (p,)
    a = jnp.where(strict & same, b * jnp.einsum("...ik,...jk,...ijk->...ij", k, k, pair), 0.0)
    eye = jnp.broadcast_to(jnp.eye(C, dtype=f32), a.shape)
    t = jax.scipy.linalg.solve_triangular(eye + a, eye, lower=True, unit_diagonal=True)
    cont = 1.0 if rc is None else (rc == 0).astype(f32)
    return p, t @ (b * jnp.exp(G) * cont * k), t @ (b * v)

  batch = max(1, min(N, (1 << 22) // (B * H * C * C * K)))
  rc = None if r is None else chunks(r[..., None])
  xs = (chunks(q), chunks(k), chunks(v), chunks(g_cum), chunks(beta[..., None]), rc)
  outs = jax.lax.map(one_chunk, xs, batch_size=batch)
  p = jnp.moveaxis(outs[0], 0, 2)
  if not delta:
    return (p,)
  unchunk = lambda x: jnp.moveaxis(x, 0, 2).reshape(B, H, T, x.shape[-1])
  return p, unchunk(outs[1]), unchunk(outs[2])


def _layouts(x, chunk):
  """``[B,H,T]`` -> ``(col [B,H,T,1], row [B,H,N,1,C])``: free reshapes of one array."""
  B, H, T = x.shape
  return x[..., None], x.reshape(B, H, T // chunk, 1, chunk)


def _decay_forms(cfg, g_cum):
  """``(g, grow, glast)``: ``G`` as kernel operands.

  Scalar decay: ``g [B,H,T,1]``, ``grow [B,H,N,1,C]``, no ``glast``. Per channel:
  ``g [B,H,T,K]``, no ``grow``, ``glast [B,H,N,K,1]`` (each chunk's total decay as a column).
  """
  if cfg.channel:
    B, H, T, K = g_cum.shape
    return g_cum, None, g_cum.reshape(B, H, T // cfg.chunk, cfg.chunk, K)[..., -1, :, None]
  gcol, grow = _layouts(g_cum, cfg.chunk)
  return gcol, grow, None


def _forward(cfg, q, k, v, g_cum, beta, h0, r):
  g, grow, glast = _decay_forms(cfg, g_cum)
  seg = None if r is None else _layouts(r, cfg.chunk)
  p = None
  if cfg.channel:
    outs = _intra_xla(q, k, v, beta, g_cum, chunk=cfg.chunk, delta=cfg.delta, r=r)
    p, (w, u) = outs[0], (outs[1:] if cfg.delta else (None, v))
  elif cfg.delta:
    bcol, brow = _layouts(beta, cfg.chunk)
    w, u = calls.wy(cfg, k, v, bcol, brow, g, grow, seg)
  else:
    w, u = None, v
  hs, vn, ht = calls.state_fwd(cfg, k, w, u, g, glast, h0, seg)
  vn = vn if cfg.delta else v
  return calls.output(cfg, q, k, vn, g, grow, p, hs, v.dtype, seg), ht


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_delta(cfg, q, k, v, g_cum, beta, h0, r):
  return _forward(cfg, q, k, v, g_cum, beta, h0, r)


def _gated_delta_fwd(cfg, q, k, v, g_cum, beta, h0, r):
  return _forward(cfg, q, k, v, g_cum, beta, h0, r), (q, k, v, g_cum, beta, h0, r)


def _gated_delta_bwd(cfg, res, cotangents):
  q, k, v, g_cum, beta, h0, r = res
  do, dht = cotangents
  g, grow, glast = _decay_forms(cfg, g_cum)
  seg = None if r is None else _layouts(r, cfg.chunk)
  # f32 primals so the XLA part's cotangents are not rounded to bf16 before they are summed.
  primals = (q.astype(f32), k.astype(f32), v.astype(f32), beta, g_cum)
  p, xla_vjp = None, None
  if cfg.channel:
    intra = functools.partial(_intra_xla, chunk=cfg.chunk, delta=cfg.delta, r=r)
    outs, xla_vjp = jax.vjp(intra, *primals)
    p, (w, u) = outs[0], (outs[1:] if cfg.delta else (None, v))
  elif cfg.delta:
    wy = lambda q, k, v, beta, g_cum: _wy_xla(k, v, beta, g_cum, cfg.chunk, r)
    (w, u), xla_vjp = jax.vjp(wy, *primals)
  else:
    w, u = None, v
  hs, vn, _ = calls.state_fwd(cfg, k, w, u, g, glast, h0, seg)
  vn = vn if cfg.delta else v
  dhs, dvn, dh0 = calls.state_bwd(cfg, q, k, w, do, g, grow, p, glast, dht.astype(f32), seg)
  gr = calls.grads(cfg, q, k, vn, do, dvn, g, grow, hs, dhs, seg)
  dq, dk, dg = gr["dq"], gr["dk"], gr["dg"]
  if cfg.channel:
    B, H, T, K = q.shape
    # The exp(G_C) h term of the state update, per channel: a sum over the value dim of h * dh
    # (absent in a chunk with a segment start, whose leaving state forgets h).
    to_end = jnp.exp(glast[..., 0]) * jnp.sum(hs * dhs, axis=-1)  # [B,H,N,K]
    if r is not None:
      to_end = to_end * (r.reshape(B, H, T // cfg.chunk, cfg.chunk)[..., -1:] == 0)
    dg = dg.reshape(B, H, T // cfg.chunk, cfg.chunk, K).at[..., -1, :].add(to_end)
    dg = dg.reshape(B, H, T, K)
  else:
    dg = dg[..., 0]
  dv, dbeta = dvn, jnp.zeros_like(beta)
  if xla_vjp is not None:
    cot = ((gr["p_out"],) if cfg.channel else ()) + ((gr["dw"], dvn) if cfg.delta else ())
    dq_x, dk_x, dv_x, dbeta_x, dg_x = xla_vjp(cot)
    dq, dk, dg = dq + dq_x, dk + dk_x, dg + dg_x
    if cfg.delta:
      dv, dbeta = dv_x, dbeta_x
  dr = None if r is None else jnp.zeros_like(r)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dh0, dr


_gated_delta.defvjp(_gated_delta_fwd, _gated_delta_bwd)


def padded_width(platform: str, n: int) -> int:
  """The head width (K or V) the kernels run at for a caller's width ``n``.

  Triton tiles are powers of two and its dots need every dim >= 16, so GPU widths round up to
  a power of two >= 16. Mosaic tiles take a lane dim that is a multiple of 128 or the whole
  array; widths up to 128 round up to a power of two >= 16 (a whole number of bf16 sublane
  tiles, dividing the 128 lanes), wider ones to a multiple of 128. Zero-padding is exact (see
  ``chunk_gated_delta_rule``), so this only costs the padded work.
  """
  if n < 1:
    raise ValueError(f"head widths must be positive, got {n}")
  if platform == "tpu" and n > 128:
    return -(-n // 128) * 128
  return max(16, 1 << (n - 1).bit_length())


# Per-program budget of the GPU kernels: what a Triton program loads (twice inside the
# pipelined chunk loop) plus its loop carries, which must fit the 227 KiB of shared memory per
# block of an H100/H200 with room for the intermediates not counted here.
# tests/ops/test_kernel_footprint.py measures the same quantity from the traced kernels.
GPU_BUDGET_BYTES = 192 * 1024


def gpu_program_bytes(*, chunk, k, block_v, itemsize, delta, channel):
  """Largest per-program working set of the GPU kernels for chunk ``C``, padded ``K`` and
  value block ``BV`` (bytes; the state-gradient pass, which loads the most per chunk, or the
  per-chunk gradients, which hold two ``[K,BV]`` states)."""
  C, K, BV, a = chunk, k, block_v, itemsize
  decay = C * K * 4 + C * C * 4 if channel else 3 * C * 4
  per_chunk = 2 * C * K * a + (C * K * 4 if delta else 0) + C * BV * 4 + decay + 2 * C * 4
  sequential = 2 * per_chunk + 2 * K * BV * 4
  parallel = 2 * C * K * a + 3 * C * BV * 4 + decay + 2 * K * BV * 4
  return max(sequential, parallel)


def _tiles(platform, K, V, chunk, block_v, *, itemsize, delta, channel):
  """``(chunk, block_v)`` the kernels run at.

  TPU: value blocks of 128 lanes (or all of V); every block is far below the scoped VMEM.
  GPU: the largest chunk (at most the caller's) and then value block (64, 32 or 16) whose
  working set fits ``GPU_BUDGET_BYTES``: wide keys (BASED/JRT pad K to 512) take a chunk of
  16 and value blocks of 16 or 32 rather than one ``[K,V]`` f32 state per program. The chunked
  form is exact for any chunk, so a smaller one changes only the summation order.
  """
  if platform == "tpu":
    return chunk, block_v if block_v is not None else (128 if V % 128 == 0 else V)
  blocks = [b for b in (64, 32, 16) if V % b == 0] if block_v is None else [block_v]
  blocks = blocks or [V]
  fits = lambda c, b: (
    gpu_program_bytes(chunk=c, k=K, block_v=b, itemsize=itemsize, delta=delta, channel=channel)
    <= GPU_BUDGET_BYTES
  )
  c = chunk
  while True:
    for b in blocks:
      if fits(c, b) or (c <= 16 and b == blocks[-1]):
        return c, b
    c //= 2


def chunk_gated_delta_rule(
  q,
  k,
  v,
  g,
  beta,
  *,
  scale: float,
  initial_state,
  chunk_size: int,
  interpret: bool,
  platform: str,
  block_v: int | None = None,
  segment_ids=None,
):
  """Chunked gated delta rule with Pallas kernels (see ``pallas_tpu``/``pallas_gpu``).

  Any ``K`` and ``V`` are served: both are zero-padded to :func:`padded_width` and the outputs
  sliced back. Padded key channels are zero in ``q``, ``k`` and the state (and take ``g = 0``),
  so ``k k^T``, ``S^T k`` and ``S^T q`` do not see them and their state rows stay zero; padded
  value columns are zero in ``v`` and the state, and every value column of the state evolves
  on its own, so they stay zero too.

  Args:
    q: ``[B,T,H,K]``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` (per key channel) float32 log decay (<= 0).
    beta: ``None`` (additive write) or ``[B,T,H]`` float32 (delta rule).
    scale: output scale (not derived from ``K``, so padding leaves it as the caller's).
    initial_state: ``None`` or ``[B,H,K,V]`` float32.
    chunk_size: ``C``, a power of two; T is padded up to a multiple of it (padding leaves the
      state as is). The kernels run at ``max(C, 16)``, the smallest tile both compilers take:
      the chunked form is exact for any chunk size, so this changes only the summation order.
    interpret: run in the Pallas interpreter (CPU testing).
    platform: ``"tpu"`` or ``"gpu"``.
    block_v: value-dim block of the sequential kernels; must divide the padded V (default: by
      platform).
    segment_ids: optional ``[B,T]`` int ids of packed sequences; the state is zeroed where the
      id changes (token 0 keeps ``initial_state``), as in ``xla``/``reference``.

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32)``.

  Raises:
    NotSupportedError: a chunk size / value block the platform cannot tile.
    ValueError: inconsistent shapes or dtypes.
  """
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k [B,T,H,K] and v [B,T,H,V] disagree: {q.shape}, {k.shape}, {v.shape}")
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
    raise ValueError(f"g must be [B,T,H]={(B, T, H)} or [B,T,H,K], got {g.shape}")
  if beta is not None and beta.shape != (B, T, H):
    raise ValueError(f"beta must be [B,T,H]={(B, T, H)}, got {beta.shape}")
  if initial_state is not None and initial_state.shape != (B, H, K, V):
    raise ValueError(f"initial_state must be [B,H,K,V]={(B, H, K, V)}, got {initial_state.shape}")
  if segment_ids is not None and (
    segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(f"segment_ids must be int [B,T]={(B, T)}, got {segment_ids.shape}")
  if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (q, k, v)):
    raise ValueError(f"q, k, v must be floating, got {q.dtype}, {k.dtype}, {v.dtype}")
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  Kp, Vp = padded_width(platform, K), padded_width(platform, V)
  if block_v is not None and (block_v <= 0 or Vp % block_v):
    raise ValueError(f"block_v={block_v} must divide the padded V={Vp} (V={V})")
  # Triton: every tile a power of two, every matmul dim >= 16. Mosaic: chunk rows a multiple
  # of the (bf16) sublane tile, value blocks a multiple of the 128 lanes (or all of V). Smaller
  # chunks run as 16: the result is the same chunked math with one more level of summation.
  if isinstance(C, int) and 0 < C < 16 and C & (C - 1) == 0:
    C = 16
  if isinstance(C, int) and C >= 16 and C & (C - 1) == 0:
    itemsize = max(jnp.dtype(q.dtype).itemsize, jnp.dtype(k.dtype).itemsize)
    C, block_v = _tiles(
      platform,
      Kp,
      Vp,
      C,
      block_v,
      itemsize=itemsize,
      delta=beta is not None,
      channel=g is not None and g.ndim == 4,
    )
  elif block_v is None:
    block_v = Vp
  pow2_16 = lambda n: n >= 16 and n & (n - 1) == 0
  if platform == "gpu" and not (pow2_16(C) and pow2_16(block_v)):
    raise NotSupportedError(f"Triton needs powers of two >= 16 for C, block_v; got {C}, {block_v}")
  if platform == "tpu" and C % 16:
    raise NotSupportedError(f"TPU chunk size must be a multiple of 16, got {C}")
  if platform == "tpu" and not interpret and block_v != Vp and block_v % 128:
    raise NotSupportedError(f"TPU block_v must be V or a multiple of 128, got {block_v}")

  cfg = Config(
    platform=platform,
    scale=float(scale),
    chunk=C,
    delta=beta is not None,
    block_v=block_v,
    interpret=bool(interpret),
    channel=g is not None and g.ndim == 4,
    segments=segment_ids is not None,
    # The precision policy: bf16 inputs feed the dots in bf16 (float32 accumulation).
    operands="bfloat16" if q.dtype == jnp.bfloat16 and k.dtype == jnp.bfloat16 else "float32",
  )
  pad = -T % C
  Tp = T + pad

  # [B,T,H,...] -> [B,H,Tp,...], zero-padded in time (k = v = g = beta = 0 leave the state as
  # is) and, for head dims, up to the padded width.
  def head_major(x, width=None):
    dims = [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)
    if width is not None:
      dims[-1] = (0, width - x.shape[-1])
    return jnp.pad(jnp.swapaxes(x, 1, 2), dims)

  q, k, v = head_major(q, Kp), head_major(k, Kp), head_major(v, Vp)
  if g is None:
    g = jnp.zeros((B, H, Tp), f32)
  else:
    g = head_major(g.astype(f32), Kp if g.ndim == 4 else None)
  beta = jnp.zeros((B, H, Tp), f32) if beta is None else head_major(beta.astype(f32))
  g_cum = jnp.cumsum(g.reshape(B, H, Tp // C, C, -1), axis=3).reshape(g.shape)
  if initial_state is None:
    h0 = jnp.zeros((B, H, Kp, Vp), f32)
  else:
    h0 = jnp.pad(initial_state.astype(f32), [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)])
  r = None
  if segment_ids is not None:
    # Reset counts within each chunk; padded tokens continue the last segment (no reset).
    resets = jnp.pad(segment_resets(segment_ids), [(0, 0), (0, pad)])
    r = jnp.cumsum(resets.reshape(B, Tp // C, C).astype(jnp.int32), axis=-1)
    r = jnp.broadcast_to(r.reshape(B, 1, Tp).astype(f32), (B, H, Tp))
  o, ht = _gated_delta(cfg, q, k, v, g_cum, beta, h0, r)
  return jnp.swapaxes(o[:, :, :T, :V], 1, 2), ht[:, :, :K, :V]
