"""Merging partial attention results computed over disjoint key sets, by their log-sum-exp.

With ``lse_n = log sum_{j in J_n} exp(s_j)`` and ``o_n`` the softmax average over ``J_n``, the
result over the union is ``lse = logsumexp_n lse_n`` and ``o = sum_n exp(lse_n - lse) o_n``.
Used by decode (split-K), ring attention and memory + window layers. Differentiable; empty
parts (``lse = -inf``) get zero weight and zero gradient, and a row empty in every part gives
``o = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def merge(o_parts: jax.Array, lse_parts: jax.Array, axis: int = 0):
  """Combines partial results stacked along ``axis``.

  Args:
    o_parts: ``[..., n, ..., D]`` normalised outputs (``axis`` indexes the n parts; zeros for
      empty parts).
    lse_parts: the matching ``[..., n, ...]`` float32 log-sum-exps (``-inf`` for empty parts).
    axis: the parts axis of ``lse_parts`` (the same axis in ``o_parts``).

  Returns:
    ``(o [..., D] float32, lse [...] float32)`` with the parts axis reduced.
  """
  axis = axis % lse_parts.ndim
  top = jnp.max(lse_parts, axis=axis, keepdims=True)
  # The result does not depend on the shift; keeping it out of autodiff avoids inf - inf.
  top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  w = jnp.exp(lse_parts - top)  # empty parts: exp(-inf) = 0, with zero gradient
  total = jnp.sum(w, axis=axis, keepdims=True)
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  o = jnp.sum((w / safe)[..., None] * o_parts.astype(jnp.float32), axis=axis)
  lse = jnp.where(seen, top + jnp.log(safe), -jnp.inf)
  return o, jnp.squeeze(lse, axis)


def merge_pair(o_a, lse_a, o_b, lse_b):
  """Combines two partial results over disjoint keys.

  Args:
    o_a: ``[..., D]`` normalised output over key set A (zeros where A is empty).
    lse_a: ``[...]`` float32 log-sum-exp over A (``-inf`` where empty).
    o_b: like ``o_a`` over key set B.
    lse_b: like ``lse_a``.

  Returns:
    ``(o [..., D] float32, lse [...] float32)`` over A and B.
  """
  o_parts = jnp.stack([o_a.astype(jnp.float32), o_b.astype(jnp.float32)])
  return merge(o_parts, jnp.stack([lse_a, lse_b]), axis=0)
