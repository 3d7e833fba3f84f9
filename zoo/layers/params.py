"""Parameter creation with logical axis names, and the dtype policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

# The logical axis names used across the zoo; `pipelines.sharding` maps them to mesh axes.
LOGICAL_AXES = (
  "batch",
  "seq",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "head_dim",
  "vocab",
  "state",
  "layers",
)


def param(
  rngs: nnx.Rngs,
  init: Initializer,
  shape: Sequence[int],
  axes: Sequence[str | None],
  dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
  """A float32 parameter tagged with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}")
  for a in axes:
    if a is not None and a not in LOGICAL_AXES:
      raise ValueError(f"unknown logical axis {a!r}; known: {LOGICAL_AXES}")
  value = init(rngs.params(), tuple(shape), dtype)
  # Sharding is applied later from logical-axis rules (pipelines.sharding), not at creation.
  return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False)


def dtype_of(name: str) -> jnp.dtype:
  """``"float32" | "bfloat16" | "float16"`` -> a jnp dtype."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


def normal(stddev: float) -> Initializer:
  return jax.nn.initializers.normal(stddev)


def fan_in(axis_sizes: Sequence[int]) -> Initializer:
  """Normal init with variance 1 / fan_in, where fan_in is the product of ``axis_sizes``."""
  n = 1
  for s in axis_sizes:
    n *= s
  return jax.nn.initializers.normal(n**-0.5)
