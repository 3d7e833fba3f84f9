"""Gated delta rule, production chunked version in pure JAX (XLA).

One ``lax.scan`` step per chunk of ``C`` tokens does the whole chunk: the intra-chunk matmuls,
the UT transform for the delta rule (a unit lower-triangular solve), the outputs and the state
update. The step is wrapped in ``jax.checkpoint`` so the backward pass recomputes a chunk from
its input state: saved residuals are one ``[B,H,K,V]`` state per chunk, memory linear in T.
The math is the one of ``reference.chunk_gated_delta_rule`` (derivation in ``README.md``), with
segment resets added for packed sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.memory.gated_delta.reference import segment_resets


def unit_lower_inverse(a):
  """``(I + a)^-1`` for strictly lower-triangular ``a [..., C, C]``, ``C`` a power of two.

  Block doubling: the inverse of ``[[L11, 0], [L21, L22]]`` is
  ``[[X11, 0], [-X22 L21 X11, X22]]`` with ``X = L^-1`` of the diagonal blocks, done for all
  blocks of one size at once, log2(C) levels of batched matmuls. It is exact like forward
  substitution (no series in ``a`` whose terms cancel) and far faster than XLA's triangular
  solve on CPU, which loops over tiny problems.
  """
  C = a.shape[-1]
  lead = a.shape[:-2]
  inv = jnp.ones((*lead, C, 1, 1), a.dtype)  # the 1x1 diagonal blocks of I + a
  size = 1
  while size < C:
    m = C // (2 * size)
    blocks = a.reshape(*lead, m, 2 * size, m, 2 * size)
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., m, 2s, 2s]
    x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
    x21 = -x22 @ diag[..., size:, :size] @ x11
    zeros = jnp.zeros_like(x11)
    top = jnp.concatenate([x11, zeros], axis=-1)
    bottom = jnp.concatenate([x21, x22], axis=-1)
    inv = jnp.concatenate([top, bottom], axis=-2)
    size *= 2
  return inv.reshape(*lead, C, C)


def _chunk_step(state, xs, *, scale: float, per_channel: bool):
  """One chunk. Leading dims ``[B,H]``, then ``C`` (time in chunk), then feature dims.

  Args:
    state: ``[B,H,K,V]`` float32 state before the chunk.
    xs: ``(q [B,H,C,K], k [B,H,C,K], v [B,H,C,V], g None|[B,H,C]|[B,H,C,K],
      beta None|[B,H,C], seg None|[B,1,C] running segment index, seg_before None|[B,1,1])``.
    scale: output scale.
    per_channel: whether ``g`` has a key-channel axis.

  Returns:
    ``(state [B,H,K,V], o [B,H,C,V])`` float32.
  """
  q, k, v, g, beta, seg, seg_before = xs
  C = q.shape[-2]
  i = jnp.arange(C)
  causal = i[:, None] >= i[None, :]
  if seg is not None:
    causal = causal & (seg[..., :, None] == seg[..., None, :])  # [B,1,C,C]
  strict = causal & (i[:, None] > i[None, :])

  if g is None:
    g = jnp.zeros(q.shape[:-1], jnp.float32)
  G = jnp.cumsum(g, axis=2)  # [B,H,C] or [B,H,C,K]
  if per_channel:
    # exp(G_i - G_j) per key channel, only where j <= i so no exponent is positive.
    diff = G[..., :, None, :] - G[..., None, :, :]
    pair = jnp.exp(jnp.where(causal[..., None], diff, -jnp.inf))  # [B,H,C,C,K]
    attn = jnp.einsum("bhik,bhjk,bhijk->bhij", q, k, pair)
    kk = None if beta is None else jnp.einsum("bhik,bhjk,bhijk->bhij", k, k, pair)
    G_end = G[..., -1:, :]
    decay_q, decay_end, chunk_decay = jnp.exp(G), jnp.exp(G_end - G), jnp.exp(G_end[..., 0, :])
  else:
    diff = G[..., :, None] - G[..., None, :]
    pair = jnp.exp(jnp.where(causal, diff, -jnp.inf))  # [B,H,C,C]
    attn = jnp.einsum("bhik,bhjk->bhij", q, k) * pair
    kk = None if beta is None else jnp.einsum("bhik,bhjk->bhij", k, k) * pair
    G_end = G[..., -1:]
    decay_q = jnp.exp(G)[..., None]
    decay_end = jnp.exp(G_end - G)[..., None]
    chunk_decay = jnp.exp(G_end)  # [B,H,1]

  k_end = decay_end * k  # k_j carried to the chunk end
  if seg is not None:
    # Tokens after a reset in this chunk do not see the incoming state, and only the last
    # segment of the chunk reaches the chunk's final state.
    cont = (seg == seg_before)[..., None].astype(jnp.float32)  # [B,1,C,1]
    same_end = (seg == seg[..., -1:])[..., None].astype(jnp.float32)
    decay_q = decay_q * cont
    k_end = k_end * same_end
    chunk_decay = chunk_decay * cont[..., -1, :]

  if beta is None:
    u = v
  else:
    b = beta[..., None]
    a = b * kk * strict
    t_inv = unit_lower_inverse(a)
    w, u_tilde = t_inv @ (b * decay_q * k), t_inv @ (b * v)
    u = u_tilde - w @ state

  o = scale * ((decay_q * q) @ state + attn @ u)
  state = chunk_decay[..., None] * state + jnp.swapaxes(k_end, -1, -2) @ u
  return state, o


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "interpret"))
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
  interpret: bool | None = None,
  segment_ids=None,
):
  """Chunked gated delta rule, memory linear in T.

  Args:
    q: ``[B,T,H,K]`` with ``T`` a multiple of ``chunk_size``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` float32 log decay (<= 0).
    beta: ``None`` (additive write) or ``[B,T,H]`` float32 in [0, 1] (delta write).
    scale: output scale.
    initial_state: ``None`` or ``[B,H,K,V]`` float32.
    chunk_size: ``C``.
    interpret: unused (no Pallas here); kept for the shared signature.
    segment_ids: optional ``[B,T]`` int; the state is zeroed where a new segment starts.

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32)``.
  """
  del interpret
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  if T % C:
    raise ValueError(f"xla gated_delta_rule: T={T} is not a multiple of chunk_size={C}")
  N = T // C
  per_channel = g is not None and g.ndim == 4

  def chunks(x):
    """``[B,T,H,...]`` -> ``[N,B,H,C,...]``."""
    if x is None:
      return None
    x = x.astype(jnp.float32).reshape(B, N, C, H, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))

  seg = seg_before = None
  if segment_ids is not None:
    index = jnp.cumsum(segment_resets(segment_ids).astype(jnp.int32), axis=1)  # [B,T]
    # The index of the token just before each chunk (token 0 for the first chunk).
    before = jnp.concatenate([index[:, :1], index[:, C - 1 : -1 : C]], axis=1)  # [B,N]
    seg = jnp.moveaxis(index.reshape(B, N, 1, C), 1, 0)
    seg_before = jnp.moveaxis(before, 1, 0)[:, :, None, None]

  state = (
    jnp.zeros((B, H, K, V), jnp.float32)
    if initial_state is None
    else initial_state.astype(jnp.float32)
  )
  step = jax.checkpoint(lambda s, xs: _chunk_step(s, xs, scale=scale, per_channel=per_channel))
  xs = (chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta), seg, seg_before)
  state, o = jax.lax.scan(step, state, xs)
  o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, T, H, V)
  return o.astype(v.dtype), state
