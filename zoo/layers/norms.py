"""RMSNorm with a float32 reduction whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.params import param


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``; the statistic is computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed", rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)
