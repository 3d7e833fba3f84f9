"""merge / merge_pair: attention over disjoint key sets merged by lse equals full attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention import Mask, dot_product_attention, merge, merge_pair

# float32: two softmax partials recombined, a few ulps; gradients sum over keys, hence looser.
TOL = {"out": 2e-5, "grad": 1e-4}


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (2, 9, 4, 8))
  k = jax.random.normal(ks[1], (2, 21, 2, 8))
  v = jax.random.normal(ks[2], (2, 21, 2, 8))
  return q, k, v


def _split_then_merge(q, k, v, cut):
  """Keys [0, cut) and [cut, S) attended separately (no mask), merged by lse."""
  o_a, lse_a = dot_product_attention(q, k[:, :cut], v[:, :cut], return_lse=True)
  o_b, lse_b = dot_product_attention(q, k[:, cut:], v[:, cut:], return_lse=True)
  return merge_pair(o_a, lse_a, o_b, lse_b)


def test_merge_pair_equals_full_attention_values_and_grads():
  q, k, v = _inputs()
  full = lambda q, k, v: dot_product_attention(q, k, v, return_lse=True, implementation="reference")
  o, lse = _split_then_merge(q, k, v, 8)
  o_ref, lse_ref = full(q, k, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=TOL["out"], rtol=TOL["out"])
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=TOL["out"])

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)[0])) + jnp.sum(jnp.cos(fn(q, k, v)[1]))

  g = jax.jit(jax.grad(loss(lambda q, k, v: _split_then_merge(q, k, v, 8)), (0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(full), (0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL["grad"], rtol=TOL["grad"])


def test_merge_stacked_parts_and_empty_parts():
  q, k, v = _inputs(1)
  cuts = [0, 5, 5, 13, 21]  # the empty middle part must get zero weight
  parts = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    if hi == lo:
      parts.append((jnp.zeros(q.shape), jnp.full(q.shape[:3], -jnp.inf)))
    else:
      parts.append(dot_product_attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True))
  o, lse = merge(jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts]), axis=0)
  o_ref, lse_ref = dot_product_attention(q, k, v, return_lse=True, implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=TOL["out"], rtol=TOL["out"])
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=TOL["out"])


def test_all_empty_rows_give_zero_minus_inf_and_finite_grads():
  q, k, v = _inputs(2)
  # Causal with q_offset=-3: query rows 0..2 see no key in either half.
  halves = [
    dot_product_attention(q, k[:, :10], v[:, :10], mask=Mask(), q_offset=-3, return_lse=True),
    (jnp.zeros(q.shape), jnp.full(q.shape[:3], -jnp.inf)),
  ]
  o, lse = merge_pair(*halves[0], *halves[1])
  assert np.all(np.asarray(o[:, :3]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :3])))

  def loss(o_a, lse_a):
    o, lse = merge_pair(o_a, lse_a, *halves[1])
    return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  grads = jax.grad(loss, argnums=(0, 1))(*halves[0])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
