"""JRT-RNN (prefix linear attention) and JRT-Prompt (context repetition, any model)."""

import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from tests.zoo.test_recurrent import (
  TOL,
  Compiled,
  check_causal,
  check_constant_state,
  check_decode,
  check_gradients,
  tokens,
  train_mqar,
)
from zoo.jrt import jrt_prompt, jrt_prompt_prefill, repeat_context

PREFIX = 8


def cfg(**kw):
  small = dict(d_model=32, n_heads=2, feature_dim=4, d_ff=64, chunk_size=8, window=4)
  return zoo.config("jrt", "tiny", **{**small, **kw})


@pytest.fixture(scope="module")
def jrt():
  return Compiled(zoo.build(cfg(), rngs=0))


def test_causal_without_prefix(jrt):
  check_causal(jrt, tokens(0, 2, 20))


def test_decode_matches_forward_without_prefix(jrt):
  check_decode(jrt, tokens(1, 2, 20))


def test_prefix_is_bidirectional_and_the_rest_causal(jrt):
  x = tokens(2, 2, 20)
  base = jrt(x, prefix_len=PREFIX)
  # The last prompt token moves the logits of the first one...
  y = x.at[:, PREFIX - 1].set((x[:, PREFIX - 1] + 1) % 260)
  assert np.abs(np.asarray(jrt(y, prefix_len=PREFIX)[:, 0] - base[:, 0])).max() > 1e-4
  # ...while after the prompt a change at t leaves everything before t alone.
  check_causal(jrt, x, t=13, prefix_len=PREFIX)
  # And the prefix mode really differs from the causal read.
  assert np.abs(np.asarray(base[:, :PREFIX] - jrt(x)[:, :PREFIX])).max() > 1e-4


def test_prefix_decode_matches_forward(jrt):
  x = tokens(3, 2, 20)
  full = jrt(x, prefix_len=PREFIX)
  state = jrt.model.init_state(2, 24)
  logits, state = jrt.step(x[:, :PREFIX], state, prefix=True)
  outs = [logits]
  for t in range(PREFIX, 20):
    logits, state = jrt.step(x[:, t : t + 1], state)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=TOL["decode"])


def test_decode_state_is_constant_size(jrt):
  check_constant_state(jrt.model)


def test_jrt_prompt_reads_the_context_twice(jrt):
  x = tokens(4, 2, 12)
  reps = repeat_context(x, 4)
  assert reps.shape == (2, 16)
  np.testing.assert_array_equal(reps[:, :4], reps[:, 4:8])
  np.testing.assert_array_equal(reps[:, 4:], x)
  logits, _ = jrt_prompt(lambda t: (jrt(t), {}), x, 4)
  np.testing.assert_allclose(logits, jrt(reps)[:, 4:], atol=TOL["decode"])
  # The decode path: prefill the repeated context, then step through the rest.
  first, state = jrt_prompt_prefill(jrt, x[:, :4], max_len=20)
  outs = [first]
  for t in range(4, 12):
    out, state = jrt.step(x[:, t : t + 1], state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, atol=TOL["decode"])
  with pytest.raises(ValueError, match="context_len"):
    repeat_context(x, 0)


def test_gradients_finite_and_nonzero():
  # Through the prefix mode, so the encoder projections get gradients too.
  model = zoo.build(cfg(), rngs=1)
  check_gradients(model, tokens(3, 2, 20), prefix_len=PREFIX)


@pytest.mark.slow
def test_mqar_beats_chance():
  result = train_mqar(zoo.config("jrt", "tiny"))
  assert result["accuracy"] > 3 * result["chance"], result["accuracy"]
