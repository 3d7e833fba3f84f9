"""Gated delta rule: the two references (the specification).

``recurrent_gated_delta_rule`` is the definition: one state update per token under ``lax.scan``.
``chunk_gated_delta_rule`` is the chunked math the kernels implement (intra-chunk matmuls, the
UT/WY form for the delta rule, an inter-chunk state scan), in plain ``jnp`` with float32
accumulation and no tricks. The derivation is in ``README.md``.

Both take the internal kernel convention: ``g`` is ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` float32
log decay, ``beta`` is ``None`` or ``[B,T,H]`` float32, ``initial_state`` is ``None`` or
``[B,H,K,V]`` float32; outputs are ``[B,T,H,V]`` in ``v``'s dtype and the final state float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.common.dispatch import NotSupportedError


def recurrent_step(state, q, k, v, g, beta, *, scale):
  """One token of the recurrence.

  Args:
    state: ``[B,H,K,V]`` float32, the state after the previous token.
    q: ``[B,H,K]``.
    k: ``[B,H,K]``.
    v: ``[B,H,V]``.
    g: ``None``, ``[B,H]`` or ``[B,H,K]`` log decay.
    beta: ``None`` or ``[B,H]`` write strength.
    scale: output scale.

  Returns:
    ``(o [B,H,V] float32, state [B,H,K,V] float32)``.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if g is not None:
    g = g.astype(jnp.float32)
    decay = jnp.exp(g)[..., None, None] if g.ndim == 2 else jnp.exp(g)[..., None]
    state = decay * state
  if beta is None:
    state = state + k[..., :, None] * v[..., None, :]
  else:
    pred = jnp.einsum("bhk,bhkv->bhv", k, state)
    err = beta.astype(jnp.float32)[..., None] * (v - pred)
    state = state + k[..., :, None] * err[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
  return o, state


def segment_resets(segment_ids):
  """``[B,T]`` ids -> ``[B,T]`` bool, True where the state is zeroed before the token.

  A token starts a new segment when its id differs from the previous token's; token 0 never
  resets, so an initial state applies to the first segment.
  """
  prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  return segment_ids != prev


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "interpret"))
def recurrent_gated_delta_rule(
  q,
  k,
  v,
  g,
  beta,
  *,
  scale: float,
  initial_state,
  chunk_size: int | None = None,
  interpret: bool | None = None,
  segment_ids=None,
):
  """The definition: the per-token recurrence under ``lax.scan``.

  Args:
    q: ``[B,T,H,K]``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` log decay (<= 0).
    beta: ``None`` (additive write) or ``[B,T,H]`` in [0, 1] (delta write).
    scale: output scale.
    initial_state: ``None`` or ``[B,H,K,V]`` float32.
    chunk_size: unused (the recurrence has no chunks); kept for the shared signature.
    interpret: unused; kept for the shared signature.
    segment_ids: optional ``[B,T]`` int; the state is zeroed where a new segment starts.

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32)``.
  """
  del chunk_size, interpret
  B, T, H, K = q.shape
  V = v.shape[-1]
  state = (
    jnp.zeros((B, H, K, V), jnp.float32)
    if initial_state is None
    else initial_state.astype(jnp.float32)
  )
  resets = jnp.zeros((B, T), bool) if segment_ids is None else segment_resets(segment_ids)
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def body(state, xs):
    q_t, k_t, v_t, g_t, beta_t, reset_t = xs
    state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    o_t, state = recurrent_step(state, q_t, k_t, v_t, g_t, beta_t, scale=scale)
    return state, o_t

  xs = tuple(time_major(x) for x in (q, k, v, g, beta, resets))
  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def _pad_time(x, pad):
  if x is None or pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths)


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
  """The chunked math in plain ``jnp`` (what the kernels compute); no segment resets.

  Within a chunk of ``C`` tokens with cumulative log decay ``G`` (per key channel), the
  pseudo-values ``U = T^-1 diag(beta) (V - (exp(G) * K) S0)`` with ``T = I + A``,
  ``A_ij = beta_i sum_k K_ik K_jk exp(G_ik - G_jk)`` (j < i), give every token's output and the
  chunk's final state through matmuls; a scan carries the state between chunks.

  Args:
    q: ``[B,T,H,K]``.
    k: ``[B,T,H,K]``.
    v: ``[B,T,H,V]``.
    g: ``None``, ``[B,T,H]`` or ``[B,T,H,K]`` log decay (<= 0).
    beta: ``None`` or ``[B,T,H]``.
    scale: output scale.
    initial_state: ``None`` or ``[B,H,K,V]`` float32.
    chunk_size: ``C``; T is padded to a multiple of it here (padding leaves the state as is).
    interpret: unused; kept for the shared signature.
    segment_ids: must be None (this form has no segment resets).

  Returns:
    ``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32)``.

  Raises:
    NotSupportedError: ``segment_ids`` given.
  """
  del interpret
  if segment_ids is not None:
    raise NotSupportedError("reference_chunked does not take segment_ids (packed sequences)")
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  out_dtype = v.dtype
  pad = -T % C
  N = (T + pad) // C
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  q, k, v, g, beta = (_pad_time(f32(x), pad) for x in (q, k, v, g, beta))
  if g is None:
    g = jnp.zeros((B, T + pad, H, K), jnp.float32)
  elif g.ndim == 3:
    g = jnp.broadcast_to(g[..., None], (B, T + pad, H, K))

  # [B,T,H,...] -> [N,B,H,C,...]: chunks lead so the state scan runs over them.
  chunks = lambda x: jnp.moveaxis(x.reshape(B, N, C, H, *x.shape[3:]), (1, 3), (0, 2))
  q, k, v, g = (chunks(x) for x in (q, k, v, g))
  G = jnp.cumsum(g, axis=3)  # [N,B,H,C,K]

  i = jnp.arange(C)
  causal = i[:, None] >= i[None, :]
  strict = i[:, None] > i[None, :]
  # exp(G_i - G_j) only where j <= i, so every exponent is <= 0.
  diff = G[..., :, None, :] - G[..., None, :, :]  # [N,B,H,C,C,K]
  pair_decay = jnp.exp(jnp.where(causal[:, :, None], diff, -jnp.inf))
  attn = jnp.einsum("...ik,...jk,...ijk->...ij", q, k, pair_decay)  # [N,B,H,C,C]
  q_decayed = jnp.exp(G) * q
  k_to_end = jnp.exp(G[..., -1:, :] - G) * k
  chunk_decay = jnp.exp(G[..., -1, :])  # [N,B,H,K]

  if beta is None:
    w = None
    u_tilde = v
  else:
    b = chunks(beta[..., None])  # [N,B,H,C,1]
    a = b * jnp.einsum("...ik,...jk,...ijk->...ij", k, k, pair_decay) * strict
    t_inv = jax.scipy.linalg.solve_triangular(
      jnp.eye(C) + a, jnp.broadcast_to(jnp.eye(C), a.shape), lower=True, unit_diagonal=True
    )
    w = t_inv @ (b * jnp.exp(G) * k)  # [N,B,H,C,K]
    u_tilde = t_inv @ (b * v)  # [N,B,H,C,V]

  def body(state, xs):
    q_dec, attn_c, u_c, w_c, k_end, decay = xs
    u = u_c if w_c is None else u_c - w_c @ state
    o = scale * (q_dec @ state + attn_c @ u)
    state = decay[..., None] * state + jnp.swapaxes(k_end, -1, -2) @ u
    return state, o

  state = (
    jnp.zeros((B, H, K, V), jnp.float32)
    if initial_state is None
    else initial_state.astype(jnp.float32)
  )
  state, o = jax.lax.scan(body, state, (q_decayed, attn, u_tilde, w, k_to_end, chunk_decay))
  o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
  return o.astype(out_dtype), state
