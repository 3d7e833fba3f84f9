"""ring_attention on 8 fake CPU devices equals unsharded attention: values, lse and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ops.attention import Mask, dot_product_attention, ring_attention

# float32 only: the ring merges 16 partial softmaxes per query chunk (another summation order).
TOL = {"out": 2e-5, "grad": 1e-4}


def _inputs(b=1, t=64, h=4, kh=2, d=8, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, kh, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, kh, d), jnp.float32)
  seg = jnp.sort(jax.random.randint(ks[3], (b, t), 0, 3), axis=1).astype(jnp.int32)
  return q, k, v, seg


def _value_and_grads(fn, q, k, v):
  def loss(q, k, v):
    o, lse = fn(q, k, v)
    finite = jnp.isfinite(lse)
    return jnp.sum(o * jnp.cos(o)) + 0.3 * jnp.sum(
      jnp.where(finite, jnp.sin(jnp.where(finite, lse, 0.0)), 0.0)
    ), (o, lse)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _check(mesh, mask, segments, load_balance, h=4, kh=2):
  q, k, v, seg = _inputs(h=h, kh=kh)
  seg_ids = (seg, seg) if segments else None
  kw = dict(mask=mask, segment_ids=seg_ids, return_lse=True)
  (_, (o, lse)), grads = _value_and_grads(
    lambda q, k, v: ring_attention(q, k, v, mesh=mesh, load_balance=load_balance, **kw), q, k, v
  )
  (_, (o_ref, lse_ref)), grads_ref = _value_and_grads(
    lambda q, k, v: dot_product_attention(q, k, v, implementation="reference", **kw), q, k, v
  )
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=TOL["out"], rtol=TOL["out"])
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=TOL["out"], rtol=TOL["out"])
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=TOL["grad"], rtol=TOL["grad"])


def test_balanced_causal_gqa_segments_explicit_mesh():
  mesh = jax.make_mesh((8,), ("context",))
  _check(mesh, Mask(), segments=True, load_balance=True)


@pytest.mark.slow
def test_contiguous_per_head_sinks_window_auto_mesh():
  mesh = Mesh(np.array(jax.devices()[:8]), ("context",))
  _check(mesh, (Mask(), Mask(window=5, sinks=2)), segments=False, load_balance=False)


@pytest.mark.slow
def test_balanced_prefix_lm_two_axis_mesh():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "context"))
  _check(mesh, Mask(prefix=20), segments=False, load_balance=True, h=2, kh=2)


def test_zigzag_layout_balances_causal_work():
  """Device i holds chunks i and 2N-1-i: every device sees the same number of causal pairs."""
  n, c = 8, 16
  work = []
  for i in range(n):
    rows = [j * c + r for j in (i, 2 * n - 1 - i) for r in range(c)]
    work.append(sum(p + 1 for p in rows))
  assert len(set(work)) == 1
  contiguous = [sum(p + 1 for p in range(i * 2 * c, (i + 1) * 2 * c)) for i in range(n)]
  assert max(contiguous) / min(contiguous) > 10


@pytest.mark.parametrize(
  "t, axis, match", [(60, "context", "multiple of 16"), (64, "model", "no 'model' axis")]
)
def test_bad_input(t, axis, match):
  mesh = jax.make_mesh((8,), ("context",))
  q, k, v, _ = _inputs(t=t)
  with pytest.raises(ValueError, match=match):
    ring_attention(q, k, v, mesh=mesh, axis_name=axis, mask=Mask())
