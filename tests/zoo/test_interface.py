"""The model contract (``zoo.interface``): every family meets it, and the training options it
defines (compute dtype, remat) reach every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.interface import LanguageModel, ZooModel, set_remat, with_compute_dtype

FAMILIES = zoo.list_models()


def abstract_model(cfg):
  return nnx.eval_shape(lambda: zoo.build(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_meets_the_contract(family):
  model = abstract_model(zoo.config(family))
  assert isinstance(model, ZooModel) and isinstance(model, LanguageModel)
  assert isinstance(model.accepts_segment_ids, bool)
  size = model.state_size()
  assert size is None or size > 0
  # A fixed-size decode state is exactly what lets decoding run past max_len.
  assert model.unbounded_decode == (size is not None) or family == "streaming"
  assert model.max_len >= 1


def forward_jaxpr(cfg) -> str:
  model = zoo.build(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((1, 16), jnp.int32)
  return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state))


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_dtype_reaches_every_family(family):
  cfg = zoo.config(family)
  # Without the option nothing runs in bf16, so finding bf16 below is the option's doing.
  assert "bf16" not in forward_jaxpr(cfg)
  text = forward_jaxpr(with_compute_dtype(cfg, "bfloat16"))
  assert "bf16" in text and "dot_general" in text


def test_compute_dtype_refuses_a_config_without_one():
  with pytest.raises(TypeError):
    with_compute_dtype(zoo.config("transformer").__class__, "bfloat16")


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_reaches_every_block(family):
  cfg = zoo.config(family)
  layers = cfg.backbone.n_layers if hasattr(cfg, "backbone") else cfg.n_layers
  model = abstract_model(cfg)
  assert set_remat(model, "full") == layers
  assert set_remat(model, None) == layers


@pytest.mark.parametrize(
  "family",
  ["transformer", "streaming", "based"]
  + [pytest.param(f, marks=pytest.mark.slow) for f in ("titans", "hope")],
)
def test_remat_keeps_the_forward_and_its_gradient(family):
  cfg = zoo.config(family)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)

  def loss_and_grad(policy):
    model = zoo.build(cfg, rngs=nnx.Rngs(0))
    set_remat(model, policy)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      logits, _ = nnx.merge(graphdef, p, rest)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1))

    fn = jax.jit(jax.value_and_grad(loss))
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return fn(params), text.count("checkpoint") + text.count("remat")

  (plain, g0), plain_count = loss_and_grad(None)
  (full, g1), full_count = loss_and_grad("full")
  # Some ops checkpoint inside themselves; the option adds one boundary per block.
  assert full_count > plain_count  # the option changes the program ...
  np.testing.assert_allclose(float(full), float(plain), rtol=1e-6)  # ... not the numbers
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
