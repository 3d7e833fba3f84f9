"""RoPE and its scaling variants against their defining formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers.rope import RopeScaling, apply_rope, inv_frequencies

D, BASE = 16, 10000.0
PLAIN = 1.0 / BASE ** (np.arange(0, D, 2) / D)


def test_plain_and_linear():
  f, m = inv_frequencies(D, BASE)
  np.testing.assert_allclose(f, PLAIN)
  assert m == 1.0
  f, _ = inv_frequencies(D, BASE, RopeScaling(kind="linear", factor=4))
  np.testing.assert_allclose(f, PLAIN / 4)


def test_ntk_and_abf_change_the_base():
  f, _ = inv_frequencies(D, BASE, RopeScaling(kind="ntk", factor=4))
  np.testing.assert_allclose(f, 1.0 / (BASE * 4 ** (D / (D - 2))) ** (np.arange(0, D, 2) / D))
  # The highest frequency is untouched: NTK scaling interpolates only the slow dimensions.
  assert f[0] == pytest.approx(1.0)
  f, _ = inv_frequencies(D, BASE, RopeScaling(kind="abf", base=5e5))
  np.testing.assert_allclose(f, 1.0 / 5e5 ** (np.arange(0, D, 2) / D))


def test_dynamic_ntk_only_beyond_training_length():
  s = RopeScaling(kind="dynamic_ntk", factor=2, original_max_len=64)
  f, _ = inv_frequencies(D, BASE, s, seq_len=64)
  np.testing.assert_allclose(f, PLAIN)
  f, _ = inv_frequencies(D, BASE, s, seq_len=256)
  assert np.all(f[1:] < PLAIN[1:])


def test_yarn_interpolates_low_keeps_high_frequencies():
  s = RopeScaling(kind="yarn", factor=8, original_max_len=64)
  f, m = inv_frequencies(D, BASE, s)
  assert f[0] == pytest.approx(PLAIN[0])  # fast dims: extrapolated (kept)
  assert f[-1] == pytest.approx(PLAIN[-1] / 8)  # slow dims: interpolated
  assert m == pytest.approx(0.1 * math.log(8) + 1)


def test_truncated_basis():
  s = RopeScaling(kind="truncated", original_max_len=64)
  f, _ = inv_frequencies(D, BASE, s)
  high = 2 * math.pi / 64
  kept = PLAIN >= high
  np.testing.assert_allclose(f[kept], PLAIN[kept])
  assert set(np.round(f[~kept], 12)) <= {round(high / 4, 12), 0.0}


def test_rotation_preserves_norm_and_relative_positions():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, D)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, D)), jnp.float32)

  def dot(pq, pk):
    a = apply_rope(q, jnp.array([[pq]]), PLAIN)
    b = apply_rope(k, jnp.array([[pk]]), PLAIN)
    return float(jnp.sum(a * b))

  assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)
  r = apply_rope(q, jnp.array([[13]]), PLAIN)
  assert float(jnp.linalg.norm(r)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
