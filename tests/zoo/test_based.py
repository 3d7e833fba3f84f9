"""BASED: causality, decode == forward (with the sliding-window shift buffer), packing, grads."""

import pytest

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
  small = dict(d_model=32, n_heads=2, feature_dim=4, d_ff=64, chunk_size=8, window=4)
  return zoo.config("based", "tiny", **{**small, **kw})


@pytest.fixture(scope="module")
def based():
  return Compiled(zoo.build(cfg(), rngs=0))


def test_causal(based):
  check_causal(based, tokens(0, 2, 20))


def test_decode_matches_forward(based):
  check_decode(based, tokens(1, 2, 20))


def test_packed_documents_do_not_interact(based):
  check_packed(based, tokens(2, 2, 20))


def test_decode_state_is_constant_size(based):
  check_constant_state(based.model)
  # Taylor memory (H * (1 + K + K^2) * (V + 1)) plus the window's keys and values.
  assert based.model.state_size() == 2 * 21 * 17 + 2 * 4 * 2 * 16


def test_gradients_finite_and_nonzero():
  check_gradients(zoo.build(cfg(), rngs=1), tokens(3, 2, 20))


@pytest.mark.slow
def test_mqar_beats_chance():
  result = train_mqar(zoo.config("based", "tiny"))
  assert result["accuracy"] > 3 * result["chance"], result["accuracy"]
