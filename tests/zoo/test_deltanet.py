"""DeltaNet and gated DeltaNet (also as a hybrid with attention): causality, decode == forward,
packing, gradients."""

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


def cfg(name, **kw):
  small = dict(d_model=32, n_heads=2, d_ff=64, chunk_size=8)
  return zoo.config(name, "tiny", **{**small, **kw})


@pytest.fixture(scope="module", params=["deltanet", "gated_deltanet"])
def model(request):
  return Compiled(zoo.build(cfg(request.param), rngs=0))


def test_causal(model):
  check_causal(model, tokens(0, 2, 20))


def test_decode_matches_forward(model):
  check_decode(model, tokens(1, 2, 20))


def test_packed_documents_do_not_interact(model):
  check_packed(model, tokens(2, 2, 20))


def test_decode_state_is_constant_size(model):
  check_constant_state(model.model)
  assert model.model.state_size() == 2 * 2 * 16 * 16  # layers * H * K * V


def test_hybrid_with_full_attention_decodes():
  # Gated DeltaNet-H style stack: layer 1 is full causal softmax attention with a KV cache.
  h = Compiled(zoo.build(cfg("gated_deltanet", attention_layers=(1,)), rngs=2))
  check_decode(h, tokens(4, 2, 20))
  assert h.model.state_size() is None  # the KV cache grows with the context


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_gradients_finite_and_nonzero(name):
  check_gradients(zoo.build(cfg(name), rngs=1), tokens(3, 2, 20))


# Gated DeltaNet's output gate silu(x W_gate) multiplies the memory read by key-dependent noise
# at initialisation, which slows MQAR learning about threefold (200 steps x 16, 2 heads: DeltaNet
# 0.88, with the output gate 0.10; gated DeltaNet 0.11, without it 0.52), so it gets 500 steps.
@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [("deltanet", 200), ("gated_deltanet", 500)])
def test_mqar_beats_chance(name, steps):
  result = train_mqar(zoo.config(name, "tiny"), steps=steps)
  assert result["accuracy"] > 3 * result["chance"], result["accuracy"]
