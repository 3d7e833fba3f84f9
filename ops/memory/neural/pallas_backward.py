"""Backward pass of the Pallas neural memory: a reverse scan of ``xla._chunk``'s VJP.

The forward kernel (run by the ``custom_vjp``'s forward rule) stores the weights ``M_n`` and
momentum ``U_n`` entering every chunk. Given those, the chunks' cotangents need one pass from
the last chunk to the first, in which each step is the VJP of the same chunk map ``xla.py``
scans (``xla._chunk``, differentiated by ``jax.vjp``; it recomputes that one chunk's forward).
So training costs the kernel forward plus xla's backward; xla's own forward scan, which a
plain ``jax.vjp`` of the xla implementation would redo, is skipped. A Pallas backward kernel
would replace this scan; it is not written yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops.memory.neural import xla


def _chunk_layout(cfg, T):
  """``(place, by_chunk, N)``: ``[B,T,H,...]`` -> the chunk grid -> ``[N,B,H,C,...]``."""
  C, o = cfg.chunk, cfg.offset
  N = -(-(o + T) // C)

  def place(x, fill):
    pad = [(0, 0), (o, N * C - o - T)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)

  def by_chunk(x):
    x = x.reshape(x.shape[0], N, C, *x.shape[2:])  # [B,N,C,H,...]
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

  return place, by_chunk, N


def _xla_chunks(cfg, q, k, v, theta, eta, alpha, gamma):
  """The per-chunk inputs of ``xla._chunk`` with the Omega window 1, stacked ``[N,...]``."""
  place, by_chunk, _ = _chunk_layout(cfg, q.shape[1])
  valid = jnp.ones_like(theta)
  return (
    by_chunk(place(q, 0.0)),
    by_chunk(place(theta, 0.0)),
    by_chunk(place(eta, 1.0)),
    by_chunk(place(1.0 - alpha, 1.0)),
    by_chunk(place(valid, 0.0)),
    by_chunk(place(k, 0.0)),
    by_chunk(place(v, 0.0)),
    by_chunk(place(gamma, 0.0)),
  )


def backward(cfg, args, states, cotangents):
  """Cotangents of ``(q, k, v, theta, eta, alpha, gamma, weights, momentum, chunk_start)``.

  Args:
    cfg: the kernel's ``pallas_common.Config``.
    args: the forward's inputs (``[B,T,H,*]`` and ``{name: [B,H,m,n]}``).
    states: ``(weights, momentum)`` entering every chunk, ``{name: [B,H,N,m,n]}``.
    cotangents: of ``(y [B,T,H,V], weights, momentum, chunk_start)`` after the input.

  Returns:
    One cotangent per entry of ``args``.
  """
  q, k, v, theta, eta, alpha, gamma, weights, momentum, chunk_start = args
  dy, d_weights, d_momentum, d_chunk_start = cotangents
  T = q.shape[1]
  o = cfg.offset
  place, by_chunk, N = _chunk_layout(cfg, T)
  chunks, chunks_vjp = jax.vjp(
    functools.partial(_xla_chunks, cfg), q, k, v, theta, eta, alpha, gamma
  )
  dys = by_chunk(place(dy, 0.0))
  ms, us = (jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), s) for s in states)
  m0_first = weights if o == 0 else chunk_start
  chunk_fn = functools.partial(xla._chunk, **cfg.xla_options)
  zeros = jax.tree.map(jnp.zeros_like, weights)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  masked = lambda cond, tree: jax.tree.map(lambda x: jnp.where(cond, x, 0.0), tree)
  # The chunk_start output is the last chunk's M0, or the final weights when the input ends
  # on a chunk boundary (api/xla: the next token then opens a new chunk).
  boundary = (o + T) % cfg.chunk == 0

  def body(carry, xs):
    d_m, d_u, d_m0_first = carry  # cotangents of the weights/momentum leaving chunk n
    n, m, u, chunk, dy_n = xs
    m0 = jax.tree.map(lambda a, b: jnp.where(n == 0, a, b), m0_first, m)
    _, vjp = jax.vjp(chunk_fn, (m, u, m0), chunk)
    # xla._chunk returns (M', U', M') and the next chunk's M0 is M': d_m already holds both.
    (d_m_in, d_u_in, d_m0), d_chunk = vjp(((d_m, d_u, zeros), dy_n))
    if not boundary:
      d_m0 = add(d_m0, masked(n == N - 1, d_chunk_start))
    # M0 is M itself after the first chunk; the first chunk's M0 is an input.
    d_m_in = add(d_m_in, masked(n > 0, d_m0))
    d_m0_first = add(d_m0_first, masked(n == 0, d_m0))
    return (d_m_in, d_u_in, d_m0_first), d_chunk

  d_final = add(d_weights, d_chunk_start) if boundary else d_weights
  (d_m, d_u, d_m0_first), d_chunks = jax.lax.scan(
    body, (d_final, d_momentum, zeros), (jnp.arange(N), ms, us, chunks, dys), reverse=True
  )
  d_inputs = chunks_vjp(d_chunks)
  if o == 0:
    d_m, d_chunk_start_in = add(d_m, d_m0_first), zeros
  else:
    d_chunk_start_in = d_m0_first
  return (*d_inputs, d_m, d_u, d_chunk_start_in)
