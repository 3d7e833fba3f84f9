"""One level of the continuum memory system (Nested Learning, Sec. on CMS).

An MLP block whose weights are updated in context every ``chunk_size`` tokens: tokens of chunk
``n`` are read with the weights ``W_n``, and
``W_{n+1} = W_n - sum_{t in chunk n} theta_t grad_W ||MLP_W(k_t) - v_t||^2 / D |_{W_n}``
(keys are the block's normalised input, targets a learned projection of it) and
``theta_t = lr_max sigmoid(.) / chunk_size``: every gradient of a chunk is taken at ``W_n``, so
a chunk of aligned inputs moves the weights by the sum of its gradients at once; the division
makes ``lr_max`` cap that summed step (with RMS-normalised keys the loss has curvature about
2 per unit of theta, so the cap keeps the update contractive). Levels with
different chunk sizes form a spectrum from fast (per-token) to slow memories. The update is
causal because a chunk only ever reads weights built from earlier chunks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.params import fan_in, param


def _mlp(w: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """``silu(x W1) W2`` for per-sequence weights ``w1 [B,D,F]``, ``w2 [B,F,D]``; x [B,T,D]."""
  h = jax.nn.silu(jnp.einsum("btd,bdf->btf", x, w["w1"]))
  return jnp.einsum("btf,bfd->btd", h, w["w2"])


def _chunk_grad(w, k, v, theta):
  """``sum_t theta_t grad ||MLP_w(k_t) - v_t||^2 / D`` at ``w``; k, v [B,C,D], theta [B,C]."""

  def loss(w):
    err = _mlp(w, k) - v
    return jnp.sum(theta * jnp.mean(err * err, axis=-1))

  return jax.grad(loss)(w)


class CMSLevel(nnx.Module):
  """``x [B,T,D] -> [B,T,D]``, an MLP updated in context every ``chunk_size`` tokens."""

  def __init__(self, d_model: int, d_hidden: int, chunk_size: int, lr_max: float, *, rngs):
    self.chunk_size, self.lr_max = chunk_size, lr_max
    self.w1 = param(rngs, fan_in([d_model]), (d_model, d_hidden), ("embed", "mlp"))
    self.w2 = param(rngs, fan_in([d_hidden]), (d_hidden, d_model), ("mlp", "embed"))
    self.w_target = param(rngs, fan_in([d_model]), (d_model, d_model), ("embed", None))
    self.w_lr = param(rngs, fan_in([d_model]), (d_model,), ("embed",))
    self.b_lr = param(rngs, jax.nn.initializers.zeros, (1,), (None,))

  def _inputs(self, x):
    x = x.astype(jnp.float32)
    v = x @ self.w_target[...]
    theta = self.lr_max / self.chunk_size * jax.nn.sigmoid(x @ self.w_lr[...] + self.b_lr[...])
    return x, v, theta

  def init_state(self, batch: int) -> dict[str, Any]:
    weights = {
      "w1": jnp.broadcast_to(self.w1[...], (batch, *self.w1.shape)),
      "w2": jnp.broadcast_to(self.w2[...], (batch, *self.w2.shape)),
    }
    return {
      "weights": weights,
      "grad": jax.tree.map(jnp.zeros_like, weights),
      "position": jnp.zeros((), jnp.int32),
    }

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Full sequence from the learned initial weights: ``(y [B,T,D], final state)``."""
    batch, length, dim = x.shape
    size = self.chunk_size
    k, v, theta = self._inputs(x)
    n = -(-length // size)
    pad = n * size - length
    # Padding sits after the last token with theta = 0: it changes no output and no weight.
    k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (k, v))
    theta = jnp.pad(theta, ((0, 0), (0, pad)))
    chunks = lambda a: jnp.moveaxis(a.reshape(batch, n, size, *a.shape[2:]), 1, 0)

    def body(carry, xs):
      w, _, _ = carry
      kc, vc, tc = xs
      g = _chunk_grad(w, kc, vc, tc)
      return (jax.tree.map(jnp.subtract, w, g), w, g), _mlp(w, kc)

    w0 = self.init_state(batch)["weights"]
    carry = (w0, w0, jax.tree.map(jnp.zeros_like, w0))
    (weights, before_last, last_grad), ys = jax.lax.scan(
      body, carry, (chunks(k), chunks(v), chunks(theta))
    )
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, n * size, dim)[:, :length]
    if length % size:
      # The last chunk is partial: its gradient is pending, not yet applied (as in ``step``).
      final = {"weights": before_last, "grad": last_grad}
    else:
      final = {"weights": weights, "grad": jax.tree.map(jnp.zeros_like, weights)}
    final["position"] = jnp.asarray(length, jnp.int32)
    return y.astype(x.dtype), final

  def step(self, x: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Feeds ``x [B,t,D]`` token by token (a chunk may straddle update boundaries)."""
    k, v, theta = self._inputs(x)

    def body(s, xs):
      kt, vt, tt = (a[:, None] for a in xs)
      y = _mlp(s["weights"], kt)[:, 0]
      grad = jax.tree.map(jnp.add, s["grad"], _chunk_grad(s["weights"], kt, vt, tt))
      update = (s["position"] + 1) % self.chunk_size == 0
      weights = jax.tree.map(lambda w, g: jnp.where(update, w - g, w), s["weights"], grad)
      grad = jax.tree.map(lambda g: jnp.where(update, jnp.zeros_like(g), g), grad)
      return {"weights": weights, "grad": grad, "position": s["position"] + 1}, y

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (k, v, theta))
    state, ys = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), state
