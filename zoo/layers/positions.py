"""Token positions of packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_positions(shape: tuple[int, int], segment_ids: jax.Array | None) -> jax.Array:
  """Positions ``[B,T]`` that restart at 0 at every document start of ``segment_ids``."""
  b, t = shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    return idx
  starts = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx
