"""``mask=None`` means the same at every attention entry point (no mask: every key visible), and
a window in a non-causal mask is refused, as ops/attention/README.md documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.attention import Mask, decode_attention, dot_product_attention, ring_attention


def _inputs(t, s, h=4, kh=2, d=8):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (
    jax.random.normal(ks[0], (1, t, h, d)),
    jax.random.normal(ks[1], (1, s, kh, d)),
    jax.random.normal(ks[2], (1, s, kh, d)),
  )


def test_decode_and_dot_product_agree_on_none():
  # Several query rows, so "every key" and "causal" differ for all but the last row.
  q, k, v = _inputs(t=5, s=23)
  full = dot_product_attention(q, k, v, mask=Mask(causal=False), implementation="reference")
  causal = dot_product_attention(q, k, v, mask=Mask(), implementation="reference")
  assert not np.allclose(full, causal, atol=1e-3)  # the check below can tell them apart
  lengths = jnp.array([23], jnp.int32)
  for impl in ("reference", "xla"):
    np.testing.assert_allclose(
      dot_product_attention(q, k, v, mask=None, implementation=impl), full, atol=2e-5
    )
    np.testing.assert_allclose(
      decode_attention(q, k, v, lengths=lengths, mask=None, implementation=impl), full, atol=2e-5
    )
  # And Mask() is causal in both (the decode queries are the last 5 positions).
  np.testing.assert_allclose(
    decode_attention(q, k, v, lengths=lengths, mask=Mask()), causal, atol=2e-5
  )


def test_ring_agrees_on_none():
  mesh = jax.make_mesh((4,), ("context",), devices=jax.devices()[:4])
  q, k, v = _inputs(t=32, s=32)
  full = dot_product_attention(q, k, v, mask=None, implementation="reference")
  assert not np.allclose(full, dot_product_attention(q, k, v, mask=Mask()), atol=1e-3)
  np.testing.assert_allclose(ring_attention(q, k, v, mesh=mesh, mask=None), full, atol=2e-5)


def test_noncausal_window_is_refused():
  with pytest.raises(ValueError, match="needs causal=True"):
    Mask(causal=False, window=4)
  Mask(causal=False)  # a non-causal mask without a window is fine
  Mask(window=4, sinks=2)
