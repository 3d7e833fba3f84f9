"""decode_attention: split-K with lse merge equals dense attention, per-sequence lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.attention import Mask, decode_attention, dot_product_attention

# float32: split-K merges partial softmaxes (a different summation order), a few ulps.
# bfloat16: probabilities are rounded to bf16 before P @ V and the output is stored in bf16.
TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def _inputs(b, t, s, h, kh, d, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(dtype)
  return q, k, v


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
  f = np.isfinite(b)
  np.testing.assert_allclose(a[f], b[f], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
  "t, mask, splits",
  [(1, None, 4), (3, Mask(), 7), (2, Mask(window=9, sinks=2), 5), (1, (Mask(), Mask(window=4)), 3)],
)
def test_split_k_matches_dense_reference(dtype, t, mask, splits):
  q, k, v = _inputs(3, t, 61, 4, 2, 16, dtype)
  lengths = jnp.array([61, 17, 2], jnp.int32)
  kw = dict(lengths=lengths, mask=mask, return_lse=True)
  o, lse = decode_attention(q, k, v, num_splits=splits, **kw)
  o_ref, lse_ref = decode_attention(q, k, v, implementation="reference", **kw)
  assert o.dtype == q.dtype and lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
  _close(o, o_ref, TOL[dtype])
  _close(lse, lse_ref, TOL[dtype])


def test_per_sequence_lengths_equal_truncated_caches():
  q, k, v = _inputs(2, 2, 40, 4, 1, 8, "float32")
  lengths = [40, 13]
  o = decode_attention(q, k, v, lengths=jnp.array(lengths, jnp.int32), mask=Mask(), num_splits=6)
  for b, n in enumerate(lengths):
    o_b = dot_product_attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], mask=Mask())
    _close(o[b : b + 1], o_b, TOL["float32"])


def test_empty_cache_gives_zero_and_minus_inf():
  q, k, v = _inputs(1, 1, 16, 2, 1, 8, "float32")
  o, lse = decode_attention(q, k, v, lengths=jnp.array([0], jnp.int32), return_lse=True)
  assert np.all(np.asarray(o) == 0.0) and np.all(np.isneginf(np.asarray(lse)))


def test_jit_with_traced_lengths():
  q, k, v = _inputs(2, 1, 33, 2, 2, 8, "float32")
  lengths = jnp.array([5, 33], jnp.int32)
  f = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, lengths=n, num_splits=4))
  _close(f(q, k, v, lengths), decode_attention(q, k, v, lengths=lengths, num_splits=4), 1e-6)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(lengths=jnp.array([1, 2, 3], jnp.int32)), r"shape \[B\]"),
    (dict(lengths=jnp.array([1.0, 2.0])), "int"),
    (dict(lengths=jnp.array([1, 99], jnp.int32)), r"\[0, S=33\]"),
    (dict(lengths=jnp.array([1, 2], jnp.int32), num_splits=0), "num_splits"),
  ],
)
def test_bad_input(kw, match):
  q, k, v = _inputs(2, 1, 33, 2, 2, 8, "float32")
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, **kw)
