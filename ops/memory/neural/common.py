"""Pieces every neural-memory implementation shares: feature maps, the memory MLP, Newton-Schulz.

Memory weights are a dict of float32 arrays with leading ``[B, H]`` axes:
depth 1 ``{"w": [B,H,F,V]}``, depth 2 ``{"w1": [B,H,F,Dh], "w2": [B,H,Dh,V]}``, where ``F`` is
the key dim after the feature map (``feature_dim``) and ``Dh`` the hidden size.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

FEATURE_MAPS = ("identity", "poly2", "poly3", "poly4", "elu1")
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
}
OPTIMIZERS = ("momentum", "muon")
OBJECTIVES = ("l2", "dot")
DEPTH_KEYS = {1: ("w",), 2: ("w1", "w2")}

# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024), also used by ATLAS.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_NS_EPS = 1e-7


def _poly_degree(feature_map: str) -> int | None:
  """P for ``"polyP"``, else None."""
  if feature_map.startswith("poly") and feature_map in FEATURE_MAPS:
    return int(feature_map[4:])
  return None


def feature_dim(key_dim: int, feature_map: str) -> int:
  """Width ``F`` of ``feature_map`` applied to a ``key_dim`` vector.

  ``poly2``: ``1 + K + K^2`` (every ordered pair); ``polyP`` for ``P >= 3``: ``C(K + P, P)``
  (every monomial of degree <= P once); other maps keep ``K``.
  """
  degree = _poly_degree(feature_map)
  if degree == 2:
    return 1 + key_dim + key_dim * key_dim
  if degree is not None:
    return math.comb(key_dim + degree, degree)
  return key_dim


@functools.cache
def _monomials(key_dim: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
  """Index tuples and weights of the unique monomials of degree <= ``degree``.

  Returns:
    ``(index [F, P] int32, weight [F] float32)``: monomial ``f`` is
    ``weight[f] * prod_p x1[index[f, p]]`` with ``x1 = [x, 1]`` (index ``K`` pads lower degrees
    with the constant 1). A degree-``i`` monomial whose index ``j`` repeats ``n_j`` times has
    ``weight^2 = 1 / prod_j n_j!``, i.e. its multinomial coefficient ``i! / prod_j n_j!``
    divided by ``i!``, so that summing the products of two feature vectors gives
    ``sum_i (x.y)^i / i!``.
  """
  index, weight = [], []
  for i in range(degree + 1):
    for combo in itertools.combinations_with_replacement(range(key_dim), i):
      counts = np.bincount(np.asarray(combo, np.int64), minlength=1)
      index.append(list(combo) + [key_dim] * (degree - i))
      weight.append(1.0 / math.sqrt(math.prod(math.factorial(int(n)) for n in counts)))
  return np.asarray(index, np.int32).reshape(-1, degree), np.asarray(weight, np.float32)


def apply_feature_map(x: jax.Array, feature_map: str) -> jax.Array:
  """Feature map on keys/queries, in float32.

  ``polyP`` is the degree-``P`` Taylor feature map of the exponential kernel (ATLAS's
  polynomial features): ``phi(x) . phi(y) = sum_{i<=P} (x.y)^i / i!``, i.e. ``exp(x.y)``
  truncated after the degree-``P`` term. ``poly2`` lists every ordered pair ``x_i x_j / sqrt(2)``
  (``F = 1 + K + K^2``); ``poly3`` and ``poly4`` list each monomial once with the square root of
  its multinomial weight (``F = C(K + P, P)``, e.g. 165 and 495 for ``K = 8``), since ordered
  tuples would cost ``K^P``. ``elu1`` is ``elu(x) + 1`` (linear-attention's positive map).

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
  degree = _poly_degree(feature_map)
  if degree is not None:
    index, weight = _monomials(x.shape[-1], degree)
    x1 = jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)
    return jnp.prod(x1[..., index], axis=-1) * weight  # [..., F, P] -> [..., F]
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
