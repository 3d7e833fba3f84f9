"""Chunked parallel form of the neural memory: gradients as matmuls at the chunk-start weights.

Within a chunk every inner gradient is a sum of rank-1 terms ``left_s (x) right_s`` taken at
the chunk-start weights, and the momentum / decay recurrences are linear, so the weights after
token ``i`` are ``A_i M + B_i U - sum_s coef[i, s] left_s (x) right_s``; reading them with a
query is then attention-like (``(coef * x left^T) @ right``) and per-token weights are never
formed (except for the Muon option, whose Newton-Schulz step is not linear and materialises
them chunk-locally). The derivation is in this folder's README. A ``lax.scan`` carries the
weights from chunk to chunk; its body is rematerialised in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops.memory.neural import common

HIGHEST = common.HIGHEST


def _segment_products(x: jax.Array) -> jax.Array:
  """``x [..., C] -> E [..., C, C]`` with ``E[i, j] = prod_{l=j+1..i} x_l`` (i >= j), else 0.

  Built with ``cumprod`` rather than ratios of cumulative products, so gates equal to 0 keep
  exact values and finite gradients.
  """
  idx = jnp.arange(x.shape[-1])
  factors = jnp.where(idx[:, None] > idx[None, :], x[..., :, None], 1.0)  # [..., l, j]
  prods = jnp.cumprod(factors, axis=-2)
  return jnp.where(idx[:, None] >= idx[None, :], prods, 0.0)


def _gradient_factors(m0, keys, values, activation, residual, objective):
  """Per-token inner-loss gradients at ``m0`` as rank-1 factors.

  Args:
    m0: weights ``[B,H,...]``.
    keys: [B,H,X,F]; values: [B,H,X,V].
    objective: "l2" (``||m0(k_s) - v_s||^2``) or "dot" (``-<m0(k_s), v_s>``).

  Returns:
    ``{name: (left [B,H,X,m], right [B,H,X,n])}`` with ``grad_name L(m0(k_s), v_s) =
    left_s (x) right_s``. The output error ``e_s = dL/dy`` is ``2 (m0(k_s) - v_s)`` for "l2"
    and ``-v_s`` for "dot", where it does not depend on ``m0`` (nor does a depth-1 gradient).
  """

  def output_error(pred):
    if objective == "dot":
      return -values
    return 2.0 * (pred + keys - values if residual else pred - values)

  if common.memory_depth(m0) == 1:
    if objective == "dot":
      return {"w": (keys, -values)}
    pred = jnp.einsum("bhxf,bhfv->bhxv", keys, m0["w"], precision=HIGHEST)
    return {"w": (keys, output_error(pred))}
  h = jnp.einsum("bhxf,bhfd->bhxd", keys, m0["w1"], precision=HIGHEST)
  z, act_vjp = jax.vjp(common.ACTIVATIONS[activation], h)
  pred = jnp.einsum("bhxd,bhdv->bhxv", z, m0["w2"], precision=HIGHEST)
  err = output_error(pred)
  (delta,) = act_vjp(jnp.einsum("bhxv,bhdv->bhxd", err, m0["w2"], precision=HIGHEST))
  return {"w1": (keys, delta), "w2": (z, err)}


def _read_layer(x, m, u, left, right, a_coef, u_coef, coef):
  """``x @ W_i`` for every token ``i`` of the chunk without forming ``W_i``.

  ``W_i = a_coef_i m + u_coef_i u - sum_s coef[i, s] left_s (x) right_s``.

  Args:
    x: [B,H,C,m]; m, u: [B,H,m,n]; left: [B,H,X,m]; right: [B,H,X,n];
    a_coef, u_coef: [B,H,C]; coef: [B,H,C,X].

  Returns:
    [B,H,C,n].
  """
  out = a_coef[..., None] * jnp.einsum("bhcm,bhmn->bhcn", x, m, precision=HIGHEST)
  out += u_coef[..., None] * jnp.einsum("bhcm,bhmn->bhcn", x, u, precision=HIGHEST)
  scores = coef * jnp.einsum("bhcm,bhxm->bhcx", x, left, precision=HIGHEST)
  return out - jnp.einsum("bhcx,bhxn->bhcn", scores, right, precision=HIGHEST)


def _outer_sum(coef, left, right):
  """``sum_s coef[..., s] left_s (x) right_s``: coef [B,H,(C,)X] -> [B,H,(C,)m,n]."""
  return jnp.einsum("bh...x,bhxm,bhxn->bh...mn", coef, left, right, precision=HIGHEST)


def _chunk(
  carry,
  chunk,
  *,
  window,
  objective,
  optimizer,
  ns_steps,
  activation,
  residual,
  self_targets=False,
):
  """One chunk: ``carry = (M, U, M0)`` -> next carry and the outputs ``[B,H,C,V]``.

  With ``self_targets`` the ``values`` stream holds the targets' inputs ``phi(v)`` and the
  targets are ``M0(phi(v))`` for the chunk's tokens and its window alike, as in the reference.
  """
  weights, momentum, m0 = carry
  q, theta, eta, keep, valid, keys, values, gammas = chunk
  if self_targets:
    per_token = jax.tree.map(lambda w: w[:, :, None], m0)  # [B,H,1,m,n] against [B,H,X,F]
    values = common.mlp_apply(per_token, values, activation, residual)
  size = q.shape[2]
  # band[j, s]: stream token s (chunk token j sits at s = j + window - 1) is in j's window.
  lag = np.arange(size)[:, None] + window - 1 - np.arange(size + window - 1)[None, :]
  # Padding slots (valid = 0) neither take a gradient step nor add the momentum to the weights.
  omega = valid[..., :, None] * gammas[..., None, :] * ((lag >= 0) & (lag < window))  # [B,H,C,X]
  factors = _gradient_factors(m0, keys, values, activation, residual, objective)
  eta_seg, eta_cum = _segment_products(eta), jnp.cumprod(eta, axis=-1)
  keep_seg = _segment_products(keep) * valid[..., None, :]
  keep_cum = jnp.cumprod(keep, axis=-1)

  if optimizer == "momentum":
    coef = jnp.einsum(
      "bhim,bhmj,bhjx->bhix", keep_seg, eta_seg * theta[..., None, :], omega, precision=HIGHEST
    )
    u_coef = jnp.einsum("bhim,bhm->bhi", keep_seg, eta_cum, precision=HIGHEST)
    mom_coef = jnp.einsum("bhj,bhjx->bhx", eta_seg[..., -1, :] * theta, omega, precision=HIGHEST)
    read = lambda x, name: _read_layer(
      x, weights[name], momentum[name], *factors[name], keep_cum, u_coef, coef
    )
    if len(factors) == 1:
      y = read(q, "w")
    else:
      y = read(common.ACTIVATIONS[activation](read(q, "w1")), "w2")
    y = y + q if residual else y
    new_weights = {
      name: keep_cum[..., -1, None, None] * weights[name]
      + u_coef[..., -1, None, None] * momentum[name]
      - _outer_sum(coef[..., -1, :], left, right)
      for name, (left, right) in factors.items()
    }
    new_momentum = {
      name: eta_cum[..., -1, None, None] * momentum[name] - _outer_sum(mom_coef, left, right)
      for name, (left, right) in factors.items()
    }
  else:
    # Muon: Newton-Schulz is not linear, so per-token momenta and weights are formed here.
    grad_coef = jnp.einsum("bhij,bhjx->bhix", eta_seg, omega, precision=HIGHEST)
    per_token_weights, per_token_momentum = {}, {}
    for name, (left, right) in factors.items():
      mom = eta_cum[..., None, None] * momentum[name][:, :, None] - _outer_sum(
        grad_coef, left, right
      )  # [B,H,C,m,n]
      ortho = common.newton_schulz(mom, ns_steps) * theta[..., None, None]
      per_token_weights[name] = keep_cum[..., None, None] * weights[name][:, :, None] + jnp.einsum(
        "bhim,bhmpq->bhipq", keep_seg, ortho, precision=HIGHEST
      )
      per_token_momentum[name] = mom
    y = common.mlp_apply(per_token_weights, q, activation, residual)
    new_weights = {name: w[:, :, -1] for name, w in per_token_weights.items()}
    new_momentum = {name: u[:, :, -1] for name, u in per_token_momentum.items()}
  return (new_weights, new_momentum, new_weights), y


def neural_memory(
  q, k, v, theta, eta, alpha, gamma, state, *, chunk_size, offset=None, interpret=False, **config
):
  """Chunked neural memory; same contract as ``reference.neural_memory``.

  The sequence is laid on a chunk grid that starts ``o = position % chunk_size`` tokens before
  the first token (``offset``: ``o`` when it is known statically, else None and it is read
  from the state). Slots outside the input are masked out of every update (and get
  ``eta = 1, alpha = 0`` so the scans pass through them); the Omega window reads a separate
  stream in which the state's last ``c - 1`` tokens sit right before the first input token.

  Args:
    q, k: [B,T,H,F] feature-mapped float32.
    v: [B,T,H,V] float32 (with ``self_targets``: [B,T,H,F], the target input).
    theta, eta, alpha, gamma: [B,T,H] float32.
    state: the state dict at the first token.
    chunk_size: tokens per chunk C.
    offset: static ``position % chunk_size`` or None.
    interpret: unused (no kernel).
    **config: window, objective, optimizer, ns_steps, activation, residual, self_targets.

  Returns:
    ``(y [B,T,H,V] float32, final_state)``.
  """
  del interpret
  batch, length, heads, _ = q.shape
  size, window = chunk_size, config["window"]
  o = state["position"] % size if offset is None else offset
  span = length + (size - 1 if offset is None else offset)
  padded = -(-span // size) * size
  n_chunks = padded // size

  def place(x, fill, total):
    base = jnp.full((batch, total, *x.shape[2:]), fill, x.dtype)
    return jax.lax.dynamic_update_slice(base, x, (0, o) + (0,) * (x.ndim - 2))

  def by_chunk(x):  # [B, N*C, H, ...] -> [N, B, H, C, ...]
    x = x.reshape(batch, n_chunks, size, heads, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

  history = lambda x, name: jnp.concatenate([jnp.moveaxis(state[name], 2, 1), x], axis=1)
  streams = [
    place(history(x, name), 0.0, padded + window - 1)
    for x, name in ((k, "window_k"), (v, "window_v"), (gamma, "window_gamma"))
  ]
  gather = np.arange(n_chunks)[:, None] * size + np.arange(size + window - 1)[None, :]
  # [N, B, H, X, ...] with X = C + window - 1: each chunk's tokens and the window before it.
  windows = [jnp.moveaxis(jnp.moveaxis(s[:, gather], 1, 0), 3, 2) for s in streams]
  chunks = (
    by_chunk(place(q, 0.0, padded)),
    by_chunk(place(theta, 0.0, padded)),
    by_chunk(place(eta, 1.0, padded)),
    by_chunk(place(1.0 - alpha, 1.0, padded)),
    by_chunk(place(jnp.ones_like(theta), 0.0, padded)),
    *windows,
  )

  weights, momentum = state["weights"], state["momentum"]
  first_m0 = jax.tree.map(lambda w, s: jnp.where(o == 0, w, s), weights, state["chunk_start"])
  next_chunk = (o + length) // size  # the chunk holding the token after the input
  chunk_fn = jax.checkpoint(lambda carry, xs: _chunk(carry, xs, **config))

  def body(carry, xs):
    index, chunk = xs
    (weights, momentum, m0), chunk_start = carry
    chunk_start = jax.tree.map(lambda s, m: jnp.where(index == next_chunk, m, s), chunk_start, m0)
    new_carry, y = chunk_fn((weights, momentum, m0), chunk)
    return (new_carry, chunk_start), y

  init = ((weights, momentum, first_m0), first_m0)
  ((weights, momentum, _), chunk_start), ys = jax.lax.scan(
    body, init, (jnp.arange(n_chunks), chunks)
  )
  chunk_start = jax.tree.map(
    lambda s, w: jnp.where(next_chunk >= n_chunks, w, s), chunk_start, weights
  )
  ys = jnp.moveaxis(ys, 0, 1)  # [B, N, H, C, V]
  ys = jnp.moveaxis(ys, 3, 2).reshape(batch, padded, heads, -1)
  y = jax.lax.dynamic_slice_in_dim(ys, o, length, axis=1)

  tail = lambda x, name: jnp.moveaxis(history(x, name)[:, length:], 1, 2)
  final = {
    "weights": weights,
    "momentum": momentum,
    "chunk_start": chunk_start,
    "position": state["position"] + length,
    "window_k": tail(k, "window_k"),
    "window_v": tail(v, "window_v"),
    "window_gamma": tail(gamma, "window_gamma"),
  }
  return y, final
