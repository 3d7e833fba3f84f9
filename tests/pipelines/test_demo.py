"""The demo's sinks + window model: StreamingLLM on the transformer's weights, constant state."""

from __future__ import annotations

import numpy as np
import pytest

import zoo
from pipelines.evaluation import extrapolate, memories


@pytest.fixture(scope="module")
def transformer():
  return zoo.build(zoo.config("transformer", "tiny", max_len=32, n_layers=2), rngs=0)


def test_streaming_state_is_constant_and_equals_the_transformer_within_l(transformer):
  train_len = 16
  policy, opts = memories.wrap(transformer, "streaming", train_len, 4 * train_len)
  sizes = [extrapolate.state_floats(policy, n) for n in (train_len, 4 * train_len)]
  grown = [extrapolate.state_floats(transformer, n) for n in (train_len, 4 * train_len)]
  # The cache keeps sinks + window keys whatever the stream's length; the transformer's grows.
  assert sizes[0] == sizes[1] and grown[1] - 1 == 4 * (grown[0] - 1)  # (+1: the length)
  assert opts["sinks"] + opts["window"] == train_len
  windows = np.random.default_rng(0).integers(0, 256, (2, 4 * train_len + 1)).astype(np.int32)
  a = extrapolate.position_losses(policy, windows, train_len)
  b = extrapolate.position_losses(transformer, windows[:, : train_len + 1], train_len)
  # Within L nothing is evicted: the same weights give the same losses; past L they differ.
  np.testing.assert_allclose(a[:train_len], b, rtol=2e-4, atol=2e-4)
  full = memories.backbone_for(transformer, 4 * train_len)
  c = extrapolate.position_losses(full, windows, train_len)
  assert np.abs(a[2 * train_len :] - c[2 * train_len :]).max() > 1e-3
