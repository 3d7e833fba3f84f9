"""RoPE and its scaling variants against their defining formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers.rope import RopeScaling, apply_rope, inv_frequencies, length_frequencies

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


# The scaled variants transformers defines, against its own functions (modeling_rope_utils):
# (transformers rope_parameters, the same as RopeScaling, seq_len the frequencies are asked at).
HD, MAXPOS = 16, 64
HF_CASES = {
  "linear": ({"rope_type": "linear", "factor": 4.0}, dict(kind="linear", factor=4.0), None),
  "dynamic": (
    {"rope_type": "dynamic", "factor": 4.0},
    dict(kind="dynamic_ntk", factor=4.0, original_max_len=MAXPOS),
    200,
  ),
  "yarn": (
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    dict(kind="yarn", factor=8.0, original_max_len=16),
    None,
  ),
  "yarn-all": (
    {
      "rope_type": "yarn",
      "factor": 8.0,
      "original_max_position_embeddings": 16,
      "beta_fast": 8.0,
      "beta_slow": 2.0,
      "mscale": 1.3,
      "mscale_all_dim": 0.7,
      "truncate": False,
    },
    dict(
      kind="yarn",
      factor=8.0,
      original_max_len=16,
      beta_fast=8.0,
      beta_slow=2.0,
      mscale=1.3,
      mscale_all_dim=0.7,
      truncate=False,
    ),
    None,
  ),
  "yarn-attention-factor": (
    {
      "rope_type": "yarn",
      "factor": 8.0,
      "original_max_position_embeddings": 16,
      "attention_factor": 0.9,
    },
    dict(kind="yarn", factor=8.0, original_max_len=16, attention_factor=0.9),
    None,
  ),
  "llama3": (
    {
      "rope_type": "llama3",
      "factor": 8.0,
      "original_max_position_embeddings": 16,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
    },
    dict(kind="llama3", factor=8.0, original_max_len=16, low_freq_factor=1.0, high_freq_factor=4.0),
    None,
  ),
  **{
    f"longrope-{which}": (
      {
        "rope_type": "longrope",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "short_factor": [1.0, 1.1, 1.5, 2.0, 2.0, 3.0, 3.0, 4.0],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
      },
      dict(
        kind="longrope",
        factor=4.0,
        original_max_len=16,
        short_factor=(1.0, 1.1, 1.5, 2.0, 2.0, 3.0, 3.0, 4.0),
        long_factor=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0),
      ),
      n,
    )
    for which, n in (("short", 16), ("long", 17))
  },
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_frequencies_equal_transformers(case):
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  theirs, ours, seq_len = HF_CASES[case]
  cfg = transformers.LlamaConfig(
    hidden_size=HD * 4,
    num_attention_heads=4,
    head_dim=HD,
    max_position_embeddings=MAXPOS,
    rope_parameters={**theirs, "rope_theta": BASE},
  )
  want, want_scale = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](cfg, None, seq_len)
  f, m = inv_frequencies(HD, BASE, RopeScaling(**ours), seq_len)
  # transformers computes in float32; ours is float64.
  np.testing.assert_allclose(f, want.numpy(), rtol=1e-6)
  assert m == pytest.approx(want_scale, rel=1e-6)
  # Each variant changes RoPE: plain frequencies would fail the comparison above.
  plain = 1.0 / BASE ** (np.arange(0, HD, 2) / HD)
  assert np.abs(f - plain).max() > 1e-3 * plain.max() or abs(m - 1.0) > 1e-3


@pytest.mark.parametrize("kind", ["dynamic_ntk", "longrope"])
def test_length_frequencies_follow_the_length_of_each_sequence(kind):
  s = HF_CASES["dynamic" if kind == "dynamic_ntk" else "longrope-short"][1]
  s = RopeScaling(**s)
  lengths = jnp.array([s.original_max_len, s.original_max_len + 1, 4 * s.original_max_len])
  got, m = length_frequencies(HD, BASE, s, lengths)
  for row, n in zip(np.asarray(got), lengths.tolist()):
    want, want_m = inv_frequencies(HD, BASE, s, n)
    np.testing.assert_allclose(row, want, rtol=1e-5)
    assert m == pytest.approx(want_m)
  # Past the training length the frequencies change (so the per-row choice is visible).
  assert np.abs(np.asarray(got[0]) - np.asarray(got[2])).max() > 1e-3
