"""MoM: causality, decode == forward, packing, gradients, routing statistics, and that a memory
ignores the tokens not routed to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.zoo.test_recurrent import (
  Compiled,
  check_causal,
  check_constant_state,
  check_decode,
  check_gradients,
  check_packed,
  tokens,
  train_mqar,
)


def cfg(**kw):
  small = dict(d_model=32, n_heads=2, n_memories=3, top_k=2, d_ff=64, chunk_size=8)
  return zoo.config("mom", "tiny", **{**small, **kw})


@pytest.fixture(scope="module")
def mom():
  return Compiled(zoo.build(cfg(), rngs=0))


def test_causal(mom):
  check_causal(mom, tokens(0, 2, 20))


def test_decode_matches_forward(mom):
  check_decode(mom, tokens(1, 2, 20))


def test_packed_documents_do_not_interact(mom):
  check_packed(mom, tokens(2, 2, 20))


def test_decode_state_is_constant_size(mom):
  check_constant_state(mom.model)
  assert mom.model.state_size() == 2 * (3 + 1) * 2 * 16 * 16  # layers * M * H * K * V


def test_router_stats_and_untouched_memories(mom):
  x = tokens(5, 2, 20)
  aux = jax.jit(lambda s, x: nnx.merge(mom.graphdef, s)(x)[1])(mom.state, x)
  layer = aux["layers"][0]
  # Each token writes to top_k of the routed memories: the loads sum to one.
  np.testing.assert_allclose(jnp.sum(layer["router_load"]), 1.0, atol=1e-6)
  assert np.isfinite(layer["balance_loss"]) and layer["balance_loss"] > 0
  # With top_k = 1 and a single token, exactly one routed memory (and the shared one) is written.
  one = zoo.build(cfg(top_k=1, n_layers=1), rngs=3)
  aux = nnx.jit(lambda m, x: m(x)[1])(one, tokens(6, 1, 1))
  state = aux["layers"][0]["state"].reshape(1, 4, 2, 16, 16)  # [B, M, H, K, V]
  written = np.abs(np.asarray(state)).sum(axis=(0, 2, 3, 4)) > 0
  assert written.tolist().count(True) == 2 and written[-1]


def test_gradients_finite_and_nonzero():
  check_gradients(zoo.build(cfg(), rngs=1), tokens(3, 2, 20))


@pytest.mark.slow
def test_mqar_beats_chance():
  # Gated output like gated DeltaNet's (see test_deltanet.py): it learns slowly, so 500 steps.
  result = train_mqar(zoo.config("mom", "tiny"), steps=500)
  assert result["accuracy"] > 3 * result["chance"], result["accuracy"]
