"""Causal short convolution over time (depthwise), with a decode state.

Used in front of the recurrent memories (BASED, DeltaNet, gated DeltaNet, Mamba-2, MoM): each
channel sees itself and its ``width - 1`` predecessors. The decode state is the last
``width - 1`` inputs, so stepping costs the same at any context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.params import fan_in, param


class ShortConv(nnx.Module):
  """``y_t = act(sum_j w_j * x_{t-width+1+j})`` per channel; ``x [B,T,*F] -> [B,T,*F]``.

  Args:
    features: the trailing feature shape ``F`` (e.g. ``(H, Dh)``).
    axes: logical axis names of ``F``.
    width: kernel width (>= 1; 1 is a per-channel scale).
    activation: apply SiLU after the convolution (as in Mamba-2 and the fla layers).
  """

  def __init__(
    self,
    features: Sequence[int],
    axes: Sequence[str | None],
    width: int,
    *,
    activation: bool = True,
    rngs: nnx.Rngs,
  ):
    if width < 1:
      raise ValueError(f"conv width must be >= 1, got {width}")
    self.width = width
    self.activation = activation
    self.features = tuple(features)
    self.weight = param(rngs, fan_in([width]), (width, *features), (None, *axes))

  def _apply(self, padded: jax.Array, t: int, keep: jax.Array | None) -> jax.Array:
    # padded [B, width-1+t, *F]; tap j reads the input (width-1-j) steps back.
    w = self.weight[...].astype(padded.dtype)
    y = 0.0
    for j in range(self.width):
      x = jax.lax.slice_in_dim(padded, j, j + t, axis=1)
      if keep is not None:
        x = x * keep[j].reshape(keep[j].shape + (1,) * len(self.features)).astype(x.dtype)
      y = y + w[j] * x
    return jax.nn.silu(y) if self.activation else y

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Args: ``x [B,T,*F]``; ``segment_ids [B,T]`` (taps never cross a document start)."""
    t = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (self.width - 1, 0)
    keep = None
    if segment_ids is not None:
      seg = jnp.pad(segment_ids, ((0, 0), (self.width - 1, 0)), constant_values=-1)
      keep = [jax.lax.slice_in_dim(seg, j, j + t, axis=1) == segment_ids for j in range(self.width)]
    return self._apply(jnp.pad(x, pad), t, keep)

  def init_state(self, batch: int, dtype: jnp.dtype) -> jax.Array:
    """Zeros ``[B, width-1, *F]``: the inputs before the first token."""
    return jnp.zeros((batch, self.width - 1, *self.features), dtype)

  def step(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Feeds ``x [B,t,*F]`` after ``state``; returns ``(y [B,t,*F], new state)``."""
    t = x.shape[1]
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    new_state = jax.lax.slice_in_dim(padded, t, t + self.width - 1, axis=1)
    return self._apply(padded, t, None), new_state.astype(state.dtype)
