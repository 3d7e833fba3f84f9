"""Pieces every neural-memory implementation shares: feature maps, the memory MLP, Newton-Schulz.

Memory weights are a dict of float32 arrays with leading ``[B, H]`` axes:
depth 1 ``{"w": [B,H,F,V]}``, depth 2 ``{"w1": [B,H,F,Dh], "w2": [B,H,Dh,V]}``, where ``F`` is
the key dim after the feature map (``feature_dim``) and ``Dh`` the hidden size.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

FEATURE_MAPS = ("identity", "poly2", "elu1")
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
}
OPTIMIZERS = ("momentum", "muon")
DEPTH_KEYS = {1: ("w",), 2: ("w1", "w2")}

# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024), also used by ATLAS.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_NS_EPS = 1e-7


def feature_dim(key_dim: int, feature_map: str) -> int:
  """Width ``F`` of ``feature_map`` applied to a ``key_dim`` vector."""
  if feature_map == "poly2":
    return 1 + key_dim + key_dim * key_dim
  return key_dim


def apply_feature_map(x: jax.Array, feature_map: str) -> jax.Array:
  """Feature map on keys/queries, in float32.

  ``poly2`` is every monomial of degree <= 2, scaled so that
  ``phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2`` (ATLAS's polynomial kernel; a degree-2 Taylor
  expansion of ``exp(x.y)``). ``elu1`` is ``elu(x) + 1`` (linear-attention's positive map).

  Args:
    x: [..., K].

  Returns:
    [..., F] float32 with ``F = feature_dim(K, feature_map)``.
  """
  x = x.astype(jnp.float32)
  if feature_map == "identity":
    return x
  if feature_map == "elu1":
    return jax.nn.elu(x) + 1.0
  if feature_map == "poly2":
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([ones, x, outer / math.sqrt(2.0)], axis=-1)
  raise ValueError(f"unknown feature_map {feature_map!r}; choose from {FEATURE_MAPS}")


def memory_depth(weights) -> int:
  """1 for ``{"w"}``, 2 for ``{"w1", "w2"}``."""
  keys = tuple(sorted(weights))
  for depth, names in DEPTH_KEYS.items():
    if keys == names:
      return depth
  raise ValueError(f"memory weights must have keys ('w',) or ('w1', 'w2'), got {keys}")


def mlp_apply(weights, x: jax.Array, activation: str, residual: bool) -> jax.Array:
  """Reads the memory: ``x @ w`` or ``act(x @ w1) @ w2``, plus ``x`` when residual.

  Args:
    weights: per-head weights with the same leading axes as ``x`` minus its last one, e.g.
      ``{"w": [..., F, V]}`` for ``x [..., F]``.
    x: [..., F] float32.

  Returns:
    [..., V] float32.
  """
  if memory_depth(weights) == 1:
    y = jnp.einsum("...f,...fv->...v", x, weights["w"], precision=HIGHEST)
  else:
    z = ACTIVATIONS[activation](jnp.einsum("...f,...fd->...d", x, weights["w1"], precision=HIGHEST))
    y = jnp.einsum("...d,...dv->...v", z, weights["w2"], precision=HIGHEST)
  return y + x if residual else y


def newton_schulz(g: jax.Array, steps: int) -> jax.Array:
  """Approximately orthogonalises the last two axes (Muon's quintic iteration).

  The input is scaled by ``rsqrt(||g||_F^2 + eps^2)`` rather than divided by its norm so the
  gradient stays finite at ``g = 0``.

  Args:
    g: [..., m, n] float32.
    steps: Newton-Schulz iterations; 0 returns the normalised input.

  Returns:
    [..., m, n] float32.
  """
  a, b, c = _NS_COEFFS
  x = g * jax.lax.rsqrt(jnp.sum(g * g, axis=(-2, -1), keepdims=True) + _NS_EPS**2)
  tall = g.shape[-2] > g.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  for _ in range(steps):
    gram = jnp.einsum("...ik,...jk->...ij", x, x, precision=HIGHEST)
    poly = b * gram + c * jnp.einsum("...ik,...kj->...ij", gram, gram, precision=HIGHEST)
    x = a * x + jnp.einsum("...ik,...kj->...ij", poly, x, precision=HIGHEST)
  return jnp.swapaxes(x, -1, -2) if tall else x
