"""The SwiGLU feed-forward block (Llama)."""

from __future__ import annotations

import jax
from flax import nnx

from zoo.layers.params import fan_in, param


class SwiGLU(nnx.Module):
  """``W_down (silu(x W_gate) * (x W_up))``; ``x [..., D] -> [..., D]``."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
    self.w_gate = param(rngs, fan_in([d_model]), (d_model, d_ff), ("embed", "mlp"))
    self.w_up = param(rngs, fan_in([d_model]), (d_model, d_ff), ("embed", "mlp"))
    self.w_down = param(rngs, fan_in([d_ff]), (d_ff, d_model), ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = x @ self.w_gate[...].astype(dt)
    up = x @ self.w_up[...].astype(dt)
    return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)
