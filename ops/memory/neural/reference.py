"""The definition of Titans' neural memory: one token at a time, gradients by ``jax.grad``.

For chunks of ``chunk_size`` tokens, with ``M0`` the weights at the chunk start and, for every
token ``t``, the Omega-rule inner loss over the last ``c`` tokens (ATLAS; ``c = 1`` is Titans)
``l_t(M) = sum_{s=t-c+1..t} gamma_s L(M(phi(k_s)), v_s)`` with the objective
``L(y, v) = ||y - v||^2`` ("l2", Titans / ATLAS) or ``L(y, v) = -<y, v>`` ("dot", the Hebbian
rule of ATLAS's DeepTransformers). With ``self_targets`` (Nested Learning's self-modifying
memories) the target is the memory's own read of the value input, ``v_s -> M0(phi(v_s))``, at
the same ``M0`` as the gradient and held constant in the inner gradient:

  momentum: ``U_t = eta_t U_{t-1} - theta_t grad l_t(M0)``,
            ``M_t = (1 - alpha_t) M_{t-1} + U_t``
  muon:     ``U_t = eta_t U_{t-1} - grad l_t(M0)``,
            ``M_t = (1 - alpha_t) M_{t-1} + theta_t NS(U_t)``

and the read ``y_t = M_t(phi(q_t))``. The step function here is also the decoding step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.memory.neural import common


def _head_step(
  carry, token, *, window, objective, optimizer, ns_steps, activation, residual, self_targets
):
  """One token for one (batch, head); see the module docstring for the math."""
  weights, momentum, chunk_start, win_k, win_v, win_g, at_start, at_end = carry
  q, k, v, theta, eta, alpha, gamma = token
  m0 = jax.tree.map(lambda w, s: jnp.where(at_start, w, s), weights, chunk_start)
  keys = jnp.concatenate([win_k, k[None]], axis=0)  # [c, F]
  inputs = jnp.concatenate([win_v, v[None]], axis=0)  # [c, V] (self_targets: [c, F])
  gammas = jnp.concatenate([win_g, gamma[None]], axis=0)  # [c]
  values = inputs
  if self_targets:
    # The window holds the targets' inputs phi(v_s); every target is read at this token's M0
    # (also for window tokens of an earlier chunk) and enters inner_loss as a constant:
    # jax.grad differentiates m only, while the outer gradient reaches M0 and v through it.
    values = common.mlp_apply(jax.tree.map(lambda w: w[None], m0), inputs, activation, residual)

  def inner_loss(m):
    pred = common.mlp_apply(jax.tree.map(lambda w: w[None], m), keys, activation, residual)
    if objective == "dot":
      return -jnp.sum(gammas * jnp.sum(pred * values, axis=-1))
    err = pred - values
    return jnp.sum(gammas * jnp.sum(err * err, axis=-1))

  grad = jax.grad(inner_loss)(m0)
  if optimizer == "momentum":
    momentum = jax.tree.map(lambda u, g: eta * u - theta * g, momentum, grad)
    weights = jax.tree.map(lambda w, u: (1.0 - alpha) * w + u, weights, momentum)
  else:
    momentum = jax.tree.map(lambda u, g: eta * u - g, momentum, grad)
    weights = jax.tree.map(
      lambda w, u: (1.0 - alpha) * w + theta * common.newton_schulz(u, ns_steps),
      weights,
      momentum,
    )
  y = common.mlp_apply(weights, q, activation, residual)
  # The stored chunk start is that of the next token's chunk; the window keeps the last c - 1
  # tokens, oldest first (empty when c = 1).
  del window
  next_start = jax.tree.map(lambda w, s: jnp.where(at_end, w, s), weights, m0)
  return y, (weights, momentum, next_start, keys[1:], inputs[1:], gammas[1:])


def step(state, q, k, v, theta, eta, alpha, gamma, *, chunk_size, **config):
  """Advances the memory by one token.

  Args:
    state: the state dict (see ``ops.memory.neural.api``), weights ``[B,H,...]``.
    q, k: [B,H,F] feature-mapped float32.
    v: [B,H,V] float32 (with ``self_targets``: [B,H,F], the feature-mapped target input).
    theta, eta, alpha, gamma: [B,H] float32 (lr, momentum, decay, Omega weight).
    chunk_size: tokens per chunk (gradients are taken at the chunk-start weights).
    **config: window, objective, optimizer, ns_steps, activation, residual, self_targets.

  Returns:
    ``(y [B,H,V] float32, new_state)``.
  """
  at_start = state["position"] % chunk_size == 0
  at_end = (state["position"] + 1) % chunk_size == 0

  def head(w, u, s, wk, wv, wg, *tok):
    return _head_step((w, u, s, wk, wv, wg, at_start, at_end), tok, **config)

  y, (w, u, s, wk, wv, wg) = jax.vmap(jax.vmap(head))(
    state["weights"],
    state["momentum"],
    state["chunk_start"],
    state["window_k"],
    state["window_v"],
    state["window_gamma"],
    q,
    k,
    v,
    theta,
    eta,
    alpha,
    gamma,
  )
  new_state = {
    "weights": w,
    "momentum": u,
    "chunk_start": s,
    "position": state["position"] + 1,
    "window_k": wk,
    "window_v": wv,
    "window_gamma": wg,
  }
  return y, new_state


def neural_memory(
  q, k, v, theta, eta, alpha, gamma, state, *, chunk_size, interpret=False, **config
):
  """Token-by-token scan of ``step`` (``interpret`` is unused: no kernel).

  Args:
    q, k: [B,T,H,F] feature-mapped float32.
    v: [B,T,H,V] float32 (with ``self_targets``: [B,T,H,F], the target input).
    theta, eta, alpha, gamma: [B,T,H] float32.
    state: the state dict at the first token.
    chunk_size: tokens per chunk.
    **config: window, objective, optimizer, ns_steps, activation, residual, self_targets
      (``offset`` is ignored: the state's position already says where the chunk boundaries
      are).

  Returns:
    ``(y [B,T,H,V] float32, final_state)``.
  """
  del interpret
  config.pop("offset", None)

  def body(carry, token):
    y, carry = step(carry, *token, chunk_size=chunk_size, **config)
    return carry, y

  tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, theta, eta, alpha, gamma))
  final, ys = jax.lax.scan(body, state, tokens)
  return jnp.moveaxis(ys, 0, 1), final
